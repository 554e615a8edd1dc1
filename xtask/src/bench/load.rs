//! The load generator: a closed loop of `concurrency` workers, each sending its next call as
//! soon as the previous one answered, for a warm-up and then a measured window. Only calls
//! that complete inside the window count; the CPU of every process is sampled at the window's
//! edges.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use super::procfs::{CpuUse, Processes};
use super::stats::{Samples, Summary};

/// Warm-up and measured durations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Load before measuring (connections, caches, allocator).
    pub(crate) warmup: Duration,
    /// The measured part.
    pub(crate) measure: Duration,
}

/// What a closed loop measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoadResult {
    /// Workers.
    pub(crate) concurrency: usize,
    /// Calls completed in the window.
    pub(crate) calls: u64,
    /// Calls per second.
    pub(crate) calls_per_second: f64,
    /// Items (e.g. lease renewals) per second, as counted by the call.
    pub(crate) items_per_second: f64,
    /// Failed calls in the window.
    pub(crate) errors: u64,
    /// The first error, if any.
    pub(crate) first_error: Option<String>,
    /// Latency of the calls that completed in the window.
    pub(crate) latency: Summary,
    /// CPU per process over the window.
    pub(crate) cpu: CpuUse,
}

struct WorkerTally {
    calls: u64,
    items: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Samples,
}

/// Runs `call(worker, iteration)` in a closed loop on `concurrency` workers. A call returns
/// how many items it carried (1 for a plain call, the renewals of a batch).
pub(crate) async fn closed_loop<F, Fut>(
    concurrency: usize,
    window: Window,
    processes: &Processes,
    call: F,
) -> Result<LoadResult>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let begin = start + window.warmup;
    let end = begin + window.measure;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let call = Arc::clone(&call);
        workers.push(tokio::spawn(async move {
            let mut tally = WorkerTally {
                calls: 0,
                items: 0,
                errors: 0,
                first_error: None,
                latencies: Samples::default(),
            };
            let mut iteration = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result =
                    match tokio::time::timeout(super::api::CALL_TIMEOUT, call(worker, iteration))
                        .await
                    {
                        Ok(result) => result,
                        Err(_) => Err(anyhow::anyhow!(
                            "no answer within {:?}",
                            super::api::CALL_TIMEOUT
                        )),
                    };
                iteration += 1;
                let done = Instant::now();
                if done < begin || done > end {
                    continue;
                }
                match result {
                    Ok(items) => {
                        tally.calls += 1;
                        tally.items += items;
                        tally.latencies.push(done - sent);
                    }
                    Err(error) => {
                        tally.errors += 1;
                        tally
                            .first_error
                            .get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            tally
        }));
    }
    tokio::time::sleep_until(begin.into()).await;
    let before = processes.sample();
    tokio::time::sleep_until(end.into()).await;
    let after = processes.sample();
    let mut calls = 0;
    let mut items = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut latencies = Samples::default();
    for worker in workers {
        let tally = worker.await?;
        calls += tally.calls;
        items += tally.items;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        latencies.extend(tally.latencies);
    }
    if calls == 0 {
        bail!(
            "no call succeeded in the window ({errors} failed{})",
            first_error
                .map(|error| format!("; first error: {error}"))
                .unwrap_or_default()
        );
    }
    let seconds = window.measure.as_secs_f64();
    Ok(LoadResult {
        concurrency,
        calls,
        calls_per_second: calls as f64 / seconds,
        items_per_second: items as f64 / seconds,
        errors,
        first_error,
        latency: latencies.summary(),
        cpu: CpuUse::between(&before, &after),
    })
}
