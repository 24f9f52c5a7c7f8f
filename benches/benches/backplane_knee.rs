//! P13 (issue 16): the backplane's knee. N in-process `TieredCache`
//! instances (N = 1, 4, 16, 64) listen on the testkit's Redis Cluster
//! while one more instance, the writer, sends W invalidations a second;
//! once with classic pub/sub (`PUBLISH`) and once with sharded pub/sub
//! (`SPUBLISH`). Results and their reading: `benches/README.md`, "The
//! backplane's knee".
//!
//! A plain `main` that prints tables, not criterion: what is measured is a
//! rate held for a few seconds and a distribution of delays under it (an
//! open-loop writer, probes, percentiles), not the time of one operation
//! repeated in a closed loop, which is what criterion's sampling and
//! statistics are built for.
//!
//! Per cell (mode, N, W):
//! - **load**: the writer calls `invalidate` on random keys of 100k, W a
//!   second (a 1 ms ticker, at most 512 in flight); `sat` is 64 tasks
//!   calling it back to back. `0` is probes only.
//! - **probes**: every 20 ms the writer overwrites one probe key (`set`),
//!   which every receiver holds in L1. Each receiver then reads the key in
//!   a loop (`get`, yielding between reads) until it sees the new value.
//!   Stale = start of that first fresh read - start of the writer's `set`:
//!   how long after a write began this instance still served the old
//!   value (an upper bound: it includes the `set`'s own Redis write, and
//!   one read). `fleet` = the slowest receiver of each
//!   probe: how long *some* instance still served it.
//! - **delivery lag**: every millisecond a monitor samples the writer's
//!   count of events sent and each receiver's `invalidations_received`
//!   (counted after the L1 drops); the lag of event m at a receiver is the
//!   time from the first sample in which the writer had sent m to the
//!   first in which the receiver had applied m (1 ms resolution: "0.00"
//!   means within the same tick). Unlike the probes, it does not depend on
//!   the receiver holding the key in L1.
//! - **delivery**: events the writer announced (its `invalidate` and `set`
//!   calls) against `invalidations_received` of each receiver, during the
//!   window (rate) and after a drain of up to 5 s (fraction delivered);
//!   `PUBLISH/s` is the writer's `backplane_published` (the backplane
//!   sends what queued up as one message, so a message carries several
//!   events under load).
//!
//! `--quick` (or `KNEE_QUICK=1`): W = 1k and sat only, 1 s windows (about
//! 40 s once built). Full: W = 0, 1k, 10k and sat, 3 s windows (about
//! 3 minutes). A filter argument other than a part of `backplane_knee`
//! (e.g. `cargo bench -- l1_hit`) skips this bench.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiered_cache::testkit::RedisCluster;
use tiered_cache::{BackplaneMode, EntryOptions, Key, TieredCache};
use tokio::sync::{watch, Semaphore};

const NS: [usize; 4] = [1, 4, 16, 64];
const KEYS: u64 = 100_000;
const PROBE_EVERY: Duration = Duration::from_millis(20);
const WARM_UP: Duration = Duration::from_millis(300);
const DRAIN: Duration = Duration::from_secs(5);
/// A receiver that has not seen a probe's value after this gives up on it.
const PROBE_GIVE_UP: Duration = Duration::from_secs(5);
const SAT_TASKS: usize = 64;
const MAX_IN_FLIGHT: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rate {
    /// Probes only.
    Idle,
    PerSecond(u64),
    Saturating,
}

impl Rate {
    fn name(self) -> String {
        match self {
            Rate::Idle => "0".into(),
            Rate::PerSecond(w) if w % 1000 == 0 => format!("{}k", w / 1000),
            Rate::PerSecond(w) => w.to_string(),
            Rate::Saturating => "sat".into(),
        }
    }
}

fn probe_key() -> Key<u64> {
    Key::<u64>::new("probe", 1).arg(0u64)
}

fn item_key(i: u64) -> Key<u64> {
    Key::<u64>::new("item", 1).arg(i)
}

fn opts() -> EntryOptions {
    EntryOptions::new(Duration::from_secs(3600))
}

async fn build(urls: &[String], namespace: &str, mode: BackplaneMode) -> TieredCache {
    TieredCache::builder()
        .namespace(namespace)
        .redis_cluster(urls.iter().cloned())
        .backplane_mode(mode)
        .require_l2(true)
        .l2_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a cache on the test cluster")
}

/// Probe bookkeeping shared by the writer and the receivers.
#[derive(Default)]
struct Probes {
    /// When the writer's `set` of probe value `seq` returned (index = seq).
    sent: Mutex<Vec<Instant>>,
    /// (probe, lag in ns) of every (receiver, probe).
    lags: Mutex<Vec<(u64, u64)>>,
    /// (receiver, probe) pairs given up on.
    missed: AtomicU64,
}

/// One receiver's probe watcher: spins on `get` after each probe until it
/// reads the new value.
async fn watch_probes(
    cache: TieredCache,
    mut probes_rx: watch::Receiver<u64>,
    probes: Arc<Probes>,
    fleet_slot: Arc<Mutex<Vec<u64>>>,
) {
    let key = probe_key();
    let mut seen = 0u64;
    while probes_rx.changed().await.is_ok() {
        let target = *probes_rx.borrow_and_update();
        if target <= seen {
            continue;
        }
        let started = Instant::now();
        loop {
            let t0 = Instant::now();
            let v = cache.get(&key).await.map_or(0, |v| *v);
            if v >= target {
                let sent = probes.sent.lock().unwrap().clone();
                let mut lags = Vec::new();
                for seq in seen + 1..=v {
                    if let Some(at) = sent.get(seq as usize) {
                        lags.push((seq, t0.saturating_duration_since(*at).as_nanos() as u64));
                    }
                }
                {
                    let mut slots = fleet_slot.lock().unwrap();
                    for (seq, lag) in &lags {
                        if let Some(slot) = slots.get_mut(*seq as usize) {
                            *slot = (*slot).max(*lag);
                        }
                    }
                }
                probes.lags.lock().unwrap().extend(lags);
                seen = v;
                break;
            }
            if started.elapsed() > PROBE_GIVE_UP {
                probes.missed.fetch_add(1, Ordering::Relaxed);
                seen = target;
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// The writer's load: `invalidate` calls at `rate` until `stop`; counts them.
fn start_load(
    writer: &TieredCache,
    rate: Rate,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    match rate {
        Rate::Idle => {}
        Rate::Saturating => {
            for t in 0..SAT_TASKS as u64 {
                let (writer, stop, sent) = (writer.clone(), stop.clone(), sent.clone());
                handles.push(tokio::spawn(async move {
                    let mut i = t * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 104_729) % KEYS;
                        let _ = writer.invalidate(&item_key(i)).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        Rate::PerSecond(w) => {
            let writer = writer.clone();
            handles.push(tokio::spawn(async move {
                let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
                let mut ticks = tokio::time::interval(Duration::from_millis(1));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let begun = Instant::now();
                let mut issued = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    let due = (begun.elapsed().as_secs_f64() * w as f64) as u64;
                    while issued < due {
                        let Ok(permit) = limit.clone().try_acquire_owned() else {
                            break; // the writer falls behind: shows as a lower sent rate
                        };
                        issued += 1;
                        i = (i + 104_729) % KEYS;
                        let (writer, sent) = (writer.clone(), sent.clone());
                        tokio::spawn(async move {
                            let _ = writer.invalidate(&item_key(i)).await;
                            sent.fetch_add(1, Ordering::Relaxed);
                            drop(permit);
                        });
                    }
                    if issued < due {
                        issued = due; // dropped, not queued
                    }
                }
            }));
        }
    }
    handles
}

struct Row {
    mode: BackplaneMode,
    n: usize,
    rate: Rate,
    sent_per_s: f64,
    published_per_s: f64,
    recv_per_s_min: f64,
    recv_per_s_mean: f64,
    delivered_min: f64,
    drained_in: Duration,
    lag: [Duration; 3],
    delivery: [Duration; 3],
    /// Redis CPU in the window, in cores: all nodes together, and the
    /// busiest node.
    redis_cpu: [f64; 2],
    /// Share of the receivers' reads (the probe loops) answered by L1.
    l1_share: f64,
    fleet: [Duration; 2],
    missed: u64,
    probes: usize,
    gaps: u64,
}

fn pct(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_nanos(sorted[i.min(sorted.len() - 1)])
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn rate_k(r: f64) -> String {
    if r >= 1000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

/// One cell: the receivers exist, hold the probe in L1, and are idle.
async fn run_cell(
    cluster: &'static RedisCluster,
    writer: &TieredCache,
    receivers: &[TieredCache],
    mode: BackplaneMode,
    rate: Rate,
    window: Duration,
) -> Row {
    let n = receivers.len();
    let probes = Arc::new(Probes::default());
    let key = probe_key();
    // Probe 0: every receiver reads it into L1.
    writer.set(&key, 0, &opts()).await.expect("probe set");
    probes.sent.lock().unwrap().push(Instant::now());
    tokio::time::sleep(Duration::from_millis(50)).await;
    for r in receivers {
        let _ = r.get(&key).await;
    }
    let fleet_slots = Arc::new(Mutex::new(Vec::<u64>::new()));
    let (probe_tx, probe_rx) = watch::channel(0u64);
    let watchers: Vec<_> = receivers
        .iter()
        .map(|r| {
            tokio::spawn(watch_probes(
                r.clone(),
                probe_rx.clone(),
                probes.clone(),
                fleet_slots.clone(),
            ))
        })
        .collect();
    drop(probe_rx);

    // Probe 0 is already counted in `recv_base`.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let received_at = |rs: &[TieredCache]| -> Vec<u64> {
        rs.iter()
            .map(|r| r.stats().invalidations_received)
            .collect()
    };
    let recv_base = received_at(receivers);
    let gaps_base: u64 = receivers.iter().map(|r| r.stats().backplane_gaps).sum();
    let reads_base = reads_of(receivers);
    let load = start_load(writer, rate, stop.clone(), sent.clone());
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn(monitor(
        receivers.to_vec(),
        sent.clone(),
        recv_base.clone(),
        monitor_stop.clone(),
    ));

    // Probes for the whole run (warm-up, window); measured in the window only.
    let probe_writer = writer.clone();
    let probe_state = probes.clone();
    let slots = fleet_slots.clone();
    let probe_sent = sent.clone();
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe_stop2 = probe_stop.clone();
    let measuring = Arc::new(AtomicBool::new(false));
    let measuring2 = measuring.clone();
    let measured_from = Arc::new(AtomicU64::new(u64::MAX));
    let measured_from2 = measured_from.clone();
    let prober = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.tick().await;
        while !probe_stop2.load(Ordering::Relaxed) {
            ticks.tick().await;
            seq += 1;
            if measuring2.load(Ordering::Relaxed) {
                measured_from2.fetch_min(seq, Ordering::Relaxed);
            }
            slots.lock().unwrap().resize(seq as usize + 1, 0);
            // The anchor is the call, not its return: under load the
            // writer's task may be polled again only after receivers
            // already applied the message.
            probe_state.sent.lock().unwrap().push(Instant::now());
            if probe_writer.set(&key, seq, &opts()).await.is_ok() {
                probe_sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = probe_tx.send(seq);
        }
        seq
    });

    tokio::time::sleep(WARM_UP).await;
    let cpu0 = redis_cpu(cluster).await;
    measuring.store(true, Ordering::Relaxed);
    let (t0, sent0, recv0, pub0) = (
        Instant::now(),
        sent.load(Ordering::Relaxed),
        received_at(receivers),
        writer.stats().backplane_published,
    );
    tokio::time::sleep(window).await;
    let (t1, sent1, recv1, pub1) = (
        Instant::now(),
        sent.load(Ordering::Relaxed),
        received_at(receivers),
        writer.stats().backplane_published,
    );
    measuring.store(false, Ordering::Relaxed);
    let cpu1 = redis_cpu(cluster).await;
    let cpu: Vec<f64> = cpu1
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| (a - b) / (t1 - t0).as_secs_f64())
        .collect();
    let measured_to = probe_sent_seq(&probes);
    stop.store(true, Ordering::Relaxed);
    for h in load {
        let _ = h.await;
    }
    probe_stop.store(true, Ordering::Relaxed);
    let _ = prober.await;
    // Let in-flight invalidations finish and their messages arrive.
    let drain_start = Instant::now();
    let total_sent = loop {
        let total = sent.load(Ordering::Relaxed);
        let now = received_at(receivers);
        let all = now.iter().zip(&recv_base).all(|(r, b)| r - b >= total);
        if all || drain_start.elapsed() > DRAIN {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let drained_in = drain_start.elapsed();
    monitor_stop.store(true, Ordering::Relaxed);
    let samples = monitor.await.expect("monitor");
    let reads = reads_of(receivers);
    let l1_share = {
        let l1 = (reads.0 - reads_base.0) as f64;
        let l2 = (reads.1 - reads_base.1) as f64;
        if l1 + l2 > 0.0 {
            l1 / (l1 + l2)
        } else {
            0.0
        }
    };
    let mut delivery = samples.lags(t0, t1);
    delivery.sort_unstable();
    // Watchers stop with the probe channel (dropped with the prober).
    for w in watchers {
        let _ = tokio::time::timeout(PROBE_GIVE_UP * 2, w).await;
    }

    let secs = (t1 - t0).as_secs_f64();
    let per_inst: Vec<f64> = recv1
        .iter()
        .zip(&recv0)
        .map(|(a, b)| (a - b) as f64 / secs)
        .collect();
    let recv_final = received_at(receivers);
    let delivered_min = recv_final
        .iter()
        .zip(&recv_base)
        .map(|(r, b)| (r - b) as f64 / total_sent as f64)
        .fold(f64::INFINITY, f64::min);
    // Lags of the probes sent inside the window only.
    let from = measured_from.load(Ordering::Relaxed);
    let in_window = |seq: u64| seq >= from && seq <= measured_to;
    let mut lags: Vec<u64> = probes
        .lags
        .lock()
        .unwrap()
        .iter()
        .filter(|(seq, _)| in_window(*seq))
        .map(|(_, lag)| *lag)
        .collect();
    let fleet_all = fleet_slots.lock().unwrap().clone();
    let mut fleet: Vec<u64> = fleet_all
        .iter()
        .enumerate()
        .filter(|(seq, _)| in_window(*seq as u64))
        .map(|(_, lag)| *lag)
        .filter(|lag| *lag > 0)
        .collect();
    lags.sort_unstable();
    fleet.sort_unstable();
    let gaps: u64 = receivers
        .iter()
        .map(|r| r.stats().backplane_gaps)
        .sum::<u64>()
        - gaps_base;
    Row {
        mode,
        n,
        rate,
        sent_per_s: (sent1 - sent0) as f64 / secs,
        published_per_s: (pub1 - pub0) as f64 / secs,
        recv_per_s_min: per_inst.iter().copied().fold(f64::INFINITY, f64::min),
        recv_per_s_mean: per_inst.iter().sum::<f64>() / n as f64,
        delivered_min,
        drained_in,
        lag: [pct(&lags, 0.5), pct(&lags, 0.99), pct(&lags, 1.0)],
        delivery: [
            pct(&delivery, 0.5),
            pct(&delivery, 0.99),
            pct(&delivery, 1.0),
        ],
        l1_share,
        redis_cpu: [cpu.iter().sum(), cpu.iter().copied().fold(0.0, f64::max)],
        fleet: [pct(&fleet, 0.99), pct(&fleet, 1.0)],
        missed: probes.missed.load(Ordering::Relaxed),
        probes: fleet.len(),
        gaps,
    }
}

/// CPU seconds (user + sys) each node has used so far (`INFO cpu`).
async fn redis_cpu(cluster: &'static RedisCluster) -> Vec<f64> {
    tokio::task::spawn_blocking(move || {
        cluster
            .for_each_node(|conn| redis::cmd("INFO").arg("cpu").query::<String>(conn))
            .expect("INFO cpu")
            .iter()
            .map(|info| {
                info.lines()
                    .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
                    .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
                    .sum()
            })
            .collect()
    })
    .await
    .expect("INFO task")
}

/// How many backplane subscribers each node holds (classic, sharded).
async fn subscribers_per_node(cluster: &'static RedisCluster, channel: String) -> Vec<(u64, u64)> {
    tokio::task::spawn_blocking(move || {
        cluster
            .for_each_node(|conn| {
                let (_, classic): (String, u64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query(conn)?;
                let (_, sharded): (String, u64) = redis::cmd("PUBSUB")
                    .arg("SHARDNUMSUB")
                    .arg(&channel)
                    .query(conn)?;
                Ok((classic, sharded))
            })
            .expect("PUBSUB NUMSUB")
    })
    .await
    .expect("PUBSUB task")
}

/// (L1 hits, L2 hits) over all receivers.
fn reads_of(receivers: &[TieredCache]) -> (u64, u64) {
    receivers.iter().fold((0, 0), |(a, b), r| {
        let s = r.stats();
        (a + s.l1_hits, b + s.l2_hits)
    })
}

/// Counter samples taken every millisecond: the writer's events sent, and
/// each receiver's events applied (`invalidations_received`, counted after
/// the L1 drops), with the time of each sample.
struct Samples {
    /// (time, events sent so far).
    sent: Vec<(Instant, u64)>,
    /// Per receiver: (time, events applied so far, since the cell began).
    received: Vec<Vec<(Instant, u64)>>,
}

impl Samples {
    /// Delivery lag of the events applied in `[from, to]`: for each
    /// receiver sample whose count rose to `m`, the time since the first
    /// writer sample that had sent `m` (1 ms sampling on each side).
    fn lags(&self, from: Instant, to: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        for samples in &self.received {
            let mut prev = 0u64;
            for &(t, m) in samples {
                if m > prev && t >= from && t <= to {
                    let i = self.sent.partition_point(|&(_, sent)| sent < m);
                    if let Some(&(sent_at, _)) = self.sent.get(i) {
                        out.push(t.saturating_duration_since(sent_at).as_nanos() as u64);
                    }
                }
                prev = m;
            }
        }
        out
    }
}

async fn monitor(
    receivers: Vec<TieredCache>,
    sent: Arc<AtomicU64>,
    base: Vec<u64>,
    stop: Arc<AtomicBool>,
) -> Samples {
    let mut samples = Samples {
        sent: Vec::new(),
        received: vec![Vec::new(); receivers.len()],
    };
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let now = Instant::now();
        samples.sent.push((now, sent.load(Ordering::Relaxed)));
        for (i, r) in receivers.iter().enumerate() {
            let got = r.stats().invalidations_received - base[i];
            samples.received[i].push((Instant::now(), got));
        }
    }
    samples
}

fn probe_sent_seq(probes: &Probes) -> u64 {
    probes.sent.lock().unwrap().len().saturating_sub(1) as u64
}

fn print_header() {
    println!(
        "| mode | N | W | sent/s | PUBLISH/s | ev/msg | recv/s per inst (min / mean) | delivered (min) | delivery p50 / p99 / max | stale p50 / p99 / max | fleet stale p99 / max | L1 share | Redis CPU all / busiest node | probes | missed | gaps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn print_row(r: &Row) {
    let per_msg = if r.published_per_s > 0.0 {
        r.sent_per_s / r.published_per_s
    } else {
        0.0
    };
    println!(
        "| {} | {} | {} | {} | {} | {:.1} | {} / {} | {:.2}% ({} ms) | {} / {} / {} | {} / {} / {} | {} / {} | {:.0}% | {:.2} / {:.2} | {} | {} | {} |",
        match r.mode {
            BackplaneMode::Sharded => "sharded",
            _ => "classic",
        },
        r.n,
        r.rate.name(),
        rate_k(r.sent_per_s),
        rate_k(r.published_per_s),
        per_msg,
        rate_k(r.recv_per_s_min),
        rate_k(r.recv_per_s_mean),
        r.delivered_min * 100.0,
        r.drained_in.as_millis(),
        ms(r.delivery[0]),
        ms(r.delivery[1]),
        ms(r.delivery[2]),
        ms(r.lag[0]),
        ms(r.lag[1]),
        ms(r.lag[2]),
        ms(r.fleet[0]),
        ms(r.fleet[1]),
        r.l1_share * 100.0,
        r.redis_cpu[0],
        r.redis_cpu[1],
        r.probes,
        r.missed,
        r.gaps,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|f| "backplane_knee".contains(f.as_str()))
    {
        return;
    }
    let quick =
        args.iter().any(|a| a == "--quick") || std::env::var("KNEE_QUICK").is_ok_and(|v| v == "1");
    let (rates, window) = if quick {
        (
            vec![Rate::PerSecond(1_000), Rate::Saturating],
            Duration::from_secs(1),
        )
    } else {
        (
            vec![
                Rate::Idle,
                Rate::PerSecond(1_000),
                Rate::PerSecond(10_000),
                Rate::Saturating,
            ],
            Duration::from_secs(3),
        )
    };
    let rates = match std::env::var("KNEE_RATES") {
        Ok(list) => list
            .split(',')
            .map(|r| match r.trim() {
                "0" => Rate::Idle,
                "sat" => Rate::Saturating,
                w => Rate::PerSecond(w.parse().expect("KNEE_RATES: 0, sat or a number")),
            })
            .collect(),
        Err(_) => rates,
    };
    let modes: Vec<BackplaneMode> = match std::env::var("KNEE_MODES").as_deref() {
        Ok("classic") => vec![BackplaneMode::Classic],
        Ok("sharded") => vec![BackplaneMode::Sharded],
        _ => vec![BackplaneMode::Classic, BackplaneMode::Sharded],
    };
    let ns: Vec<usize> = match std::env::var("KNEE_N") {
        Ok(list) => list
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect(),
        Err(_) => NS.to_vec(),
    };
    let cluster = RedisCluster::shared().expect("redis-server and redis-cli for the test cluster");
    let urls = cluster.urls();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "[backplane_knee] {} mode; 3 masters + 3 replicas on loopback; window {:?}, probe every {:?}",
        if quick { "quick" } else { "full" },
        window,
        PROBE_EVERY
    );
    runtime.block_on(async {
        print_header();
        for &mode in &modes {
            for &n in &ns {
                let namespace = format!("knee-{mode:?}-{n}-{}", rand::random::<u32>());
                let writer = build(&urls, &namespace, mode).await;
                let builds: Vec<_> = (0..n)
                    .map(|_| {
                        let (urls, namespace) = (urls.clone(), namespace.clone());
                        tokio::spawn(async move { build(&urls, &namespace, mode).await })
                    })
                    .collect();
                let mut receivers = Vec::with_capacity(n);
                for b in builds {
                    receivers.push(b.await.expect("build task"));
                }
                let placed = subscribers_per_node(cluster, format!("{namespace}:#backplane")).await;
                eprintln!("[backplane_knee] {mode:?} N={n}: subscribers (classic, sharded) per node: {placed:?}");
                for &rate in &rates {
                    let row = run_cell(cluster, &writer, &receivers, mode, rate, window).await;
                    print_row(&row);
                }
                drop(receivers);
                drop(writer);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}
