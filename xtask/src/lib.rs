//! Developer workflows for the registry workspace, and the service harness.
//!
//! The binary (`cargo xtask ...`) is the one entry point for `up`, `ci`, `e2e` and `bench`. The
//! library exposes [`harness`], which provides real NATS JetStream and PostgreSQL to tests and
//! tools: the ones named by `NATS_URL` / `DATABASE_URL` when reachable, or private throwaway
//! servers started from the locally installed binaries.

#![forbid(unsafe_code)]

pub mod harness;
