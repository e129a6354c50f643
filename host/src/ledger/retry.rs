//! How long a failed delivery waits before its next attempt, and when it stops trying.
//!
//! Backoff is exponential with jitter. Jitter matters here because failures come in bursts:
//! when a firewall goes down, every lane of every plugin that talks to it fails within the same
//! second, and without jitter they would all come back in the same second too, again and again.
//! The default is decorrelated jitter, which spreads retries as well as full jitter does but never
//! waits less than `initial`, so a plugin that fails fast cannot spin.

use std::time::Duration;

use rand::Rng;

use crate::clock::doubled;

/// How the backoff delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Jitter {
    /// The exact exponential ceiling `initial * 2^(failures-1)`, capped at `max_delay`.
    /// Predictable, so tests and demos use it; bursts of failures retry in lockstep.
    None,
    /// Uniform between zero and the exponential ceiling.
    Full,
    /// Uniform between `initial` and three times the previous delay, capped at `max_delay`
    /// ("decorrelated jitter"); the previous delay is kept in the delivery record.
    Decorrelated,
}

/// When and how often a failed delivery is tried again before it becomes a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure (before jitter).
    pub initial: Duration,
    /// No backoff delay exceeds this; a plugin may still ask for a longer one.
    pub max_delay: Duration,
    /// A delivery that has failed this many times is dead.
    pub max_attempts: u32,
    /// A delivery still failing this long after its first failure is dead.
    pub max_age: Duration,
    /// How the delay is randomised.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(5 * 60),
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 60 * 60),
            jitter: Jitter::Decorrelated,
        }
    }
}

impl RetryPolicy {
    /// The exponential ceiling after `failures` failures (1-based): `initial * 2^(failures-1)`,
    /// never above `max_delay`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        doubled(self.initial, failures.saturating_sub(1), self.max_delay)
    }

    /// The delay before the next attempt after `failures` failures; `previous` is the delay
    /// chosen after the failure before (decorrelated jitter grows from it).
    pub fn backoff(
        &self,
        failures: u32,
        previous: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        match self.jitter {
            Jitter::None => self.ceiling(failures),
            Jitter::Full => uniform(rng, Duration::ZERO, self.ceiling(failures)),
            Jitter::Decorrelated => {
                let floor = self.initial.min(self.max_delay);
                let grown = previous
                    .unwrap_or(self.initial)
                    .saturating_mul(3)
                    .clamp(floor, self.max_delay);
                uniform(rng, floor, grown)
            }
        }
    }

    /// When a failed delivery is next due: after `backoff`, or after the
    /// delay the plugin asked for when that is longer, but never beyond
    /// `max_age` after its `first_ms` failure, past which it is given up
    /// anyway (held longer, it would hold its VM's later events with it).
    /// A plugin may ask for `u64::MAX` ms: that must neither overflow the
    /// clock nor park the event for ever.
    pub fn due_at_ms(
        &self,
        now_ms: u64,
        first_ms: u64,
        backoff: Duration,
        asked: Option<Duration>,
    ) -> u64 {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let wait = backoff.max(asked.unwrap_or_default());
        let last_chance = first_ms.min(now_ms).saturating_add(ms(self.max_age));
        now_ms.saturating_add(ms(wait)).min(last_chance.max(now_ms))
    }
}

/// Uniform in `low..=high` at millisecond resolution, which is what due times are kept in.
fn uniform(rng: &mut impl Rng, low: Duration, high: Duration) -> Duration {
    let (low, high) = (low.as_millis() as u64, high.as_millis() as u64);
    if high <= low {
        return Duration::from_millis(low);
    }
    Duration::from_millis(rng.random_range(low..=high))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn a_plugin_may_delay_a_retry_beyond_the_backoff_but_not_beyond_max_age() {
        let p = RetryPolicy::default();
        let backoff = Duration::from_secs(1);
        assert_eq!(p.due_at_ms(1_000, 1_000, backoff, None), 2_000);
        assert_eq!(
            p.due_at_ms(1_000, 1_000, backoff, Some(Duration::from_secs(60))),
            61_000
        );
        let forever = Duration::from_millis(u64::MAX);
        let max_age = p.max_age.as_millis() as u64;
        assert_eq!(
            p.due_at_ms(1_000, 1_000, backoff, Some(forever)),
            1_000 + max_age
        );
        assert_eq!(
            p.due_at_ms(u64::MAX - 1, u64::MAX - 1, backoff, None),
            u64::MAX
        );
        // Counted from the first failure: late in its life a delivery is
        // not held past its max_age by a long delay.
        let late = max_age - 3_600_000;
        assert_eq!(
            p.due_at_ms(late, 0, backoff, Some(Duration::from_secs(20 * 3600))),
            max_age
        );
        // A first failure stamped ahead of now (a clock stepped back) counts
        // from now.
        assert_eq!(p.due_at_ms(1_000, 9_999_999_999, backoff, None), 2_000);
    }

    #[test]
    fn without_jitter_the_delay_doubles_until_the_cap() {
        let p = policy(Jitter::None);
        let mut rng = rand::rng();
        let delays: Vec<u64> = (1..=8)
            .map(|n| p.backoff(n, None, &mut rng).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.backoff(u32::MAX, None, &mut rng), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        let p = policy(Jitter::Full);
        let mut rng = rand::rng();
        for failures in 1..=10 {
            for _ in 0..100 {
                assert!(p.backoff(failures, None, &mut rng) <= p.ceiling(failures));
            }
        }
    }

    #[test]
    fn decorrelated_jitter_never_waits_less_than_initial_nor_more_than_the_cap() {
        let p = policy(Jitter::Decorrelated);
        let mut rng = rand::rng();
        let mut previous = None;
        let mut longest = Duration::ZERO;
        for failures in 1..=200 {
            let d = p.backoff(failures, previous, &mut rng);
            assert!(d >= p.initial && d <= p.max_delay, "{d:?}");
            if let Some(prev) = previous {
                assert!(d <= prev * 3, "{d:?} after {prev:?}");
            }
            longest = longest.max(d);
            previous = Some(d);
        }
        // It does grow: over 200 draws it reaches far beyond the first delay.
        assert!(longest >= Duration::from_secs(20), "{longest:?}");
    }
}
