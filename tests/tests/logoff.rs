//! Snapshot at logoff (issue 11 §1): the pod is deleted without a click and
//! the kubelet's termination sequence (tests/src/kubelet.rs) runs the
//! graphical container's preStop hook, SIGTERM, the grace period, SIGKILL;
//! with the real webhook and sidecar images, containerd and registry.

use harness::{
    badregistry::{BadRegistry, Misbehaviour},
    sidecar::{Rig, Sidecar},
    story::{Deleted, Desktop, Node},
};
use serde_json::Value;
use std::time::Duration;

/// The tests click and log off within seconds; the minimum interval between
/// two snapshots (30 s by default, which a logoff waits out) has its own test.
const QUICK: &[(&str, &str)] = &[("SNAPSHOT_MIN_INTERVAL", "1s")];

async fn write(node: &Node, desktop: &Desktop, script: &str) {
    node.containerd.exec(&desktop.container, script).await;
}

async fn read(node: &Node, desktop: &Desktop, path: &str) -> String {
    node.containerd
        .exec(&desktop.container, &format!("cat {path} 2>&1 || true"))
        .await
        .trim()
        .to_string()
}

/// The hook's answer; panics unless it came.
fn hook(deleted: &Deleted) -> (u16, Value) {
    match &deleted.hook {
        Some(Ok(answer)) => answer.clone(),
        other => panic!(
            "the preStop hook did not answer: {other:?}\n{}",
            deleted.sidecar_log
        ),
    }
}

/// The logoff found nothing new to push, and the pod stopped in time.
fn nothing_new(deleted: &Deleted) {
    let (status, body) = hook(deleted);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["message"], "nothing changed since the last snapshot: no new tag",
        "{body}"
    );
    stopped_in_time(deleted);
}

/// Within its grace period, the desktop stopped on SIGTERM and the sidecar on its own.
fn stopped_in_time(deleted: &Deleted) {
    assert!(
        deleted.elapsed < deleted.grace,
        "the pod took {:?} to stop, grace {:?}",
        deleted.elapsed,
        deleted.grace
    );
    assert!(deleted.desktop_stopped, "the desktop was killed");
    let ended = deleted.sidecar.as_ref().unwrap_or_else(|| {
        panic!(
            "the sidecar was killed at the end of the grace period:\n{}",
            deleted.sidecar_log
        )
    });
    assert!(
        ended.success,
        "the sidecar ended {ended}:\n{}",
        deleted.sidecar_log
    );
}

#[tokio::test]
async fn a_user_who_logs_off_without_clicking_finds_their_work_at_the_next_login() {
    let node = Node::start(&["--snapshot-on-logoff", "--logoff-grace-period", "120s"]).await;
    let alice = node.login("alice").await;
    let pod = harness::admission::as_pod(&alice.pod);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        spec.termination_grace_period_seconds,
        Some(120),
        "pyos's 5 s are raised to the logoff budget"
    );
    let sidecar = node.sidecar(&alice, QUICK).await;
    write(&node, &alice, "echo morning > /root/morning").await;
    sidecar.snapshot_done().await;
    write(&node, &alice, "echo afternoon > /root/afternoon").await;
    assert_eq!(node.tags(&alice).await.len(), 1);

    let deleted = node.delete_pod(alice, sidecar).await;
    let (status, body) = hook(&deleted);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("success")),
        "{body}"
    );
    assert_eq!(body["message"], "done", "{body}");
    stopped_in_time(&deleted);
    assert!(
        deleted.hook_ended < deleted.elapsed,
        "the desktop got SIGTERM after the hook"
    );
    assert!(
        deleted.sidecar_log.contains("\"trigger\":\"Logoff\""),
        "{}",
        deleted.sidecar_log
    );

    let again = node.login("alice").await;
    assert_eq!(node.tags(&again).await.len(), 2, "the logoff pushed a tag");
    assert_eq!(read(&node, &again, "/root/morning").await, "morning");
    assert_eq!(read(&node, &again, "/root/afternoon").await, "afternoon");
    node.stop().await;
}

#[tokio::test]
async fn a_native_sidecar_snapshots_at_logoff_and_nothing_new_adds_no_tag() {
    let node = Node::start(&[
        "--sidecar-mode",
        "native",
        "--snapshot-on-logoff",
        "--logoff-grace-period",
        "120s",
    ])
    .await;
    // a new user who changes nothing: no snapshot
    let bob = node.login("bob").await;
    let sidecar = node.sidecar(&bob, QUICK).await;
    nothing_new(&node.delete_pod(bob, sidecar).await);

    // a change: one tag
    let bob = node.login("bob").await;
    assert!(node.tags(&bob).await.is_empty());
    write(&node, &bob, "echo 1 > /root/version").await;
    let sidecar = node.sidecar(&bob, QUICK).await;
    let deleted = node.delete_pod(bob, sidecar).await;
    assert_eq!(hook(&deleted).1["message"], "done");
    stopped_in_time(&deleted);

    // restored, nothing changed since the restore: no new tag
    let bob = node.login("bob").await;
    assert_eq!(read(&node, &bob, "/root/version").await, "1");
    let first = node.tags(&bob).await;
    assert_eq!(first.len(), 1);
    let sidecar = node.sidecar(&bob, QUICK).await;
    nothing_new(&node.delete_pod(bob, sidecar).await);

    // a click, then nothing more before the logoff: the click's tag only
    let bob = node.login("bob").await;
    assert_eq!(node.tags(&bob).await, first);
    write(&node, &bob, "echo 2 > /root/version").await;
    let sidecar = node.sidecar(&bob, QUICK).await;
    sidecar.snapshot_done().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    nothing_new(&node.delete_pod(bob, sidecar).await);
    let bob = node.login("bob").await;
    assert_eq!(node.tags(&bob).await.len(), 2);
    assert_eq!(read(&node, &bob, "/root/version").await, "2");
    node.stop().await;
}

#[tokio::test]
async fn a_logoff_while_the_registry_is_down_keeps_the_old_snapshot_newest() {
    let mut node = Node::start(&["--snapshot-on-logoff", "--logoff-grace-period", "40s"]).await;
    let carol = node.login("carol").await;
    let sidecar = node.sidecar(&carol, QUICK).await;
    write(&node, &carol, "echo 1 > /root/version").await;
    sidecar.snapshot_done().await;
    let before = node.tags(&carol).await;
    write(&node, &carol, "echo 2 > /root/version").await;
    node.registry.stop().await;

    let deleted = node.delete_pod(carol, sidecar).await;
    let (status, body) = hook(&deleted);
    assert_eq!(
        (status, body["status"].as_str()),
        (500, Some("error")),
        "{body}"
    );
    stopped_in_time(&deleted);
    assert!(
        deleted.sidecar_log.contains("snapshot failed"),
        "{}",
        deleted.sidecar_log
    );

    node.registry.restart().await;
    let carol = node.login("carol").await;
    assert_eq!(
        node.tags(&carol).await,
        before,
        "the old snapshot stays the newest"
    );
    assert_eq!(read(&node, &carol, "/root/version").await, "1");
    node.stop().await;
}

#[tokio::test]
async fn a_logoff_snapshot_that_cannot_finish_in_time_is_abandoned_untagged() {
    let rig = Rig::new().await;
    rig.containerd
        .run_desktop("desk", "pod-l", "desk-pod", "x-graphical")
        .await;
    rig.containerd
        .exec("desk", "head -c 1048576 /dev/urandom > /root/blob")
        .await;
    // a registry that never answers: the push cannot end
    let silent = BadRegistry::start(Misbehaviour::Silent).await;
    let creds = rig.registry.dir.path().join("silent.json");
    harness::registry::write_dockerconfigjson(
        &creds,
        &silent.host,
        harness::registry::USER,
        harness::registry::PASSWORD,
    );
    let target = harness::sidecar::Target {
        registry_host: &silent.host,
        credentials: Some(&creds),
        ..rig.target("pod-l", "dave")
    };
    let sidecar = Sidecar::start_with(
        target,
        None,
        &[
            ("SNAPSHOT_ON_LOGOFF", "true"),
            ("SNAPSHOT_LOGOFF_GRACE_PERIOD", "8s"),
            ("SNAPSHOT_LOGOFF_MARGIN", "3s"),
        ],
    )
    .await;
    let asked = std::time::Instant::now();
    let (status, body) = sidecar.get("/snapshot/logoff").await;
    let took = asked.elapsed();
    assert_eq!(status, 500, "{body}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(8),
        "answered after {took:?}, the budget is 5 s"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not finish within the grace period")),
        "{body}"
    );
    assert_eq!(rig.containerd.task_status("desk").await, "RUNNING");
    assert!(
        sidecar
            .metrics()
            .await
            .contains("snapshot_sidecar_logoff_total{result=\"timeout\"} 1"),
        "{}",
        sidecar.metrics().await
    );
    // SIGTERM after it: the logoff has been tried, the sidecar stops at once
    let (ended, log) = sidecar.terminate().await;
    assert!(ended.success, "{ended}: {log}");
    assert!(rig.tags("dave").await.is_empty());
}
