//! Per-source token buckets for company-passcode failures: a client that
//! keeps guessing is slowed to a trickle (RESOURCE_EXHAUSTED) long before it
//! can burn a site's failed-attempt limit, while every other source is
//! unaffected. Only failures spend tokens, so an office behind one NAT can
//! still enroll many devices.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Beyond this many tracked sources, full buckets are forgotten.
const MAX_TRACKED_SOURCES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures a source may make in a burst.
    pub burst: u32,
    /// One more failure is allowed after each interval.
    pub refill_every: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            burst: 5,
            refill_every: Duration::from_secs(6),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        let rate = 1.0 / self.config.refill_every.as_secs_f64().max(1e-9);
        Bucket {
            tokens: (bucket.tokens + elapsed * rate).min(f64::from(self.config.burst)),
            updated: now,
        }
    }

    /// Whether `source` may make another attempt now.
    pub fn allows(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .get(&source)
            .is_none_or(|bucket| self.refilled(*bucket, now).tokens >= 1.0)
    }

    /// Spends one token of `source` for a failed attempt.
    pub fn record_failure(&self, source: IpAddr) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_SOURCES && !buckets.contains_key(&source) {
            let burst = f64::from(self.config.burst);
            buckets.retain(|_, bucket| self.refilled(*bucket, now).tokens < burst);
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: f64::from(self.config.burst),
            updated: now,
        });
        let mut refilled = self.refilled(*bucket, now);
        refilled.tokens = (refilled.tokens - 1.0).max(0.0);
        *bucket = refilled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_stopped_after_its_burst_and_others_are_not() {
        let throttle = Throttle::new(ThrottleConfig {
            burst: 3,
            refill_every: Duration::from_secs(3600),
        });
        let guesser: IpAddr = "127.0.0.2".parse().expect("ip");
        let other: IpAddr = "127.0.0.3".parse().expect("ip");
        for _ in 0..3 {
            assert!(throttle.allows(guesser));
            throttle.record_failure(guesser);
        }
        assert!(!throttle.allows(guesser));
        assert!(throttle.allows(other));
    }

    #[test]
    fn tokens_come_back_over_time() {
        let throttle = Throttle::new(ThrottleConfig {
            burst: 1,
            refill_every: Duration::from_millis(20),
        });
        let source: IpAddr = "::1".parse().expect("ip");
        throttle.record_failure(source);
        assert!(!throttle.allows(source));
        std::thread::sleep(Duration::from_millis(40));
        assert!(throttle.allows(source));
    }
}
