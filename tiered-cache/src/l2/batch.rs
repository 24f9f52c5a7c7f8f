//! Reads that are due together go to Redis together: a GET issued while
//! other tasks of the instance are about to issue theirs joins them in one
//! MGET.
//!
//! Why: each request costs both sides more than the keys in it. On a
//! multiplexed connection redis-rs queues it to the connection's driver,
//! keeps it in its in-flight list and answers it through a oneshot and a
//! wake-up; Redis reads, parses and answers it as a command of its own.
//! With 64 reads in flight on two cores shared with Redis, that CPU is
//! what the throughput is made of (`hit_profile`'s `tiered_l2_get_64`;
//! the figures are in benches/README.md).
//!
//! How: a read that finds no other in flight is sent at once, as without
//! batching. Otherwise the first read to find no batch gathering opens one and yields to
//! the runtime, which resumes it once this worker has nothing else ready to
//! run (`tokio::task::yield_now` defers its wake-up to then, or to the
//! worker's next maintenance tick, at most 61 task polls later: the wait
//! is bounded by what the worker runs meanwhile, and counts against the
//! read's L2 budget like any wait on Redis). Reads issued meanwhile add their keys
//! to the batch's MGET. If nobody joined, the opener sends its own GET (or
//! MGET) alone: an idle cache pays one yield. Otherwise the MGET is sent by
//! a task of its own, so that no caller's cancellation (its timeout, a
//! dropped request) cancels the others', and each read gets its own values
//! out of the reply. That task also keeps its readers' deadlines (each
//! read's share of its call's L2 budget) with one timer, set for the
//! earliest one still waiting, and tells a reader whose deadline passes
//! that no answer came: a timer per read would register and clear one
//! entry each in tokio's timer wheel.
//!
//! One difference from a GET: MGET reads a key of another Redis type as
//! absent instead of answering `WRONGTYPE`. A batched read of such a key is
//! a plain miss, as in `get_many`, and the store after a load replaces it
//! (`scripts/store.lua`); a read alone still meets the error and drops the
//! key as a bad entry.
//!
//! Order is kept where it matters: a caller's read is sent only after
//! everything it awaited before it, as without batching.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Value};
use tokio::sync::oneshot;

use super::conn::Conn;
use crate::events::Event;
use crate::stats::Stats;

/// The most keys a batch gathers: the read that fills it sends it at
/// once, so that a long run of ready tasks keeps a request on the wire
/// while it gathers the next one. With 64 reads in flight on two cores
/// (`hit_profile`'s `tiered_l2_get_64`), batches of at most 32 read
/// 7-10 % faster than unbounded ones, and 16 or fewer slower again.
const MAX_BATCH: usize = 32;

/// What a read wants back, and how many keys it reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    /// One key's value (a GET's reply).
    One,
    /// The values of this many keys, in order (an MGET's reply).
    Many(usize),
}

impl Shape {
    fn keys(self) -> usize {
        match self {
            Shape::One => 1,
            Shape::Many(n) => n,
        }
    }

    fn alone(self) -> Cmd {
        redis::cmd(match self {
            Shape::One => "GET",
            Shape::Many(_) => "MGET",
        })
    }
}

/// A read for the [`Batcher`]: what it wants back, and what adds its keys
/// to a command (once: to the batch's MGET, or to its own GET or MGET).
/// The caller keeps it and lends it: every L2 read's future holds this
/// one, and moved into each level of it, it would be laid out at each.
pub(crate) struct Read<K> {
    shape: Shape,
    keys: Option<K>,
}

impl<K: FnOnce(&mut Cmd)> Read<K> {
    pub(crate) fn new(shape: Shape, keys: K) -> Self {
        Read {
            shape,
            keys: Some(keys),
        }
    }

    /// The command that reads the keys alone: GET or MGET.
    pub(crate) fn alone(&mut self) -> Cmd {
        let mut cmd = self.shape.alone();
        self.add_to(&mut cmd);
        cmd
    }

    fn add_to(&mut self, cmd: &mut Cmd) {
        if let Some(keys) = self.keys.take() {
            keys(cmd);
        }
    }
}

/// The batch being gathered, if any (see the module's doc).
pub(crate) struct Batcher {
    gathering: Mutex<Gathering>,
    /// Reads between the start of [`Batcher::query`] and their reply.
    in_flight: AtomicUsize,
    stats: Arc<Stats>,
}

struct Gathering {
    /// The open batch's number; `None`: the next read opens one.
    open: Option<u64>,
    /// The number the next batch opened gets.
    next: u64,
    /// The open batch: the keys of what joined it, and where each
    /// read's values go.
    batch: Batch,
}

/// Reads gathered into one MGET.
struct Batch {
    mget: Cmd,
    keys: usize,
    joined: Vec<Joined>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            mget: redis::cmd("MGET"),
            keys: 0,
            joined: Vec::new(),
        }
    }
}

/// A read that joined a batch: what it wants back, by when, and where
/// it goes (`None` once it was told it is too late).
struct Joined {
    shape: Shape,
    deadline: Instant,
    reply: Option<oneshot::Sender<Reply>>,
}

/// What a read hears: the answer, or `None` when none came by its deadline.
type Reply = Option<RedisResult<Value>>;

type Answer = oneshot::Receiver<Reply>;

impl Batch {
    /// Adds a read that waits until `deadline`: its keys and its reply's
    /// way back.
    fn join(&mut self, read: &mut Read<impl FnOnce(&mut Cmd)>, deadline: Instant) -> Answer {
        read.add_to(&mut self.mget);
        self.keys += read.shape.keys();
        let (reply, answer) = oneshot::channel();
        self.joined.push(Joined {
            shape: read.shape,
            deadline,
            reply: Some(reply),
        });
        answer
    }
}

impl Joined {
    fn waiting(&self) -> bool {
        self.reply.as_ref().is_some_and(|reply| !reply.is_closed())
    }

    fn tell(&mut self, reply: Reply) {
        if let Some(sender) = self.reply.take() {
            let _ = sender.send(reply);
        }
    }
}

/// Sends a batch's MGET and answers its readers: each with its values,
/// or, when its deadline passes first, with `None`. One timer serves the
/// whole batch (set for the earliest deadline still waiting), where a
/// timer per read would register and clear as many in tokio's wheel.
async fn send_and_answer(mut conn: Conn, batch: Batch) {
    let Batch {
        mget,
        keys,
        mut joined,
    } = batch;
    let mut request = conn.req_packed_command(&mget);
    let reply = loop {
        let Some(next) = joined
            .iter()
            .filter(|j| j.waiting())
            .map(|j| j.deadline)
            .min()
        else {
            return; // every reader gave up or was cancelled
        };
        tokio::select! {
            reply = &mut request => break reply,
            () = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                for late in joined.iter_mut().filter(|j| j.deadline <= now) {
                    late.tell(None);
                }
            }
        }
    };
    let values = match reply.and_then(Value::extract_error) {
        Ok(Value::Array(values)) if values.len() == keys => values,
        Ok(_) => return fail(&mut joined, &malformed()),
        Err(e) => return fail(&mut joined, &e),
    };
    let mut values = values.into_iter();
    for j in &mut joined {
        let value = match j.shape {
            Shape::One => values.next().unwrap_or(Value::Nil),
            Shape::Many(n) => Value::Array(values.by_ref().take(n).collect()),
        };
        j.tell(Some(Ok(value)));
    }
}

fn fail(joined: &mut [Joined], e: &RedisError) {
    for j in joined {
        j.tell(Some(Err(e.clone())));
    }
}

/// Where a read stands after [`Batcher::join_or_open`]: small, as it is
/// kept across an await.
enum Joining {
    /// It joined the open batch: its reply comes on the receiver.
    Joined(Answer),
    /// It opened batch number `.0`; its keys are not added yet.
    Opened(u64),
}

/// Where an opener stands once its batch is closed ([`Open::close`]).
enum Closed {
    /// Its batch was sent, its own read in it: the reply comes here.
    Sent(Answer),
    /// Nobody joined: it sends this command itself.
    Alone(Conn, Cmd),
}

impl Batcher {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Batcher {
            gathering: Mutex::new(Gathering {
                open: None,
                next: 0,
                batch: Batch::default(),
            }),
            in_flight: AtomicUsize::new(0),
            stats,
        }
    }

    /// Sends `read` on `conn`, alone or in one MGET with the reads other
    /// tasks issue at the same moment, and returns its own reply (the
    /// value, or an array of them), or `None` if none came within `wait`.
    /// A read alone is sent as GET or MGET of its own keys, and a read
    /// while no other one is in flight goes at once: a batch is worth its
    /// yield only where reads overlap.
    pub(crate) async fn query<K: FnOnce(&mut Cmd)>(
        &self,
        mut conn: Conn,
        read: &mut Read<K>,
        wait: Duration,
    ) -> Reply {
        let deadline = deadline_after(wait);
        let in_flight = InFlight::enter(&self.in_flight);
        if in_flight.alone() {
            let alone = read.alone();
            let request = conn.req_packed_command(&alone);
            return tokio::time::timeout_at(deadline.into(), request).await.ok();
        }
        let number = match self.join_or_open(&conn, read, deadline) {
            Joining::Opened(number) => number,
            Joining::Joined(answer) => return answered(answer).await,
        };
        let open = Open {
            batcher: self,
            number,
            conn: Some(conn),
        };
        tokio::task::yield_now().await;
        match open.close(read, deadline) {
            Closed::Alone(mut conn, alone) => {
                let request = conn.req_packed_command(&alone);
                tokio::time::timeout_at(deadline.into(), request).await.ok()
            }
            Closed::Sent(answer) => answered(answer).await,
        }
    }

    /// Joins the open batch (sending it when this read fills it), or
    /// opens one.
    fn join_or_open(
        &self,
        conn: &Conn,
        read: &mut Read<impl FnOnce(&mut Cmd)>,
        deadline: Instant,
    ) -> Joining {
        let mut gathering = self
            .gathering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Gathering { open, next, batch } = &mut *gathering;
        if open.is_none() {
            *open = Some(*next);
            *next += 1;
            return Joining::Opened(open.unwrap_or_default());
        }
        let answer = batch.join(read, deadline);
        if batch.keys < MAX_BATCH {
            return Joining::Joined(answer);
        }
        *open = None;
        let full = std::mem::take(batch);
        drop(gathering);
        self.send(conn.clone(), full);
        Joining::Joined(answer)
    }

    /// Closes batch number `number` and returns what joined it: `None`
    /// if nothing did, or a read that filled it sent it already.
    fn take(&self, number: u64) -> Option<Batch> {
        let mut gathering = self
            .gathering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if gathering.open != Some(number) {
            return None;
        }
        gathering.open = None;
        if gathering.batch.joined.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut gathering.batch))
    }

    /// Sends `batch` as one MGET from a task of its own ([`send_and_answer`]).
    /// Without a runtime to run it (one shutting down), the readers hear
    /// that their read was abandoned.
    fn send(&self, conn: Conn, batch: Batch) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.stats
            .record_many(Event::ReadBatched, batch.joined.len() as u64);
        runtime.spawn(send_and_answer(conn, batch));
    }
}

/// `wait` from now (far off if that overflows).
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or(now + Duration::from_secs(3600))
}

async fn answered(answer: Answer) -> Reply {
    answer.await.unwrap_or_else(|_| Some(Err(abandoned())))
}

/// The opener's hold on an open batch. Dropped before [`close`](Open::close)
/// (the opener was cancelled while it yielded), it still sends what joined.
struct Open<'a> {
    batcher: &'a Batcher,
    number: u64,
    conn: Option<Conn>,
}

impl Open<'_> {
    /// Closes the batch: the opener's read joins what gathered and the
    /// batch is sent, or, if nothing did, the read goes alone.
    fn close(mut self, read: &mut Read<impl FnOnce(&mut Cmd)>, deadline: Instant) -> Closed {
        let conn = self
            .conn
            .take()
            .expect("an open batch holds its connection");
        let Some(mut batch) = self.batcher.take(self.number) else {
            return Closed::Alone(conn, read.alone());
        };
        let answer = batch.join(read, deadline);
        self.batcher.send(conn, batch);
        Closed::Sent(answer)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Some(batch) = self.batcher.take(self.number) {
                self.batcher.send(conn, batch);
            }
        }
    }
}

/// A read counted in [`Batcher::in_flight`] until it is answered or dropped.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    before: usize,
}

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::Relaxed);
        InFlight { count, before }
    }

    /// Whether no other read was in flight when this one began.
    fn alone(&self) -> bool {
        self.before == 0
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

fn abandoned() -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "the batched request was abandoned (runtime shutting down)",
    ))
}

fn malformed() -> RedisError {
    RedisError::from((
        ErrorKind::Parse,
        "an MGET answered with the wrong number of values",
    ))
}
