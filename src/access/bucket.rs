//! A token bucket: `burst` tokens at most, refilled at `rate` per second. Pure: the
//! caller passes the time, so tests need no clock.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refill {
    pub per_second: f64,
    pub burst: f64,
}

impl TokenBucket {
    pub fn full(refill: Refill, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: refill.burst,
            updated: now,
        }
    }

    fn refill(&mut self, refill: Refill, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * refill.per_second).min(refill.burst);
        self.updated = now.max(self.updated);
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, refill: Refill, now: Instant) -> bool {
        self.refill(refill, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the bucket holds a token (zero if it holds one now).
    pub fn time_to_token(&self, refill: Refill, now: Instant) -> Duration {
        let mut copy = *self;
        copy.refill(refill, now);
        let missing = (1.0 - copy.tokens).max(0.0);
        Duration::from_secs_f64(missing / refill.per_second)
    }

    /// Gives a token back (a login that succeeded), never above `burst`.
    pub fn give_back(&mut self, refill: Refill) {
        self.tokens = (self.tokens + 1.0).min(refill.burst);
    }

    /// Whether the bucket has refilled completely: it then says nothing a new one would
    /// not, and may be forgotten.
    pub fn is_full(&self, refill: Refill, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(refill, now);
        copy.tokens >= refill.burst
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const REFILL: Refill = Refill {
        per_second: 2.0,
        burst: 3.0,
    };

    #[test]
    fn burst_then_rate() {
        use std::time::Duration;
        let start = Instant::now();
        let mut bucket = TokenBucket::full(REFILL, start);
        assert!((0..3).all(|_| bucket.try_take(REFILL, start)), "the burst");
        assert!(!bucket.try_take(REFILL, start), "empty");
        assert_eq!(bucket.time_to_token(REFILL, start), Duration::from_millis(500));
        assert_eq!(
            bucket.time_to_token(REFILL, start + Duration::from_millis(200)),
            Duration::from_millis(300)
        );
        // Two tokens a second: one after half a second, not before.
        assert!(!bucket.try_take(REFILL, start + Duration::from_millis(400)));
        assert!(bucket.try_take(REFILL, start + Duration::from_millis(500)));
        assert!(!bucket.try_take(REFILL, start + Duration::from_millis(500)));
        // A long quiet time refills up to the burst, no further.
        let later = start + Duration::from_secs(60);
        assert!(bucket.is_full(REFILL, later));
        assert!((0..3).all(|_| bucket.try_take(REFILL, later)));
        assert!(!bucket.try_take(REFILL, later));
    }

    #[test]
    fn tokens_given_back_are_capped_at_the_burst() {
        let now = Instant::now();
        let mut bucket = TokenBucket::full(REFILL, now);
        assert!(bucket.try_take(REFILL, now));
        bucket.give_back(REFILL);
        bucket.give_back(REFILL);
        assert!(bucket.is_full(REFILL, now));
        assert!((0..3).all(|_| bucket.try_take(REFILL, now)));
        assert!(!bucket.try_take(REFILL, now));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let now = Instant::now();
        let mut bucket = TokenBucket::full(REFILL, now + Duration::from_secs(1));
        assert!((0..3).all(|_| bucket.try_take(REFILL, now + Duration::from_secs(1))));
        assert!(!bucket.try_take(REFILL, now));
    }
}
