//! Wall-clock time as the host stores it.
//!
//! Due times, receive times and retention cut-offs are milliseconds since
//! the Unix epoch, because they are written to disk (or to a stream) and
//! must mean the same after a restart or on another host. One function, so
//! that every module reads the same clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the system clock is before it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
