//! Per-peer request budgets (token buckets): a member that floods a node with requests is
//! answered "busy" beyond its budget, so it cannot crowd out the others.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// A request budget: `per_sec` sustained, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_sec: f64,
    /// Requests at once after a quiet spell.
    pub burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One bucket per peer. Kept across reconnections (reconnecting must not refill a
/// budget); only roster members connect, so the map stays small.
#[derive(Debug)]
pub struct PeerBudgets {
    limit: RateLimit,
    buckets: HashMap<PeerId, Bucket>,
}

impl PeerBudgets {
    /// Budgets of `limit` each; every peer starts with a full burst.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Spends one request of `peer`'s budget at `now`; when it is spent, says how long
    /// until the next request fits.
    pub fn admit(&mut self, peer: PeerId, now: Instant) -> Result<(), Duration> {
        let limit = self.limit;
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: limit.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_sec).min(limit.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limit = RateLimit {
            per_sec: 10.0,
            burst: 5.0,
        };
        let mut budgets = PeerBudgets::new(limit);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(budgets.admit(a, t0).is_ok());
        }
        let wait = budgets.admit(a, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // Another peer has its own budget.
        assert!(budgets.admit(b, t0).is_ok());
        // 100 ms later one more request fits, and not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(budgets.admit(a, t1).is_ok());
        assert!(budgets.admit(a, t1).is_err());
        // A long quiet spell refills the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(budgets.admit(a, t2).is_ok());
        }
        assert!(budgets.admit(a, t2).is_err());
    }
}
