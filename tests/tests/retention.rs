//! Retention end to end: the real sidecar deletes a user's old snapshots from a
//! real registry after each push (never another user's, never a young one),
//! and distribution's garbage collector then reclaims their blobs.

use harness::{
    containerd::Containerd,
    registry::{Auth, Registry},
    sidecar::{layers, Rig, Sidecar, RIG_REPO},
};

const REPO: &str = RIG_REPO;

/// The rig with three desktops (pods a, b, c).
async fn setup(registry: Registry) -> Rig {
    let rig = Rig::with(Containerd::start().await, registry).await;
    for (id, pod) in [
        ("desk-a", "pod-a"),
        ("desk-b", "pod-b"),
        ("desk-c", "pod-c"),
    ] {
        rig.containerd
            .run_desktop(id, pod, &format!("{pod}-name"), "x-graphical")
            .await;
    }
    rig
}

async fn sidecar(s: &Rig, pod: &str, prefix: &str, keep: &str, min_age: &str) -> Sidecar {
    Sidecar::start_with(
        s.target(pod, prefix),
        None,
        &[("SNAPSHOT_KEEP", keep), ("SNAPSHOT_KEEP_MIN_AGE", min_age)],
    )
    .await
}

/// A new change of 1 MiB of random bytes in `desk`, then a snapshot.
async fn change_and_snapshot(s: &Rig, sidecar: &Sidecar, desk: &str, n: usize) {
    s.containerd
        .exec(
            desk,
            &format!("dd if=/dev/urandom of=/root/day-{n} bs=1048576 count=1 2>/dev/null"),
        )
        .await;
    sidecar.snapshot_done().await;
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn retention_keeps_the_newest_never_another_users_and_the_collector_reclaims_the_rest() {
    let s = setup(Registry::start().await).await;
    // bob, and a look-alike user whose prefix starts with alice's
    let bob = sidecar(&s, "pod-b", "bob", "0", "0s").await;
    for n in 0..2 {
        change_and_snapshot(&s, &bob, "desk-b", n).await;
    }
    bob.stop().await;
    let lookalike = sidecar(&s, "pod-c", "alice-1", "0", "0s").await;
    change_and_snapshot(&s, &lookalike, "desk-c", 0).await;
    lookalike.stop().await;
    // snapshots from before the tag annotation, alice's and bob's on ONE manifest:
    // deleting alice's by digest would take bob's with it
    s.registry
        .push_tags(
            REPO,
            &["alice-1600000000000000000", "bob-1600000000000000000"],
        )
        .await;
    let others = [s.tags("bob").await, s.tags("alice-1").await].concat();
    assert_eq!(others.len(), 4, "{others:?}");

    let alice = sidecar(&s, "pod-a", "alice", "3", "0s").await;
    let mut pushed = Vec::new();
    for n in 0..6 {
        change_and_snapshot(&s, &alice, "desk-a", n).await;
        pushed.push(s.tags("alice").await.last().cloned().expect("the new tag"));
    }
    let left = s.tags("alice").await;
    let mut want = vec!["alice-1600000000000000000".to_string()];
    want.extend(pushed[3..].iter().cloned());
    assert_eq!(left, want, "the three newest, and the unannotated old one");
    let still: Vec<String> = [s.tags("bob").await, s.tags("alice-1").await].concat();
    assert_eq!(still, others, "no other user's snapshot is touched");
    let m = alice.metrics().await;
    assert_eq!(
        metric(&m, "snapshot_sidecar_retention_total{result=\"deleted\"}"),
        3,
        "{m}"
    );
    assert!(
        metric(&m, "snapshot_sidecar_retention_total{result=\"skipped\"}") >= 1,
        "{m}"
    );
    alice.stop().await;

    // younger than --keep-min-age: a burst deletes nothing
    let burst = sidecar(&s, "pod-a", "alice", "3", "7d").await;
    for n in 6..9 {
        change_and_snapshot(&s, &burst, "desk-a", n).await;
    }
    assert_eq!(s.tags("alice").await.len(), 7, "3 + 3 young + the old one");
    burst.stop().await;

    // the collector reclaims what the deleted snapshots alone held
    let before = s.registry.storage_bytes();
    let mut registry = s.registry;
    registry.garbage_collect().await;
    let after = registry.storage_bytes();
    println!(
        "registry storage: {} KiB before garbage-collect, {} KiB after",
        before >> 10,
        after >> 10
    );
    assert!(
        after + (5 << 20) / 2 <= before,
        "three 1 MiB layers reclaimed: {before} -> {after}"
    );
    // every snapshot still there pulls whole: its blobs were kept
    let s = Rig { registry, ..s };
    for tag in [
        s.tags("alice").await,
        s.tags("bob").await,
        s.tags("alice-1").await,
    ]
    .concat()
    {
        let image = layers(&s.registry, REPO, &tag).await;
        assert!(!image.is_empty(), "{tag}");
    }
    let newest = s.tags("alice").await.last().cloned().expect("a tag");
    let image = layers(&s.registry, REPO, &newest).await;
    assert!(
        image
            .last()
            .is_some_and(|l| l.iter().any(|(p, _)| p == "root/day-8")),
        "the newest snapshot holds the last change"
    );
    s.containerd.stop().await;
}

#[tokio::test]
async fn a_registry_that_refuses_deletes_is_logged_once_a_run_and_the_snapshots_succeed() {
    let s = setup(Registry::start_refusing_deletes().await).await;
    let alice = sidecar(&s, "pod-a", "alice", "1", "0s").await;
    for n in 0..3 {
        change_and_snapshot(&s, &alice, "desk-a", n).await;
    }
    assert_eq!(s.tags("alice").await.len(), 3, "nothing deleted");
    let log = alice.log();
    assert_eq!(
        log.matches("the registry refuses deletes").count(),
        2,
        "once in each of the two runs that had something to delete:\n{log}"
    );
    let m = alice.metrics().await;
    assert_eq!(
        metric(&m, "snapshot_sidecar_retention_total{result=\"refused\"}"),
        2,
        "{m}"
    );
    alice.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn retention_deletes_through_a_token_service_too() {
    let s = setup(Registry::start_with(Auth::Token { lifetime_secs: 60 }).await).await;
    let alice = sidecar(&s, "pod-a", "alice", "1", "0s").await;
    for n in 0..2 {
        change_and_snapshot(&s, &alice, "desk-a", n).await;
    }
    let left = s.tags("alice").await;
    assert_eq!(left.len(), 1, "{left:?}; log:\n{}", alice.log());
    alice.stop().await;
    s.containerd.stop().await;
}
