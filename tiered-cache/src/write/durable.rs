//! Durable write-behind: every queued write is also appended to a Redis
//! Stream before `put` returns, and deleted from it once the store has it.
//! What is left in the stream was acknowledged to a caller and not yet
//! stored; if its writer died, another queue (on restart, or on another
//! instance) flushes it.
//!
//! Finding those orphans uses the stream's consumer group. Each queue reads
//! new entries into its own pending list (`XREADGROUP >`) and looks at them
//! again once they are `claim_idle` old: by then a live writer has flushed
//! and deleted its own entries, so what is still there is an orphan, and is
//! flushed here. Entries a dead queue had taken are taken over with
//! `XAUTOCLAIM` after `claim_idle`. Two queues may flush one write (a slow
//! writer, or a short `claim_idle`): harmless, since the store refuses
//! versions it has already passed.
//!
//! The stream lives as long as Redis keeps it: durability across a Redis
//! restart is Redis's persistence (AOF), as for every Redis data.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::{DeadLetter, Entity, WriteBehind};
use crate::codec::{Codec, Postcard};
use crate::error::{Error, ErrorKind};
use crate::key::escape_into;
use crate::l2::{StreamEntry, L2};

/// The consumer group every queue of an entity reads through.
const GROUP: &str = "flush";
/// Pages of the pending list and of new entries looked at per round.
const PAGES: usize = 16;

/// A write found in the stream that no live queue will flush.
pub(crate) struct Orphan<E: Entity> {
    pub(crate) id: E::Id,
    pub(crate) value: Option<Arc<E>>,
    pub(crate) version: u64,
    pub(crate) entry: String,
}

/// One entity's stream, as one queue uses it.
pub(crate) struct Durable {
    l2: L2,
    stream: String,
    dead: String,
    consumer: String,
    claim_idle: Duration,
    page: usize,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl Durable {
    pub(crate) fn new(l2: L2, name: &str, version: u32, config: &WriteBehind) -> Self {
        // One hash tag for the stream and its dead letters: one slot.
        let mut stream = String::from("{#write-behind:");
        escape_into(&mut stream, name);
        stream.push_str(&format!(":v{version}}}"));
        let dead = format!("{stream}:dead");
        let consumer = config
            .consumer
            .clone()
            .unwrap_or_else(|| format!("queue-{:016x}", rand::random::<u64>()));
        Durable {
            l2,
            stream,
            dead,
            consumer,
            claim_idle: config.claim_idle,
            page: config.batch_size,
        }
    }

    /// How often a queue looks for orphans.
    pub(crate) fn round_every(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(20), Duration::from_secs(5))
    }

    /// Appends a write; returns its entry id once Redis holds it.
    pub(crate) async fn append<E: Entity>(
        &self,
        id: &E::Id,
        value: Option<&E>,
        version: u64,
    ) -> Result<String, Error> {
        let encoded_id = encode(id)?;
        let encoded_value = value.map(encode).transpose()?;
        let version = version.to_string();
        let mut fields: Vec<(&str, &[u8])> =
            vec![("id", &encoded_id), ("version", version.as_bytes())];
        if let Some(bytes) = &encoded_value {
            fields.push(("value", bytes));
        }
        self.l2
            .within_timeout(self.l2.stream_add(&self.stream, &fields))
            .await
            .map_err(|fault| {
                Error::new(
                    ErrorKind::L2,
                    format!(
                        "the durable write-behind queue of `{}` could not be written to Redis, so the write was not accepted: retry once Redis is back",
                        E::NAME
                    ),
                )
                .with_source(fault.into_error())
            })
    }

    /// Deletes finished entries from the stream (and from whichever queue's
    /// pending list holds them). A failure leaves them to be flushed again
    /// later: harmless, by their versions.
    pub(crate) async fn done(&self, entries: &[String]) {
        let _ = self
            .l2
            .within_timeout(self.l2.stream_done(&self.stream, GROUP, entries))
            .await;
    }

    /// Finds the writes no live queue will flush; finishes at once the
    /// entries that are gone. `first`: the round just after this queue
    /// started, when its own pending entries (a previous process of the
    /// same consumer name) are orphans whatever their age.
    pub(crate) async fn orphans<E: Entity>(&self, first: bool) -> Vec<Orphan<E>> {
        let l2 = &self.l2;
        // A round sends a few dozen commands: a few budgets in all.
        let found = crate::l2::budget::within(l2.timeout().saturating_mul(4), async {
            l2.stream_group(&self.stream, GROUP).await?;
            let idle = self.claim_idle.as_millis().min(u128::from(u64::MAX)) as u64;
            // (entry, whether it is an orphan whatever its age)
            let mut found: Vec<(StreamEntry, bool)> = Vec::new();
            let claimed = l2
                .stream_claim(&self.stream, GROUP, &self.consumer, idle, self.page)
                .await?;
            found.extend(claimed.into_iter().map(|e| (e, false)));
            // This consumer's own pending entries: on the first round,
            // a previous process of the same name took them.
            let mut after = "0".to_owned();
            for _ in 0..PAGES {
                let page = l2
                    .stream_read(&self.stream, GROUP, &self.consumer, &after, self.page)
                    .await?;
                match page.last() {
                    Some(last) => after = last.id.clone(),
                    None => break,
                }
                found.extend(page.into_iter().map(|e| (e, first)));
            }
            for _ in 0..PAGES {
                let page = l2
                    .stream_read(&self.stream, GROUP, &self.consumer, ">", self.page)
                    .await?;
                let short = page.len() < self.page;
                found.extend(page.into_iter().map(|e| (e, false)));
                if short {
                    break;
                }
            }
            Ok::<_, crate::l2::L2Fault>(found)
        })
        .await
        .unwrap_or_default();
        self.sort(found).await
    }

    /// Splits entries into orphans (decoded) and what to finish now; an
    /// entry flagged `true` is an orphan whatever its age.
    async fn sort<E: Entity>(&self, found: Vec<(StreamEntry, bool)>) -> Vec<Orphan<E>> {
        let now = crate::entry::now_ms();
        let idle = self.claim_idle.as_millis() as u64;
        let mut seen = HashSet::new();
        let mut gone = Vec::new();
        let mut orphans = Vec::new();
        for (entry, orphaned) in found {
            if !seen.insert(entry.id.clone()) {
                continue;
            }
            let Some(fields) = &entry.fields else {
                gone.push(entry.id); // deleted by its writer after its flush
                continue;
            };
            if !orphaned && now.saturating_sub(entry.appended_ms()) < idle {
                continue; // its writer may still flush it: look again later
            }
            match decode::<E>(fields) {
                Some((id, value, version)) => orphans.push(Orphan {
                    id,
                    value,
                    version,
                    entry: entry.id,
                }),
                None => self.set_aside_unreadable(&entry).await,
            }
        }
        self.done(&gone).await;
        orphans
    }

    /// An entry this version of the entity cannot read (bytes damaged, or
    /// written by other code): moved to the dead letters as it is, never
    /// dropped, and logged.
    async fn set_aside_unreadable(&self, entry: &StreamEntry) {
        tracing::warn!(
            stream = %self.stream,
            "a durable write-behind entry could not be decoded; moved to the dead-letter stream as it is"
        );
        let mut fields: Vec<(&str, &[u8])> = vec![("error", b"undecodable entry".as_slice())];
        if let Some(map) = &entry.fields {
            fields.extend(map.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        }
        let moved = self
            .l2
            .within_timeout(self.l2.stream_add(&self.dead, &fields))
            .await;
        if moved.is_ok() {
            self.done(std::slice::from_ref(&entry.id)).await;
        }
    }

    /// Records a dead letter in Redis, where every instance can read it.
    pub(crate) async fn dead_letter<E: Entity>(&self, letter: &DeadLetter<E::Id, E>) {
        let Ok(id) = encode(&letter.id) else { return };
        let value = letter.value.as_deref().map(encode).transpose();
        let Ok(value) = value else { return };
        let version = letter.version.to_string();
        let attempts = letter.attempts.to_string();
        let mut fields: Vec<(&str, &[u8])> = vec![
            ("id", &id),
            ("version", version.as_bytes()),
            ("error", letter.error.as_bytes()),
            ("attempts", attempts.as_bytes()),
        ];
        if let Some(bytes) = &value {
            fields.push(("value", bytes));
        }
        let _ = self
            .l2
            .within_timeout(self.l2.stream_add(&self.dead, &fields))
            .await;
    }

    /// Takes the dead letters out of Redis (those this version can read).
    pub(crate) async fn take_dead_letters<E: Entity>(&self) -> Vec<DeadLetter<E::Id, E>> {
        let l2 = &self.l2;
        let entries = l2
            .within_timeout(l2.stream_range(&self.dead, 10_000))
            .await
            .unwrap_or_default();
        let mut letters = Vec::new();
        let mut taken = Vec::new();
        for entry in entries {
            let Some(fields) = &entry.fields else {
                continue;
            };
            let Some((id, value, version)) = decode::<E>(fields) else {
                continue; // left in Redis for a person to look at
            };
            let text = |name: &str| {
                fields
                    .get(name)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            };
            letters.push(DeadLetter {
                id,
                value,
                version,
                error: text("error").unwrap_or_default(),
                attempts: text("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            });
            taken.push(entry.id);
        }
        let _ = l2
            .within_timeout(l2.stream_delete(&self.dead, &taken))
            .await;
        letters
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    Postcard::encode(value, &mut bytes)?;
    Ok(bytes)
}

/// An entry's write: id, value (`None`: a delete) and version.
type Decoded<E> = (<E as Entity>::Id, Option<Arc<E>>, u64);

fn decode<E: Entity>(fields: &std::collections::HashMap<String, Vec<u8>>) -> Option<Decoded<E>> {
    let id = Postcard::decode::<E::Id>(fields.get("id")?).ok()?;
    let version = std::str::from_utf8(fields.get("version")?)
        .ok()?
        .parse()
        .ok()?;
    let value = match fields.get("value") {
        Some(bytes) => Some(Arc::new(Postcard::decode::<E>(bytes).ok()?)),
        None => None,
    };
    Some((id, value, version))
}
