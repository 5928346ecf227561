//! Per-source token buckets for company-passcode failures: a client that
//! keeps guessing is slowed to a trickle (RESOURCE_EXHAUSTED) long before it
//! can burn a site's failed-attempt limit, while every other source is
//! unaffected. Only failures spend tokens, so an office behind one NAT can
//! still enroll many devices.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually holds a
//! whole /64, so its addresses share one budget; a v4-mapped IPv6 address is
//! its IPv4 address). At most [`MAX_TRACKED_SOURCES`] buckets are kept. Only
//! buckets that have refilled are ever forgotten, since forgetting one
//! changes nothing; while the table is full of buckets that are still
//! spending, sources without a bucket share one overflow bucket. A flood from
//! very many sources thus slows every new source for a while, rather than
//! handing a throttled one a fresh budget.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most (about 64 bytes each).
pub const MAX_TRACKED_SOURCES: usize = 65_536;

/// Refilled buckets are looked for at most this often, so a full table costs
/// one pass over it per interval, not one per failure.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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

/// The key a source's failures are counted under.
pub fn source_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    /// Shared by the sources that found the table full.
    overflow: Bucket,
    next_sweep: Instant,
}

#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    capacity: usize,
    table: Mutex<Table>,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self::with_capacity(config, MAX_TRACKED_SOURCES)
    }

    fn with_capacity(config: ThrottleConfig, capacity: usize) -> Self {
        let now = Instant::now();
        Self {
            config,
            capacity,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket {
                    tokens: f64::from(config.burst),
                    updated: now,
                },
                next_sweep: now,
            }),
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

    /// Whether the table has room for one more bucket, after forgetting the
    /// refilled ones if it is full and a pass is due.
    fn has_room(&self, table: &mut Table, now: Instant) -> bool {
        if table.buckets.len() >= self.capacity && now >= table.next_sweep {
            let burst = f64::from(self.config.burst);
            table
                .buckets
                .retain(|_, bucket| self.refilled(*bucket, now).tokens < burst);
            let interval = self.config.refill_every.max(MIN_SWEEP_INTERVAL);
            table.next_sweep = now.checked_add(interval).unwrap_or(now);
        }
        table.buckets.len() < self.capacity
    }

    /// Whether `source` may make another attempt now.
    pub fn allows(&self, source: IpAddr) -> bool {
        self.allows_at(source_key(source), Instant::now())
    }

    fn allows_at(&self, key: IpAddr, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = match table.buckets.get(&key).copied() {
            Some(bucket) => bucket,
            None if self.has_room(&mut table, now) => return true,
            None => table.overflow,
        };
        self.refilled(bucket, now).tokens >= 1.0
    }

    /// Spends one token of `source` for a failed attempt.
    pub fn record_failure(&self, source: IpAddr) {
        self.record_failure_at(source_key(source), Instant::now());
    }

    fn record_failure_at(&self, key: IpAddr, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let table = &mut *table;
        let full = Bucket {
            tokens: f64::from(self.config.burst),
            updated: now,
        };
        let bucket = if table.buckets.contains_key(&key) || self.has_room(table, now) {
            table.buckets.entry(key).or_insert(full)
        } else {
            &mut table.overflow
        };
        let mut refilled = self.refilled(*bucket, now);
        refilled.tokens = (refilled.tokens - 1.0).max(0.0);
        *bucket = refilled;
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    /// The `n`-th of many distinct IPv4 sources.
    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + n))
    }

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
        let start = Instant::now();
        throttle.record_failure_at(source_key(source), start);
        assert!(!throttle.allows_at(source_key(source), start));
        assert!(throttle.allows_at(source_key(source), start + Duration::from_millis(40)));
    }

    #[test]
    fn addresses_of_one_ipv6_64_share_a_bucket_and_v4_mapped_is_the_v4_address() {
        let throttle = Throttle::new(ThrottleConfig {
            burst: 2,
            refill_every: Duration::from_secs(3600),
        });
        throttle.record_failure(ip("2001:db8:1:2::1"));
        throttle.record_failure(ip("2001:db8:1:2:ffff:ffff:ffff:fffe"));
        assert!(!throttle.allows(ip("2001:db8:1:2:abcd::7")), "same /64");
        assert!(throttle.allows(ip("2001:db8:1:3::1")), "the next /64");

        throttle.record_failure(ip("::ffff:192.0.2.7"));
        throttle.record_failure(ip("192.0.2.7"));
        assert!(!throttle.allows(ip("192.0.2.7")));
        assert!(!throttle.allows(ip("::ffff:192.0.2.7")));
        assert!(throttle.allows(ip("192.0.2.8")));
        assert_eq!(throttle.tracked(), 2);
    }

    #[test]
    fn a_million_sources_leave_the_table_under_its_cap() {
        let throttle = Throttle::new(ThrottleConfig::default());
        let now = Instant::now();
        for n in 0..1_000_000 {
            throttle.allows_at(v4(n), now);
            throttle.record_failure_at(v4(n), now);
        }
        assert_eq!(throttle.tracked(), MAX_TRACKED_SOURCES);
        // The same from IPv6: a million /64s.
        let throttle = Throttle::new(ThrottleConfig::default());
        for n in 0..1_000_000u128 {
            let source = IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8 << 96) | (n << 64) | 1));
            throttle.record_failure_at(source_key(source), now);
        }
        assert_eq!(throttle.tracked(), MAX_TRACKED_SOURCES);
    }

    #[test]
    fn flooding_from_other_sources_never_gives_a_throttled_source_a_fresh_bucket() {
        let config = ThrottleConfig {
            burst: 3,
            refill_every: Duration::from_secs(3600),
        };
        let throttle = Throttle::with_capacity(config, 100);
        let guesser = ip("203.0.113.9");
        let start = Instant::now();
        for _ in 0..3 {
            throttle.record_failure_at(guesser, start);
        }
        // A hundred times more sources than the table holds, one a second for
        // almost three hours: refilled buckets are forgotten, the guesser's
        // never is, so it gets one guess an hour and no more.
        for n in 0..10_000u32 {
            let now = start + Duration::from_secs(u64::from(n));
            throttle.record_failure_at(v4(n), now);
            if throttle.allows_at(guesser, now) {
                throttle.record_failure_at(guesser, now);
            }
            assert!(!throttle.allows_at(guesser, now), "after {n} other sources");
            assert!(throttle.tracked() <= 100);
        }
    }

    #[test]
    fn a_full_table_shares_one_overflow_bucket_until_buckets_refill() {
        let config = ThrottleConfig {
            burst: 2,
            refill_every: Duration::from_secs(6),
        };
        let throttle = Throttle::with_capacity(config, 10);
        let start = Instant::now();
        for n in 0..10 {
            throttle.record_failure_at(v4(n), start);
        }
        // Full of buckets still spending: new sources share the overflow.
        assert!(throttle.allows_at(v4(100), start));
        throttle.record_failure_at(v4(100), start);
        throttle.record_failure_at(v4(101), start);
        assert!(!throttle.allows_at(v4(102), start), "the overflow is spent");
        assert!(
            throttle.allows_at(v4(0), start),
            "tracked sources keep theirs"
        );
        assert_eq!(throttle.tracked(), 10);

        // Once the tracked buckets have refilled they are forgotten, and a new
        // source gets a bucket of its own.
        let later = start + Duration::from_secs(6);
        assert!(throttle.allows_at(v4(102), later));
        throttle.record_failure_at(v4(102), later);
        assert_eq!(throttle.tracked(), 1);
    }
}
