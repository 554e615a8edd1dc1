//! The conformance suite against the in-memory log.

use event_log::{MemoryLog, Streams};

async fn make() -> (MemoryLog, ()) {
    (MemoryLog::new(Streams::new("conformance")), ())
}

event_log::conformance_suite!(make);
