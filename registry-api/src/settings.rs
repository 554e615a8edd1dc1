//! `registryd`'s settings and where they come from.
//!
//! One layering, each layer overriding the one before it, key by key:
//!
//! 1. built-in defaults ([`Settings::default`]);
//! 2. a TOML file named by `--config FILE` or `REGISTRY_CONFIG` (keys are the option names with
//!    `_`, e.g. `nats_url`, `delete_timeout = "30s"`; an unknown key is an error);
//! 3. environment variables ([`ENVIRONMENT`]: `NATS_URL`, `DATABASE_URL`, `REGISTRY_*`; empty
//!    ones count as unset);
//! 4. command-line flags.
//!
//! clap parses the command line (and shows defaults and variable names in `--help`), but only
//! the values typed on the command line are taken from it; figment merges the layers, so that
//! a file can override a default without a flag overriding the file by accident.
//!
//! Secrets never reach the logs: [`mask_secrets`] hides passwords (and NATS tokens) in the
//! URLs before the effective settings are printed ([`Settings::log`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every environment variable that sets an option, and the option (file key) it sets.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("NATS_URL", "nats_url"),
    ("DATABASE_URL", "database_url"),
    ("REGISTRY_LISTEN", "listen"),
    ("REGISTRY_METRICS_LISTEN", "metrics_listen"),
    ("REGISTRY_STREAM_PREFIX", "stream_prefix"),
    ("REGISTRY_EMBEDDED", "embedded"),
    ("REGISTRY_UNHEALTHY_RATIO", "unhealthy_ratio"),
    ("REGISTRY_DELETE_TIMEOUT", "delete_timeout"),
    ("REGISTRY_NO_SELF_PRESERVATION", "no_self_preservation"),
    ("REGISTRY_DATA_DIR", "data_dir"),
    ("REGISTRY_LOG_FORMAT", "log_format"),
];

/// The variable naming the configuration file.
pub const CONFIG_FILE_VARIABLE: &str = "REGISTRY_CONFIG";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the Prometheus `/metrics` endpoint listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No endpoint.
    Off,
    /// An address (port 0: any free port).
    At(SocketAddr),
}

impl FromStr for MetricsListen {
    type Err = String;

    fn from_str(text: &str) -> Result<MetricsListen, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(MetricsListen::Off);
        }
        text.parse()
            .map(MetricsListen::At)
            .map_err(|_| format!("`{text}` is neither `off` nor an address like 127.0.0.1:9464"))
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Off => f.write_str("off"),
            MetricsListen::At(address) => address.fmt(f),
        }
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MetricsListen, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Durations as humantime strings (`"30s"`, `"1m 30s"`); plain numbers are seconds.
mod humane {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"30s\" or \"1m 30s\", or a number of seconds")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
                humantime::parse_duration(text.trim()).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(seconds))
            }

            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Duration, E> {
                u64::try_from(seconds)
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }

            fn visit_f64<E: de::Error>(self, seconds: f64) -> Result<Duration, E> {
                Duration::try_from_secs_f64(seconds).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Every option of `registryd`. The same names are the keys of the configuration file; the
/// environment variables are in [`ENVIRONMENT`].
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// NATS server(s) with JetStream, comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// PostgreSQL database of the projection (its tables live in the schema `registry`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/registry",
        global = true
    )]
    pub database_url: String,
    /// Address of the gRPC API.
    #[arg(
        long,
        env = "REGISTRY_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint serving Prometheus metrics at `/metrics`, or `off`. When
    /// the default address is taken (another registryd on this host), the endpoint is skipped
    /// with a warning; an address set explicitly must be free.
    #[arg(
        long,
        env = "REGISTRY_METRICS_LISTEN",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub metrics_listen: MetricsListen,
    /// Prefix of the JetStream streams and subjects (`<prefix>.evt.>`, `<PREFIX>_EVENTS`).
    #[arg(
        long,
        env = "REGISTRY_STREAM_PREFIX",
        default_value = "registry",
        global = true
    )]
    pub stream_prefix: String,
    /// Run without NATS and PostgreSQL: an in-memory event log and no projection. Nothing is
    /// persisted; for trying things out.
    #[arg(long, env = "REGISTRY_EMBEDDED", global = true)]
    pub embedded: bool,
    /// An instance turns unhealthy after this many TTLs without a heartbeat.
    #[arg(
        long,
        env = "REGISTRY_UNHEALTHY_RATIO",
        default_value = "3",
        global = true
    )]
    pub unhealthy_ratio: f64,
    /// An unhealthy ephemeral instance is removed this long after its unhealthy deadline.
    #[arg(
        long,
        env = "REGISTRY_DELETE_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    #[serde(with = "humane")]
    pub delete_timeout: Duration,
    /// Disable self-preservation (the engine then expires leases even when a large share of
    /// the fleet seems to die at once).
    #[arg(long, env = "REGISTRY_NO_SELF_PRESERVATION", global = true)]
    pub no_self_preservation: bool,
    /// Directory for local state: the health engine's lease snapshot, which bounds the replay
    /// at start-up to the history since the last snapshot. Without it every start replays the
    /// whole events stream. The snapshot is a cache of the log, never a source of truth.
    #[arg(long, env = "REGISTRY_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Log format (level: `RUST_LOG`, default `info`).
    #[arg(
        long,
        env = "REGISTRY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/registry".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: MetricsListen::At(SocketAddr::from(([127, 0, 0, 1], 9464))),
            stream_prefix: "registry".to_owned(),
            embedded: false,
            unhealthy_ratio: 3.0,
            delete_timeout: Duration::from_secs(30),
            no_self_preservation: false,
            data_dir: None,
            log_format: LogFormat::Text,
        }
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file named explicitly does not exist or is not a file.
    #[error("configuration file {0} not found")]
    FileNotFound(PathBuf),
    /// A value is invalid or a file key unknown; the message names the key and its source.
    #[error("{0}")]
    Invalid(Box<figment::Error>),
}

/// The environment layer: the variables of [`ENVIRONMENT`] that are set and not empty, taken as
/// strings (converted to the option's type when extracted, so `REGISTRY_EMBEDDED=1`, `=true`
/// and `=yes` all work, and a numeric stream prefix stays a string).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    values: Dict,
}

impl Environment {
    /// The layer of the given variables (any others are ignored).
    pub fn from_vars<K: AsRef<str>, V: AsRef<str>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Environment {
        let mut values = Dict::new();
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            if value.trim().is_empty() {
                continue;
            }
            if let Some((_, key)) = ENVIRONMENT.iter().find(|(variable, _)| *variable == name) {
                values.insert((*key).to_owned(), Value::from(value.to_owned()));
            }
        }
        Environment { values }
    }

    /// The layer of this process's environment.
    pub fn from_process() -> Environment {
        Environment::from_vars(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }))
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment").interpolater(|_profile: &Profile, keys: &[&str]| {
            let key = keys.first().copied().unwrap_or_default();
            ENVIRONMENT
                .iter()
                .find(|(_, option)| *option == key)
                .map_or_else(|| key.to_owned(), |(variable, _)| (*variable).to_owned())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// The command-line layer: the options typed on the command line in `matches` (not those clap
/// filled in from the environment or its defaults), with their values from `parsed`.
pub fn command_line(matches: &clap::ArgMatches, parsed: &Settings) -> Result<Dict, Error> {
    let all = Value::serialize(parsed).map_err(|error| Error::Invalid(Box::new(error)))?;
    let mut typed = Dict::new();
    if let Some(all) = all.into_dict() {
        for (key, value) in all {
            // Every key is an argument id (clap names arguments after the fields).
            if matches.value_source(&key) == Some(ValueSource::CommandLine) {
                typed.insert(key, value);
            }
        }
    }
    Ok(typed)
}

impl Settings {
    /// Merges the layers: defaults < `file` < `environment` < `command_line`.
    pub fn load(
        file: Option<&Path>,
        environment: Environment,
        command_line: Dict,
    ) -> Result<Settings, Error> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(Error::FileNotFound(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(environment)
            .merge(Serialized::defaults(command_line).profile(Profile::Default))
            .extract_lossy()
            .map_err(|error| Error::Invalid(Box::new(error)))
    }

    /// The health engine's configuration.
    pub fn engine(&self) -> health_engine::Config {
        let mut config = health_engine::Config {
            unhealthy_ratio: self.unhealthy_ratio,
            delete_timeout: self.delete_timeout,
            ..health_engine::Config::default()
        };
        config.self_preservation.enabled = !self.no_self_preservation;
        config.snapshot_path = self
            .data_dir
            .as_ref()
            .map(|dir| dir.join(format!("engine-{}.snapshot", self.stream_prefix)));
        config
    }

    /// Logs the effective settings as one line, secrets masked.
    pub fn log(&self, file: Option<&Path>) {
        tracing::info!(
            config_file = %file.map_or_else(|| "-".to_owned(), |f| f.display().to_string()),
            nats_url = %mask_secrets(&self.nats_url),
            database_url = %mask_secrets(&self.database_url),
            listen = %self.listen,
            metrics_listen = %self.metrics_listen,
            stream_prefix = %self.stream_prefix,
            embedded = self.embedded,
            unhealthy_ratio = self.unhealthy_ratio,
            delete_timeout = %humantime::format_duration(self.delete_timeout),
            no_self_preservation = self.no_self_preservation,
            data_dir = %self.data_dir.as_ref().map_or_else(|| "-".to_owned(), |d| d.display().to_string()),
            log_format = match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            "configuration (defaults < file < environment < flags)"
        );
    }
}

/// Query and `key=value` parameters whose values are secrets.
const SECRET_KEYS: &[&str] = &["password", "pass", "token", "secret", "sslpassword"];

const MASK: &str = "***";

/// `urls` (one URL, a comma-separated list of URLs, or a PostgreSQL `key=value` string) with
/// every secret replaced by `***`: URL passwords, NATS tokens (a user name without a password
/// in a `nats://` URL is a token), and `password=`/`token=` parameters.
pub fn mask_secrets(urls: &str) -> String {
    if !urls.contains("://") {
        return mask_parameters(urls, ' ');
    }
    urls.split(',')
        .map(|url| mask_url(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return mask_parameters(url, '&');
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    // The user information ends at the last `@`: passwords are not always percent-encoded.
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
            let userinfo = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:{MASK}"),
                None if scheme.to_ascii_lowercase().starts_with("nats")
                    || scheme.eq_ignore_ascii_case("tls") =>
                {
                    MASK.to_owned()
                }
                None => userinfo.to_owned(),
            };
            format!("{userinfo}@{host}")
        }
        None => rest.to_owned(),
    };
    match query {
        Some(query) => format!("{scheme}://{rest}?{}", mask_parameters(query, '&')),
        None => format!("{scheme}://{rest}"),
    }
}

fn mask_parameters(parameters: &str, separator: char) -> String {
    parameters
        .split(separator)
        .map(|parameter| match parameter.split_once('=') {
            Some((key, _))
                if SECRET_KEYS
                    .iter()
                    .any(|secret| key.trim().eq_ignore_ascii_case(secret)) =>
            {
                format!("{key}={MASK}")
            }
            _ => parameter.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        use std::io::Write as _;
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temporary file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }

    fn flags(pairs: &[(&str, Value)]) -> Dict {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect()
    }

    #[test]
    fn defaults_alone() {
        let settings = Settings::load(None, Environment::default(), Dict::new()).expect("load");
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn file_overrides_defaults_environment_overrides_file_flags_override_everything() {
        let toml = file(
            r#"
            nats_url = "nats://file:4222"
            listen = "127.0.0.1:6001"
            stream_prefix = "from_file"
            unhealthy_ratio = 4.5
            delete_timeout = "2m"
            data_dir = "/var/lib/registry"
            "#,
        );
        let environment = Environment::from_vars([
            ("REGISTRY_LISTEN", "127.0.0.1:6002"),
            ("REGISTRY_STREAM_PREFIX", "from_env"),
            ("REGISTRY_EMBEDDED", "1"),
            ("PATH", "/bin"),
        ]);
        let command_line = flags(&[("stream_prefix", Value::from("from_flag".to_owned()))]);
        let settings = Settings::load(Some(toml.path()), environment, command_line).expect("load");
        assert_eq!(
            settings,
            Settings {
                // file over default
                nats_url: "nats://file:4222".into(),
                unhealthy_ratio: 4.5,
                delete_timeout: Duration::from_secs(120),
                data_dir: Some("/var/lib/registry".into()),
                // environment over file
                listen: "127.0.0.1:6002".parse().unwrap(),
                embedded: true,
                // flag over environment and file
                stream_prefix: "from_flag".into(),
                ..Settings::default()
            }
        );
    }

    #[test]
    fn environment_values_are_converted_to_the_option_type() {
        let environment = Environment::from_vars([
            ("REGISTRY_STREAM_PREFIX", "123"),
            ("REGISTRY_UNHEALTHY_RATIO", "2"),
            ("REGISTRY_DELETE_TIMEOUT", "1m 5s"),
            ("REGISTRY_NO_SELF_PRESERVATION", "true"),
            ("REGISTRY_EMBEDDED", "off"),
            ("REGISTRY_METRICS_LISTEN", "off"),
            ("REGISTRY_LOG_FORMAT", "json"),
            ("DATABASE_URL", ""),
        ]);
        let settings = Settings::load(None, environment, Dict::new()).expect("load");
        assert_eq!(settings.stream_prefix, "123");
        assert_eq!(settings.unhealthy_ratio, 2.0);
        assert_eq!(settings.delete_timeout, Duration::from_secs(65));
        assert!(settings.no_self_preservation);
        assert!(!settings.embedded);
        assert_eq!(settings.metrics_listen, MetricsListen::Off);
        assert_eq!(settings.log_format, LogFormat::Json);
        // Empty means unset.
        assert_eq!(settings.database_url, Settings::default().database_url);
    }

    #[test]
    fn errors_name_the_key_and_where_it_came_from() {
        let environment = Environment::from_vars([("REGISTRY_LISTEN", "not an address")]);
        let error = Settings::load(None, environment, Dict::new())
            .expect_err("bad address")
            .to_string();
        assert!(error.contains("REGISTRY_LISTEN"), "{error}");

        let toml = file("nats_uri = \"nats://typo:4222\"\n");
        let error = Settings::load(Some(toml.path()), Environment::default(), Dict::new())
            .expect_err("unknown key")
            .to_string();
        assert!(error.contains("nats_uri"), "{error}");

        let missing = Path::new("/nonexistent/registryd.toml");
        let error = Settings::load(Some(missing), Environment::default(), Dict::new())
            .expect_err("missing file");
        assert!(matches!(error, Error::FileNotFound(_)), "{error}");
    }

    #[test]
    fn every_option_has_an_environment_variable_and_a_file_key() {
        let keys: Vec<String> = Value::serialize(Settings {
            data_dir: Some("/x".into()),
            ..Settings::default()
        })
        .expect("serialize")
        .into_dict()
        .expect("dict")
        .into_keys()
        .collect();
        let mut mapped: Vec<String> = ENVIRONMENT.iter().map(|(_, k)| (*k).to_owned()).collect();
        mapped.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, mapped);
    }

    #[test]
    fn secrets_are_masked() {
        let cases = [
            (
                "postgres://registry:s3cr%2Ft@db:5432/registry",
                "postgres://registry:***@db:5432/registry",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/registry",
                "postgres://postgres@127.0.0.1:5432/registry",
            ),
            (
                "postgres://u:p@ss@db/x?sslmode=require&password=other",
                "postgres://u:***@db/x?sslmode=require&password=***",
            ),
            (
                "host=db user=registry password=hunter2 dbname=registry",
                "host=db user=registry password=*** dbname=registry",
            ),
            (
                "nats://alice:wonder@a:4222,nats://b:4222",
                "nats://alice:***@a:4222,nats://b:4222",
            ),
            ("nats://s3cr3t-token@a:4222", "nats://***@a:4222"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ];
        for (url, masked) in cases {
            assert_eq!(mask_secrets(url), masked, "{url}");
        }
    }

    #[test]
    fn metrics_listen_parses_off_and_addresses() {
        assert_eq!("off".parse(), Ok(MetricsListen::Off));
        assert_eq!(
            "127.0.0.1:0".parse(),
            Ok(MetricsListen::At("127.0.0.1:0".parse().unwrap()))
        );
        assert!("nowhere".parse::<MetricsListen>().is_err());
    }
}
