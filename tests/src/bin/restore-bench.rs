//! `just bench` (restore part): how long a login waits for the user's
//! snapshot, from the kubelet's pull request to the desktop's first process,
//! against real containerd, registry, sidecar and stargz snapshotter.
//!
//! What is measured, per row, on a fresh node (a containerd of its own with
//! the base image already imported and unpacked, as on a node that has run
//! desktops of that base): the clock starts when the pull is asked for and
//! stops when a first process in the started desktop has read the user's
//! configuration back (`cat /root/.config/app/*.conf | wc -c`, 50 files of
//! 4 KiB in the user's layer) and exited. In between: the pull (overlayfs:
//! `ctr images pull`, which in containerd 1.6 fetches every blob, then
//! unpacks; stargz: `ctr-remote image rpull`, the layers mounted lazily),
//! `ctr run -d` of the desktop (a shell that sleeps), `ctr tasks exec` of the
//! first process.
//!
//! Snapshots: a desktop on the base writes `BENCH_LARGE_MIB` (1024) MiB, half
//! text and half random (as sidecar-bench), plus its configuration; the
//! release sidecar snapshots it once per `--layer-format` (gzip, zstd,
//! estargz): one user layer. The same amount spread over `BENCH_LAYERS` (30)
//! layers is made the way a user makes it: `BENCH_LAYERS` logins in a row,
//! each restoring the last snapshot, writing 1/30 of the change and
//! snapshotting (`BENCH_CHAIN_FORMATS`, default gzip,zstd,estargz).
//!
//! Then where the overlayfs restore's time goes (issue §4): the fetch and
//! the unpack of each `ctr images pull` apart (the moment ctr starts
//! unpacking), the decompression alone (`gzip -dc`, `zstd -dc` of the
//! blobs), the download concurrency, the kubelet's own pull path (containerd's
//! `Pull` with unpack, which pipelines the layers: `ctr-remote image rpull
//! --snapshotter overlayfs`), and the merge of the user's layers by the
//! sidecar's `--max-layers`.
//!
//! Progress goes to stderr, the tables to stdout.

use harness::{
    containerd::{Containerd, BASE_IMAGE},
    registry::{Registry, PASSWORD, USER},
    sidecar::{Sidecar, Target},
    stargz::{self, Options, Stargz},
};
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

const REPO: &str = "abcdesktopio/oc.user.test";
const FORMATS: [&str; 3] = ["gzip", "zstd", "estargz"];
/// The user's configuration, what a session reads at start: files and bytes each.
const CONFIG_FILES: u64 = 50;
const CONFIG_BYTES: u64 = 4096;
/// The desktop's first process: it reads the user's configuration back.
const FIRST: &str = "cat /root/.config/app/*.conf | wc -c";
const SLEEPER: [&str; 3] = ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"];
const TEXT: &str = "the quick brown fox jumps over the lazy desktop user 0123456789";

/// A snapshot in the registry.
#[derive(Clone, Debug)]
struct Snapshot {
    image: String,
    /// The user's layers (above the base): digest and compressed size.
    layers: Vec<(String, u64)>,
}

impl Snapshot {
    fn bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }
}

/// One restore, on a fresh node.
#[derive(Clone, Debug, Default)]
struct Row {
    name: String,
    /// From the pull request to the first process's end.
    first: f64,
    /// The pull (overlayfs: fetch and unpack; stargz: rpull).
    pull: f64,
    /// overlayfs: the fetch and the unpack within the pull.
    fetch: Option<f64>,
    unpack: Option<f64>,
    /// Bytes of the user's layers received before the first process ended.
    bytes: u64,
    /// stargz with background fetch: when every byte of the user's layers was in.
    all: Option<f64>,
}

impl Row {
    fn start(&self) -> f64 {
        self.first - self.pull
    }
}

struct Env {
    registry: Registry,
    creds: PathBuf,
    ca: PathBuf,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn progress(started: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    let started = Instant::now();
    let large_mib = env_u64("BENCH_LARGE_MIB", 1024);
    let layer_count = env_u64("BENCH_LAYERS", 30).max(2) as usize;
    let reps = env_u64("BENCH_REPS", 2).max(1) as usize;
    let chain_formats: Vec<String> = std::env::var("BENCH_CHAIN_FORMATS")
        .unwrap_or_else(|_| "gzip,zstd,estargz".into())
        .split(',')
        .filter(|f| FORMATS.contains(f))
        .map(str::to_string)
        .collect();
    let load_before = loadavg();

    // ---- the snapshots, made by the release sidecar on a builder node ----
    let registry = Registry::start().await;
    let creds = registry.dir.path().join("dockerconfig.json");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);
    let ca = registry.ca_path();
    let env = Env {
        registry,
        creds,
        ca,
    };
    let builder = Containerd::start().await;
    builder.import_base_image().await;
    let version = builder
        .ctr(&["version"])
        .await
        .unwrap_or_default()
        .lines()
        .find(|l| l.trim_start().starts_with("Version"))
        .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
        .unwrap_or_default();
    // the base image alone, in the registry: the floor
    let base_ref = format!("{}/{REPO}:4.1", env.registry.host);
    builder
        .ctr(&["images", "tag", BASE_IMAGE, &base_ref])
        .await
        .expect("tagging the base");
    stargz::push(&builder, &env.registry, &base_ref).await;
    let base = Snapshot {
        image: base_ref,
        layers: Vec::new(),
    };

    progress(
        started,
        &format!("writing the {large_mib} MiB change in a desktop"),
    );
    builder
        .run_desktop("big", "pod-big", "big-1", "x-graphical")
        .await;
    builder
        .exec("big", &write_script("/root", large_mib, true))
        .await;
    let mut one = Vec::new();
    for format in FORMATS {
        let (snap, secs) = snapshot(
            &builder,
            &env,
            "pod-big",
            &format!("one-{format}"),
            format,
            &[],
        )
        .await;
        progress(
            started,
            &format!(
                "{format} snapshot of the {large_mib} MiB change: {secs:.1} s, {:.0} MiB compressed",
                mib(snap.bytes())
            ),
        );
        one.push((format.to_string(), snap));
    }
    // the prefetch choice: the same eStargz snapshot without a prefetch landmark
    let (no_prefetch, secs) = snapshot(
        &builder,
        &env,
        "pod-big",
        "one-estargz-noprefetch",
        "estargz",
        &[("SNAPSHOT_PREFETCH", "none")],
    )
    .await;
    progress(
        started,
        &format!("estargz snapshot without prefetch: {secs:.1} s"),
    );
    builder.remove("big").await;

    // the same change over `layer_count` layers: that many logins in a row
    let per_layer = (large_mib / layer_count as u64).max(2);
    let mut chains = Vec::new();
    let mut merge = None;
    for format in &chain_formats {
        let (snap, step_secs) =
            chain(&builder, &env, format, layer_count, per_layer, started).await;
        if format == "gzip" {
            // the sidecar's own cut: past --max-layers the user's layers are merged into one
            let id = "merge";
            builder.pull(&snap.image, &env.registry).await;
            builder
                .run_desktop_from(&snap.image, id, id, "merge-1", "x-graphical")
                .await;
            let (merged, secs) = snapshot(
                &builder,
                &env,
                id,
                "merged-gzip",
                "gzip",
                &[("SNAPSHOT_MAX_LAYERS", "2")],
            )
            .await;
            builder.remove(id).await;
            progress(
                started,
                &format!(
                    "gzip snapshot with --max-layers 2 of the {layer_count}-layer desktop: {secs:.1} s ({} user layer(s), {:.0} MiB); a {per_layer} MiB step took {step_secs:.1} s",
                    merged.layers.len(),
                    mib(merged.bytes())
                ),
            );
            merge = Some((merged, secs, step_secs));
        }
        // free the builder's disk: the chain's images and snapshots
        let images = builder
            .ctr(&["images", "ls", "-q"])
            .await
            .unwrap_or_default();
        let chain_images: Vec<&str> = images
            .lines()
            .filter(|l| l.contains(&format!(":chain-{format}-")))
            .collect();
        if !chain_images.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(chain_images);
            let _ = builder.ctr(&args).await;
        }
        chains.push((format.clone(), snap));
    }
    builder.stop().await;
    progress(started, "snapshots made; restoring them on fresh nodes");

    // ---- the restores ----
    let mut rows: Vec<Row> = Vec::new();
    let r = overlay(
        &env,
        &base,
        "base image alone (the floor), overlayfs",
        Some(3),
    )
    .await;
    progress(started, &describe(&r));
    rows.push(r);
    let many = format!("{layer_count} layers");
    for (label, snap, reps_here) in [("1 layer", &one, reps), (many.as_str(), &chains, 1)] {
        let mut best: Vec<Option<Row>> = vec![None; snap.len()];
        for _ in 0..reps_here {
            for (i, (format, s)) in snap.iter().enumerate() {
                let name = format!("overlayfs {format}, {label}");
                let r = overlay(&env, s, &name, Some(3)).await;
                progress(started, &describe(&r));
                if best[i].as_ref().is_none_or(|b| r.first < b.first) {
                    best[i] = Some(r);
                }
            }
        }
        rows.extend(best.into_iter().flatten());
    }
    // the stargz snapshotter: eStargz mounted lazily; gzip falls back to a download
    let mut stargz_rows = Vec::new();
    let mut plan: Vec<(String, Snapshot, Options, usize)> = Vec::new();
    if let Some(s) = find(&one, "estargz") {
        plan.push((
            "stargz estargz, 1 layer, background fetch on".into(),
            s.clone(),
            Options::default(),
            reps.max(3),
        ));
        plan.push((
            "stargz estargz, 1 layer, on demand only".into(),
            s,
            Options::lazy(),
            1,
        ));
        plan.push((
            "stargz estargz, 1 layer, no prefetch landmark".into(),
            no_prefetch.clone(),
            Options::default(),
            reps.max(3),
        ));
    }
    if let Some(s) = find(&one, "gzip") {
        plan.push((
            "stargz gzip, 1 layer (falls back)".into(),
            s,
            Options::default(),
            1,
        ));
    }
    if let Some(s) = find(&chains, "estargz") {
        plan.push((
            format!("stargz estargz, {layer_count} layers, background fetch on"),
            s,
            Options::default(),
            1,
        ));
    }
    for (name, snap, options, n) in plan {
        let mut runs = Vec::new();
        for i in 0..n {
            // the wait for the whole layer, in the first run only
            let r = lazy(&env, &snap, &name, options, i == 0).await;
            progress(started, &describe(&r));
            runs.push(r);
        }
        // the median run
        let all = runs[0].all;
        runs.sort_by(|a, b| a.first.total_cmp(&b.first));
        let mut r = runs[runs.len() / 2].clone();
        r.all = all;
        if n > 1 {
            r.name = format!("{name} (median of {n})");
        }
        stargz_rows.push(r);
    }

    // ---- where the overlayfs restore goes (§4) ----
    let mut analysis: Vec<(String, f64, String)> = Vec::new();
    for tool in ["gzip", "zstd"] {
        if let Some(s) = find(&one, tool) {
            let secs = decompress(&env.registry, &s, tool);
            analysis.push((
                format!("{tool}, 1 layer: {tool} -dc of the blob alone"),
                secs,
                format!("{:.0} MiB/s of change", large_mib as f64 / secs),
            ));
        }
    }
    for f in ["gzip", "zstd"] {
        if let Some(s) = find(&chains, f) {
            let secs = cri_pull(&env, &s, &format!("{f}, {layer_count} layers")).await;
            analysis.push((
                format!("{f}, {layer_count} layers: kubelet's path (Pull+unpack, pipelined)"),
                secs,
                "first process".into(),
            ));
            progress(
                started,
                &format!("{f} {layer_count} layers, CRI path: {secs:.2} s"),
            );
        }
    }
    if let Some(s) = find(&chains, "gzip") {
        for (concurrency, label) in [(Some(1), "1"), (None, "unlimited")] {
            let r = overlay(
                &env,
                &s,
                &format!("overlayfs gzip, {layer_count} layers, max-concurrent-downloads {label}"),
                concurrency,
            )
            .await;
            progress(started, &describe(&r));
            analysis.push((
                format!("gzip, {layer_count} layers: fetch, max-concurrent-downloads {label}"),
                r.fetch.unwrap_or(0.0),
                format!(
                    "unpack {:.2} s, first process {:.2} s",
                    r.unpack.unwrap_or(0.0),
                    r.first
                ),
            ));
        }
    }
    if let Some((merged, secs, step_secs)) = &merge {
        let r = overlay(
            &env,
            merged,
            &format!("overlayfs gzip, {layer_count} layers merged by --max-layers 2"),
            Some(3),
        )
        .await;
        progress(started, &describe(&r));
        analysis.push((
            format!("gzip, {layer_count} layers merged (--max-layers 2): snapshot"),
            *secs,
            format!("vs {step_secs:.2} s for a {per_layer} MiB snapshot without the merge"),
        ));
        rows.push(r);
    }

    // ---- the report ----
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = harness::bench::utc_now();
    println!(
        "restore benchmark, {date}: {large_mib} MiB change ({layer_count} layers of {per_layer} MiB for the chains), {cores} cores, containerd {version}, registry on loopback over TLS; load average {load_before} at the start, {} at the end",
        loadavg()
    );
    println!("first process: from the pull request to the end of a first `ctr tasks exec` that reads the user's configuration back, on a fresh node holding the base");
    println!(
        "{:<58} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9}",
        "restore",
        "first s",
        "pull s",
        "fetch s",
        "unpk s",
        "start s",
        "MiB in",
        "all in s",
        "vs gzip"
    );
    let gzip_ref = |name: &str| -> Option<f64> {
        let layers = if name.contains(&format!("{layer_count} layers")) {
            format!("{layer_count} layers")
        } else {
            "1 layer".into()
        };
        rows.iter()
            .find(|r| r.name.starts_with(&format!("overlayfs gzip, {layers}")))
            .map(|r| r.first)
    };
    for r in rows.iter().chain(stargz_rows.iter()) {
        let ratio = if r.name.starts_with("base") {
            "-".to_string()
        } else {
            gzip_ref(&r.name)
                .map(|g| format!("{:.2}x", r.first / g))
                .unwrap_or_else(|| "-".into())
        };
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<58} {:>8.2} {:>7.2} {:>7} {:>7} {:>7.2} {:>9.1} {:>8} {:>9}",
            r.name,
            r.first,
            r.pull,
            opt(r.fetch),
            opt(r.unpack),
            r.start(),
            mib(r.bytes),
            opt(r.all),
            ratio
        );
    }
    println!("vs gzip: this row's first-process time over overlayfs gzip's with as many layers (below 1: sooner)");

    println!();
    println!("targets:");
    let find_row = |prefix: &str| {
        rows.iter()
            .chain(stargz_rows.iter())
            .find(|r| r.name.starts_with(prefix))
    };
    if let (Some(lazy), Some(full)) = (
        find_row("stargz estargz, 1 layer, background fetch on"),
        find_row("overlayfs estargz, 1 layer"),
    ) {
        println!(
            "  stargz, estargz 1 layer, background fetch on: first process {:.2} s after the pull request (target <= 2 s): {}",
            lazy.first,
            verdict(lazy.first <= 2.0)
        );
        println!(
            "  ... {:.1}x sooner than the full pull of the same snapshot on overlayfs, {:.2} s (target >= 10x): {}",
            full.first / lazy.first,
            full.first,
            verdict(full.first / lazy.first >= 10.0)
        );
    }
    if let (Some(e), Some(g)) = (
        find_row("overlayfs estargz, 1 layer"),
        find_row("overlayfs gzip, 1 layer"),
    ) {
        println!(
            "  overlayfs, 1 layer: estargz {:.2} s / gzip {:.2} s = {:.2}x (target <= 1.10x): {}",
            e.first,
            g.first,
            e.first / g.first,
            verdict(e.first / g.first <= 1.10)
        );
    }
    if let (Some(e), Some(g)) = (
        find_row(&format!("overlayfs estargz, {layer_count} layers")),
        find_row(&format!("overlayfs gzip, {layer_count} layers")),
    ) {
        println!(
            "  overlayfs, {layer_count} layers: estargz {:.2} s / gzip {:.2} s = {:.2}x (target <= 1.10x): {}",
            e.first,
            g.first,
            e.first / g.first,
            verdict(e.first / g.first <= 1.10)
        );
    }

    println!();
    println!("where the overlayfs restore goes:");
    for (what, secs, note) in &analysis {
        println!("  {what:<66} {secs:>7.2} s  {note}");
    }
    if !chain_formats.contains(&"estargz".to_string()) {
        println!(
            "  (not run, for time: the {layer_count}-layer estargz rows; BENCH_CHAIN_FORMATS=gzip,zstd,estargz adds them; chains made: {})",
            chain_formats.join(",")
        );
    }
    println!(
        "bench took {:.0} s (1-layer overlayfs rows: best of {reps})",
        started.elapsed().as_secs_f64()
    );
    drop(env);
}

fn find(v: &[(String, Snapshot)], format: &str) -> Option<Snapshot> {
    v.iter().find(|(f, _)| f == format).map(|(_, s)| s.clone())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn describe(r: &Row) -> String {
    format!(
        "{}: first process {:.2} s (pull {:.2} s{}), {:.1} MiB in{}",
        r.name,
        r.first,
        r.pull,
        match (r.fetch, r.unpack) {
            (Some(f), Some(u)) => format!(": fetch {f:.2} s, unpack {u:.2} s"),
            _ => String::new(),
        },
        mib(r.bytes),
        r.all
            .map(|a| format!(", all in after {a:.2} s"))
            .unwrap_or_default()
    )
}

/// A shell script that writes `total_mib` MiB under `dir` (half text, half
/// random), and the user's configuration when `config`.
fn write_script(dir: &str, total_mib: u64, config: bool) -> String {
    let text = total_mib / 2;
    let random = total_mib - text;
    let mut s = format!("mkdir -p {dir} && ");
    if config {
        s.push_str(&format!(
            "mkdir -p /root/.config/app && for i in $(seq 1 {CONFIG_FILES}); do head -c {CONFIG_BYTES} /dev/urandom > /root/.config/app/$i.conf; done && "
        ));
    }
    s.push_str(&format!(
        "yes '{TEXT}' | head -c {} > {dir}/text && dd if=/dev/urandom of={dir}/random bs=1048576 count={random} 2>/dev/null && sync",
        text * 1048576
    ));
    s
}

/// Snapshots the desktop of pod `pod_uid` with the release sidecar in `format`
/// (tag prefix `prefix`); the snapshot and the seconds from the click to the tag.
async fn snapshot(
    builder: &Containerd,
    env: &Env,
    pod_uid: &str,
    prefix: &str,
    format: &str,
    extra: &[(&str, &str)],
) -> (Snapshot, f64) {
    // each sidecar has a work directory of its own, as each pod has: no
    // record of an earlier snapshot of the same desktop, so each format's
    // snapshot is a whole one
    let mut vars = vec![
        ("SNAPSHOT_LAYER_FORMAT", format),
        ("SNAPSHOT_BASE_IMAGE", BASE_IMAGE),
        ("RUST_LOG", "warn"),
    ];
    vars.extend_from_slice(extra);
    let sidecar = Sidecar::start_with(
        Target {
            containerd: builder,
            pod_uid,
            registry_host: &env.registry.host,
            registry_ca: Some(&env.ca),
            credentials: Some(&env.creds),
            repository_path: REPO,
            tag_prefix: prefix,
        },
        None,
        &vars,
    )
    .await;
    let t = Instant::now();
    sidecar.snapshot_done_within(Duration::from_secs(600)).await;
    let secs = t.elapsed().as_secs_f64();
    sidecar.stop().await;
    let tag = env
        .registry
        .tags(REPO)
        .await
        .into_iter()
        .find(|t| t.starts_with(&format!("{prefix}-")))
        .unwrap_or_else(|| panic!("no tag {prefix}-* in {REPO}"));
    let layers = stargz::layers(&env.registry, REPO, &tag).await;
    let snap = Snapshot {
        image: format!("{}/{REPO}:{tag}", env.registry.host),
        // the base has one layer
        layers: layers
            .iter()
            .skip(1)
            .map(|l| (l.digest.clone(), l.size))
            .collect(),
    };
    (snap, secs)
}

/// `layers` logins in a row in `format`: restore the last snapshot, write
/// `per_layer` MiB, snapshot; the last snapshot and the mean seconds of a
/// snapshot.
async fn chain(
    builder: &Containerd,
    env: &Env,
    format: &str,
    layers: usize,
    per_layer: u64,
    started: Instant,
) -> (Snapshot, f64) {
    let mut image = BASE_IMAGE.to_string();
    let mut last: Option<(Snapshot, String)> = None;
    let mut snapshot_secs = 0.0;
    for i in 1..=layers {
        if i > 1 {
            builder.pull(&image, &env.registry).await;
        }
        let id = format!("chain-{format}-{i}");
        builder
            .run_desktop_from(&image, &id, &id, &format!("{id}-pod"), "x-graphical")
            .await;
        builder
            .exec(
                &id,
                &write_script(&format!("/root/c{i}"), per_layer, i == 1),
            )
            .await;
        let (snap, secs) = snapshot(builder, env, &id, &id, format, &[]).await;
        snapshot_secs += secs;
        if let Some((_, previous)) = last.take() {
            builder.remove(&previous).await;
        }
        image = snap.image.clone();
        last = Some((snap, id));
        if i % 10 == 0 || i == layers {
            progress(
                started,
                &format!("{format} chain: {i} of {layers} snapshots ({secs:.2} s the last)"),
            );
        }
    }
    let (snap, id) = last.expect("at least one layer");
    builder.remove(&id).await;
    assert_eq!(snap.layers.len(), layers, "{snap:?}");
    (snap, snapshot_secs / layers as f64)
}

/// Bytes of the user's layers the registry says it sent so far (its access log).
fn served(registry: &Registry, snap: &Snapshot) -> Vec<u64> {
    snap.layers
        .iter()
        .map(|(d, _)| stargz::blob_bytes_logged(registry, d))
        .collect()
}

fn served_since(registry: &Registry, snap: &Snapshot, before: &[u64]) -> Vec<u64> {
    served(registry, snap)
        .iter()
        .zip(before)
        .map(|(now, then)| now.saturating_sub(*then))
        .collect()
}

/// A fresh node: containerd, the base imported and unpacked into overlayfs.
async fn node() -> Containerd {
    let c = Containerd::start().await;
    base_on(&c, "overlayfs").await;
    c
}

/// Imports the base into `node` and unpacks it into `snapshotter`, as on a
/// node that has run a desktop of it (ctr 1.6 has no `images unpack`: a
/// container of the base is run once, which unpacks it).
async fn base_on(node: &Containerd, snapshotter: &str) {
    node.import_base_image().await;
    node.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        BASE_IMAGE,
        "warm",
        "/bin/true",
    ])
    .await
    .unwrap_or_else(|e| panic!("the base on {snapshotter}: {e:#}"));
}

/// Restores `snap` through overlayfs: `ctr images pull` (`concurrency`: its
/// `--max-concurrent-downloads`; `None`: none given, no limit), run, first process.
async fn overlay(env: &Env, snap: &Snapshot, name: &str, concurrency: Option<u32>) -> Row {
    let node = node().await;
    let hosts = stargz::write_hosts_dir(node.dir.path(), &env.registry);
    let before = served(&env.registry, snap);
    settle_writeback();
    let t0 = Instant::now();
    let (fetch, unpack) = ctr_pull(&node, &hosts, &snap.image, concurrency).await;
    let pull = t0.elapsed().as_secs_f64();
    node.run_with(&snap.image, "desk", &[], &SLEEPER).await;
    first_process(&node, snap).await;
    let first = t0.elapsed().as_secs_f64();
    node.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = served_since(&env.registry, snap, &before).iter().sum();
    Row {
        name: name.to_string(),
        first,
        pull,
        fetch: Some(fetch),
        unpack: Some(unpack),
        bytes,
        all: None,
    }
}

/// Writes out the dirty pages earlier restores left (a GiB each), so that
/// no restore pays for the one before it.
fn settle_writeback() {
    let _ = std::process::Command::new("sync").status();
}

/// The desktop's first process; checks it read the whole configuration (a
/// snapshot without one, the base, only runs).
async fn first_process(node: &Containerd, snap: &Snapshot) {
    let out = node.exec("desk", FIRST).await;
    if !snap.layers.is_empty() {
        assert_eq!(
            out.trim(),
            (CONFIG_FILES * CONFIG_BYTES).to_string(),
            "the first process read the user's configuration"
        );
    }
}

/// `ctr images pull` of `image`: the seconds until ctr starts unpacking
/// (every blob fetched) and the seconds of the unpack.
async fn ctr_pull(
    node: &Containerd,
    hosts: &Path,
    image: &str,
    concurrency: Option<u32>,
) -> (f64, f64) {
    let user = format!("{USER}:{PASSWORD}");
    let hosts = hosts.to_string_lossy().into_owned();
    let n = concurrency.map(|n| n.to_string());
    let mut args = vec!["images", "pull", "--hosts-dir", &hosts, "--user", &user];
    if let Some(n) = &n {
        args.extend(["--max-concurrent-downloads", n.as_str()]);
    }
    args.push(image);
    let mut cmd = node.address().command(&args);
    let err_path = node.dir.path().join("pull.err");
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).expect("pull.err"));
    let image = image.to_string();
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut child = cmd.spawn().expect("running ctr");
        let mut out = child.stdout.take().expect("ctr's stdout");
        let (mut seen, mut buf, mut unpacking) = (Vec::new(), [0u8; 8192], None);
        loop {
            let n = out.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if unpacking.is_none() && seen.windows(10).any(|w| w == b"unpacking ") {
                unpacking = Some(t0.elapsed().as_secs_f64());
            }
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 64);
            }
        }
        let status = child.wait().expect("ctr");
        let total = t0.elapsed().as_secs_f64();
        assert!(
            status.success(),
            "ctr images pull {image}: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        let fetch = unpacking.unwrap_or(total);
        (fetch, total - fetch)
    })
    .await
    .expect("ctr images pull")
}

/// Restores `snap` through the stargz snapshotter (`options`): rpull, run on
/// `stargz`, first process; with background fetch, then waits until every
/// byte of the user's layers is in.
async fn lazy(env: &Env, snap: &Snapshot, name: &str, options: Options, wait_all: bool) -> Row {
    let sg = Stargz::start(&env.registry, options).await;
    let node = Containerd::start_with_stargz(&sg).await;
    base_on(&node, "stargz").await;
    let before = served(&env.registry, snap);
    settle_writeback();
    let t0 = Instant::now();
    let pull = sg
        .rpull(&node, &env.registry, &snap.image)
        .await
        .as_secs_f64();
    sg.run(&node, &snap.image, "desk").await;
    first_process(&node, snap).await;
    let first = t0.elapsed().as_secs_f64();
    // what came in so far, by the snapshotter's count and containerd's
    // downloads (the registry's log: a fallback layer is downloaded whole)
    let received = |sg: &Stargz| -> Vec<u64> {
        let fetched = sg.fetched_now();
        snap.layers
            .iter()
            .zip(served_since(&env.registry, snap, &before))
            .map(|((d, _), logged)| fetched.get(d).copied().unwrap_or(0).max(logged))
            .collect()
    };
    let bytes = received(&sg).iter().sum();
    let all = if options.background_fetch && wait_all {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let complete = received(&sg)
                .iter()
                .zip(&snap.layers)
                .all(|(got, (_, size))| got >= size);
            if complete || Instant::now() > deadline {
                break Some(t0.elapsed().as_secs_f64()).filter(|_| complete);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        None
    };
    node.stop().await;
    drop(sg);
    Row {
        name: name.to_string(),
        first,
        pull,
        fetch: None,
        unpack: None,
        bytes,
        all,
    }
}

/// The kubelet's own pull path: containerd's `Pull` with unpack (the CRI
/// plugin's; layers unpacked as they arrive, no download limit here), through
/// `ctr-remote image rpull --snapshotter overlayfs`; then run and the first
/// process. Seconds to the first process.
async fn cri_pull(env: &Env, snap: &Snapshot, what: &str) -> f64 {
    let node = node().await;
    let hosts = stargz::write_hosts_dir(node.dir.path(), &env.registry);
    settle_writeback();
    let t0 = Instant::now();
    let out = tokio::process::Command::new("ctr-remote")
        .arg("--address")
        .arg(&node.socket)
        .args(["--namespace", &node.namespace, "image", "rpull"])
        .args(["--snapshotter", "overlayfs", "--hosts-dir"])
        .arg(&hosts)
        .args(["--user", &format!("{USER}:{PASSWORD}"), &snap.image])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running ctr-remote");
    assert!(
        out.status.success(),
        "ctr-remote image rpull --snapshotter overlayfs ({what}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.run_with(&snap.image, "desk", &[], &SLEEPER).await;
    first_process(&node, snap).await;
    let secs = t0.elapsed().as_secs_f64();
    node.stop().await;
    secs
}

/// Seconds `tool -dc` takes to decompress the user's layers of `snap`, read
/// from the registry's storage, to /dev/null.
fn decompress(registry: &Registry, snap: &Snapshot, tool: &str) -> f64 {
    let blobs: Vec<PathBuf> = snap
        .layers
        .iter()
        .map(|(d, _)| {
            let hex = d.trim_start_matches("sha256:");
            registry
                .dir
                .path()
                .join("data/docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data")
        })
        .collect();
    // warm the page cache as a fetch would have
    for b in &blobs {
        let _ = std::process::Command::new("cat")
            .arg(b)
            .stdout(Stdio::null())
            .status();
    }
    let t = Instant::now();
    for b in &blobs {
        let status = std::process::Command::new(tool)
            .arg("-dc")
            .arg(b)
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(status.success(), "{tool} -dc {}", b.display());
    }
    t.elapsed().as_secs_f64()
}
