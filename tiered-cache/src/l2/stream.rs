//! Redis Streams for the durable write-behind queue: append, read through a
//! consumer group, take over a dead consumer's entries, finish, and a plain
//! range for dead letters. No `BLOCK`: the queue polls, so these share the
//! multiplexed connection and its timeout like every other command.

use std::collections::HashMap;

use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::Value;

use super::{L2Fault, L2};

/// One stream entry: its id, and its fields (`None`: the entry was deleted
/// after it was delivered, and only its id is left in the group).
#[derive(Debug, Clone)]
pub(crate) struct StreamEntry {
    pub(crate) id: String,
    pub(crate) fields: Option<HashMap<String, Vec<u8>>>,
}

impl StreamEntry {
    fn from_reply(entry: StreamId) -> Self {
        // redis-rs reads a deleted entry (`[id, nil]`) as an empty map.
        let fields = (!entry.map.is_empty()).then(|| {
            entry
                .map
                .into_iter()
                .filter_map(|(name, value)| match value {
                    Value::BulkString(bytes) => Some((name, bytes)),
                    Value::SimpleString(text) => Some((name, text.into_bytes())),
                    _ => None,
                })
                .collect()
        });
        StreamEntry {
            id: entry.id,
            fields,
        }
    }

    /// When the entry was appended (Unix ms): the first part of its id.
    pub(crate) fn appended_ms(&self) -> u64 {
        self.id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0)
    }
}

impl L2 {
    /// XADD of one entry; its id.
    pub(crate) async fn stream_add(
        &self,
        body: &str,
        fields: &[(&str, &[u8])],
    ) -> Result<String, L2Fault> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.key(body)).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        self.run(&cmd).await
    }

    /// Creates the consumer group (and the stream) unless it exists.
    pub(crate) async fn stream_group(&self, body: &str, group: &str) -> Result<(), L2Fault> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.key(body))
            .arg(group)
            .arg("0")
            .arg("MKSTREAM");
        match self.run::<()>(&cmd).await {
            Err(L2Fault::Rejected(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// XREADGROUP of up to `count` entries: from `"0"`, this consumer's
    /// delivered but unfinished ones; from `">"`, new ones (now delivered
    /// to it).
    pub(crate) async fn stream_read(
        &self,
        body: &str,
        group: &str,
        consumer: &str,
        from: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, L2Fault> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(self.key(body))
            .arg(from);
        let reply: Option<StreamReadReply> = self.run(&cmd).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(StreamEntry::from_reply)
            .collect())
    }

    /// XAUTOCLAIM: takes over up to `count` entries that other consumers
    /// were given and left unfinished for `min_idle_ms`, following the
    /// cursor. Entries deleted meanwhile come back without fields.
    pub(crate) async fn stream_claim(
        &self,
        body: &str,
        group: &str,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<StreamEntry>, L2Fault> {
        let mut claimed = Vec::new();
        let mut cursor = "0-0".to_owned();
        loop {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(self.key(body))
                .arg(group)
                .arg(consumer)
                .arg(min_idle_ms)
                .arg(&cursor)
                .arg("COUNT")
                .arg(count);
            let reply: StreamAutoClaimReply = self.run(&cmd).await?;
            claimed.extend(reply.claimed.into_iter().map(StreamEntry::from_reply));
            claimed.extend(
                reply
                    .deleted_ids
                    .into_iter()
                    .map(|id| StreamEntry { id, fields: None }),
            );
            cursor = reply.next_stream_id;
            if cursor == "0-0" || claimed.len() >= count {
                return Ok(claimed);
            }
        }
    }

    /// Finishes entries: acknowledged in the group and deleted from the stream.
    pub(crate) async fn stream_done(
        &self,
        body: &str,
        group: &str,
        ids: &[String],
    ) -> Result<(), L2Fault> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = self.key(body);
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&key).arg(group).arg(ids).ignore();
        pipe.cmd("XDEL").arg(&key).arg(ids).ignore();
        self.run_pipe::<()>(&pipe).await
    }

    /// XRANGE of up to `count` entries from the start.
    pub(crate) async fn stream_range(
        &self,
        body: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, L2Fault> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.key(body))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let reply: StreamRangeReply = self.run(&cmd).await?;
        Ok(reply.ids.into_iter().map(StreamEntry::from_reply).collect())
    }

    /// XDEL of entries.
    pub(crate) async fn stream_delete(&self, body: &str, ids: &[String]) -> Result<(), L2Fault> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(self.key(body)).arg(ids);
        self.run::<()>(&cmd).await
    }
}
