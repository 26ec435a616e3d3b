//! Rate limits on control requests, per client and per user.
//!
//! A request costs the datapath thread some work (a status page, a flow change), so an
//! unprivileged user could flood the control socket and starve everyone's traffic. Each
//! client and each user has a token bucket; a client whose bucket (or whose user's) is empty
//! is **not read** until it refills: its requests wait in its own socket buffer and its sends
//! block, which costs the nexus nothing. Root is not limited.

use std::collections::BTreeMap;
use std::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = now;
    }
}

/// The buckets of every limited client and user.
#[derive(Debug)]
pub(crate) struct RateLimits {
    client_rate: f64,
    user_rate: f64,
    clients: BTreeMap<u64, Bucket>,
    users: BTreeMap<u32, Bucket>,
    /// Clients not read until their buckets refill.
    pub(crate) throttled: BTreeMap<u64, u32>,
}

/// A bucket holds a quarter of a second of requests (at least 8).
fn burst(rate: f64) -> f64 {
    (rate / 4.0).max(8.0)
}

impl RateLimits {
    pub(crate) fn new(client_rate: u32, user_rate: u32) -> Self {
        Self {
            client_rate: f64::from(client_rate.max(1)),
            user_rate: f64::from(user_rate.max(1)),
            clients: BTreeMap::new(),
            users: BTreeMap::new(),
            throttled: BTreeMap::new(),
        }
    }

    /// Takes a token for one request of `client` (of user `uid`); false if either bucket is
    /// empty (the request must wait).
    pub(crate) fn admit(&mut self, client: u64, uid: u32, now: Instant) -> bool {
        if uid == 0 {
            return true;
        }
        let (cr, ur) = (self.client_rate, self.user_rate);
        let c = self
            .clients
            .entry(client)
            .or_insert_with(|| Bucket::new(burst(cr), now));
        c.refill(cr, burst(cr), now);
        let u = self
            .users
            .entry(uid)
            .or_insert_with(|| Bucket::new(burst(ur), now));
        u.refill(ur, burst(ur), now);
        if c.tokens < 1.0 || u.tokens < 1.0 {
            return false;
        }
        c.tokens -= 1.0;
        u.tokens -= 1.0;
        true
    }

    /// Charges `tokens` more for a request that cost more than one (a status page of many
    /// channels): the buckets may go below zero, and the client then waits longer.
    pub(crate) fn charge(&mut self, client: u64, uid: u32, tokens: f64) {
        if uid == 0 {
            return;
        }
        if let Some(b) = self.clients.get_mut(&client) {
            b.tokens -= tokens;
        }
        if let Some(b) = self.users.get_mut(&uid) {
            b.tokens -= tokens;
        }
    }

    /// Whether a throttled client may be read again.
    pub(crate) fn may_resume(&mut self, client: u64, uid: u32, now: Instant) -> bool {
        let (cr, ur) = (self.client_rate, self.user_rate);
        let c_ok = self.clients.get_mut(&client).is_none_or(|b| {
            b.refill(cr, burst(cr), now);
            b.tokens >= 1.0
        });
        let u_ok = self.users.get_mut(&uid).is_none_or(|b| {
            b.refill(ur, burst(ur), now);
            b.tokens >= 1.0
        });
        c_ok && u_ok
    }

    /// Forgets a client that left (its user's bucket stays: reconnecting refills nothing).
    pub(crate) fn forget(&mut self, client: u64) {
        self.clients.remove(&client);
        self.throttled.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_flood_is_held_to_the_rate_and_root_is_not_limited() {
        let t0 = Instant::now();
        let mut r = RateLimits::new(100, 1000);
        let admitted = (0..1000).filter(|_| r.admit(1, 1000, t0)).count();
        assert_eq!(admitted, 25, "a quarter second's burst");
        // A second later, another second's worth (capped by the burst).
        let t1 = t0 + Duration::from_secs(1);
        assert!(r.may_resume(1, 1000, t1));
        assert_eq!((0..1000).filter(|_| r.admit(1, 1000, t1)).count(), 25);
        assert_eq!((0..1000).filter(|_| r.admit(2, 0, t0)).count(), 1000);
    }

    #[test]
    fn costly_requests_are_charged_their_cost() {
        let t0 = Instant::now();
        let mut r = RateLimits::new(100, 1000);
        assert!(r.admit(1, 1000, t0));
        r.charge(1, 1000, 100.0);
        assert!(!r.admit(1, 1000, t0));
        assert!(!r.may_resume(1, 1000, t0 + Duration::from_millis(500)));
        assert!(r.may_resume(1, 1000, t0 + Duration::from_millis(1000)));
    }

    #[test]
    fn one_users_clients_share_its_bucket() {
        let t0 = Instant::now();
        let mut r = RateLimits::new(1000, 100);
        let a = (0..1000).filter(|_| r.admit(1, 7, t0)).count();
        let b = (0..1000).filter(|_| r.admit(2, 7, t0)).count();
        assert_eq!(a + b, 25, "the user's burst, shared");
        // Another user is not affected.
        assert_eq!((0..1000).filter(|_| r.admit(3, 8, t0)).count(), 25);
    }
}
