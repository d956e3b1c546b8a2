//! Token verification: `authorization: Bearer <JWT>` metadata (RFC 6750
//! §2.1) → [`Identity`]. Identity comes only from a verified token, never
//! from a request field.
//!
//! Tokens are JWTs (RFC 7519) signed with HS256, RS256 or ES256 (RFC 7518
//! §3). Several keys may be configured at once (key rotation); each accepts
//! only the algorithm it is for, so a token cannot choose its own (`alg:
//! none` and HS/RS confusion fail), and header fields such as `kid` or `jku`
//! never select a key. `exp` and `sub` are required; `nbf` is enforced when
//! present; `iss` and `aud` are checked when configured. Claims are read as
//! RFC 7519 writes them, not only as `herald token` does: `aud` may be an
//! array (§4.1.3), dates may have fractions (§2).
//!
//! Refusals are [`AuthError`]s; `api::status` turns them into
//! `UNAUTHENTICATED` or `PERMISSION_DENIED`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::notification::{InvalidArgument, Tenant, UserId};

/// Scope a token needs to call `SendNotification` and `SendNotifications`.
pub const SEND_SCOPE: &str = "notifications:send";

/// The HS256 secret `--dev` uses. Public knowledge: anyone can mint tokens
/// with it, which is why `--dev` binds to loopback only.
pub const DEV_SECRET: &str = "herald-dev-secret-insecure-do-not-use-in-production";

/// Longest token accepted, in bytes; longer ones are refused before any
/// signature check.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock leeway when none is configured: jsonwebtoken's default, 60 s.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

/// Largest clock leeway accepted. Leeway absorbs clock skew between the
/// token issuer and Herald, "usually no more than a few minutes" (RFC 7519
/// §4.1.4); an hour of it is a misconfiguration.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Latest expiry Herald believes, counted from now: 100 years. A token may
/// claim any `exp` up to 2^64 seconds (RFC 7519 §2 sets no bound), which no
/// clock can hold; [`Identity::expires_at`] is clamped to this so that
/// adding `expires_at - now` to any `SystemTime` or `Instant` of the
/// process cannot overflow.
pub const MAX_EXPIRY_AHEAD: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The claims Herald reads from (and `herald token` writes into) a JWT.
///
/// Reading accepts what RFC 7519 allows, not only what `herald token`
/// writes: `aud` as a string or an array, and NumericDates with fractions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user (RFC 7519 §4.1.2).
    pub sub: String,
    /// Tenant; absent or empty is the default tenant.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// Space-separated scopes (RFC 8693 §4.2), e.g. `notifications:send`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// Expiry, seconds since the Unix epoch (RFC 7519 §4.1.4); read as a
    /// NumericDate, whose fraction is dropped.
    #[serde(deserialize_with = "numeric_date")]
    pub exp: u64,
    /// Issued-at, seconds since the Unix epoch (RFC 7519 §4.1.6); read as a
    /// NumericDate.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_numeric_date"
    )]
    pub iat: Option<u64>,
    /// Issuer (RFC 7519 §4.1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience (RFC 7519 §4.1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim (RFC 7519 §4.1.3): "an array of case-sensitive strings
/// [...] In the special case when the JWT has one audience, the `aud` value
/// MAY be a single case-sensitive string". Checking it against
/// `--jwt-audience` is jsonwebtoken's: accepted when the configured
/// audience is among the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience, written as a JSON string.
    One(String),
    /// Any number of audiences, written as a JSON array of strings.
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(audience: &str) -> Self {
        Self::One(audience.to_owned())
    }
}

impl From<String> for Audience {
    fn from(audience: String) -> Self {
        Self::One(audience)
    }
}

/// Reads a NumericDate (RFC 7519 §2): seconds since the Unix epoch, which
/// may be non-integer. The fraction is dropped: Herald keeps whole seconds
/// (jsonwebtoken, which checks `exp` and `nbf`, rounds; the two differ by
/// under a second). Negative, non-finite and ≥ 2^64 values are refused, as
/// jsonwebtoken refuses them.
fn numeric_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(NumericDate)
}

/// [`numeric_date`] for an optional claim: absent or `null` is `None`.
fn optional_numeric_date<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    struct Optional;
    impl<'de> serde::de::Visitor<'de> for Optional {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a NumericDate or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            numeric_date(d).map(Some)
        }
    }
    deserializer.deserialize_option(Optional)
}

/// Visits a NumericDate; see [`numeric_date`].
struct NumericDate;

impl serde::de::Visitor<'_> for NumericDate {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a NumericDate: seconds since the Unix epoch, from 0 to 2^64")
    }

    fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<u64, E> {
        Ok(seconds)
    }

    fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<u64, E> {
        u64::try_from(seconds).map_err(|_| E::custom("a NumericDate before 1970"))
    }

    fn visit_f64<E: serde::de::Error>(self, seconds: f64) -> Result<u64, E> {
        // 2^64 as f64 is exact; every finite value below it floors to a u64.
        const LIMIT: f64 = 18_446_744_073_709_551_616.0;
        if seconds.is_finite() && (0.0..LIMIT).contains(&seconds) {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(seconds.floor() as u64)
        } else {
            Err(E::custom(format!(
                "NumericDate {seconds} is not between 0 and 2^64"
            )))
        }
    }
}

/// Who is calling, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's tenant.
    pub tenant: Tenant,
    /// The token's user (`sub`).
    pub user: UserId,
    /// When the token expires (`exp`); streams opened with it end then.
    /// Never more than [`MAX_EXPIRY_AHEAD`] after the token was verified.
    pub expires_at: SystemTime,
    scopes: Vec<String>,
}

impl Identity {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// `Ok` when the token may send notifications; else
    /// [`AuthError::MissingScope`].
    pub fn require_send(&self) -> Result<(), AuthError> {
        if self.has_scope(SEND_SCOPE) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(SEND_SCOPE))
        }
    }
}

/// Why a call's token was refused. Every variant but
/// [`AuthError::MissingScope`] means the caller is not authenticated; that
/// one means it is, but may not make the call (the gRPC status-code guide's
/// `UNAUTHENTICATED` and `PERMISSION_DENIED`; mapped in `api::status`).
/// Messages reach the client: they say what is wrong without helping to
/// forge a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing authorization metadata")]
    Missing,
    /// The metadata is longer than a [`MAX_TOKEN_BYTES`] token needs.
    #[error("token too large")]
    TooLarge,
    /// The metadata is not `Bearer <token>` (RFC 6750 §2.1).
    #[error("authorization is not `Bearer <token>`")]
    Malformed,
    /// The token's `alg` is not the algorithm of any configured key.
    #[error("invalid token: algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    /// The token's `exp` is past, by more than the leeway.
    #[error("token expired")]
    Expired,
    /// Any other reason the token does not verify: not a JWT, a bad
    /// signature, `nbf` in the future, the wrong issuer or audience, a
    /// claim missing or of the wrong type.
    #[error("invalid token: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// The `sub` or `tenant` claim is not a valid user id or tenant.
    #[error("invalid token: {0}")]
    Claim(#[source] InvalidArgument),
    /// A valid token without the scope the call needs.
    #[error("token lacks the {0} scope")]
    MissingScope(&'static str),
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => Self::Expired,
            _ => Self::Invalid(e),
        }
    }
}

/// The key tokens are verified with.
#[derive(Clone)]
pub enum VerificationKey {
    /// HS256 shared secret (at least 32 bytes outside `--dev`).
    Secret(Vec<u8>),
    /// RS256 public key, PEM.
    RsaPem(Vec<u8>),
    /// ES256 (P-256) public key, PEM.
    EcPem(Vec<u8>),
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.write_str(match self {
            Self::Secret(_) => "Secret(..)",
            Self::RsaPem(_) => "RsaPem(..)",
            Self::EcPem(_) => "EcPem(..)",
        })
    }
}

/// How tokens are verified: the keys, optional issuer/audience checks and
/// the clock leeway.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The verification keys (at least one); a token is accepted when any
    /// key of its algorithm verifies it.
    pub keys: Vec<VerificationKey>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// How far past its `exp`, or before its `nbf`, a token is still
    /// accepted, for clock skew (RFC 7519 §4.1.4, §4.1.5). Whole seconds
    /// (fractions are dropped), at most [`MAX_LEEWAY`]. It only widens the
    /// check at the door: [`Identity::expires_at`] is still `exp`, so a
    /// stream opened with a token inside its leeway ends at once.
    pub leeway: Duration,
}

/// A misconfigured verification key.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT verification key: {0}")]
pub struct KeyError(String);

/// Most verified tokens remembered; past it the cache starts over.
pub const TOKEN_CACHE_ENTRIES: usize = 4_096;

/// Verifies tokens. Build once at start-up; verification is pure CPU.
///
/// Verified tokens are cached (keyed by the whole token text, until the
/// token's own `exp`): a service sends thousands of calls with one token,
/// and signature checking was ~7% of a replica's CPU under load. A cached
/// token is exactly as valid as when it was verified: its signature cannot
/// change, and expiry is re-checked on every use.
pub struct Verifier {
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
    cache: std::sync::RwLock<std::collections::HashMap<String, Identity>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<_> = self.keys.iter().map(|(a, _, _)| a).collect();
        f.debug_struct("Verifier")
            .field("algorithms", &algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier; fails if there is no key or a PEM key does not
    /// parse.
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        if config.keys.is_empty() {
            return Err(KeyError("no verification key".into()));
        }
        let keys = config
            .keys
            .iter()
            .map(|k| Self::key(k, config))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            cache: std::sync::RwLock::default(),
        })
    }

    fn key(
        key: &VerificationKey,
        config: &AuthConfig,
    ) -> Result<(Algorithm, DecodingKey, Validation), KeyError> {
        let (key, alg) = match key {
            VerificationKey::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
            VerificationKey::RsaPem(pem) => (
                DecodingKey::from_rsa_pem(pem).map_err(|e| KeyError(e.to_string()))?,
                Algorithm::RS256,
            ),
            VerificationKey::EcPem(pem) => (
                DecodingKey::from_ec_pem(pem).map_err(|e| KeyError(e.to_string()))?,
                Algorithm::ES256,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        // `config.rs` refuses a larger leeway; the clamp keeps jsonwebtoken's
        // `now - leeway` from underflowing whatever the caller passes.
        validation.leeway = config.leeway.min(MAX_LEEWAY).as_secs();
        match &config.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok((alg, key, validation))
    }

    /// Verifies the bearer token in `metadata` (RFC 6750 §2.1). Fails with
    /// the [`AuthError`] saying why the caller is not authenticated.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<Identity, AuthError> {
        self.verify_headers(metadata.as_ref())
    }

    /// [`Verifier::verify`] on a request's HTTP headers (the transport's
    /// view of it, before tonic makes them metadata).
    pub fn verify_headers(&self, headers: &http::HeaderMap) -> Result<Identity, AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        if value.len() > MAX_TOKEN_BYTES + 7 {
            return Err(AuthError::TooLarge);
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or(AuthError::Malformed)?;
        let token = token.trim();
        // A poisoned lock only means another call panicked mid-insert of a
        // complete entry; the map is still consistent.
        if let Some(identity) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            && identity.expires_at > SystemTime::now()
        {
            return Ok(identity.clone());
        }
        let identity = self.verify_uncached(token)?;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= TOKEN_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(token.to_owned(), identity.clone());
        Ok(identity)
    }

    fn verify_uncached(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        let mut result = Err(AuthError::Algorithm(header.alg));
        for (_, key, validation) in self.keys.iter().filter(|(a, _, _)| *a == header.alg) {
            result =
                jsonwebtoken::decode::<Claims>(token, key, validation).map_err(AuthError::from);
            if result.is_ok() {
                break;
            }
        }
        let claims = result?.claims;
        let user = UserId::parse("sub", &claims.sub).map_err(AuthError::Claim)?;
        let tenant = Tenant::parse(&claims.tenant).map_err(AuthError::Claim)?;
        Ok(Identity {
            tenant,
            user,
            expires_at: expiry(claims.exp, SystemTime::now()),
            scopes: claims.scope.split_whitespace().map(str::to_owned).collect(),
        })
    }
}

/// The instant `exp` seconds after the Unix epoch, but at most
/// [`MAX_EXPIRY_AHEAD`] after `now`.
fn expiry(exp: u64, now: SystemTime) -> SystemTime {
    let latest = now.checked_add(MAX_EXPIRY_AHEAD).unwrap_or(now);
    UNIX_EPOCH
        .checked_add(Duration::from_secs(exp))
        .map_or(latest, |at| at.min(latest))
}

/// `message` as a request carrying `authorization: Bearer <token>` (RFC
/// 6750 §2.1), for clients. Fails when `token` is not a valid metadata
/// value (e.g. it contains a newline).
pub fn bearer<T>(
    message: T,
    token: &str,
) -> Result<tonic::Request<T>, tonic::metadata::errors::InvalidMetadataValue> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Mints an HS256 token for `user` that expires `ttl_secs` from now. For the
/// CLI, tests and development; production tokens come from an identity
/// provider.
pub fn mint(
    secret: &[u8],
    user: &str,
    tenant: &str,
    scope: &str,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = Claims {
        sub: user.to_owned(),
        tenant: tenant.to_owned(),
        scope: scope.to_owned(),
        exp: now + ttl_secs,
        iat: Some(now),
        iss: None,
        aud: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: serde_json::Value) -> Result<Claims, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn numeric_dates_may_be_fractional_but_not_out_of_range() {
        let read = |exp: serde_json::Value| {
            claims(serde_json::json!({"sub": "a", "exp": exp, "iat": exp})).map(|c| (c.exp, c.iat))
        };
        assert_eq!(
            read(serde_json::json!(1_700_000_000)).unwrap(),
            (1_700_000_000, Some(1_700_000_000))
        );
        assert_eq!(
            read(serde_json::json!(1_700_000_000.9)).unwrap(),
            (1_700_000_000, Some(1_700_000_000))
        );
        assert_eq!(read(serde_json::json!(u64::MAX)).unwrap().0, u64::MAX);
        assert_eq!(
            read(serde_json::json!(1e19)).unwrap().0,
            10_000_000_000_000_000_000
        );
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(-0.5),
            serde_json::json!(1.8446744073709552e19),
            serde_json::json!(1e300),
            serde_json::json!("1700000000"),
            serde_json::json!(null),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
        let no_iat = claims(serde_json::json!({"sub": "a", "exp": 1, "iat": null})).unwrap();
        assert_eq!(no_iat.iat, None);
    }

    #[test]
    fn audience_is_a_string_or_an_array() {
        let read = |aud: serde_json::Value| {
            claims(serde_json::json!({"sub": "a", "exp": 1, "aud": aud})).map(|c| c.aud)
        };
        assert_eq!(
            read(serde_json::json!("h")).unwrap(),
            Some(Audience::One("h".into()))
        );
        assert_eq!(
            read(serde_json::json!(["h", "i"])).unwrap(),
            Some(Audience::Many(vec!["h".into(), "i".into()]))
        );
        assert!(read(serde_json::json!(["h", 1])).is_err());
    }

    #[test]
    fn minted_tokens_are_unchanged() {
        // The exact claims `mint` wrote before NumericDates and audience
        // arrays were read: integers, a string `aud`, nothing empty.
        let claims = Claims {
            sub: "alice".into(),
            tenant: String::new(),
            scope: SEND_SCOPE.into(),
            exp: 1_700_000_600,
            iat: Some(1_700_000_000),
            iss: None,
            aud: Some("herald".into()),
        };
        assert_eq!(
            serde_json::to_string(&claims).unwrap(),
            r#"{"sub":"alice","scope":"notifications:send","exp":1700000600,"iat":1700000000,"aud":"herald"}"#
        );
    }

    #[test]
    fn refusals_are_typed() {
        const SECRET: &[u8] = b"unit-test-secret-0123456789abcdef0123";
        let verifier = Verifier::new(&AuthConfig {
            keys: vec![VerificationKey::Secret(SECRET.to_vec())],
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        })
        .unwrap();
        let verify = |authorization: Option<&str>| {
            let mut metadata = MetadataMap::new();
            if let Some(a) = authorization {
                metadata.insert("authorization", a.parse().unwrap());
            }
            verifier.verify(&metadata)
        };
        let now = UNIX_EPOCH.elapsed().unwrap().as_secs();
        let token = |claims: serde_json::Value| {
            let key = EncodingKey::from_secret(SECRET);
            let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key);
            format!("Bearer {}", token.unwrap())
        };
        let valid = token(serde_json::json!({"sub": "alice", "exp": now + 60}));
        let identity = verify(Some(&valid)).unwrap();
        assert!(matches!(
            identity.require_send(),
            Err(AuthError::MissingScope(SEND_SCOPE))
        ));
        assert!(matches!(verify(None), Err(AuthError::Missing)));
        assert!(matches!(
            verify(Some("Basic abc")),
            Err(AuthError::Malformed)
        ));
        let expired = token(serde_json::json!({"sub": "alice", "exp": now - 10}));
        assert!(matches!(verify(Some(&expired)), Err(AuthError::Expired)));
        let bad_sub = token(serde_json::json!({"sub": "", "exp": now + 60}));
        assert!(matches!(verify(Some(&bad_sub)), Err(AuthError::Claim(_))));
        assert!(matches!(
            verify(Some("Bearer x.y.z")),
            Err(AuthError::Invalid(_))
        ));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "alice", "exp": now + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(
            verify(Some(&format!("Bearer {hs384}"))),
            Err(AuthError::Algorithm(Algorithm::HS384))
        ));
    }

    #[test]
    fn expiry_is_exact_up_to_the_clamp() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let latest = now + MAX_EXPIRY_AHEAD;
        assert_eq!(
            expiry(1_700_000_600, now),
            UNIX_EPOCH + Duration::from_secs(1_700_000_600)
        );
        assert_eq!(expiry(0, now), UNIX_EPOCH);
        for exp in [u64::MAX, 1 << 63, 1 << 40] {
            assert_eq!(expiry(exp, now), latest, "exp {exp}");
        }
        // What subscription.rs does with it must not overflow either.
        let left = expiry(u64::MAX, now).duration_since(now).unwrap();
        assert!(std::time::Instant::now().checked_add(left).is_some());
    }
}
