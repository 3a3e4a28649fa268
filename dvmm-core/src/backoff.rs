//! One backoff policy for every layer that waits before trying again: the
//! runner between attempts of a request, and the vSphere client between
//! retries of a call. Exponential, capped, with "equal jitter" (half the
//! delay fixed, half drawn) so that many callers spread out but none
//! retries at once.
//!
//! The randomness comes from a [`Jitter`] source, so tests can fix it.
//!
//! ```
//! use std::time::Duration;
//! use dvmm_core::backoff::{Backoff, FixedJitter};
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
//!     .with_jitter(FixedJitter(1.0));
//! assert_eq!(backoff.delay(1), Duration::from_millis(100));
//! assert_eq!(backoff.delay(2), Duration::from_millis(200));
//! assert_eq!(backoff.delay(10), Duration::from_secs(1));
//! let low = backoff.clone().with_jitter(FixedJitter(0.0));
//! assert_eq!(low.delay(2), Duration::from_millis(100));
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Where a [`Backoff`] draws its randomness from.
pub trait Jitter: Send + Sync {
    /// A number in `[0, 1]`.
    fn unit(&self) -> f64;
}

/// Random jitter from the operating system's generator (through UUID v4).
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn unit(&self) -> f64 {
        // 53 random bits make a uniformly distributed f64 in [0, 1).
        let bits = uuid::Uuid::new_v4().as_u128() as u64 >> 11;
        bits as f64 / (1u64 << 53) as f64
    }
}

/// Always the same jitter (clamped to `[0, 1]`): for tests and for callers
/// that want the delays to be predictable.
#[derive(Clone, Copy, Debug)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn unit(&self) -> f64 {
        if self.0.is_nan() {
            0.0
        } else {
            self.0.clamp(0.0, 1.0)
        }
    }
}

/// Exponential backoff with a cap and equal jitter.
///
/// `delay(n)` for the n-th retry (1-based) is `min(base * 2^(n-1), max)`,
/// of which half is fixed and half scaled by the jitter source.
#[derive(Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Arc<dyn Jitter>,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("base", &self.base)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Default for Backoff {
    /// 1 s doubling up to 60 s, random jitter.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    /// `base` doubling per retry up to `max` (a `max` below `base` is raised
    /// to it), with random jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            jitter: Arc::new(RandomJitter),
        }
    }

    /// The same policy with another jitter source.
    pub fn with_jitter(mut self, jitter: impl Jitter + 'static) -> Self {
        self.jitter = Arc::new(jitter);
        self
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before retry number `retry` (1-based; 0 counts as 1).
    /// Never overflows, whatever the inputs.
    pub fn delay(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(63);
        let full = self
            .base
            .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(self.jitter.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_never_overflows() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
            .with_jitter(FixedJitter(1.0));
        let delays: Vec<_> = (1..=7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.delay(0), Duration::from_millis(200));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
        let huge = Backoff::new(Duration::MAX, Duration::MAX).with_jitter(FixedJitter(1.0));
        assert!(huge.delay(40) > Duration::ZERO);
    }

    #[test]
    fn jitter_spans_the_upper_half() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(2));
        assert_eq!(
            b.clone().with_jitter(FixedJitter(0.0)).delay(1),
            Duration::from_secs(1)
        );
        assert_eq!(
            b.clone().with_jitter(FixedJitter(7.0)).delay(1),
            Duration::from_secs(2)
        );
        for _ in 0..1000 {
            let d = b.delay(1);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
