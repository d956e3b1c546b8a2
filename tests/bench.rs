//! The load generator's loss/duplicate/order check, as a correctness test
//! on a tiny scenario (seconds): it starts two real replicas on a fresh
//! database and fails if any subscriber misses, repeats or reorders an
//! event. Not a timing test: only counts are asserted.

use std::process::Command;

fn run_bench(json: &std::path::Path, scenario: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "--herald",
            env!("CARGO_BIN_EXE_herald"),
            "--replicas",
            "2",
            "--connections",
            "2",
        ])
        .arg("--json")
        .arg(json)
        .args(scenario)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald-bench failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    rows[0].clone()
}

#[test]
fn bench_scenarios_deliver_everything_once_in_order() {
    let dir = std::env::temp_dir().join(format!("herald-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let row = run_bench(
        &dir.join("latency.json"),
        &[
            "latency",
            "--subscribers",
            "40",
            "--rate",
            "300",
            "--duration",
            "2s",
            "--callers",
            "4",
        ],
    );
    for key in [
        "scenario",
        "replicas",
        "streams",
        "offered_rate",
        "sent",
        "delivered",
        "lost",
        "duplicates",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "deliveries_per_s",
        "rss_kib_per_replica",
        "cpu_s_per_replica",
        "pg_cpu_s",
        "server_cpu_us_per_send",
    ] {
        assert!(row.get(key).is_some(), "JSON row lacks {key}: {row}");
    }
    assert_eq!(row["lost"], 0);
    assert_eq!(row["duplicates"], 0);
    assert!(row["sent"].as_u64().unwrap() > 0);
    assert_eq!(row["delivered"], row["sent"]);

    let row = run_bench(
        &dir.join("fanout.json"),
        &[
            "fanout",
            "--subscribers",
            "30",
            "--rate",
            "50",
            "--duration",
            "2s",
            "--callers",
            "2",
        ],
    );
    assert_eq!(row["lost"], 0);
    assert_eq!(row["duplicates"], 0);
    assert_eq!(
        row["delivered"].as_u64().unwrap(),
        row["sent"].as_u64().unwrap() * 30
    );

    // Bulk: `sent` counts items, each delivered once.
    let bulk = "bulk --subscribers 40 --rate 20 --items 25 --duration 2s --callers 2";
    let row = run_bench(&dir.join("bulk.json"), &bulk.split(' ').collect::<Vec<_>>());
    assert_eq!((&row["lost"], &row["duplicates"]), (&0.into(), &0.into()));
    assert!(row["sent"].as_u64().unwrap() >= 25);
    assert_eq!(row["delivered"], row["sent"]);

    // Idle streams as browsers hold them: real grpc-web calls, each on its
    // own HTTP/1.1 connection, every one caught up.
    let row = run_bench(
        &dir.join("streams-grpc-web.json"),
        &["streams", "--streams", "20", "--grpc-web"],
    );
    assert_eq!(row["streams"], 20);
    std::fs::remove_dir_all(&dir).ok();
}
