//! The conformance suite against real NATS JetStream, one fresh pair of streams per test.

use event_log::{JetStreamConfig, JetStreamLog, Streams};
use xtask::harness::TestEnv;

async fn make() -> (JetStreamLog, TestEnv) {
    let env = TestEnv::nats_only().await.expect("NATS for the test");
    let log = JetStreamLog::connect(
        &env.nats_url,
        Streams::new(&env.prefix),
        JetStreamConfig::default(),
    )
    .await
    .expect("connected to NATS");
    (log, env)
}

event_log::conformance_suite!(make);
