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
//!
//! # Sharded pub/sub (feature `cluster`)
//! With [`BackplaneMode::Sharded`](crate::BackplaneMode::Sharded) the
//! backplane `SPUBLISH`es and `SSUBSCRIBE`s instead: a message then stays
//! within the shard that owns the channel's slot (its master and replicas)
//! instead of crossing the whole cluster bus. redis-rs 1.8 offers
//! `SSUBSCRIBE` only on the cluster connection, in RESP3, with a push
//! sender (NOTES-wave2 §4), so each subscription is a new cluster
//! connection of its own, and it ends (for the backplane to resubscribe,
//! clear L1 and count a gap, as for a classic one) when:
//! - the client reports a `Disconnection` of any node (pushes do not say
//!   which, so this is conservative: a node that does not own the channel
//!   costs a gap too);
//! - the server unsubscribes it (`sunsubscribe` push: Redis 7 does that
//!   when the channel's slot moves to another shard, by resharding or a
//!   failover);
//! - a `PING` to the channel's master (routed by its slot, so on the
//!   subscription's own connection) goes unanswered.
//!
//! The client's own resubscription after a reconnect is therefore never
//! relied on (its known multi-slot `SSUBSCRIBE` bug, NOTES-wave2 §4, does
//! not apply anyway: the backplane has one channel).

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
pub(crate) enum Messages {
    Classic(PubSubStream),
    #[cfg(feature = "cluster")]
    Sharded(sharded::Messages),
}

/// The other half of a live subscription, for health checks.
pub(crate) enum Health {
    Classic(PubSubSink),
    #[cfg(feature = "cluster")]
    Sharded(sharded::Health),
}

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
        #[cfg(feature = "cluster")]
        if self.sharded_pubsub {
            return sharded::subscribe(self, channel, within).await;
        }
        let Some(client) = self.endpoint.subscriber() else {
            return Err(SubscribeFault::Failed);
        };
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.split())
        };
        match tokio::time::timeout(within, connect).await {
            Ok(Ok((sink, stream))) => Ok((Health::Classic(sink), Messages::Classic(stream))),
            Ok(Err(e)) => Err(fault(&e)),
            Err(_) => Err(SubscribeFault::NoAnswer),
        }
    }
}

fn fault(e: &redis::RedisError) -> SubscribeFault {
    if e.code() == Some("NOPERM") {
        SubscribeFault::Refused
    } else {
        SubscribeFault::Failed
    }
}

impl Messages {
    /// The next message's payload; `None` when the connection ended.
    pub(crate) async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Messages::Classic(stream) => {
                let message = stream.next().await?;
                Some(message.get_payload_bytes().to_vec())
            }
            #[cfg(feature = "cluster")]
            Messages::Sharded(messages) => messages.next().await,
        }
    }
}

impl Health {
    /// A `PING` on the subscription's connection, answered `within`.
    pub(crate) async fn ping(&mut self, within: Duration) -> Result<(), &'static str> {
        let ping = async {
            match self {
                Health::Classic(sink) => sink.ping::<redis::Value>().await.map(drop),
                #[cfg(feature = "cluster")]
                Health::Sharded(health) => health.ping().await,
            }
        };
        match tokio::time::timeout(within, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("PING failed"),
            Err(_) => Err("no answer to PING"),
        }
    }
}

#[cfg(feature = "cluster")]
mod sharded {
    use std::time::Duration;

    use redis::cluster_async::ClusterConnection;
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    use redis::{PushInfo, PushKind, Value};
    use tokio::sync::mpsc;

    use super::{fault, Health as AnyHealth, Messages as AnyMessages, SubscribeFault};
    use crate::l2::L2;

    /// The pushes of one sharded subscription's cluster connection.
    pub(crate) struct Messages {
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        /// Keeps the connection (and so the subscription) open.
        _conn: ClusterConnection,
    }

    pub(crate) struct Health {
        conn: ClusterConnection,
        /// The channel's slot: a `PING` routed by it goes to the node that
        /// holds the subscription, on the subscription's connection.
        slot: u16,
    }

    /// A new RESP3 cluster connection, `SSUBSCRIBE`d to `channel`
    /// (confirmed on return), within `within`.
    pub(super) async fn subscribe(
        l2: &L2,
        channel: &str,
        within: Duration,
    ) -> Result<(AnyHealth, AnyMessages), SubscribeFault> {
        let (tx, pushes) = mpsc::unbounded_channel();
        let Some(client) = l2.endpoint.sharded_subscriber(l2.timeout, tx) else {
            return Err(SubscribeFault::Failed);
        };
        let connect = async {
            let mut conn = client.get_async_connection().await?;
            conn.ssubscribe(channel).await?;
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(channel)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>((conn, slot))
        };
        match tokio::time::timeout(within, connect).await {
            Ok(Ok((conn, slot))) => Ok((
                AnyHealth::Sharded(Health {
                    conn: conn.clone(),
                    slot,
                }),
                AnyMessages::Sharded(Messages {
                    pushes,
                    _conn: conn,
                }),
            )),
            Ok(Err(e)) => Err(fault(&e)),
            Err(_) => Err(SubscribeFault::NoAnswer),
        }
    }

    impl Messages {
        /// The next `smessage`'s payload; `None` once the subscription may
        /// have missed messages (see the module's doc).
        pub(super) async fn next(&mut self) -> Option<Vec<u8>> {
            loop {
                let push = self.pushes.recv().await?;
                match push.kind {
                    PushKind::SMessage => match push.data.into_iter().nth(1) {
                        Some(Value::BulkString(payload)) => return Some(payload),
                        // Not a payload: let the backplane treat it as
                        // undecodable (a gap).
                        _ => return Some(Vec::new()),
                    },
                    PushKind::Disconnection | PushKind::SUnsubscribe => return None,
                    _ => {}
                }
            }
        }
    }

    impl Health {
        pub(super) async fn ping(&mut self) -> Result<(), redis::RedisError> {
            let route = Route::new(self.slot, SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            self.conn
                .route_command(redis::cmd("PING"), routing)
                .await
                .map(drop)
        }
    }
}
