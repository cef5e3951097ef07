//! The client commands for jobs: `cvdist submit`, `status`, `jobs`, `logs` and `cancel`.

use super::{ConnArgs, SubmitArgs};
use crate::follow;
use cvdist_common::proto::{
    CancelJobRequest, GetJobRequest, JobSpec, JobState, ListJobsRequest, ListWorkersRequest, SubmitJobRequest,
};
use cvdist_common::{spec, text};

pub(super) async fn submit(a: SubmitArgs) -> anyhow::Result<i32> {
    // The spec is checked before connecting: bad input is refused even with no coordinator.
    let range = spec::parse_workers(&a.workers)?;
    let spec = JobSpec::try_from(a.job.with_workers(range))?;
    let conn = a.conn.connection()?;
    let mut client = conn.client().await?;
    let id = client
        .submit_job(SubmitJobRequest { spec: Some(spec) })
        .await
        .map_err(|s| anyhow::anyhow!("submit refused: {}", follow::status_text(&s)))?
        .into_inner()
        .job_id;
    println!("{}", text::printable(&id));
    if a.follow {
        let info = follow::follow(&conn, &id, false).await?;
        return Ok(if follow::print_summary(&info) { 0 } else { 1 });
    }
    Ok(0)
}

/// One job in detail, or the workers and the active jobs.
pub(super) async fn status(job: Option<String>, conn: &ConnArgs) -> anyhow::Result<i32> {
    let mut client = conn.connection()?.client().await?;
    match job {
        Some(id) => {
            let info = client
                .get_job(GetJobRequest { job_id: id })
                .await
                .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
            print!("{}", follow::describe(info.get_ref(), follow::now_unix()));
        }
        None => {
            match client.list_workers(ListWorkersRequest {}).await {
                Ok(w) => print!("{}", follow::workers_table(&w.into_inner().workers, follow::now_unix())),
                // A coordinator from before ListWorkers: show what it can tell.
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    println!("workers: this coordinator predates the workers overview (upgrade it to see them)")
                }
                Err(s) => anyhow::bail!("{}", follow::status_text(&s)),
            }
            let jobs = client
                .list_jobs(ListJobsRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
            let jobs = jobs.into_inner().jobs;
            let active: Vec<_> = jobs.iter().filter(|j| !j.state().is_terminal()).collect();
            println!("{} jobs ({} active)", jobs.len(), active.len());
            for j in active {
                println!("{}", follow::job_row(j));
            }
        }
    }
    Ok(0)
}

pub(super) async fn list(conn: &ConnArgs) -> anyhow::Result<i32> {
    let mut client = conn.connection()?.client().await?;
    let jobs =
        client.list_jobs(ListJobsRequest {}).await.map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
    println!("{:<24} {:<11} {:<12} {:>11} {:>3} {:>8}  MESSAGE", "JOB", "STATE", "MODEL", "EPOCHS", "N", "TEST ACC");
    for j in &jobs.get_ref().jobs {
        println!("{}", follow::job_row(j));
    }
    Ok(0)
}

/// The job's event log; with `watch`, follows it to its end (exit status: its outcome).
pub(super) async fn logs(job: &str, watch: bool, conn: &ConnArgs) -> anyhow::Result<i32> {
    let conn = conn.connection()?;
    let mut client = conn.client().await?;
    let info = client
        .get_job(GetJobRequest { job_id: job.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?
        .into_inner();
    if watch {
        let info = follow::follow(&conn, job, false).await?;
        return Ok(if follow::print_summary(&info) { 0 } else { 1 });
    }
    for e in &info.events {
        println!("{}", text::printable(&follow::event_line(e, None)));
    }
    Ok(0)
}

pub(super) async fn cancel(job: String, conn: &ConnArgs) -> anyhow::Result<i32> {
    let mut client = conn.connection()?.client().await?;
    let info = client
        .cancel_job(CancelJobRequest { job_id: job })
        .await
        .map_err(|s| anyhow::anyhow!("cancel refused: {}", follow::status_text(&s)))?
        .into_inner();
    println!(
        "{} {}",
        text::printable(&info.id),
        follow::state_label(JobState::try_from(info.state).unwrap_or(JobState::Unspecified))
    );
    Ok(0)
}
