//! The stargz snapshotter (lazy pulling) for the lazy-restore tests: the real
//! snapshotter and FUSE filesystem of containerd/stargz-snapshotter, built from
//! Debian's sources by `scripts/build-stargz.sh` (`tests/stargz/main.go`) into
//! `target/stargz/stargz-snapshotter`, served to a private containerd as its
//! proxy snapshotter `stargz` ([`Containerd::start_with_stargz`]).
//!
//! Drop order: the containerd first (it holds overlay mounts over the
//! snapshotter's FUSE mounts), then the snapshotter: declare the [`Stargz`]
//! before the [`Containerd`].
//!
//! What was fetched: [`Stargz::fetched`] is the snapshotter's own count of
//! the bytes it received for a blob (the test main wraps its HTTP transport
//! and keeps `fetched.json` up to date), exact and what the laziness tests
//! assert on. [`blob_bytes_served`] reads the registry's access log instead
//! (every client, containerd's own downloads included), but distribution
//! sometimes logs 0 bytes for an HTTP/2 range response the client did get
//! (seen for the TOC fetch): a lower bound only for the snapshotter's
//! fetches, exact for containerd's (HTTP/1.1, whole blobs).

use crate::{
    containerd::Containerd,
    registry::{Registry, PASSWORD, USER},
};
use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

/// How the snapshotter fetches.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// After mounting a layer, download all of it in the background (the
    /// snapshotter's default: on).
    pub background_fetch: bool,
    /// At mount, prefetch the files an image marks as wanted first (on by
    /// default; an image converted without a record marks none).
    pub prefetch: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            background_fetch: true,
            prefetch: true,
        }
    }
}

impl Options {
    /// Fetch only what is read: no background fetch, no prefetch (to measure laziness).
    pub fn lazy() -> Self {
        Self {
            background_fetch: false,
            prefetch: false,
        }
    }
}

/// A running stargz snapshotter: its socket, its root (snapshots, FUSE
/// mounts, the cache of fetched content) and its log under a temp dir.
pub struct Stargz {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    child: Child,
}

/// `target/stargz/stargz-snapshotter`, built by `scripts/build-stargz.sh`
/// (the Justfile's `build` recipe runs it).
pub fn binary() -> PathBuf {
    let path = crate::profile_dir()
        .parent()
        .map(|t| t.join("stargz/stargz-snapshotter"))
        .unwrap_or_default();
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/build-stargz.sh` (`just build` does; `just deps` installs Go and the sources)",
        path.display()
    );
    path
}

impl Stargz {
    /// Starts the snapshotter, trusting `registry`'s CA with its credentials;
    /// panics with the reason and the snapshotter's log when it cannot.
    pub async fn start(registry: &Registry, options: Options) -> Self {
        match Self::try_start(registry, options).await {
            Ok(s) => s,
            Err(e) => panic!("the stargz snapshotter cannot start: {e:#}"),
        }
    }

    async fn try_start(registry: &Registry, options: Options) -> Result<Self> {
        let binary = binary();
        anyhow::ensure!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the snapshotter mounts its layers with FUSE"
        );
        let dir = tempfile::Builder::new()
            .prefix("stargz")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        let root = dir.path().join("root");
        let socket = dir.path().join("s.sock");
        let log = std::fs::File::create(dir.path().join("stargz.log"))?;
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .arg("--ca")
            .arg(registry.ca_path())
            .args(["--registry", &registry.host])
            .args(["--user", &format!("{USER}:{PASSWORD}")]);
        if !options.background_fetch {
            cmd.arg("--no-background-fetch");
        }
        if !options.prefetch {
            cmd.arg("--no-prefetch");
        }
        cmd.arg("--fetch-stats")
            .arg(dir.path().join("fetched.json"));
        let child = cmd
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawning the stargz snapshotter")?;
        let mut me = Self {
            dir,
            socket,
            root,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = me.child.try_wait() {
                bail!("it exited ({status}); its log:\n{}", me.log());
            }
            if std::os::unix::net::UnixStream::connect(&me.socket).is_ok() {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!(
                    "no socket at {} within 10 s; its log:\n{}",
                    me.socket.display(),
                    me.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the snapshotter logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stargz.log")).unwrap_or_default()
    }

    /// Bytes the snapshotter has received from registries so far, per blob
    /// digest (its `fetched.json`, read at once).
    pub fn fetched_now(&self) -> std::collections::BTreeMap<String, u64> {
        std::fs::read(self.dir.path().join("fetched.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Bytes of blob `digest` the snapshotter has received (response bodies
    /// of its GETs: ranges, TOC, whole-blob downloads), once the count has
    /// held still for 200 ms (at most 5 s).
    pub async fn fetched(&self, digest: &str) -> u64 {
        settled(|| self.fetched_now().get(digest).copied().unwrap_or(0)).await
    }

    /// Where the filesystem keeps what it fetched (and its FUSE mount points).
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("stargz")
    }

    /// Bytes stored under [`Self::cache_dir`] (`du -sxb`: `-x` keeps `du`
    /// out of the FUSE mounts, which show every file, fetched or not).
    pub fn cache_bytes(&self) -> u64 {
        let out = std::process::Command::new("du")
            .arg("-sxb")
            .arg(self.cache_dir())
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// The snapshotter's FUSE mounts (one per lazily mounted layer).
    pub fn fuse_mounts(&self) -> Vec<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() > 2 && f[2].starts_with("fuse")).then(|| PathBuf::from(f[1]))
            })
            .filter(|p| p.starts_with(&self.root))
            .collect()
    }

    /// A hosts folder (`certs.d`) for `ctr`/`ctr-remote` and `registry`
    /// (its CA; pull, resolve and push).
    pub fn hosts_dir(&self, registry: &Registry) -> PathBuf {
        write_hosts_dir(self.dir.path(), registry)
    }

    /// `ctr-remote image rpull`: pulls `image` through this snapshotter into
    /// `containerd` (layers mounted lazily; manifest and config fetched);
    /// how long it took. Panics with both logs when it fails.
    pub async fn rpull(
        &self,
        containerd: &Containerd,
        registry: &Registry,
        image: &str,
    ) -> Duration {
        let hosts = self.hosts_dir(registry);
        let start = Instant::now();
        let out = Command::new("ctr-remote")
            .arg("--address")
            .arg(&containerd.socket)
            .args(["--namespace", &containerd.namespace, "image", "rpull"])
            .arg("--hosts-dir")
            .arg(&hosts)
            .args(["--user", &format!("{USER}:{PASSWORD}"), image])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("running ctr-remote (Debian package stargz-snapshotter; `just deps`): {e}")
            });
        let took = start.elapsed();
        if !out.status.success() {
            panic!(
                "ctr-remote image rpull {image}: {}\n---- snapshotter ----\n{}\n---- containerd ----\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                crate::webhook::tail(&self.log(), 40),
                crate::webhook::tail(&containerd.log(), 20)
            );
        }
        took
    }

    /// Starts container `id` of `image` (pulled with [`Self::rpull`]) on the
    /// `stargz` snapshotter, a shell that sleeps until SIGTERM; use
    /// [`Containerd::exec`] in it.
    pub async fn run(&self, containerd: &Containerd, image: &str, id: &str) {
        containerd
            .run_with(
                image,
                id,
                &["--snapshotter", "stargz"],
                &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"],
            )
            .await
    }
}

impl Stargz {
    /// Starts container `id` of `image` (pulled with [`Self::rpull`]) on the
    /// `stargz` snapshotter, labelled as the kubelet labels container
    /// `x-graphical` of pod `pod_uid` (what the sidecar looks for); a shell
    /// that stops on SIGTERM, like a desktop's init.
    pub async fn run_desktop(&self, containerd: &Containerd, image: &str, id: &str, pod_uid: &str) {
        let labels = [
            format!("io.kubernetes.pod.uid={pod_uid}"),
            format!("io.kubernetes.pod.name={pod_uid}-name"),
            "io.kubernetes.pod.namespace=abcdesktop".to_string(),
            "io.kubernetes.container.name=x-graphical".to_string(),
        ];
        let mut flags = vec!["--snapshotter", "stargz"];
        for l in &labels {
            flags.extend(["--label", l.as_str()]);
        }
        containerd
            .run_with(
                image,
                id,
                &flags,
                &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"],
            )
            .await
    }
}

impl Drop for Stargz {
    /// SIGTERM first (the snapshotter unmounts its FUSE mounts as it closes),
    /// then SIGKILL after 3 s, then a lazy unmount of whatever is left under
    /// its root, before the temp dir goes.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- stargz snapshotter logged (last lines) ----\n{}",
                crate::webhook::tail(&self.log(), 40)
            );
        }
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        crate::kill_and_reap(&mut self.child);
        crate::containerd::unmount_below(&self.root);
    }
}

pub use crate::registry::write_hosts_dir;

/// An uncompressed layer (tar) of `files` (path, mode, content), with the
/// folders above them; root owns everything.
pub fn layer_tar(files: &[(&str, u32, &[u8])]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    for d in dirs {
        let mut h = crate::oci::tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, &d, std::io::empty())?;
    }
    for (path, mode, data) in files {
        let mut h = crate::oci::tar_header(tar::EntryType::Regular, *mode, data.len() as u64);
        b.append_data(&mut h, path, *data)?;
    }
    Ok(b.into_inner()?)
}

/// Imports an archive of [`crate::oci::Archive`] into `builder` (content only, no unpack).
pub async fn import(builder: &Containerd, archive: &Path) {
    let path = archive.to_string_lossy();
    builder
        .ctr(&["images", "import", "--no-unpack", &path])
        .await
        .unwrap_or_else(|e| panic!("importing {path}: {e:#}"));
}

/// `ctr-remote image convert --estargz --oci src dst` in `builder`: the
/// reference eStargz writer (gzip level 1: the tests' layers are random bytes).
pub async fn convert_estargz(builder: &Containerd, src: &str, dst: &str) {
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(&builder.socket)
        .args(["--namespace", &builder.namespace, "image", "convert"])
        .args([
            "--estargz",
            "--oci",
            "--estargz-compression-level",
            "1",
            src,
            dst,
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running ctr-remote (`just deps` installs it): {e}"));
    assert!(
        out.status.success(),
        "ctr-remote image convert --estargz {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ctr images push` of `image` from `builder` to `registry`.
pub async fn push(builder: &Containerd, registry: &Registry, image: &str) {
    let hosts = write_hosts_dir(builder.dir.path(), registry);
    let user = format!("{USER}:{PASSWORD}");
    builder
        .ctr(&[
            "images",
            "push",
            "--hosts-dir",
            &hosts.to_string_lossy(),
            "--user",
            &user,
            image,
        ])
        .await
        .unwrap_or_else(|e| panic!("pushing {image}: {e:#}\n{}", registry.log()));
}

/// One layer of an image in the registry.
#[derive(Clone, Debug)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// `containerd.io/snapshot/stargz/toc.digest`: set on an eStargz layer.
    pub toc_digest: Option<String>,
    /// `io.containers.estargz.uncompressed-size`: set on an eStargz layer.
    pub uncompressed_size: Option<String>,
    /// The config's `rootfs.diff_ids` entry (sha256 of the uncompressed layer).
    pub diff_id: String,
}

/// The layers of `repo:tag` in `registry`, bottom first.
pub async fn layers(registry: &Registry, repo: &str, tag: &str) -> Vec<Layer> {
    let (manifest, config) = registry.manifest_and_config(repo, tag).await;
    let empty = Vec::new();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap_or(&empty);
    manifest["layers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
        .map(|(i, l)| Layer {
            digest: l["digest"].as_str().unwrap_or_default().to_string(),
            size: l["size"].as_u64().unwrap_or(0),
            media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
            toc_digest: l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                .as_str()
                .map(str::to_string),
            uncompressed_size: l["annotations"]["io.containers.estargz.uncompressed-size"]
                .as_str()
                .map(str::to_string),
            diff_id: diff_ids
                .get(i)
                .and_then(|d| d.as_str())
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

/// A blob of `repo` in `registry`, whole.
pub async fn pull_blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let reference =
        oci_client::Reference::with_tag(registry.host.clone(), repo.to_string(), "latest".into());
    let client = registry.oci_client();
    let auth = oci_client::secrets::RegistryAuth::Basic(USER.into(), PASSWORD.into());
    client
        .auth(&reference, &auth, oci_client::RegistryOperation::Pull)
        .await
        .unwrap_or_else(|e| panic!("auth for {repo}: {e}"));
    let mut blob = Vec::new();
    client
        .pull_blob(&reference, digest, &mut blob)
        .await
        .unwrap_or_else(|e| panic!("blob {digest} of {repo}: {e}"));
    blob
}

/// Bytes of blob `digest` the registry says it has sent: the sizes of the
/// GET responses for `/v2/<repo>/blobs/<digest>` in its access log (ranges
/// and whole blobs; a HEAD sends none), whoever asked, once the sum holds
/// still for 200 ms (a line is written after the client may have read the
/// body). A lower bound for HTTP/2 range responses (see the module's doc).
pub async fn blob_bytes_served(registry: &Registry, digest: &str) -> u64 {
    settled(|| blob_bytes_logged(registry, digest)).await
}

/// `count()` once it returns the same twice 200 ms apart (at most 5 s).
async fn settled(count: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = count();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// The same, read from the log at once.
pub fn blob_bytes_logged(registry: &Registry, digest: &str) -> u64 {
    let needle = format!("/blobs/{digest} ");
    registry
        .log()
        .lines()
        .filter_map(|l| {
            // ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" 206 12345 "referer" "agent"
            let at = l.find("\"GET /v2/")?;
            let rest = &l[at..];
            let end = rest[1..].find('"')? + 1;
            if !rest[..end].contains(&needle) {
                return None;
            }
            let mut after = rest[end + 1..].split_whitespace();
            let status: u16 = after.next()?.parse().ok()?;
            let bytes: u64 = after.next()?.parse().ok()?;
            (200..300).contains(&status).then_some(bytes)
        })
        .sum()
}

/// What `stargz-snapshotter verify` found in a valid eStargz blob.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct EstargzReport {
    /// The digest of the blob's TOC JSON.
    pub toc_digest: String,
    /// sha256 of the whole decompressed blob (TOC and footer included): the layer's diff ID.
    pub diff_id: String,
    /// Entries in the TOC (the root excluded), regular files, chunks read and checked, their bytes.
    pub entries: u64,
    pub files: u64,
    pub chunks: u64,
    pub payload_bytes: u64,
}

/// Checks an eStargz blob with stargz-snapshotter's own reader
/// (`estargz.Open`, `VerifyTOC`): its TOC digest is `toc_digest` (when given;
/// the layer annotation `containerd.io/snapshot/stargz/toc.digest`), every
/// chunk of every regular file matches its `chunkDigest` in the TOC, and the
/// decompressed blob's sha256 is `diff_id` (when given). `Err` with the
/// reader's words when the blob fails any of these.
pub fn verify_estargz(
    blob: &Path,
    toc_digest: Option<&str>,
    diff_id: Option<&str>,
) -> Result<EstargzReport> {
    let mut cmd = std::process::Command::new(binary());
    cmd.arg("verify").arg("--blob").arg(blob);
    if let Some(d) = toc_digest {
        cmd.args(["--toc-digest", d]);
    }
    if let Some(d) = diff_id {
        cmd.args(["--diff-id", d]);
    }
    let out = cmd.output().context("running stargz-snapshotter verify")?;
    if !out.status.success() {
        bail!(
            "{} is not a valid eStargz blob: {}",
            blob.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the verifier's report")
}
