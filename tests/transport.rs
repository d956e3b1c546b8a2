//! Transport bounds, tried as an outside client would: raw TCP, hand-made
//! HTTP/2 frames and raw HTTP/1.1 against a real `herald serve` process
//! with short bounds. Each test holds a replica's resources the way one
//! hole of the transport did and checks that the connection or call ends
//! within its bound, that a normal client is served meanwhile, that the
//! replica's descriptors and memory come back, and that an idle
//! `Subscribe` stream opened before survives it all.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{process::ProcessReplica, *};
use herald::proto;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Streaming, transport::Channel};

/// The bounds every test replica runs with: short, so the tests are.
const HANDSHAKE: Duration = Duration::from_secs(1);
const BODY: Duration = Duration::from_secs(1);
const CALL: Duration = Duration::from_secs(2);
const MAX_STREAMS: usize = 100;
const MAX_RESETS: usize = 50;
/// How long a bounded close may take past its bound: the 1 s GOAWAY grace
/// of a handshake timeout, plus scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

const UNREAD_PATH: &str = "/herald.v1.Notifications/GetUnreadCount";

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn start(extra: &[&str]) -> ProcessReplica {
    start_limited(extra, None).await
}

/// A replica with the tests' bounds; `overrides` are flag-value pairs
/// that replace them.
async fn start_limited(overrides: &[&str], nofile: Option<(u64, u64)>) -> ProcessReplica {
    let handshake = format!("{}ms", HANDSHAKE.as_millis());
    let body = format!("{}ms", BODY.as_millis());
    let call = format!("{}ms", CALL.as_millis());
    let streams = MAX_STREAMS.to_string();
    let resets = MAX_RESETS.to_string();
    let mut args: Vec<&str> = Vec::new();
    for (flag, value) in [
        ("--handshake-timeout", handshake.as_str()),
        ("--request-body-timeout", &body),
        ("--call-timeout", &call),
        ("--max-concurrent-streams", &streams),
        ("--max-resets-per-connection", &resets),
        ("--heartbeat-interval", "1s"),
        ("--metrics-listen", "127.0.0.1:0"),
    ] {
        if !overrides.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(overrides);
    ProcessReplica::start_with_nofile(None, &args, &[], nofile).await
}

/// `/metrics` of `replica` as text.
async fn scrape(replica: &ProcessReplica) -> String {
    let addr = replica.metrics_addr().expect("the replica serves metrics");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(EVENT_TIMEOUT, s.read_to_string(&mut out))
        .await
        .expect("metrics within the timeout")
        .unwrap();
    out
}

/// The value of `series` (name and labels exactly as exported), 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A client with an idle stream of `alice`, caught up.
async fn idle_stream(
    addr: SocketAddr,
) -> (
    proto::notifications_client::NotificationsClient<Channel>,
    Streaming<proto::Event>,
) {
    let mut c = client(addr).await;
    let mut stream = subscribe(&mut c, "alice", None).await;
    until_caught_up(&mut stream).await;
    (c, stream)
}

/// The idle stream got through everything: a new notification arrives on
/// it.
async fn still_live(
    c: &mut proto::notifications_client::NotificationsClient<Channel>,
    stream: &mut Streaming<proto::Event>,
    title: &str,
) {
    send(c, note(&["alice"], title)).await.unwrap();
    assert_eq!(notification(&next_event(stream).await).title, title);
}

/// A new client on a new connection is served.
async fn served(addr: SocketAddr) {
    let call = async {
        let mut c = client(addr).await;
        unread(&mut c, "bob").await
    };
    tokio::time::timeout(EVENT_TIMEOUT, call)
        .await
        .expect("a normal client is served within the timeout");
}

/// Waits until the replica holds at most `most` descriptors; fails after
/// `within`.
async fn fds_back_to(replica: &ProcessReplica, most: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let fds = replica.fd_count();
        if fds <= most {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica still holds {fds} descriptors, expected at most {most}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads until the server closes the connection; returns what it sent.
/// Fails unless that happens by `deadline`.
async fn closed_by(mut s: TcpStream, deadline: Instant, what: &str) -> (Instant, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open at its deadline"),
            Ok(Ok(0)) | Ok(Err(_)) => return (Instant::now(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/2 frame (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 §6.5.2).
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// A HEADERS block opening a GetUnreadCount call with no token, in HPACK
/// literals without indexing (RFC 7541 §6.2.2), so no state is shared.
fn unread_call_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", UNREAD_PATH),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Frames read from the server until it closes, at most until `deadline`.
async fn frames_until_closed(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    deadline: Instant,
) -> Vec<(u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline.into(), s.read_exact(&mut head)).await {
            Err(_) => panic!(
                "the connection is still open at its deadline; got {} frames",
                frames.len()
            ),
            Ok(Err(_)) => return frames,
            Ok(Ok(_)) => {}
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if tokio::time::timeout_at(deadline.into(), s.read_exact(&mut payload))
            .await
            .is_err()
        {
            panic!("a frame cut short");
        }
        frames.push((head[3], stream, payload));
    }
}

fn error_code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

/// Hole 1: connections that send nothing, stop inside the HTTP/2 preface,
/// stop after it (SETTINGS but no request), or stop inside HTTP/1.1
/// headers are all closed at the handshake timeout, not before; a normal
/// client is served meanwhile; descriptors come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_make_a_request_are_closed_at_the_handshake_timeout() {
    bounded(async {
        let replica = start(&[]).await;
        let (mut c, mut stream) = idle_stream(replica.addr).await;
        let fds = replica.fd_count();
        let before = scrape(&replica).await;

        const EACH: usize = 60;
        let opened = Instant::now();
        let mut raw = Vec::new();
        for i in 0..4 * EACH {
            let mut s = TcpStream::connect(replica.addr).await.unwrap();
            match i % 4 {
                0 => {}                                          // nothing at all
                1 => s.write_all(&PREFACE[..23]).await.unwrap(), // inside the preface
                2 => {
                    // The whole preface and SETTINGS: HTTP/2, but no request.
                    s.write_all(PREFACE).await.unwrap();
                    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
                }
                _ => s
                    .write_all(b"POST /herald.v1.Notifications/GetUnreadCount HTTP/1.1\r\nHost:")
                    .await
                    .unwrap(),
            }
            raw.push(s);
        }
        served(replica.addr).await;

        let deadline = opened + HANDSHAKE + SLACK;
        let closes = futures_util::future::join_all(raw.into_iter().enumerate().map(|(i, s)| {
            closed_by(
                s,
                deadline,
                ["silent", "mid-preface", "after preface", "mid-headers"][i % 4],
            )
        }))
        .await;
        let first = closes.iter().map(|(at, _)| *at).min().unwrap();
        assert!(
            first.duration_since(opened) >= HANDSHAKE - Duration::from_millis(200),
            "closed before the handshake timeout: after {:?}",
            first.duration_since(opened)
        );
        for (i, (_, sent)) in closes.iter().enumerate().filter(|(i, _)| i % 4 == 2) {
            // HTTP/2 got that far: a GOAWAY said goodbye before the close.
            let goaway = sent
                .windows(4)
                .any(|w| w[3] == GOAWAY && w[..3] == [0, 0, 8]);
            assert!(goaway, "connection {i}: no GOAWAY in {sent:?}");
        }

        fds_back_to(&replica, fds + 2, Duration::from_secs(5)).await;
        let after = scrape(&replica).await;
        let closed = r#"herald_connections_closed_total{reason="handshake_timeout"}"#;
        assert_eq!(
            sample(&after, closed) - sample(&before, closed),
            (4 * EACH) as f64,
            "{after}"
        );
        still_live(&mut c, &mut stream, "after the handshakes").await;
    })
    .await;
}

/// A GetUnreadCount call on an HTTP/2 connection (`h2` client), with
/// `token` if given; returns its `grpc-status` (trailers-only or trailers).
async fn unread_over_h2(send: &mut h2::client::SendRequest<Bytes>, token: Option<&str>) -> String {
    let mut request = http::Request::post(format!("http://localhost{UNREAD_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let ready = send.clone().ready().await.expect("the connection is open");
    *send = ready;
    let (response, mut body) = send.send_request(request.body(()).unwrap(), false).unwrap();
    // An empty GetUnreadCountRequest: flag 0, length 0.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = tokio::time::timeout(EVENT_TIMEOUT, response)
        .await
        .expect("an answer")
        .expect("answered, not reset");
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

/// An HTTP/2 connection to `addr` (`h2` client) and the task driving it,
/// which ends when the server closes the connection.
async fn h2_connection(
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, driver)
}

/// The handshake lasts until a request authenticates: an HTTP/2 connection
/// whose calls carried no valid token is closed once it has been idle for
/// the handshake timeout after its last call (or busy with a call whose
/// answer it never reads for the call timeout more), while a connection
/// that made an authenticated call may stay idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_an_authenticated_call_are_closed_when_idle() {
    bounded(async {
        let replica = start(&[]).await;
        let (mut c, mut stream) = idle_stream(replica.addr).await;
        let fds = replica.fd_count();

        let (mut anonymous, anonymous_closed) = h2_connection(replica.addr).await;
        // Unauthenticated calls keep the connection open while they last.
        for _ in 0..3 {
            assert_eq!(unread_over_h2(&mut anonymous, None).await, "16");
            tokio::time::sleep(HANDSHAKE / 2).await;
        }
        // (Connected now: until their first call, the accept starts the clock.)
        let (mut forged, forged_closed) = h2_connection(replica.addr).await;
        let (mut member, member_closed) = h2_connection(replica.addr).await;
        let forged_token = token("carol", "", "").replace('.', "x.");
        assert_eq!(unread_over_h2(&mut forged, Some(&forged_token)).await, "16");
        assert_eq!(
            unread_over_h2(&mut member, Some(&token("dave", "", ""))).await,
            "0"
        );
        let idle = Instant::now();

        for (what, closed) in [("anonymous", anonymous_closed), ("forged", forged_closed)] {
            tokio::time::timeout_at((idle + HANDSHAKE + SLACK).into(), closed)
                .await
                .unwrap_or_else(|_| panic!("{what}: still open"))
                .unwrap();
            assert!(
                idle.elapsed() >= HANDSHAKE - Duration::from_millis(600),
                "{what}: closed before it was idle for the handshake timeout"
            );
        }
        // A client that never reads its answers (a zero flow-control
        // window) keeps an unauthenticated call in flight: the connection
        // is closed once it has been busy for the call plus the handshake
        // timeout.
        let tcp = TcpStream::connect(replica.addr).await.unwrap();
        let (stalled, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        let stalled_closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut stalled = stalled.ready().await.unwrap();
        let check = http::Request::post("http://localhost/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut body) = stalled.send_request(check, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let response = response.await.expect("headers arrive whatever the window");
        let busy = Instant::now();
        tokio::time::timeout_at((busy + CALL + HANDSHAKE + SLACK).into(), stalled_closed)
            .await
            .expect("the stalled connection is closed")
            .unwrap();
        assert!(
            busy.elapsed() >= CALL + HANDSHAKE - Duration::from_millis(600),
            "closed after {:?}, before it was busy for the call and handshake timeouts",
            busy.elapsed()
        );
        drop((response, stalled));

        tokio::time::sleep_until((idle + HANDSHAKE + SLACK).into()).await;
        assert!(
            !member_closed.is_finished(),
            "the authenticated connection was closed"
        );
        assert_eq!(
            unread_over_h2(&mut member, Some(&token("dave", "", ""))).await,
            "0"
        );

        drop(member);
        fds_back_to(&replica, fds + 2, Duration::from_secs(5)).await;
        still_live(&mut c, &mut stream, "after the idle connections").await;
    })
    .await;
}

/// Hole 3: grpc-web POSTs over HTTP/1.1 that promise 1,000 bytes, send 3
/// and then a byte every 300 ms end with DEADLINE_EXCEEDED at the request
/// body timeout, and hyper closes each connection (it cannot skip the rest
/// of the body); a normal client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_never_finish_end_at_the_body_timeout() {
    bounded(async {
        let replica = start(&[]).await;
        let (mut c, mut stream) = idle_stream(replica.addr).await;
        let fds = replica.fd_count();
        let before = scrape(&replica).await;

        const CALLS: usize = 40;
        let opened = Instant::now();
        let mut calls = Vec::new();
        for _ in 0..CALLS {
            let s = TcpStream::connect(replica.addr).await.unwrap();
            let (mut read, mut write) = s.into_split();
            write
                .write_all(
                    format!(
                        "POST {UNREAD_PATH} HTTP/1.1\r\nHost: x\r\n\
                         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
                         Content-Length: 1000\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            write.write_all(&[0, 0, 0]).await.unwrap();
            let trickle = tokio::spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if write.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
            });
            calls.push(tokio::spawn(async move {
                let mut response = Vec::new();
                let read = tokio::time::timeout_at(
                    (opened + BODY + SLACK).into(),
                    read.read_to_end(&mut response),
                )
                .await;
                trickle.abort();
                (
                    read.is_ok(),
                    String::from_utf8_lossy(&response).into_owned(),
                )
            }));
        }
        served(replica.addr).await;
        for call in calls {
            let (closed, response) = call.await.unwrap();
            assert!(closed, "the connection is still open: {response}");
            let lower = response.to_ascii_lowercase();
            assert!(lower.starts_with("http/1.1 200"), "{response}");
            assert!(
                lower.contains("grpc-status: 4") || lower.contains("grpc-status:4"),
                "DEADLINE_EXCEEDED: {response}"
            );
        }
        assert!(opened.elapsed() >= BODY, "ended before the body timeout");

        fds_back_to(&replica, fds + 2, Duration::from_secs(5)).await;
        let after = scrape(&replica).await;
        let timed_out = r#"herald_calls_timed_out_total{bound="request_body"}"#;
        assert_eq!(
            sample(&after, timed_out) - sample(&before, timed_out),
            CALLS as f64
        );
        still_live(&mut c, &mut stream, "after the slow bodies").await;
    })
    .await;
}

const CONNECTIONS: usize = 4;
const PER_CONNECTION: usize = 2 * MAX_STREAMS;

/// Opens [`CONNECTIONS`] HTTP/2 connections, checks that each advertises
/// MAX_CONCURRENT_STREAMS, and starts [`PER_CONNECTION`] GetUnreadCount
/// calls on each with no token and a request that never ends (no
/// END_STREAM). Each task returns its calls' `grpc-status`es and how many
/// times a call was refused (REFUSED_STREAM: h2 may still count a stream the
/// client saw end; the call was not processed, so it is sent again, as gRPC
/// clients do).
async fn open_requests(
    addr: SocketAddr,
) -> Vec<tokio::task::JoinHandle<(Vec<Option<String>>, usize)>> {
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        connections.push(tokio::spawn(async move {
            let mut send = send.ready().await.unwrap();
            // The server's SETTINGS arrive with its first frames.
            let deadline = Instant::now() + EVENT_TIMEOUT;
            while send.current_max_send_streams() != MAX_STREAMS {
                assert!(
                    Instant::now() < deadline,
                    "MAX_CONCURRENT_STREAMS {} advertised",
                    send.current_max_send_streams()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let request = || {
                http::Request::post(format!("http://localhost{UNREAD_PATH}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap()
            };
            let mut calls = Vec::new();
            for _ in 0..PER_CONNECTION {
                // Waits for a free slot once MAX_CONCURRENT_STREAMS are open.
                send = send.ready().await.unwrap();
                let (response, body) = send.send_request(request(), false).unwrap();
                let mut again = send.clone();
                calls.push(tokio::spawn(async move {
                    let (mut response, mut body, mut refused) = (response, body, 0);
                    loop {
                        match response.await {
                            Ok(response) => {
                                drop(body); // never ended
                                let status = response.headers().get("grpc-status");
                                return (status.map(|s| s.to_str().unwrap().to_owned()), refused);
                            }
                            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                                refused += 1;
                                again = again.ready().await.unwrap();
                                (response, body) = again.send_request(request(), false).unwrap();
                            }
                            Err(e) => panic!("reset: {e}"),
                        }
                    }
                }));
            }
            let (mut statuses, mut refused) = (Vec::new(), 0);
            for call in calls {
                let (status, refusals) = call.await.unwrap();
                statuses.push(status);
                refused += refusals;
            }
            (statuses, refused)
        }));
    }
    connections
}

/// Hole 4: each HTTP/2 connection advertises MAX_CONCURRENT_STREAMS, and
/// calls with no token whose request never ends are answered
/// DEADLINE_EXCEEDED at the body timeout, freeing their slots for the calls
/// queued behind them. A normal client is served meanwhile, and a second
/// round costs no more memory than the first (nothing is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped_and_open_requests_end() {
    bounded(async {
        // Refusals of a compliant client racing a freed slot count as
        // server-side resets; this test is not about their limit.
        let replica = start(&["--max-resets-per-connection", "1000"]).await;
        let (mut c, mut stream) = idle_stream(replica.addr).await;
        let fds = replica.fd_count();
        let (rss_before, _) = replica.memory_kib();
        let mut rss = Vec::new();
        for round in 0..2 {
            let opened = Instant::now();
            let connections = open_requests(replica.addr).await;
            tokio::time::sleep(BODY / 2).await;
            served(replica.addr).await;
            let (held, _) = replica.memory_kib();
            for connection in connections {
                let (statuses, refused) =
                    tokio::time::timeout_at((opened + 2 * BODY + SLACK).into(), connection)
                        .await
                        .expect("every call ends within two body timeouts")
                        .unwrap();
                assert!(refused < MAX_STREAMS, "{refused} refusals");
                assert_eq!(statuses.len(), PER_CONNECTION);
                for status in statuses {
                    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
                }
            }
            assert!(opened.elapsed() >= 2 * BODY, "round {round} ended early");
            fds_back_to(&replica, fds + 2, Duration::from_secs(5)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (after, _) = replica.memory_kib();
            rss.push((held, after));
        }
        println!(
            "RSS {rss_before} KiB before; (with {} calls open, after) per round: {rss:?} KiB",
            CONNECTIONS * MAX_STREAMS
        );
        assert!(
            rss[1].1 <= rss[0].1 + 4 * 1024,
            "the second round kept memory: {rss:?} KiB"
        );
        still_live(&mut c, &mut stream, "after the open requests").await;
    })
    .await;
}

/// Holes 4 and 5, for a client that ignores MAX_CONCURRENT_STREAMS: streams
/// beyond it are refused (RST_STREAM REFUSED_STREAM, a server-side reset),
/// and after --max-resets-per-connection of them the server sends GOAWAY
/// ENHANCE_YOUR_CALM and closes the connection, however many more streams
/// the client opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_resets_are_bounded_by_goaway() {
    bounded(async {
        let replica = start(&[]).await;
        let (mut c, mut stream) = idle_stream(replica.addr).await;
        let fds = replica.fd_count();
        let before = scrape(&replica).await;

        let s = TcpStream::connect(replica.addr).await.unwrap();
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        let block = unread_call_headers();
        const OPENED: u32 = 4_000;
        for i in 0..OPENED {
            out.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
        }
        // Written from another task: the server stops reading once it has
        // said GOAWAY.
        let (mut read, mut write) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&out).await;
            write
        });
        let frames = frames_until_closed(&mut read, Instant::now() + SLACK).await;
        writer.abort();

        let settings = frames
            .iter()
            .find(|(kind, stream, payload)| {
                *kind == SETTINGS && *stream == 0 && !payload.is_empty()
            })
            .expect("the server's SETTINGS");
        let advertised = settings.2.chunks(6).find_map(|setting| {
            (u16::from_be_bytes([setting[0], setting[1]]) == MAX_CONCURRENT_STREAMS)
                .then(|| error_code(setting, 2))
        });
        assert_eq!(
            advertised,
            Some(MAX_STREAMS as u32),
            "MAX_CONCURRENT_STREAMS"
        );
        let refused: Vec<u32> = frames
            .iter()
            .filter(|(kind, _, payload)| {
                *kind == RST_STREAM && error_code(payload, 0) == REFUSED_STREAM
            })
            .map(|(_, stream, _)| *stream)
            .collect();
        assert_eq!(refused.len(), MAX_RESETS, "streams refused before GOAWAY");
        assert!(
            refused.iter().all(|id| *id > 2 * MAX_STREAMS as u32),
            "only streams beyond the limit are refused: {refused:?}"
        );
        let goaways: Vec<_> = frames
            .iter()
            .filter(|(kind, _, _)| *kind == GOAWAY)
            .collect();
        assert_eq!(goaways.len(), 1, "one GOAWAY");
        assert_eq!(error_code(&goaways[0].2, 4), ENHANCE_YOUR_CALM);
        assert!(
            error_code(&goaways[0].2, 0) < OPENED,
            "the GOAWAY's last stream id is short of the streams opened"
        );

        served(replica.addr).await;
        fds_back_to(&replica, fds + 2, Duration::from_secs(5)).await;
        let after = scrape(&replica).await;
        let closed = r#"herald_connections_closed_total{reason="reset_limit"}"#;
        assert_eq!(sample(&after, closed) - sample(&before, closed), 1.0);
        still_live(&mut c, &mut stream, "after the resets").await;
    })
    .await;
}

/// Start-up raises the soft open-files limit to the hard one and logs
/// both; with soft = hard it says there was nothing to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_limit() {
    bounded(async {
        let raised = start_limited(&[], Some((200, 300))).await;
        assert_eq!(raised.open_files_limit(), (300, 300));
        let line = &raised.logged("raised the open-files limit")[0]["fields"];
        assert_eq!(
            (
                line["soft_before"].as_u64(),
                line["soft"].as_u64(),
                line["hard"].as_u64()
            ),
            (Some(200), Some(300), Some(300)),
            "{line}"
        );
        let level = start_limited(&[], Some((300, 300))).await;
        assert_eq!(level.open_files_limit(), (300, 300));
        let line = &level.logged("open-files limit (RLIMIT_NOFILE) already")[0]["fields"];
        assert_eq!(
            (line["soft"].as_u64(), line["hard"].as_u64()),
            (Some(300), Some(300))
        );
        assert!(level.logged("raised the open-files limit").is_empty());
    })
    .await;
}

/// Hole 2: idle connections fill the replica's descriptor table (a low
/// hard limit, so raising the soft one does not help). Accepting backs off
/// instead of spinning (the replica's CPU over the hold stays far below a
/// core), is counted and warned about at most every 10 s; the open stream
/// and calls on an open connection go on; a new client waits and is served
/// as soon as descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_descriptor_table_neither_locks_out_nor_spins() {
    bounded(async {
        const LIMIT: u64 = 256;
        const HOLD: Duration = Duration::from_secs(4);
        // Idle connections must outlive the hold: no handshake timeout then.
        let replica =
            start_limited(&["--handshake-timeout", "60s"], Some((LIMIT / 2, LIMIT))).await;
        assert_eq!(
            replica.open_files_limit(),
            (LIMIT, LIMIT),
            "raised to the hard limit"
        );
        let (mut c, mut stream) = idle_stream(replica.addr).await;

        // Fill the table: connect until the replica stops accepting.
        let mut idle = Vec::new();
        for _ in 0..LIMIT + 64 {
            idle.push(TcpStream::connect(replica.addr).await.unwrap());
        }
        let full = Instant::now() + EVENT_TIMEOUT;
        while replica.fd_count() < LIMIT as usize {
            assert!(Instant::now() < full, "{} descriptors", replica.fd_count());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A new client meanwhile: its TCP handshake completes in the
        // kernel's backlog, but the replica cannot accept it yet.
        let addr = replica.addr;
        let newcomer = tokio::spawn(async move {
            let started = Instant::now();
            let mut c = client(addr).await;
            (unread(&mut c, "bob").await, started.elapsed())
        });
        // A scrape meanwhile: the metrics port shares the table (and must
        // not spin either).
        let metrics_addr = replica.metrics_addr().expect("the replica serves metrics");
        let scraper = tokio::spawn(async move {
            let mut s = TcpStream::connect(metrics_addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        });
        let cpu_before = replica.cpu_time();
        let held = Instant::now();
        tokio::time::sleep(HOLD / 2).await;
        // What is open keeps working: a call and a send on the open
        // connection, delivered to the open stream.
        still_live(&mut c, &mut stream, "while the table is full").await;
        tokio::time::sleep(HOLD.saturating_sub(held.elapsed())).await;
        let cpu = replica.cpu_time() - cpu_before;
        let hold = held.elapsed();
        println!("replica CPU over a {hold:?} hold with a full table: {cpu:?}");
        assert!(
            cpu.as_secs_f64() < 0.3 * hold.as_secs_f64(),
            "accepting spins: {cpu:?} of CPU over {hold:?}"
        );
        assert!(!newcomer.is_finished(), "served while the table was full?");

        // Free descriptors: the waiting client gets in.
        idle.truncate(idle.len() / 2);
        let (count, waited) = tokio::time::timeout(EVENT_TIMEOUT, newcomer)
            .await
            .expect("the new client is served once descriptors free up")
            .unwrap();
        assert_eq!(count, 0);
        println!("the new client waited {waited:?}");
        drop(idle);

        let metrics = tokio::time::timeout(EVENT_TIMEOUT, scraper)
            .await
            .expect("the waiting scrape is answered once descriptors free up")
            .unwrap();
        for listener in ["grpc", "metrics"] {
            let series =
                format!(r#"herald_accept_errors_total{{listener="{listener}",kind="out_of_fds"}}"#);
            assert!(sample(&metrics, &series) >= 1.0, "{series}: {metrics}");
        }
        let warnings = replica.logged("cannot accept connections: out of file descriptors");
        assert!(
            (1..=4).contains(&warnings.len()),
            "one warning per listener and 10 s at most: {warnings:?}"
        );
        still_live(&mut c, &mut stream, "after the table was full").await;
    })
    .await;
}
