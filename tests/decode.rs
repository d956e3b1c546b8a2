//! Request bodies that are not valid protobuf are the caller's fault: a
//! truncated message, or invalid UTF-8 in a string field, gets
//! INVALID_ARGUMENT naming the problem (`src/codec.rs`), over gRPC and over
//! grpc-web, and nothing is stored. The bodies are sent as raw bytes, since
//! a generated client cannot produce them.

mod common;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use herald::server;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    Code, Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

const SEND_PATH: &str = "/herald.v1.Notifications/SendNotification";

/// A valid `SendNotificationRequest` to `recipient`, encoded.
fn valid_body(recipient: &str) -> Vec<u8> {
    note(&[recipient], "hello").encode_to_vec()
}

/// A valid body cut short inside its last field (`data`): the length prefix
/// promises more bytes than follow.
fn truncated_body(recipient: &str) -> Vec<u8> {
    let mut body = valid_body(recipient);
    body.truncate(body.len() - 3);
    body
}

/// A body that is valid except for `title` (field 3), which holds bytes
/// that are not UTF-8.
fn bad_utf8_title_body(recipient: &str) -> Vec<u8> {
    let mut body = note(&[recipient], "").encode_to_vec(); // no title field
    body.extend_from_slice(&[0x1a, 2, 0xff, 0xfe]); // field 3, length-delimited, 2 bytes
    body
}

/// Sends the request bytes as they are; the response bytes as they come.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `SendNotification` over gRPC (HTTP/2) with `body` as the request message.
async fn send_raw_grpc(addr: std::net::SocketAddr, body: Vec<u8>) -> Result<Bytes, Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to replica");
    let mut grpc = Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        authed(Bytes::from(body), &sender_token()),
        http::uri::PathAndQuery::from_static(SEND_PATH),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// `SendNotification` over grpc-web (an HTTP/1.1 POST, binary format) with
/// `body` as the request message. Returns `grpc-status` and `grpc-message`,
/// from the headers (trailers-only response) or the trailer frame.
async fn send_raw_grpc_web(addr: std::net::SocketAddr, body: &[u8]) -> (i32, String) {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(body);
    let head = format!(
        "POST {SEND_PATH} HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        sender_token(),
        frame.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&frame).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("the response within the timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // `name:value` ends in CRLF both as a header (trailers-only response)
    // and in the trailer frame; header names may be in any case.
    let lower = text.to_ascii_lowercase();
    let field = |name: &str| {
        let at = lower.find(&format!("{name}:"))? + name.len() + 1;
        let value = &text[at..];
        Some(value[..value.find("\r\n")?].trim().to_owned())
    };
    let status = field("grpc-status")
        .unwrap_or_else(|| panic!("no grpc-status in: {text}"))
        .parse()
        .unwrap_or_else(|e| panic!("bad grpc-status ({e}) in: {text}"));
    (status, field("grpc-message").unwrap_or_default())
}

/// Asserts that `recipient` has nothing stored: no unread notification, and
/// a valid send now is the stream's first event (seq 1).
async fn assert_nothing_stored(addr: std::net::SocketAddr, recipient: &str) {
    let mut client = client(addr).await;
    assert_eq!(
        unread(&mut client, recipient).await,
        0,
        "{recipient}: unread"
    );
    let sent = send(&mut client, note(&[recipient], "valid"))
        .await
        .expect("a valid send after the bad ones");
    assert_eq!(sent.deliveries[0].seq, 1, "{recipient}: first seq");
}

/// Over gRPC: a truncated body and invalid UTF-8 in `title` are
/// INVALID_ARGUMENT, with a message naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_over_grpc() {
    bounded(async {
        let deployment = Deployment::start(Backend::Memory, 1).await;
        let addr = deployment.replicas[0].addr;

        // The raw path itself works: a valid body is stored.
        send_raw_grpc(addr, valid_body("carol"))
            .await
            .expect("a valid raw body is accepted");

        let truncated = send_raw_grpc(addr, truncated_body("alice"))
            .await
            .expect_err("a truncated body is refused");
        assert_eq!(truncated.code(), Code::InvalidArgument, "{truncated:?}");
        assert!(
            truncated.message().contains("buffer underflow"),
            "{truncated:?}"
        );

        let bad_title = send_raw_grpc(addr, bad_utf8_title_body("alice"))
            .await
            .expect_err("invalid UTF-8 is refused");
        assert_eq!(bad_title.code(), Code::InvalidArgument, "{bad_title:?}");
        assert!(
            bad_title
                .message()
                .contains("SendNotificationRequest.title")
                && bad_title.message().contains("UTF-8"),
            "{bad_title:?}"
        );

        assert_nothing_stored(addr, "alice").await;
        deployment.stop().await;
    })
    .await;
}

/// Over grpc-web (HTTP/1.1, as browsers send it): the same bodies get the
/// same INVALID_ARGUMENT (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_over_grpc_web() {
    bounded(async {
        let replica = server::start(test_config(None)).await.unwrap();

        let (status, message) = send_raw_grpc_web(replica.addr, &valid_body("carol")).await;
        assert_eq!(status, 0, "a valid raw body is accepted: {message}");

        let (status, message) = send_raw_grpc_web(replica.addr, &truncated_body("bob")).await;
        assert_eq!(status, Code::InvalidArgument as i32, "truncated: {message}");
        assert!(message.contains("buffer"), "truncated: {message}");

        let (status, message) = send_raw_grpc_web(replica.addr, &bad_utf8_title_body("bob")).await;
        assert_eq!(status, Code::InvalidArgument as i32, "bad UTF-8: {message}");
        assert!(message.contains("title"), "bad UTF-8: {message}");

        assert_nothing_stored(replica.addr, "bob").await;
        replica
            .stop(std::time::Duration::from_secs(5))
            .await
            .unwrap();
    })
    .await;
}
