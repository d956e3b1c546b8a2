//! The `herald` CLI against a real replica (in-memory store): `send` with
//! the fold and schedule flags, `state` and `cancel`, each printing JSON
//! that says what the server did.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Runs `herald <args>` against `server` with the test secret; its stdout
/// as JSON, or the test fails with its stderr.
fn herald(server: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .args(["--server", server])
        .env(
            "HERALD_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("the test secret is text"),
        )
        .env_remove("HERALD_TOKEN")
        .output()
        .expect("run herald");
    assert!(
        out.status.success(),
        "herald {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_state_and_cancel_say_what_the_server_did() {
    bounded(async {
        let d = Deployment::start(Backend::Memory, 1).await;
        let server = format!("http://{}", d.replicas[0].addr);
        let send = |extra: &[&str]| {
            let mut args = vec!["send", "--to", "alice", "--type", "job.progress"];
            args.extend_from_slice(extra);
            herald(&server, &args)
        };
        let first = send(&["--title", "10 %", "--replace-key", "job-1"]);
        assert_eq!(first["deliveries"][0]["updated"], false);
        let id = first["deliveries"][0]["notification_id"].as_i64().unwrap();
        let again = send(&["--title", "90 %", "--replace-key", "job-1", "--renotify"]);
        assert_eq!(again["deliveries"][0]["updated"], true);
        assert_eq!(again["deliveries"][0]["notification_id"], id);

        let archived = herald(
            &server,
            &[
                "state",
                "--user",
                "alice",
                "--action",
                "archive",
                "--ids",
                &id.to_string(),
            ],
        );
        assert_eq!(archived, serde_json::json!({"changed": 1, "seq": 3}));
        let by_filter = herald(
            &server,
            &[
                "state",
                "--user",
                "alice",
                "--action",
                "unarchive",
                "--types",
                "job.*",
            ],
        );
        assert_eq!(by_filter["changed"], 1);

        let scheduled = send(&[
            "--title",
            "later",
            "--deliver-in",
            "1h",
            "--idempotency-key",
            "k-later",
        ]);
        assert_eq!(
            scheduled,
            serde_json::json!({"deliveries": [], "scheduled": true})
        );
        let cancelled = herald(&server, &["cancel", "--key", "k-later"]);
        assert_eq!(cancelled, serde_json::json!({"cancelled": true}));
        let again = herald(&server, &["cancel", "--key", "k-later"]);
        assert_eq!(again, serde_json::json!({"cancelled": false}));
        d.stop().await;
    })
    .await;
}
