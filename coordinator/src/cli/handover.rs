//! Running `cvdist-worker` for the commands that need libtorch.

use crate::local;
use anyhow::Context;

/// Hands the whole command over to `cvdist-worker SUB`. On Unix this process *becomes* it
/// (exec), so signals, the exit status and process supervisors (systemd, Kubernetes,
/// Slurm) all see the real worker; a parent that waited would leave the worker running
/// with parent 1 when it is killed. Returns only on failure to start it.
pub(super) fn exec(sub: &str, args: &[String]) -> anyhow::Result<i32> {
    let bin = local::worker_binary()?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(sub).args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        Err(anyhow::Error::new(err).context(format!("running {}", bin.display())))
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().with_context(|| format!("running {}", bin.display()))?;
        Ok(status.code().unwrap_or(1))
    }
}

/// Runs `cvdist-worker SUB` as a child and waits, for commands that post-process its
/// output (`eval`); the child is killed if this process dies first. Returns its exit status.
pub(super) fn run_child(sub: &str, args: &[String]) -> anyhow::Result<i32> {
    let bin = local::worker_binary()?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(sub).args(args);
    local::die_with_parent(&mut cmd);
    let status = cmd.status().with_context(|| format!("running {}", bin.display()))?;
    Ok(status.code().unwrap_or(1))
}
