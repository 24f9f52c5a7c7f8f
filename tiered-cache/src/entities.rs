//! Counters per entity (the entity name of a key: `{product:v3:7}` counts
//! as `product`), opt-in with
//! [`stats_per_entity`](crate::TieredCacheBuilder::stats_per_entity): hit
//! rates per entity without an exporter, and with the `metrics` feature
//! `tiered_cache_entity_<counter>_total{namespace, entity}`.
//!
//! Off by default because each read then also looks its entity up (a
//! read-locked map probe); the plain counters cost one striped add.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};

use crate::events::Event;
use crate::key::entity_of;

/// The read events counted per entity, in [`EntityStats`]'s field order.
const COUNTED: [Event; 6] = [
    Event::L1Hit,
    Event::L2Hit,
    Event::Miss,
    Event::NegativeHit,
    Event::Load,
    Event::LoadError,
];

/// At most this many entities get their own counters; the rest count as
/// [`OTHER`] (keys are typed by the program, so more means a bug upstream).
const MAX_ENTITIES: usize = 1_000;
const OTHER: &str = "(other)";

/// One entity's read counters, from
/// [`TieredCache::entity_stats`](crate::TieredCache::entity_stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntityStats {
    /// The entity name, as in its keys (escaped).
    pub entity: String,
    /// Reads answered from L1.
    pub l1_hits: u64,
    /// Reads answered from Redis.
    pub l2_hits: u64,
    /// Reads that found nothing usable.
    pub misses: u64,
    /// Reads that found a cached negative.
    pub negative_hits: u64,
    /// Loader runs.
    pub loads: u64,
    /// Loader runs that failed.
    pub load_errors: u64,
}

impl EntityStats {
    /// Hits (L1, L2 and negative) over all reads; 0 with no reads.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.l1_hits + self.l2_hits + self.negative_hits;
        let reads = hits + self.misses;
        if reads == 0 {
            0.0
        } else {
            hits as f64 / reads as f64
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    counts: [AtomicU64; COUNTED.len()],
    #[cfg(feature = "metrics")]
    handles: Vec<metrics::Counter>,
}

#[derive(Debug)]
struct Table {
    /// The `namespace` label of the entity metrics.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    namespace: String,
    entities: RwLock<HashMap<Box<str>, Arc<Counts>>>,
}

/// The per-entity counters of one cache, when turned on.
#[derive(Debug, Default)]
pub(crate) struct ByEntity(OnceLock<Table>);

impl ByEntity {
    pub(crate) fn enable(&self, namespace: &str) {
        let _ = self.0.set(Table {
            namespace: namespace.to_owned(),
            entities: RwLock::default(),
        });
    }

    /// Counts `event` for the entity of `key` (a key's bytes, always
    /// UTF-8: checked only here, when this is on), if this is on and the
    /// event is one counted per entity.
    #[inline]
    pub(crate) fn record<K: AsRef<[u8]> + ?Sized>(&self, event: Event, key: &K) {
        let Some(table) = self.0.get() else { return };
        let Some(slot) = COUNTED.iter().position(|e| *e == event) else {
            return;
        };
        let Ok(key) = std::str::from_utf8(key.as_ref()) else {
            return;
        };
        let counts = table.counts(entity_of(key));
        counts.counts[slot].fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        counts.handles[slot].increment(1);
    }

    pub(crate) fn snapshot(&self) -> Vec<EntityStats> {
        let Some(table) = self.0.get() else {
            return Vec::new();
        };
        let entities = table.entities.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<EntityStats> = entities
            .iter()
            .map(|(name, counts)| {
                let n = |i: usize| counts.counts[i].load(Relaxed);
                EntityStats {
                    entity: name.to_string(),
                    l1_hits: n(0),
                    l2_hits: n(1),
                    misses: n(2),
                    negative_hits: n(3),
                    loads: n(4),
                    load_errors: n(5),
                }
            })
            .collect();
        out.sort_by(|a, b| a.entity.cmp(&b.entity));
        out
    }
}

impl Table {
    fn counts(&self, entity: &str) -> Arc<Counts> {
        if let Some(counts) = self
            .entities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(entity)
        {
            return Arc::clone(counts);
        }
        let mut entities = self.entities.write().unwrap_or_else(|p| p.into_inner());
        let entity = if entities.len() >= MAX_ENTITIES && !entities.contains_key(entity) {
            OTHER
        } else {
            entity
        };
        Arc::clone(
            entities
                .entry(Box::from(entity))
                .or_insert_with(|| Arc::new(self.new_counts(entity))),
        )
    }

    #[cfg(feature = "metrics")]
    fn new_counts(&self, entity: &str) -> Counts {
        let labels = [
            ("namespace", self.namespace.clone()),
            ("entity", entity.to_owned()),
        ];
        let handles = COUNTED
            .iter()
            .map(|e| {
                let name = format!("tiered_cache_entity_{}_total", e.counter_name());
                metrics::counter!(name, &labels)
            })
            .collect();
        Counts {
            counts: Default::default(),
            handles,
        }
    }

    #[cfg(not(feature = "metrics"))]
    fn new_counts(&self, _entity: &str) -> Counts {
        Counts::default()
    }
}
