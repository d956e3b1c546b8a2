//! Authentication and isolation: bad tokens are UNAUTHENTICATED, a token
//! without the send scope is PERMISSION_DENIED, and users and tenants never
//! see or touch each other's streams. Test keys live in `tests/fixtures/`
//! (generated for these tests only).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::*;
use herald::{
    auth::{AuthConfig, Claims, DEFAULT_LEEWAY, SEND_SCOPE, VerificationKey},
    proto::{self, mark_read_request::Target},
    server,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::Code;

const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("fixtures/ec_private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("fixtures/ec_public.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(user: &str) -> Claims {
    Claims {
        sub: user.into(),
        tenant: String::new(),
        scope: SEND_SCOPE.into(),
        exp: now() + 600,
        iat: Some(now()),
        iss: None,
        aud: None,
    }
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(secret: &[u8], claims: &Claims) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret), claims)
}

/// An unsigned token (`alg: none`), built by hand: no library will make one.
fn unsigned(claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{body}.")
}

async fn replica_with(key: VerificationKey, audience: Option<&str>) -> server::RunningServer {
    let mut config = test_config(None);
    config.auth = AuthConfig {
        keys: vec![key],
        issuer: Some("https://id.example".into()).filter(|_| audience.is_some()),
        audience: audience.map(str::to_owned),
        leeway: DEFAULT_LEEWAY,
    };
    server::start(config).await.unwrap()
}

async fn count_with(addr: std::net::SocketAddr, token: Option<&str>) -> Result<u64, tonic::Status> {
    let mut c = client(addr).await;
    let request = match token {
        Some(t) => authed(proto::GetUnreadCountRequest::default(), t),
        None => tonic::Request::new(proto::GetUnreadCountRequest::default()),
    };
    c.get_unread_count(request)
        .await
        .map(|r| r.into_inner().unread)
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    bounded(async {
        let server = replica_with(VerificationKey::Secret(SECRET.to_vec()), None).await;
        let good = hs256(SECRET, &claims("alice"));
        assert_eq!(count_with(server.addr, Some(&good)).await.unwrap(), 0);

        let expired = Claims {
            exp: now() - 3600,
            ..claims("alice")
        };
        let not_yet = serde_json::json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 3600});
        let not_yet = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &not_yet,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let no_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"exp": now() + 600}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let cases = [
            (
                "bad signature",
                hs256(b"another-secret-another-secret-0123", &claims("alice")),
            ),
            ("expired", hs256(SECRET, &expired)),
            ("nbf in the future", not_yet),
            ("missing sub", no_sub),
            ("alg none", unsigned(&claims("alice"))),
            ("garbage", "not.a.token".into()),
            ("oversized", "a".repeat(9 * 1024)),
        ];
        for (name, token) in cases {
            let err = count_with(server.addr, Some(&token)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        }
        let err = count_with(server.addr, None).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "no token");
        server.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn rs256_and_es256_keys_verify_and_refuse_algorithm_confusion() {
    bounded(async {
        let rsa = replica_with(VerificationKey::RsaPem(RSA_PUBLIC.to_vec()), Some("herald")).await;
        let mut c = claims("alice");
        c.iss = Some("https://id.example".into());
        c.aud = Some("herald".into());
        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            &c,
        );
        assert_eq!(count_with(rsa.addr, Some(&rs)).await.unwrap(), 0);
        // HS256 signed with the RSA *public* key as the secret.
        let confused = hs256(RSA_PUBLIC, &c);
        let wrong_aud = Claims {
            aud: Some("someone-else".into()),
            ..c.clone()
        };
        let wrong_iss = Claims {
            iss: Some("https://evil.example".into()),
            ..c.clone()
        };
        for (name, token) in [
            ("HS/RS confusion", confused),
            (
                "wrong audience",
                sign(
                    Algorithm::RS256,
                    &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
                    &wrong_aud,
                ),
            ),
            (
                "wrong issuer",
                sign(
                    Algorithm::RS256,
                    &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
                    &wrong_iss,
                ),
            ),
            ("alg none", unsigned(&c)),
        ] {
            let err = count_with(rsa.addr, Some(&token)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        }
        rsa.stop(Duration::from_secs(5)).await.unwrap();

        let ec = replica_with(VerificationKey::EcPem(EC_PUBLIC.to_vec()), None).await;
        let es = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
            &claims("alice"),
        );
        assert_eq!(count_with(ec.addr, Some(&es)).await.unwrap(), 0);
        let err = count_with(ec.addr, Some(&rs)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        ec.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

async fn sending_needs_the_scope(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let err = a
        .send_notification(authed(
            note(&["alice"], "hi"),
            &token("mallory", "", "profile"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(unread(&mut a, "alice").await, 0);
    d.stop().await;
}

async fn users_are_isolated(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let mut bob_stream = subscribe(&mut a, "bob", Some(0)).await;
    until_caught_up(&mut bob_stream).await;
    let sent = send(&mut a, note(&["alice"], "for alice")).await.unwrap();
    send(&mut a, note(&["bob"], "for bob")).await.unwrap();
    let event = next_event(&mut bob_stream).await;
    assert_eq!(notification(&event).title, "for bob");

    // Bob cannot mark alice's notification read by naming its id.
    let marked = a
        .mark_read(authed(
            proto::MarkReadRequest {
                target: Some(Target::Ids(proto::NotificationIds {
                    ids: vec![sent.deliveries[0].notification_id],
                })),
            },
            &token("bob", "", ""),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marked.marked, 0);
    assert_eq!(unread(&mut a, "alice").await, 1);
    d.stop().await;
}

async fn tenants_are_isolated(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let alice_y = token("alice", "tenant-y", "");
    let mut y_stream = a
        .subscribe(authed(
            proto::SubscribeRequest {
                after_seq: Some(0),
                types: vec![],
                ..Default::default()
            },
            &alice_y,
        ))
        .await
        .unwrap()
        .into_inner();
    until_caught_up(&mut y_stream).await;

    let sender_x = token("svc", "tenant-x", SEND_SCOPE);
    a.send_notification(authed(note(&["alice"], "x only"), &sender_x))
        .await
        .unwrap();
    let sender_y = token("svc", "tenant-y", SEND_SCOPE);
    a.send_notification(authed(note(&["alice"], "y only"), &sender_y))
        .await
        .unwrap();
    let event = next_event(&mut y_stream).await;
    assert_eq!(
        (event.seq, notification(&event).title.as_str()),
        (1, "y only")
    );

    let list = a
        .list_notifications(authed(
            proto::ListNotificationsRequest {
                unread_only: false,
                page_size: 10,
                page_token: String::new(),
                ..Default::default()
            },
            &alice_y,
        ))
        .await
        .unwrap()
        .into_inner();
    let titles: Vec<_> = list
        .notifications
        .iter()
        .map(|n| n.title.as_str())
        .collect();
    assert_eq!(titles, ["y only"]);
    // The default tenant's alice has nothing.
    assert_eq!(unread(&mut a, "alice").await, 0);
    d.stop().await;
}

conformance!(
    sending_needs_the_scope,
    users_are_isolated,
    tenants_are_isolated
);

/// `claims` as given, signed with the test secret: for claims the `Claims`
/// struct would not write (arrays, fractions, extremes).
fn hs256_json(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

/// A validly signed token whose `exp` is near 2^64 seconds is accepted
/// without panicking the worker (`UNIX_EPOCH + exp` used to overflow), and
/// a stream opened with it runs: its expiry is clamped to something every
/// later computation can hold.
#[tokio::test]
async fn far_future_exp_is_accepted_without_overflow() {
    bounded(async {
        let server = replica_with(VerificationKey::Secret(SECRET.to_vec()), None).await;
        for exp in [u64::MAX, u64::MAX - 60, 1 << 63, 1 << 40] {
            let token = hs256_json(&serde_json::json!({"sub": "alice", "exp": exp}));
            let unread = count_with(server.addr, Some(&token)).await;
            assert_eq!(unread.map_err(|s| s.code()), Ok(0), "exp {exp}");
            let mut stream = client(server.addr)
                .await
                .subscribe(authed(
                    proto::SubscribeRequest {
                        after_seq: Some(0),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap_or_else(|s| panic!("exp {exp}: {s:?}"))
                .into_inner();
            until_caught_up(&mut stream).await;
        }
        server.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// `aud` may be an array of strings (RFC 7519 §4.1.3): accepted when the
/// configured audience is one of them, refused otherwise.
#[tokio::test]
async fn audience_may_be_an_array() {
    bounded(async {
        let server = replica_with(VerificationKey::Secret(SECRET.to_vec()), Some("herald")).await;
        let with_aud = |aud: serde_json::Value| {
            hs256_json(&serde_json::json!({
                "sub": "alice",
                "exp": now() + 600,
                "iss": "https://id.example",
                "aud": aud,
            }))
        };
        for aud in [
            serde_json::json!("herald"),
            serde_json::json!(["herald"]),
            serde_json::json!(["billing", "herald"]),
        ] {
            let result = count_with(server.addr, Some(&with_aud(aud.clone()))).await;
            assert_eq!(result.map_err(|s| s.code()), Ok(0), "aud {aud}");
        }
        for aud in [
            serde_json::json!("billing"),
            serde_json::json!(["billing", "reports"]),
            serde_json::json!([]),
            serde_json::json!(["herald", 7]),
        ] {
            let err = count_with(server.addr, Some(&with_aud(aud.clone())))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "aud {aud}: {err:?}");
        }
        server.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// `exp`, `nbf` and `iat` are NumericDates, which may be non-integer (RFC
/// 7519 §2): accepted, and still checked.
#[tokio::test]
async fn numeric_dates_may_have_fractions() {
    bounded(async {
        let server = replica_with(VerificationKey::Secret(SECRET.to_vec()), None).await;
        let now = now() as f64;
        let good = hs256_json(&serde_json::json!({
            "sub": "alice",
            "exp": now + 600.5,
            "nbf": now - 10.25,
            "iat": now - 10.25,
        }));
        let unread = count_with(server.addr, Some(&good)).await;
        assert_eq!(unread.map_err(|s| s.code()), Ok(0));
        for (name, claims) in [
            (
                "expired",
                serde_json::json!({"sub": "alice", "exp": now - 3600.5}),
            ),
            (
                "not yet valid",
                serde_json::json!({"sub": "alice", "exp": now + 7200.5, "nbf": now + 3600.5}),
            ),
            ("negative", serde_json::json!({"sub": "alice", "exp": -1.5})),
            (
                "beyond 2^64",
                serde_json::json!({"sub": "alice", "exp": 1e300}),
            ),
        ] {
            let err = count_with(server.addr, Some(&hs256_json(&claims)))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        }
        server.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// The clock leeway (`--jwt-leeway`, RFC 7519 §4.1.4) applies to `exp` and
/// `nbf`: with the default minute, a token expired 30 s ago, or valid in
/// 30 s, is accepted; with less, refused.
#[tokio::test]
async fn clock_leeway_is_configurable() {
    bounded(async {
        let expired = hs256_json(&serde_json::json!({"sub": "alice", "exp": now() - 30}));
        let early = hs256_json(&serde_json::json!({
            "sub": "alice",
            "exp": now() + 600,
            "nbf": now() + 30,
        }));
        for (leeway, accepted) in [
            (DEFAULT_LEEWAY, true),
            (Duration::ZERO, false),
            (Duration::from_secs(5), false),
            (Duration::from_secs(120), true),
        ] {
            let mut config = test_config(None);
            config.auth.leeway = leeway;
            let server = server::start(config).await.unwrap();
            for (name, token) in [("exp 30 s ago", &expired), ("nbf in 30 s", &early)] {
                let result = count_with(server.addr, Some(token)).await;
                let expected = if accepted {
                    Ok(0)
                } else {
                    Err(Code::Unauthenticated)
                };
                assert_eq!(
                    result.map_err(|s| s.code()),
                    expected,
                    "{name}, leeway {leeway:?}"
                );
            }
            server.stop(Duration::from_secs(5)).await.unwrap();
        }
    })
    .await;
}
