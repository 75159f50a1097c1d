//! `just bench` (sidecar part): commit-and-push throughput and peak memory of
//! snapshot-sidecar, next to the same work done with stock tools
//! (`ctr snapshots diff`, containerd's own gzip, then `skopeo copy`), on the
//! same change sets, against the same containerd and registry.
//!
//! Change sets: `large` is about 1 GiB written in the container (half
//! compressible text, half random); `small` is 1 MiB changed on a root
//! filesystem that already holds 20,000 files.
//!
//! Then the freeze (how long the desktop stays paused, from the sidecar's
//! `snapshot_sidecar_paused_seconds`), the click-to-tag time and the sidecar's
//! CPU time, pre-copy off
//! (the desktop paused while its whole change is read and compressed) and on,
//! each the mean of two runs in the order off, on, on, off ([`ORDER`]),
//! for each layer format: the large change, the small one, 1 MiB with
//! 20,000 files in the change itself (each stamped at the pause), and the
//! large change with the desktop writing 20 MB/s throughout the snapshot.

use harness::{
    containerd::Containerd,
    registry::{Registry, PASSWORD, USER},
    sidecar::{Sidecar, Target},
};
use std::time::{Duration, Instant};

const REPO: &str = "abcdesktopio/oc.user.test";

#[tokio::main]
async fn main() {
    harness::init_crypto();
    let containerd = Containerd::start().await;
    containerd.import_base_image().await;
    let registry = Registry::start().await;
    let creds = registry.dir.path().join("dockerconfig.json");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);

    let large_mib = std::env::var("BENCH_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024u64);
    let half = large_mib / 2;
    containerd
        .run_desktop("large", "pod-large", "1-large", "x-graphical")
        .await;
    containerd
        .exec(
            "large",
            &format!(
                "yes 'the quick brown fox jumps over the lazy desktop user 0123456789' | head -c {} > /root/text && \
                 dd if=/dev/urandom of=/root/random bs=1048576 count={half} 2>/dev/null && sync",
                half * 1024 * 1024
            ),
        )
        .await;
    containerd
        .run_desktop("small", "pod-small", "1-small", "x-graphical")
        .await;
    containerd
        .exec(
            "small",
            "mkdir -p /usr/share/big && cd /usr/share/big && for d in $(seq 1 100); do mkdir $d; for f in $(seq 1 200); do echo $d-$f > $d/$f; done; done",
        )
        .await;
    // the 20,000 files become part of the image the small change is made on:
    // snapshot them, start a desktop from that snapshot, change 1 MiB in it
    let ca = registry.ca_path();
    let prep = Sidecar::start_with(
        Target::at(
            &containerd,
            &registry,
            (&ca, &creds),
            "pod-small",
            REPO,
            "prep",
        ),
        None,
        &[("RUST_LOG", "warn")],
    )
    .await;
    prep.snapshot_done().await;
    prep.stop().await;
    let prep_tag = registry
        .tags(REPO)
        .await
        .into_iter()
        .find(|t| t.starts_with("prep-"))
        .expect("the prepared image");
    let large_rootfs = format!("{}/{REPO}:{prep_tag}", registry.host);
    containerd.pull(&large_rootfs, &registry).await;
    containerd
        .run_desktop_from(
            &large_rootfs,
            "small2",
            "pod-small2",
            "1-small2",
            "x-graphical",
        )
        .await;
    containerd
        .exec(
            "small2",
            "dd if=/dev/urandom of=/root/one-mib bs=1048576 count=1 2>/dev/null && sync",
        )
        .await;

    println!(
        "snapshot-sidecar benchmark: {large_mib} MiB large change set, {} cores, containerd {}, registry on loopback over TLS",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        containerd.ctr(&["version"]).await.unwrap_or_default().lines().find(|l| l.trim_start().starts_with("Version")).unwrap_or("").trim()
    );
    println!(
        "{:<36} {:>9} {:>10} {:>10} {:>12}",
        "run", "seconds", "MB/s", "peak RSS", "vs stock"
    );

    // BENCH_SIDECAR_LOG=info prints each run's log (where the time goes)
    let sidecar_log = std::env::var("BENCH_SIDECAR_LOG").unwrap_or_else(|_| "warn".to_string());
    for (set, container, mib) in [("large", "large", large_mib), ("small", "small2", 1)] {
        let stock = stock(&containerd, &registry, container).await;
        println!(
            "{:<36} {:>9.2} {:>10.1} {:>10} {:>12}",
            format!("{set}: ctr diff + skopeo copy"),
            stock,
            mib as f64 / stock,
            "-",
            "1.00"
        );
        for codec in ["gzip", "zstd"] {
            // each sidecar has a work directory of its own, as each pod has:
            // no record of an earlier run's capture, every run takes a whole snapshot
            let repository = run_repository(&format!("{set}-{codec}"));
            let sidecar = Sidecar::start_with(
                Target::at(
                    &containerd,
                    &registry,
                    (&ca, &creds),
                    &format!("pod-{container}"),
                    &repository,
                    &format!("{set}-{codec}"),
                ),
                None,
                &[("SNAPSHOT_COMPRESSION", codec), ("RUST_LOG", &sidecar_log)],
            )
            .await;
            let started = Instant::now();
            let steps = sidecar.snapshot().await;
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(
                steps.last().map(String::as_str),
                Some("done"),
                "{steps:?}\n{}",
                sidecar.log()
            );
            let rss = peak_rss_mib(sidecar.pid());
            println!(
                "{:<36} {:>9.2} {:>10.1} {:>9.0}M {:>11.2}x",
                format!("{set}: snapshot-sidecar {codec}"),
                seconds,
                mib as f64 / seconds,
                rss,
                stock / seconds
            );
            if sidecar_log != "warn" {
                println!("{}", sidecar.log());
            }
            sidecar.stop().await;
        }
    }
    freezes(
        &containerd,
        &registry,
        (&ca, &creds),
        large_mib,
        &sidecar_log,
    )
    .await;
    // the least any client can spend: the registry taking the random half (what
    // no codec shrinks) in one PUT
    let floor = registry_ingest(&registry, half * 1024 * 1024).await;
    println!(
        "{:<36} {:>9.2} {:>10.1}",
        format!("registry ingest alone: {half} MiB PUT"),
        floor,
        half as f64 / floor
    );
    containerd.stop().await;
}

/// The freeze and the click-to-tag time of each layer format, pre-copy off
/// and on, on the large change, on 1 MiB changed among 20,000 files of the
/// change, and on the large change while the desktop writes 20 MB/s.
async fn freezes(
    containerd: &Containerd,
    registry: &Registry,
    (ca, creds): (&std::path::Path, &std::path::Path),
    large_mib: u64,
    sidecar_log: &str,
) {
    containerd
        .run_desktop("many", "pod-many", "1-many", "x-graphical")
        .await;
    containerd
        .exec(
            "many",
            "mkdir -p /root/many && cd /root/many && for d in $(seq 1 100); do mkdir $d; for f in $(seq 1 200); do echo $d-$f > $d/$f; done; done && \
             dd if=/dev/urandom of=/root/one-mib bs=1048576 count=1 2>/dev/null && sync",
        )
        .await;
    // files written during the first pass are read again under the pause:
    // let the bench's own writes age past the racy window first
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!();
    println!("freeze and click-to-tag, pre-copy off -> on ({large_mib} MiB large change)");
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8}",
        "run",
        "freeze off",
        "freeze on",
        "layer off",
        "layer on",
        "tag off",
        "tag on",
        "cpu off",
        "cpu on"
    );
    let sets: [(&str, &str, bool); 4] = [
        ("large", "large", false),
        ("1 MiB over 20,000 files of the image", "small2", false),
        ("20,000 files + 1 MiB in the change", "many", false),
        ("large, desktop writing 20 MB/s", "large", true),
    ];
    for (n, (set, container, writing)) in sets.into_iter().enumerate() {
        if writing {
            // 2 MiB every 100 ms, over ten files in turn
            containerd
                .exec_detached(
                    container,
                    "mkdir -p /root/writer && i=0; while :; do i=$(( (i + 1) % 10 )); \
                     head -c 2097152 /dev/urandom > /root/writer/$i; usleep 100000; done",
                )
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        for codec in ["gzip", "zstd", "estargz"] {
            // (pre-copy on, freeze, layer, click-to-tag, CPU) of each run
            let mut figures = Vec::new();
            for (i, pre_copy) in ORDER.into_iter().enumerate() {
                let repository = run_repository(&format!("{n}-{container}-{codec}-{pre_copy}-{i}"));
                let sidecar = Sidecar::start_with(
                    Target::at(
                        containerd,
                        registry,
                        (ca, creds),
                        &format!("pod-{container}"),
                        &repository,
                        &format!("freeze-{container}-{codec}-{pre_copy}"),
                    ),
                    None,
                    &[
                        ("SNAPSHOT_LAYER_FORMAT", codec),
                        ("SNAPSHOT_PRE_COPY", pre_copy),
                        // info at least: the log says when the layer was ready
                        ("RUST_LOG", at_least_info(sidecar_log)),
                    ],
                )
                .await;
                // what earlier runs left for the disk to write (their pushes)
                // is written before the clock starts, not during this run
                sync();
                let started = Instant::now();
                let steps = sidecar.snapshot().await;
                let seconds = started.elapsed().as_secs_f64();
                assert_eq!(
                    steps.last().map(String::as_str),
                    Some("done"),
                    "{steps:?}\n{}",
                    sidecar.log()
                );
                let frozen = sidecar.paused_seconds().await;
                let cpu = cpu_seconds(sidecar.pid());
                let on = pre_copy == "true";
                figures.push((on, [frozen, layer_seconds(&sidecar.log()), seconds, cpu]));
                if sidecar_log != "warn" {
                    println!("{}", sidecar.log());
                }
                sidecar.stop().await;
            }
            let (off, on) = (mean(&figures, false), mean(&figures, true));
            let ms = |s: f64| format!("{:.0} ms", s * 1000.0);
            println!(
                "{:<40} {:>10} {:>10} {:>9.2}s {:>9.2}s {:>8.2}s {:>8.2}s {:>7.2}s {:>7.2}s",
                format!("{set}: {codec}"),
                ms(off[0]),
                ms(on[0]),
                off[1],
                on[1],
                off[2],
                on[2],
                off[3],
                on[3]
            );
        }
    }
}

/// The runs of each row, pre-copy off and on: each twice, in an order that
/// gives neither the place of the first run after the row before (which
/// pays for what that row left behind) nor the place of the last.
const ORDER: [&str; 4] = ["false", "true", "true", "false"];

/// Each figure's mean over the runs with pre-copy `on`.
fn mean(figures: &[(bool, [f64; 4])], on: bool) -> [f64; 4] {
    let runs: Vec<&[f64; 4]> = figures
        .iter()
        .filter(|(o, _)| *o == on)
        .map(|(_, f)| f)
        .collect();
    let mut sum = [0.0; 4];
    for run in &runs {
        for (s, f) in sum.iter_mut().zip(run.iter()) {
            *s += f;
        }
    }
    sum.map(|s| s / runs.len().max(1) as f64)
}

/// The sidecar's log level for a run whose log is read: `info` unless more
/// was asked.
fn at_least_info(asked: &str) -> &str {
    match asked {
        "warn" | "error" | "off" => "info",
        more => more,
    }
}

/// Seconds from the click to the layer ready to push (the log's "desktop
/// image generated"): what pre-copy changes; the upload after it is the same
/// bytes either way, and its time varies with the registry's disk.
fn layer_seconds(log: &str) -> f64 {
    harness::bench::log_lines(log, "desktop image generated")
        .first()
        .and_then(|l| l["elapsed_ms"].as_f64())
        .map_or(f64::NAN, |ms| ms / 1000.0)
}

/// Everything written so far on its way to the disk.
fn sync() {
    if let Err(e) = std::process::Command::new("sync").status() {
        eprintln!("sync: {e}");
    }
}

/// A repository of the run's own. Two runs over one desktop write the same
/// layer (pre-copy on and off give the same bytes): in one repository the
/// second would find the first's blob there and upload nothing, and its
/// click-to-tag would leave out the upload the first one paid for.
fn run_repository(run: &str) -> String {
    format!("{REPO}-{run}")
}

/// Seconds the registry takes to receive `bytes` random bytes in one PUT.
async fn registry_ingest(registry: &Registry, bytes: u64) -> f64 {
    let mut data = vec![0u8; bytes as usize];
    let mut random = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut random, &mut data).expect("random bytes");
    let started = Instant::now();
    registry.upload_whole(REPO, data).await;
    started.elapsed().as_secs_f64()
}

/// The stock tools' time for the same work: diff with containerd's gzip, take the
/// blob out, write an OCI layout around it, push with skopeo.
async fn stock(containerd: &Containerd, registry: &Registry, container: &str) -> f64 {
    let info: serde_json::Value = serde_json::from_str(
        &containerd
            .ctr(&["containers", "info", container])
            .await
            .expect("container info"),
    )
    .expect("json");
    let key = info["SnapshotKey"]
        .as_str()
        .expect("snapshot key")
        .to_string();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    // ctr writes the gzip layer containerd made to stdout
    let raw = dir.path().join("layer.tar.gz");
    let diff = tokio::process::Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args([
            "--namespace",
            &containerd.namespace,
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "diff",
        ])
        .args([
            "--media-type",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &key,
        ])
        .stdout(std::fs::File::create(&raw).expect("layer file"))
        .status()
        .await
        .expect("ctr snapshots diff");
    assert!(diff.success(), "ctr snapshots diff failed");
    let digest = {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(&raw).expect("layer");
        std::io::copy(&mut f, &mut hasher).expect("hashing the layer");
        format!("sha256:{}", hex::encode(hasher.finalize()))
    };
    let layer_path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::rename(&raw, &layer_path).expect("moving the layer");
    let size = std::fs::metadata(&layer_path).map(|m| m.len()).unwrap_or(0);
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})).expect("bench setup");
    let cfg_digest = harness::oci::sha256(&config);
    std::fs::write(layout.join("blobs/sha256").join(&cfg_digest[7..]), &config)
        .expect("bench setup");
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}]}))
    .expect("bench setup");
    let man_digest = harness::oci::sha256(&manifest);
    std::fs::write(
        layout.join("blobs/sha256").join(&man_digest[7..]),
        &manifest,
    )
    .expect("bench setup");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("bench setup");
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest, "size": manifest.len()}]})).expect("bench setup"),
    )
    .expect("bench setup");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("bench setup");
    std::fs::copy(registry.ca_path(), certs.join("ca.crt")).expect("bench setup");
    let status = tokio::process::Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            "--dest-cert-dir",
        ])
        .arg(&certs)
        .arg(format!("oci:{}", layout.display()))
        .arg(format!(
            "docker://{}/{REPO}:stock-{container}",
            registry.host
        ))
        .status()
        .await
        .expect("skopeo");
    assert!(status.success(), "skopeo copy failed");
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(100)).await;
    seconds
}

/// CPU time the sidecar has spent, user and system, all its threads
/// (`/proc/<pid>/stat`'s utime and stime, in the kernel's USER_HZ of 100):
/// its own work, whatever the desktop's writer takes from the machine
/// meanwhile (the writer is frozen through a snapshot without pre-copy and
/// runs through one with it).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return f64::NAN };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // the fields after the command's name, which may hold spaces
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(String::from)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
