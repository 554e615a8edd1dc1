//! `registryctl` against a real server and real NATS: every command, with its output checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::*;

struct Ctl {
    base: Vec<String>,
}

impl Ctl {
    fn new(api: &Api) -> Ctl {
        Ctl {
            base: vec![
                "--server".into(),
                api.address.to_string(),
                "--nats-url".into(),
                api.env.nats_url.clone(),
                "--stream-prefix".into(),
                api.env.prefix.clone(),
            ],
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_registryctl"));
        command.args(&self.base).args(args);
        command
    }

    /// Runs to completion off the async runtime; returns (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = self.command(args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (success, stdout, stderr) = self.run(args).await;
        assert!(success, "registryctl {args:?} failed: {stderr}");
        stdout
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registryctl_commands() {
    let api = start().await;
    let ctl = Ctl::new(&api);
    assert_eq!(ctl.ok(&["health"]).await.trim(), "SERVING");

    let out = ctl
        .ok(&[
            "register",
            "prod",
            "orders",
            "10.0.0.7",
            "8080",
            "--ttl",
            "30s",
            "-m",
            "zone=a",
            "-m",
            "tier=gold",
        ])
        .await;
    let id = event_log::instance_id("prod", "orders", "10.0.0.7", 8080);
    assert_eq!(out.trim(), format!("registered {id} (revision 1)"));
    ctl.ok(&["register", "prod", "orders", "10.0.0.8", "8080"])
        .await;
    ctl.ok(&[
        "register",
        "dev",
        "orders",
        "10.0.0.9",
        "8080",
        "--persistent",
    ])
    .await;

    let out = ctl.ok(&["namespaces"]).await;
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("dev") || l.contains("prod"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("dev") && lines[0].contains(" 1 "),
        "{out}"
    );
    assert!(
        lines[1].contains("prod") && lines[1].contains(" 2 "),
        "{out}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["services", "-o", "json"]).await).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"namespace": "dev", "service": "orders", "healthy": 1, "total": 1, "isolated": 0, "revision": 3},
            {"namespace": "prod", "service": "orders", "healthy": 2, "total": 2, "isolated": 0, "revision": 2}
        ])
    );

    let out = ctl
        .ok(&["isolate", "prod", "orders", "10.0.0.8", "8080"])
        .await;
    assert!(out.starts_with("isolated "), "{out}");
    let out = ctl.ok(&["services", "--namespace", "prod"]).await;
    assert!(
        out.contains("2/2") && out.contains("HEALTHY/TOTAL"),
        "{out}"
    );

    let out = ctl.ok(&["instances", "prod", "orders"]).await;
    assert!(
        out.contains("10.0.0.7:8080")
            && out.contains("tier=gold,zone=a")
            && out.contains("30000ms"),
        "{out}"
    );
    let isolated_row = out.lines().find(|l| l.contains("10.0.0.8:8080")).unwrap();
    assert!(isolated_row.contains("yes"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["instances", "prod", "orders", "-o", "json"]).await)
            .unwrap();
    assert_eq!(json[0]["id"], id);
    assert_eq!(json[0]["metadata"]["zone"], "a");
    assert_eq!(json[1]["isolate"], true);

    let out = ctl
        .ok(&[
            "unisolate",
            "--id",
            &event_log::instance_id("prod", "orders", "10.0.0.8", 8080),
        ])
        .await;
    assert!(out.starts_with("un-isolated "), "{out}");

    let out = ctl.ok(&["heartbeat", "--id", &id]).await;
    assert_eq!(
        out.trim(),
        format!("heartbeat recorded for {id}; next in 30000 ms")
    );

    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["instance", "--id", &id, "-o", "json"]).await).unwrap();
    assert_eq!(json["host"], "10.0.0.7");
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{json}");
    assert_eq!(events[0]["event_type"], "InstanceRegistered");
    assert_eq!(events[0]["sequence"], 1);

    let out = ctl.ok(&["events"]).await;
    let types: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        [
            "InstanceRegistered",
            "InstanceRegistered",
            "InstanceRegistered",
            "InstanceStatusChanged",
            "InstanceStatusChanged"
        ],
        "{out}"
    );
    let out = ctl
        .ok(&["events", "--namespace", "dev", "-o", "json"])
        .await;
    assert_eq!(out.lines().count(), 1, "{out}");
    let out = ctl.ok(&["events", "--type", "InstanceStatusChanged"]).await;
    assert_eq!(out.lines().count(), 2, "{out}");

    // --follow prints events as they arrive.
    let mut follow = ctl
        .command(&[
            "events",
            "--follow",
            "--namespace",
            "prod",
            "--service",
            "orders",
            "--from",
            "5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (line_sender, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line_sender.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = tokio::time::timeout(WAIT, lines.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("InstanceStatusChanged"), "{first}");
    let out = ctl
        .ok(&["deregister", "prod", "orders", "10.0.0.7", "8080"])
        .await;
    assert!(out.starts_with(&format!("deregistered {id}")), "{out}");
    let next = tokio::time::timeout(WAIT, lines.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        next.contains("InstanceDeregistered") && next.contains(&id),
        "{next}"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();

    // Errors are the server's precise ones, and the exit status says so.
    let (success, _, stderr) = ctl
        .run(&["register", "prod", "orders", "10.0.0.7", "0"])
        .await;
    assert!(!success);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("port"),
        "{stderr}"
    );
    let (success, _, stderr) = ctl.run(&["heartbeat", "--id", &id]).await;
    assert!(!success);
    assert!(stderr.contains("NotFound"), "{stderr}");
    let (success, _, stderr) = ctl.run(&["events", "--type", "InstanceTeleported"]).await;
    assert!(
        !success && stderr.contains("unknown event type"),
        "{stderr}"
    );
}
