//! Running it in production: SIGTERM drain, gRPC health following the
//! database, request ids in JSON logs, reflection, and grpc-web with CORS.

mod common;

use std::time::{Duration, Instant};

use common::{process::ProcessReplica, proxy::TcpProxy, *};
use herald::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// SIGTERM to a replica holding 50 of 100 open streams (the other 50 on a
/// second replica) while sends go on: every stream on it ends with
/// UNAVAILABLE, resumes on the other replica, and every stream sees every
/// event once, in order; the process exits 0 within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_to_the_other_replica() {
    bounded(async {
        const USERS: usize = 50;
        const PER_USER: u64 = 12;
        let db = TestDb::create().await;
        let mut a = ProcessReplica::start(Some(&db.url), &["--shutdown-grace", "5s"], &[]).await;
        let b = server::start(test_config(Some(db.url.clone())))
            .await
            .unwrap();

        let mut followers = Vec::new();
        for u in 0..USERS {
            let user = format!("user-{u}");
            followers.push(tokio::spawn(follow(
                vec![a.addr, b.addr],
                user.clone(),
                PER_USER,
            )));
            followers.push(tokio::spawn(follow(vec![b.addr], user, PER_USER)));
        }
        // Let the streams open before the first send.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut sender = client(b.addr).await;
        let recipients: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
        let all: Vec<&str> = recipients.iter().map(String::as_str).collect();
        let mut terminated_at = None;
        for round in 0..PER_USER {
            send(&mut sender, note(&all, &format!("round {round}")))
                .await
                .unwrap();
            if round == PER_USER / 2 {
                a.terminate();
                terminated_at = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let status = tokio::time::timeout(Duration::from_secs(10), a.child.wait())
            .await
            .expect("process exits after SIGTERM")
            .unwrap();
        let took = terminated_at.unwrap().elapsed();
        assert!(status.success(), "exit status {status:?}");
        assert!(
            took < Duration::from_secs(6),
            "exited {took:?} after SIGTERM, grace is 5 s"
        );

        let mut drained = 0;
        for (i, f) in followers.into_iter().enumerate() {
            let seen = f.await.unwrap();
            assert_exactly_once_in_order(&seen.seqs, PER_USER, &format!("stream {i}"));
            if i % 2 == 0 {
                assert_eq!(
                    seen.ends.first(),
                    Some(&Code::Unavailable),
                    "stream {i}: {:?}",
                    seen.ends
                );
                drained += 1;
            } else {
                assert!(
                    seen.ends.is_empty(),
                    "stream {i} on the surviving replica ended: {:?}",
                    seen.ends
                );
            }
        }
        assert_eq!(drained, USERS);
        b.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// The database becomes unreachable (a proxy in between closes and refuses
/// connections): health turns NOT_SERVING and sends fail with UNAVAILABLE;
/// when it is reachable again, health returns to SERVING and a stream gets
/// new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    bounded(async {
        let db = TestDb::create().await;
        let proxy = TcpProxy::start(db.server_addr()).await;
        let mut config = test_config(Some(db.url_via(proxy.addr)));
        config.health_check_interval = Duration::from_millis(200);
        config.pool_timeout = Duration::from_secs(1);
        config.listener.ping_interval = Duration::from_millis(300);
        config.listener.ping_timeout = Duration::from_secs(1);
        let replica = server::start(config).await.unwrap();
        wait_health(replica.addr, ServingStatus::Serving, Duration::from_secs(5)).await;

        let mut c = client(replica.addr).await;
        proxy.refuse();
        wait_health(
            replica.addr,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
        let err = send(&mut c, note(&["alice"], "during outage"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");

        proxy.forward();
        wait_health(
            replica.addr,
            ServingStatus::Serving,
            Duration::from_secs(20),
        )
        .await;
        let mut stream = subscribe(&mut c, "alice", Some(0)).await;
        until_caught_up(&mut stream).await;
        send(&mut c, note(&["alice"], "after")).await.unwrap();
        assert_eq!(notification(&next_event(&mut stream).await).title, "after");
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_once_the_drain_starts() {
    bounded(async {
        let replica = server::start(test_config(None)).await.unwrap();
        wait_health(replica.addr, ServingStatus::Serving, Duration::from_secs(5)).await;
        let mut c = HealthClient::new(
            tonic::transport::Channel::from_shared(format!("http://{}", replica.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let mut watch = c
            .watch(HealthCheckRequest {
                service: "herald.v1.Notifications".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        replica.shutdown_token().cancel();
        let next = tokio::time::timeout(EVENT_TIMEOUT, watch.message())
            .await
            .unwrap();
        if let Ok(Some(r)) = next {
            assert_eq!(r.status(), ServingStatus::NotServing);
        } // else: the stream was closed by the drain, which is also fine
        replica.wait(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// Stopping a replica waits for every background job it started (the bus
/// listener, group-commit writers, retention, health, rate-limit sweep,
/// metrics endpoint), also with streams open and sends just made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_every_background_job() {
    bounded(async {
        let db = TestDb::create().await;
        let mut config = test_config(Some(db.url.clone()));
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let replica = server::start(config).await.unwrap();
        let jobs = replica.jobs();
        assert!(jobs.running() >= 6, "{} jobs", jobs.running());
        let mut c = client(replica.addr).await;
        let mut stream = subscribe(&mut c, "alice", Some(0)).await;
        until_caught_up(&mut stream).await;
        send(&mut c, note(&["alice"], "n")).await.unwrap();
        replica.stop(Duration::from_secs(10)).await.unwrap();
        assert_eq!(jobs.running(), 0, "every job returned before stop did");
    })
    .await;
}

/// A send carrying `x-request-id` is logged (JSON) with that id, and the id
/// is echoed in the response metadata; without one, an id is generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_callers_request_id() {
    bounded(async {
        let replica = ProcessReplica::start(None, &[], &[("RUST_LOG", "info,herald=debug")]).await;
        let mut c = client(replica.addr).await;
        let mut request = authed(note(&["alice"], "hi"), &sender_token());
        request
            .metadata_mut()
            .insert("x-request-id", "req-7f3a-test".parse().unwrap());
        let response = c.send_notification(request).await.unwrap();
        assert_eq!(
            response.metadata().get("x-request-id").unwrap(),
            "req-7f3a-test"
        );

        let generated = c
            .send_notification(authed(note(&["alice"], "hi"), &sender_token()))
            .await
            .unwrap();
        let id = generated
            .metadata()
            .get("x-request-id")
            .expect("a generated request id");
        assert_eq!(id.to_str().unwrap().len(), 36, "a UUID: {id:?}");

        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = replica.json_logs().into_iter().any(|line| {
                line["fields"]["message"] == "notification stored"
                    && line["span"]["request_id"] == "req-7f3a-test"
                    && line["span"]["method"] == "/herald.v1.Notifications/SendNotification"
            });
            if found {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no JSON log line with the request id:\n{:#?}",
                replica.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    bounded(async {
        let replica = server::start(test_config(None)).await.unwrap();
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", replica.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected {response:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"herald.v1.Notifications"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// A raw HTTP/1.1 request, returning the whole response as text.
async fn http1(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}Host: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// grpc-web over HTTP/1.1 on the gRPC port: an allowed origin gets the CORS
/// headers and the gRPC status in the trailer frame; another origin gets
/// none (so browsers refuse the response); preflight answers likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_with_cors_for_allowed_origins_only() {
    bounded(async {
        let mut config = test_config(None);
        config.cors_origins = vec!["http://app.example".into()];
        let replica = server::start(config).await.unwrap();
        let token = token("alice", "", "");
        // An empty GetUnreadCountRequest: flag 0, length 0.
        let frame = [0u8, 0, 0, 0, 0];
        let call = |origin: &str| {
            format!(
                "POST /herald.v1.Notifications/GetUnreadCount HTTP/1.1\r\n\
                 Origin: {origin}\r\nContent-Type: application/grpc-web+proto\r\n\
                 X-Grpc-Web: 1\r\nAuthorization: Bearer {token}\r\n"
            )
        };
        let allowed = http1(replica.addr, &call("http://app.example"), &frame).await;
        let lower = allowed.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200"), "{allowed}");
        assert!(lower.contains("access-control-allow-origin: http://app.example"), "{allowed}");
        assert!(lower.contains("access-control-expose-headers:"), "{allowed}");
        assert!(lower.contains("grpc-status"), "{allowed}");
        assert!(allowed.contains("grpc-status:0"), "trailer frame with OK: {allowed}");

        let other = http1(replica.addr, &call("http://evil.example"), &frame).await;
        assert!(!other.to_ascii_lowercase().contains("access-control-allow-origin"), "{other}");

        let preflight = |origin: &str| {
            format!(
                "OPTIONS /herald.v1.Notifications/Subscribe HTTP/1.1\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: authorization,content-type,x-grpc-web,x-user-agent\r\n"
            )
        };
        let ok = http1(replica.addr, &preflight("http://app.example"), b"").await.to_ascii_lowercase();
        assert!(ok.contains("access-control-allow-origin: http://app.example"), "{ok}");
        assert!(ok.contains("access-control-allow-headers:") && ok.contains("authorization"), "{ok}");
        let refused = http1(replica.addr, &preflight("http://evil.example"), b"").await;
        assert!(!refused.to_ascii_lowercase().contains("access-control-allow-origin"), "{refused}");

        // No token over grpc-web: UNAUTHENTICATED (16) in the status.
        let anonymous = http1(
            replica.addr,
            "POST /herald.v1.Notifications/GetUnreadCount HTTP/1.1\r\n\
             Origin: http://app.example\r\nContent-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n",
            &frame,
        )
        .await;
        assert!(anonymous.contains("grpc-status: 16") || anonymous.contains("grpc-status:16"), "{anonymous}");
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}
