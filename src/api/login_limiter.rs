//! Failed logins, counted so that nobody without a user's password can lock
//! the user out of the account (and so out of withdrawing consent).
//!
//! - A wrong password (or an unknown name) counts against the name *from
//!   that source*: a stranger who sprays guesses locks only their own address.
//! - The right password with a wrong or already used code counts against the
//!   name *from everywhere*: only someone who holds the password can do it,
//!   and it bounds guessing of the second factor (RFC 6238 §5.2) however
//!   many addresses the guesser has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Where an attempt came from, as far as counting goes: IPv6 addresses by
/// their /64 (one host usually holds a whole /64), IPv4 by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
    /// No peer address (e.g. a request built in-process).
    Unknown,
}

impl Source {
    pub fn of(addr: Option<IpAddr>) -> Source {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V4(a)) => Source::V4(u32::from(a)),
            Some(IpAddr::V6(a)) => Source::V6Prefix((u128::from(a) >> 64) as u64),
            None => Source::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    From(Source),
    Everywhere,
}

/// Entries kept before expired ones are swept, so that spraying names or
/// addresses cannot grow the table without limit.
const SWEEP_ABOVE: usize = 100_000;

/// A user name as counted: a digest, so that an entry costs the same for a
/// 64 KiB name sent to fill memory as for a real one.
type Name = [u8; 16];

fn name(user: &str) -> Name {
    let d = Sha256::digest(user.as_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&d[..16]);
    n
}

/// One (name, scope)'s count. Attempts in flight count as failures until
/// they are decided, so that requests sent in parallel (each checked before
/// its slow password check, decided after it) cannot together get more
/// guesses than the limit.
#[derive(Debug)]
struct Count {
    failures: u32,
    in_flight: u32,
    /// When the first failure of this window was counted.
    since: Instant,
}

pub struct LoginLimiter {
    max: u32,
    window: Duration,
    counts: Mutex<HashMap<(Name, Scope), Count>>,
}

/// How long the name stays locked: the rest of the window that its first
/// counted failure opened, or a moment if attempts still in flight fill the
/// limit (they may yet succeed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked(pub Duration);

/// A place taken for one attempt. Dropped undecided (the attempt passed, or
/// the request went away), it counts nothing.
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    key: (Name, Scope),
    failed: bool,
}

impl Attempt<'_> {
    /// The attempt got its factor wrong: it counts as a failure.
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut m = self.limiter.lock();
        let Some(c) = m.get_mut(&self.key) else {
            return;
        };
        c.in_flight = c.in_flight.saturating_sub(1);
        if self.failed {
            if c.failures == 0 {
                c.since = Instant::now();
            }
            c.failures += 1;
        } else if c.failures == 0 && c.in_flight == 0 {
            m.remove(&self.key);
        }
    }
}

impl LoginLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Name, Scope), Count>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one check of `user`'s password from `from`, unless the
    /// name is locked for that source or (by wrong codes) everywhere.
    pub fn try_password(&self, user: &str, from: Source) -> Result<Attempt<'_>, Locked> {
        self.try_attempt(user, Scope::From(from), Some(Scope::Everywhere))
    }

    /// A place for one check of `user`'s second factor, taken once the
    /// password was right, unless wrong codes have locked the name.
    pub fn try_code(&self, user: &str) -> Result<Attempt<'_>, Locked> {
        self.try_attempt(user, Scope::Everywhere, None)
    }

    fn try_attempt(
        &self,
        user: &str,
        scope: Scope,
        also: Option<Scope>,
    ) -> Result<Attempt<'_>, Locked> {
        let name = name(user);
        let mut m = self.lock();
        if m.len() > SWEEP_ABOVE {
            let window = self.window;
            m.retain(|_, c| c.in_flight > 0 || c.since.elapsed() <= window);
        }
        let locked = std::iter::once(&scope)
            .chain(also.as_ref())
            .filter_map(|s| self.locked_in(&mut m, (name, s.clone())))
            .max();
        if let Some(left) = locked {
            return Err(Locked(left));
        }
        m.entry((name, scope.clone()))
            .or_insert_with(|| Count {
                failures: 0,
                in_flight: 0,
                since: Instant::now(),
            })
            .in_flight += 1;
        Ok(Attempt {
            limiter: self,
            key: (name, scope),
            failed: false,
        })
    }

    /// How long `key` is locked, if it is; forgets a window that has passed.
    fn locked_in(
        &self,
        m: &mut HashMap<(Name, Scope), Count>,
        key: (Name, Scope),
    ) -> Option<Duration> {
        let c = m.get_mut(&key)?;
        if c.failures > 0 && c.since.elapsed() > self.window {
            c.failures = 0;
        }
        if c.failures >= self.max {
            Some(self.window.saturating_sub(c.since.elapsed()))
        } else if c.failures + c.in_flight >= self.max {
            Some(Duration::from_secs(1))
        } else {
            None
        }
    }

    /// Both factors were right: what this source and the name had counted
    /// goes. Other sources' counts stay: their guesses were still guesses.
    pub fn succeeded(&self, user: &str, from: Source) {
        let mut m = self.lock();
        for scope in [Scope::From(from), Scope::Everywhere] {
            let key = (name(user), scope);
            match m.get_mut(&key) {
                Some(c) if c.in_flight > 0 => c.failures = 0,
                Some(_) => {
                    m.remove(&key);
                }
                None => {}
            }
        }
    }

    /// Forgets every failure counted against `user`, from every source: the
    /// operator has given the user new secrets.
    pub fn clear(&self, user: &str) {
        let name = name(user);
        self.lock().retain(|(n, _), c| {
            if *n == name {
                c.failures = 0;
            }
            *n != name || c.in_flight > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::of(Some(s.parse().unwrap()))
    }

    fn wrong_password(l: &LoginLimiter, user: &str, from: Source) {
        l.try_password(user, from).expect("not locked").failed();
    }

    fn wrong_code(l: &LoginLimiter, user: &str) {
        l.try_code(user).expect("not locked").failed();
    }

    /// How long a password attempt would be refused for (taking no place).
    fn locked(l: &LoginLimiter, user: &str, from: Source) -> Option<Duration> {
        l.try_password(user, from).err().map(|Locked(d)| d)
    }

    #[test]
    fn wrong_passwords_lock_only_their_source() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(locked(&l, "kate", ip("192.0.2.1")), None);
            wrong_password(&l, "kate", ip("192.0.2.1"));
        }
        let left = locked(&l, "kate", ip("192.0.2.1")).expect("locked");
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(55));
        assert_eq!(locked(&l, "kate", ip("192.0.2.2")), None);
        assert_eq!(locked(&l, "other", ip("192.0.2.1")), None);
        // Wrong passwords never lock the second factor.
        assert!(l.try_code("kate").is_ok());
    }

    #[test]
    fn wrong_codes_lock_the_name_everywhere() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            wrong_code(&l, "kate");
        }
        assert!(locked(&l, "kate", ip("198.51.100.7")).is_some());
        assert!(l.try_code("kate").is_err());
        assert_eq!(locked(&l, "other", ip("198.51.100.7")), None);
    }

    #[test]
    fn attempts_in_flight_count_until_decided() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        let from = ip("192.0.2.1");
        let places: Vec<_> = (0..3)
            .map(|_| l.try_password("kate", from).unwrap())
            .collect();
        // Parallel requests get no more than the limit between them.
        assert_eq!(
            l.try_password("kate", from).err(),
            Some(Locked(Duration::from_secs(1)))
        );
        let mut places = places.into_iter();
        // One passes: its place is free again, and nothing was counted.
        drop(places.next());
        let again = l.try_password("kate", from).unwrap();
        drop(again);
        // The other two fail: counted, and the source is one short of locked.
        places.for_each(Attempt::failed);
        wrong_password(&l, "kate", from);
        assert!(locked(&l, "kate", from).unwrap() > Duration::from_secs(55));

        let codes: Vec<_> = (0..3).map(|_| l.try_code("bob").unwrap()).collect();
        assert!(l.try_code("bob").is_err());
        drop(codes);
        assert!(l.try_code("bob").is_ok());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        wrong_password(&l, "kate", ip("2001:db8:1:2::1"));
        wrong_password(&l, "kate", ip("2001:db8:1:2:ffff::9"));
        assert!(locked(&l, "kate", ip("2001:db8:1:2::77")).is_some());
        assert_eq!(locked(&l, "kate", ip("2001:db8:1:3::1")), None);
        // An IPv4-mapped address is its IPv4 address.
        wrong_password(&l, "kate", ip("192.0.2.9"));
        wrong_password(&l, "kate", ip("::ffff:192.0.2.9"));
        assert!(locked(&l, "kate", ip("192.0.2.9")).is_some());
    }

    #[test]
    fn success_clears_its_source_and_the_name_but_not_other_sources() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        wrong_password(&l, "kate", ip("192.0.2.1"));
        wrong_password(&l, "kate", ip("192.0.2.1"));
        wrong_password(&l, "kate", ip("192.0.2.2"));
        wrong_code(&l, "kate");
        l.succeeded("kate", ip("192.0.2.2"));
        assert!(locked(&l, "kate", ip("192.0.2.1")).is_some());
        wrong_password(&l, "kate", ip("192.0.2.2"));
        assert_eq!(
            locked(&l, "kate", ip("192.0.2.2")),
            None,
            "one failure after the reset"
        );
        wrong_code(&l, "kate");
        assert!(
            l.try_code("kate").is_ok(),
            "one code failure after the reset"
        );
    }

    #[test]
    fn clear_forgets_every_source_and_the_name() {
        let l = LoginLimiter::new(1, Duration::from_secs(60));
        wrong_password(&l, "kate", ip("192.0.2.1"));
        wrong_password(&l, "kate", ip("192.0.2.2"));
        let held = l.try_password("kate", ip("192.0.2.3")).unwrap();
        wrong_code(&l, "kate");
        wrong_password(&l, "other", ip("192.0.2.1"));
        l.clear("kate");
        assert_eq!(locked(&l, "kate", ip("192.0.2.1")), None);
        assert_eq!(locked(&l, "kate", ip("192.0.2.2")), None);
        assert!(l.try_code("kate").is_ok());
        assert!(locked(&l, "other", ip("192.0.2.1")).is_some());
        // A place taken before the reset still counts when it is decided.
        held.failed();
        assert!(locked(&l, "kate", ip("192.0.2.3")).is_some());
    }

    #[test]
    fn a_window_that_has_passed_unlocks() {
        let l = LoginLimiter::new(1, Duration::from_millis(20));
        wrong_code(&l, "kate");
        assert!(locked(&l, "kate", Source::Unknown).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(locked(&l, "kate", Source::Unknown), None);
    }
}
