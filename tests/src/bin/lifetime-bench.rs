//! `just bench` (lifetime part): what a desktop costs over many snapshots once
//! `--max-layers` is reached, with the squash that keeps the base (merge of
//! the user's layers above the base image's, "after") against the squash of
//! the whole root filesystem into one layer ("before": the sidecar's fallback
//! when the base's layers are unknown, here reached by running it without
//! `SNAPSHOT_BASE_IMAGE`, so no provenance is ever known).
//!
//! One desktop's life: at each login the node pulls the user's newest
//! snapshot (the first login: the base), the desktop runs from it, the user
//! changes about 1 MiB (a new file, an earlier file modified in place, a
//! temporary file deleted: whiteouts), a new sidecar commits and pushes.
//! The base image (the harness's busybox layer and a layer of random data,
//! 200 MiB by default) is in the snapshot repository of the registry, as a
//! base image mirrored there; each phase has a registry of its own.
//!
//! Then the merge's time against the user's data: an image at the layer limit
//! (base + 14 user layers holding 16, 64, 256 MiB of random data) is pulled,
//! changed, and snapshotted: that snapshot merges.
//!
//! Settings (env): `LIFETIME_SNAPSHOTS` (70), `LIFETIME_BASE_MIB` (200),
//! `LIFETIME_MAX_LAYERS` (16), `LIFETIME_MERGE_MIB` (`16,64,256`).

use harness::bench::env_or;
use harness::{
    containerd::Containerd,
    registry::{Registry, PASSWORD, USER},
    sidecar::{Sidecar, Target},
};
use serde_json::{json, Value};
use snapshot_tags::provenance;
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

/// When the bench started (progress lines say the seconds since).
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, with the seconds since the start.
macro_rules! progress {
    ($($t:tt)*) => {
        eprintln!(
            "lifetime-bench [{:>4.0} s] {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format_args!($($t)*)
        )
    };
}

const REPO: &str = "abcdesktopio/oc.user.test";
const BASE_TAG: &str = "4.1";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MIB: u64 = 1 << 20;
/// User layers of the image the merge table starts from (with the base's
/// two layers: 16, the default limit of this bench).
const MERGE_USER_LAYERS: usize = 14;

/// A layer as pushed: gzip blob, its digest and uncompressed digest.
struct Layer {
    gz: Vec<u8>,
    digest: String,
    diff_id: String,
}

impl Layer {
    fn of_tar(tar: &[u8]) -> Self {
        let gz = harness::oci::gzip(tar).expect("gzip of a layer");
        Self {
            digest: harness::oci::sha256(&gz),
            diff_id: harness::oci::sha256(tar),
            gz,
        }
    }

    fn descriptor(&self) -> Value {
        json!({"mediaType": OCI_LAYER_GZIP, "digest": self.digest, "size": self.gz.len()})
    }
}

/// What one life of snapshots left and took.
#[derive(Default)]
struct Life {
    storage: u64,
    storage_after_gc: u64,
    login_bytes: u64,
    layers: usize,
    total: f64,
    longest: f64,
    longest_at: usize,
    median: f64,
    squashes: usize,
    pulls: f64,
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    let snapshots: usize = env_or("LIFETIME_SNAPSHOTS", 70);
    let base_mib: u64 = env_or("LIFETIME_BASE_MIB", 200);
    let max_layers: usize = env_or("LIFETIME_MAX_LAYERS", 16);
    let merge_mib: Vec<u64> = std::env::var("LIFETIME_MERGE_MIB")
        .unwrap_or_else(|_| "16,64,256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let started = *START.get_or_init(Instant::now);

    progress!("building the {base_mib} MiB base image");
    let base_layers = [
        Layer::of_tar(&harness::containerd::base_layer().expect("the harness's base layer")),
        Layer::of_tar(&random_tree(
            &["usr", "usr/lib", "usr/lib/desktop-data"],
            "usr/lib/desktop-data",
            base_mib * MIB,
        )),
    ];
    let base_bytes: u64 = base_layers.iter().map(|l| l.gz.len() as u64).sum();
    let containerd = Containerd::start().await;

    let before = {
        let mut registry = Registry::start().await;
        let (base_ref, _) = push_base(&registry, &base_layers).await;
        containerd.pull(&base_ref, &registry).await;
        life(
            &containerd,
            &mut registry,
            "before",
            &base_ref,
            false,
            snapshots,
            max_layers,
        )
        .await
    };
    let mut registry = Registry::start().await;
    let (base_ref, base_digest) = push_base(&registry, &base_layers).await;
    containerd.pull(&base_ref, &registry).await;
    let after = life(
        &containerd,
        &mut registry,
        "after",
        &base_ref,
        true,
        snapshots,
        max_layers,
    )
    .await;

    let mut merges = Vec::new();
    for mib in &merge_mib {
        merges.push((
            *mib,
            merge_run(
                &containerd,
                &registry,
                &base_ref,
                &base_digest,
                &base_layers,
                *mib,
                max_layers,
            )
            .await,
        ));
    }

    let date = harness::bench::utc_now();
    let version = containerd.ctr(&["version"]).await.unwrap_or_default();
    let version = version
        .lines()
        .find(|l| l.trim_start().starts_with("Version"))
        .unwrap_or("")
        .trim();
    println!(
        "snapshot-sidecar lifetime benchmark, {date}, {} cores, containerd {version}, registry (distribution) on loopback over TLS, release sidecar, gzip level 1",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "one desktop, {snapshots} logins each ending with a snapshot, --max-layers {max_layers}; base image: 2 layers, {:.0} MiB compressed (busybox + {base_mib} MiB of random data), in the snapshot repository;",
        base_bytes as f64 / MIB as f64
    );
    println!(
        "each login pulls the newest snapshot, changes ~1 MiB (a new 768 KiB file kept, the previous one rewritten in part, a temp file deleted), a new sidecar snapshots;"
    );
    println!(
        "retention --keep 10 with --keep-min-age 0s (standing for a life longer than 7 days). before: the same sidecar without SNAPSHOT_BASE_IMAGE (no provenance: every squash diffs the whole root filesystem into one layer); after: with it (the user's layers merged above the base)."
    );
    println!(
        "storage: bytes under the registry's storage root (base included) after the last snapshot, then after `registry garbage-collect`; login pull: compressed bytes of the newest snapshot's layers that are not the base's (what a node holding the base downloads);"
    );
    println!(
        "snapshot time: POST /snapshot to `done` seen by polling every 20 ms (pause, layer, merge or squash, push, retention); pull time: `ctr images pull` (fetch and unpack) of each login's snapshot, summed."
    );
    println!();
    println!(
        "{:<44} {:>14} {:>14} {:>12}",
        "over the life", "before", "after", "after/before"
    );
    let mib = |b: u64| b as f64 / MIB as f64;
    let row = |name: &str, b: f64, a: f64, unit: &str, prec: usize| {
        println!(
            "{:<44} {:>14} {:>14} {:>12}",
            name,
            format!("{b:.prec$} {unit}"),
            format!("{a:.prec$} {unit}"),
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        );
    };
    row(
        "registry storage after the snapshots",
        mib(before.storage),
        mib(after.storage),
        "MiB",
        0,
    );
    row(
        "registry storage after garbage-collect",
        mib(before.storage_after_gc),
        mib(after.storage_after_gc),
        "MiB",
        0,
    );
    row(
        "a login pulls (newest, beyond the base)",
        mib(before.login_bytes),
        mib(after.login_bytes),
        "MiB",
        1,
    );
    row(
        "layers of the newest image",
        before.layers as f64,
        after.layers as f64,
        "",
        0,
    );
    row(
        "squashes (whole rootfs / merge)",
        before.squashes as f64,
        after.squashes as f64,
        "",
        0,
    );
    row(
        &format!("total time of the {snapshots} snapshots"),
        before.total,
        after.total,
        "s",
        1,
    );
    row("median snapshot", before.median, after.median, "s", 2);
    row(
        &format!(
            "longest snapshot (before #{}, after #{})",
            before.longest_at, after.longest_at
        ),
        before.longest,
        after.longest,
        "s",
        2,
    );
    row("logins' pulls, summed", before.pulls, after.pulls, "s", 1);
    println!();
    println!(
        "the merge against the user's data: an image at the limit (base + {MERGE_USER_LAYERS} user layers of random data, files of at most 4 MiB) pulled, 1 MiB added and one file deleted, snapshotted"
    );
    println!(
        "merge: the sidecar's `user layers merged into one above the base` elapsed_ms (staging the user layers from the content store, merging, gzip on every core); MB/s = user data / merge time"
    );
    println!(
        "{:<12} {:>8} {:>10} {:>10} {:>14} {:>12}",
        "user data", "layers", "merge s", "MB/s", "snapshot s", "merged MiB"
    );
    for (data, m) in &merges {
        println!(
            "{:<12} {:>8} {:>10.2} {:>10.1} {:>14.2} {:>12.1}",
            format!("{data} MiB"),
            m.layers,
            m.merge,
            (*data * MIB) as f64 / 1e6 / m.merge,
            m.snapshot,
            mib(m.bytes)
        );
    }
    progress!("done in {:.0} s", started.elapsed().as_secs_f64());
    drop(registry);
    containerd.stop().await;
}

/// A tar of directories `dirs` and random files of at most 4 MiB under
/// `under`, `bytes` in all.
fn random_tree(dirs: &[&str], under: &str, bytes: u64) -> Vec<u8> {
    let mut random = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut b = tar::Builder::new(Vec::with_capacity(bytes as usize + (1 << 20)));
    for d in dirs {
        let mut h = harness::oci::tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, d, std::io::empty())
            .expect("a tar entry");
    }
    let (mut left, mut n) = (bytes, 0);
    let mut data = vec![0u8; (4 * MIB) as usize];
    while left > 0 {
        let size = left.min(4 * MIB) as usize;
        std::io::Read::read_exact(&mut random, &mut data[..size]).expect("random bytes");
        let mut h = harness::oci::tar_header(tar::EntryType::Regular, 0o644, size as u64);
        b.append_data(&mut h, format!("{under}/{n:04}"), &data[..size])
            .expect("a tar entry");
        left -= size as u64;
        n += 1;
    }
    b.into_inner().expect("a tar")
}

/// Pushes the base image into `REPO:BASE_TAG`; its name and manifest digest.
async fn push_base(registry: &Registry, layers: &[Layer]) -> (String, String) {
    progress!("pushing the base image to {}", registry.host);
    for l in layers {
        put_blob(registry, &l.gz).await;
    }
    let history: Vec<Value> = layers
        .iter()
        .map(|_| json!({"created": "2023-11-14T22:13:20Z", "created_by": "lifetime-bench base"}))
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let descriptors = layers.iter().map(Layer::descriptor).collect();
    let digest = put_manifest_of(
        registry,
        BASE_TAG,
        &diff_ids,
        descriptors,
        history,
        json!({}),
    )
    .await;
    (format!("{}/{REPO}:{BASE_TAG}", registry.host), digest)
}

/// Uploads a blob in one PUT unless the repository has it; its digest.
async fn put_blob(registry: &Registry, data: &[u8]) -> String {
    let digest = harness::oci::sha256(data);
    let client = registry.http_client();
    let head = client
        .head(format!(
            "https://{}/v2/{REPO}/blobs/{digest}",
            registry.host
        ))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .expect("asking for a blob");
    if head.status().is_success() {
        return digest;
    }
    registry.upload_whole(REPO, data.to_vec()).await
}

/// The newest of `prefix`'s snapshot tags.
async fn newest(registry: &Registry, prefix: &str) -> String {
    registry
        .tags(REPO)
        .await
        .into_iter()
        .filter_map(|t| {
            let n: u128 = t.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()?;
            Some((n, t))
        })
        .max()
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no snapshot of {prefix} in the registry"))
}

/// The sidecar's JSON log lines whose message is `message`.
fn events(log: &str, message: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message || v["fields"]["message"] == message)
        .collect()
}

const MERGED: &str = "user layers merged into one above the base";
const SQUASHED: &str =
    "layer limit reached, the base's layers unknown: squashing the whole desktop into one layer";

/// The sidecar's settings in this bench; with the base image's name "after".
fn sidecar_env<'a>(max_layers: &'a str, base: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("SNAPSHOT_MAX_LAYERS", max_layers),
        ("SNAPSHOT_KEEP", "10"),
        ("SNAPSHOT_KEEP_HOURLY", "0"),
        ("SNAPSHOT_KEEP_DAILY", "0"),
        ("SNAPSHOT_KEEP_WEEKLY", "0"),
        ("SNAPSHOT_KEEP_MIN_AGE", "0s"),
        ("SNAPSHOT_USER", "alice"),
        ("RUST_LOG", "info"),
    ];
    if let Some(b) = base {
        env.push(("SNAPSHOT_BASE_IMAGE", b));
    }
    env
}

/// The change of login `i` (1-based): a new 768 KiB file kept, the previous
/// one rewritten in part (copied up whole), a temp file replaced (a whiteout);
/// the first login also changes and deletes a base file.
fn change_script(i: usize) -> String {
    let mut s = format!(
        "mkdir -p /root/docs /root/tmp && dd if=/dev/urandom of=/root/docs/d{i} bs=65536 count=12 2>/dev/null && \
         dd if=/dev/urandom of=/root/tmp/t{i} bs=65536 count=1 2>/dev/null"
    );
    if i > 1 {
        let p = i - 1;
        s.push_str(&format!(
            " && dd if=/dev/urandom of=/root/docs/d{p} bs=65536 count=4 seek=2 conv=notrunc 2>/dev/null && rm -f /root/tmp/t{p}"
        ));
    } else {
        s.push_str(
            " && echo changed >> /etc/base-file-to-change && rm -f /etc/base-file-to-delete",
        );
    }
    s.push_str(" && sync");
    s
}

/// One desktop's `n` logins, each ending with a snapshot; what they left.
async fn life(
    containerd: &Containerd,
    registry: &mut Registry,
    phase: &str,
    base_ref: &str,
    with_base: bool,
    n: usize,
    max_layers: usize,
) -> Life {
    let ca = registry.ca_path();
    let creds = registry.credentials_file();
    let max = max_layers.to_string();
    let env = sidecar_env(&max, with_base.then_some(base_ref));
    let mut image = base_ref.to_string();
    let mut times = Vec::with_capacity(n);
    let mut out = Life::default();
    let mut previous: Option<String> = None;
    for i in 1..=n {
        let (id, pod) = (format!("{phase}-{i}"), format!("pod-{phase}-{i}"));
        if i > 1 {
            // the previous desktop goes while the next login pulls (as a pod
            // terminating while the user's new one starts)
            let reg: &Registry = registry;
            let pull = async {
                let pulled = Instant::now();
                containerd.pull(&image, reg).await;
                pulled.elapsed().as_secs_f64()
            };
            let gone = async {
                if let Some(p) = previous.take() {
                    containerd.remove(&p).await;
                }
            };
            let (seconds, ()) = tokio::join!(pull, gone);
            out.pulls += seconds;
        }
        containerd
            .run_desktop_from(&image, &id, &pod, &format!("{pod}-name"), "x-graphical")
            .await;
        containerd.exec(&id, &change_script(i)).await;
        let sidecar = Sidecar::start_with(
            Target::at(containerd, registry, (&ca, &creds), &pod, REPO, "alice"),
            None,
            &env,
        )
        .await;
        let t = Instant::now();
        let steps = sidecar.snapshot().await;
        let seconds = t.elapsed().as_secs_f64();
        assert_eq!(
            steps.last().map(String::as_str),
            Some("done"),
            "{phase} snapshot {i}: {steps:?}\n{}",
            sidecar.log()
        );
        let log = sidecar.log();
        let squashed = !events(&log, MERGED).is_empty() || !events(&log, SQUASHED).is_empty();
        if squashed {
            out.squashes += 1;
        }
        sidecar.stop().await;
        previous = Some(id);
        times.push(seconds);
        if seconds > out.longest {
            (out.longest, out.longest_at) = (seconds, i);
        }
        image = format!(
            "{}/{REPO}:{}",
            registry.host,
            newest(registry, "alice").await
        );
        progress!(
            "{phase} {i}/{n}: snapshot {seconds:.2} s{}",
            if squashed {
                if with_base {
                    " (merge above the base)"
                } else {
                    " (whole-rootfs squash)"
                }
            } else {
                ""
            }
        );
    }
    if let Some(p) = previous {
        containerd.remove(&p).await;
    }
    out.total = times.iter().sum();
    times.sort_by(f64::total_cmp);
    out.median = times.get(times.len() / 2).copied().unwrap_or(0.0);

    let tag = newest(registry, "alice").await;
    let (manifest, _) = registry.manifest_and_config(REPO, &tag).await;
    let (base_manifest, _) = registry.manifest_and_config(REPO, BASE_TAG).await;
    let base: HashSet<&str> = base_manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str())
        .collect();
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    out.layers = layers.len();
    out.login_bytes = layers
        .iter()
        .filter(|l| !l["digest"].as_str().is_some_and(|d| base.contains(d)))
        .filter_map(|l| l["size"].as_u64())
        .sum();
    out.storage = registry.storage_bytes();
    registry.garbage_collect().await;
    out.storage_after_gc = registry.storage_bytes();
    progress!(
        "{phase}: {:.0} MiB stored, {:.0} MiB after GC",
        out.storage as f64 / MIB as f64,
        out.storage_after_gc as f64 / MIB as f64
    );
    out
}

/// One merge of the table.
struct Merge {
    layers: usize,
    merge: f64,
    snapshot: f64,
    bytes: u64,
}

/// An image at the layer limit whose user layers hold `mib` MiB, pulled,
/// changed and snapshotted: the snapshot that merges.
async fn merge_run(
    containerd: &Containerd,
    registry: &Registry,
    base_ref: &str,
    base_digest: &str,
    base_layers: &[Layer],
    mib: u64,
    max_layers: usize,
) -> Merge {
    progress!("merge of {mib} MiB: building the image");
    let user_layers = max_layers.saturating_sub(base_layers.len()).max(1);
    let per_layer = mib * MIB / user_layers as u64;
    let mut layers: Vec<Layer> = Vec::new();
    for k in 0..user_layers {
        let dir = format!("root/data/L{k:02}");
        let tar = random_tree(&["root/data", &dir], &dir, per_layer);
        let layer = Layer::of_tar(&tar);
        put_blob(registry, &layer.gz).await;
        layers.push(layer);
    }
    let history: Vec<Value> = base_layers
        .iter()
        .map(|_| json!({"created_by": "lifetime-bench base"}))
        .chain(layers.iter().map(|_| {
            json!({"created_by": "desktop-snapshot", "comment": "desktop-snapshot: the user's changes"})
        }))
        .collect();
    let prefix = format!("m{mib}");
    let tag = format!("{prefix}-1");
    let mut descriptors: Vec<Value> = base_layers.iter().map(Layer::descriptor).collect();
    descriptors.extend(layers.iter().map(Layer::descriptor));
    let annotations = json!({
        provenance::BASE_NAME: base_ref,
        provenance::BASE_DIGEST: base_digest,
        provenance::FIRST_USER_LAYER: base_layers.len().to_string(),
        provenance::TAG: tag,
    });
    let mut diff_ids: Vec<&str> = base_layers.iter().map(|l| l.diff_id.as_str()).collect();
    diff_ids.extend(layers.iter().map(|l| l.diff_id.as_str()));
    put_manifest_of(registry, &tag, &diff_ids, descriptors, history, annotations).await;
    let image = format!("{}/{REPO}:{tag}", registry.host);
    progress!("merge of {mib} MiB: pulling {image}");
    containerd.pull(&image, registry).await;
    let (id, pod) = (format!("merge-{mib}"), format!("pod-merge-{mib}"));
    containerd
        .run_desktop_from(&image, &id, &pod, &format!("{pod}-name"), "x-graphical")
        .await;
    containerd
        .exec(
            &id,
            "dd if=/dev/urandom of=/root/new bs=65536 count=16 2>/dev/null && rm -f /root/data/L00/0000 && sync",
        )
        .await;
    let (ca, creds) = (
        registry.ca_path(),
        registry.dir.path().join("dockerconfig.json"),
    );
    let max = max_layers.to_string();
    let env = sidecar_env(&max, Some(base_ref));
    let sidecar = Sidecar::start_with(
        Target::at(containerd, registry, (&ca, &creds), &pod, REPO, &prefix),
        None,
        &env,
    )
    .await;
    let t = Instant::now();
    let steps = sidecar.snapshot_done_within(Duration::from_secs(600)).await;
    let snapshot = t.elapsed().as_secs_f64();
    let log = sidecar.log();
    let merged = events(&log, MERGED);
    let event = merged
        .first()
        .unwrap_or_else(|| panic!("the snapshot did not merge: {steps:?}\n{log}"));
    let ms = event["elapsed_ms"]
        .as_u64()
        .or_else(|| event["fields"]["elapsed_ms"].as_u64())
        .expect("elapsed_ms in the merge's log line");
    let bytes = event["bytes"]
        .as_u64()
        .or_else(|| event["fields"]["bytes"].as_u64())
        .unwrap_or(0);
    sidecar.stop().await;
    containerd.remove(&id).await;
    progress!(
        "merge of {mib} MiB: merge {:.2} s, snapshot {snapshot:.2} s",
        ms as f64 / 1000.0
    );
    Merge {
        layers: user_layers + 1,
        merge: ms as f64 / 1000.0,
        snapshot,
        bytes,
    }
}

/// Pushes a config of `diff_ids` and a manifest of `descriptors` (every
/// blob already in the repository) as `REPO:tag`.
async fn put_manifest_of(
    registry: &Registry,
    tag: &str,
    diff_ids: &[&str],
    descriptors: Vec<Value>,
    history: Vec<Value>,
    annotations: Value,
) -> String {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }))
    .expect("a config");
    let config_digest = put_blob(registry, &config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descriptors,
        "annotations": annotations,
    }))
    .expect("a manifest");
    let put = registry
        .http_client()
        .put(format!(
            "https://{}/v2/{REPO}/manifests/{tag}",
            registry.host
        ))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .expect("putting a manifest");
    assert_eq!(
        put.status().as_u16(),
        201,
        "the registry took the manifest {tag}"
    );
    harness::oci::sha256(&manifest)
}
