//! Terminal decisions shared by every cvdist binary.

use std::io::IsTerminal;

/// Whether log lines written to stderr may carry ANSI colour codes: only when stderr is a
/// terminal, and never when `NO_COLOR` is set to a non-empty value (https://no-color.org).
/// Files and pipes (`2> log`, `| tee`) therefore always get plain text.
pub fn stderr_color() -> bool {
    color_allowed(std::env::var_os("NO_COLOR").as_deref(), std::io::stderr().is_terminal())
}

/// The rule behind [`stderr_color`], separated so it can be tested without a terminal.
pub fn color_allowed(no_color: Option<&std::ffi::OsStr>, is_terminal: bool) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(color_allowed(None, true));
        assert!(!color_allowed(None, false));
        assert!(!color_allowed(Some(OsStr::new("1")), true));
        // The spec says an empty NO_COLOR does not count.
        assert!(color_allowed(Some(OsStr::new("")), true));
    }
}
