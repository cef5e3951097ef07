//! Size bounds of a job record (`JobInfo`): a record grows with every event line and epoch, and
//! workers supply some of its text, so every record is cut to a known size before it is kept,
//! stored or listed.

use cvdist_common::proto::{JobInfo, Recovery};
use cvdist_common::text;

/// Event lines kept per job (oldest go first).
pub const MAX_EVENTS_KEPT: usize = 500;
/// Bytes of event log kept per job (oldest lines go first). With the epoch history bounded
/// by the job's epochs and every peer string bounded, this bounds the whole job record.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Recoveries kept per job record (the oldest go first): `max_restarts` is not bounded, and
/// every entry carries a cause of up to `text::MAX_REPORT_TEXT` bytes.
pub const MAX_RECOVERIES_KEPT: usize = 256;

/// Keeps a job record within its byte bound: message and event lines escaped and cut, the
/// event log within [`MAX_EVENT_BYTES`], the history within the job's epochs. Also applied
/// to records loaded from the store, which older releases did not bound.
pub fn bound_record(info: &mut JobInfo) {
    info.message = text::bound(&info.message, text::MAX_REPORT_TEXT);
    for e in info.events.iter_mut() {
        if e.len() > text::MAX_EVENT_LINE || e.chars().any(text::is_unsafe) {
            *e = text::bound(e, text::MAX_EVENT_LINE);
        }
    }
    trim_events(info);
    let epochs = info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
    info.history.retain(|h| h.epoch < epochs);
    trim_recoveries(&mut info.recoveries);
    for r in info.recoveries.iter_mut() {
        r.cause = text::bound(&r.cause, text::MAX_REPORT_TEXT);
    }
}

/// Cuts a job record to what a listing shows (`ListJobs`): the newest epoch's metrics and no
/// event log. One record is bounded (see [`bound_record`]), but a listing holds every job
/// ever submitted; with whole records a few hundred 200-epoch jobs (~70 KB each) would pass
/// the 16 MiB message limit and `cvdist jobs` would stop working. `GetJob` has the rest.
pub fn summarise(info: &mut JobInfo) {
    if info.history.len() > 1 {
        info.history.drain(..info.history.len() - 1);
    }
    info.events.clear();
}

/// Drops the oldest events beyond [`MAX_EVENTS_KEPT`] lines or [`MAX_EVENT_BYTES`] bytes.
pub fn trim_events(info: &mut JobInfo) {
    let mut total: usize = info.events.iter().map(String::len).sum();
    let mut drop = 0;
    while total > MAX_EVENT_BYTES || info.events.len() - drop > MAX_EVENTS_KEPT {
        total -= info.events[drop].len();
        drop += 1;
    }
    info.events.drain(..drop);
}

/// Drops the oldest recoveries beyond [`MAX_RECOVERIES_KEPT`].
pub fn trim_recoveries(recoveries: &mut Vec<Recovery>) {
    if recoveries.len() > MAX_RECOVERIES_KEPT {
        recoveries.drain(..recoveries.len() - MAX_RECOVERIES_KEPT);
    }
}
