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

/// Which factor a failed attempt got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Wrong password or unknown name: counted per source.
    Password,
    /// Right password, wrong or used code: counted for the name.
    Code,
}

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

pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<(Name, Scope), (u32, Instant)>>,
}

impl LoginLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long `user` stays locked out for attempts from `from`, if they
    /// are: until the window that the first counted failure opened has
    /// passed, the longer of the two scopes.
    pub fn locked_for(&self, user: &str, from: Source) -> Option<Duration> {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        [Scope::From(from), Scope::Everywhere]
            .into_iter()
            .filter_map(|scope| {
                let key = (name(user), scope);
                match m.get(&key) {
                    Some((_, since)) if since.elapsed() > self.window => {
                        m.remove(&key);
                        None
                    }
                    Some((n, since)) if *n >= self.max => {
                        Some(self.window.saturating_sub(since.elapsed()))
                    }
                    _ => None,
                }
            })
            .max()
    }

    pub fn failed(&self, user: &str, from: Source, what: Failure) {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > SWEEP_ABOVE {
            let window = self.window;
            m.retain(|_, (_, since)| since.elapsed() <= window);
        }
        let scope = match what {
            Failure::Password => Scope::From(from),
            Failure::Code => Scope::Everywhere,
        };
        m.entry((name(user), scope))
            .or_insert((0, Instant::now()))
            .0 += 1;
    }

    /// Both factors were right: what this source and the name had counted
    /// goes. Other sources' counts stay: their guesses were still guesses.
    pub fn succeeded(&self, user: &str, from: Source) {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&(name(user), Scope::From(from)));
        m.remove(&(name(user), Scope::Everywhere));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::of(Some(s.parse().unwrap()))
    }

    #[test]
    fn wrong_passwords_lock_only_their_source() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(l.locked_for("kate", ip("192.0.2.1")), None);
            l.failed("kate", ip("192.0.2.1"), Failure::Password);
        }
        let left = l.locked_for("kate", ip("192.0.2.1")).expect("locked");
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(55));
        assert_eq!(l.locked_for("kate", ip("192.0.2.2")), None);
        assert_eq!(l.locked_for("other", ip("192.0.2.1")), None);
    }

    #[test]
    fn wrong_codes_lock_the_name_everywhere() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for i in 0..3 {
            l.failed("kate", ip(&format!("192.0.2.{i}")), Failure::Code);
        }
        assert!(l.locked_for("kate", ip("198.51.100.7")).is_some());
        assert_eq!(l.locked_for("other", ip("198.51.100.7")), None);
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        l.failed("kate", ip("2001:db8:1:2::1"), Failure::Password);
        l.failed("kate", ip("2001:db8:1:2:ffff::9"), Failure::Password);
        assert!(l.locked_for("kate", ip("2001:db8:1:2::77")).is_some());
        assert_eq!(l.locked_for("kate", ip("2001:db8:1:3::1")), None);
        // An IPv4-mapped address is its IPv4 address.
        l.failed("kate", ip("192.0.2.9"), Failure::Password);
        l.failed("kate", ip("::ffff:192.0.2.9"), Failure::Password);
        assert!(l.locked_for("kate", ip("192.0.2.9")).is_some());
    }

    #[test]
    fn success_clears_its_source_and_the_name_but_not_other_sources() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        l.failed("kate", ip("192.0.2.1"), Failure::Password);
        l.failed("kate", ip("192.0.2.1"), Failure::Password);
        l.failed("kate", ip("192.0.2.2"), Failure::Password);
        l.failed("kate", ip("192.0.2.2"), Failure::Code);
        l.succeeded("kate", ip("192.0.2.2"));
        assert!(l.locked_for("kate", ip("192.0.2.1")).is_some());
        l.failed("kate", ip("192.0.2.2"), Failure::Password);
        assert_eq!(
            l.locked_for("kate", ip("192.0.2.2")),
            None,
            "one failure after the reset"
        );
    }

    #[test]
    fn a_window_that_has_passed_unlocks() {
        let l = LoginLimiter::new(1, Duration::from_millis(20));
        l.failed("kate", Source::Unknown, Failure::Code);
        assert!(l.locked_for("kate", Source::Unknown).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(l.locked_for("kate", Source::Unknown), None);
    }
}
