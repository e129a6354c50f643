//! Bounding text that comes from outside (a firewall's error, a plugin's
//! reason) before the host stores or logs it.

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

#[cfg(test)]
mod tests {
    use super::*;

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
