//! Reads that are due together go to Redis together: a GET issued while
//! other tasks of the instance are about to issue theirs joins them in one
//! pipeline.
//!
//! Why: each request costs both sides more than the command in it. On a
//! multiplexed connection redis-rs queues it to the connection's driver,
//! keeps it in its in-flight list and answers it through a oneshot and a
//! wake-up; Redis reads and parses it as a request of its own. With 64
//! reads in flight on two cores shared with Redis, that CPU is what the
//! throughput is made of: by `hit_profile`'s `tiered_l2_get_64`, sharing
//! requests took a read from 3.13 to 2.37 µs of wall time (raw redis-rs
//! 2.66), this process's CPU per read from 3.5 to 2.7 µs and Redis's from
//! 1.6 to 1.0 µs.
//!
//! How: the first read to find no batch gathering opens one and yields to
//! the runtime, which resumes it once this worker has nothing else ready to
//! run (`tokio::task::yield_now` defers its wake-up to then, or to the
//! worker's next maintenance tick). Reads issued meanwhile join the batch.
//! If nobody joined, the opener sends its command alone: an idle cache pays
//! one yield. Otherwise the commands go as one pipeline, sent by a task of
//! their own so that no caller's cancellation (its timeout, a dropped
//! request) cancels the others'. Each command keeps its own reply, errors
//! included: a pipeline of GETs, not an MGET, which would read a key of
//! another Redis type as absent instead of answering `WRONGTYPE`.
//!
//! Order is kept where it matters: a caller's command is sent only after
//! everything it awaited before it, as without batching; commands of one
//! batch run one after another in one pipeline.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Value};
use tokio::sync::oneshot;

use super::conn::Conn;
use crate::events::Event;
use crate::stats::Stats;

/// The most commands a batch gathers: the read that fills it sends it at
/// once, so that a long run of ready tasks keeps a request on the wire
/// while it gathers the next one. With 64 reads in flight on two cores
/// (`hit_profile`'s `tiered_l2_get_64`), batches of at most 32 read
/// 7-10 % faster than unbounded ones, and 16 or fewer slower again.
const MAX_BATCH: usize = 32;

/// The batch being gathered, if any (see the module's doc).
pub(crate) struct Batcher {
    gathering: Mutex<Gathering>,
    /// How long a batch's request may take before it is given up (its
    /// callers' own timers end sooner); then it only frees what it holds.
    timeout: Duration,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Gathering {
    /// The open batch's number; `None`: the next command opens one.
    open: Option<u64>,
    /// The number the next batch opened gets.
    next: u64,
    /// What joined the open batch.
    joined: Vec<Joined>,
}

/// A command that joined an open batch, and where its reply goes.
struct Joined {
    cmd: Cmd,
    reply: oneshot::Sender<RedisResult<Value>>,
}

type Answer = oneshot::Receiver<RedisResult<Value>>;

/// What [`Batcher::join_or_open`] made of a command.
enum Joining<M> {
    /// It joined the open batch: its reply comes on the receiver.
    Joined(Answer),
    /// It filled the open batch, which the caller now sends.
    Filled(Answer, Vec<Joined>),
    /// It opened batch number `.0`; the command, not built yet, stays with
    /// its opener.
    Opened(u64, M),
}

impl Batcher {
    pub(crate) fn new(timeout: Duration, stats: Arc<Stats>) -> Self {
        Batcher {
            gathering: Mutex::default(),
            timeout,
            stats,
        }
    }

    /// Sends the command `make` builds on `conn`, alone or in a batch with
    /// the commands other tasks issue at the same moment, and returns its
    /// own reply.
    ///
    /// The command is built only where it is sent or joins a batch: every
    /// L2 read's future holds this one, and a `Cmd` kept across the yield
    /// would be laid out in it again at each level.
    pub(crate) async fn query(
        &self,
        mut conn: Conn,
        make: impl FnOnce() -> Cmd,
    ) -> RedisResult<Value> {
        let (batch, make) = match self.join_or_open(make) {
            Joining::Joined(answer) => return answered(answer).await,
            Joining::Filled(answer, joined) => {
                self.send(conn, joined);
                return answered(answer).await;
            }
            Joining::Opened(batch, make) => (batch, make),
        };
        let open = Open {
            batcher: self,
            batch,
            conn: Some(conn),
        };
        tokio::task::yield_now().await;
        let mut joined;
        (conn, joined) = open.close();
        let cmd = make();
        if joined.is_empty() {
            return conn.req_packed_command(&cmd).await;
        }
        let (reply, answer) = oneshot::channel();
        joined.push(Joined { cmd, reply });
        self.send(conn, joined);
        answered(answer).await
    }

    fn join_or_open<M: FnOnce() -> Cmd>(&self, make: M) -> Joining<M> {
        let mut gathering = self
            .gathering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Gathering { open, next, joined } = &mut *gathering;
        if open.is_none() {
            *open = Some(*next);
            *next += 1;
            return Joining::Opened(open.unwrap_or_default(), make);
        }
        let (reply, answer) = oneshot::channel();
        joined.push(Joined { cmd: make(), reply });
        if joined.len() + 1 < MAX_BATCH {
            return Joining::Joined(answer);
        }
        *open = None;
        Joining::Filled(answer, std::mem::take(joined))
    }

    /// Closes batch number `batch` and returns what joined it (nothing if
    /// a read that filled it sent it already).
    fn take(&self, batch: u64) -> Vec<Joined> {
        let mut gathering = self
            .gathering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if gathering.open != Some(batch) {
            return Vec::new();
        }
        gathering.open = None;
        std::mem::take(&mut gathering.joined)
    }

    /// Sends `joined` as one pipeline from a task of its own and hands each
    /// command its reply. Without a runtime to run it (one shutting down), the
    /// callers hear that their command was abandoned.
    fn send(&self, mut conn: Conn, joined: Vec<Joined>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.stats
            .record_many(Event::ReadBatched, joined.len() as u64);
        let timeout = self.timeout;
        runtime.spawn(async move {
            let mut pipe = redis::pipe();
            let mut replies = Vec::with_capacity(joined.len());
            for Joined { cmd, reply } in joined {
                pipe.add_command(cmd);
                replies.push(reply);
            }
            let count = replies.len();
            let answers = tokio::time::timeout(timeout, conn.req_packed_commands(&pipe, 0, count))
                .await
                .unwrap_or_else(|_| Err(RedisError::from((ErrorKind::Io, "no answer in time"))));
            match answers {
                Ok(values) if values.len() == count => {
                    for (reply, value) in replies.into_iter().zip(values) {
                        let _ = reply.send(Ok(value));
                    }
                }
                Ok(_) => answer_all(replies, &malformed()),
                Err(e) => answer_all(replies, &e),
            }
        });
    }
}

async fn answered(answer: Answer) -> RedisResult<Value> {
    answer.await.unwrap_or_else(|_| Err(abandoned()))
}

/// The opener's hold on an open batch. Dropped before [`close`](Open::close)
/// (the opener was cancelled while it yielded), it still sends what joined.
struct Open<'a> {
    batcher: &'a Batcher,
    batch: u64,
    conn: Option<Conn>,
}

impl Open<'_> {
    fn close(mut self) -> (Conn, Vec<Joined>) {
        let conn = self
            .conn
            .take()
            .expect("an open batch holds its connection");
        (conn, self.batcher.take(self.batch))
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let joined = self.batcher.take(self.batch);
            if !joined.is_empty() {
                self.batcher.send(conn, joined);
            }
        }
    }
}

fn answer_all(replies: Vec<oneshot::Sender<RedisResult<Value>>>, e: &RedisError) {
    for reply in replies {
        let _ = reply.send(Err(e.clone()));
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
        "a pipeline answered with the wrong number of replies",
    ))
}
