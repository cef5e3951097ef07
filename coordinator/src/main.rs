//! `cvdist`: the one entry point for users. The commands live in
//! `cvdist_coordinator::cli`; this file parses, sets up logging and exits with the
//! command's status.

use cvdist_common::term::stderr_line;
use cvdist_coordinator::cli::{self, Cli};
use cvdist_coordinator::follow;

fn main() {
    let cli: Cli = cvdist_common::args::parse();
    let default_filter = if cli.is_service() { "warn,cvdist_coordinator=info" } else { "error" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CVDIST_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(cvdist_common::term::stderr_color())
        // Its default reports a failed write with eprintln!, which panics once stderr is a
        // broken pipe (see term::stderr_line).
        .log_internal_errors(false)
        .init();
    let code = match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            stderr_line(format_args!("error: {}", follow::explain(&e)));
            2
        }
    };
    std::process::exit(code);
}
