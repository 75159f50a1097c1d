//! The real `snapshot-webhook` binary, served over HTTPS on loopback, and a
//! client that checks its certificate against the CA only, as kube-apiserver
//! does with the webhook configuration's caBundle.

use crate::{
    containerd::{Containerd, Image, RunSpec},
    launch::Launched,
    ports, workspace_binary,
};
use snapshot_certs::Authority;
use std::os::unix::fs::PermissionsExt;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::Command;

/// Where the webhook's registry is and how to trust and log in to it.
pub struct RegistryAccess<'a> {
    pub host: &'a str,
    pub ca: Option<&'a Path>,
    pub credentials: Option<&'a Path>,
}

pub struct Webhook {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    launched: Launched,
}

impl Webhook {
    /// Starts the webhook on `registry`, trusting its CA, with its right credentials.
    pub async fn for_registry(registry: &crate::registry::Registry, extra: &[&str]) -> Self {
        Self::launch_on(registry, extra, None).await
    }

    /// Starts the webhook binary; `extra` flags are appended (each flag may be given once).
    pub async fn start(registry: RegistryAccess<'_>, extra: &[&str]) -> Self {
        Self::launch(registry, extra, None).await
    }

    /// Starts the webhook from its image (`just images`) in `containerd`, as the
    /// Deployment runs it: its own user (65532), the serving certificate's folder,
    /// the registry's CA and credentials mounted read-only where the flags say.
    pub async fn in_container(
        containerd: &Containerd,
        image: &Image,
        registry: &crate::registry::Registry,
        extra: &[&str],
    ) -> Self {
        Self::launch_on(registry, extra, Some((containerd, image))).await
    }

    /// Launches it on `registry`, trusting its CA, with its right credentials.
    async fn launch_on(
        registry: &crate::registry::Registry,
        extra: &[&str],
        container: Option<(&Containerd, &Image)>,
    ) -> Self {
        let (ca, credentials) = (registry.ca_path(), registry.credentials_file());
        let access = RegistryAccess {
            host: &registry.host,
            ca: Some(&ca),
            credentials: Some(&credentials),
        };
        Self::launch(access, extra, container).await
    }

    async fn launch(
        registry: RegistryAccess<'_>,
        extra: &[&str],
        container: Option<(&Containerd, &Image)>,
    ) -> Self {
        crate::init_crypto();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_pem = write_serving_cert(dir.path(), true);
        let port = ports::free_port();
        let log_path = dir.path().join("webhook.log");
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--tls-cert".into(),
            path(&dir.path().join("tls.crt")),
            "--tls-key".into(),
            path(&dir.path().join("tls.key")),
            "--tls-reload-interval".into(),
            "200ms".into(),
            "--registry".into(),
            registry.host.to_string(),
        ];
        // the namespace check asks a Kubernetes API: only a test that gives
        // one (harness::kubeapi) has it
        if !extra
            .iter()
            .any(|a| a.starts_with("--namespace-check") || a.starts_with("--kube-api-url"))
        {
            args.push("--namespace-check=false".into());
        }
        if !extra.contains(&"--log-format") {
            args.extend(["--log-format".into(), "json".into()]);
        }
        if let Some(ca) = registry.ca {
            args.extend(["--registry-ca".into(), path(ca)]);
        }
        if let Some(c) = registry.credentials {
            args.extend(["--registry-credentials".into(), path(c)]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let launched = match container {
            None => {
                let log = std::fs::File::create(&log_path).expect("log file");
                let child = Command::new(workspace_binary("snapshot-webhook"))
                    .args(&args)
                    .env("RUST_LOG", "info")
                    .stdout(Stdio::from(log.try_clone().expect("log")))
                    .stderr(Stdio::from(log))
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawning snapshot-webhook");
                Launched::Process(child)
            }
            Some((containerd, image)) => {
                // the image's user (65532) reads the certificate folder, as from a secret volume
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .expect("chmod the certificate folder");
                let mut mounts = vec![(dir.path().to_path_buf(), path(dir.path()), true)];
                for file in [registry.ca, registry.credentials].into_iter().flatten() {
                    mounts.push((file.to_path_buf(), path(file), true));
                }
                let spec = RunSpec {
                    args,
                    env: vec![("RUST_LOG".into(), "info".into())],
                    mounts,
                    log: log_path,
                    ..Default::default()
                };
                containerd
                    .run_component(image, &format!("snapshot-webhook-{port}"), &spec)
                    .await
            }
        };
        let mut webhook = Self {
            port,
            dir,
            ca_pem,
            launched,
        };
        let client = webhook.client();
        let url = webhook.url("/readyz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if matches!(client.get(&url).send().await, Ok(r) if r.status().is_success()) {
                return webhook;
            }
            if let Some(how) = webhook.launched.exited() {
                panic!(
                    "snapshot-webhook exited ({how}) before it was ready; its log:\n{}",
                    webhook.log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot-webhook did not become ready on {url} within 15 s; its log:\n{}",
                webhook.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// The webhook's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("webhook.log")).unwrap_or_default()
    }

    /// A client trusting only the CA the webhook's certificate was made with.
    pub fn client(&self) -> reqwest::Client {
        client_trusting(&self.ca_pem)
    }

    /// POSTs an AdmissionReview (or anything JSON) to `/mutate`; returns the HTTP
    /// status and the answer as JSON (a JSON string holding the text when the
    /// answer is not JSON, e.g. a 400's message).
    pub async fn send(&self, body: &serde_json::Value) -> (reqwest::StatusCode, serde_json::Value) {
        self.send_bytes(serde_json::to_vec(body).expect("a JSON body"))
            .await
    }

    /// POSTs an AdmissionReview to `/mutate`; returns the AdmissionReview it
    /// answers (panics, with the webhook's log, on any other answer).
    pub async fn admit(&self, review: &serde_json::Value) -> serde_json::Value {
        let (status, answer) = self.send(review).await;
        assert!(
            status == reqwest::StatusCode::OK && answer.is_object(),
            "the webhook answers an AdmissionReview, not {status} {answer}\nwebhook log:\n{}",
            self.log()
        );
        answer
    }

    /// POSTs raw bytes to `/mutate`, as [`Webhook::send`].
    pub async fn send_bytes(&self, body: Vec<u8>) -> (reqwest::StatusCode, serde_json::Value) {
        let r = match self
            .client()
            .post(self.url("/mutate"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => panic!("POST /mutate failed: {e:#}\nwebhook log:\n{}", self.log()),
        };
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// The value of one metric sample (exact name with labels), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Its `admission_duration_seconds` histogram, as it stands now.
    pub async fn admission_histogram(&self) -> Histogram {
        Histogram(
            self.metrics()
                .await
                .lines()
                .filter_map(|l| {
                    let rest =
                        l.strip_prefix("snapshot_webhook_admission_duration_seconds_bucket{le=\"")?;
                    let (le, count) = rest.split_once("\"} ")?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, count.trim().parse().ok()?))
                })
                .collect(),
        )
    }

    /// Replaces the serving certificate on disk (atomically, as kubelet does with
    /// secret volumes): signed by the same CA, or by a new one. Returns the CA in force.
    pub fn rotate_cert(&mut self, new_ca: bool) -> String {
        if new_ca {
            self.ca_pem = write_serving_cert(self.dir.path(), true);
        } else {
            write_serving_cert(self.dir.path(), false);
        }
        self.ca_pem.clone()
    }

    /// The process id, when it runs as a process of this machine.
    pub fn pid(&self) -> Option<u32> {
        match &self.launched {
            Launched::Process(child) => child.id(),
            Launched::Container { .. } => None,
        }
    }
}

impl Drop for Webhook {
    /// A failing test shows what the webhook said; the process is killed and
    /// reaped, then its temp dir removed with `dir`.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- snapshot-webhook on port {} logged ----\n{}",
                self.port,
                tail(&self.log(), 200)
            );
        }
        // dead before `dir` goes
        self.launched.kill_and_reap();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes tls.crt / tls.key (and, with `new_ca`, a new ca.crt/ca.key) in `dir`;
/// returns the CA's PEM.
fn write_serving_cert(dir: &Path, new_ca: bool) -> String {
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let authority = if new_ca || !ca_crt.exists() {
        let a = Authority::new("webhook test CA", 2).expect("CA");
        std::fs::write(&ca_crt, &a.cert_pem).expect("ca.crt");
        std::fs::write(&ca_key, a.key_pem()).expect("ca.key");
        a
    } else {
        let cert = std::fs::read_to_string(&ca_crt).expect("ca.crt");
        let key = std::fs::read_to_string(&ca_key).expect("ca.key");
        Authority::from_pem(&cert, &key).expect("CA")
    };
    let serving = authority
        .serving(&["localhost".into(), "127.0.0.1".into()], 1)
        .expect("serving cert");
    replace(
        &dir.join("tls.key"),
        &serving.key_pem,
        &dir.join("tls.crt"),
        &serving.cert_pem,
    );
    authority.cert_pem
}

/// Swaps both files through one directory rename, so a reader never sees a
/// certificate with the other's key (the way kubelet updates secret volumes).
fn replace(key_path: &Path, key: &str, cert_path: &Path, cert: &str) {
    let dir = key_path.parent().expect("folder");
    let staging: PathBuf = dir.join(".staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::write(staging.join("tls.key"), key).expect("key");
    std::fs::write(staging.join("tls.crt"), cert).expect("cert");
    // Both renames happen back to back; the webhook re-reads and validates the pair,
    // and keeps the old one if it sees a mismatched moment.
    std::fs::rename(staging.join("tls.key"), key_path).expect("rename key");
    std::fs::rename(staging.join("tls.crt"), cert_path).expect("rename cert");
}

/// An HTTPS client that trusts only `ca_pem`.
pub fn client_trusting(ca_pem: &str) -> reqwest::Client {
    crate::init_crypto();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTPS client")
}

/// The webhook's own admission times: (bucket bound in seconds, cumulative
/// count), as Prometheus exposes a histogram.
#[derive(Debug, Clone, Default)]
pub struct Histogram(pub Vec<(f64, f64)>);

impl Histogram {
    /// What was observed since `before`.
    pub fn since(&self, before: &Histogram) -> Histogram {
        Histogram(
            self.0
                .iter()
                .map(|(le, n)| {
                    let was = before
                        .0
                        .iter()
                        .find(|(b, _)| b == le)
                        .map(|(_, c)| *c)
                        .unwrap_or(0.0);
                    (*le, n - was)
                })
                .collect(),
        )
    }

    /// How many admissions it counts.
    pub fn total(&self) -> f64 {
        self.0.last().map(|(_, n)| *n).unwrap_or(0.0)
    }

    /// How many took longer than `bound` seconds; `None` when no bucket ends there.
    pub fn over(&self, bound: f64) -> Option<f64> {
        self.0
            .iter()
            .find(|(le, _)| *le == bound)
            .map(|(_, n)| self.total() - n)
    }

    /// "<= N ms": the bucket bound under which 99 % of them were answered.
    pub fn p99(&self) -> String {
        let total = self.total();
        match self.0.iter().find(|(_, n)| *n >= total * 0.99) {
            _ if total == 0.0 => "-".to_string(),
            Some((le, _)) if le.is_finite() => format!("<= {:.0} ms", le * 1000.0),
            Some(_) => "> 5000 ms".to_string(),
            None => "-".to_string(),
        }
    }
}
