//! `cvdist report`: gathers the runs to chart, each a run directory on this machine or a
//! job whose history is fetched from the coordinator, then draws and tabulates them.

use super::ConnArgs;
use crate::follow;
use crate::report::{self, Run};
use cvdist_common::proto::GetJobRequest;
use cvdist_common::term::stderr_line;
use cvdist_common::text;
use std::path::{Path, PathBuf};

pub(super) async fn report(runs: &[String], out: &Path, conn: &ConnArgs) -> anyhow::Result<i32> {
    let mut loaded = Vec::new();
    for r in runs {
        let path = PathBuf::from(r);
        if path.is_dir() {
            loaded.push(report::load_run(&path)?);
        } else {
            loaded.push(fetch_job(r, conn).await?);
        }
    }
    let rendered = report::write_charts(&loaded, out)?;
    for w in &rendered.warnings {
        stderr_line(format_args!("warning: {w}"));
    }
    print!("{}", report::summary_table(&loaded));
    for f in &rendered.files {
        println!("wrote {}", f.display());
    }
    Ok(0)
}

/// A job's record from the coordinator, as a run labelled with its name (else its id).
async fn fetch_job(id: &str, conn: &ConnArgs) -> anyhow::Result<Run> {
    let mut client = conn.connection()?.client().await?;
    let info = client
        .get_job(GetJobRequest { job_id: id.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("{id} is neither a run directory nor a job: {}", follow::status_text(&s)))?
        .into_inner();
    let label = info.spec.as_ref().map(|s| s.name.clone()).filter(|n| !n.is_empty()).unwrap_or_else(|| info.id.clone());
    Ok(Run {
        label: text::printable(&label).into_owned(),
        dir: PathBuf::from(&info.id),
        metrics: info.history,
        summary: None,
        job: info.spec,
    })
}
