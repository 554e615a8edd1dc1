//! Configuration of the health engine, with the defaults and their reasons.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::leases::{Rules, SelfPreservationRules};

/// How the engine decides and how its shell behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// An instance is unhealthy after `unhealthy_ratio x TTL` without a heartbeat. Default 3,
    /// like PolarisMesh's `expireTtlCount`. At least 1.
    pub unhealthy_ratio: f64,
    /// An ephemeral instance expires (InstanceExpired) this long after its unhealthy deadline,
    /// that is `last beat + ratio x TTL + delete_timeout`, unless a heartbeat revives it first.
    /// Default 30 s.
    pub delete_timeout: Duration,
    /// When the engine suspects itself rather than the fleet.
    pub self_preservation: SelfPreservation,
    /// Where to keep the lease-table snapshot; `None`: none, every start replays the events
    /// stream from its beginning. The file is a cache of the log, never a source of truth.
    pub snapshot_path: Option<PathBuf>,
    /// How often to write the snapshot (also written on shutdown). Bounds the events replayed
    /// at start-up to about this much history. Default 60 s.
    pub snapshot_interval: Duration,
    /// First delay before retrying a failed append or read; doubles up to `retry_max`.
    /// Default 50 ms.
    pub retry_initial: Duration,
    /// Longest delay between retries. Default 2 s.
    pub retry_max: Duration,
    /// During start-up replay, a stream that delivers nothing for this long although its last
    /// sequence was not reached is taken as caught up (its missing records were discarded by
    /// retention). Default 2 s.
    pub replay_idle: Duration,
}

/// Self-preservation settings; see [`crate::leases`] for the exact rule.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfPreservation {
    /// Switch. Default on.
    pub enabled: bool,
    /// Enter when more than this share of the leases is at risk. Default 1/3.
    pub share: f64,
    /// Misses are counted over this look-back, and self-preservation lasts at least this long.
    /// Default 15 s.
    pub window: Duration,
    /// Never enter with fewer leases at risk, so that a handful of instances dying together in
    /// a small fleet is not mistaken for a partition. Default 10.
    pub min_at_risk: u64,
}

impl Default for SelfPreservation {
    fn default() -> Self {
        let rules = SelfPreservationRules::default();
        SelfPreservation {
            enabled: true,
            share: rules.share,
            window: Duration::from_millis(rules.window_ms as u64),
            min_at_risk: rules.min_at_risk,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let rules = Rules::default();
        Config {
            unhealthy_ratio: rules.unhealthy_ratio,
            delete_timeout: Duration::from_millis(rules.delete_timeout_ms as u64),
            self_preservation: SelfPreservation::default(),
            snapshot_path: None,
            snapshot_interval: Duration::from_secs(60),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            replay_idle: Duration::from_secs(2),
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Config {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: &str| Err(Error::InvalidConfig(message.to_owned()));
        if !self.unhealthy_ratio.is_finite()
            || self.unhealthy_ratio < 1.0
            || self.unhealthy_ratio > 1000.0
        {
            return invalid("unhealthy_ratio must be a number from 1 to 1000");
        }
        if self.delete_timeout > Duration::from_secs(365 * 24 * 3600) {
            return invalid("delete_timeout must be at most a year");
        }
        let sp = &self.self_preservation;
        if sp.enabled {
            if !sp.share.is_finite() || sp.share <= 0.0 || sp.share > 1.0 {
                return invalid("self_preservation.share must be in (0, 1]");
            }
            if sp.window.is_zero() || sp.window > Duration::from_secs(24 * 3600) {
                return invalid("self_preservation.window must be from 1 ms to 1 day");
            }
        }
        if self.snapshot_interval.is_zero() {
            return invalid("snapshot_interval must be positive");
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return invalid("retry_initial must be positive and at most retry_max");
        }
        if self.replay_idle.is_zero() {
            return invalid("replay_idle must be positive");
        }
        Ok(())
    }

    /// The rules of the pure core.
    pub fn rules(&self) -> Rules {
        let sp = &self.self_preservation;
        Rules {
            unhealthy_ratio: self.unhealthy_ratio,
            delete_timeout_ms: millis(self.delete_timeout),
            self_preservation: sp.enabled.then(|| SelfPreservationRules {
                share: sp.share,
                window_ms: millis(sp.window),
                min_at_risk: sp.min_at_risk,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let config = Config::default();
        config.validate().unwrap();
        let rules = config.rules();
        assert_eq!(rules.unhealthy_ratio, 3.0);
        assert_eq!(rules.delete_timeout_ms, 30_000);
        let sp = rules.self_preservation.unwrap();
        assert_eq!((sp.window_ms, sp.min_at_risk), (15_000, 10));
        assert!((sp.share - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bad_values_name_their_field() {
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 4] = [
            ("unhealthy_ratio", |c| c.unhealthy_ratio = 0.5),
            ("self_preservation.share", |c| {
                c.self_preservation.share = 0.0
            }),
            ("self_preservation.window", |c| {
                c.self_preservation.window = Duration::ZERO
            }),
            ("retry_initial", |c| c.retry_initial = Duration::ZERO),
        ];
        for (field, change) in cases {
            let mut config = Config::default();
            change(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(field), "{error}");
        }
        let mut off = Config::default();
        off.self_preservation.enabled = false;
        off.self_preservation.share = 7.0;
        off.validate().unwrap();
        assert!(off.rules().self_preservation.is_none());
    }
}
