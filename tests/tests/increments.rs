//! Incremental snapshots (issue 18 §3): after the first snapshot of a
//! container, each adds to the last one a layer of what changed since it.
//! Every snapshot of a chain restores exactly the desktop at its capture,
//! through random changes, deletions, re-creations, type changes and opaque
//! directories, across a sidecar restart, a damaged record and the merge past
//! the layer limit; an unchanged desktop adds no tag.

use harness::{
    bench::log_lines,
    sidecar::{layers, Rig, Sidecar, RIG_REPO},
};
use std::path::Path;

/// A small deterministic generator (xorshift), seeded by the test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

/// Paths the changes play with: the user's own, and the base image's
/// (`/opt/base`, `/etc/base-file-*`), at several depths.
const PATHS: &[&str] = &[
    "/root/w",
    "/root/w/a",
    "/root/w/b",
    "/root/w/d",
    "/root/w/d/x",
    "/root/w/d/y",
    "/root/w/d/s/z",
    "/root/h1",
    "/root/h2",
    "/opt/base",
    "/opt/base/keep",
    "/opt/base/n",
    "/opt/w",
    "/opt/w/e",
    "/etc/base-file-to-change",
    "/etc/base-file-to-delete",
    "/etc/w",
];

/// A shell script of a few random changes (step `step`): files written,
/// appended, deleted; directories made, deleted, made again (over the base's:
/// opaque); a file becoming a directory, a link or a FIFO and back; hard
/// links; modes; renames. Every command may fail (its path may not fit it):
/// the desktop is whatever they leave.
fn changes(rng: &mut Rng, step: usize) -> String {
    let mut script = format!("echo {step} > /root/step; ");
    for _ in 0..(3 + rng.below(5)) {
        let p = rng.pick(PATHS);
        let q = rng.pick(PATHS);
        let parent = Path::new(p)
            .parent()
            .map_or("/".into(), |d| d.display().to_string());
        let v = rng.next() % 100_000;
        let op = match rng.below(10) {
            0 => format!("rm -rf {p}; mkdir -p {parent} && echo {v} > {p}"),
            1 => format!("echo {v} >> {p}"),
            2 => format!("rm -rf {p}"),
            3 => format!("rm -rf {p}; mkdir -p {p} && echo {v} > {p}/f{}", v % 3),
            4 => format!("rm -rf {p}; mkdir -p {parent} && ln -s /etc/os-release {p}"),
            5 => format!("rm -rf {p}; ln {q} {p}"),
            6 => format!("chmod {} {p}", ["600", "755", "640"][rng.below(3)]),
            7 => format!("mv {p} {q}"),
            8 => format!("rm -rf {p}; mkdir -p {parent} && mkfifo {p}"),
            _ => format!("rm -rf {p}; mkdir -p {p}"),
        };
        script.push_str(&format!("( {op} ) 2>/dev/null; "));
    }
    script.push_str("true");
    script
}

/// The record files in a sidecar's work directory.
fn records(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .expect("the work directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "record"))
        .collect()
}

fn count(log: &str, message: &str) -> usize {
    log_lines(log, message).len()
}

/// The desktop's tree ([`harness::containerd::Containerd::tree`]), asked
/// again when an exec came back empty (a loaded machine loses one at times;
/// a desktop always has `/etc`).
async fn tree(rig: &Rig, id: &str) -> String {
    for _ in 0..3 {
        let tree = rig.containerd.tree(id).await;
        if !tree.trim().is_empty() {
            return tree;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    panic!("the tree of {id} stays empty")
}

const INCREMENT: &str = "increment read from the upper directory";

#[tokio::test]
async fn every_snapshot_of_a_chain_restores_the_desktop_at_its_capture() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk-i", "pod-i", "12896316-iiiii", "x-graphical")
        .await;
    let work = tempfile::tempdir().expect("a work directory");
    let work_dir = work.path().to_string_lossy().into_owned();
    // a limit the chain crosses twice: the merge above the base runs
    let env = [
        ("SNAPSHOT_WORK_DIR", work_dir.as_str()),
        ("SNAPSHOT_MAX_LAYERS", "6"),
    ];
    let start = || Sidecar::start_with(rig.target("pod-i", "inc"), None, &env);
    let mut sidecar = start().await;
    let mut logs = String::new();
    let mut rng = Rng(0x18_2026);
    let mut captures: Vec<(String, String)> = Vec::new();
    rig.containerd
        .exec("desk-i", "echo stays > /root/stable")
        .await;
    for step in 1..=20 {
        rig.containerd
            .exec("desk-i", &changes(&mut rng, step))
            .await;
        if step == 11 {
            // a restarted sidecar goes on with the chain
            logs.push_str(&sidecar.log());
            sidecar.stop().await;
            sidecar = start().await;
        }
        if step == 15 {
            // a damaged record: a full layer, never a wrong one
            for path in records(work.path()) {
                let mut bytes = std::fs::read(&path).expect("the record");
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x55;
                std::fs::write(&path, bytes).expect("damaging the record");
            }
        }
        let steps = sidecar.snapshot_done().await;
        assert_eq!(
            steps.last().map(String::as_str),
            Some("done"),
            "step {step}: {steps:?}\n{}",
            sidecar.log()
        );
        let tag = rig.tags("inc").await.pop().expect("a tag");
        assert!(
            captures.iter().all(|(t, _)| *t != tag),
            "step {step}: a new tag"
        );
        captures.push((tag, tree(&rig, "desk-i").await));
    }
    logs.push_str(&sidecar.log());
    assert_eq!(
        count(&logs, INCREMENT),
        18,
        "every snapshot but the first and the one after the damage is an increment\n{logs}"
    );
    assert_eq!(
        count(&logs, "no usable record of the last capture"),
        2,
        "{logs}"
    );
    assert!(logs.contains("the record is damaged"), "{logs}");
    assert!(
        count(&logs, "layer limit reached: merging the user's layers") >= 2,
        "{logs}"
    );

    // an increment holds what changed, not what stayed
    for (tag, _) in captures.iter().skip(1).take(4) {
        let image = layers(&rig.registry, RIG_REPO, tag).await;
        let last = image.last().expect("a layer");
        assert!(
            !last.iter().any(|(p, _)| p == "root/stable"),
            "{tag}: {:?}",
            last.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    }

    for (i, (tag, live)) in captures.iter().enumerate() {
        let image = format!("{}/{RIG_REPO}:{tag}", rig.registry.host);
        rig.containerd.pull(&image, &rig.registry).await;
        let id = format!("restored-{i}");
        rig.containerd
            .run_desktop_from(
                &image,
                &id,
                &format!("pod-r{i}"),
                &format!("r{i}"),
                "x-graphical",
            )
            .await;
        let restored = tree(&rig, &id).await;
        if restored != *live {
            let (l, r): (Vec<&str>, Vec<&str>) =
                (live.lines().collect(), restored.lines().collect());
            let missing: Vec<_> = l.iter().filter(|x| !r.contains(x)).collect();
            let extra: Vec<_> = r.iter().filter(|x| !l.contains(x)).collect();
            let image = layers(&rig.registry, RIG_REPO, tag).await;
            let names: Vec<Vec<&str>> = image
                .iter()
                .skip(1)
                .map(|l| l.iter().map(|(p, _)| p.as_str()).collect())
                .collect();
            panic!(
                "snapshot {} ({tag}) restores another desktop: at the capture only {missing:?}, restored only {extra:?}; its layers above the base: {names:?}\n{logs}",
                i + 1
            );
        }
        rig.containerd.remove(&id).await;
    }
    sidecar.stop().await;
    rig.containerd.stop().await;
}

/// Restores each `(tag, tree)` capture and compares the desktop with it.
async fn each_restores_its_capture(rig: &Rig, captures: &[(String, String)], log: &str) {
    for (i, (tag, live)) in captures.iter().enumerate() {
        let image = format!("{}/{RIG_REPO}:{tag}", rig.registry.host);
        rig.containerd.pull(&image, &rig.registry).await;
        let id = format!("restored-l{i}");
        rig.containerd
            .run_desktop_from(&image, &id, &format!("pod-rl{i}"), &id, "x-graphical")
            .await;
        let restored = tree(rig, &id).await;
        assert!(
            restored == *live,
            "snapshot {} ({tag}) restores another desktop:\n{restored}\nat the capture:\n{live}\n{log}",
            i + 1
        );
        rig.containerd.remove(&id).await;
    }
}

/// With pre-copy (the default), an increment is read while the desktop
/// runs and the pause reads again only what moved since: a large file
/// installed since the last snapshot is not read under the pause. Each
/// snapshot restores the desktop at its capture.
#[tokio::test]
async fn a_large_increment_is_read_while_the_desktop_runs() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk-l", "pod-l", "12896316-lllll", "x-graphical")
        .await;
    let work = tempfile::tempdir().expect("a work directory");
    let work_dir = work.path().to_string_lossy().into_owned();
    let sidecar = Sidecar::start_with(
        rig.target("pod-l", "large"),
        None,
        &[("SNAPSHOT_WORK_DIR", work_dir.as_str())],
    )
    .await;
    let mut captures: Vec<(String, String)> = Vec::new();
    let changes = [
        "mkdir -p /root/d && echo 1 > /root/d/f && echo gone > /root/d/g",
        // 96 MiB installed, a file changed, one deleted
        "mkdir -p /opt/installed && head -c 100663296 /dev/urandom > /opt/installed/big && \
         echo 2 > /root/d/f && rm /root/d/g",
        // the large file deleted: its whiteout
        "rm -rf /opt/installed && echo 3 > /root/d/f",
    ];
    for (step, change) in changes.iter().enumerate() {
        rig.containerd.exec("desk-l", change).await;
        // older than the clock's tick when the snapshot reads it
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let steps = sidecar.snapshot_done().await;
        assert_eq!(
            steps.last().map(String::as_str),
            Some("done"),
            "step {step}: {steps:?}\n{}",
            sidecar.log()
        );
        let tag = rig.tags("large").await.pop().expect("a tag");
        captures.push((tag, tree(&rig, "desk-l").await));
    }
    let log = sidecar.log();
    let increments = log_lines(&log, INCREMENT);
    assert_eq!(increments.len(), 2, "{log}");
    for (line, whiteouts) in increments.iter().zip([1, 1]) {
        assert_eq!(
            line["read_again"], 0,
            "an idle desktop: nothing read again under the pause\n{log}"
        );
        assert_eq!(line["whiteouts"], whiteouts, "{line}");
        assert!(line["paused_ms"].is_u64(), "{line}");
        assert!(line["first_pass_ms"].is_u64(), "{line}");
    }
    for line in &increments {
        eprintln!(
            "increment: {} picked, {} whiteouts, {} bytes, first pass {} ms, paused {} ms, read again {}",
            line["picked"], line["whiteouts"], line["compressed_bytes"], line["first_pass_ms"], line["paused_ms"], line["read_again"]
        );
    }
    let big = &increments[0];
    assert!(
        big["compressed_bytes"].as_u64().unwrap_or_default() > 90 << 20,
        "the large file is in the increment, read by the first pass: {big}"
    );
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("snapshot_sidecar_paused_seconds_count 3"),
        "every freeze is counted\n{metrics}"
    );
    let image = layers(&rig.registry, RIG_REPO, &captures[1].0).await;
    assert!(
        image
            .last()
            .expect("a layer")
            .iter()
            .any(|(p, _)| p == "opt/installed/big"),
        "the second snapshot's increment holds the large file"
    );
    each_restores_its_capture(&rig, &captures, &log).await;
    sidecar.stop().await;
    rig.containerd.stop().await;
}

#[tokio::test]
async fn nothing_changed_adds_no_tag_and_a_click_gets_the_newest() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk-u", "pod-u", "12896316-uuuuu", "x-graphical")
        .await;
    let work = tempfile::tempdir().expect("a work directory");
    let work_dir = work.path().to_string_lossy().into_owned();
    let sidecar = Sidecar::start_with(
        rig.target("pod-u", "same"),
        None,
        &[("SNAPSHOT_WORK_DIR", work_dir.as_str())],
    )
    .await;
    rig.containerd
        .exec("desk-u", "mkdir -p /root/d && echo 1 > /root/d/f")
        .await;
    let (_, steps) = sidecar.snapshot_with_id().await;
    assert_eq!(steps.last().map(String::as_str), Some("done"), "{steps:?}");
    let first = rig.tags("same").await;
    assert_eq!(first.len(), 1);
    assert_eq!(records(work.path()).len(), 1, "the record is kept");

    // a click with nothing new: the newest tag answers, no new tag
    let (id, steps) = sidecar.snapshot_with_id().await;
    assert_eq!(steps.last().map(String::as_str), Some("done"), "{steps:?}");
    let (_, op) = sidecar.get("/snapshots").await;
    let answered = op["message"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["session_id"] == id.as_str()))
        .and_then(|o| o["image"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        answered.contains(&format!(":{}@sha256:", first[0])),
        "the click's answer is the newest tag: {answered:?}\n{op}"
    );
    assert_eq!(rig.tags("same").await, first);

    // a logoff with nothing new: no tag, no registry request
    let asked = rig.registry.log().matches("/v2/").count();
    let (status, body) = sidecar.get("/snapshot/logoff").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["message"], "nothing changed since the last snapshot: no new tag",
        "{body}"
    );
    assert_eq!(
        rig.registry.log().matches("/v2/").count(),
        asked,
        "the registry was not asked anything"
    );
    assert_eq!(rig.tags("same").await, first);
    assert!(
        sidecar
            .log()
            .contains("the upper directory compared with the record of the last capture"),
        "{}",
        sidecar.log()
    );
    sidecar.stop().await;
    rig.containerd.stop().await;
}
