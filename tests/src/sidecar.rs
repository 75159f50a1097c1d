//! The real `snapshot-sidecar` binary, configured the way the webhook injects
//! it, against a private containerd and a real registry.

use crate::{
    containerd::{Containerd, Image, RunSpec},
    launch::{Ended, Launched},
    ports,
    registry::Registry,
    workspace_binary,
};
use serde_json::Value;
use std::{path::Path, process::Stdio, time::Duration};
use tokio::process::Command;

pub struct Sidecar {
    pub port: u16,
    pub dir: tempfile::TempDir,
    launched: Launched,
}

/// Where the sidecar commits from and pushes to.
pub struct Target<'a> {
    pub containerd: &'a Containerd,
    pub pod_uid: &'a str,
    pub registry_host: &'a str,
    pub registry_ca: Option<&'a Path>,
    pub credentials: Option<&'a Path>,
    pub repository_path: &'a str,
    pub tag_prefix: &'a str,
}

impl<'a> Target<'a> {
    /// A desktop of pod `pod_uid` in `containerd`, its snapshots pushed to
    /// `repository_path` of `registry` as `<tag_prefix>-<ts>`, with the
    /// registry's CA and credentials files.
    pub fn at(
        containerd: &'a Containerd,
        registry: &'a crate::registry::Registry,
        (ca, credentials): (&'a Path, &'a Path),
        pod_uid: &'a str,
        repository_path: &'a str,
        tag_prefix: &'a str,
    ) -> Self {
        Self {
            containerd,
            pod_uid,
            registry_host: &registry.host,
            registry_ca: Some(ca),
            credentials: Some(credentials),
            repository_path,
            tag_prefix,
        }
    }
}

impl Sidecar {
    pub async fn start(t: Target<'_>) -> Self {
        Self::start_with_socket(t, None).await
    }

    /// Starts it; `socket` overrides the containerd socket (to make it unreachable).
    pub async fn start_with_socket(t: Target<'_>, socket: Option<&Path>) -> Self {
        Self::start_with(t, socket, &[]).await
    }

    /// Starts it with extra environment (more settings).
    pub async fn start_with(
        t: Target<'_>,
        socket: Option<&Path>,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::start_wrapped(t, socket, extra_env, &[]).await
    }

    /// Starts it without CAP_SYS_ADMIN, as a sidecar that cannot read overlay's
    /// own attributes (so not the upper directory).
    pub async fn start_without_sys_admin(t: Target<'_>, extra_env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(
            t,
            None,
            extra_env,
            &["setpriv", "--bounding-set", "-sys_admin"],
        )
        .await
    }

    async fn start_wrapped(
        t: Target<'_>,
        socket: Option<&Path>,
        extra_env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = ports::free_port();
        let log = std::fs::File::create(Self::log_path(dir.path())).expect("log");
        // a work directory of its own, as each pod's emptyDir: no record of
        // another sidecar's capture (`extra_env` may name a shared one)
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("a work directory");
        let binary = workspace_binary("snapshot-sidecar");
        let mut cmd = match wrapper {
            [] => Command::new(&binary),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(&binary);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("SNAPSHOT_LISTEN", format!("127.0.0.1:{port}"))
            .env("SNAPSHOT_POD_NAME", "12896316-7c9d4")
            .env("SNAPSHOT_POD_NAMESPACE", "abcdesktop")
            .env("SNAPSHOT_POD_UID", t.pod_uid)
            .env("SNAPSHOT_CONTAINER", "x-graphical")
            .env(
                "SNAPSHOT_REPOSITORY",
                format!("{}/{}", t.registry_host, t.repository_path),
            )
            .env("SNAPSHOT_TAG_PREFIX", t.tag_prefix)
            .env("SNAPSHOT_REGISTRY_PROTOCOL", "https")
            .env(
                "SNAPSHOT_CONTAINERD_SOCKET",
                socket.unwrap_or(&t.containerd.socket),
            )
            .env("SNAPSHOT_CONTAINERD_NAMESPACE", &t.containerd.namespace)
            // tests snapshot one desktop many times in a row; the interval has its own test
            .env("SNAPSHOT_MIN_INTERVAL", "0s")
            .env("SNAPSHOT_WORK_DIR", &work);
        if let Some(ca) = t.registry_ca {
            cmd.env("SNAPSHOT_REGISTRY_CA", ca);
        }
        if let Some(c) = t.credentials {
            cmd.env("SNAPSHOT_REGISTRY_CREDENTIALS", c);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawning snapshot-sidecar");
        Self::ready(port, dir, Launched::Process(child)).await
    }

    /// Starts it from its image (`just images`) in `containerd`, with what the
    /// kubelet would give the injected container (`spec`); it listens on `port`
    /// and keeps its temp files (log, volumes) in `dir` until dropped.
    pub async fn in_container(
        containerd: &Containerd,
        image: &Image,
        port: u16,
        dir: tempfile::TempDir,
        spec: RunSpec,
    ) -> Self {
        let launched = containerd
            .run_component(image, &format!("snapshot-sidecar-{port}"), &spec)
            .await;
        Self::ready(port, dir, launched).await
    }

    /// The log file every way of starting it writes to.
    pub fn log_path(dir: &Path) -> std::path::PathBuf {
        dir.join("sidecar.log")
    }

    /// Waits until it answers `/healthz`, or panics with its log.
    async fn ready(port: u16, dir: tempfile::TempDir, mut launched: Launched) -> Self {
        let url = format!("http://127.0.0.1:{port}/healthz");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if matches!(client.get(&url).send().await, Ok(r) if r.status().is_success()) {
                break;
            }
            if let Some(how) = launched.exited() {
                panic!(
                    "snapshot-sidecar exited ({how}): {}",
                    std::fs::read_to_string(Self::log_path(dir.path())).unwrap_or_default()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot-sidecar did not answer on {url}: {}",
                std::fs::read_to_string(Self::log_path(dir.path())).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            port,
            dir,
            launched,
        }
    }

    /// The sidecar's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(Self::log_path(self.dir.path())).unwrap_or_default()
    }

    /// How long the desktop has stayed paused for this sidecar's snapshots,
    /// in all (`snapshot_sidecar_paused_seconds_sum`: each pause to the end
    /// of its resume); NaN when the metric is not there.
    pub async fn paused_seconds(&self) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("snapshot_sidecar_paused_seconds_sum "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `POST path` as the front end does; the JSON envelope.
    pub async fn post(&self, path: &str) -> Value {
        reqwest::Client::new()
            .post(self.url(path))
            .header("ABCAuthorization", "Bearer front-end-jwt")
            .send()
            .await
            .expect("POST to the sidecar")
            .json()
            .await
            .expect("a JSON envelope")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .get(self.url(path))
            .send()
            .await
            .expect("GET from the sidecar");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    /// Polls the operation until `done` or `error`; returns every message seen, in order.
    pub async fn wait(&self, session_id: &str) -> Vec<String> {
        self.wait_within(session_id, Duration::from_secs(120)).await
    }

    /// The same, declaring the operation stuck only after `limit` (a change of
    /// a million files in the debug build, on a loaded machine).
    pub async fn wait_within(&self, session_id: &str, limit: Duration) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (status, v) = self.get(&format!("/snapshot/{session_id}")).await;
            assert_eq!(status, 200, "{v}");
            let message = v["message"].as_str().unwrap_or_default().to_string();
            if seen.last() != Some(&message) {
                seen.push(message.clone());
            }
            if message == "done" || v["status"] == "error" {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation stuck at {message:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a snapshot that must succeed; every message seen.
    pub async fn snapshot_done(&self) -> Vec<String> {
        self.snapshot_done_within(Duration::from_secs(120)).await
    }

    /// The same, stuck only after `limit`.
    pub async fn snapshot_done_within(&self, limit: Duration) -> Vec<String> {
        let (_, steps) = self.snapshot_within(limit).await;
        assert_eq!(
            steps.last().map(String::as_str),
            Some("done"),
            "{steps:?}; log:\n{}",
            self.log()
        );
        steps
    }

    /// Starts a snapshot and waits for its end.
    pub async fn snapshot(&self) -> Vec<String> {
        let (_, steps) = self.snapshot_with_id().await;
        steps
    }

    /// Starts a snapshot and waits for its end: its session id and every message seen.
    pub async fn snapshot_with_id(&self) -> (String, Vec<String>) {
        self.snapshot_within(Duration::from_secs(120)).await
    }

    /// Starts a snapshot and waits for its end, stuck only after `limit`.
    async fn snapshot_within(&self, limit: Duration) -> (String, Vec<String>) {
        let started = self.post("/snapshot/snapshot").await;
        assert_eq!(started["message"], "snapshot process started", "{started}");
        let id = started["session_id"]
            .as_str()
            .expect("a session id")
            .to_string();
        let steps = self.wait_within(&id, limit).await;
        (id, steps)
    }

    /// The process id, when it runs as a process of this machine.
    pub fn pid(&self) -> Option<u32> {
        match &self.launched {
            Launched::Process(child) => child.id(),
            Launched::Container { .. } => None,
        }
    }

    pub async fn stop(mut self) {
        self.launched.kill_and_reap();
    }

    /// Sends SIGTERM (as the kubelet does when the pod goes) and waits for the
    /// exit; how it ended and its log.
    pub async fn terminate(self) -> (Ended, String) {
        let (ended, log) = self.terminate_within(Duration::from_secs(30)).await;
        (
            ended.expect("the sidecar exits within 30 s of SIGTERM"),
            log,
        )
    }

    /// SIGTERM, then SIGKILL when it has not exited within `grace`, as the
    /// kubelet stops a container; how it ended (`None`: killed) and its log.
    pub async fn terminate_within(mut self, grace: Duration) -> (Option<Ended>, String) {
        self.launched.signal("TERM");
        let ended = self.launched.wait(grace).await;
        if ended.is_none() {
            self.launched.kill_and_reap();
        }
        (ended, self.log())
    }
}

impl Drop for Sidecar {
    /// Killed and reaped before its temp dir goes.
    fn drop(&mut self) {
        self.launched.kill_and_reap();
    }
}

/// The files of an image in `registry` (`repo:tag`): every layer's tar entries, in order.
pub async fn layers(registry: &Registry, repo: &str, tag: &str) -> Vec<Vec<(String, Vec<u8>)>> {
    use oci_client::{secrets::RegistryAuth, Reference};
    let client = registry.oci_client();
    let auth = RegistryAuth::Basic(
        crate::registry::USER.into(),
        crate::registry::PASSWORD.into(),
    );
    let reference = Reference::with_tag(registry.host.clone(), repo.to_string(), tag.to_string());
    client.store_auth_if_needed(&registry.host, &auth).await;
    let (manifest, _) = client
        .pull_image_manifest(&reference, &auth)
        .await
        .expect("pulling the manifest");
    let mut out = Vec::new();
    for layer in &manifest.layers {
        let mut gz = Vec::new();
        client
            .pull_blob(&reference, layer, &mut gz)
            .await
            .expect("pulling a layer");
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(gz.as_slice()),
            &mut tar,
        )
        .expect("a gzip layer");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut files = Vec::new();
        for entry in archive.entries().expect("a tar layer") {
            let mut entry = entry.expect("a tar entry");
            let path = entry
                .path()
                .expect("a path")
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).ok();
            files.push((path, data));
        }
        out.push(files);
    }
    out
}

impl Sidecar {
    /// Starts a snapshot that must fail; every message seen, the error last.
    pub async fn snapshot_expecting_error(&self) -> Vec<String> {
        let started = self.post("/snapshot").await;
        let id = started["session_id"]
            .as_str()
            .expect("a session id")
            .to_string();
        let steps = self.wait(&id).await;
        let (_, last) = self.get(&format!("/snapshot/{id}")).await;
        assert_eq!(last["status"], "error", "{steps:?}");
        steps
    }
}

/// A node for sidecar tests: a private containerd with the base image, a
/// registry, and its credentials; sidecars of any pod and user prefix.
pub struct Rig {
    pub containerd: Containerd,
    pub registry: Registry,
    pub creds: std::path::PathBuf,
}

/// The repository the rig's sidecars push to.
pub const RIG_REPO: &str = "abcdesktopio/oc.user.test";

impl Rig {
    pub async fn new() -> Self {
        Self::with(Containerd::start().await, Registry::start().await).await
    }

    /// With containerd's root on a tmpfs (a million files in seconds).
    pub async fn on_tmpfs() -> Self {
        Self::with(Containerd::start_on_tmpfs().await, Registry::start().await).await
    }

    pub async fn with(containerd: Containerd, registry: Registry) -> Self {
        containerd.import_base_image().await;
        let creds = registry.credentials_file();
        Self {
            containerd,
            registry,
            creds,
        }
    }

    pub fn target<'a>(&'a self, pod_uid: &'a str, prefix: &'a str) -> Target<'a> {
        Target {
            containerd: &self.containerd,
            pod_uid,
            registry_host: &self.registry.host,
            registry_ca: Some(self.registry.dir.path().join("ca.crt").leak()),
            credentials: Some(&self.creds),
            repository_path: RIG_REPO,
            tag_prefix: prefix,
        }
    }

    /// `prefix`'s snapshot tags, oldest first.
    pub async fn tags(&self, prefix: &str) -> Vec<String> {
        let all = self.registry.tags(RIG_REPO).await;
        snapshot_tags::oldest_first(all.iter().map(String::as_str), prefix)
    }
}
