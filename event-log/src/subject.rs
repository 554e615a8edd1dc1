//! The subject layout: how events map onto NATS subjects and streams.
//!
//! With the default prefix `registry`:
//!
//! | stream               | subjects                         | what                                  |
//! |----------------------|----------------------------------|---------------------------------------|
//! | `REGISTRY_EVENTS`    | `registry.evt.<ns>.<svc>.<id>`   | every event about one instance        |
//! |                      | `registry.sys.<kind>`            | engine-wide events (self-preservation) |
//! | `REGISTRY_HEARTBEATS`| `registry.hb.<partition>`        | [`HeartbeatsReceived`] batches        |
//!
//! `<ns>` and `<svc>` are [`encode_token`]ed names, `<id>` the 40-hex-digit instance id. A
//! downstream consumer follows one service with the filter `registry.evt.<ns>.<svc>.>`, a whole
//! namespace with `registry.evt.<ns>.>`, everything with `registry.evt.>`. The event type is in
//! the envelope and in the `Registry-Event-Type` header, not in the subject, so that all events of
//! one instance share one subject: that is what makes per-instance optimistic concurrency
//! (expected last subject sequence) and per-instance ordering possible.
//!
//! Heartbeats live in their own stream with bounded retention so that the instance history stays
//! small enough to replay from the start, while beats (the bulk of the traffic) age out.
//!
//! [`HeartbeatsReceived`]: crate::event::HeartbeatsReceived

use std::fmt::Write as _;

/// Encodes a namespace or service name as one NATS subject token.
///
/// Letters, digits, `-` and `_` pass through unchanged; every other byte (including `.`, `*`,
/// `>`, whitespace and `~` itself) becomes `~` followed by two uppercase hex digits. The encoding
/// is injective and its output only contains `[A-Za-z0-9_~-]`, so any name is a valid token.
/// Examples: `echo` -> `echo`, `com.example.Echo` -> `com~2Eexample~2EEcho`,
/// `DEFAULT_GROUP@@orders` -> `DEFAULT_GROUP~40~40orders`. The empty name encodes as `~`.
pub fn encode_token(name: &str) -> String {
    if name.is_empty() {
        return "~".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            token.push(byte as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(token, "~{byte:02X}");
        }
    }
    token
}

/// Decodes a token made by [`encode_token`]; `None` when it is not one.
pub fn decode_token(token: &str) -> Option<String> {
    if token == "~" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'~' => {
                let hex = bytes.get(index + 1..index + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            byte if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' => {
                out.push(byte);
                index += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Names of the registry's streams and subjects under one prefix.
///
/// The prefix separates deployments (and tests) sharing one NATS server: `registry` in
/// production, a random one per test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streams {
    prefix: String,
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new("registry")
    }
}

impl Streams {
    /// Streams under `prefix`, which must be a plain token (`[A-Za-z0-9_-]+`); any other
    /// character is encoded with [`encode_token`].
    pub fn new(prefix: &str) -> Streams {
        Streams {
            prefix: encode_token(prefix).replace('~', "_"),
        }
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of the stream of instance and engine events.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_uppercase())
    }

    /// Name of the stream of heartbeat batches.
    pub fn heartbeats_stream(&self) -> String {
        format!("{}_HEARTBEATS", self.prefix.to_uppercase())
    }

    /// Subjects bound to the events stream.
    pub fn events_subjects(&self) -> Vec<String> {
        vec![
            format!("{}.evt.>", self.prefix),
            format!("{}.sys.>", self.prefix),
        ]
    }

    /// Subjects bound to the heartbeats stream.
    pub fn heartbeats_subjects(&self) -> Vec<String> {
        vec![format!("{}.hb.>", self.prefix)]
    }

    /// The subject of every event about one instance.
    pub fn instance_subject(&self, namespace: &str, service: &str, instance_id: &str) -> String {
        format!(
            "{}.evt.{}.{}.{}",
            self.prefix,
            encode_token(namespace),
            encode_token(service),
            encode_token(instance_id)
        )
    }

    /// Filter matching every instance event of one service.
    pub fn service_filter(&self, namespace: &str, service: &str) -> String {
        format!(
            "{}.evt.{}.{}.>",
            self.prefix,
            encode_token(namespace),
            encode_token(service)
        )
    }

    /// Filter matching every instance event of one namespace.
    pub fn namespace_filter(&self, namespace: &str) -> String {
        format!("{}.evt.{}.>", self.prefix, encode_token(namespace))
    }

    /// Subject of engine-wide events of one kind (e.g. `self-preservation`).
    pub fn system_subject(&self, kind: &str) -> String {
        format!("{}.sys.{}", self.prefix, encode_token(kind))
    }

    /// Subject of heartbeat batches of one partition.
    pub fn heartbeat_subject(&self, partition: u32) -> String {
        format!("{}.hb.{partition}", self.prefix)
    }

    /// Splits an instance subject back into (namespace, service, instance id).
    pub fn parse_instance_subject(&self, subject: &str) -> Option<(String, String, String)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".evt.")?;
        let mut parts = rest.split('.');
        let namespace = decode_token(parts.next()?)?;
        let service = decode_token(parts.next()?)?;
        let instance_id = decode_token(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some((namespace, service, instance_id))
    }
}

/// True when `subject` matches the NATS `filter` (`*` one token, `>` one or more trailing tokens).
pub fn matches_filter(filter: &str, subject: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (filter_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn documented_examples() {
        assert_eq!(encode_token("echo"), "echo");
        assert_eq!(encode_token("com.example.Echo"), "com~2Eexample~2EEcho");
        assert_eq!(
            encode_token("DEFAULT_GROUP@@orders"),
            "DEFAULT_GROUP~40~40orders"
        );
        assert_eq!(encode_token("a b>*~"), "a~20b~3E~2A~7E");
        assert_eq!(encode_token(""), "~");
    }

    #[test]
    fn subjects_filter_by_namespace_and_service() {
        let streams = Streams::default();
        let subject = streams.instance_subject("prod", "com.example.Echo", "abc");
        assert_eq!(subject, "registry.evt.prod.com~2Eexample~2EEcho.abc");
        assert!(matches_filter(
            &streams.service_filter("prod", "com.example.Echo"),
            &subject
        ));
        assert!(matches_filter(&streams.namespace_filter("prod"), &subject));
        assert!(!matches_filter(
            &streams.service_filter("prod", "com.example"),
            &subject
        ));
        assert!(!matches_filter(&streams.namespace_filter("pro"), &subject));
        assert!(
            streams
                .events_subjects()
                .iter()
                .any(|f| matches_filter(f, &subject))
        );
        assert_eq!(
            streams.parse_instance_subject(&subject),
            Some(("prod".into(), "com.example.Echo".into(), "abc".into()))
        );
    }

    #[test]
    fn filter_matching_follows_nats_rules() {
        assert!(matches_filter("a.*.c", "a.b.c"));
        assert!(!matches_filter("a.*", "a.b.c"));
        assert!(matches_filter("a.>", "a.b.c"));
        assert!(!matches_filter("a.>", "a"));
        assert!(matches_filter("a.b", "a.b"));
        assert!(!matches_filter("a.b", "a.b.c"));
    }

    proptest! {
        #[test]
        fn tokens_round_trip_and_are_valid(name in ".{0,40}") {
            let token = encode_token(&name);
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'~'));
            prop_assert_eq!(decode_token(&token), Some(name));
        }

        #[test]
        fn encoding_is_injective(a in "[a-z.@~]{0,6}", b in "[a-z.@~]{0,6}") {
            prop_assume!(a != b);
            prop_assert_ne!(encode_token(&a), encode_token(&b));
        }
    }
}
