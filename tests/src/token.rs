//! A registry token service (the Docker/distribution "token" auth flow), so the
//! real registry can be run in Bearer mode: it answers 401 with
//! `WWW-Authenticate: Bearer realm=...`, the client asks this service for a
//! token with its Basic credentials, and the registry verifies the token's
//! signature against `rootcertbundle`.
//!
//! Tokens are ES256 JWTs carrying the signing certificate in `x5c`, granting
//! what the `scope` asked for. Every token handed out is counted, so tests can
//! check that clients cache tokens until they expire.

use anyhow::{Context, Result};
use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

pub const SERVICE: &str = "desktop-snapshot-test-registry";
pub const ISSUER: &str = "desktop-snapshot-test-token-service";

/// A running token service.
pub struct TokenService {
    /// `https://127.0.0.1:PORT/token`, the registry's `auth.token.realm`.
    pub realm: String,
    /// PEM of the certificate that signs tokens: the registry's `auth.token.rootcertbundle`.
    pub signing_cert_pem: String,
    state: Arc<Shared>,
    handle: axum_server::Handle<SocketAddr>,
}

struct Shared {
    user: String,
    password: String,
    lifetime_secs: u64,
    key: jsonwebtoken::EncodingKey,
    x5c: String,
    issued: AtomicUsize,
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    scope: Option<String>,
}

impl TokenService {
    /// Starts the service over TLS with `serving` (a certificate for 127.0.0.1 the
    /// registry's clients trust); tokens live `lifetime_secs`.
    pub async fn start(
        serving_cert_pem: &str,
        serving_key_pem: &str,
        user: &str,
        password: &str,
        lifetime_secs: u64,
    ) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let signing_key = rcgen::KeyPair::generate().context("generating the token signing key")?;
        let mut params = rcgen::CertificateParams::new(vec!["token-signer".to_string()])
            .context("signer params")?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token-signer");
        let signing_cert = params
            .self_signed(&signing_key)
            .context("self-signing the token signer")?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(signing_key.serialize_pem().as_bytes())
            .context("loading the token signing key")?;
        let x5c = base64::engine::general_purpose::STANDARD.encode(signing_cert.der());
        let state = Arc::new(Shared {
            user: user.to_string(),
            password: password.to_string(),
            lifetime_secs,
            key,
            x5c,
            issued: AtomicUsize::new(0),
        });
        let (listener, addr) = crate::tls::bind();
        let app = Router::new()
            .route("/token", get(token))
            .with_state(state.clone());
        let handle = crate::tls::serve(listener, serving_cert_pem, serving_key_pem, app).await;
        Ok(Self {
            realm: format!("https://{addr}/token"),
            signing_cert_pem: signing_cert.pem(),
            state,
            handle,
        })
    }

    /// How many tokens were handed out so far.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// The registry configuration block for this service.
    pub fn registry_auth_yaml(&self, rootcertbundle: &std::path::Path) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            rootcertbundle.display()
        )
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

async fn token(
    State(state): State<Arc<Shared>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    if given.as_deref() != Some(&format!("{}:{}", state.user, state.password)) {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let access = q
        .scope
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Access {
                kind: kind.into(),
                name: name.into(),
                actions: actions.split(',').map(String::from).collect(),
            })
        })
        .collect();
    let n = state.issued.fetch_add(1, Ordering::SeqCst);
    let claims = Claims {
        iss: ISSUER.into(),
        sub: state.user.clone(),
        aud: SERVICE.into(),
        exp: now + state.lifetime_secs,
        nbf: now.saturating_sub(10),
        iat: now,
        jti: format!("token-{n}"),
        access,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![state.x5c.clone()]);
    match jsonwebtoken::encode(&header, &claims, &state.key) {
        Ok(t) => {
            let body: HashMap<&str, serde_json::Value> = HashMap::from([
                ("token", serde_json::Value::String(t.clone())),
                ("access_token", serde_json::Value::String(t)),
                ("expires_in", serde_json::Value::from(state.lifetime_secs)),
            ]);
            Json(body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
