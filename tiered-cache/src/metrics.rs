//! Export through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): every counter of [`StatsSnapshot`](crate::StatsSnapshot) as
//! `tiered_cache_<name>_total`, the gauges as `tiered_cache_<name>`
//! (`write_queue_depth`, `breaker_state`), the loader's duration as the
//! histogram `tiered_cache_load_seconds` and each Redis request's (a
//! pipeline or script counts once) as `tiered_cache_l2_request_seconds`;
//! each labelled with the cache's
//! `namespace`. Any exporter works (Prometheus, StatsD, ...): install its
//! recorder before building the cache.
//!
//! The handles are registered once per cache, so recording is an atomic
//! add through the recorder, never a lookup or an allocation. Without the
//! feature, every method here is an empty inline function.

use std::time::{Duration, Instant};

use crate::events::{Event, Gauge};

/// Where one cache's events go besides its own counters.
#[derive(Debug, Default)]
pub(crate) struct Export {
    #[cfg(feature = "metrics")]
    sink: std::sync::OnceLock<Sink>,
}

impl Export {
    /// Starts exporting, labelled with `namespace` (once; later calls do nothing).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn install(&self, namespace: &str) {
        #[cfg(feature = "metrics")]
        let _ = self.sink.set(Sink::new(namespace));
    }

    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn count(&self, event: Event, n: u64) {
        #[cfg(feature = "metrics")]
        if let Some(sink) = self.sink.get() {
            match event {
                // A gauge in the snapshot too: the queue's depth.
                Event::WriteQueueGrew => sink.queue_depth.increment(n as f64),
                _ => sink.counters[event as usize].increment(n),
            }
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn queue_shrank(&self, n: u64) {
        #[cfg(feature = "metrics")]
        if let Some(sink) = self.sink.get() {
            sink.queue_depth.decrement(n as f64);
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn set(&self, gauge: Gauge, value: u64) {
        #[cfg(feature = "metrics")]
        if let Some(sink) = self.sink.get() {
            match gauge {
                Gauge::BreakerState => sink.breaker_state.set(value as f64),
            }
        }
    }

    /// Now, if L2 latency is recorded (the feature is on and installed):
    /// the start of one Redis request, for [`l2_time`](Self::l2_time).
    #[inline]
    pub(crate) fn clock(&self) -> Option<Instant> {
        #[cfg(feature = "metrics")]
        if self.sink.get().is_some() {
            return Some(Instant::now());
        }
        None
    }

    /// One Redis request (sent at `started`, from [`clock`](Self::clock))
    /// got its answer, or failed, now.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn l2_time(&self, started: Option<Instant>) {
        #[cfg(feature = "metrics")]
        if let (Some(sink), Some(started)) = (self.sink.get(), started) {
            sink.l2_seconds.record(started.elapsed().as_secs_f64());
        }
    }

    /// How long one loader call took.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn load_time(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(sink) = self.sink.get() {
            sink.load_seconds.record(took.as_secs_f64());
        }
    }
}

#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Sink {
    /// Indexed by `Event as usize`.
    counters: Vec<metrics::Counter>,
    queue_depth: metrics::Gauge,
    breaker_state: metrics::Gauge,
    load_seconds: metrics::Histogram,
    l2_seconds: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl Sink {
    fn new(namespace: &str) -> Sink {
        let label = || [("namespace", namespace.to_owned())];
        let mut counters = vec![metrics::Counter::noop(); Event::ALL.len()];
        for event in Event::ALL {
            let name = format!("tiered_cache_{}_total", event.counter_name());
            counters[*event as usize] = metrics::counter!(name, &label());
        }
        Sink {
            counters,
            queue_depth: metrics::gauge!("tiered_cache_write_queue_depth", &label()),
            breaker_state: metrics::gauge!("tiered_cache_breaker_state", &label()),
            load_seconds: metrics::histogram!("tiered_cache_load_seconds", &label()),
            l2_seconds: metrics::histogram!("tiered_cache_l2_request_seconds", &label()),
        }
    }
}
