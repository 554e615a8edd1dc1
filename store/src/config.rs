//! Configuration of the projector (also used by `rebuild` and `check` for the database URL and
//! batch size).

use std::time::Duration;

use crate::error::{Error, Result};

/// How to reach PostgreSQL and how the projector paces itself.
///
/// Build one with [`Config::new`] and override fields as needed; every default is documented on
/// its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// PostgreSQL connection string (URL or `key=value` form). The projection lives in the
    /// schema [`crate::SCHEMA`] of that database.
    pub database_url: String,
    /// Name of the durable JetStream consumer on the events stream. Default `store-projector`.
    /// One projector per database is active at a time (a PostgreSQL advisory lock decides), so
    /// several `registryd` processes may share the name: the others stand by.
    pub consumer: String,
    /// Most events applied in one transaction. Default 4,096: large enough that per-transaction
    /// costs (commit, round trips) vanish at full speed, small enough that a batch takes tens of
    /// milliseconds. When the projector is caught up, batches are as small as what has arrived.
    pub batch_size: usize,
    /// Most instance states the projector keeps in memory between batches, so that a batch only
    /// reads back from PostgreSQL the instances it has not seen recently. About half a kilobyte
    /// each; default 100,000 (some 50 MB). 0 disables the cache: every batch reads the states it
    /// needs.
    pub cache_instances: usize,
    /// How long one fetch waits for a first event when there is nothing to do. Default 500 ms;
    /// it only bounds how often an idle projector refreshes its progress.
    pub idle_wait: Duration,
    /// First delay before retrying after a transient failure. Default 100 ms.
    pub retry_initial: Duration,
    /// Cap of the exponential retry delay. Default 5 s, so that the projector notices a
    /// recovered database within seconds.
    pub retry_max: Duration,
    /// How often the projector reads the stream's last sequence to compute its lag. Default 1 s.
    pub progress_interval: Duration,
    /// Lag (age of the oldest event not yet applied) above which the projector logs a warning,
    /// at most once per `lag_log_interval`. Default 5 s.
    pub lag_warn: Duration,
    /// Least time between two lag warnings. Default 10 s.
    pub lag_log_interval: Duration,
}

impl Config {
    /// The defaults for the database at `database_url`.
    pub fn new(database_url: impl Into<String>) -> Config {
        Config {
            database_url: database_url.into(),
            consumer: "store-projector".to_owned(),
            batch_size: 4096,
            cache_instances: 100_000,
            idle_wait: Duration::from_millis(500),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            progress_interval: Duration::from_secs(1),
            lag_warn: Duration::from_secs(5),
            lag_log_interval: Duration::from_secs(10),
        }
    }

    /// Checks the configuration once, before anything connects.
    pub fn validate(&self) -> Result<()> {
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|error| Error::Config(format!("database URL: {error}")))?;
        if self.consumer.is_empty()
            || !self
                .consumer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Config(format!(
                "consumer name {:?} must be non-empty [A-Za-z0-9_-]",
                self.consumer
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1".into()));
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(Error::Config(
                "retry_initial must be positive and at most retry_max".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let config = Config::new("postgres://postgres@127.0.0.1/registry");
        config.validate().unwrap();
        let bad = Config {
            batch_size: 0,
            ..config.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        let bad = Config {
            consumer: "a.b".into(),
            ..config.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("consumer"));
        let bad = Config {
            database_url: "postgres://host:notaport/db".into(),
            ..config
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("database URL")
        );
    }
}
