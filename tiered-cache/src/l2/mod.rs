//! The shared tier: Redis (or a Redis Cluster, `conn.rs`) through one
//! multiplexed, self-reconnecting connection. All Redis traffic of the
//! cache goes through this module.
//!
//! Every command runs under the configured timeout, so a slow or paused Redis
//! costs a request at most that long. Failures are returned to the read path,
//! which degrades around them; this module counts them and logs once per
//! incident (the first failure after a success, and the recovery).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, FromRedisValue, RedisError};

use batch::{Batcher, Read, Shape};

use crate::breaker::{Breaker, BreakerSettings, Permit, Verdict};
use crate::error::{Error, ErrorKind};
use crate::events::Event;
use crate::stats::Stats;

mod batch;
pub(crate) mod budget;
mod conn;
mod lock;
mod pubsub;
mod script;
mod stream;

pub(crate) use conn::Target;
use conn::{Conn, Endpoint};
pub(crate) use lock::{LockToken, LockTry};
pub(crate) use pubsub::{Health, Messages};
pub(crate) use stream::StreamEntry;

/// What an entry's version counter adds to the entry's key (after its
/// hash tag, so both live in one Cluster slot).
const VERSION_SUFFIX: &str = "#v";

/// Why a Redis call did not give an answer.
#[derive(Debug)]
pub(crate) enum L2Fault {
    /// The key holds another Redis type (a list, a hash): treat as bad entry.
    WrongType,
    /// No answer within the configured timeout.
    Timeout,
    /// Redis answered this command with an error (`NOPERM`, `OOM`,
    /// `READONLY`, a script error): about this command, not about Redis,
    /// so other commands go on.
    Rejected(RedisError),
    /// The connection failed, or Redis said it cannot serve (`LOADING`,
    /// `BUSY`, `MASTERDOWN`, `CLUSTERDOWN`).
    Redis(RedisError),
    /// Not tried: the circuit breaker is open (Redis failed moments ago).
    BreakerOpen,
    /// Redis answered with something this tier did not expect.
    Malformed,
}

impl L2Fault {
    pub(crate) fn into_error(self) -> Error {
        match self {
            L2Fault::WrongType => Error::new(ErrorKind::L2, "a key holds a value of another Redis type"),
            L2Fault::BreakerOpen => Error::new(
                ErrorKind::L2,
                "Redis failed moments ago and the circuit breaker is open; the cache is serving without it and probes Redis after the cool-down",
            ),
            L2Fault::Malformed => Error::new(
                ErrorKind::L2,
                "Redis answered with an unexpected reply; is something else writing this namespace?",
            ),
            L2Fault::Timeout => Error::new(
                ErrorKind::Timeout,
                "Redis did not answer within the L2 timeout; check the server or raise `l2_timeout`",
            ),
            L2Fault::Redis(e) => Error::new(
                ErrorKind::L2,
                "a Redis command failed; the cache keeps serving from L1 and the loader",
            )
            .with_source(e),
            L2Fault::Rejected(e) => Error::new(
                ErrorKind::L2,
                format!(
                    "Redis refused a command ({}); check the ACL user's rights, maxmemory, or whether this is a replica",
                    e.code().unwrap_or("error")
                ),
            )
            .with_source(e),
        }
    }
}

/// A Redis URL. Its `Debug` hides the credentials and query, so no derived
/// `Debug` of a struct holding one (the builder, the config) prints a password.
#[derive(Clone)]
pub(crate) struct RedisUrl(String);

impl RedisUrl {
    pub(crate) fn new(url: String) -> Self {
        RedisUrl(url)
    }

    /// The full URL, passwords included: for connecting, never for printing.
    pub(crate) fn as_secret_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `scheme://***@host:port/db?***`: the user info (user and password) and
/// the query (which may carry a password too) are replaced. The user info
/// ends at the last `@` before the query, whatever the password contains.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, _)) => (rest, "?***"),
        None => (rest, ""),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{query}", &rest[at + 1..]),
        None => format!("{scheme}://{rest}{query}"),
    }
}

/// Connection settings for [`L2::connect`].
#[derive(Debug, Clone)]
pub(crate) struct L2Config {
    pub(crate) target: Target,
    pub(crate) namespace: String,
    pub(crate) timeout: Duration,
    pub(crate) breaker: BreakerSettings,
    /// The backplane uses sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) when
    /// the target is a cluster.
    pub(crate) sharded_pubsub: bool,
    /// Concurrent reads share one MGET (`batch.rs`; one Redis only).
    pub(crate) batch_reads: bool,
}

/// The Redis tier.
#[derive(Clone)]
pub(crate) struct L2 {
    conn: Conn,
    /// For connections of other kinds (the backplane's subscriber).
    endpoint: Arc<Endpoint>,
    namespace: Arc<str>,
    timeout: Duration,
    stats: Arc<Stats>,
    failing: Arc<AtomicBool>,
    /// Around every command: while open, commands are not sent.
    breaker: Arc<Breaker>,
    rejections: Arc<Rejections>,
    /// `SPUBLISH`/`SSUBSCRIBE` instead of `PUBLISH`/`SUBSCRIBE` (only ever
    /// set on a cluster).
    sharded_pubsub: bool,
    /// Where concurrent reads gather into one MGET: `None` on a cluster,
    /// or when turned off.
    batcher: Option<Arc<Batcher>>,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the client: its connection info may hold a password.
        f.debug_struct("L2")
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl L2 {
    /// Opens a lazily connecting, self-reconnecting connection. The returned
    /// tier works even when Redis is not reachable yet; `ping` tells.
    pub(crate) fn connect(config: &L2Config, stats: Arc<Stats>) -> Result<Self, Error> {
        let (conn, endpoint) = conn::connect(&config.target, config.timeout)?;
        config.breaker.validate()?;
        let sharded_pubsub = config.sharded_pubsub && endpoint.is_cluster();
        let batcher = (config.batch_reads && !endpoint.is_cluster())
            .then(|| Arc::new(Batcher::new(Arc::clone(&stats))));
        Ok(L2 {
            batcher,
            sharded_pubsub,
            stats: Arc::clone(&stats),
            conn,
            endpoint: Arc::new(endpoint),
            namespace: Arc::from(config.namespace.as_str()),
            timeout: config.timeout,
            failing: Arc::new(AtomicBool::new(false)),
            breaker: Arc::new(Breaker::new(config.breaker, stats)),
            rejections: Arc::default(),
        })
    }

    /// The circuit breaker around this tier's commands.
    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The L2 timeout, which bounds every command.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `call` (one or a few commands) within one L2 budget.
    pub(crate) fn within_timeout<F: std::future::Future>(
        &self,
        call: F,
    ) -> impl std::future::Future<Output = F::Output> {
        budget::within(self.timeout, call)
    }

    /// Appends the Redis key of `body` (and `suffix`) to `cmd` as its next
    /// argument, put together on the stack: the hot reads build no `String`
    /// per key (a key longer than the buffer still does).
    fn key_arg(&self, cmd: &mut Cmd, body: &str, suffix: &str) {
        let parts = [
            self.namespace.as_bytes(),
            b":",
            body.as_bytes(),
            suffix.as_bytes(),
        ];
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let mut buf = [0u8; 256];
        if len > buf.len() {
            cmd.arg(parts.concat());
            return;
        }
        let mut at = 0;
        for part in parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        cmd.arg(&buf[..len]);
    }

    /// The Redis key of an entry, or of any other key of this namespace.
    fn key(&self, body: &str) -> String {
        let mut k = String::with_capacity(self.namespace.len() + 1 + body.len());
        k.push_str(&self.namespace);
        k.push(':');
        k.push_str(body);
        k
    }

    /// The name of a pub/sub channel of this namespace and database.
    /// Channels are server-wide, not per database, so two caches of one
    /// namespace on `/0` and `/1` of one Redis must not share one: the
    /// database is part of the name (DB 0 keeps the plain name, which
    /// earlier releases used, so a rolling deploy keeps hearing them).
    pub(crate) fn channel(&self, name: &str) -> String {
        let mut channel = self.key(name);
        let db = self.endpoint.db();
        if db != 0 {
            channel.push_str(&format!(":db{db}"));
        }
        channel
    }

    /// Whether the backplane uses sharded pub/sub (`SPUBLISH`), which a
    /// store script cannot send for it.
    pub(crate) fn sharded_pubsub(&self) -> bool {
        self.sharded_pubsub
    }

    /// Runs one command under the timeout, counting and logging failures.
    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, L2Fault> {
        self.guarded(|mut conn| async move { cmd.query_async::<T>(&mut conn).await })
            .await
    }

    /// Runs one script under the timeout: by its SHA1, and by its text
    /// when Redis does not know it (see `script.rs`).
    async fn run_script<T: FromRedisValue>(
        &self,
        script: &'static script::Lua,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, L2Fault> {
        let by_hash = script.by_hash(keys, args);
        self.guarded(|mut conn| async move {
            match by_hash.query_async::<T>(&mut conn).await {
                Err(e) if script::unknown(&e) => {
                    script.by_text(keys, args).query_async::<T>(&mut conn).await
                }
                answer => answer,
            }
        })
        .await
    }

    /// [`run_script`](Self::run_script), then the counters `tags` after it,
    /// in one round trip where one Redis serves both, as
    /// [`then_versions`](Self::then_versions) does for a read.
    async fn run_script_then_versions<T: FromRedisValue>(
        &self,
        script: &'static script::Lua,
        keys: &[String],
        args: &[&[u8]],
        tags: &[&str],
    ) -> Result<(T, Vec<u64>), L2Fault> {
        if tags.is_empty() || self.endpoint.is_cluster() {
            let done = self.run_script(script, keys, args).await?;
            let versions = match tags {
                [] => Vec::new(),
                _ => self.tag_versions(tags).await?,
            };
            return Ok((done, versions));
        }
        let versions = self.versions_cmd(tags);
        let with_versions = |first: Cmd| {
            let mut pipe = redis::pipe();
            pipe.add_command(first).add_command(versions.clone());
            pipe
        };
        let (done, versions): (T, Vec<Option<u64>>) = self
            .guarded(|mut conn| async move {
                match with_versions(script.by_hash(keys, args))
                    .query_async(&mut conn)
                    .await
                {
                    Err(e) if script::unknown(&e) => {
                        with_versions(script.by_text(keys, args))
                            .query_async(&mut conn)
                            .await
                    }
                    answer => answer,
                }
            })
            .await?;
        Ok((done, versions_of(versions, tags)?))
    }

    /// Sends one request (unless the circuit breaker is open), within what
    /// is left of the call's L2 budget; counts and logs the failure, and
    /// tells the breaker.
    async fn guarded<T, F, Fut>(&self, send: F) -> Result<T, L2Fault>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let (permit, started, timer) = self.admit()?;
        let answer = tokio::time::timeout(timer, send(self.conn.clone()))
            .await
            .ok();
        self.settle(permit, started, answer)
    }

    /// Whether a request may go now: not when the call's budget is spent or
    /// the breaker is open (both counted as skipped). If it may, the
    /// breaker's permit, when it left (for the metrics) and how long it may
    /// wait for its answer.
    fn admit(&self) -> Result<(Permit<'_>, Option<Instant>, Duration), L2Fault> {
        let timeout = budget::time_left(self.timeout);
        if timeout.is_zero() {
            // The call's budget is spent (earlier commands were slow): not
            // sent, and not Redis's fault a second time.
            self.stats.record(Event::L2Skipped);
            return Err(L2Fault::Timeout);
        }
        let Some(permit) = self.breaker.admit() else {
            self.stats.record(Event::L2Skipped);
            return Err(L2Fault::BreakerOpen);
        };
        Ok((permit, self.stats.export.clock(), budget::timer(timeout)))
    }

    /// What an admitted request's answer (`None`: none in time) comes to;
    /// counts and logs a failure, and tells the breaker.
    fn settle<T>(
        &self,
        permit: Permit<'_>,
        started: Option<Instant>,
        answer: Option<Result<T, RedisError>>,
    ) -> Result<T, L2Fault> {
        let outcome = match answer {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) if is_wrong_type(&e) => Err(L2Fault::WrongType),
            Some(Err(e)) if is_about_the_command(&e) => Err(L2Fault::Rejected(e)),
            Some(Err(e)) => Err(L2Fault::Redis(e)),
            None => Err(L2Fault::Timeout),
        };
        self.stats.export.l2_time(started);
        // Only a failed connection or no answer counts against Redis: an
        // error reply is about its command.
        permit.judge(match &outcome {
            Err(L2Fault::Redis(_) | L2Fault::Timeout) => Verdict::Failed,
            _ => Verdict::Answered,
        });
        if matches!(outcome, Err(L2Fault::WrongType)) {
            return outcome;
        }
        self.record(&outcome);
        outcome
    }

    fn record<T>(&self, outcome: &Result<T, L2Fault>) {
        match outcome {
            Ok(_) => {
                if self.failing.load(Ordering::Relaxed)
                    && self.failing.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(namespace = %self.namespace, "Redis answers again; the L2 tier is back in use");
                }
            }
            Err(L2Fault::Rejected(e)) => {
                // Redis is well: it answered. Count it, log each kind once.
                self.stats.record(Event::L2Error);
                let code = e.code().unwrap_or("error");
                if self.rejections.first_time(code) {
                    tracing::warn!(
                        namespace = %self.namespace,
                        code,
                        "Redis refused a command; the cache goes on without that command's effect (logged once per error code)"
                    );
                }
            }
            Err(fault) => {
                self.stats.record(Event::L2Error);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        namespace = %self.namespace,
                        error = %describe(fault),
                        "Redis failed; serving from L1 and the loader until it recovers (logged once per incident)"
                    );
                }
            }
        }
    }

    /// PING, to learn whether Redis is reachable now.
    pub(crate) async fn ping(&self) -> Result<(), L2Fault> {
        self.run::<String>(&redis::cmd("PING")).await.map(drop)
    }

    /// GET of one entry; with other reads due at the same moment, in one
    /// MGET with them (on one Redis: `batch.rs`).
    pub(crate) async fn get(&self, body: &str) -> Result<Option<Vec<u8>>, L2Fault> {
        self.read(Shape::One, |cmd| self.key_arg(cmd, body, ""))
            .await
    }

    /// Reads the keys `keys` appends to a GET or MGET (as `shape` says),
    /// through the [`Batcher`] on one Redis, unless batching is off. (On a
    /// cluster the keys of one MGET must share a slot: each read goes
    /// alone.)
    async fn read<T: FromRedisValue>(
        &self,
        shape: Shape,
        keys: impl FnOnce(&mut Cmd),
    ) -> Result<T, L2Fault> {
        let mut read = Read::new(shape, keys);
        let Some(batcher) = &self.batcher else {
            return self.run(&read.alone()).await;
        };
        // The batch times its readers out (one timer for all of them):
        // the read's own wait is not wrapped in a timer of its own.
        let (permit, started, timer) = self.admit()?;
        let answer = batcher
            .query(self.conn.clone(), &mut read, timer)
            .await
            .map(|reply| -> Result<T, RedisError> {
                Ok(redis::from_redis_value(reply?.extract_error()?)?)
            });
        self.settle(permit, started, answer)
    }

    /// GET of one entry, then the versions of the counters `tags` (as
    /// [`tag_versions`](Self::tag_versions)) after it, in one round trip
    /// where one Redis serves both (see [`then_versions`](Self::then_versions)).
    pub(crate) async fn get_then_versions(
        &self,
        body: &str,
        tags: &[&str],
    ) -> Result<(Option<Vec<u8>>, Vec<u64>), L2Fault> {
        self.then_versions(Shape::One, |cmd| self.key_arg(cmd, body, ""), tags)
            .await
    }

    /// MGET of many entries in one round trip, then the versions of the
    /// counters `tags`, as [`get_then_versions`](Self::get_then_versions).
    /// Keys holding another type read as `None` (MGET never fails on them).
    pub(crate) async fn mget_then_versions(
        &self,
        bodies: &[&str],
        tags: &[&str],
    ) -> Result<(Vec<Option<Vec<u8>>>, Vec<u64>), L2Fault> {
        if bodies.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let keys = |cmd: &mut Cmd| {
            for body in bodies {
                self.key_arg(cmd, body, "");
            }
        };
        let (replies, versions): (Vec<Option<Vec<u8>>>, _) = self
            .then_versions(Shape::Many(bodies.len()), keys, tags)
            .await?;
        if replies.len() != bodies.len() {
            return Err(L2Fault::Malformed);
        }
        Ok((replies, versions))
    }

    /// The values of counters (tag versions); a missing counter is 0. One MGET.
    pub(crate) async fn tag_versions<S: AsRef<str> + Sync>(
        &self,
        bodies: &[S],
    ) -> Result<Vec<u64>, L2Fault> {
        let versions: Vec<Option<u64>> = self.run(&self.versions_cmd(bodies)).await?;
        versions_of(versions, bodies)
    }

    fn versions_cmd<S: AsRef<str>>(&self, bodies: &[S]) -> Cmd {
        let mut cmd = redis::cmd("MGET");
        for body in bodies {
            cmd.arg(self.key(body.as_ref()));
        }
        cmd
    }

    /// Reads the keys `keys` appends to a GET or MGET (as `shape` says),
    /// then the counters `tags` after them. Without `tags` the read may
    /// share an MGET with other reads ([`read`](Self::read)). With them, on
    /// one Redis both go in one pipeline: one round trip, run in order. On
    /// a cluster the counters live in other slots, which one pipeline
    /// cannot span, so their MGET is sent once the read is answered. In
    /// order either way, and that is what makes the pair safe: versions
    /// read after an entry that are newer than its stamps make it stale,
    /// while read before it they could miss a bump that came between.
    async fn then_versions<T: FromRedisValue>(
        &self,
        shape: Shape,
        keys: impl FnOnce(&mut Cmd),
        tags: &[&str],
    ) -> Result<(T, Vec<u64>), L2Fault> {
        if tags.is_empty() {
            return Ok((self.read(shape, keys).await?, Vec::new()));
        }
        let first = Read::new(shape, keys).alone();
        if self.endpoint.is_cluster() {
            let found = self.run(&first).await?;
            return Ok((found, self.tag_versions(tags).await?));
        }
        let mut pipe = redis::pipe();
        pipe.add_command(first).add_command(self.versions_cmd(tags));
        let (found, versions): (T, Vec<Option<u64>>) = self.run_pipe(&pipe).await?;
        Ok((found, versions_of(versions, tags)?))
    }

    /// Bumps a counter (a tag version) past its value and past the server's
    /// clock in µs, and returns the new value (`scripts/bump_tag.lua`).
    pub(crate) async fn bump_tag(&self, body: &str) -> Result<u64, L2Fault> {
        self.run_script(&script::BUMP_TAG, &[self.key(body)], &[])
            .await
    }

    /// PUBLISH (SPUBLISH in sharded mode, routed to the channel's shard)
    /// of one message on a channel from [`L2::channel`].
    pub(crate) async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), L2Fault> {
        let command = if self.sharded_pubsub {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        self.run::<()>(redis::cmd(command).arg(channel).arg(payload))
            .await
    }

    /// The Redis key of an entry's version counter: the entry's key with a
    /// suffix after its hash tag, so both live in one Cluster slot.
    fn version_key(&self, body: &str) -> String {
        let mut k = self.key(body);
        k.push_str(VERSION_SUFFIX);
        k
    }

    /// Entries, each with the version a write must still find to replace
    /// it (0: never written), read together in one MGET, then the versions
    /// of the counters `tags`, as [`get_then_versions`](Self::get_then_versions).
    /// A key of another Redis type reads as absent (MGET never fails on
    /// one); the store that follows a load finds it (`scripts/store.lua`).
    pub(crate) async fn mget_versioned_then_versions(
        &self,
        bodies: &[&str],
        tags: &[&str],
    ) -> Result<(Vec<Versioned>, Vec<u64>), L2Fault> {
        if bodies.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let keys = |cmd: &mut Cmd| {
            for body in bodies {
                self.key_arg(cmd, body, VERSION_SUFFIX);
                self.key_arg(cmd, body, "");
            }
        };
        let (replies, versions): (Vec<Option<Vec<u8>>>, _) = self
            .then_versions(Shape::Many(bodies.len() * 2), keys, tags)
            .await?;
        if replies.len() != bodies.len() * 2 {
            return Err(L2Fault::Malformed);
        }
        let mut replies = replies.into_iter();
        let mut out = Vec::with_capacity(bodies.len());
        while let (Some(version), Some(bytes)) = (replies.next(), replies.next()) {
            out.push(Versioned {
                bytes,
                version: parse_version(version.as_deref()),
            });
        }
        Ok((out, versions))
    }

    /// Writes an entry (`scripts/store.lua`): always, or only if its version
    /// is still `seen` (nobody wrote or invalidated it since). The script
    /// gives the entry a new version, greater than every earlier one, and
    /// writes it into the envelope at `version_at`. Returns that version, or
    /// `None` when a newer write won. With `besides.lock` (a load that holds
    /// the entry's fleet lock with that token), a write that happens releases
    /// the lock too, leaving the marker of its version (see `lock.rs`); with
    /// `besides.announce`, it is announced on the backplane by the same
    /// script, before this call returns (classic pub/sub only: see
    /// [`Stored::announced`]).
    pub(crate) async fn store(
        &self,
        body: &str,
        envelope: &[u8],
        ttl: Duration,
        write: Write,
        version_at: usize,
        besides: Besides<'_>,
    ) -> Result<(Option<Stored>, Vec<u64>), L2Fault> {
        let ttl = millis(ttl);
        let keep = ttl.saturating_add(millis(VERSION_KEEP)).to_string();
        let seen = match write {
            Write::Always => String::new(),
            Write::IfVersion(seen) => seen.to_string(),
        };
        let (ttl, at) = (ttl.to_string(), version_at.to_string());
        let mut keys = vec![self.key(body), self.version_key(body)];
        if besides.lock.is_some() {
            keys.push(self.lock_key(body));
        }
        let token = besides.lock.map(LockToken::text).unwrap_or_default();
        // The backplane gives no announcement in sharded mode (see
        // `Backplane::announcement`).
        let (channel, payload): (&[u8], &[u8]) = match besides.announce {
            Some(a) => (a.channel.as_bytes(), &a.payload),
            None => (b"", b""),
        };
        let args: [&[u8]; 8] = [
            envelope,
            ttl.as_bytes(),
            keep.as_bytes(),
            seen.as_bytes(),
            at.as_bytes(),
            token.as_bytes(),
            channel,
            payload,
        ];
        let ((version, announced), versions): ((u64, u8), _) = self
            .run_script_then_versions(&script::STORE, &keys, &args, besides.versions_after)
            .await?;
        if announced == 1 {
            self.stats.record(Event::BackplanePublished);
        }
        let stored = (version > 0).then_some(Stored {
            version,
            announced: announced == 1,
        });
        Ok((stored, versions))
    }

    /// Deletes an entry and advances its version (`scripts/invalidate.lua`),
    /// so that no load that began before can store its value.
    pub(crate) async fn invalidate(&self, body: &str) -> Result<u64, L2Fault> {
        let keep = millis(VERSION_KEEP).to_string();
        let keys = [self.key(body), self.version_key(body)];
        self.run_script(&script::INVALIDATE, &keys, &[keep.as_bytes()])
            .await
    }

    /// Runs one pipeline under the timeout, counting and logging failures.
    async fn run_pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, L2Fault> {
        self.guarded(|mut conn| async move { pipe.query_async::<T>(&mut conn).await })
            .await
    }

    /// UNLINK (non-blocking delete) of entries.
    pub(crate) async fn del(&self, bodies: &[&str]) -> Result<(), L2Fault> {
        if bodies.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("UNLINK");
        for body in bodies {
            cmd.arg(self.key(body));
        }
        self.run::<()>(&cmd).await
    }
}

/// How [`L2::store`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Whatever is there (an application's `set`).
    Always,
    /// Only if the entry's version is still this one (a load's result).
    IfVersion(u64),
}

/// What an [`L2::store`] does besides writing the entry.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Besides<'a> {
    /// Releases the entry's fleet lock held with this token.
    pub(crate) lock: Option<LockToken>,
    /// Announces the write on the backplane.
    pub(crate) announce: Option<&'a Announcement>,
    /// Counters (tag versions) to read right after the write, in the same
    /// round trip where one Redis serves both (see [`L2::then_versions`]).
    pub(crate) versions_after: &'a [&'a str],
}

/// A backplane message ready to send: the channel (from [`L2::channel`])
/// and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Announcement {
    pub(crate) channel: String,
    pub(crate) payload: Vec<u8>,
}

/// A write that [`L2::store`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The entry's new version.
    pub(crate) version: u64,
    /// Whether the store script announced it on the backplane (it did not
    /// when asked not to, in sharded mode, or when Redis refused the
    /// `PUBLISH`): if not, the caller's backplane must.
    pub(crate) announced: bool,
}

/// An entry as read with its version; see [`L2::mget_versioned_then_versions`].
#[derive(Debug)]
pub(crate) struct Versioned {
    pub(crate) bytes: Option<Vec<u8>>,
    /// The version a conditional write must find; 0 if never written.
    pub(crate) version: u64,
}

/// How long an entry's version counter outlives the entry (and how long an
/// invalidation's counter lives at least): a load that began before a write
/// and ends within this still finds the newer version and loses.
const VERSION_KEEP: Duration = Duration::from_secs(300);

/// A TTL in whole milliseconds for `PX`: at least 1 (sub-second TTLs work;
/// PX 0 is an error) and at most a century (Redis refuses an expiry past
/// what it can hold, so `Duration::MAX` means "keep it", not an error).
fn millis(d: Duration) -> u64 {
    const CENTURY_MS: u128 = 100 * 365 * 24 * 3600 * 1000;
    d.as_millis().clamp(1, CENTURY_MS) as u64
}

/// The counters' values from an MGET of `bodies`; a missing counter is 0.
fn versions_of<S>(versions: Vec<Option<u64>>, bodies: &[S]) -> Result<Vec<u64>, L2Fault> {
    if versions.len() != bodies.len() {
        return Err(L2Fault::Malformed);
    }
    Ok(versions.into_iter().map(|v| v.unwrap_or(0)).collect())
}

/// A version counter's value; anything unreadable counts as never written
/// (the store script reads it the same way).
fn parse_version(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Error replies that say Redis cannot serve at all, not that it refused
/// this one command.
const UNWELL: [&str; 5] = ["LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN"];

/// Whether `e` is Redis's answer about this command (an error reply), as
/// opposed to a connection failure or a server that cannot serve.
fn is_about_the_command(e: &RedisError) -> bool {
    let codes: Vec<String> = match e.clone().into_server_errors() {
        Some(errors) => errors
            .iter()
            .map(|(_, error)| error.code().to_owned())
            .collect(),
        None => e.code().map(str::to_owned).into_iter().collect(),
    };
    !codes.is_empty() && codes.iter().all(|code| !UNWELL.contains(&code.as_str()))
}

/// Error codes already logged, so that each is logged once per cache.
#[derive(Debug, Default)]
struct Rejections(std::sync::Mutex<Vec<String>>);

impl Rejections {
    fn first_time(&self, code: &str) -> bool {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.iter().any(|c| c == code) {
            return false;
        }
        seen.push(code.to_owned());
        true
    }
}

/// Whether Redis answered WRONGTYPE, to a command or inside a pipeline (a
/// pipeline's error has no code of its own: it lists its commands' errors).
fn is_wrong_type(e: &RedisError) -> bool {
    const CODE: &str = "WRONGTYPE";
    e.code() == Some(CODE)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == CODE))
}

fn describe(fault: &L2Fault) -> String {
    match fault {
        L2Fault::WrongType => "WRONGTYPE".to_owned(),
        L2Fault::Timeout => "timeout".to_owned(),
        L2Fault::BreakerOpen => "breaker open".to_owned(),
        L2Fault::Malformed => "unexpected reply".to_owned(),
        L2Fault::Rejected(e) => e.code().unwrap_or("error reply").to_owned(),
        L2Fault::Redis(e) => {
            // Never the error's own text: a connection error may quote the URL.
            let what = if e.is_connection_refusal() {
                "connection refused"
            } else if e.is_connection_dropped() {
                "connection dropped"
            } else if e.is_timeout() {
                "timeout"
            } else if let Some(code) = e.code() {
                code
            } else if e.is_io_error() {
                "I/O error"
            } else {
                "error"
            };
            format!("{what} ({:?})", e.kind())
        }
    }
}

/// Connection errors may quote the URL; keep only the kind.
fn redact(e: RedisError) -> Error {
    Error::new(ErrorKind::Config, format!("{:?}", e.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_url_hides_credentials_and_query() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:secret@h:1", "redis://***@h:1"),
            ("rediss://app:secret@h:1/2", "rediss://***@h:1/2"),
            ("redis://app:se@c/r@et@h:1", "redis://***@h:1"),
            (
                "redis+unix:///run/r.sock?pass=secret",
                "redis+unix:///run/r.sock?***",
            ),
            ("not a url secret", "<redacted>"),
        ] {
            assert_eq!(format!("{:?}", RedisUrl::new(url.to_owned())), shown);
        }
    }
}
