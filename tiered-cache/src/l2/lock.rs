//! The Redis side of the fleet-wide lock (one load per key across every
//! instance): `SET NX PX` with a random token to take it, compare-and-
//! `PEXPIRE` to renew it, compare-and-`DEL` to release it, so a holder
//! whose lease ran out can never renew or release the next holder's lock.
//!
//! The lock key is the entry's key with a suffix after its hash tag (as
//! the version key), so it shares the entry's Redis Cluster slot. Every
//! call goes through the tier's timeout, budget and circuit breaker.

use std::time::Duration;

use super::{millis, L2Fault, L2};

impl L2 {
    /// The Redis key of an entry's fleet lock.
    fn lock_key(&self, body: &str) -> String {
        let mut k = self.key(body);
        k.push_str("#lock");
        k
    }

    /// Takes the lock of entry `body` for `lease` with `token`, if nobody
    /// holds it. `Ok(false)`: another instance holds it.
    pub(crate) async fn try_lock(
        &self,
        body: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, L2Fault> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lock_key(body))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(millis(lease));
        let reply: Option<String> = self.run(&cmd).await?;
        Ok(reply.is_some())
    }

    /// Extends the lease if `token` still holds the lock; `Ok(false)`: lost.
    pub(crate) async fn renew_lock(
        &self,
        body: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, L2Fault> {
        let lease = millis(lease).to_string();
        let renewed: u64 = self
            .run_script(
                include_str!("scripts/renew_lock.lua"),
                &[self.lock_key(body)],
                &[token.as_bytes(), lease.as_bytes()],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Releases the lock if `token` still holds it.
    pub(crate) async fn unlock(&self, body: &str, token: &str) -> Result<bool, L2Fault> {
        let released: u64 = self
            .run_script(
                include_str!("scripts/unlock.lua"),
                &[self.lock_key(body)],
                &[token.as_bytes()],
            )
            .await?;
        Ok(released == 1)
    }
}
