//! Lazy restore end to end (issue §3): the real sidecar (the debug binary, as
//! a process) writes a desktop's change as an eStargz layer
//! (`SNAPSHOT_LAYER_FORMAT=estargz`) and pushes it to the real registry; the
//! real stargz snapshotter's reader accepts the blob; a node running the
//! stargz snapshotter (background fetch and prefetch off) starts the desktop
//! from it while most of the layer is still in the registry, and every file
//! is right; a plain containerd (overlayfs) restores the same snapshot; and
//! a desktop running on the stargz snapshotter is itself snapshotted and
//! restored lazily again.

use harness::{
    containerd::Containerd,
    registry::{PASSWORD, USER},
    sidecar::{Rig, Sidecar, Target, RIG_REPO},
    stargz::{self, Layer, Options, Stargz},
};
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const XATTR: &str = "user.desktop-snapshot.note";
const XATTR_VALUE: &[u8] = b"travels as a PAX record";
const SMALL: &str = "/root/new.txt";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn pct(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// A desktop's tree (`Containerd::tree`) without directories' sizes: a
/// directory's size is its filesystem's business (ext4 says 4096, the stargz
/// snapshotter's FUSE filesystem 0), not the user's.
fn without_dir_sizes(tree: &str) -> String {
    tree.lines()
        .map(|l| match l.split_once(" directory ") {
            Some((path, rest)) => {
                let kept: Vec<&str> = rest.split(' ').take(2).collect();
                format!("{path} directory {}\n", kept.join(" "))
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// A sidecar of pod `pod_uid` on `containerd` writing eStargz layers.
async fn estargz_sidecar(rig: &Rig, containerd: &Containerd, pod_uid: &str) -> Sidecar {
    Sidecar::start_with(
        Target {
            containerd,
            ..rig.target(pod_uid, "alice")
        },
        None,
        &[("SNAPSHOT_LAYER_FORMAT", "estargz")],
    )
    .await
}

/// Which source the sidecar's only layer came from (`upperdir` or `diff-service`).
async fn layer_source(sidecar: &Sidecar) -> &'static str {
    let metrics = sidecar.metrics().await;
    ["upperdir", "diff-service", "merge"]
        .into_iter()
        .find(|s| {
            metrics.contains(&format!(
                "snapshot_sidecar_layers_total{{source=\"{s}\"}} 1"
            ))
        })
        .unwrap_or_else(|| panic!("no layer counted:\n{metrics}"))
}

/// The newest snapshot of `alice`: its image reference and its layers.
async fn newest(rig: &Rig) -> (String, Vec<Layer>) {
    let tag = rig.tags("alice").await.pop().expect("a snapshot tag");
    let layers = stargz::layers(&rig.registry, RIG_REPO, &tag).await;
    (format!("{}/{RIG_REPO}:{tag}", rig.registry.host), layers)
}

/// Checks that `layer` is an eStargz layer as the snapshotter wants it
/// (annotations, media type) and that the reference reader accepts its blob
/// (TOC digest, every chunk, diff ID); the verifier's report.
async fn check_estargz(rig: &Rig, layer: &Layer, dir: &std::path::Path) -> stargz::EstargzReport {
    assert_eq!(layer.media_type, GZIP, "{layer:?}");
    let toc = layer.toc_digest.as_deref().unwrap_or_else(|| {
        panic!("no containerd.io/snapshot/stargz/toc.digest on the layer: {layer:?}")
    });
    let size: u64 = layer
        .uncompressed_size
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no io.containers.estargz.uncompressed-size: {layer:?}"));
    // curl: the debug build's oci-client takes minutes for 64 MiB on this machine
    let path = dir.join(format!("{}.esgz", &layer.digest[7..19]));
    let out = tokio::process::Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(rig.registry.ca_path())
        .args(["-u", &format!("{USER}:{PASSWORD}"), "-o"])
        .arg(&path)
        .arg(format!(
            "https://{}/v2/{RIG_REPO}/blobs/{}",
            rig.registry.host, layer.digest
        ))
        .output()
        .await
        .expect("running curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), layer.size);
    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let decompressed = std::io::copy(
        &mut flate2::read::MultiGzDecoder::new(file),
        &mut std::io::sink(),
    )
    .expect("a gzip blob");
    assert_eq!(
        decompressed, size,
        "io.containers.estargz.uncompressed-size is the decompressed blob's size"
    );
    let report = stargz::verify_estargz(&path, Some(toc), Some(&layer.diff_id))
        .unwrap_or_else(|e| panic!("the reference reader refuses the sidecar's layer: {e:#}"));
    // a copy for running other verifiers by hand
    if let Some(keep) = std::env::var_os("LAZY_KEEP_BLOBS") {
        std::fs::copy(&path, PathBuf::from(keep).join(path.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(&path).unwrap();
    assert_eq!(report.toc_digest, toc);
    assert_eq!(report.diff_id, layer.diff_id);
    report
}

/// The extended attribute `XATTR` of `path` in container `id`, read from the host.
async fn xattr_in(containerd: &Containerd, id: &str, path: &str) -> Option<Vec<u8>> {
    let pid = containerd.task_pid(id).await;
    let at = PathBuf::from(format!("/proc/{pid}/root{path}"));
    xattr::get(&at, XATTR).unwrap_or_else(|e| panic!("reading {XATTR} of {}: {e}", at.display()))
}

/// A node running the stargz snapshotter, lazily (no background fetch, no
/// prefetch): restores `image` as desktop `id` of pod `pod_uid`; how long the
/// pull took and how long until the first process in it had read a small file.
struct Restored {
    rpull: Duration,
    first_process: Duration,
}

async fn restore_lazily(
    sg: &Stargz,
    node: &Containerd,
    rig: &Rig,
    image: &str,
    id: &str,
    pod_uid: &str,
) -> Restored {
    let rpull = sg.rpull(node, &rig.registry, image).await;
    assert!(
        !sg.fuse_mounts().is_empty(),
        "no FUSE mount after rpull: the layer was not mounted lazily\n{}",
        sg.log()
    );
    let t = Instant::now();
    sg.run_desktop(node, image, id, pod_uid).await;
    let small = node.exec(id, &format!("cat {SMALL}")).await;
    let first_process = t.elapsed();
    assert!(small.starts_with("installed\n"), "{small:?}");
    Restored {
        rpull,
        first_process,
    }
}

/// A desktop of the base image on `rig` with a change holding every kind of
/// entry (new, changed and deleted base files, an opaque directory, a hard
/// link and a symlink, an extended attribute, files under the prefetch paths)
/// and `big_mib` MiB of random bytes (chunked every 4 MiB, hard-linked too);
/// its tree.
async fn changed_desktop(rig: &Rig, id: &str, pod_uid: &str, big_mib: u32) -> String {
    let c = &rig.containerd;
    c.run_desktop(id, pod_uid, &format!("{pod_uid}-name"), "x-graphical")
        .await;
    c.exec(
        id,
        &format!(
            "echo installed > {SMALL} && ln {SMALL} /root/hard && ln -s {SMALL} /root/sym && \
             mkdir -p /root/.config/app /opt/app /opt/big && echo dark > /root/.config/app/theme && \
             echo app > /opt/app/bin && chmod 700 /opt/app/bin && chown 1234:4321 /root/.config/app/theme && \
             echo changed > /etc/base-file-to-change && rm /etc/base-file-to-delete && \
             rm -rf /opt/base && mkdir /opt/base && echo fresh > /opt/base/fresh && \
             dd if=/dev/urandom of=/opt/big/data.bin bs=1M count={big_mib} 2>/dev/null && \
             ln /opt/big/data.bin /root/big-link"
        ),
    )
    .await;
    let upper = c.upper_dir(id).await;
    xattr::set(upper.join(&SMALL[1..]), XATTR, XATTR_VALUE).expect("setting a user xattr");
    assert_eq!(xattr_in(c, id, SMALL).await.as_deref(), Some(XATTR_VALUE));
    let tree = c.tree(id).await;
    for want in [
        "opt/base/fresh regular file",
        "root/big-link regular file 644 0:0",
        "root/sym symbolic link",
        "root/hard regular file 644 0:0 10\nlinks 2",
    ] {
        assert!(tree.contains(want), "{want:?} not in\n{tree}");
    }
    assert!(!tree.contains("base-file-to-delete") && !tree.contains("opt/base/keep"));
    tree
}

#[tokio::test]
async fn an_estargz_snapshot_is_read_by_the_snapshotter_restored_lazily_and_through_overlayfs() {
    const BIG_MIB: u32 = 64;
    let started = Instant::now();
    let rig = Rig::new().await;
    let t = Instant::now();
    let live = changed_desktop(&rig, "desk", "pod-live", BIG_MIB).await;
    let change = t.elapsed();

    // the real sidecar, eStargz
    let sidecar = estargz_sidecar(&rig, &rig.containerd, "pod-live").await;
    let t = Instant::now();
    sidecar.snapshot_done().await;
    let snapshot = t.elapsed();
    assert_eq!(layer_source(&sidecar).await, "upperdir");
    assert_eq!(rig.containerd.task_status("desk").await, "RUNNING");
    sidecar.stop().await;
    let (image, layers) = newest(&rig).await;
    assert_eq!(
        layers.len(),
        2,
        "the base's layer and the user's: {layers:?}"
    );
    let user = layers[1].clone();
    assert!(user.size > u64::from(BIG_MIB) << 20, "{user:?}");

    // 1. the reference reader accepts it, hard link to a chunked file included
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let report = check_estargz(&rig, &user, dir.path()).await;
    let check = t.elapsed();
    assert!(
        report.chunks >= u64::from(BIG_MIB / 4) && report.payload_bytes > u64::from(BIG_MIB) << 20,
        "{report:?}"
    );

    // 2. restored lazily through the stargz snapshotter
    let sg = Stargz::start(&rig.registry, Options::lazy()).await;
    let node = Containerd::start_with_stargz(&sg).await;
    let restored = restore_lazily(&sg, &node, &rig, &image, "lazy", "pod-lazy").await;
    let fetched_start = sg.fetched(&user.digest).await;
    assert!(
        fetched_start > 0 && fetched_start * 10 < user.size,
        "the desktop's first process ran after {fetched_start} of the {} bytes of its layer \
         had been fetched",
        user.size
    );
    let t = Instant::now();
    let tree = node.tree("lazy").await;
    let read_all = t.elapsed();
    assert_eq!(
        without_dir_sizes(&tree),
        without_dir_sizes(&live),
        "the desktop restored through the stargz snapshotter"
    );
    assert_eq!(
        xattr_in(&node, "lazy", SMALL).await.as_deref(),
        Some(XATTR_VALUE)
    );
    let fetched_all = sg.fetched(&user.digest).await;

    // 3. the same snapshot through overlayfs, downloaded and unpacked whole
    let t = Instant::now();
    rig.containerd.pull(&image, &rig.registry).await;
    rig.containerd
        .run_desktop_from(&image, "plain", "pod-plain", "plain", "x-graphical")
        .await;
    let plain = t.elapsed();
    assert_eq!(
        rig.containerd.tree("plain").await,
        live,
        "the desktop restored through overlayfs"
    );
    assert_eq!(
        xattr_in(&rig.containerd, "plain", SMALL).await.as_deref(),
        Some(XATTR_VALUE)
    );

    println!(
        "eStargz snapshot of a {BIG_MIB} MiB change (made and its tree read in {:.1} s): layer \
         {:.1} MiB (snapshot {:.1} s; pulled, decompressed and verified in {:.1} s: {} entries, \
         {} files, {} chunks, {:.1} MiB); stargz: rpull {:.2} s, first process read \
         a file {:.2} s after `ctr run` with {fetched_start} B of the layer fetched ({:.3} %); \
         every file read in {:.1} s, fetched {:.1} MiB ({:.0} %); overlayfs pull+run {:.1} s; \
         test {:.0} s",
        change.as_secs_f64(),
        mib(user.size),
        snapshot.as_secs_f64(),
        check.as_secs_f64(),
        report.entries,
        report.files,
        report.chunks,
        mib(report.payload_bytes),
        restored.rpull.as_secs_f64(),
        restored.first_process.as_secs_f64(),
        pct(fetched_start, user.size),
        read_all.as_secs_f64(),
        mib(fetched_all),
        pct(fetched_all, user.size),
        plain.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    node.stop().await;
    drop(sg);
    rig.containerd.stop().await;
}

#[tokio::test]
async fn a_desktop_on_the_stargz_snapshotter_is_snapshotted_and_restored_lazily_again() {
    const BIG_MIB: u32 = 32;
    let started = Instant::now();
    let rig = Rig::new().await;
    changed_desktop(&rig, "desk", "pod-live", BIG_MIB).await;
    let sidecar = estargz_sidecar(&rig, &rig.containerd, "pod-live").await;
    sidecar.snapshot_done().await;
    sidecar.stop().await;
    let (first, layers) = newest(&rig).await;
    let first_user = layers[1].clone();

    // node B runs the desktop lazily from the first snapshot; the user works on
    let sg = Stargz::start(&rig.registry, Options::lazy()).await;
    let node = Containerd::start_with_stargz(&sg).await;
    restore_lazily(&sg, &node, &rig, &first, "desk-b", "pod-b").await;
    let before = sg.fetched(&first_user.digest).await;
    node.exec(
        "desk-b",
        "echo more >> /root/new.txt && rm /root/sym && rm -rf /opt/app && mkdir /opt/app && \
         echo v2 > /opt/app/bin && rm /etc/base-file-to-change && echo light > /root/.config/app/theme && \
         dd if=/dev/urandom of=/root/second.bin bs=1M count=8 2>/dev/null && ln /root/second.bin /opt/second",
    )
    .await;
    assert_eq!(
        xattr_in(&node, "desk-b", SMALL).await.as_deref(),
        Some(XATTR_VALUE),
        "overlay's copy-up from the FUSE layer keeps the attribute"
    );
    // the stargz snapshotter's container mount is overlayfs's own layout: one
    // overlay mount, its upper directory under the snapshotter's root
    let info: serde_json::Value =
        serde_json::from_str(&node.ctr(&["containers", "info", "desk-b"]).await.unwrap()).unwrap();
    let key = info["SnapshotKey"].as_str().unwrap().to_string();
    let mounts = node
        .ctr(&[
            "snapshots",
            "--snapshotter",
            "stargz",
            "mounts",
            "/mnt",
            &key,
        ])
        .await
        .unwrap();
    let upper = mounts
        .split(|c: char| c == ',' || c.is_whitespace())
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no upperdir in {mounts}"));
    assert!(
        mounts.contains("-t overlay") && upper.starts_with(&sg.root) && upper.is_dir(),
        "{mounts}"
    );

    // its sidecar snapshots it (its snapshotter is `stargz`), before anything
    // else reads its files: what the snapshot fetches is the snapshot's
    let sidecar = estargz_sidecar(&rig, &node, "pod-b").await;
    let t = Instant::now();
    sidecar.snapshot_done().await;
    let snapshot = t.elapsed();
    let fetched_by_snapshot = sg.fetched(&first_user.digest).await;
    let source = layer_source(&sidecar).await;
    let why = sidecar
        .log()
        .lines()
        .find(|l| {
            l.contains("the layer comes from the Diff service") || l.contains("cannot be used")
        })
        .map(str::to_string)
        .unwrap_or_default();
    assert_eq!(node.task_status("desk-b").await, "RUNNING");
    sidecar.stop().await;
    let live = node.tree("desk-b").await;
    assert!(
        live.contains("opt/app/bin regular file 644 0:0 3"),
        "{live}"
    );
    assert!(!live.contains("root/sym") && !live.contains("base-file-to-change"));
    let (second, layers) = newest(&rig).await;
    assert_ne!(second, first);
    assert_eq!(
        layers.len(),
        3,
        "base, first change, second change: {layers:?}"
    );
    assert_eq!(layers[1].digest, first_user.digest);
    let user2 = layers[2].clone();
    let dir = tempfile::tempdir().unwrap();
    let report = check_estargz(&rig, &user2, dir.path()).await;

    // node D restores the second snapshot lazily
    let sg2 = Stargz::start(&rig.registry, Options::lazy()).await;
    let node2 = Containerd::start_with_stargz(&sg2).await;
    let restored = restore_lazily(&sg2, &node2, &rig, &second, "desk-d", "pod-d").await;
    let (f1, f2) = (
        sg2.fetched(&first_user.digest).await,
        sg2.fetched(&user2.digest).await,
    );
    assert!(
        (f1 + f2) * 10 < first_user.size + user2.size,
        "the first process ran after {f1} B of the first user layer ({} B) and {f2} B of the \
         second ({} B) had been fetched",
        first_user.size,
        user2.size
    );
    assert_eq!(
        without_dir_sizes(&node2.tree("desk-d").await),
        without_dir_sizes(&live),
        "the desktop restored from the snapshot of a stargz desktop"
    );
    // The stargz snapshotter's active snapshot is an overlay mount whose
    // upper directory the sidecar reads as under overlayfs: the change alone
    // (no lower layer fetched for it), user attributes included (the Diff
    // service's tar writer, containerd 1.6 archive/tar.go, would drop them).
    assert_eq!(
        source, "upperdir",
        "the fast path on a stargz desktop: {why}"
    );
    assert_eq!(
        xattr_in(&node2, "desk-d", SMALL).await.as_deref(),
        Some(XATTR_VALUE)
    );
    println!(
        "snapshot of a desktop on the stargz snapshotter: source {source} ({why}); \
         its lower eStargz layer {:.1} MiB had {before} B fetched at start, {:.1} MiB after the \
         snapshot ({:.1} s); new layer {:.1} MiB ({} chunks); \
         restored lazily: rpull {:.2} s, first process {:.2} s with {f1} B ({:.3} %) of the first \
         user layer and {f2} B ({:.3} %) of the second fetched; test {:.0} s",
        mib(first_user.size),
        mib(fetched_by_snapshot),
        snapshot.as_secs_f64(),
        mib(user2.size),
        report.chunks,
        restored.rpull.as_secs_f64(),
        restored.first_process.as_secs_f64(),
        pct(f1, first_user.size),
        pct(f2, user2.size),
        started.elapsed().as_secs_f64(),
    );
    node2.stop().await;
    drop(sg2);
    node.stop().await;
    drop(sg);
    rig.containerd.stop().await;
}
