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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary_and_marked() {
        assert_eq!(truncate("short".into(), 10), "short");
        assert_eq!(truncate("ééé".into(), 3), "é…");
        assert_eq!(truncate("abcdef".into(), 3), "abc…");
    }
}
