//! A private containerd (Debian's package, with runc) for one test: its own
//! config, root, state and sockets under a temp dir, its own namespace (runc's
//! state in /run/containerd/runc/<namespace> is shared by every daemon), a base
//! image built here with busybox in it, and desktop containers labelled the way
//! the kubelet labels them.

use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
use tokio::process::{Child, Command};

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

pub const BASE_IMAGE: &str = "docker.io/abcdesktopio/oc.user.test:4.1";

pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub namespace: String,
    containers: std::sync::Mutex<Vec<String>>,
    child: Child,
}

impl Containerd {
    /// Starts the daemon, or panics with the reason and its log.
    pub async fn start() -> Self {
        match Self::try_start().await {
            Ok(c) => c,
            Err(e) => panic!("the test containerd cannot start: {e:#}"),
        }
    }

    async fn try_start() -> Result<Self> {
        let binary = crate::registry::which("containerd")
            .context("containerd is not installed (Debian packages containerd and runc; `just deps` installs them)")?;
        crate::registry::which("runc").context("runc is not installed (Debian package runc)")?;
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        let socket = dir.path().join("c.sock");
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let namespace = format!("snapshot-test-{}-{n}", std::process::id());
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  level = \"warn\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawning containerd")?;
        let me = Self {
            dir,
            socket,
            namespace,
            containers: Default::default(),
            child,
        };
        let up = crate::ports::wait_until(Duration::from_secs(10), || async {
            me.socket.exists() && me.ctr(&["version"]).await.is_ok()
        })
        .await;
        if !up {
            bail!(
                "no answer on {} within 10 s; its log:\n{}",
                me.socket.display(),
                me.log()
            );
        }
        Ok(me)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this daemon and namespace; its stdout, or its stderr as the error.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .output()
            .await
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the base image (busybox and a few files) and imports it as [`BASE_IMAGE`].
    pub async fn import_base_image(&self) {
        let tar = self.dir.path().join("base.tar");
        build_oci_archive(&tar, BASE_IMAGE).expect("building the base image");
        let path = tar.to_string_lossy().into_owned();
        self.ctr(&["images", "import", "--no-unpack", &path])
            .await
            .expect("importing the base image");
        // unpack into the overlayfs snapshotter, as the kubelet would have
        self.ctr(&["images", "unpack", BASE_IMAGE]).await.ok();
    }

    /// Starts a task labelled like the kubelet's container `name` of pod `pod_uid`.
    pub async fn run_desktop(&self, id: &str, pod_uid: &str, pod_name: &str, name: &str) {
        self.run_desktop_from(BASE_IMAGE, id, pod_uid, pod_name, name)
            .await
    }

    /// The same, from any image already in this containerd.
    pub async fn run_desktop_from(
        &self,
        image: &str,
        id: &str,
        pod_uid: &str,
        pod_name: &str,
        name: &str,
    ) {
        let labels = [
            format!("io.kubernetes.pod.uid={pod_uid}"),
            format!("io.kubernetes.pod.name={pod_name}"),
            "io.kubernetes.pod.namespace=abcdesktop".to_string(),
            format!("io.kubernetes.container.name={name}"),
        ];
        let mut args = vec!["run", "-d"];
        for l in &labels {
            args.extend(["--label", l.as_str()]);
        }
        args.extend([image, id, "/bin/sh", "-c", "sleep 100000"]);
        self.ctr(&args)
            .await
            .unwrap_or_else(|e| panic!("starting container {id}: {e:#}\n{}", self.log()));
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }

    /// Pulls `image` from the test registry as the kubelet would (TLS checked against its CA).
    pub async fn pull(&self, image: &str, registry: &crate::registry::Registry) {
        let host = &registry.host;
        let hosts = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&hosts).expect("hosts dir");
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{}\"\n  capabilities = [\"pull\", \"resolve\"]\n",
                registry.ca_path().display()
            ),
        )
        .expect("hosts.toml");
        let hosts_dir = self
            .dir
            .path()
            .join("certs.d")
            .to_string_lossy()
            .into_owned();
        let user = format!("{}:{}", crate::registry::USER, crate::registry::PASSWORD);
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--user",
            &user,
            image,
        ])
        .await
        .unwrap_or_else(|e| panic!("pulling {image}: {e:#}"));
    }

    /// Stops and removes a container (the user logs off).
    pub async fn remove(&self, id: &str) {
        let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]).await;
        for _ in 0..40 {
            if self.ctr(&["tasks", "delete", id]).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.ctr(&["containers", "delete", id]).await;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| c != id);
    }

    /// Runs a shell command inside a running container.
    pub async fn exec(&self, id: &str, script: &str) -> String {
        let exec_id = format!("e{}", INSTANCE.fetch_add(1, Ordering::SeqCst));
        self.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            &exec_id,
            id,
            "/bin/sh",
            "-c",
            script,
        ])
        .await
        .unwrap_or_else(|e| panic!("exec in {id}: {e:#}"))
    }

    /// The task status of a container (RUNNING, PAUSED, STOPPED).
    pub async fn task_status(&self, id: &str) -> String {
        let out = self.ctr(&["tasks", "ls"]).await.unwrap_or_default();
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("MISSING")
            .to_string()
    }

    async fn clean(&self) {
        let ids = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for id in ids {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]).await;
            for _ in 0..20 {
                if self.ctr(&["tasks", "delete", &id]).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = self.ctr(&["containers", "delete", &id]).await;
        }
    }

    /// Kills tasks, deletes containers, stops the daemon, unmounts.
    pub async fn stop(mut self) {
        self.clean().await;
        let _ = self.child.kill().await;
        unmount_below(self.dir.path());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Best effort when a test panicked before calling stop().
        let ids = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for id in ids {
            let ctr = |args: &[&str]| {
                std::process::Command::new("ctr")
                    .arg("--address")
                    .arg(&self.socket)
                    .args(["--namespace", &self.namespace])
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
            };
            let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
            std::thread::sleep(Duration::from_millis(100));
            let _ = ctr(&["tasks", "delete", "--force", &id]);
            let _ = ctr(&["containers", "delete", &id]);
        }
        crate::kill_and_reap(&mut self.child);
        unmount_below(self.dir.path());
    }
}

fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(p)
            .status();
    }
}

/// The base image's files: busybox and its applets, and a few files of the "distribution".
fn base_layer() -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (Debian package busybox-static)")?;
    let mut dir = |path: &str| -> Result<()> {
        let mut h = crate::oci::tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    };
    for d in [
        "bin", "etc", "tmp", "root", "opt", "opt/base", "home", "proc", "sys", "dev", "run",
    ] {
        dir(d)?;
    }
    let mut file = |path: &str, mode: u32, data: &[u8]| -> Result<()> {
        let mut h = crate::oci::tar_header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    file("bin/busybox", 0o755, &busybox)?;
    file(
        "etc/os-release",
        0o644,
        b"NAME=\"desktop-snapshot test base\"\n",
    )?;
    file(
        "etc/base-file-to-delete",
        0o644,
        b"the user will delete me\n",
    )?;
    file("etc/base-file-to-change", 0o644, b"original\n")?;
    file("opt/base/keep", 0o644, b"kept\n")?;
    for applet in [
        "sh", "sleep", "cat", "ls", "rm", "mkdir", "echo", "dd", "touch", "mv", "head", "sync",
        "true", "yes", "seq", "cp", "find", "wc", "ln", "stat", "chmod", "chown", "md5sum",
        "mkfifo", "sort",
    ] {
        let mut h = crate::oci::tar_header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    Ok(b.into_inner()?)
}

/// An OCI image layout archive of the base image, for `ctr images import`.
fn build_oci_archive(out: &Path, name: &str) -> Result<()> {
    let layer_tar = base_layer()?;
    let diff_id = crate::oci::sha256(&layer_tar);
    let layer = crate::oci::gzip(&layer_tar)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "desktop-snapshot test base"}]
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": crate::oci::sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": crate::oci::sha256(&layer), "size": layer.len()}]
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": crate::oci::sha256(&manifest), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "4.1"}}]
    }))?;
    let mut b = tar::Builder::new(std::fs::File::create(out)?);
    let mut add = |path: String, data: &[u8]| -> Result<()> {
        let mut h = crate::oci::tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for blob in [&layer, &config, &manifest] {
        add(
            format!("blobs/sha256/{}", &crate::oci::sha256(blob)[7..]),
            blob,
        )?;
    }
    b.into_inner()?;
    Ok(())
}
