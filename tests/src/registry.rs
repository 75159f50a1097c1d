//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! server) on loopback, with TLS and htpasswd (Basic) or token (Bearer) auth.

use crate::{ports, token::TokenService};
use anyhow::{bail, Context, Result};
use base64::Engine;
use oci_client::{client::ClientConfig, secrets::RegistryAuth, Client, Reference};
use serde_json::Value;
use snapshot_certs::Authority;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::{Child, Command};

pub const USER: &str = "desktop";
pub const PASSWORD: &str = "s3cret-Pa55";

/// How clients prove who they are.
pub enum Auth {
    /// htpasswd: every request carries Basic credentials.
    Basic,
    /// A token service: Basic credentials buy Bearer tokens living this many seconds.
    Token { lifetime_secs: u64 },
}

pub struct Registry {
    pub host: String,
    pub dir: tempfile::TempDir,
    pub authority: Authority,
    pub ca_pem: String,
    pub token: Option<TokenService>,
    config: PathBuf,
    child: Child,
}

/// Writes a `.dockerconfigjson` with an entry for registry `host`.
pub fn write_dockerconfigjson(path: &Path, host: &str, user: &str, password: &str) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let doc = serde_json::json!({"auths": {host: {
        "username": user, "password": password, "auth": auth, "email": ""}}});
    std::fs::write(path, doc.to_string()).expect("writing a .dockerconfigjson");
}

impl Registry {
    /// A registry with htpasswd auth.
    pub async fn start() -> Self {
        Self::start_with(Auth::Basic).await
    }

    /// Starts it, or panics with the reason and the registry's own words.
    pub async fn start_with(auth: Auth) -> Self {
        match Self::try_start(auth, true).await {
            Ok(r) => r,
            Err(e) => panic!("the test registry (docker-registry) cannot start: {e:#}"),
        }
    }

    /// A registry that refuses deletes (`storage.delete.enabled: false`: 405
    /// `UNSUPPORTED`), with htpasswd auth.
    pub async fn start_refusing_deletes() -> Self {
        match Self::try_start(Auth::Basic, false).await {
            Ok(r) => r,
            Err(e) => panic!("the test registry (docker-registry) cannot start: {e:#}"),
        }
    }

    async fn try_start(auth: Auth, delete: bool) -> Result<Self> {
        crate::init_crypto();
        let binary = which("docker-registry")
            .context("docker-registry is not installed (Debian package docker-registry; `just deps` installs it)")?;
        let dir = tempfile::tempdir().context("temp dir")?;
        let authority = Authority::new("test registry CA", 2)?;
        let serving = authority.serving(&["127.0.0.1".into(), "localhost".into()], 2)?;
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, &serving.cert_pem)?;
        std::fs::write(&key, &serving.key_pem)?;
        std::fs::write(dir.path().join("ca.crt"), &authority.cert_pem)?;
        let port = ports::free_port();
        let host = format!("127.0.0.1:{port}");
        let (auth_yaml, token) = match auth {
            Auth::Basic => {
                let htpasswd = dir.path().join("htpasswd");
                let out = std::process::Command::new("htpasswd")
                    .args(["-Bbn", USER, PASSWORD])
                    .output()
                    .context("running htpasswd (Debian package apache2-utils)")?;
                if !out.status.success() {
                    bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                std::fs::write(&htpasswd, &out.stdout)?;
                (
                    format!(
                        "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                        htpasswd.display()
                    ),
                    None,
                )
            }
            Auth::Token { lifetime_secs } => {
                let service = TokenService::start(
                    &serving.cert_pem,
                    &serving.key_pem,
                    USER,
                    PASSWORD,
                    lifetime_secs,
                )
                .await?;
                let bundle = dir.path().join("token-signer.crt");
                std::fs::write(&bundle, &service.signing_cert_pem)?;
                (service.registry_auth_yaml(&bundle), Some(service))
            }
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: {delete}\nhttp:\n  addr: {host}\n  tls:\n    certificate: {}\n    key: {}\n{auth_yaml}",
                dir.path().join("data").display(),
                cert.display(),
                key.display()
            ),
        )?;
        let child = Self::serve(&binary, &config, dir.path())?;
        let registry = Self {
            host,
            dir,
            ca_pem: authority.cert_pem.clone(),
            authority,
            token,
            config,
            child,
        };
        registry.until_up().await?;
        Ok(registry)
    }

    fn serve(binary: &Path, config: &Path, dir: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))?;
        Command::new(binary)
            .arg("serve")
            .arg(config)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawning docker-registry")
    }

    /// Stops the registry, runs distribution's garbage collector on its
    /// storage (as an operator does, the registry down), and starts it again
    /// on the same address; what the collector printed.
    pub async fn garbage_collect(&mut self) -> String {
        let binary = which("docker-registry").expect("docker-registry");
        crate::kill_and_reap(&mut self.child);
        let out = Command::new(&binary)
            .arg("garbage-collect")
            .arg(&self.config)
            .output()
            .await
            .expect("running docker-registry garbage-collect");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "garbage-collect failed:\n{said}");
        self.child = Self::serve(&binary, &self.config, self.dir.path()).expect("restarting");
        self.until_up().await.expect("the registry back after GC");
        said
    }

    /// Kills the registry and starts it again with the same config: same
    /// address, storage, TLS certificate and auth (as a registry pod
    /// restarting); returns once it answers again.
    pub async fn restart(&mut self) {
        let binary = which("docker-registry").expect("docker-registry");
        crate::kill_and_reap(&mut self.child);
        self.child = Self::serve(&binary, &self.config, self.dir.path()).expect("restarting");
        if let Err(e) = self.until_up().await {
            panic!("the registry did not come back after a restart: {e:#}");
        }
    }

    /// Bytes the registry's storage holds (blobs and metadata).
    pub fn storage_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.dir.path().join("data"))
    }

    async fn until_up(&self) -> Result<()> {
        let registry = self;
        let client = registry.http_client();
        let url = format!("https://{}/v2/", registry.host);
        let up =
            ports::wait_until(Duration::from_secs(10), || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    matches!(client.get(&url).send().await, Ok(r) if r.status().as_u16() == 401)
                }
            })
            .await;
        if !up {
            bail!(
                "no answer on {url} within 10 s; its log: {}",
                registry.log()
            );
        }
        Ok(())
    }

    /// `127.0.0.1:PORT`, the registry's host as images name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The user the registry knows.
    pub fn username(&self) -> &'static str {
        USER
    }

    /// That user's password.
    pub fn password(&self) -> &'static str {
        PASSWORD
    }

    /// What the registry logged (access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Path of the registry's CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// An HTTPS client trusting only this registry's CA.
    pub fn http_client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("the registry CA");
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .build()
            .expect("an HTTPS client")
    }

    /// Writes a `.dockerconfigjson` for this registry with the given credentials.
    pub fn write_dockerconfigjson(&self, path: &Path, user: &str, password: &str) {
        write_dockerconfigjson(path, &self.host, user, password);
    }

    /// A `.dockerconfigjson` with the right credentials, written beside the registry.
    pub fn credentials_file(&self) -> PathBuf {
        let path = self.dir.path().join("dockerconfig.json");
        self.write_dockerconfigjson(&path, USER, PASSWORD);
        path
    }

    /// An oci-client that trusts this registry.
    pub fn oci_client(&self) -> Client {
        Client::new(ClientConfig {
            extra_root_certificates: vec![oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: self.ca_pem.as_bytes().to_vec(),
            }],
            ..Default::default()
        })
    }

    /// Pushes one tiny image to `repo` (path without host) once and tags it with every tag.
    pub async fn push_tags(&self, repo: &str, tags: &[&str]) {
        if let Err(e) = self.try_push_tags(repo, tags).await {
            panic!(
                "pushing {repo}:{tags:?} to the test registry: {e:#}\nregistry log: {}",
                self.log()
            );
        }
    }

    async fn try_push_tags(&self, repo: &str, tags: &[&str]) -> Result<()> {
        let client = self.oci_client();
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        client.store_auth_if_needed(&self.host, &auth).await;
        let (layer, diff_id) = tiny_layer(repo)?;
        let layer_digest = crate::oci::sha256(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "config": {}
        }))?;
        let config_digest = crate::oci::sha256(&config);
        let reference =
            |tag: &str| Reference::with_tag(self.host.clone(), repo.to_string(), tag.to_string());
        let first = reference(tags.first().copied().unwrap_or("latest"));
        client
            .auth(&first, &auth, oci_client::RegistryOperation::Push)
            .await
            .context("auth")?;
        client
            .push_blob(&first, layer.clone(), &layer_digest)
            .await
            .context("pushing the layer")?;
        client
            .push_blob(&first, config.clone(), &config_digest)
            .await
            .context("pushing the config")?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}]
        }))?;
        for tag in tags {
            client
                .push_manifest_raw(
                    &reference(tag),
                    manifest.clone(),
                    "application/vnd.oci.image.manifest.v1+json".parse()?,
                )
                .await
                .with_context(|| format!("tagging {tag}"))?;
        }
        Ok(())
    }

    /// Uploads `data` as a blob of `repo` in one PUT (the registry's own
    /// ingest, no chunking); returns its digest.
    pub async fn upload_whole(&self, repo: &str, data: Vec<u8>) -> String {
        let digest = crate::oci::sha256(&data);
        let client = self.http_client();
        let begin = client
            .post(format!("https://{}/v2/{repo}/blobs/uploads/", self.host))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("starting an upload");
        let location = begin
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .expect("an upload location")
            .to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("https://{}{location}", self.host)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = client
            .put(format!("{location}{sep}digest={digest}"))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await
            .expect("the upload");
        assert_eq!(put.status().as_u16(), 201, "the registry took the blob");
        digest
    }

    /// Pushes an image of `layers` (gzip blobs with their diff_ids, as
    /// [`layer`] makes) to `repo:tag`, with a history entry per layer and the
    /// manifest `annotations`; returns the manifest's digest.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[(Vec<u8>, String)],
        annotations: Value,
    ) -> String {
        let client = self.oci_client();
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        let reference = Reference::with_tag(self.host.clone(), repo.to_string(), tag.to_string());
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .expect("auth");
        let mut descriptors = Vec::new();
        for (blob, _) in layers {
            let digest = crate::oci::sha256(blob);
            client
                .push_blob(&reference, blob.clone(), &digest)
                .await
                .expect("pushing a layer");
            descriptors.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": blob.len()}));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.1).collect::<Vec<_>>()},
            "history": layers.iter().map(|l| serde_json::json!({"created_by": format!("layer {}", &l.1[7..19])})).collect::<Vec<_>>(),
            "config": {"Env": ["PATH=/bin", format!("IMAGE={repo}:{tag}")], "Cmd": ["/bin/sh"]}
        }))
        .expect("a config");
        let config_digest = crate::oci::sha256(&config);
        client
            .push_blob(&reference, config.clone(), &config_digest)
            .await
            .expect("pushing the config");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descriptors,
            "annotations": annotations,
        }))
        .expect("a manifest");
        client
            .push_manifest_raw(
                &reference,
                manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json"
                    .parse()
                    .expect("a media type"),
            )
            .await
            .unwrap_or_else(|e| panic!("pushing {repo}:{tag}: {e}\nregistry log: {}", self.log()));
        crate::oci::sha256(&manifest)
    }

    /// Pushes an image of the harness's base layer with `extra_layers` on top
    /// to `repo:tag`, without annotations; returns the manifest's digest.
    pub async fn push_on_base(
        &self,
        repo: &str,
        tag: &str,
        extra_layers: &[(Vec<u8>, String)],
    ) -> String {
        let mut layers = vec![crate::containerd::base_layer_blob()];
        layers.extend(extra_layers.iter().cloned());
        self.push_image(repo, tag, &layers, serde_json::json!({}))
            .await
    }

    /// The manifest of `repo:tag` and its image config, as JSON; panics when
    /// either cannot be read.
    pub async fn manifest_and_config(&self, repo: &str, tag: &str) -> (Value, Value) {
        let reference = Reference::with_tag(self.host.clone(), repo.to_string(), tag.to_string());
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        let client = self.oci_client();
        let (bytes, _) = client
            .pull_manifest_raw(
                &reference,
                &auth,
                &[
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("the manifest of {repo}:{tag}: {e}"));
        let manifest: Value = serde_json::from_slice(&bytes).expect("a JSON manifest");
        let digest = manifest["config"]["digest"]
            .as_str()
            .expect("a config digest");
        let mut config = Vec::new();
        client
            .pull_blob(&reference, digest, &mut config)
            .await
            .unwrap_or_else(|e| panic!("the config of {repo}:{tag}: {e}"));
        (
            manifest,
            serde_json::from_slice(&config).expect("a JSON config"),
        )
    }

    /// Pulls `repo:tag` whole: its manifest, then its config and every
    /// layer, each checked against its descriptor's digest and size; the
    /// digests of those blobs. Panics naming the blob that is gone or wrong
    /// (Basic auth).
    pub async fn pull_whole(&self, repo: &str, tag: &str) -> Vec<String> {
        let (manifest, _) = self.manifest_and_config(repo, tag).await;
        let mut descriptors = vec![manifest["config"].clone()];
        descriptors.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
        let mut digests = Vec::new();
        for d in descriptors {
            let digest = d["digest"].as_str().expect("a descriptor's digest");
            let blob = self
                .blob(repo, digest)
                .await
                .unwrap_or_else(|| panic!("{repo}:{tag}: blob {digest} is gone"));
            assert_eq!(
                crate::oci::sha256(&blob),
                digest,
                "{repo}:{tag}: blob {digest}"
            );
            assert_eq!(
                Some(blob.len() as u64),
                d["size"].as_u64(),
                "{repo}:{tag}: size of {digest}"
            );
            digests.push(digest.to_string());
        }
        digests
    }

    /// The blob `digest` of `repo`, `None` when the registry no longer has it
    /// (404); panics on any other answer (Basic auth).
    pub async fn blob(&self, repo: &str, digest: &str) -> Option<Vec<u8>> {
        let answer = self
            .http_client()
            .get(format!("https://{}/v2/{repo}/blobs/{digest}", self.host))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET blob {digest}: {e}"));
        match answer.status().as_u16() {
            404 => None,
            200 => Some(answer.bytes().await.expect("the blob's body").to_vec()),
            other => panic!("GET blob {repo}@{digest}: HTTP {other}"),
        }
    }

    /// The tags of `repo` as the registry lists them (none when it has no
    /// such repository); Basic or through the token service.
    pub async fn tags(&self, repo: &str) -> Vec<String> {
        let reference = Reference::with_tag(self.host.clone(), repo.to_string(), "latest".into());
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        match self
            .oci_client()
            .list_tags(&reference, &auth, None, None)
            .await
        {
            Ok(list) => list.tags,
            Err(oci_client::errors::OciDistributionError::RegistryError { envelope, .. })
                if envelope
                    .errors
                    .iter()
                    .any(|e| e.code == oci_client::errors::OciErrorCode::NameUnknown) =>
            {
                Vec::new()
            }
            Err(e) => panic!("listing the tags of {repo}: {e}"),
        }
    }

    /// Stops the registry (the address then refuses connections).
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Registry {
    /// A failing test shows the end of the registry's log; the process is killed
    /// and reaped, then the temp dir (storage included) removed with `dir`.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- docker-registry {} logged (last lines) ----\n{}",
                self.host,
                crate::webhook::tail(&self.log(), 40)
            );
        }
        // dead before `dir` (its storage) goes
        crate::kill_and_reap(&mut self.child);
    }
}

/// A gzip layer holding one small file; returns (gzip bytes, diff_id).
fn tiny_layer(name: &str) -> Result<(Vec<u8>, String)> {
    layer_with("etc/desktop-snapshot-test", name)
}

/// A gzip layer holding one file `path` that says `name`, and its diff_id.
pub fn layer(path: &str, name: &str) -> (Vec<u8>, String) {
    layer_with(path, name).expect("building a layer")
}

fn layer_with(path: &str, name: &str) -> Result<(Vec<u8>, String)> {
    let content = format!("layer of {name}\n");
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = crate::oci::tar_header(tar::EntryType::Regular, 0o644, content.len() as u64);
    tar.append_data(&mut h, path, content.as_bytes())?;
    let tar = tar.into_inner()?;
    let diff_id = crate::oci::sha256(&tar);
    Ok((crate::oci::gzip(&tar)?, diff_id))
}

/// Writes `certs.d/<host>/hosts.toml` under `dir` for `registry` (its CA;
/// pull, resolve, push); the `certs.d` folder, for `--hosts-dir`.
pub fn write_hosts_dir(dir: &Path, registry: &Registry) -> PathBuf {
    let host = &registry.host;
    let certs = dir.join("certs.d");
    let hosts = certs.join(host);
    std::fs::create_dir_all(&hosts).expect("hosts dir");
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{}\"\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n",
            registry.ca_path().display()
        ),
    )
    .expect("hosts.toml");
    certs
}

/// The full path of a command on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
