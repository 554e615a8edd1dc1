//! Reading a bounded stretch of the events stream in batches: the rebuild, the consistency check
//! and the projector's gap repair all read "from here through sequence N" with an ordered replay.

use std::time::Duration;

use event_log::{Record, RecordStream};
use futures::{FutureExt, StreamExt};

use crate::error::{Error, Result};

/// How long a replay may go without delivering anything while records up to the target are
/// known to exist. Generous: it only turns a hung connection into an error.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// One batch of a bounded replay.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Records in stream order, all at or below the target.
    pub records: Vec<Record>,
    /// True when the replay reached the target (or passed it: the stream no longer holds the
    /// target itself); nothing more is to be read.
    pub done: bool,
}

/// Reads the next records of `stream` up to `through` (inclusive), at most `max`: waits for the
/// first, then takes whatever else is ready right away.
pub(crate) async fn read_batch(
    stream: &mut RecordStream,
    max: usize,
    through: u64,
) -> Result<Batch> {
    let mut batch = Batch::default();
    while batch.records.len() < max {
        let next = if batch.records.is_empty() {
            match tokio::time::timeout(STALL_LIMIT, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    return Err(Error::Log(event_log::Error::Unavailable(format!(
                        "replay delivered nothing for {STALL_LIMIT:?} before sequence {through}"
                    ))));
                }
            }
        } else {
            match stream.next().now_or_never() {
                Some(next) => next,
                None => break,
            }
        };
        let record = match next {
            Some(Ok(record)) => record,
            Some(Err(error)) => return Err(Error::Log(error)),
            None => {
                return Err(Error::Log(event_log::Error::Unavailable(
                    "replay ended unexpectedly".into(),
                )));
            }
        };
        if record.sequence > through {
            batch.done = true;
            break;
        }
        let reached = record.sequence == through;
        batch.records.push(record);
        if reached {
            batch.done = true;
            break;
        }
    }
    Ok(batch)
}
