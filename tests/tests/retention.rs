//! Retention end to end: the real sidecar deletes a user's old snapshots from a
//! real registry after each push (never another user's, never a young one; by
//! tiers: the newest of each hour and day), and distribution's garbage
//! collector then reclaims their blobs, never one a kept snapshot uses.

use harness::{
    containerd::{base_layer_blob, Containerd},
    registry::{Auth, Registry},
    sidecar::{layers, Rig, Sidecar, RIG_REPO},
};
use snapshot_tags::provenance::{self, Provenance};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A sidecar keeping the `keep` newest snapshots and those younger than
/// `min_age`, no period tier (a test running across an hour would keep one
/// more); each snapshot a whole layer, not an increment (an increment's
/// snapshot holds the layers of the ones before: deleting those reclaims
/// nothing, see the chain test below).
async fn sidecar(s: &Rig, pod: &str, prefix: &str, keep: &str, min_age: &str) -> Sidecar {
    Sidecar::start_with(
        s.target(pod, prefix),
        None,
        &[
            ("SNAPSHOT_INCREMENTAL", "false"),
            ("SNAPSHOT_KEEP", keep),
            ("SNAPSHOT_KEEP_HOURLY", "0"),
            ("SNAPSHOT_KEEP_DAILY", "0"),
            ("SNAPSHOT_KEEP_WEEKLY", "0"),
            ("SNAPSHOT_KEEP_MIN_AGE", min_age),
        ],
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

/// A gzip layer holding `root/step-<i>` for each step (a merge holds several),
/// with its diff_id.
fn steps_layer(steps: std::ops::RangeInclusive<usize>) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for i in steps {
        let content = format!("step {i}\n");
        let mut h = harness::oci::tar_header(tar::EntryType::Regular, 0o644, content.len() as u64);
        tar.append_data(&mut h, format!("root/step-{i}"), content.as_bytes())
            .expect("a tar entry");
    }
    let tar = tar.into_inner().expect("a tar");
    (
        harness::oci::gzip(&tar).expect("gzip"),
        harness::oci::sha256(&tar),
    )
}

/// alice's snapshot of `at` on the harness's base with `layers` above it,
/// annotated as the sidecar annotates it; its tag.
async fn push_snapshot_at(
    registry: &Registry,
    at: SystemTime,
    layers: &[(Vec<u8>, String)],
) -> String {
    let tag = snapshot_tags::snapshot_tag("alice", at);
    let provenance = Provenance {
        base_name: "abcdesktopio/oc.user.test:4.1".into(),
        base_digest: None,
        first_user_layer: 1,
    };
    // `created` is not read here (the tag tells the time)
    let mut notes = provenance.annotations("alice", &tag, "2026-01-01T00:00:00Z");
    notes.insert(provenance::TRIGGER.into(), "schedule".into());
    let mut image = vec![base_layer_blob()];
    image.extend(layers.iter().cloned());
    registry
        .push_image(REPO, &tag, &image, serde_json::json!(notes))
        .await;
    tag
}

/// A chain of snapshots (each one the layers of the one before and one new
/// layer, with a merge in the middle), pruned by tiers after the sidecar's
/// next push, then collected: the snapshots deleted in the middle of the
/// chain take none of the layers the kept ones above them use; the layers
/// only deleted snapshots held are reclaimed; every kept snapshot pulls whole
/// (every blob there, digest-correct) and restores through containerd.
#[tokio::test]
async fn tiered_retention_deletes_manifests_only_and_every_kept_snapshot_restores_after_collection()
{
    let s = setup(Registry::start().await).await;
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let midnight = UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400);
    let day = |d: u32, hour: u64| {
        midnight - Duration::from_secs(86_400) * d + Duration::from_secs(3_600 * hour)
    };
    // (when, the steps of the new layer): the merge at step 3 holds steps 0..=3
    let chain = [
        (day(9, 12), 0..=0),
        (day(8, 10), 1..=1),
        (day(8, 12), 2..=2),
        (day(5, 12), 0..=3),
        (day(4, 10), 4..=4),
        (day(4, 11), 5..=5),
        (day(4, 12), 6..=6),
        (day(2, 12), 7..=7),
        (day(1, 10), 8..=8),
        (day(1, 12), 9..=9),
    ];
    let mut layers: Vec<(Vec<u8>, String)> = Vec::new();
    let mut tags = Vec::new();
    for (at, steps) in &chain {
        let merge = *steps.start() == 0 && *steps.end() > 0;
        if merge {
            layers.clear();
        }
        layers.push(steps_layer(steps.clone()));
        tags.push(push_snapshot_at(&s.registry, *at, &layers).await);
    }
    let step_layer = |i: usize| harness::oci::sha256(&steps_layer(i..=i).0);

    // the sidecar's snapshot (today) and its retention: the newest 2, the
    // newest of the 3 newest hours and of the 5 newest days that have one
    let alice = Sidecar::start_with(
        s.target("pod-a", "alice"),
        None,
        &[
            ("SNAPSHOT_KEEP", "2"),
            ("SNAPSHOT_KEEP_HOURLY", "3"),
            ("SNAPSHOT_KEEP_DAILY", "5"),
            ("SNAPSHOT_KEEP_WEEKLY", "0"),
            ("SNAPSHOT_KEEP_MIN_AGE", "0s"),
        ],
    )
    .await;
    change_and_snapshot(&s, &alice, "desk-a", 0).await;
    alice.stop().await;
    let left = s.tags("alice").await;
    let newest = left.last().cloned().expect("the sidecar's snapshot");
    assert!(!tags.contains(&newest), "{left:?}");
    // last 2: today's and step 9; hourly 3: step 8 besides; daily 5: the
    // newest of days -2 (step 7), -4 (step 6) and -5 (the merge)
    let kept: Vec<String> = [3, 6, 7, 8, 9].iter().map(|i| tags[*i].clone()).collect();
    assert_eq!(left, [kept.clone(), vec![newest.clone()]].concat());

    let before = s.registry.storage_bytes();
    let mut registry = s.registry;
    let said = registry.garbage_collect().await;
    let s = Rig { registry, ..s };
    println!(
        "registry storage: {} KiB before garbage-collect, {} KiB after",
        before >> 10,
        s.registry.storage_bytes() >> 10
    );
    // the layers only the deleted snapshots before the merge held are gone;
    // those of steps 4 and 5 (their snapshots deleted) stay for step 6's
    for i in 0..=2 {
        assert_eq!(
            s.registry.blob(REPO, &step_layer(i)).await,
            None,
            "step {i}'s layer reclaimed; the collector said:\n{said}"
        );
    }
    for i in 4..=9 {
        assert!(
            s.registry.blob(REPO, &step_layer(i)).await.is_some(),
            "step {i}'s layer kept"
        );
    }
    for (n, tag) in kept.iter().chain([&newest]).enumerate() {
        s.registry.pull_whole(REPO, tag).await;
        let image = format!("{}/{REPO}:{tag}", s.registry.host);
        s.containerd.pull(&image, &s.registry).await;
        let id = format!("desk-r{n}");
        s.containerd
            .run_desktop_from(&image, &id, &format!("pod-r{n}"), &id, "x-graphical")
            .await;
        let files = s.containerd.exec(&id, "ls /root | sort").await;
        let want = match tags.iter().position(|t| t == tag) {
            Some(i) => {
                let last = *chain[i].1.end();
                let mut names: Vec<String> = (0..=last).map(|j| format!("step-{j}")).collect();
                names.sort();
                names.join("\n")
            }
            None => "day-0".to_string(),
        };
        assert_eq!(files.trim(), want, "{tag}");
        if let Some(i) = tags.iter().position(|t| t == tag) {
            let last = *chain[i].1.end();
            assert_eq!(
                s.containerd
                    .exec(&id, &format!("cat /root/step-{last}"))
                    .await
                    .trim(),
                format!("step {last}")
            );
        }
    }
    s.containerd.stop().await;
}
