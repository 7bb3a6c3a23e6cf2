//! Login rate limiting (`[server.login_rate]`): a token bucket per client IP address and
//! per user name on login attempts, a growing delay after each failed password from an
//! address, then a ban of that address; and at most one log line per address per interval.
//!
//! A login that succeeds gives its tokens back, so the buckets count failed and unfinished
//! attempts: an application that opens many connections at once with the right password is
//! not slowed, while a password guesser or a deployment with a stale password is.
//!
//! Memory is bounded: each table holds at most [`TABLE_CAPACITY`] entries, an entry that
//! says nothing a fresh one would not (full bucket, no failures, no ban) is forgotten when
//! room is needed, and while a table is full of live entries the names and addresses not in
//! it share one extra entry, so a flood from many addresses is limited as one.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::bucket::{Refill, TokenBucket};
use crate::config::LoginRateConfig;

/// Most addresses, and most user names, remembered at once.
pub const TABLE_CAPACITY: usize = 65_536;
/// A full table is swept for forgettable entries at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The delay after a failed password never grows beyond this.
const MAX_FAILED_DELAY: Duration = Duration::from_secs(10);
/// Refusals of one address are logged at most once per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a login attempt was refused before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The address's bucket is empty; it has a token again after this long.
    AddressRate(Duration),
    /// The user name's bucket is empty; it has a token again after this long.
    UserRate(Duration),
    /// The address failed too often; banned for this much longer.
    Banned(Duration),
}

/// An admitted attempt: its tokens, given back if it succeeds.
#[derive(Debug)]
#[must_use = "report how the attempt ended"]
pub struct Attempt {
    ip: IpAddr,
    user: String,
    took_tokens: bool,
}

#[derive(Debug, Clone)]
struct AddressEntry {
    bucket: TokenBucket,
    failures: u32,
    last_failure: Option<Instant>,
    banned_until: Option<Instant>,
    last_log: Option<Instant>,
    /// Refusals not logged since `last_log`.
    unlogged: u32,
}

impl AddressEntry {
    fn new(refill: Refill, now: Instant) -> Self {
        AddressEntry {
            bucket: TokenBucket::full(refill, now),
            failures: 0,
            last_failure: None,
            banned_until: None,
            last_log: None,
            unlogged: 0,
        }
    }

    /// Failures older than ban_duration are forgotten.
    fn forget_old_failures(&mut self, config: &LoginRateConfig, now: Instant) {
        if self
            .last_failure
            .is_some_and(|last| now.saturating_duration_since(last) >= config.ban_duration)
        {
            self.failures = 0;
            self.last_failure = None;
        }
        if self.banned_until.is_some_and(|until| until <= now) {
            self.banned_until = None;
        }
    }

    fn forgettable(&mut self, config: &LoginRateConfig, refill: Refill, now: Instant) -> bool {
        self.forget_old_failures(config, now);
        self.bucket.is_full(refill, now)
            && self.failures == 0
            && self.banned_until.is_none()
            && self
                .last_log
                .is_none_or(|last| now.saturating_duration_since(last) >= LOG_INTERVAL)
    }
}

/// At most `capacity` entries, then one shared by everything else.
#[derive(Debug)]
struct Table<K, V> {
    entries: HashMap<K, V>,
    overflow: Option<V>,
    last_sweep: Option<Instant>,
    capacity: usize,
}

impl<K: Hash + Eq, V> Table<K, V> {
    fn new(capacity: usize) -> Self {
        Table {
            entries: HashMap::new(),
            overflow: None,
            last_sweep: None,
            capacity,
        }
    }

    /// The entry of `key`, made if there is room (after forgetting entries `forgettable`
    /// says may go), else the shared one.
    fn entry(
        &mut self,
        key: K,
        now: Instant,
        make: impl Fn() -> V,
        mut forgettable: impl FnMut(&mut V) -> bool,
    ) -> &mut V {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let swept_lately = self
                .last_sweep
                .is_some_and(|last| now.saturating_duration_since(last) < SWEEP_INTERVAL);
            if !swept_lately {
                self.entries.retain(|_, entry| !forgettable(entry));
                self.last_sweep = Some(now);
            }
            if self.entries.len() >= self.capacity {
                return self.overflow.get_or_insert_with(make);
            }
        }
        self.entries.entry(key).or_insert_with(make)
    }
}

/// The state of every address and user name that tried to log in lately.
#[derive(Debug)]
pub struct LoginRate {
    addresses: Mutex<Table<IpAddr, AddressEntry>>,
    users: Mutex<Table<String, TokenBucket>>,
}

impl Default for LoginRate {
    fn default() -> Self {
        LoginRate::with_capacity(TABLE_CAPACITY)
    }
}

fn refill(config: &LoginRateConfig) -> Option<Refill> {
    (config.attempts_per_second > 0).then(|| Refill {
        per_second: f64::from(config.attempts_per_second),
        burst: f64::from(config.burst.max(1)),
    })
}

/// Stands in for the buckets when rate limiting is off; never consulted then.
const UNLIMITED: Refill = Refill {
    per_second: f64::MAX,
    burst: f64::MAX,
};

impl LoginRate {
    pub fn with_capacity(capacity: usize) -> Self {
        LoginRate {
            addresses: Mutex::new(Table::new(capacity)),
            users: Mutex::new(Table::new(capacity)),
        }
    }

    /// Admits a login attempt from `ip` as `user`, or says why not. Cheap: a hash look-up
    /// or two under short locks, before any authentication work.
    pub fn admit(&self, config: &LoginRateConfig, ip: IpAddr, user: &str, now: Instant) -> Result<Attempt, Refused> {
        let refill = refill(config);
        let bucket_refill = refill.unwrap_or(UNLIMITED);
        let mut addresses = self.addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = addresses.entry(
            ip,
            now,
            || AddressEntry::new(bucket_refill, now),
            |entry| entry.forgettable(config, bucket_refill, now),
        );
        entry.forget_old_failures(config, now);
        if let Some(until) = entry.banned_until {
            return Err(Refused::Banned(until.saturating_duration_since(now)));
        }
        let Some(refill) = refill else {
            return Ok(Attempt {
                ip,
                user: user.to_owned(),
                took_tokens: false,
            });
        };
        if !entry.bucket.try_take(refill, now) {
            return Err(Refused::AddressRate(entry.bucket.time_to_token(refill, now)));
        }
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = users.entry(
            user.to_owned(),
            now,
            || TokenBucket::full(refill, now),
            |bucket| bucket.is_full(refill, now),
        );
        if !bucket.try_take(refill, now) {
            entry.bucket.give_back(refill);
            return Err(Refused::UserRate(bucket.time_to_token(refill, now)));
        }
        Ok(Attempt {
            ip,
            user: user.to_owned(),
            took_tokens: true,
        })
    }

    /// The attempt logged in: its tokens go back.
    pub fn succeeded(&self, config: &LoginRateConfig, attempt: Attempt) {
        let Some(refill) = refill(config).filter(|_| attempt.took_tokens) else {
            return;
        };
        if let Some(entry) = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .get_mut(&attempt.ip)
        {
            entry.bucket.give_back(refill);
        }
        if let Some(bucket) = self
            .users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .get_mut(&attempt.user)
        {
            bucket.give_back(refill);
        }
    }

    /// A wrong password from `ip`: counts it, bans the address once it has failed
    /// `ban_after` times, and returns how long to wait before answering.
    pub fn failed(&self, config: &LoginRateConfig, ip: IpAddr, now: Instant) -> Duration {
        let bucket_refill = refill(config).unwrap_or(UNLIMITED);
        let mut addresses = self.addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = addresses.entry(
            ip,
            now,
            || AddressEntry::new(bucket_refill, now),
            |entry| entry.forgettable(config, bucket_refill, now),
        );
        entry.forget_old_failures(config, now);
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = Some(now);
        let failures = entry.failures;
        if config.ban_after > 0 && failures >= config.ban_after {
            entry.banned_until = Some(now + config.ban_duration);
            entry.failures = 0;
        }
        config.failed_delay.map_or(Duration::ZERO, |delay| {
            delay.saturating_mul(failures).min(MAX_FAILED_DELAY)
        })
    }

    /// Whether a refusal of `ip` may be logged now; `Some(n)`: yes, and `n` refusals were
    /// not logged since the last line.
    pub fn may_log(&self, config: &LoginRateConfig, ip: IpAddr, now: Instant) -> Option<u32> {
        let bucket_refill = refill(config).unwrap_or(UNLIMITED);
        let mut addresses = self.addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = addresses.entry(
            ip,
            now,
            || AddressEntry::new(bucket_refill, now),
            |entry| entry.forgettable(config, bucket_refill, now),
        );
        match entry.last_log {
            Some(last) if now.saturating_duration_since(last) < LOG_INTERVAL => {
                entry.unlogged = entry.unlogged.saturating_add(1);
                None
            }
            _ => {
                entry.last_log = Some(now);
                Some(std::mem::take(&mut entry.unlogged))
            }
        }
    }

    /// Addresses banned right now, and addresses remembered.
    pub fn addresses(&self, now: Instant) -> (usize, usize) {
        let addresses = self.addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let banned = addresses
            .entries
            .values()
            .chain(addresses.overflow.iter())
            .filter(|entry| entry.banned_until.is_some_and(|until| until > now))
            .count();
        (banned, addresses.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoginRateConfig {
        LoginRateConfig {
            attempts_per_second: 1,
            burst: 2,
            failed_delay: Some(Duration::from_millis(100)),
            ban_after: 3,
            ban_duration: Duration::from_secs(60),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_address_and_each_user_has_a_bucket() {
        let rate = LoginRate::default();
        let config = config();
        let now = Instant::now();
        let a = rate.admit(&config, ip("10.0.0.1"), "app", now).unwrap();
        let _b = rate.admit(&config, ip("10.0.0.1"), "other", now).unwrap();
        assert_eq!(
            rate.admit(&config, ip("10.0.0.1"), "third", now).map(|_| ()),
            Err(Refused::AddressRate(Duration::from_secs(1)))
        );
        // Another address has its own bucket, but user "app" has one token left.
        let _c = rate.admit(&config, ip("10.0.0.2"), "app", now).unwrap();
        assert_eq!(
            rate.admit(&config, ip("10.0.0.3"), "app", now).map(|_| ()),
            Err(Refused::UserRate(Duration::from_secs(1)))
        );
        // The refused user attempt did not cost 10.0.0.3 its token.
        let _d = rate.admit(&config, ip("10.0.0.3"), "x", now).unwrap();
        let _e = rate.admit(&config, ip("10.0.0.3"), "y", now).unwrap();
        // A login that succeeds gives its tokens back.
        rate.succeeded(&config, a);
        let _f = rate.admit(&config, ip("10.0.0.1"), "app", now).unwrap();
        // Time refills.
        let later = now + Duration::from_secs(1);
        let _g = rate.admit(&config, ip("10.0.0.1"), "z", later).unwrap();
    }

    #[test]
    fn failures_grow_the_delay_then_ban_the_address() {
        let rate = LoginRate::default();
        let config = LoginRateConfig {
            attempts_per_second: 0,
            ..config()
        };
        let now = Instant::now();
        let attacker = ip("10.0.0.9");
        assert_eq!(rate.failed(&config, attacker, now), Duration::from_millis(100));
        assert_eq!(rate.failed(&config, attacker, now), Duration::from_millis(200));
        assert!(rate.admit(&config, attacker, "app", now).is_ok(), "not banned yet");
        assert_eq!(rate.failed(&config, attacker, now), Duration::from_millis(300));
        assert_eq!(
            rate.admit(&config, attacker, "app", now + Duration::from_secs(10))
                .map(|_| ()),
            Err(Refused::Banned(Duration::from_secs(50)))
        );
        assert!(
            rate.admit(&config, ip("10.0.0.8"), "app", now).is_ok(),
            "others are not banned"
        );
        assert_eq!(rate.addresses(now), (1, 2));
        // The ban ends, and the count starts again.
        let after = now + Duration::from_secs(60);
        assert!(rate.admit(&config, attacker, "app", after).is_ok());
        assert_eq!(rate.failed(&config, attacker, after), Duration::from_millis(100));
    }

    #[test]
    fn the_delay_is_capped_and_can_be_off() {
        let rate = LoginRate::default();
        let mut config = LoginRateConfig {
            failed_delay: Some(Duration::from_secs(3)),
            ban_after: 0,
            ..config()
        };
        let now = Instant::now();
        let ip = ip("10.0.0.1");
        let delays: Vec<Duration> = (0..5).map(|_| rate.failed(&config, ip, now)).collect();
        assert_eq!(delays[0], Duration::from_secs(3));
        assert_eq!(delays[4], MAX_FAILED_DELAY);
        assert!(
            rate.admit(&config, ip, "app", now).is_ok(),
            "ban_after = 0: never banned"
        );
        config.failed_delay = None;
        assert_eq!(rate.failed(&config, ip, now), Duration::ZERO);
    }

    #[test]
    fn tables_are_bounded_and_the_rest_share_one_entry() {
        let rate = LoginRate::with_capacity(2);
        let config = LoginRateConfig {
            ban_after: 1,
            ..config()
        };
        let now = Instant::now();
        rate.failed(&config, ip("10.0.0.1"), now);
        rate.failed(&config, ip("10.0.0.2"), now);
        assert_eq!(rate.addresses(now), (2, 2));
        // Full of live entries: a third address lands in the shared entry...
        rate.failed(&config, ip("10.0.0.3"), now);
        assert_eq!(rate.addresses(now), (3, 2));
        // ...which every other address then shares, ban included.
        assert_eq!(
            rate.admit(&config, ip("10.0.0.4"), "app", now).map(|_| ()),
            Err(Refused::Banned(Duration::from_secs(60)))
        );
        // Once the bans are over and the buckets full, entries are forgotten for new ones.
        let later = now + Duration::from_secs(120);
        assert!(rate.admit(&config, ip("10.0.0.5"), "app", later).is_ok());
        assert_eq!(rate.addresses(later), (0, 1));
    }

    #[test]
    fn refusals_are_logged_once_per_interval_per_address() {
        let rate = LoginRate::default();
        let config = config();
        let now = Instant::now();
        let ip = ip("10.0.0.1");
        assert_eq!(rate.may_log(&config, ip, now), Some(0));
        assert_eq!(rate.may_log(&config, ip, now + Duration::from_secs(1)), None);
        assert_eq!(rate.may_log(&config, ip, now + Duration::from_secs(2)), None);
        assert_eq!(rate.may_log(&config, ip, now + LOG_INTERVAL), Some(2));
    }
}
