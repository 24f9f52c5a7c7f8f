//! The backplane's subscriber connection: a dedicated RESP2 `aio::PubSub`.
//!
//! redis-rs 1.8 offers two ways to subscribe from tokio (NOTES-redis-moka §2):
//! a RESP3 push sender on a `ConnectionManager` with automatic resubscription,
//! or a dedicated RESP2 `aio::PubSub` whose stream ends when the connection
//! drops. This uses the latter and lets the backplane reconnect, because:
//! - the moment the subscription is live again is exactly when
//!   [`L2::subscribe`] returns, which is when L1 must be cleared; the manager
//!   resubscribes in the background, ignores resubscription errors
//!   (connection_manager.rs:612-615) and only tells of the disconnection;
//! - it needs no RESP3, so it works with any URL the L2 tier accepts, and the
//!   subscriber is a RESP2 pub/sub client that the usual Redis tools see as
//!   one (`CLIENT KILL TYPE pubsub`, the `pubsub` output-buffer limit);
//! - a connection that hangs without closing (a paused server, a silent
//!   network cut) is caught by a periodic `PING` on the same connection,
//!   with a timeout, which the split sink allows beside the stream.
//!
//! On a Redis Cluster the connection goes to one node at a time, the next
//! seed node on each attempt (`conn.rs`, `Endpoint::subscriber`): any node
//! hears every classic `PUBLISH`.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use super::L2;

/// Why a subscription could not be made or was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscribeFault {
    /// Redis refused the subscription (an ACL without channel rights, `NOPERM`).
    Refused,
    /// The connection or the `SUBSCRIBE` failed.
    Failed,
    /// No answer in time.
    NoAnswer,
}

impl SubscribeFault {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            SubscribeFault::Refused => {
                "Redis refused SUBSCRIBE (NOPERM: the ACL user lacks channel rights)"
            }
            SubscribeFault::Failed => "connection or SUBSCRIBE failed",
            SubscribeFault::NoAnswer => "no answer in time",
        }
    }
}

/// The messages of a live subscription.
pub(crate) struct Messages(PubSubStream);

/// The other half of a live subscription, for health checks.
pub(crate) struct Health(PubSubSink);

impl L2 {
    /// A new connection subscribed to `channel`; the subscription is
    /// confirmed when this returns. Bounded by `within`.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        within: Duration,
    ) -> Result<(Health, Messages), SubscribeFault> {
        // On a cluster, first learn which nodes there are now (any of them
        // will do, and the one subscribed to before may be gone).
        self.learn_nodes().await;
        let Some(client) = self.endpoint.subscriber() else {
            return Err(SubscribeFault::Failed);
        };
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.split())
        };
        match tokio::time::timeout(within, connect).await {
            Ok(Ok((sink, stream))) => Ok((Health(sink), Messages(stream))),
            Ok(Err(e)) if e.code() == Some("NOPERM") => Err(SubscribeFault::Refused),
            Ok(Err(_)) => Err(SubscribeFault::Failed),
            Err(_) => Err(SubscribeFault::NoAnswer),
        }
    }
}

impl Messages {
    /// The next message's payload; `None` when the connection ended.
    pub(crate) async fn next(&mut self) -> Option<Vec<u8>> {
        let message = self.0.next().await?;
        Some(message.get_payload_bytes().to_vec())
    }
}

impl Health {
    /// A `PING` on the subscription's connection, answered `within`.
    pub(crate) async fn ping(&mut self, within: Duration) -> Result<(), &'static str> {
        let ping = self.0.ping::<redis::Value>();
        match tokio::time::timeout(within, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("PING failed"),
            Err(_) => Err("no answer to PING"),
        }
    }
}
