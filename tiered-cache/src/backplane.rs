//! Cross-instance L1 invalidation over Redis pub/sub: the backplane.
//!
//! Every cache with a Redis tier has a random instance id, one publisher
//! task and one subscriber connection on the channel `{namespace}:#backplane`.
//! `set`, `invalidate`, `invalidate_tag` and `clear` hand an [`Event`] to the
//! publisher *after* their Redis write; the publisher sends whatever has
//! queued up as one postcard message, so a burst of a thousand invalidations
//! becomes a handful of `PUBLISH`es while a lone one leaves at once (no timer
//! adds latency). Other instances drop the named keys from their L1, learn
//! the tag's new version and drop the tag's L1 entries, or clear their L1.
//! A received message never touches Redis: the sender already wrote it, and
//! N receivers re-running the write would cost N extra commands per message.
//! An instance ignores its own messages.
//!
//! A write of an entry (`set`, an entity's put, a fleet-locked load's
//! store) does not wait for the publisher: in classic mode its store script
//! `PUBLISH`es the key's message itself, right after its `SET`s
//! ([`Backplane::announcement`], `l2/scripts/store.lua`), so the message is
//! out before the write is acknowledged and a peer never serves its old
//! copy after the writer's call returned. Where the script did not
//! announce (sharded mode, a refused `PUBLISH`, a timed-out or failed
//! write), the write hands its event to the publisher as above.
//!
//! # Gaps
//! Pub/sub delivers at most once: messages sent while a subscriber is away
//! are lost. So when the subscription comes back (after `CLIENT KILL`, a
//! Redis restart, a network cut, or a health-check `PING` without answer),
//! the instance clears its whole L1 and forgets the tag versions it knew,
//! and counts a gap in `stats.backplane_gaps`; it does so only *after* the
//! new subscription is confirmed, so that no message can fall between the
//! clear and the resubscription. While the subscription is down, L1 entries
//! are served up to their TTL (bounded by `l1_ttl_cap`), and L2 reads check
//! tag versions against Redis instead of trusting what this instance knew.
//! A publisher that cannot publish retries with backoff; if events pile up
//! meanwhile, it sends one `Flush` instead, which makes receivers treat it as
//! a gap. A message a receiver cannot decode is treated the same way.
//!
//! The subscriber is a dedicated RESP2 pub/sub connection (`l2/pubsub.rs`
//! says why), which this module reconnects itself.
//!
//! # On a Redis Cluster
//! Classic pub/sub: the `PUBLISH` goes to the master of the channel's slot,
//! which broadcasts it to every node over the cluster bus, so the
//! subscriber may listen on any one node. The first subscription goes to a
//! random one of the configured nodes (so a fleet spreads its subscribers,
//! and the fan-out, over them), each later one to the next node, so a
//! subscriber whose node died (or was
//! failed over, or paused past the health check) comes back on another one,
//! with a gap counted and L1 cleared as above. Sharded pub/sub
//! ([`BackplaneMode::Sharded`]: `SPUBLISH`/`SSUBSCRIBE`, Redis 7) keeps each
//! message within the shard that owns the channel's slot instead of the
//! whole bus; its subscriber is a RESP3 cluster connection of its own
//! (`l2/pubsub.rs` says when it counts as lost). `benches/README.md`
//! ("The backplane's knee") compares the two on the test cluster.
//!
//! Publishing goes through the L2 tier's multiplexed connection, under its
//! timeout and error accounting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::events;
use crate::events::LogLimit;
use crate::fleet::FleetWaits;
use crate::l1::L1;
pub(crate) use crate::l2::Announcement;
use crate::l2::{Health, L2Fault, Messages, L2};
use crate::stats::Stats;
use crate::tags::TagVersions;

/// Which Redis pub/sub carries the backplane on a Redis Cluster
/// ([`TieredCacheBuilder::backplane_mode`](crate::TieredCacheBuilder::backplane_mode)).
/// On one Redis both are the same and classic is used.
#[cfg(feature = "cluster")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackplaneMode {
    /// `PUBLISH`/`SUBSCRIBE`: the channel's master broadcasts every
    /// message to every node over the cluster bus, and each instance
    /// subscribes on any one node (moving to another when it is lost).
    #[default]
    Classic,
    /// `SPUBLISH`/`SSUBSCRIBE` (Redis 7): a message stays within the shard
    /// that owns the channel's slot, and every instance subscribes there.
    Sharded,
}

/// One invalidation, as sent between instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Event {
    /// Drop this key (its body, without the namespace) from L1.
    Key(String),
    /// The tag was bumped to this version (`None`: the bump failed, drop
    /// the tag's L1 entries anyway).
    Tag(String, Option<u64>),
    /// The namespace epoch was bumped to this version: clear L1.
    Clear(Option<u64>),
    /// The sender lost events: treat as a gap (clear L1, forget tag versions).
    Flush,
}

/// Leading byte of every message; a message with another is not understood.
const FORMAT: u8 = 1;

/// The wire form: `FORMAT` then postcard of this.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    sender: u64,
    events: Vec<Event>,
}

/// Most events in one message (keeps messages well under 100 KB). When more
/// than this pile up while publishing fails, one `Flush` replaces them.
const MAX_BATCH: usize = 256;
/// How often an idle subscriber checks its connection with a `PING`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnection backoff bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// After the cache is dropped, the publisher tries this many more times.
const FINAL_ATTEMPTS: u32 = 3;

/// What a received message acts on: this instance's L1, tag table and stats.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub(crate) l1: Option<L1>,
    pub(crate) tags: Arc<TagVersions>,
    pub(crate) stats: Arc<Stats>,
    /// Woken when a key is announced: a fleet-locked load may have stored it.
    pub(crate) fleet_waits: Arc<FleetWaits>,
}

/// A running backplane; dropping it stops the subscriber, and the publisher
/// once it has sent what is queued.
#[derive(Debug)]
pub(crate) struct Backplane {
    tx: mpsc::UnboundedSender<Event>,
    /// This instance's id, the sender of its messages.
    id: u64,
    channel: String,
    /// Sharded pub/sub: every message goes through the publisher task.
    sharded: bool,
    subscriber: JoinHandle<()>,
    /// Set when the cache drops its backplane: the subscriber's end is
    /// then expected, not a runtime that shut down under it.
    closing: Arc<AtomicBool>,
}

impl Drop for Backplane {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        self.subscriber.abort();
    }
}

/// Lives inside the subscriber task. The task ends only when the cache
/// drops its backplane, or when the runtime it was spawned on shuts down
/// (a cache built inside a temporary `Runtime::block_on`, or a per-test
/// runtime). In the second case nothing keeps this instance's L1 and tag
/// versions current any more: it stops trusting them, as after a lost
/// subscription, for good.
struct StoppedGuard {
    local: Local,
    closing: Arc<AtomicBool>,
}

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        self.local.tags.set_live(false);
        self.local.tags.forget_all();
        if let Some(l1) = &self.local.l1 {
            l1.clear();
        }
        self.local.stats.record(events::Event::BackplaneGap);
        tracing::warn!(
            "the backplane stopped: the tokio runtime the cache was built on shut down; this instance no longer hears other instances' invalidations (its L1 serves entries up to l1_ttl_cap, and reads check tag versions in Redis). Build the cache on the runtime that uses it"
        );
    }
}

impl Backplane {
    /// Starts the publisher and the subscriber, and waits up to `wait` for
    /// the first subscription (so a cache built while Redis answers is
    /// subscribed before it is used). Until it is confirmed, tag versions
    /// are not trusted.
    pub(crate) async fn start(l2: &L2, local: Local, wait: Duration) -> Backplane {
        let id = rand::random::<u64>();
        let channel = l2.channel("#backplane");
        local.tags.set_live(false);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_loop(
            rx,
            l2.clone(),
            channel.clone(),
            id,
            Arc::clone(&local.stats),
        ));
        let (ready_tx, ready_rx) = oneshot::channel();
        let subscriber = Subscriber {
            l2: l2.clone(),
            undecodable_log: LogLimit::once(),
            channel: channel.clone(),
            id,
            local,
            timeout: l2.timeout().max(Duration::from_millis(500)),
        };
        let closing = Arc::new(AtomicBool::new(false));
        let guard = StoppedGuard {
            local: subscriber.local.clone(),
            closing: Arc::clone(&closing),
        };
        let subscriber = tokio::spawn(async move {
            let _guard = guard;
            subscriber.run(ready_tx).await;
        });
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, ready_rx).await;
        }
        Backplane {
            tx,
            id,
            channel,
            sharded: l2.sharded_pubsub(),
            subscriber,
            closing,
        }
    }

    /// The message that invalidates `key` on the other instances, exactly
    /// as the publisher would send it alone, for a store script to
    /// `PUBLISH` with its write (so it is out before the write returns).
    /// `None` in sharded mode: a script runs on the entry's shard, and the
    /// channel's slot is elsewhere.
    pub(crate) fn announcement(&self, key: &str) -> Option<Announcement> {
        if self.sharded {
            return None;
        }
        let (payload, _) = encode(self.id, vec![Event::Key(key.to_owned())]);
        Some(Announcement {
            channel: self.channel.clone(),
            payload,
        })
    }

    /// Queues `event` for the other instances. Never waits.
    pub(crate) fn publish(&self, event: Event) {
        // Fails only when the publisher has stopped, which it does only
        // after this handle is dropped.
        let _ = self.tx.send(event);
    }
}

/// Encodes one message.
fn encode(sender: u64, events: Vec<Event>) -> (Vec<u8>, Vec<Event>) {
    let message = Message { sender, events };
    // Encoding strings and integers into a Vec cannot fail.
    let bytes = postcard::to_extend(&message, vec![FORMAT]).unwrap_or_default();
    (bytes, message.events)
}

/// The sender of a message, read without decoding its events: an
/// instance hears each of its own messages too, and drops them unread.
fn sender_of(bytes: &[u8]) -> Option<u64> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => postcard::take_from_bytes::<u64>(body)
            .ok()
            .map(|(sender, _)| sender),
        _ => None,
    }
}

fn decode(bytes: &[u8]) -> Option<Message> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => postcard::from_bytes(body).ok(),
        _ => None,
    }
}

/// Sends queued events, batched, retrying with backoff while Redis fails.
async fn publish_loop(
    mut rx: mpsc::UnboundedReceiver<Event>,
    l2: L2,
    channel: String,
    id: u64,
    stats: Arc<Stats>,
) {
    let mut batch: Vec<Event> = Vec::new();
    let mut backoff = Backoff::default();
    let mut closed = false;
    let mut final_attempts = 0;
    let mut refused_logged = false;
    loop {
        if batch.is_empty() && (closed || rx.recv_many(&mut batch, MAX_BATCH).await == 0) {
            return;
        }
        let (payload, events) = encode(id, std::mem::take(&mut batch));
        match l2.publish(&channel, &payload).await {
            Ok(()) => {
                stats.record(crate::events::Event::BackplanePublished);
                backoff.reset();
                continue;
            }
            Err(L2Fault::Rejected(_)) => {
                // Refused (an ACL without channel rights): retrying will not
                // help, and nothing else about Redis is wrong.
                if !refused_logged {
                    refused_logged = true;
                    log_refused_publish(&channel);
                }
                continue;
            }
            Err(_) => {}
        }
        // Not sent (counted and logged by the L2 tier): keep it, add what
        // queued meanwhile, and collapse into one `Flush` when too much piles up.
        batch = events;
        loop {
            match rx.try_recv() {
                Ok(event) => batch.push(event),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.len() > MAX_BATCH {
            batch = vec![Event::Flush];
        }
        if closed {
            final_attempts += 1;
            if final_attempts > FINAL_ATTEMPTS {
                return;
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// The subscriber: keeps one subscription alive and applies what arrives.
struct Subscriber {
    l2: L2,
    undecodable_log: LogLimit,
    channel: String,
    id: u64,
    local: Local,
    timeout: Duration,
}

impl Subscriber {
    async fn run(self, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut backoff = Backoff::default();
        let mut subscribed_before = false;
        let mut failing = false;
        loop {
            match self.subscribe().await {
                Ok((health, messages)) => {
                    self.resync(subscribed_before);
                    if subscribed_before {
                        tracing::info!(
                            channel = %self.channel,
                            "backplane subscribed again; L1 cleared, as invalidations may have been missed (see stats.backplane_gaps)"
                        );
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    subscribed_before = true;
                    failing = false;
                    backoff.reset();
                    let why = self.listen(health, messages).await;
                    self.local.tags.set_live(false);
                    tracing::warn!(
                        channel = %self.channel,
                        reason = why,
                        "backplane subscription lost; L1 may serve invalidated entries up to l1_ttl_cap until it is back"
                    );
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(channel = %self.channel, error = e, "backplane cannot subscribe; retrying with backoff");
                    }
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// A new connection, subscribed (the subscription is confirmed on return).
    async fn subscribe(&self) -> Result<(Health, Messages), &'static str> {
        self.l2
            .subscribe(&self.channel, self.timeout * 4)
            .await
            .map_err(|fault| fault.describe())
    }

    /// After (re)subscribing: nothing this instance knew can be trusted,
    /// as messages may have been missed. The tag table is forgotten before
    /// L1 is cleared, so a promotion racing this rechecks from Redis or is
    /// undone by the clear.
    fn resync(&self, gap: bool) {
        self.local.tags.forget_all();
        self.local.tags.set_live(true);
        if let Some(l1) = &self.local.l1 {
            l1.clear();
        }
        if gap {
            self.local.stats.record(events::Event::BackplaneGap);
        }
    }

    /// Applies messages until the connection ends or stops answering.
    async fn listen(&self, mut health: Health, mut messages: Messages) -> &'static str {
        let mut ticks = tokio::time::interval(HEALTH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(payload) => self.apply(&payload).await,
                    None => return "connection closed",
                },
                _ = ticks.tick() => {
                    if let Err(why) = health.ping(self.timeout * 2).await {
                        return why;
                    }
                }
            }
        }
    }

    /// Applies one message to this instance's L1 and tag table.
    async fn apply(&self, payload: &[u8]) {
        if sender_of(payload) == Some(self.id) {
            return;
        }
        let Some(message) = decode(payload) else {
            if self.undecodable_log.allow() {
                tracing::warn!("a backplane message could not be decoded (another version of tiered-cache on the same namespace?); L1 cleared to stay safe (logged once)");
            }
            self.resync(true);
            return;
        };
        let count = message.events.len() as u64;
        for event in message.events {
            self.local.apply(event).await;
        }
        // Counted after the drops, so a reader of the counter sees them done.
        self.local
            .stats
            .record_many(events::Event::InvalidationReceived, count);
    }
}

impl Local {
    async fn apply(&self, event: Event) {
        match event {
            Event::Key(key) => {
                if let Some(l1) = &self.l1 {
                    l1.invalidate(&key).await;
                }
                self.fleet_waits.wake(&key);
            }
            Event::Tag(tag, version) => {
                if let Some(version) = version {
                    self.tags.observe(&tag, version);
                }
                if let Some(l1) = &self.l1 {
                    match version {
                        Some(version) => l1.invalidate_tag(&tag, version),
                        None => l1.drop_tag(&tag),
                    }
                }
            }
            Event::Clear(version) => {
                if let Some(version) = version {
                    self.tags.observe(crate::tags::EPOCH_TAG, version);
                }
                if let Some(l1) = &self.l1 {
                    l1.clear();
                }
            }
            Event::Flush => {
                self.tags.forget_all();
                if let Some(l1) = &self.l1 {
                    l1.clear();
                }
                self.stats.record(events::Event::BackplaneGap);
            }
        }
    }
}

fn log_refused_publish(channel: &str) {
    tracing::warn!(
        channel,
        "Redis refused PUBLISH on the backplane channel (an ACL user without channel rights?): other instances do not hear of this one's writes and invalidations, and serve their L1 copies up to l1_ttl_cap; grant the channel or set l1_ttl_cap (logged once)"
    );
}

/// Exponential backoff with jitter, so a fleet does not reconnect in step.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let ceiling = MIN_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        // Between half the ceiling and the ceiling.
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let events = vec![
            Event::Key("{product:v1:7}".into()),
            Event::Tag("products".into(), Some(1_700_000_000_000_000)),
            Event::Tag("x".into(), None),
            Event::Clear(Some(3)),
            Event::Flush,
        ];
        let (bytes, back) = encode(42, events.clone());
        assert_eq!(back, events);
        let message = decode(&bytes).unwrap();
        assert_eq!(message.sender, 42);
        assert_eq!(message.events, events);
    }

    /// The sender is read off the front of a message without its events,
    /// whatever follows (an instance drops its own messages unread).
    #[test]
    fn the_sender_is_read_without_the_events() {
        for sender in [0, 1, 127, 128, 42, u64::MAX] {
            let (bytes, _) = encode(sender, vec![Event::Key("{p:v1:7}".into()), Event::Flush]);
            assert_eq!(sender_of(&bytes), Some(sender));
            assert_eq!(
                sender_of(&bytes[..bytes.len() - 1]),
                Some(sender),
                "cut short"
            );
        }
        let (mut bytes, _) = encode(9, vec![Event::Flush]);
        bytes[0] = FORMAT + 1;
        assert_eq!(sender_of(&bytes), None);
        assert_eq!(sender_of(&[]), None);
        assert_eq!(sender_of(&[FORMAT]), None);
        assert_eq!(sender_of(&[FORMAT, 0xff]), None, "a varint cut short");
    }

    #[test]
    fn a_key_invalidation_is_compact() {
        let (bytes, _) = encode(u64::MAX, vec![Event::Key("{product:v1:7}".into())]);
        // format + varint id (10) + count + variant + len + 14 bytes of key
        assert!(bytes.len() <= 30, "{} bytes", bytes.len());
    }

    #[test]
    fn other_formats_and_garbage_are_not_understood() {
        let (mut bytes, _) = encode(1, vec![Event::Flush]);
        bytes[0] = FORMAT + 1;
        assert!(decode(&bytes).is_none());
        assert!(decode(&[]).is_none());
        assert!(decode(&[FORMAT, 0xff, 0xff]).is_none());
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first <= MIN_BACKOFF);
        for _ in 0..20 {
            assert!(b.next() <= MAX_BACKOFF);
        }
        assert!(b.next() >= MAX_BACKOFF / 2);
        b.reset();
        assert!(b.next() <= MIN_BACKOFF);
    }
}
