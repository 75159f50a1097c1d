//! `just bench` (increments part): what incremental snapshots save, with
//! `SNAPSHOT_INCREMENTAL=false` ("before": every layer holds the whole change
//! since the desktop started) and `true` ("after"), in one run, release
//! sidecar, zstd (the webhook's default format).
//!
//! - A session of 6 snapshots of one desktop: a change of 1 GiB of random
//!   data first (16 files of 64 MiB), then 10 MiB changed between two
//!   snapshots (a new 5 MiB file, and the one made before it written again
//!   whole: a file changed in part is carried whole): the bytes the sidecar
//!   uploaded (its `snapshot layer uploaded` lines, layers the registry did
//!   not hold), and how long each snapshot froze the desktop (its
//!   `snapshot_sidecar_paused_seconds`).
//! - A scheduled-like snapshot of a desktop whose upper directory holds
//!   20,000 entries, none changed since its last snapshot (the logoff's
//!   endpoint: a trigger that is not a click): the sidecar's CPU time across
//!   it (`/proc/<pid>/stat`), the freeze (its `paused_ms` log fields) and the
//!   requests the registry logged.
//!
//! Settings (env): `INCREMENT_FIRST_MIB` (1024), `INCREMENT_STEP_MIB` (10),
//! `INCREMENT_SNAPSHOTS` (6), `INCREMENT_ENTRIES` (20000).

use harness::bench::{env_or, log_lines};
use harness::sidecar::{Rig, Sidecar};
use std::time::Instant;

/// Bytes of layers the sidecar uploaded (not already in the registry).
fn uploaded(log: &str) -> u64 {
    log_lines(log, "snapshot layer uploaded")
        .iter()
        .filter(|l| l["already_there"] != true)
        .map(|l| l["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// CPU seconds a process has used (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command's closing parenthesis: utime is the 12th, stime the 13th
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A sidecar for the desktop of `pod`, zstd, increments `on` or off, with
/// `extra` settings (and, as every harness sidecar, a work directory of
/// its own).
async fn start(rig: &Rig, pod: &str, name: &str, on: bool, extra: &[(&str, &str)]) -> Sidecar {
    let mut env = vec![
        ("SNAPSHOT_INCREMENTAL", if on { "true" } else { "false" }),
        ("SNAPSHOT_LAYER_FORMAT", "zstd"),
    ];
    env.extend_from_slice(extra);
    Sidecar::start_with(rig.target(pod, name), None, &env).await
}

struct Session {
    pushed: Vec<u64>,
    /// How long each snapshot kept the desktop paused, ms.
    paused_ms: Vec<f64>,
}

/// Six snapshots of one desktop, increments `on` or off.
async fn session(rig: &Rig, on: bool, first: u64, step: u64, count: usize) -> Session {
    let name = if on { "after" } else { "before" };
    let (desk, pod) = (format!("desk-{name}"), format!("pod-{name}"));
    rig.containerd
        .run_desktop(&desk, &pod, &format!("12896316-{name}"), "x-graphical")
        .await;
    let sidecar = start(rig, &pod, name, on, &[("SNAPSHOT_MAX_LAYERS", "64")]).await;
    let files = (first / 64).max(1);
    rig.containerd
        .exec(
            &desk,
            &format!(
                "mkdir -p /root/big && for i in $(seq 1 {files}); do dd if=/dev/urandom of=/root/big/f$i bs=1048576 count=64 2>/dev/null; done"
            ),
        )
        .await;
    let (mut pushed, mut paused_ms) = (Vec::new(), Vec::new());
    let (mut before, mut paused_before) = (0, 0.0);
    for i in 1..=count {
        if i > 1 {
            let half = (step / 2).max(1);
            rig.containerd
                .exec(
                    &desk,
                    &format!(
                        "dd if=/dev/urandom of=/root/big/n{i} bs=1048576 count={half} 2>/dev/null && \
                         dd if=/dev/urandom of=/root/big/n{} bs=1048576 count={half} 2>/dev/null",
                        i - 1
                    ),
                )
                .await;
        }
        let steps = sidecar.snapshot_done().await;
        assert_eq!(steps.last().map(String::as_str), Some("done"), "{steps:?}");
        let total = uploaded(&sidecar.log());
        pushed.push(total - before);
        before = total;
        let paused = sidecar.paused_seconds().await;
        paused_ms.push((paused - paused_before) * 1000.0);
        paused_before = paused;
        eprintln!(
            "increment-bench {name}: snapshot {i} pushed {:.1} MiB, paused {:.0} ms",
            mib(pushed[i - 1]),
            paused_ms[i - 1]
        );
    }
    sidecar.stop().await;
    rig.containerd.remove(&desk).await;
    Session { pushed, paused_ms }
}

struct Idle {
    cpu: f64,
    elapsed: f64,
    paused_ms: u64,
    requests: usize,
    answer: String,
}

/// An unchanged desktop of `entries` entries, snapshotted by a trigger that
/// is not a click, increments `on` or off.
async fn idle(rig: &Rig, on: bool, entries: usize) -> Idle {
    let name = if on { "idle-after" } else { "idle-before" };
    let (desk, pod) = (format!("desk-{name}"), format!("pod-{name}"));
    rig.containerd
        .run_desktop(&desk, &pod, &format!("12896316-{name}"), "x-graphical")
        .await;
    let dirs = entries / 100;
    rig.containerd
        .exec(
            &desk,
            &format!(
                "for d in $(seq 1 {dirs}); do mkdir -p /root/t/d$d && for f in $(seq 1 99); do echo $d-$f > /root/t/d$d/f$f; done; done"
            ),
        )
        .await;
    let sidecar = start(rig, &pod, name, on, &[]).await;
    let steps = sidecar.snapshot_done().await;
    assert_eq!(steps.last().map(String::as_str), Some("done"), "{steps:?}");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let pid = sidecar.pid().expect("the sidecar's pid");
    let paused_before: u64 = log_lines(&sidecar.log(), "")
        .iter()
        .filter_map(|l| l["paused_ms"].as_u64())
        .sum();
    let (cpu, asked) = (cpu_seconds(pid), rig.registry.log().lines().count());
    let started = Instant::now();
    let (_, body) = sidecar.get("/snapshot/logoff").await;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = rig.registry.log().lines().count() - asked;
    let cpu = cpu_seconds(pid) - cpu;
    let paused_ms = log_lines(&sidecar.log(), "")
        .iter()
        .filter_map(|l| l["paused_ms"].as_u64())
        .sum::<u64>()
        - paused_before;
    sidecar.stop().await;
    rig.containerd.remove(&desk).await;
    Idle {
        cpu,
        elapsed,
        paused_ms,
        requests,
        answer: body["message"].as_str().unwrap_or_default().to_string(),
    }
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    let first: u64 = env_or("INCREMENT_FIRST_MIB", 1024);
    let step: u64 = env_or("INCREMENT_STEP_MIB", 10);
    let count: usize = env_or("INCREMENT_SNAPSHOTS", 6);
    let entries: usize = env_or("INCREMENT_ENTRIES", 20_000);
    let rig = Rig::new().await;
    let before = session(&rig, false, first, step, count).await;
    let after = session(&rig, true, first, step, count).await;
    let idle_before = idle(&rig, false, entries).await;
    let idle_after = idle(&rig, true, entries).await;

    let date = harness::bench::utc_now();
    println!(
        "snapshot-sidecar increment benchmark, {date}, {} cores, release sidecar, zstd; before: SNAPSHOT_INCREMENTAL=false, after: true",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "a session of {count} snapshots of one desktop: {first} MiB of random data first, then {step} MiB changed before each next one (a new file, the one before it written again); MiB uploaded, and how long each snapshot froze the desktop (pre-copy on)"
    );
    println!("snapshot    MiB before    MiB after    freeze before    freeze after");
    for i in 0..count {
        println!(
            "{:<8} {:>12.1} {:>12.1} {:>13.0} ms {:>12.0} ms",
            i + 1,
            mib(before.pushed[i]),
            mib(after.pushed[i]),
            before.paused_ms[i],
            after.paused_ms[i]
        );
    }
    let rest = |s: &Session| s.pushed.iter().skip(1).sum::<u64>();
    let changed = step * (count as u64 - 1);
    println!(
        "after the first {:>7.1} {:>12.1}   (changed: {changed} MiB; after/changed {:.3})",
        mib(rest(&before)),
        mib(rest(&after)),
        mib(rest(&after)) / changed as f64
    );
    println!(
        "an unchanged desktop of {entries} entries, snapshotted by a non-click trigger (the logoff endpoint)"
    );
    println!("                       before        after");
    println!(
        "sidecar CPU s    {:>12.3} {:>12.3}",
        idle_before.cpu, idle_after.cpu
    );
    println!(
        "answered in s    {:>12.3} {:>12.3}",
        idle_before.elapsed, idle_after.elapsed
    );
    println!(
        "paused ms        {:>12} {:>12}",
        idle_before.paused_ms, idle_after.paused_ms
    );
    println!(
        "registry lines   {:>12} {:>12}",
        idle_before.requests, idle_after.requests
    );
    println!(
        "answers: before {:?}; after {:?}",
        idle_before.answer, idle_after.answer
    );
    rig.containerd.stop().await;
}
