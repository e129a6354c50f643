//! Bounding text that comes from outside (a firewall's error, a plugin's
//! reason) before the host stores or logs it, and how many lines about
//! peers it logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `text` cut to at most `max` bytes at a character boundary, ending in `…`
/// when it was cut.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors repeat their source's text in their own.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `text` on one line, as a log line or a terminal shows it: line breaks
/// and other control characters (an escape sequence a terminal would obey)
/// written as escapes, so that text from a plugin or a peer cannot forge
/// lines of the host's log or drive the operator's terminal. Tabs stay.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Lets at most `burst` log lines of one kind through per `window` and
/// counts the rest, so that peers who are refused before they authenticate
/// cannot fill the host's log or its disk (the metrics still count every
/// refusal).
#[derive(Debug)]
pub struct LogThrottle {
    burst: u32,
    window: Duration,
    state: Mutex<Throttled>,
}

#[derive(Debug)]
struct Throttled {
    window_start: Instant,
    logged: u32,
    held_back: u64,
}

impl LogThrottle {
    pub fn new(burst: u32, window: Duration) -> LogThrottle {
        LogThrottle {
            burst,
            window,
            state: Mutex::new(Throttled {
                window_start: Instant::now(),
                logged: 0,
                held_back: 0,
            }),
        }
    }

    /// Whether to log this line: if so, how many were held back since the
    /// last one logged, for the line to say.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().expect("log throttle lock");
        if now.saturating_duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.logged = 0;
        }
        if s.logged < self.burst {
            s.logged += 1;
            Some(std::mem::take(&mut s.held_back))
        } else {
            s.held_back += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_log_lets_a_burst_through_per_window_and_counts_what_it_held_back() {
        let t = LogThrottle::new(2, Duration::from_secs(60));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(t.admit_at(at(0)), Some(0));
        assert_eq!(t.admit_at(at(1)), Some(0));
        for s in 2..7 {
            assert_eq!(t.admit_at(at(s)), None, "second {s}");
        }
        // A new window: the first line says how many were held back.
        assert_eq!(t.admit_at(at(61)), Some(5));
        assert_eq!(t.admit_at(at(62)), Some(0));
        assert_eq!(t.admit_at(at(63)), None);
    }

    #[test]
    fn control_characters_are_written_as_escapes_on_one_line() {
        assert_eq!(one_line("plain\ttext é"), "plain\ttext é");
        assert_eq!(
            one_line("ok\n2025-01-01T00:00:00Z  WARN forged\r\u{1b}[2J\u{7}"),
            "ok\\n2025-01-01T00:00:00Z  WARN forged\\r\\u{1b}[2J\\u{7}"
        );
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_and_marked() {
        assert_eq!(truncate("short".into(), 10), "short");
        assert_eq!(truncate("ééé".into(), 3), "é…");
        assert_eq!(truncate("abcdef".into(), 3), "abc…");
    }
}
