//! Snapshots on a schedule (issue 18 §4): the real sidecar with `SNAPSHOT_EVERY`,
//! desktops of one containerd, a real registry. Several desktops do not freeze
//! together, an unchanged desktop adds no tag, a click during a scheduled
//! snapshot joins it and the schedule waits for a click's: never two
//! operations at once, as the sidecar's list of operations shows.

use harness::sidecar::{Rig, Sidecar, RIG_REPO};
use serde_json::Value;
use snapshot_tags::provenance::TRIGGER;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the front end reads when a snapshot found nothing new.
const UNCHANGED: &str = "nothing changed since the last snapshot: no new tag";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn finished(op: &Value) -> bool {
    matches!(op["step"].as_str(), Some("Done" | "Error"))
}

fn scheduled(op: &Value) -> bool {
    op["trigger"] == "schedule"
}

/// The sidecar's operations, oldest first; panics when two run at once.
async fn operations(sidecar: &Sidecar) -> Vec<Value> {
    let (status, v) = sidecar.get("/snapshots").await;
    assert_eq!(status, 200, "{v}");
    let mut ops = v["message"].as_array().cloned().unwrap_or_default();
    ops.sort_by_key(|op| op["started"].as_u64());
    let running: Vec<&Value> = ops.iter().filter(|op| !finished(op)).collect();
    assert!(
        running.len() <= 1,
        "two operations at once: {running:#?}\n{}",
        sidecar.log()
    );
    ops
}

/// Polls the operations until `found` says what it waited for; the sidecar is
/// declared stuck only after `limit`.
async fn until<T>(sidecar: &Sidecar, limit: Duration, found: impl Fn(&[Value]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let ops = operations(sidecar).await;
        if let Some(t) = found(&ops) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not seen within {limit:?}: {ops:#?}\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn manifest_trigger(rig: &Rig, tag: &str) -> String {
    let (manifest, _) = rig.registry.manifest_and_config(RIG_REPO, tag).await;
    manifest["annotations"][TRIGGER]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn jitter_spreads_the_first_scheduled_snapshots_of_a_nodes_desktops() {
    const DESKTOPS: usize = 5;
    let every = Duration::from_secs(8);
    let rig = Rig::new().await;
    let mut sidecars = Vec::new();
    for i in 0..DESKTOPS {
        let (desk, pod, user) = (format!("desk-{i}"), format!("pod-{i}"), format!("u{i}"));
        rig.containerd
            .run_desktop(&desk, &pod, &format!("{i}-pod"), "x-graphical")
            .await;
        rig.containerd
            .exec(&desk, &format!("echo {i} > /root/mine"))
            .await;
        let launched = now_ms();
        let sidecar =
            Sidecar::start_with(rig.target(&pod, &user), None, &[("SNAPSHOT_EVERY", "8s")]).await;
        sidecars.push((user, launched, sidecar));
    }
    // each desktop's first scheduled snapshot, from its sidecar's start
    let mut offsets = Vec::new();
    for (user, launched, sidecar) in &sidecars {
        let first = until(sidecar, Duration::from_secs(180), |ops| {
            ops.iter().find(|op| scheduled(op) && finished(op)).cloned()
        })
        .await;
        assert_eq!(first["step"], "Done", "{first}\n{}", sidecar.log());
        assert!(first["image"].is_string(), "the change was pushed: {first}");
        let started = first["started"].as_u64().expect("a start time");
        offsets.push(started.saturating_sub(*launched));
        let tags = rig.tags(user).await;
        assert_eq!(tags.len(), 1, "{user}: {tags:?}");
        assert_eq!(manifest_trigger(&rig, &tags[0]).await, "schedule");
    }
    // without jitter each would come one interval after its sidecar started;
    // with it they are spread over the interval (five draws within 1/20 of
    // it: a chance in 30,000)
    eprintln!("first scheduled snapshots {offsets:?} ms after their sidecars started");
    let spread = offsets.iter().max().unwrap_or(&0) - offsets.iter().min().unwrap_or(&0);
    assert!(
        spread >= every.as_millis() as u64 / 20,
        "the first scheduled snapshots came {offsets:?} ms after their sidecars started"
    );
    for (_, _, sidecar) in &sidecars {
        let metrics = sidecar.metrics().await;
        assert!(
            metrics
                .contains("snapshot_sidecar_snapshots_total{trigger=\"schedule\",result=\"done\"}"),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn an_unchanged_desktop_adds_no_tag_on_schedule() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk", "pod-u", "u-pod", "x-graphical")
        .await;
    rig.containerd.exec("desk", "echo 1 > /root/version").await;
    let sidecar = Sidecar::start_with(
        rig.target("pod-u", "uma"),
        None,
        &[("SNAPSHOT_EVERY", "2s")],
    )
    .await;
    let limit = Duration::from_secs(120);
    // the first pushes the change
    let first = until(&sidecar, limit, |ops| {
        ops.iter().find(|op| scheduled(op) && finished(op)).cloned()
    })
    .await;
    assert!(first["image"].is_string(), "{first}\n{}", sidecar.log());
    // then nothing changes: the next ones end without a push
    let quiet = until(&sidecar, limit, |ops| {
        let after: Vec<Value> = ops
            .iter()
            .filter(|op| {
                scheduled(op) && finished(op) && op["started"].as_u64() > first["started"].as_u64()
            })
            .cloned()
            .collect();
        (after.len() >= 2).then_some(after)
    })
    .await;
    for op in &quiet {
        assert_eq!(
            (op["step"].as_str(), op["message"].as_str()),
            (Some("Done"), Some(UNCHANGED)),
            "{op}"
        );
        assert!(op["image"].is_null(), "{op}");
    }
    assert_eq!(rig.tags("uma").await.len(), 1);
    // a change: the next one pushes it
    rig.containerd.exec("desk", "echo 2 > /root/version").await;
    let since = now_ms();
    until(&sidecar, limit, |ops| {
        ops.iter()
            .find(|op| {
                scheduled(op)
                    && finished(op)
                    && op["image"].is_string()
                    && op["started"].as_u64() > Some(since)
            })
            .cloned()
    })
    .await;
    let tags = rig.tags("uma").await;
    assert_eq!(tags.len(), 2, "{tags:?}");
    let metrics = sidecar.metrics().await;
    for (result, at_least) in [("done", 2), ("unchanged", 2)] {
        let line = format!(
            "snapshot_sidecar_snapshots_total{{trigger=\"schedule\",result=\"{result}\"}} "
        );
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(count >= at_least, "{result}: {metrics}");
    }
    assert!(
        !metrics.contains("trigger=\"click\""),
        "no click was counted: {metrics}"
    );
}

#[tokio::test]
async fn a_click_during_a_scheduled_snapshot_joins_it_and_the_schedule_waits_for_a_click() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk", "pod-c", "c-pod", "x-graphical")
        .await;
    // a change that takes a while to read, compress and push
    let big = "dd if=/dev/urandom of=/root/big bs=1048576 count=64 2>/dev/null; sync";
    rig.containerd.exec("desk", big).await;
    let sidecar = Sidecar::start_with(
        rig.target("pod-c", "cleo"),
        None,
        &[("SNAPSHOT_EVERY", "1s")],
    )
    .await;
    let limit = Duration::from_secs(180);

    // a click while a scheduled snapshot runs: answered with that operation
    // (tried again when the scheduled one ended between the two requests and
    // the click started its own)
    let mut tries = 0;
    let ended = loop {
        tries += 1;
        assert!(tries <= 5, "never clicked during a scheduled snapshot");
        let running = until(&sidecar, limit, |ops| {
            ops.iter()
                .find(|op| scheduled(op) && !finished(op))
                .cloned()
        })
        .await;
        let clicked = sidecar.post("/snapshot").await;
        let id = clicked["session_id"]
            .as_str()
            .expect("a session id")
            .to_string();
        let ended = until(&sidecar, limit, |ops| {
            ops.iter()
                .find(|op| op["session_id"] == id.as_str() && finished(op))
                .cloned()
        })
        .await;
        if clicked["message"] == "snapshot process already running" {
            assert_eq!(clicked["session_id"], running["session_id"], "{clicked}");
            break ended;
        }
    };
    assert_eq!(ended["step"], "Done", "{ended}\n{}", sidecar.log());
    assert!(ended["image"].is_string(), "the click got a tag: {ended}");
    assert_eq!(
        (&ended["trigger"], &ended["joined_by"]),
        (&Value::from("schedule"), &Value::from("click")),
        "{ended}"
    );
    let tags = rig.tags("cleo").await;
    assert_eq!(
        manifest_trigger(&rig, tags.last().expect("a tag")).await,
        "click",
        "the joined snapshot is the user's"
    );

    // a click of its own (at once after the last ended, or after a scheduled
    // one it joined): the schedule, due every second, waits for its end
    let own = loop {
        let clicked = sidecar.post("/snapshot").await;
        let id = clicked["session_id"]
            .as_str()
            .expect("a session id")
            .to_string();
        let op = until(&sidecar, limit, |ops| {
            ops.iter()
                .find(|op| op["session_id"] == id.as_str() && finished(op))
                .cloned()
        })
        .await;
        if op["trigger"] == "click" {
            break op;
        }
    };
    assert_eq!(own["step"], "Done", "{own}");
    // the schedule goes on after it
    until(&sidecar, limit, |ops| {
        ops.iter()
            .find(|op| {
                scheduled(op) && finished(op) && op["started"].as_u64() > own["started"].as_u64()
            })
            .cloned()
    })
    .await;
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("snapshot_sidecar_snapshots_total{trigger=\"click\",result=\"done\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_logoff_ends_the_schedule() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk", "pod-l", "l-pod", "x-graphical")
        .await;
    rig.containerd.exec("desk", "echo 1 > /root/v").await;
    let sidecar = Sidecar::start_with(
        rig.target("pod-l", "liam"),
        None,
        &[("SNAPSHOT_EVERY", "1s"), ("SNAPSHOT_ON_LOGOFF", "true")],
    )
    .await;
    let limit = Duration::from_secs(120);
    until(&sidecar, limit, |ops| {
        ops.iter().find(|op| scheduled(op) && finished(op)).cloned()
    })
    .await;
    rig.containerd.exec("desk", "echo 2 > /root/v").await;
    let (status, body) = sidecar.get("/snapshot/logoff").await;
    assert_eq!(status, 200, "{body}\n{}", sidecar.log());
    // two intervals and more: no scheduled snapshot after the logoff's
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ops = operations(&sidecar).await;
    let logoff = ops
        .iter()
        .find(|op| op["trigger"] == "logoff")
        .expect("the logoff's operation");
    assert_eq!(logoff["step"], "Done", "{logoff}");
    assert!(
        !ops.iter()
            .any(|op| scheduled(op) && op["started"].as_u64() >= logoff["started"].as_u64()),
        "{ops:#?}"
    );
    // a scheduled snapshot may have pushed the change just before the
    // logoff, which then had nothing new; a logoff that pushed says so
    if logoff["image"].is_string() {
        let tags = rig.tags("liam").await;
        assert_eq!(
            manifest_trigger(&rig, tags.last().expect("a tag")).await,
            "logoff"
        );
    }
    let (ended, log) = sidecar.terminate().await;
    assert!(ended.success, "{ended}: {log}");
}

/// The whole chain: the webhook's `--snapshot-every` reaches the sidecar it
/// injects (run from its image as the kubelet would), which snapshots the
/// desktop on its own.
#[tokio::test]
async fn the_webhook_puts_the_desktops_it_admits_on_a_schedule() {
    use harness::{admission::as_pod, story::Node};
    let node = Node::start(&["--snapshot-every", "2s"]).await;
    let alice = node.login("alice").await;
    let pod = as_pod(&alice.pod);
    let spec = pod.spec.as_ref().expect("spec");
    let every = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "t-snapshot")
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == "SNAPSHOT_EVERY"))
        .and_then(|e| e.value.clone());
    assert_eq!(every.as_deref(), Some("2s"));
    node.containerd
        .exec(&alice.container, "echo scheduled > /root/on-its-own")
        .await;
    // the schedule keeps the minimum interval (30 s by default): shortened here
    let sidecar = node
        .sidecar(&alice, &[("SNAPSHOT_MIN_INTERVAL", "1s")])
        .await;
    let pushed = until(&sidecar, Duration::from_secs(120), |ops| {
        ops.iter().find(|op| scheduled(op) && finished(op)).cloned()
    })
    .await;
    assert!(pushed["image"].is_string(), "{pushed}\n{}", sidecar.log());
    let tags = node.tags(&alice).await;
    assert_eq!(tags.len(), 1, "{tags:?}");
    let (manifest, _) = node
        .registry
        .manifest_and_config(Node::repository_path(&alice), &tags[0])
        .await;
    assert_eq!(manifest["annotations"][TRIGGER], "schedule");
    sidecar.stop().await;
    node.logoff(alice).await;
    node.stop().await;
}
