//! Wall-clock time as the host stores it.
//!
//! Due times, receive times and retention cut-offs are milliseconds since
//! the Unix epoch, because they are written to disk (or to a stream) and
//! must mean the same after a restart or on another host. One function, so
//! that every module reads the same clock; and one for how waits grow
//! after failures in a row (retries, quarantines, registrations, loads).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the system clock is before it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `first` doubled `times` times, at most `max`: the wait after `times + 1`
/// failures in a row. Never overflows, whatever `times` is.
pub fn doubled(first: Duration, times: u32, max: Duration) -> Duration {
    first
        .saturating_mul(1u32.checked_shl(times).unwrap_or(u32::MAX))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_doubles_up_to_its_ceiling_and_never_overflows() {
        let (s, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let waits: Vec<u64> = (0..8).map(|n| doubled(s, n, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(doubled(s, u32::MAX, max), max);
        assert_eq!(doubled(Duration::MAX, 3, Duration::MAX), Duration::MAX);
    }
}
