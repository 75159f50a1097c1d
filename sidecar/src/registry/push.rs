//! Pushing the snapshot with oci-client's blob-level calls: base layers the
//! repository already has are skipped, the others streamed from containerd's
//! content store; the new layer streamed as it is compressed (memory stays
//! flat whatever its size); config next; the manifest, with the tag, last, so
//! a push that fails anywhere leaves no tag.

use super::Protocol;
use crate::{
    ctrd::Ctrd,
    image::{
        self,
        new_layer::{Codec, NewLayer},
    },
};
use anyhow::{Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Client, Reference, RegistryOperation,
};
use serde_json::Value;
use sha2::Digest;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};
use tracing::{info, warn};

mod while_written;
pub use while_written::Sent;

pub struct Registry {
    client: Client,
    /// For what oci-client has no call for: deleting a manifest.
    http: reqwest::Client,
    auth: RegistryAuth,
    /// The credentials document, for the base image's registry when it is another one.
    credentials: Option<Vec<u8>>,
    extra_roots: Vec<Certificate>,
    protocol: Protocol,
    /// What the repository is known to hold, across this sidecar's snapshots.
    known: KnownBlobs,
}

impl Registry {
    /// A client with the credentials as they are in the mounted secret now.
    pub async fn login(
        repository: &str,
        protocol: Protocol,
        ca: Option<&Path>,
        credentials: Option<&Path>,
    ) -> Result<Self> {
        let (document, auth) = match credentials {
            Some(file) => {
                let (document, auth) = super::credentials::read(repository, file).await?;
                (Some(document), auth)
            }
            None => (None, RegistryAuth::Anonymous),
        };
        let mut extra_roots = Vec::new();
        if let Some(ca) = ca {
            let data = tokio::fs::read_to_string(ca)
                .await
                .with_context(|| format!("reading {}", ca.display()))?;
            // one certificate per PEM block: a bundle may trust several registries
            for block in data.split_inclusive("-----END CERTIFICATE-----") {
                if block.contains("-----BEGIN CERTIFICATE-----") {
                    extra_roots.push(Certificate {
                        encoding: CertificateEncoding::Pem,
                        data: block.trim().as_bytes().to_vec(),
                    });
                }
            }
        }
        let client = Client::new(client_config(protocol, &extra_roots));
        let mut http =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
        for root in &extra_roots {
            http = http.add_root_certificate(
                reqwest::Certificate::from_pem(&root.data).context("reading the registry CA")?,
            );
        }
        let http = http.build().context("building the registry HTTP client")?;
        Ok(Self {
            client,
            http,
            auth,
            credentials: document,
            extra_roots,
            protocol,
            known: KnownBlobs::default(),
        })
    }

    /// This client, sharing `known` (what earlier snapshots found or put in
    /// the repository) with the clients of the next snapshots.
    pub fn remembering(mut self, known: KnownBlobs) -> Self {
        self.known = known;
        self
    }

    /// Puts one base layer in the target repository: mounted from the base image's
    /// repository when both are on this registry, else streamed from the node's
    /// content store, else from the base image's registry.
    async fn upload_base_layer(
        &self,
        ctrd: &Ctrd,
        target: &Reference,
        base: Option<&Reference>,
        digest: &str,
        size: Option<u64>,
    ) -> Result<()> {
        if let Some(source) = base.filter(|b| b.resolve_registry() == target.resolve_registry()) {
            if self.client.mount_blob(target, source, digest).await.is_ok() {
                info!(digest, from = %source.repository(), "base layer mounted");
                return Ok(());
            }
        }
        if image::in_content_store(ctrd, digest).await {
            info!(
                digest,
                "uploading a base layer from the node's content store"
            );
            let stream = image::read_stream(ctrd, digest).map_err(to_oci);
            self.client
                .push_blob_stream(target, stream, digest, size)
                .await
                .with_context(|| format!("uploading base layer {digest}"))?;
            return Ok(());
        }
        let source = base.with_context(|| {
            format!("base layer {digest} is neither on the node nor in a known registry")
        })?;
        info!(digest, from = %source.whole(), "streaming a base layer from the base image's registry");
        let from = self.reader_of(source).await?;
        let pulled = from
            .pull_blob_stream(source, digest)
            .await
            .with_context(|| format!("downloading base layer {digest} from {}", source.whole()))?;
        let stream = pulled
            .stream
            .map_err(oci_client::errors::OciDistributionError::IoError);
        self.client
            .push_blob_stream(target, stream, digest, size)
            .await
            .with_context(|| format!("uploading base layer {digest}"))?;
        Ok(())
    }

    /// The credentials the secret has for `image`'s registry, or none.
    fn auth_at(&self, image: &Reference) -> RegistryAuth {
        match &self.credentials {
            Some(doc) => registry_credentials::auth_for(doc, image.resolve_registry())
                .unwrap_or(RegistryAuth::Anonymous),
            None => RegistryAuth::Anonymous,
        }
    }

    /// A client logged in to read `image`'s repository, in whatever registry
    /// it is, with the credentials the secret has for that registry (or none).
    async fn reader_of(&self, image: &Reference) -> Result<Client> {
        let client = Client::new(client_config(self.protocol, &self.extra_roots));
        client
            .auth(image, &self.auth_at(image), RegistryOperation::Pull)
            .await
            .with_context(|| format!("logging in to {}", image.resolve_registry()))?;
        Ok(client)
    }

    /// The manifest digest and layer digests of image `image` (for this
    /// platform when it is an index), from its registry.
    pub async fn image_layers(&self, image: &Reference) -> Result<(String, Vec<String>)> {
        let client = self.reader_of(image).await?;
        let (manifest, digest) = client
            .pull_image_manifest(image, &self.auth_at(image))
            .await
            .with_context(|| format!("reading the manifest of {}", image.whole()))?;
        Ok((
            digest,
            manifest.layers.into_iter().map(|l| l.digest).collect(),
        ))
    }

    async fn has_blob(&self, target: &Reference, digest: &str) -> Result<bool> {
        self.client
            .blob_exists(target, digest)
            .await
            .with_context(|| format!("asking the registry for base layer {digest}"))
    }

    /// Authenticates for pushing to `target` (checks the credentials early).
    pub async fn authenticate(&self, target: &Reference) -> Result<()> {
        self.client
            .auth(target, &self.auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("logging in to {}", target.registry()))?;
        Ok(())
    }

    /// The blob `digest` of `image`'s repository, as a stream checked
    /// against its digest (after [`Self::authenticate`]).
    pub async fn blob_stream(
        &self,
        image: &Reference,
        digest: &str,
    ) -> Result<futures::stream::BoxStream<'static, std::io::Result<Bytes>>> {
        let sized = self
            .client
            .pull_blob_stream(image, digest)
            .await
            .with_context(|| format!("reading blob {digest} of {}", image.whole()))?;
        Ok(sized.stream)
    }

    /// Pushes the snapshot; returns it (manifest digest, manifest, config),
    /// the base of an increment over it.
    #[allow(clippy::too_many_arguments)]
    pub async fn push(
        &self,
        ctrd: &Ctrd,
        target: &Reference,
        base_image: Option<&Reference>,
        base: &image::Base,
        layer: NewLayer,
        codec: Codec,
        created: &str,
        annotations: &BTreeMap<String, String>,
        sent: Option<tokio::task::JoinHandle<Result<Sent>>>,
    ) -> Result<image::Base> {
        self.client
            .store_auth_if_needed(target.resolve_registry(), &self.auth)
            .await;
        self.put_base_layers(ctrd, target, base_image, base).await?;

        // The user's changes, compressed: sent while they were written (the
        // session closed now that the digest is known), else one request.
        let started = std::time::Instant::now();
        let while_written = match sent {
            Some(sent) => self.closed(target, sent, &layer.digest).await,
            None => false,
        };
        let exists = !while_written
            && self
                .client
                .blob_exists(target, &layer.digest)
                .await
                .unwrap_or(false);
        if !while_written && !exists {
            self.client
                .push_blob_stream(
                    target,
                    layer
                        .spool
                        .stream()
                        .map_err(oci_client::errors::OciDistributionError::IoError),
                    &layer.digest,
                    Some(layer.size),
                )
                .await
                .context("uploading the snapshot layer")?;
        }
        info!(digest = %layer.digest, bytes = layer.size, already_there = exists, while_written, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot layer uploaded");

        let config = image::next_config(&base.config, &layer.diff_id, created);
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&config_bytes))
        );
        self.client
            .push_blob(target, config_bytes.clone(), &config_digest)
            .await
            .context("uploading the image config")?;

        let manifest: Value = image::next_manifest(
            &base.manifest,
            (&config_digest, config_bytes.len()),
            (
                &layer.digest,
                layer.size,
                codec.media_type(image::is_docker(&base.manifest)),
                &layer.annotations,
            ),
            annotations,
        );
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or(image::OCI_MANIFEST)
            .to_string();
        self.client
            .push_manifest_raw(
                target,
                Bytes::from(manifest_bytes.clone()),
                media_type.parse().context("media type")?,
            )
            .await
            .context("uploading the manifest (the tag)")?;
        self.known.remember(
            target,
            base.layer_digests()
                .into_iter()
                .chain([layer.digest.as_str()]),
        );
        Ok(image::Base {
            digest: format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&manifest_bytes))
            ),
            manifest,
            config,
        })
    }

    /// Whether the upload `sent` while the layer was written holds the layer
    /// `digest` now: its session closed. If not, the warning says why (the
    /// layer is uploaded again in one request).
    async fn closed(
        &self,
        target: &Reference,
        sent: tokio::task::JoinHandle<Result<Sent>>,
        digest: &str,
    ) -> bool {
        let closing = match sent.await {
            Ok(Ok(sent)) => self.close_upload(target, sent, digest).await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("the upload's task ended: {e}")),
        };
        closing
            .map_err(|e| warn!(error = %format!("{e:#}"), "the layer could not be uploaded while it was written: it is uploaded again in one request"))
            .is_ok()
    }

    /// Makes sure the repository has every base layer, at a cost that does
    /// not grow with their number: layers known to be there are not asked
    /// about (the image was pulled from this repository, or this sidecar
    /// pushed them), the others are asked about together, and the missing
    /// ones put a few at a time.
    async fn put_base_layers(
        &self,
        ctrd: &Ctrd,
        target: &Reference,
        base_image: Option<&Reference>,
        base: &image::Base,
    ) -> Result<()> {
        let from_here = base_image.is_some_and(|b| {
            b.resolve_registry() == target.resolve_registry()
                && b.repository() == target.repository()
        });
        let mut layers = Vec::new();
        for layer in base.manifest["layers"].as_array().into_iter().flatten() {
            let digest = layer["digest"]
                .as_str()
                .context("a base layer without digest")?;
            layers.push((digest, layer["size"].as_u64()));
        }
        let known = self.known.known_in(target);
        let unknown: Vec<_> = layers
            .iter()
            .filter(|(digest, _)| !from_here && !known.contains(*digest))
            .collect();
        let started = std::time::Instant::now();
        let mut missing = Vec::new();
        for chunk in unknown.chunks(BLOB_CHECKS) {
            let there = futures::future::try_join_all(
                chunk
                    .iter()
                    .map(|(digest, _)| self.has_blob(target, digest)),
            )
            .await?;
            missing.extend(
                chunk
                    .iter()
                    .zip(there)
                    .filter(|(_, there)| !there)
                    .map(|(layer, _)| **layer),
            );
        }
        info!(
            layers = layers.len(),
            asked = unknown.len(),
            missing = missing.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "base layers checked"
        );
        for chunk in missing.chunks(BLOB_UPLOADS) {
            futures::future::try_join_all(chunk.iter().map(|(digest, size)| {
                self.upload_base_layer(ctrd, target, base_image, digest, *size)
            }))
            .await?;
        }
        self.known.remember(target, layers.iter().map(|(d, _)| *d));
        Ok(())
    }
}

/// Repositories asked for per catalog page.
const CATALOG_PAGE: usize = 1000;

/// Existence checks in flight at once (HEAD requests, small).
const BLOB_CHECKS: usize = 16;
/// Base layer uploads at once.
const BLOB_UPLOADS: usize = 3;

/// Blobs a sidecar knows its repository has (one sidecar per desktop: it
/// pushes to one repository), so the next snapshot does not ask again. Kept
/// with its sessions ([`crate::snapshot::session::Sessions`]); clones share one set.
#[derive(Debug, Default, Clone)]
pub struct KnownBlobs(std::sync::Arc<std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>>);

impl KnownBlobs {
    fn key(target: &Reference) -> String {
        format!("{}/{}", target.resolve_registry(), target.repository())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn known_in(&self, target: &Reference) -> BTreeSet<String> {
        self.lock()
            .get(&Self::key(target))
            .cloned()
            .unwrap_or_default()
    }

    fn remember<'a>(&self, target: &Reference, digests: impl IntoIterator<Item = &'a str>) {
        self.lock()
            .entry(Self::key(target))
            .or_default()
            .extend(digests.into_iter().map(str::to_string));
    }
}

/// What a manifest DELETE came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    Done,
    /// Not there any more (deleted by someone else since it was listed).
    Gone,
    /// The registry does not delete (`storage.delete.enabled: false`: 405,
    /// `UNSUPPORTED`); its answer.
    Refused(String),
}

impl Registry {
    /// Every tag of `target`'s repository.
    pub async fn tags(&self, target: &Reference) -> Result<Vec<String>> {
        let listed = self
            .client
            .list_tags(target, &self.auth, None, None)
            .await
            .context("listing the repository's tags")?;
        Ok(listed.tags)
    }

    /// The digest and annotations of the manifest `tag` in `target`'s repository.
    pub async fn manifest_of(&self, target: &Reference, tag: &str) -> Result<(String, Value)> {
        let (digest, manifest) = self.manifest(target, tag).await?;
        Ok((digest, manifest["annotations"].clone()))
    }

    /// The digest and the whole manifest (layers and their sizes, annotations)
    /// of `tag` in `target`'s repository.
    pub async fn manifest(&self, target: &Reference, tag: &str) -> Result<(String, Value)> {
        let reference = Reference::with_tag(
            target.registry().to_string(),
            target.repository().to_string(),
            tag.to_string(),
        );
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(
                &reference,
                &self.auth,
                &[image::OCI_MANIFEST, image::DOCKER_MANIFEST],
            )
            .await
            .with_context(|| format!("reading the manifest of {tag}"))?;
        let manifest: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the manifest of {tag} is not JSON"))?;
        Ok((digest, manifest))
    }

    /// Every repository of the registry `host` (`/v2/_catalog`, pages of
    /// [`CATALOG_PAGE`] followed with `last`, so a registry that ignores `Link`
    /// is read whole). A registry with token authorization is asked for a
    /// token of `registry:catalog:*` scope, which pulling does not give.
    pub async fn catalog(&self, host: &str) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            repositories: Option<Vec<String>>,
        }
        let url = format!("{}://{host}/v2/_catalog", self.scheme());
        let mut bearer: Option<String> = None;
        let mut out: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let mut query = vec![("n", CATALOG_PAGE.to_string())];
            if let Some(l) = &last {
                query.push(("last", l.clone()));
            }
            let request = |bearer: &Option<String>| {
                let request = self.http.get(&url).query(&query);
                match (bearer, &self.auth) {
                    (Some(token), _) => request.bearer_auth(token),
                    (None, RegistryAuth::Basic(user, password)) => {
                        request.basic_auth(user, Some(password))
                    }
                    (None, _) => request,
                }
            };
            let mut response = request(&bearer)
                .send()
                .await
                .context("listing the registry's repositories")?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED {
                let challenge = challenge_of(&response);
                bearer = Some(self.scoped_token(&challenge, "registry:catalog:*").await?);
                response = request(&bearer)
                    .send()
                    .await
                    .context("listing the registry's repositories")?;
            }
            let status = response.status();
            let body = response
                .bytes()
                .await
                .context("reading the registry's catalog")?;
            if !status.is_success() {
                let said: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                anyhow::bail!(
                    "the registry answered {status} to listing its repositories: {}",
                    said.trim()
                );
            }
            let page: Page = serde_json::from_slice(&body)
                .context("the registry's catalog is not a repository list")?;
            let page = page.repositories.unwrap_or_default();
            let full = page.len() >= CATALOG_PAGE;
            let next = page.last().cloned();
            out.extend(page);
            match next {
                Some(n) if full && last.as_ref() != Some(&n) => last = Some(n),
                _ => break,
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn scheme(&self) -> &'static str {
        match self.protocol {
            Protocol::Https => "https",
            Protocol::Http => "http",
        }
    }

    /// Deletes the manifest `digest` of `target`'s repository (and so every tag
    /// on it). A registry with token authorization is asked for a token of
    /// `delete` scope, which pushing does not give.
    pub async fn delete_manifest(&self, target: &Reference, digest: &str) -> Result<Deleted> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{digest}",
            self.scheme(),
            target.resolve_registry(),
            target.repository()
        );
        let mut bearer: Option<String> = None;
        for attempt in 0..2 {
            let request = match (&bearer, &self.auth) {
                (Some(token), _) => self.http.delete(&url).bearer_auth(token),
                (None, RegistryAuth::Basic(user, password)) => {
                    self.http.delete(&url).basic_auth(user, Some(password))
                }
                (None, _) => self.http.delete(&url),
            };
            let response = request
                .send()
                .await
                .with_context(|| format!("deleting {digest}"))?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = challenge_of(&response);
                let scope = format!("repository:{}:delete", target.repository());
                bearer = Some(self.scoped_token(&challenge, &scope).await?);
                continue;
            }
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return match status.as_u16() {
                200..=299 => Ok(Deleted::Done),
                404 => Ok(Deleted::Gone),
                405 => Ok(Deleted::Refused(format!("{status}: {}", body.trim()))),
                _ if body.contains("UNSUPPORTED") => {
                    Ok(Deleted::Refused(format!("{status}: {}", body.trim())))
                }
                _ => anyhow::bail!(
                    "the registry answered {status} to deleting {digest}: {}",
                    body.trim()
                ),
            };
        }
        anyhow::bail!("the registry refused the delete token for {digest}")
    }

    /// A bearer token of `scope` (`repository:<name>:delete`,
    /// `registry:catalog:*`) from the registry's token service, as its
    /// `WWW-Authenticate` challenge names it.
    async fn scoped_token(&self, challenge: &str, scope: &str) -> Result<String> {
        let challenges = http_auth::parse_challenges(challenge)
            .map_err(|e| anyhow::anyhow!("the registry's WWW-Authenticate does not parse: {e}"))?;
        let bearer = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
            .context("the registry refused the credentials (no Bearer challenge to answer)")?;
        let param = |name: &str| {
            bearer
                .params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        let realm = param("realm").context("a Bearer challenge without realm")?;
        let mut query = vec![("scope", scope.to_string())];
        if let Some(service) = param("service") {
            query.push(("service", service));
        }
        let mut request = self.http.get(&realm).query(&query);
        if let RegistryAuth::Basic(user, password) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("asking {realm} for a delete token"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "the token service {realm} answered {}",
            response.status()
        );
        let answer: Value = response
            .json()
            .await
            .context("the token service's answer is not JSON")?;
        answer["token"]
            .as_str()
            .or_else(|| answer["access_token"].as_str())
            .map(str::to_string)
            .context("the token service's answer holds no token")
    }
}

fn client_config(protocol: Protocol, roots: &[Certificate]) -> ClientConfig {
    ClientConfig {
        protocol: match protocol {
            Protocol::Https => ClientProtocol::Https,
            Protocol::Http => ClientProtocol::Http,
        },
        extra_root_certificates: roots.to_vec(),
        // one PUT per blob (sizes and digests are known): oci-client's chunked
        // upload sends 4 MiB per request, a round trip and a registry commit each
        use_monolithic_push: true,
        ..Default::default()
    }
}

fn to_oci(e: anyhow::Error) -> oci_client::errors::OciDistributionError {
    oci_client::errors::OciDistributionError::GenericError(Some(format!("{e:#}")))
}

/// The `WWW-Authenticate` challenge of a 401, empty when there is none.
fn challenge_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
