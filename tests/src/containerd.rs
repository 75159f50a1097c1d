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

pub use crate::launch::{CtrAddress, Launched};

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
        match Self::try_start(false, None).await {
            Ok(c) => c,
            Err(e) => panic!("the test containerd cannot start: {e:#}"),
        }
    }

    /// The same, its root (snapshots, content) on a tmpfs of its own: for
    /// tests that write a million files, which this machine's disk takes
    /// minutes to create.
    pub async fn start_on_tmpfs() -> Self {
        match Self::try_start(true, None).await {
            Ok(c) => c,
            Err(e) => panic!("the test containerd cannot start: {e:#}"),
        }
    }

    /// The same, with `stargz` (started first, dropped after this daemon) as
    /// its proxy snapshotter `stargz` (`ctr run --snapshotter stargz`); panics
    /// unless containerd lists that plugin as `ok`.
    pub async fn start_with_stargz(stargz: &crate::stargz::Stargz) -> Self {
        match Self::try_start(false, Some(&stargz.socket)).await {
            Ok(c) => c,
            Err(e) => panic!(
                "the test containerd with the stargz snapshotter cannot start: {e:#}\n\
                 the snapshotter's log:\n{}",
                crate::webhook::tail(&stargz.log(), 40)
            ),
        }
    }

    async fn try_start(tmpfs: bool, stargz: Option<&Path>) -> Result<Self> {
        let binary = crate::registry::which("containerd")
            .context("containerd is not installed (Debian packages containerd and runc; `just deps` installs them)")?;
        crate::registry::which("runc").context("runc is not installed (Debian package runc)")?;
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        let socket = dir.path().join("c.sock");
        if tmpfs {
            let root = dir.path().join("root");
            std::fs::create_dir(&root)?;
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0711", "desktop-snapshot-test"])
                .arg(&root)
                .status()
                .context("running mount")?;
            anyhow::ensure!(status.success(), "mounting a tmpfs on {}", root.display());
        }
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let namespace = format!("snapshot-test-{}-{n}", std::process::id());
        let config = dir.path().join("config.toml");
        let mut text = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  level = \"warn\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            sock = socket.display(),
        );
        if let Some(address) = stargz {
            text.push_str(&format!(
                "[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                address.display()
            ));
        }
        std::fs::write(&config, text)?;
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
        if stargz.is_some() {
            let plugins = me.ctr(&["plugins", "ls"]).await?;
            let ok = plugins.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 4
                    && f[0] == "io.containerd.snapshotter.v1"
                    && f[1] == "stargz"
                    && f[3] == "ok"
            });
            if !ok {
                bail!(
                    "containerd does not list the stargz snapshotter as ok:\n{plugins}\n{}",
                    me.log()
                );
            }
        }
        Ok(me)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this daemon and namespace; its stdout, or its stderr as the error.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::from(self.address().command(args))
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

    /// Builds the base image (busybox and a few files), imports it as
    /// [`BASE_IMAGE`] and unpacks it into the overlayfs snapshotter, as the
    /// kubelet would have (ctr 1.6 has no `images unpack`: the import unpacks).
    pub async fn import_base_image(&self) {
        let tar = self.dir.path().join("base.tar");
        let archive = || -> Result<()> {
            crate::oci::Archive {
                name: BASE_IMAGE,
                ref_name: BASE_IMAGE.rsplit_once(':').map(|(_, tag)| tag),
                layers: &[base_layer()?],
                history: Some(serde_json::json!([{
                    "created": "2023-11-14T22:13:20Z",
                    "created_by": "desktop-snapshot test base",
                }])),
            }
            .write(&tar)
        };
        archive().unwrap_or_else(|e| panic!("building the base image: {e:#}"));
        let path = tar.to_string_lossy().into_owned();
        self.ctr(&["images", "import", "--snapshotter", "overlayfs", &path])
            .await
            .unwrap_or_else(|e| panic!("importing and unpacking the base image: {e:#}"));
    }

    /// This daemon and namespace, for synchronous `ctr` calls.
    pub fn address(&self) -> CtrAddress {
        CtrAddress {
            socket: self.socket.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// containerd's overlayfs snapshotter directory (what the webhook mounts in the sidecar).
    pub fn snapshotter_root(&self) -> PathBuf {
        self.dir
            .path()
            .join("root")
            .join("io.containerd.snapshotter.v1.overlayfs")
    }

    /// Imports an OCI image layout directory (`just images` output) and unpacks it.
    pub async fn import_layout(&self, layout: &Path) -> Image {
        let image = Image::of_layout(layout)
            .unwrap_or_else(|e| panic!("reading the image layout {}: {e:#}", layout.display()));
        let tar = self.dir.path().join(format!(
            "{}.tar",
            layout.file_name().unwrap_or_default().to_string_lossy()
        ));
        let archive = || -> Result<()> {
            let mut b = tar::Builder::new(std::fs::File::create(&tar)?);
            b.append_dir_all(".", layout)?;
            b.into_inner()?;
            Ok(())
        };
        archive().unwrap_or_else(|e| panic!("archiving {}: {e:#}", layout.display()));
        self.ctr(&["images", "import", &tar.to_string_lossy()])
            .await
            .unwrap_or_else(|e| panic!("importing {}: {e:#}", image.name));
        let _ = std::fs::remove_file(&tar);
        image
    }

    /// Runs a component of ours from its image, in the host's network (it listens
    /// on loopback and reaches the registry there), with `spec`'s environment,
    /// mounts and capabilities; what it prints goes to `spec.log`.
    pub async fn run_component(&self, image: &Image, id: &str, spec: &RunSpec) -> Launched {
        let log = format!("file://{}", spec.log.display());
        let mut args: Vec<String> = ["run", "-d", "--net-host", "--log-uri", &log]
            .map(String::from)
            .to_vec();
        for cap in &spec.cap_add {
            args.extend(["--cap-add".into(), format!("CAP_{cap}")]);
        }
        if let Some(bytes) = spec.memory_limit {
            args.extend(["--memory-limit".into(), bytes.to_string()]);
        }
        if let Some(cores) = spec.cpus {
            args.extend(["--cpus".into(), cores.to_string()]);
        }
        for (src, dst, read_only) in &spec.mounts {
            let options = if *read_only { "rbind:ro" } else { "rbind:rw" };
            args.extend([
                "--mount".into(),
                format!(
                    "type=bind,src={},dst={dst},options={options}",
                    src.display()
                ),
            ]);
        }
        for (k, v) in &spec.env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        args.extend([image.name.clone(), id.to_string()]);
        if !spec.args.is_empty() {
            // ctr replaces the image's entrypoint and command with what follows the id
            args.extend(image.entrypoint.iter().cloned());
            args.extend(spec.args.iter().cloned());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr(&refs).await.unwrap_or_else(|e| {
            panic!(
                "starting {id} from {}: {e:#}
{}",
                image.name,
                self.log()
            )
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
        Launched::Container {
            ctr: self.address(),
            id: id.to_string(),
            removed: false,
        }
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
        self.run_labelled(image, id, pod_uid, pod_name, name, &[])
            .await
    }

    /// A desktop of the base image whose user is hostile: root in it, with
    /// `desktop-probe` (static, `just images`) at `/probe`; `extra` goes to
    /// `ctr run` (e.g. `--with-ns pid:/proc/<pid>/ns/pid`, a shared PID namespace).
    pub async fn run_hostile_desktop(&self, id: &str, pod_uid: &str, extra: &[String]) {
        let probe = crate::probe_binary();
        let mut args = vec![
            "--mount".to_string(),
            format!(
                "type=bind,src={},dst=/probe,options=rbind:ro",
                probe.display()
            ),
        ];
        args.extend(extra.iter().cloned());
        self.run_labelled(
            BASE_IMAGE,
            id,
            pod_uid,
            &format!("{pod_uid}-name"),
            "x-graphical",
            &args,
        )
        .await
    }

    async fn run_labelled(
        &self,
        image: &str,
        id: &str,
        pod_uid: &str,
        pod_name: &str,
        name: &str,
        extra: &[String],
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
        args.extend(extra.iter().map(String::as_str));
        // like a desktop's init, it stops on SIGTERM (a shell as PID 1 ignores it otherwise)
        args.extend([
            image,
            id,
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; sleep 100000 & wait",
        ]);
        self.ctr(&args)
            .await
            .unwrap_or_else(|e| panic!("starting container {id}: {e:#}\n{}", self.log()));
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }

    /// `ctr run -d <flags> image id cmd…` (e.g. flags `--snapshotter stargz`);
    /// the container is removed with the daemon, like a desktop's.
    pub async fn run_with(&self, image: &str, id: &str, flags: &[&str], cmd: &[&str]) {
        let mut args = vec!["run", "-d"];
        args.extend(flags);
        args.extend([image, id]);
        args.extend(cmd);
        self.ctr(&args).await.unwrap_or_else(|e| {
            panic!(
                "starting container {id} from {image}: {e:#}\n{}",
                self.log()
            )
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }

    /// The PID (in the host's namespace) of a container's task.
    pub async fn task_pid(&self, id: &str) -> u32 {
        let out = self
            .ctr(&["tasks", "ls"])
            .await
            .unwrap_or_else(|e| panic!("listing tasks: {e:#}"));
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok())?
            })
            .next()
            .unwrap_or_else(|| panic!("no task {id} in:\n{out}"))
    }

    /// The overlayfs upper directory of a container, on the host.
    pub async fn upper_dir(&self, id: &str) -> PathBuf {
        let info: serde_json::Value = serde_json::from_str(
            &self
                .ctr(&["containers", "info", id])
                .await
                .unwrap_or_else(|e| panic!("container {id}: {e:#}")),
        )
        .expect("container info is JSON");
        let key = info["SnapshotKey"].as_str().expect("a snapshot key");
        let out = self
            .ctr(&[
                "snapshots",
                "--snapshotter",
                "overlayfs",
                "mounts",
                "/mnt",
                key,
            ])
            .await
            .unwrap_or_else(|e| panic!("mounts of {key}: {e:#}"));
        out.split(|c: char| c == ',' || c.is_whitespace())
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no upperdir in {out}"))
    }

    /// Starts a shell command in a container and returns at once (it runs on).
    pub async fn exec_detached(&self, id: &str, script: &str) {
        self.exec_with(id, script, &["--detach"]).await;
    }

    /// Pulls `image` from the test registry as the kubelet would (TLS checked against its CA).
    pub async fn pull(&self, image: &str, registry: &crate::registry::Registry) {
        let hosts_dir = crate::registry::write_hosts_dir(self.dir.path(), registry)
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
        let (ctr, owned) = (self.address(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || ctr.remove(&owned)).await;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| c != id);
    }

    /// What a desktop holds where users work (`/etc`, `/opt`, `/root`): every
    /// path with its type, mode, owner and size; files' link counts and
    /// checksums (a directory's link count is overlay's business: a merged
    /// directory always says 1). Two desktops with the same tree hold the same
    /// files.
    pub async fn tree(&self, id: &str) -> String {
        self.exec(
            id,
            "cd / && for f in $(find etc opt root | sort); do stat -c '%n %F %a %u:%g %s' $f; \
             if [ -f $f ] && [ ! -L $f ]; then stat -c 'links %h' $f; md5sum $f; fi; done",
        )
        .await
    }

    /// Sends `signal` (e.g. "SIGTERM") to a container's task.
    pub async fn signal(&self, id: &str, signal: &str) {
        let _ = self.ctr(&["tasks", "kill", "-s", signal, id]).await;
    }

    /// Waits until a container's task has stopped (or is gone), at most `limit`.
    pub async fn stopped_within(&self, id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if matches!(self.task_status(id).await.as_str(), "STOPPED" | "MISSING") {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a shell command inside a running container.
    pub async fn exec(&self, id: &str, script: &str) -> String {
        self.exec_with(id, script, &[]).await
    }

    async fn exec_with(&self, id: &str, script: &str, flags: &[&str]) -> String {
        let exec_id = format!("e{}", INSTANCE.fetch_add(1, Ordering::SeqCst));
        let mut args = vec!["tasks", "exec"];
        args.extend(flags);
        args.extend(["--exec-id", &exec_id, id, "/bin/sh", "-c", script]);
        self.ctr(&args)
            .await
            .unwrap_or_else(|e| panic!("exec in {id}: {e:#}"))
    }

    /// The task status of a container (RUNNING, PAUSED, STOPPED, MISSING).
    pub async fn task_status(&self, id: &str) -> String {
        let (ctr, owned) = (self.address(), id.to_string());
        tokio::task::spawn_blocking(move || ctr.task_status(&owned))
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "MISSING".to_string())
    }

    /// Starts recording this daemon's events (`ctr events`); returns once
    /// the recording sees them (an exec in running container `id` shows).
    pub async fn events(&self, id: &str) -> Events {
        let mut child = Command::from(self.address().command(&["events"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning ctr events");
        let stdout = child.stdout.take().expect("ctr events' stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = lines.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                into.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let events = Events {
            lines,
            _child: child,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while events.count("/tasks/exec-started", id) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ctr events never showed an exec in {id}: {:?}",
                events.lines()
            );
            self.exec(id, "true").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        events
    }

    async fn clean(&self) {
        let ids = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ctr = self.address();
        let _ = tokio::task::spawn_blocking(move || ids.iter().for_each(|id| ctr.remove(id))).await;
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
        let ctr = self.address();
        for id in ids {
            ctr.remove(&id);
        }
        crate::kill_and_reap(&mut self.child);
        unmount_below(self.dir.path());
    }
}

pub(crate) fn unmount_below(dir: &Path) {
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

/// The base image's files (uncompressed tar): busybox and its applets, and a
/// few files of the "distribution".
/// The base layer gzipped, with its diff_id, as a registry holds it.
pub fn base_layer_blob() -> (Vec<u8>, String) {
    let tar = base_layer().expect("the harness's base layer");
    let diff_id = crate::oci::sha256(&tar);
    (crate::oci::gzip(&tar).expect("gzip"), diff_id)
}

pub fn base_layer() -> Result<Vec<u8>> {
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

/// An image imported from an OCI layout: its name in containerd and its entrypoint.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    pub entrypoint: Vec<String>,
}

impl Image {
    /// Reads the name (`io.containerd.image.name`) and the entrypoint from a layout's
    /// index, manifest and config.
    fn of_layout(layout: &Path) -> Result<Self> {
        let json = |path: PathBuf| -> Result<serde_json::Value> {
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
        };
        let blob = |digest: &serde_json::Value| -> Result<serde_json::Value> {
            let digest = digest.as_str().context("a digest")?;
            let hex = digest.strip_prefix("sha256:").context("a sha256 digest")?;
            json(layout.join("blobs/sha256").join(hex))
        };
        let index = json(layout.join("index.json"))?;
        let entry = &index["manifests"][0];
        let name = entry["annotations"]["io.containerd.image.name"]
            .as_str()
            .context("index.json names no image (io.containerd.image.name)")?
            .to_string();
        let manifest = blob(&entry["digest"])?;
        let config = blob(&manifest["config"]["digest"])?;
        let entrypoint = config["config"]["Entrypoint"]
            .as_array()
            .context("the image has no entrypoint")?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        Ok(Self { name, entrypoint })
    }
}

/// What a component's container gets, as the kubelet would give it.
#[derive(Debug, Default)]
pub struct RunSpec {
    /// Arguments after the image's entrypoint (none: the image's own command).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (path on the host, path in the container, read-only)
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// Linux capabilities added, Kubernetes spelling (`SYS_ADMIN`).
    pub cap_add: Vec<String>,
    /// Memory limit in bytes, and CPU limit in cores (the pod's `resources.limits`).
    pub memory_limit: Option<u64>,
    pub cpus: Option<f64>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// containerd's events from [`Containerd::events`] on, one line each
/// (`<time> <namespace> <topic> <payload>`), until dropped.
pub struct Events {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _child: Child,
}

impl Events {
    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many events of `topic` (`/tasks/paused`) named container `id`.
    pub fn count(&self, topic: &str, id: &str) -> usize {
        let quoted = format!("\"{id}\"");
        self.lines()
            .iter()
            .filter(|l| l.split_whitespace().any(|w| w == topic) && l.contains(&quoted))
            .count()
    }
}
