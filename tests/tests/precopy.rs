//! Consistency under load: a desktop process writes as fast as it can while
//! its snapshot is taken (numbered records appended to four files in a fixed
//! order, files and directories created, deleted and renamed, a bulk file
//! rewritten and swapped in); the restored desktop must be a state the writer
//! really passed through at one instant. For pre-copy on and off, the upper
//! directory and the Diff service, gzip, zstd and eStargz.

use harness::sidecar::{Rig, Sidecar, RIG_REPO};
use std::collections::{BTreeMap, BTreeSet};

/// The writer, a loop of steps; step `n` does, in this order, the operations
/// [`Model::apply`] replays (`rm -rf dirs/$o` is two: the file, then its
/// directory; a freeze can fall between them).
const WRITER: &str = "cd /root/w && n=0; while :; do n=$((n+1)); p=$((n-1)); o=$((n-3)); \
     echo $n >> f0; echo $n >> f1; echo $n >> f2; echo $n >> f3; \
     echo $n > new/$n; rm -f new/$o; \
     mkdir dirs/$n; echo $n > dirs/$n/x; rm -rf dirs/$o; \
     mv tag.$p tag.$n; \
     yes $n | head -c 100000 > bulk.tmp; mv bulk.tmp bulk; done";

/// Operations in one step.
const OPS: usize = 13;

/// What the writer's directory holds: files and their contents, directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tree {
    files: BTreeMap<String, String>,
    dirs: BTreeSet<String>,
}

/// The writer's directory after `steps` whole steps and `ops` operations of
/// the next; the file the last operation wrote, if any (it may hold any
/// prefix of its content: the cut fell inside the write).
struct Model {
    tree: Tree,
    writing: Option<String>,
}

impl Model {
    fn after(steps: u64, ops: usize) -> Self {
        let mut m = Model {
            tree: Tree::default(),
            writing: None,
        };
        for d in [".", "./new", "./dirs"] {
            m.tree.dirs.insert(d.to_string());
        }
        for f in ["./f0", "./f1", "./f2", "./f3"] {
            m.tree.files.insert(f.to_string(), String::new());
        }
        m.tree.files.insert("./tag.0".into(), "tag\n".into());
        for n in 1..=steps + 1 {
            let last = if n == steps + 1 { ops } else { OPS };
            for op in 0..last {
                m.apply(n, op);
            }
        }
        m
    }

    fn apply(&mut self, n: u64, op: usize) {
        let files = &mut self.tree.files;
        let line = format!("{n}\n");
        let o = n as i64 - 3;
        self.writing = None;
        let written = match op {
            0..=3 => {
                let f = format!("./f{op}");
                files.entry(f.clone()).or_default().push_str(&line);
                Some(f)
            }
            4 => {
                files.insert(format!("./new/{n}"), line);
                Some(format!("./new/{n}"))
            }
            5 => {
                files.remove(&format!("./new/{o}"));
                None
            }
            6 => {
                self.tree.dirs.insert(format!("./dirs/{n}"));
                None
            }
            7 => {
                files.insert(format!("./dirs/{n}/x"), line);
                Some(format!("./dirs/{n}/x"))
            }
            8 => {
                files.remove(&format!("./dirs/{o}/x"));
                None
            }
            9 => {
                self.tree.dirs.remove(&format!("./dirs/{o}"));
                None
            }
            10 => {
                if let Some(tag) = files.remove(&format!("./tag.{}", n - 1)) {
                    files.insert(format!("./tag.{n}"), tag);
                }
                None
            }
            11 => {
                let bulk: String = line.repeat(100_000 / line.len() + 1)[..100_000].to_string();
                files.insert("./bulk.tmp".into(), bulk);
                Some("./bulk.tmp".into())
            }
            _ => {
                if let Some(bulk) = files.remove("./bulk.tmp") {
                    files.insert("./bulk".into(), bulk);
                }
                None
            }
        };
        self.writing = written;
    }

    /// Whether `tree` is this state (the file being written holding a prefix).
    fn matches(&self, tree: &Tree) -> bool {
        if tree.dirs != self.tree.dirs || tree.files.keys().ne(self.tree.files.keys()) {
            return false;
        }
        tree.files.iter().all(|(path, got)| {
            let want = &self.tree.files[path];
            got == want || (self.writing.as_deref() == Some(path) && want.starts_with(got.as_str()))
        })
    }
}

/// The state of the writer's directory a restored tree is, as (whole steps,
/// operations of the next); `None` if the writer never passed through it.
fn state_of(tree: &Tree) -> Option<(u64, usize)> {
    let records = tree.files.get("./f0")?.lines().count() as u64;
    for steps in records.saturating_sub(1)..=records {
        for ops in 0..=OPS {
            if Model::after(steps, ops).matches(tree) {
                return Some((steps, ops));
            }
        }
    }
    None
}

/// A tree in a line: its directories, and each file's size and last line.
fn summary(tree: &Tree) -> String {
    let files: Vec<String> = tree
        .files
        .iter()
        .map(|(path, data)| {
            let last = data.lines().last().unwrap_or("");
            format!("{path} ({} bytes, last line {last:?})", data.len())
        })
        .collect();
    format!("dirs {:?}, files {files:?}", tree.dirs)
}

/// Parses the dump [`DUMP`] prints: `=d <dir>` lines, then `=f <file>
/// <bytes>` lines each followed by that many bytes and a newline (a file's
/// content need not end with one).
fn parse(dump: &str) -> Tree {
    let mut tree = Tree::default();
    let mut rest = dump;
    while let Some((line, after)) = rest.split_once('\n') {
        rest = after;
        if let Some(dir) = line.strip_prefix("=d ") {
            tree.dirs.insert(dir.to_string());
        } else if let Some(file) = line.strip_prefix("=f ") {
            let (name, size) = file.rsplit_once(' ').expect("=f <file> <bytes>");
            let size: usize = size.trim().parse().expect("a size");
            tree.files
                .insert(name.to_string(), rest[..size].to_string());
            rest = rest[size..].strip_prefix('\n').unwrap_or(&rest[size..]);
        }
    }
    tree
}

const DUMP: &str = "cd /root/w && for d in $(find . -type d | sort); do echo \"=d $d\"; done; \
     for f in $(find . -type f | sort); do echo \"=f $f $(wc -c < $f)\"; cat $f; echo; done";

#[test]
fn the_model_knows_the_writers_states() {
    let m = Model::after(5, 4);
    assert_eq!(m.tree.files["./f3"], "1\n2\n3\n4\n5\n6\n");
    assert!(!m.tree.files.contains_key("./new/6"), "written at op 4");
    assert!(m.tree.files.contains_key("./new/3"), "removed at op 5");
    assert!(m.tree.files.contains_key("./tag.5"));
    assert_eq!(state_of(&m.tree), Some((5, 4)));
    // a cut inside the bulk write: a prefix of it
    let mut t = Model::after(7, 12).tree;
    t.files.get_mut("./bulk.tmp").unwrap().truncate(4096);
    assert_eq!(state_of(&t), Some((7, 12)));
    // a cut inside `rm -rf`: the file gone, its directory still there
    let t = Model::after(7, 9).tree;
    assert!(t.dirs.contains("./dirs/5") && !t.files.contains_key("./dirs/5/x"));
    assert_eq!(state_of(&t), Some((7, 9)));
    // f2 ahead of f1: never a state of the writer
    let mut t = Model::after(7, 1).tree;
    t.files.get_mut("./f2").unwrap().push_str("8\n");
    assert_eq!(state_of(&t), None);
    // a file of a later step without the records before it
    let mut t = Model::after(7, 3).tree;
    t.files.insert("./new/8".into(), "8\n".into());
    assert_eq!(state_of(&t), None);
    let dump = "=d .\n=d ./dirs\n=d ./new\n=f ./f0 0\n\n=f ./f1 0\n\n=f ./f2 0\n\n=f ./f3 0\n\n=f ./tag.0 4\ntag\n\n";
    assert_eq!(state_of(&parse(dump)), Some((0, 0)));
    // a file whose content does not end with a newline
    let t = parse("=d .\n=f ./bulk 4\n1\n22\n=f ./f0 2\n1\n\n");
    assert_eq!(t.files["./bulk"], "1\n22");
    assert_eq!(t.files["./f0"], "1\n");
}

/// Records the writer has appended to f0 so far.
async fn records(rig: &Rig, id: &str) -> u64 {
    rig.containerd
        .exec(id, "wc -l < /root/w/f0")
        .await
        .trim()
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn a_desktop_writing_during_its_snapshot_restores_to_one_instant() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk-w", "pod-w", "pod-w-name", "x-graphical")
        .await;
    // a change large enough that reading it takes a while, then the writer
    rig.containerd
        .exec(
            "desk-w",
            "mkdir -p /root/w/new /root/w/dirs && cd /root/w && echo tag > tag.0 && \
             : > f0 && : > f1 && : > f2 && : > f3 && \
             head -c 50000000 /dev/urandom > /root/ballast && \
             mkdir -p /opt/many && for i in $(seq 1 2000); do echo $i > /opt/many/$i; done",
        )
        .await;
    rig.containerd.exec_detached("desk-w", WRITER).await;
    let mut checked = 0;
    for codec in ["gzip", "zstd", "estargz"] {
        for (source, pre_copy) in [
            ("auto", "true"),
            ("auto", "false"),
            ("diff-service", "true"),
        ] {
            let what = format!("{codec}, {source}, pre-copy {pre_copy}");
            let prefix = format!("w{checked}");
            let sidecar = Sidecar::start_with(
                rig.target("pod-w", &prefix),
                None,
                &[
                    ("SNAPSHOT_LAYER_FORMAT", codec),
                    ("SNAPSHOT_LAYER_SOURCE", source),
                    ("SNAPSHOT_PRE_COPY", pre_copy),
                ],
            )
            .await;
            let before = records(&rig, "desk-w").await;
            let steps = sidecar.snapshot_done().await;
            let log = sidecar.log();
            let after = records(&rig, "desk-w").await;
            let metrics = sidecar.metrics().await;
            sidecar.stop().await;
            assert!(
                metrics.contains("snapshot_sidecar_paused_seconds_count 1"),
                "{what}: every freeze is counted\n{metrics}"
            );
            let used = if source == "auto" {
                "upperdir"
            } else {
                "diff-service"
            };
            assert!(
                metrics.contains(&format!(
                    "snapshot_sidecar_layers_total{{source=\"{used}\"}} 1"
                )),
                "{what}: {steps:?}\n{metrics}\n{log}"
            );
            assert_eq!(
                log.contains("read again under the pause"),
                source == "auto" && pre_copy == "true",
                "{what}: pre-copy ran where it is on\n{log}"
            );
            let tags = rig.tags(&prefix).await;
            let image = format!("{}/{RIG_REPO}:{}", rig.registry.host, tags[0]);
            rig.containerd.pull(&image, &rig.registry).await;
            let id = format!("restored-{checked}");
            rig.containerd
                .run_desktop_from(&image, &id, &format!("pod-r{checked}"), &id, "x-graphical")
                .await;
            let tree = parse(&rig.containerd.exec(&id, DUMP).await);
            rig.containerd.remove(&id).await;
            let Some((steps_done, ops)) = state_of(&tree) else {
                panic!(
                    "{what}: the restored desktop is no state the writer passed through: {}\n{log}",
                    summary(&tree)
                )
            };
            assert!(
                before <= steps_done + 1 && steps_done <= after,
                "{what}: the cut fell while the snapshot ran ({before} <= {steps_done} <= {after})"
            );
            eprintln!(
                "{what}: restored at step {steps_done} + {ops} operations ({before}..{after})"
            );
            checked += 1;
        }
    }
    rig.containerd.stop().await;
}
