//! Limits and abuse: rate limits, request size, stream limits, token
//! lifetime on open streams, key rotation and `kid` tricks. A refused call
//! stores nothing.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use herald::{
    auth::{AuthConfig, Claims, VerificationKey},
    limits::RateSettings,
    proto,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::Code;
use tonic_types::StatusExt;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(secret: &[u8], header: Header, user: &str, exp: u64) -> String {
    let claims = Claims {
        sub: user.into(),
        tenant: String::new(),
        scope: herald::auth::SEND_SCOPE.into(),
        exp,
        iat: None,
        iss: None,
        aud: None,
    };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
}

async fn rate_limits_refuse_with_retry_info_and_store_nothing(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| {
        c.rates = RateSettings {
            per_sender: 1,
            sender_burst: 5,
            per_recipient: 1,
            recipient_burst: 3,
            ..RateSettings::default()
        };
    })
    .await;
    let mut a = d.client(0).await;
    for i in 0..3 {
        send(&mut a, note(&["alice"], &format!("n{i}")))
            .await
            .unwrap();
    }
    let err = send(&mut a, note(&["alice"], "one too many"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("recipients: alice"),
        "{}",
        err.message()
    );
    let retry = err.get_details_retry_info().expect("a RetryInfo detail");
    assert!(
        retry
            .retry_delay
            .is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(2))
    );
    assert_eq!(
        unread(&mut a, "alice").await,
        3,
        "the refused send stored nothing"
    );

    // The sender's own bucket (burst 5): four sends charged so far (the
    // refused one too: limits err on the strict side), one left.
    send(&mut a, note(&["bob"], "5")).await.unwrap();
    let err = send(&mut a, note(&["dave"], "6")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().starts_with("sender billing-service"),
        "{}",
        err.message()
    );
    assert_eq!(unread(&mut a, "dave").await, 0);
    d.stop().await;
}

async fn oversized_requests_are_resource_exhausted(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| c.max_request_bytes = 4 * 1024).await;
    let mut a = d.client(0).await;
    let mut big = note(&["alice"], "big");
    big.body = "x".repeat(8 * 1024); // under the body limit, over the request limit
    let err = send(&mut a, big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(unread(&mut a, "alice").await, 0);
    send(&mut a, note(&["alice"], "small")).await.unwrap();
    d.stop().await;
}

async fn stream_limits_per_user_and_per_replica(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| {
        c.streams.per_user = 2;
        c.streams.total = 3;
    })
    .await;
    let mut a = d.client(0).await;
    let first = subscribe(&mut a, "alice", None).await;
    let _second = subscribe(&mut a, "alice", None).await;
    let request = || proto::SubscribeRequest {
        after_seq: None,
        types: vec![],
        ..Default::default()
    };
    let err = a
        .subscribe(authed(request(), &token("alice", "", "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.get_details_retry_info().is_some());
    let _bob = subscribe(&mut a, "bob", None).await;
    let err = a
        .subscribe(authed(request(), &token("carol", "", "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Closing a stream frees its place.
    drop(first);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        match a
            .subscribe(authed(request(), &token("alice", "", "")))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("stream not freed: {e:?}"),
        }
    }
    d.stop().await;
}

/// A stream ends with UNAUTHENTICATED when its token expires, telling the
/// client where to resume.
async fn streams_end_when_their_token_expires(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let short = signed(
        SECRET,
        Header::new(Algorithm::HS256),
        "alice",
        unix_now() + 2,
    );
    let mut stream = a
        .subscribe(authed(
            proto::SubscribeRequest {
                after_seq: Some(0),
                types: vec![],
                ..Default::default()
            },
            &short,
        ))
        .await
        .unwrap()
        .into_inner();
    until_caught_up(&mut stream).await;
    send(&mut a, note(&["alice"], "before expiry"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut stream).await.seq, 1);
    let status = final_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("after_seq 1"),
        "{}",
        status.message()
    );
    d.stop().await;
}

conformance!(
    rate_limits_refuse_with_retry_info_and_store_nothing,
    oversized_requests_are_resource_exhausted,
    stream_limits_per_user_and_per_replica,
    streams_end_when_their_token_expires,
);

/// Two secrets during a rotation: tokens of either verify, others do not.
/// Header fields never choose the key: a `kid`/`jku` pointing elsewhere
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_and_kid_tricks() {
    bounded(async {
        let new_secret = b"the-new-secret-0123456789abcdef0123456789".to_vec();
        let mut config = test_config(None);
        config.auth = AuthConfig {
            keys: vec![
                VerificationKey::Secret(new_secret.clone()),
                VerificationKey::Secret(SECRET.to_vec()),
            ],
            issuer: None,
            audience: None,
            leeway: herald::auth::DEFAULT_LEEWAY,
        };
        let replica = herald::server::start(config).await.unwrap();
        let c = client(replica.addr).await;
        let count = |t: String| {
            let mut c = c.clone();
            async move {
                c.get_unread_count(authed(proto::GetUnreadCountRequest::default(), &t))
                    .await
            }
        };
        let exp = unix_now() + 600;
        assert!(
            count(signed(
                &new_secret,
                Header::new(Algorithm::HS256),
                "alice",
                exp
            ))
            .await
            .is_ok()
        );
        assert!(
            count(signed(SECRET, Header::new(Algorithm::HS256), "alice", exp))
                .await
                .is_ok()
        );
        let other = b"not-a-configured-secret-0123456789abcdef".to_vec();
        let err = count(signed(&other, Header::new(Algorithm::HS256), "alice", exp))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);

        let mut tricky = Header::new(Algorithm::HS256);
        tricky.kid = Some("../../../../dev/null".into());
        tricky.jku = Some("http://127.0.0.1:9/keys.json".into());
        let err = count(signed(&other, tricky.clone(), "alice", exp))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "kid/jku must not select a key"
        );
        assert!(
            count(signed(SECRET, tricky, "alice", exp)).await.is_ok(),
            "kid is ignored"
        );

        // RS256 is not among the accepted algorithms at all.
        let rsa = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")).unwrap();
        let claims = serde_json::json!({"sub": "alice", "exp": exp});
        let rs = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap();
        let err = count(rs).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("not accepted"), "{}", err.message());
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}
