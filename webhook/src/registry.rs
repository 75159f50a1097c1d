//! Talking to the snapshot registry: tags (following `Link` pagination) and
//! manifest digests, authenticated with the mounted credentials.
//!
//! oci-client does the authentication handshake (Basic, or Bearer tokens from
//! the registry's token service); the resulting authorization is cached per
//! repository until the token expires (its JWT `exp`, else 60 s as the
//! distribution spec says) and dropped on a 401. The listing itself is made
//! here because oci-client's `list_tags` does not expose the `Link` header.
//! Nothing here depends on tag order or on `n`/`last` being honoured.

use crate::{config::Protocol, credentials};
use base64::Engine;
use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Client, RegistryOperation,
};
use reqwest::{header, StatusCode};
use serde::Deserialize;
use std::{
    collections::HashSet,
    fmt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

/// Most pages followed for one listing (a loop guard, not a limit that real registries reach).
const MAX_PAGES: usize = 1000;
/// Page size asked for; registries may ignore it.
const PAGE_SIZE: usize = 1000;
/// Lifetime of a token that does not say its own.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// How long a Basic or anonymous decision is reused before asking the registry again.
const NON_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// What kind of registry trouble, for logs and the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Timeout,
    Connect,
    Unauthorized,
    Server,
    Garbage,
    Credentials,
    Other,
    /// The admission's own budget ran out first (the lookup may not have started).
    Budget,
}

impl ErrorKind {
    /// What the warning and the status annotation say.
    pub fn words(self) -> String {
        match self {
            ErrorKind::Budget => "admission budget spent".to_string(),
            other => format!("registry {}", other.as_str()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Budget => "budget",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Server => "server",
            ErrorKind::Garbage => "garbage",
            ErrorKind::Credentials => "credentials",
            ErrorKind::Other => "other",
        }
    }
}

/// A registry failure, with enough words to act on.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl LookupError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    fn from_reqwest(e: reqwest::Error, what: &str) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_connect() {
            ErrorKind::Connect
        } else if e.is_decode() || e.is_body() {
            ErrorKind::Garbage
        } else {
            ErrorKind::Other
        };
        // reqwest's Display carries the URL (no credentials: they go in headers).
        Self::new(kind, format!("{what}: {}", error_chain(&e)))
    }

    fn from_status(status: StatusCode, what: &str, body: &[u8]) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::Unauthorized,
            s if s.is_server_error() => ErrorKind::Server,
            _ => ErrorKind::Other,
        };
        let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
        Self::new(
            kind,
            format!("{what}: registry answered {status}: {}", snippet.trim()),
        )
    }
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "registry {}: {}", self.kind.as_str(), self.detail)
    }
}

impl std::error::Error for LookupError {}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub host: String,
    pub protocol: Protocol,
    pub ca_pem: Option<Vec<u8>>,
    pub credentials_file: Option<PathBuf>,
}

/// Credentials in force and the oci-client that holds them (it caches them per
/// registry, so a changed file gets a fresh client).
struct Session {
    document: Option<Vec<u8>>,
    auth: RegistryAuth,
    oci: Client,
}

#[derive(Clone)]
enum Authorization {
    None,
    Basic(String, String),
    Bearer(String),
}

pub struct Registry {
    settings: RegistrySettings,
    http: reqwest::Client,
    session: RwLock<Arc<Session>>,
    authorizations: moka::future::Cache<String, (Authorization, Instant)>,
    /// Counts HTTP requests sent (tags, manifests, and the auth handshake estimated as one).
    pub requests: prometheus_client::metrics::counter::Counter,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut builder = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5));
        if let Some(pem) = &settings.ca_pem {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem).context("reading the registry CA")?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .context("building the registry HTTP client")?;
        let session = Arc::new(Self::session(&settings, None)?);
        Ok(Self {
            settings,
            http,
            session: RwLock::new(session),
            authorizations: moka::future::Cache::builder().max_capacity(10_000).build(),
            requests: Default::default(),
        })
    }

    /// Sets up the authorization cache's clock ahead of the first lookup.
    pub async fn warm_up(&self) {
        let _ = self.authorizations.get("").await;
    }

    pub fn host(&self) -> &str {
        &self.settings.host
    }

    fn session(settings: &RegistrySettings, document: Option<Vec<u8>>) -> anyhow::Result<Session> {
        use anyhow::Context;
        let auth = match &document {
            Some(d) => credentials::auth_for(d, &settings.host).with_context(|| {
                format!(
                    "reading {}",
                    settings
                        .credentials_file
                        .as_deref()
                        .unwrap_or_else(|| "?".as_ref())
                        .display()
                )
            })?,
            None => RegistryAuth::Anonymous,
        };
        let config = ClientConfig {
            protocol: match settings.protocol {
                Protocol::Https => ClientProtocol::Https,
                Protocol::Http => ClientProtocol::Http,
            },
            extra_root_certificates: settings
                .ca_pem
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            connect_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        Ok(Session {
            document,
            auth,
            oci: Client::new(config),
        })
    }

    /// Re-reads the credentials file; a change takes effect for the next request.
    /// Returns whether the credentials changed.
    pub async fn reload_credentials(&self) -> anyhow::Result<bool> {
        use anyhow::Context;
        let Some(path) = &self.settings.credentials_file else {
            return Ok(false);
        };
        let document = tokio::fs::read(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        let same = self.current().document.as_deref() == Some(document.as_slice());
        if same {
            return Ok(false);
        }
        let session = Arc::new(Self::session(&self.settings, Some(document))?);
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = session;
        self.authorizations.invalidate_all();
        Ok(true)
    }

    fn current(&self) -> Arc<Session> {
        self.session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn base(&self) -> String {
        format!(
            "{}://{}",
            self.settings.protocol.as_str(),
            self.settings.host
        )
    }

    /// Every tag of `path`; `None` when the repository does not exist.
    pub async fn tags(&self, path: &str) -> Result<Option<Vec<String>>, LookupError> {
        let mut url = format!("{}/v2/{path}/tags/list?n={PAGE_SIZE}", self.base());
        let mut seen_urls = HashSet::new();
        let mut seen_tags = HashSet::new();
        let mut tags = Vec::new();
        for _ in 0..MAX_PAGES {
            if !seen_urls.insert(url.clone()) {
                break;
            }
            let response = self.get(path, &url, None).await?;
            let status = response.status();
            let link = response
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response
                .bytes()
                .await
                .map_err(|e| LookupError::from_reqwest(e, "reading tags"))?;
            if status == StatusCode::NOT_FOUND {
                if is_unknown_repository(&body) {
                    return Ok(None);
                }
                return Err(LookupError::from_status(status, "listing tags", &body));
            }
            if !status.is_success() {
                return Err(LookupError::from_status(status, "listing tags", &body));
            }
            let page: TagList = serde_json::from_slice(&body).map_err(|e| {
                LookupError::new(
                    ErrorKind::Garbage,
                    format!("listing tags: the answer is not a tag list: {e}"),
                )
            })?;
            for t in page.tags.unwrap_or_default() {
                if seen_tags.insert(t.clone()) {
                    tags.push(t);
                }
            }
            match link
                .as_deref()
                .and_then(next_link)
                .and_then(|l| self.same_origin(&l))
            {
                Some(next) => url = next,
                None => break,
            }
        }
        Ok(Some(tags))
    }

    /// The digest of `path:tag`; `None` when the tag does not exist.
    pub async fn digest(&self, path: &str, tag: &str) -> Result<Option<String>, LookupError> {
        let url = format!("{}/v2/{path}/manifests/{tag}", self.base());
        let accept = MANIFEST_TYPES.join(", ");
        let response = self.get(path, &url, Some(accept)).await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(LookupError::from_status(
                status,
                "reading the manifest",
                &body,
            ));
        }
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:") && d.len() == 71)
            .map(str::to_string);
        match digest {
            Some(d) => Ok(Some(d)),
            None => {
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| LookupError::from_reqwest(e, "reading the manifest"))?;
                use sha2::Digest;
                Ok(Some(format!(
                    "sha256:{}",
                    hex::encode(sha2::Sha256::digest(&body))
                )))
            }
        }
    }

    /// GET with the cached authorization; on 401 the authorization is renewed once.
    async fn get(
        &self,
        path: &str,
        url: &str,
        accept: Option<String>,
    ) -> Result<reqwest::Response, LookupError> {
        self.send(path, RegistryOperation::Pull, |http| {
            let request = http.get(url);
            match &accept {
                Some(a) => request.header(header::ACCEPT, a),
                None => request,
            }
        })
        .await
    }

    /// Sends the request `build` makes, with the authorization cached for
    /// `path` and `operation`; on 401 the authorization is renewed once.
    async fn send(
        &self,
        path: &str,
        operation: RegistryOperation,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, LookupError> {
        for attempt in 0..2 {
            let authorization = self.authorization(path, operation).await?;
            let request = match &authorization {
                Authorization::None => build(&self.http),
                Authorization::Basic(u, p) => build(&self.http).basic_auth(u, Some(p)),
                Authorization::Bearer(t) => build(&self.http).bearer_auth(t),
            };
            self.requests.inc();
            let response = request
                .send()
                .await
                .map_err(|e| LookupError::from_reqwest(e, "registry request"))?;
            if response.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.authorizations
                    .invalidate(&authorization_key(path, &operation))
                    .await;
                continue;
            }
            return Ok(response);
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn authorization(
        &self,
        path: &str,
        operation: RegistryOperation,
    ) -> Result<Authorization, LookupError> {
        let key = authorization_key(path, &operation);
        if let Some((a, expires)) = self.authorizations.get(&key).await {
            if Instant::now() < expires {
                return Ok(a);
            }
        }
        let session = self.current();
        let reference = oci_client::Reference::with_tag(
            self.settings.host.clone(),
            path.to_string(),
            "latest".into(),
        );
        self.requests.inc();
        let token = session
            .oci
            .auth(&reference, &session.auth, operation)
            .await
            .map_err(|e| {
                use oci_client::errors::OciDistributionError as E;
                let kind = match &e {
                    E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => {
                        ErrorKind::Unauthorized
                    }
                    E::RegistryTokenDecodeError(_) | E::JsonError(_) => ErrorKind::Garbage,
                    E::RequestError(r) if r.is_timeout() => ErrorKind::Timeout,
                    E::RequestError(r) if r.is_connect() => ErrorKind::Connect,
                    _ => ErrorKind::Other,
                };
                LookupError::new(kind, format!("authenticating: {}", error_chain(&e)))
            })?;
        let (authorization, lifetime) = match (token, &session.auth) {
            (Some(t), _) => {
                let lifetime = jwt_lifetime(&t).unwrap_or(DEFAULT_TOKEN_LIFETIME);
                (Authorization::Bearer(t), lifetime)
            }
            (None, RegistryAuth::Basic(u, p)) => (
                Authorization::Basic(u.clone(), p.clone()),
                NON_TOKEN_LIFETIME,
            ),
            (None, _) => (Authorization::None, NON_TOKEN_LIFETIME),
        };
        // Renew a little before the registry would refuse the token.
        let expires = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(5))
                .max(Duration::from_secs(1));
        self.authorizations
            .insert(key, (authorization.clone(), expires))
            .await;
        Ok(authorization)
    }

    /// The manifest `path:reference` (a tag or a digest) as stored, at most
    /// [`MAX_DOCUMENT`] bytes; `None` when it does not exist.
    pub async fn manifest(
        &self,
        path: &str,
        reference: &str,
    ) -> Result<Option<Document>, LookupError> {
        let url = format!("{}/v2/{path}/manifests/{reference}", self.base());
        let response = self
            .get(path, &url, Some(MANIFEST_TYPES.join(", ")))
            .await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = bounded_body(response, "reading the manifest").await?;
        if !status.is_success() {
            return Err(LookupError::from_status(
                status,
                "reading the manifest",
                &body,
            ));
        }
        Ok(Some(Document::new(media_type, body)))
    }

    /// The blob `digest` of `path` (an image config), at most [`MAX_DOCUMENT`]
    /// bytes, checked against its digest.
    pub async fn document_blob(&self, path: &str, digest: &str) -> Result<Document, LookupError> {
        let url = format!("{}/v2/{path}/blobs/{digest}", self.base());
        let response = self.get(path, &url, None).await?;
        let status = response.status();
        let body = bounded_body(response, "reading a blob").await?;
        if !status.is_success() {
            return Err(LookupError::from_status(status, "reading a blob", &body));
        }
        let document = Document::new(String::new(), body);
        if document.digest != digest {
            return Err(LookupError::new(
                ErrorKind::Garbage,
                format!("blob {digest} of {path} has digest {}", document.digest),
            ));
        }
        Ok(document)
    }

    /// Makes blob `digest` present in `path`: there already, or mounted from
    /// repository `from` of the same registry (no data copied). `false` when
    /// neither worked (the registry started an upload instead, which is cancelled).
    pub async fn ensure_blob(
        &self,
        path: &str,
        from: &str,
        digest: &str,
    ) -> Result<bool, LookupError> {
        let url = format!("{}/v2/{path}/blobs/{digest}", self.base());
        let present = self
            .send(path, RegistryOperation::Pull, |http| http.head(&url))
            .await?;
        if present.status().is_success() {
            return Ok(true);
        }
        let url = format!(
            "{}/v2/{path}/blobs/uploads/?mount={digest}&from={from}",
            self.base()
        );
        let response = self
            .send(path, RegistryOperation::Push, |http| http.post(&url))
            .await?;
        match response.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // an upload was opened instead of the mount: give it back
                if let Some(location) = self.location(&response) {
                    let _ = self
                        .send(path, RegistryOperation::Push, |http| http.delete(&location))
                        .await;
                }
                Ok(false)
            }
            status => {
                let body = response.bytes().await.unwrap_or_default();
                Err(LookupError::from_status(status, "mounting a blob", &body))
            }
        }
    }

    /// Uploads `document` as a blob of `path` (monolithic: a config is small).
    pub async fn put_blob(&self, path: &str, document: &Document) -> Result<(), LookupError> {
        let url = format!("{}/v2/{path}/blobs/uploads/", self.base());
        let started = self
            .send(path, RegistryOperation::Push, |http| http.post(&url))
            .await?;
        if started.status() != StatusCode::ACCEPTED {
            let status = started.status();
            let body = started.bytes().await.unwrap_or_default();
            return Err(LookupError::from_status(
                status,
                "starting an upload",
                &body,
            ));
        }
        let location = self.location(&started).ok_or_else(|| {
            LookupError::new(ErrorKind::Garbage, "the upload has no usable Location")
        })?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={}", document.digest);
        let body = document.body.clone();
        let done = self
            .send(path, RegistryOperation::Push, |http| {
                http.put(&url)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if done.status() != StatusCode::CREATED {
            let status = done.status();
            let body = done.bytes().await.unwrap_or_default();
            return Err(LookupError::from_status(status, "uploading a blob", &body));
        }
        Ok(())
    }

    /// Writes `manifest` as `path:tag`.
    pub async fn put_manifest(
        &self,
        path: &str,
        tag: &str,
        manifest: &Document,
    ) -> Result<(), LookupError> {
        let url = format!("{}/v2/{path}/manifests/{tag}", self.base());
        let body = manifest.body.clone();
        let response = self
            .send(path, RegistryOperation::Push, |http| {
                http.put(&url)
                    .header(header::CONTENT_TYPE, &manifest.media_type)
                    .body(body.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            let status = response.status();
            let body = response.bytes().await.unwrap_or_default();
            return Err(LookupError::from_status(
                status,
                "writing the manifest",
                &body,
            ));
        }
        Ok(())
    }

    /// A response's `Location`, made absolute on this registry.
    fn location(&self, response: &reqwest::Response) -> Option<String> {
        let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
        self.same_origin(location)
    }

    /// A `Link` target on this registry, made absolute; `None` for another host.
    fn same_origin(&self, link: &str) -> Option<String> {
        if link.starts_with('/') {
            return Some(format!("{}{link}", self.base()));
        }
        link.starts_with(&format!("{}/", self.base()))
            .then(|| link.to_string())
    }
}

/// The media types of an image manifest or index this registry client reads.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Largest manifest or config read (images' own are a few KiB).
pub const MAX_DOCUMENT: usize = 4 << 20;

/// A manifest or config as the registry holds it: its bytes, their digest
/// and (for a manifest) its media type.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub media_type: String,
    pub digest: String,
    pub body: Vec<u8>,
}

impl Document {
    pub fn new(media_type: String, body: impl Into<Vec<u8>>) -> Self {
        use sha2::Digest;
        let body = body.into();
        Self {
            media_type,
            digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
            body,
        }
    }
}

/// A response's body, refused past [`MAX_DOCUMENT`].
async fn bounded_body(mut response: reqwest::Response, what: &str) -> Result<Vec<u8>, LookupError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| LookupError::from_reqwest(e, what))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(LookupError::new(
                ErrorKind::Garbage,
                format!("{what}: larger than {MAX_DOCUMENT} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The authorization cache's key: pull and push tokens differ in scope.
fn authorization_key(path: &str, operation: &RegistryOperation) -> String {
    match operation {
        RegistryOperation::Pull => path.to_string(),
        RegistryOperation::Push => format!("{path}\npush"),
    }
}

fn is_unknown_repository(body: &[u8]) -> bool {
    serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.errors.iter().any(|i| i.code == "NAME_UNKNOWN"))
        .unwrap_or(false)
}

/// The target of `rel="next"` in a `Link` header (RFC 8288).
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

/// How long a JWT bearer token lives, from its `exp` claim.
fn jwt_lifetime(token: &str) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Claims {
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&raw).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(claims.exp.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_table() {
        let table: &[(&str, Option<&str>)] = &[
            (
                r#"</v2/a/tags/list?n=2&last=b>; rel="next""#,
                Some("/v2/a/tags/list?n=2&last=b"),
            ),
            (
                r#"<https://r.example/v2/a/tags/list?last=b&n=2>;rel=next"#,
                Some("https://r.example/v2/a/tags/list?last=b&n=2"),
            ),
            (r#"</x>; rel="prev", </y>; rel="next""#, Some("/y")),
            (r#"</x>; rel="prev""#, None),
            ("garbage", None),
            ("", None),
        ];
        for (h, want) in table {
            assert_eq!(next_link(h).as_deref(), *want, "{h}");
        }
    }

    #[test]
    fn jwt_exp_is_read() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        let life = jwt_lifetime(&format!("h.{payload}.s")).unwrap();
        assert!(life > Duration::from_secs(290) && life <= Duration::from_secs(300));
        assert_eq!(jwt_lifetime("opaque-token"), None);
    }

    #[test]
    fn unknown_repository_is_recognised() {
        assert!(is_unknown_repository(br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#));
        assert!(!is_unknown_repository(b"404 page not found"));
    }
}
