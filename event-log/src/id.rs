//! Instance identity.

use sha1::{Digest, Sha1};

/// The instance id users rely on: `hex(sha1("{namespace}##{service}##{host}##{port}"))`, the same
/// derivation as PolarisMesh, so that registering the same address again is an update and ids are
/// stable across servers and restarts.
pub fn instance_id(namespace: &str, service: &str, host: &str, port: u16) -> String {
    let mut hasher = Sha1::new();
    hasher.update(namespace.as_bytes());
    hasher.update(b"##");
    hasher.update(service.as_bytes());
    hasher.update(b"##");
    hasher.update(host.as_bytes());
    hasher.update(b"##");
    hasher.update(port.to_string().as_bytes());
    hex::encode(hasher.finalize())
}

/// True when `candidate` has the shape of an instance id (40 lowercase hex digits).
pub fn is_instance_id(candidate: &str) -> bool {
    candidate.len() == 40
        && candidate
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_sha1_of_the_documented_string() {
        // `echo -n "default##echo##10.0.0.1##8080" | sha1sum`
        assert_eq!(
            instance_id("default", "echo", "10.0.0.1", 8080),
            "f66fb94da5404b4c8a541173874f53eb60f82440"
        );
        assert!(is_instance_id(&instance_id("a", "b", "c", 1)));
        assert!(!is_instance_id("F66FB94DA5404B4C8A541173874F53EB60F82440"));
        assert_ne!(instance_id("a", "b", "c", 1), instance_id("a", "b", "c", 2));
    }
}
