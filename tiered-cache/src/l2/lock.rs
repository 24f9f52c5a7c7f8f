//! The Redis side of the fleet-wide lock (one load per key across every
//! instance): `SET NX PX` with a random token to take it, compare-and-
//! `PEXPIRE` to renew it, compare-and-`DEL` to release it, so a holder
//! whose lease ran out can never renew or release the next holder's lock.
//!
//! A holder whose load is stored releases the lock in the store's own
//! script (`scripts/store.lua`): the lock then holds `stored:<version>`
//! for the rest of its lease. The `SET NX` that takes the lock also reads
//! what it holds (`GET`), so an instance that missed the entry just
//! before that store, and asks for the lock just after, is told that the
//! value is in Redis instead of being handed the lock and loading again.
//!
//! The lock key is the entry's key with a suffix after its hash tag (as
//! the version key), so it shares the entry's Redis Cluster slot. Every
//! call goes through the tier's timeout, budget and circuit breaker.

use std::time::Duration;

use super::{millis, L2Fault, L2};

/// The random token of one acquisition of a fleet lock (so a late renewal
/// or release never touches the next holder's lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockToken(u128);

impl LockToken {
    pub(crate) fn random() -> Self {
        LockToken(rand::random())
    }

    /// As the lock's value holds it.
    pub(super) fn text(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// What asking for a fleet lock found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockTry {
    /// Taken: this caller holds it now.
    Taken,
    /// Another instance holds it (it loads, or died and its lease runs).
    Held,
    /// Its last holder stored the entry at this version and let it go.
    Stored(u64),
}

/// The value of a lock released by a store at `version`.
fn stored_marker(version: u64) -> String {
    format!("stored:{version}")
}

impl L2 {
    /// The Redis key of an entry's fleet lock.
    pub(super) fn lock_key(&self, body: &str) -> String {
        let mut k = self.key(body);
        k.push_str("#lock");
        k
    }

    /// Takes the lock of entry `body` for `lease` with `token`, if nobody
    /// holds it (`SET NX PX GET`: one command).
    pub(crate) async fn try_lock(
        &self,
        body: &str,
        token: LockToken,
        lease: Duration,
    ) -> Result<LockTry, L2Fault> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lock_key(body))
            .arg(token.text())
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .arg("GET");
        let held: Option<String> = self.run(&cmd).await?;
        Ok(match held {
            None => LockTry::Taken,
            Some(held) => match held.strip_prefix("stored:").map(str::parse) {
                Some(Ok(version)) => LockTry::Stored(version),
                _ => LockTry::Held,
            },
        })
    }

    /// Takes the lock of entry `body` if it is free or still holds the
    /// marker of a store at `version` (which this caller has read since
    /// and cannot use): `Ok(false)` when another instance holds it now.
    pub(crate) async fn take_over_lock(
        &self,
        body: &str,
        version: u64,
        token: LockToken,
        lease: Duration,
    ) -> Result<bool, L2Fault> {
        let (marker, lease) = (stored_marker(version), millis(lease).to_string());
        let token = token.text();
        let taken: u64 = self
            .run_script(
                &super::script::TAKE_LOCK,
                &[self.lock_key(body)],
                &[marker.as_bytes(), token.as_bytes(), lease.as_bytes()],
            )
            .await?;
        Ok(taken == 1)
    }

    /// Extends the lease if `token` still holds the lock; `Ok(false)`: lost.
    pub(crate) async fn renew_lock(
        &self,
        body: &str,
        token: LockToken,
        lease: Duration,
    ) -> Result<bool, L2Fault> {
        let (token, lease) = (token.text(), millis(lease).to_string());
        let renewed: u64 = self
            .run_script(
                &super::script::RENEW_LOCK,
                &[self.lock_key(body)],
                &[token.as_bytes(), lease.as_bytes()],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Releases the lock if `token` still holds it.
    pub(crate) async fn unlock(&self, body: &str, token: LockToken) -> Result<bool, L2Fault> {
        let token = token.text();
        let released: u64 = self
            .run_script(
                &super::script::UNLOCK,
                &[self.lock_key(body)],
                &[token.as_bytes()],
            )
            .await?;
        Ok(released == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_scripts_marker_is_what_try_lock_parses() {
        assert_eq!(stored_marker(42), "stored:42");
        assert!(
            include_str!("scripts/store.lua").contains("'stored:' .. string.format('%d', version)")
        );
    }
}
