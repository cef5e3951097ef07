//! `cvdist-worker`: the libtorch side of cvdist. `cvdist worker|models|train` hand over to
//! this binary, so users normally call it through `cvdist`. The commands live in
//! `cvdist_worker::cli`; this file parses, sets up logging and reports the outcome.

use cvdist_common::term::stderr_line;
use cvdist_worker::cli::{self, Cli, RunFailed};

fn main() {
    cvdist_worker::allocator::keep_freed_memory();
    let cli: Cli = cvdist_common::args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CVDIST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(cvdist_common::term::stderr_color())
        // Its default reports a failed write with eprintln!, which panics once stderr is a
        // broken pipe (see term::stderr_line).
        .log_internal_errors(false)
        .init();
    if let Err(e) = cli::run(cli) {
        let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        stderr_line(format_args!("error: {}", causes.join(": ")));
        // 1: the run itself failed (as `cvdist local` for a failed job); 2: bad input or
        // an error before or around the run.
        std::process::exit(if e.downcast_ref::<RunFailed>().is_some() { 1 } else { 2 });
    }
}
