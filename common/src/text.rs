//! Text that came from another process — a worker's failure report, a job's message, an id
//! in a request, anything the coordinator relays — is bounded in size and made safe for a
//! terminal before it is stored or printed. A peer must not be able to grow a job record
//! without bound, nor reach the user's terminal with escape sequences (`ESC[2K`, `\r`, OSC
//! titles) through `cvdist status` or `cvdist logs`.

use std::borrow::Cow;
use std::fmt::Write;

/// Longest failure text a worker may report; the rest is cut with a marker.
pub const MAX_REPORT_TEXT: usize = 4096;
/// Longest line in a job's event log.
pub const MAX_EVENT_LINE: usize = 4096;
/// Longest value quoted back in an error message (ids, names, addresses).
pub const MAX_QUOTED: usize = 96;
/// Room kept free for the truncation marker.
const MARKER_ROOM: usize = 48;

/// Characters that move the cursor, erase, start escape sequences, or reorder text on a
/// terminal: the C0/C1 controls (`char::is_control`) plus line separators and the Unicode
/// bidirectional overrides and isolates.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as a visible escape (`\n`, `\r`, `\t`,
/// `\u{1b}`), so the text shows what was sent without acting on the terminal.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes (on a character boundary) with a marker saying how much
/// was dropped. `max` below the marker's room is raised to it.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    let max = max.max(MARKER_ROOM * 2);
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut cut = max - MARKER_ROOM;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}… [{} more bytes truncated]", &s[..cut], s.len() - cut))
}

/// Escaped, then bounded: what to store for text a peer sent. Only the first `max` bytes
/// are escaped (escaping never shortens text), so a huge report costs little; a cut text
/// ends with a marker giving the original length.
pub fn bound(s: &str, max: usize) -> String {
    let max = max.max(MARKER_ROOM * 2);
    let mut head = max.min(s.len());
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let shown = printable(&s[..head]);
    if head == s.len() && shown.len() <= max {
        return shown.into_owned();
    }
    let mut cut = max - MARKER_ROOM;
    while !shown.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… [truncated; {} bytes in all]", &shown[..cut], s.len())
}

/// A peer-supplied value for an error message: escaped, bounded and in quotes.
pub fn quoted(s: &str) -> String {
    format!("\"{}\"", bound(s, MAX_QUOTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_terminal_sequences() {
        let evil = "a\u{1b}[2K\rb\u{1b}]0;title\u{7}c\u{202e}d";
        let shown = printable(evil);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(shown, "a\\u{1b}[2K\\rb\\u{1b}]0;title\\u{7}c\\u{202e}d");
        assert!(matches!(printable("plain text"), Cow::Borrowed(_)));
    }

    #[test]
    fn truncates_on_char_boundaries_with_a_marker() {
        let long = "é".repeat(10_000);
        let cut = truncate(&long, 1000);
        assert!(cut.len() <= 1000, "{}", cut.len());
        assert!(cut.contains("more bytes truncated]"));
        assert_eq!(truncate("short", 1000), "short");
        let b = bound(&"\u{1b}".repeat(100_000), MAX_REPORT_TEXT);
        assert!(b.len() <= MAX_REPORT_TEXT && !b.chars().any(is_unsafe), "{}", b.len());
        assert!(b.ends_with("[truncated; 100000 bytes in all]"), "{b}");
        // Escaping alone can push a short text over the bound.
        let b = bound(&"\u{1b}".repeat(1000), 1000);
        assert!(b.len() <= 1000 && b.ends_with("[truncated; 1000 bytes in all]"), "{b}");
        assert_eq!(bound("fine", 1000), "fine");
    }
}
