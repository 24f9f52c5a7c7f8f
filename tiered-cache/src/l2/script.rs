//! The Lua scripts, sent by their SHA1 (`EVALSHA`): a write then carries
//! its arguments only, not the script's text (2 KB for the store script,
//! with its comments), and Redis neither hashes nor parses it again. A
//! Redis that does not know the script (restarted, failed over, its script
//! cache flushed) answers `NOSCRIPT`, and the same request goes again by
//! text (`EVAL`), which loads it.

use std::sync::OnceLock;

use redis::Cmd;

/// One script of `scripts/`.
pub(crate) struct Lua {
    text: &'static str,
    sha: OnceLock<String>,
}

impl Lua {
    const fn new(text: &'static str) -> Self {
        Lua {
            text,
            sha: OnceLock::new(),
        }
    }

    /// `EVALSHA` of the script over `keys` and `args`.
    pub(super) fn by_hash(&self, keys: &[String], args: &[&[u8]]) -> Cmd {
        let sha = self
            .sha
            .get_or_init(|| redis::Script::new(self.text).get_hash().to_owned());
        invocation("EVALSHA", sha, keys, args)
    }

    /// `EVAL` of the script's text: for a Redis that answered `NOSCRIPT`.
    pub(super) fn by_text(&self, keys: &[String], args: &[&[u8]]) -> Cmd {
        invocation("EVAL", self.text, keys, args)
    }
}

/// Whether Redis answered that it does not know the script.
pub(super) fn unknown(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

fn invocation(verb: &str, script: &str, keys: &[String], args: &[&[u8]]) -> Cmd {
    // Sized up front: a store's envelope would otherwise grow the buffer
    // by reallocation, copying what came before each time.
    let bytes = verb.len() + script.len() + 20;
    let bytes = keys.iter().map(String::len).sum::<usize>() + bytes;
    let bytes = args.iter().map(|arg| arg.len()).sum::<usize>() + bytes;
    let mut cmd = Cmd::with_capacity(3 + keys.len() + args.len(), bytes);
    cmd.arg(verb).arg(script).arg(keys.len()).arg(keys);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

pub(crate) static STORE: Lua = Lua::new(include_str!("scripts/store.lua"));
pub(crate) static INVALIDATE: Lua = Lua::new(include_str!("scripts/invalidate.lua"));
pub(crate) static BUMP_TAG: Lua = Lua::new(include_str!("scripts/bump_tag.lua"));
pub(crate) static TAKE_LOCK: Lua = Lua::new(include_str!("scripts/take_lock.lua"));
pub(crate) static RENEW_LOCK: Lua = Lua::new(include_str!("scripts/renew_lock.lua"));
pub(crate) static UNLOCK: Lua = Lua::new(include_str!("scripts/unlock.lua"));
