//! The Prometheus endpoint, scraped before and after a burst of calls: the
//! counters and histograms move by exactly what was done. One test in its
//! own binary, because the metrics recorder is process-wide.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use herald::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

type Samples = HashMap<String, f64>;

async fn scrape(addr: std::net::SocketAddr) -> Samples {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((normalize(name), value.parse().ok()?))
        })
        .collect()
}

/// `name{b="2",a="1"}` → `name{a="1",b="2"}`, so lookups ignore label order.
fn normalize(series: &str) -> String {
    match series.split_once('{') {
        None => series.to_owned(),
        Some((name, labels)) => {
            let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            labels.sort_unstable();
            format!("{name}{{{}}}", labels.join(","))
        }
    }
}

fn get(samples: &Samples, series: &str) -> f64 {
    samples.get(&normalize(series)).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_what_was_done() {
    bounded(async {
        let db = TestDb::create().await;
        let mut config = test_config(Some(db.url.clone()));
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.health_check_interval = Duration::from_millis(100);
        let replica = server::start(config).await.unwrap();
        let metrics = replica.metrics_addr.unwrap();
        let mut c = client(replica.addr).await;
        let mut stream = subscribe(&mut c, "alice", Some(0)).await;
        until_caught_up(&mut stream).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = scrape(metrics).await;

        for i in 0..5 {
            send(&mut c, note(&["alice", "bob"], &format!("n{i}")))
                .await
                .unwrap();
        }
        // A retried send (same idempotency key) stores nothing the second
        // time, and must not count as stored.
        let keyed = herald::proto::SendNotificationRequest {
            idempotency_key: "k".into(),
            ..note(&["carol"], "keyed")
        };
        send(&mut c, keyed.clone()).await.unwrap();
        send(&mut c, keyed).await.unwrap();
        let bad = send(&mut c, note(&[], "no recipients")).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        let seqs = seqs_through(&mut stream, 5).await;
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = scrape(metrics).await;

        let delta = |series: &str| get(&after, series) - get(&before, series);
        assert_eq!(delta("herald_notifications_stored_total"), 11.0);
        assert_eq!(
            delta(r#"herald_grpc_requests_total{method="SendNotification",code="OK"}"#),
            7.0
        );
        assert_eq!(
            delta(
                r#"herald_grpc_requests_total{method="SendNotification",code="INVALID_ARGUMENT"}"#
            ),
            1.0
        );
        assert_eq!(delta("herald_send_duration_seconds_count"), 8.0);
        assert_eq!(delta("herald_events_pushed_total"), 5.0);
        assert_eq!(delta("herald_commit_to_push_seconds_count"), 5.0);
        assert!(delta("herald_commit_to_push_seconds_sum") > 0.0);
        assert_eq!(get(&after, "herald_streams_open"), 1.0);
        assert!(get(&after, r#"herald_db_pool_connections{state="idle"}"#) >= 1.0);
        assert!(
            after
                .keys()
                .any(|k| k.starts_with("herald_send_duration_seconds_bucket")),
            "histogram buckets are exported"
        );

        drop(stream);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get(&scrape(metrics).await, "herald_streams_open"), 0.0);
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}
