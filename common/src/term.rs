//! Terminal decisions shared by every cvdist binary.

use std::io::IsTerminal;

/// Whether log lines written to stderr may carry ANSI colour codes: only when stderr is a
/// terminal, and never when `NO_COLOR` is set to a non-empty value (https://no-color.org).
/// Files and pipes (`2> log`, `| tee`) therefore always get plain text.
pub fn stderr_color() -> bool {
    color_allowed(std::env::var_os("NO_COLOR").as_deref(), std::io::stderr().is_terminal())
}

/// Writes `line` and a newline to stderr, ignoring failure. `eprintln!` panics when stderr is
/// a pipe whose reader has gone (a SIGKILLed supervisor, a closed `| tee`); in a long-running
/// process that panic can land in the task that handles SIGTERM and leave the process running
/// with nothing left to stop it. Every line a long-running cvdist process prints itself goes
/// through here (its `tracing` logs are set up with `log_internal_errors(false)` for the
/// same reason).
pub fn stderr_line(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The rule behind [`stderr_color`], separated so it can be tested without a terminal.
pub fn color_allowed(no_color: Option<&std::ffi::OsStr>, is_terminal: bool) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// One finished epoch as both binaries print it (`cvdist train` on its progress bar,
/// `cvdist local`/`--follow` with the world size after it): 1-based epoch of `epochs`,
/// train and test loss and accuracy (percent), learning rate, seconds, images per second.
pub fn epoch_line(m: &crate::proto::EpochMetrics, epochs: u32) -> String {
    format!(
        "epoch {:>3}/{epochs}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  lr {:.5}  {:.1}s  {:.0} img/s",
        m.epoch + 1,
        m.train_loss,
        m.train_acc * 100.0,
        m.test_loss,
        m.test_acc * 100.0,
        m.lr,
        m.seconds,
        m.images_per_sec,
    )
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
