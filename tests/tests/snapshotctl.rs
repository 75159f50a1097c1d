//! `snapshotctl` end to end: the real binary (target/debug/snapshotctl)
//! against a real registry (Basic, or Bearer through the token service), both
//! layouts; and against registries that refuse deletes, fail or are not there.

use harness::{
    badregistry::{BadRegistry, Misbehaviour},
    registry::{Auth, Registry, PASSWORD, USER},
};
use oci_client::{secrets::RegistryAuth, Reference};
use serde_json::{json, Value};
use snapshot_tags::provenance::Provenance;
use std::time::{Duration, SystemTime};

const IMAGE: &str = "desk/ubuntu";
const DAY: Duration = Duration::from_secs(86_400);

/// What one run of snapshotctl came to.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }

    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs snapshotctl with the registry flags of `host` (`ca` trusted, `creds` given).
async fn ctl(
    host: &str,
    ca: &std::path::Path,
    creds: Option<&std::path::Path>,
    args: &[&str],
) -> Run {
    let mut command = tokio::process::Command::new(harness::workspace_binary("snapshotctl"));
    command
        .args(["--registry", host, "--registry-ca"])
        .arg(ca)
        .args(args)
        .env_remove("RUST_LOG");
    if let Some(c) = creds {
        command.arg("--registry-credentials").arg(c);
    }
    let out = command.output().await.expect("running snapshotctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn run(registry: &Registry, args: &[&str]) -> Run {
    ctl(
        registry.host(),
        &registry.ca_path(),
        Some(&registry.credentials_file()),
        args,
    )
    .await
}

/// Pushes one snapshot of its own (a base layer shared by all, a user layer
/// of its own), with the sidecar's annotations unless `legacy`; returns its tag.
async fn push_snapshot(
    registry: &Registry,
    repo: &str,
    prefix: &str,
    user: &str,
    age: Duration,
    legacy: bool,
) -> String {
    let tag = snapshot_tags::snapshot_tag(prefix, SystemTime::now() - age);
    let client = registry.oci_client();
    let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
    let reference = Reference::with_tag(registry.host().to_string(), repo.to_string(), tag.clone());
    client
        .auth(&reference, &auth, oci_client::RegistryOperation::Push)
        .await
        .expect("auth");
    let base = b"the base layer".to_vec();
    let mine = format!("the user layer of {repo}:{tag}").into_bytes();
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [harness::oci::sha256(&base), harness::oci::sha256(&mine)]},
        "config": {}}))
    .expect("config");
    for blob in [&base, &mine, &config] {
        client
            .push_blob(&reference, blob.clone(), &harness::oci::sha256(blob))
            .await
            .expect("pushing a blob");
    }
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": harness::oci::sha256(&config), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": harness::oci::sha256(&base), "size": base.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": harness::oci::sha256(&mine), "size": mine.len()},
        ],
    });
    if !legacy {
        let p = Provenance {
            base_name: format!("{IMAGE}:4.1"),
            base_digest: None,
            first_user_layer: 1,
        };
        manifest["annotations"] = json!(p.annotations(user, &tag, "2026-01-02T03:04:05Z"));
    }
    client
        .push_manifest_raw(
            &reference,
            serde_json::to_vec(&manifest).expect("manifest"),
            "application/vnd.oci.image.manifest.v1+json"
                .parse()
                .expect("media type"),
        )
        .await
        .expect("pushing the manifest");
    tag
}

/// `n` annotated snapshots of `prefix`, 10, 9, ... days old; oldest first.
async fn snapshots(
    registry: &Registry,
    repo: &str,
    prefix: &str,
    user: &str,
    n: u32,
) -> Vec<String> {
    let mut tags = Vec::new();
    for i in 0..n {
        tags.push(push_snapshot(registry, repo, prefix, user, DAY * (10 - i), false).await);
    }
    tags
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn owned(tags: &[String], prefix: &str) -> Vec<String> {
    sorted(
        tags.iter()
            .filter(|t| t.rsplit_once('-').is_some_and(|(p, _)| p == prefix))
            .cloned()
            .collect(),
    )
}

#[tokio::test]
async fn shared_layout_with_basic_auth_list_show_prune_and_forget() {
    let registry = Registry::start().await;
    let alice = snapshots(&registry, IMAGE, "alice", "alice", 4).await;
    let bob = snapshots(&registry, IMAGE, "bob", "bob", 2).await;
    let lookalike = snapshots(&registry, IMAGE, "alice-1", "alice-1", 2).await;
    let jdoe = snapshots(
        &registry,
        IMAGE,
        "jdoe_40example.com",
        "jdoe@example.com",
        1,
    )
    .await;
    // alice's old snapshot of her own without annotations, and one on the same
    // manifest as bob's (deleting it by digest would take bob's with it)
    let alice_legacy = push_snapshot(&registry, IMAGE, "alice", "", DAY * 40, true).await;
    let shared = ["alice-1600000000000000000", "bob-1600000000000000000"];
    registry.push_tags(IMAGE, &shared).await;
    registry.push_tags(IMAGE, &["4.1", "latest"]).await;
    registry
        .push_tags("other/image", &["bob-1700000000000000000"])
        .await;

    // list: every user, from the catalog
    let all = run(&registry, &["list", "--output", "json"])
        .await
        .ok()
        .json();
    let rows = all["snapshots"].as_array().expect("snapshots");
    let count = |user: &str| rows.iter().filter(|r| r["user"] == user).count();
    assert_eq!(
        (
            count("alice"),
            count("bob"),
            count("alice-1"),
            count("jdoe@example.com")
        ),
        (6, 4, 2, 1),
        "{all:#}"
    );
    assert!(rows
        .iter()
        .all(|r| r["tag"] != "latest" && r["tag"] != "4.1"));
    let newest = &rows.iter().find(|r| r["user"] == "alice").expect("alice")["tag"];
    assert_eq!(newest, alice[3].as_str(), "newest first");
    let first = rows
        .iter()
        .find(|r| r["tag"] == alice[0].as_str())
        .expect("alice's first");
    assert_eq!(first["base"], "desk/ubuntu:4.1");
    assert_eq!(
        first["user_bytes"],
        format!("the user layer of {IMAGE}:{}", alice[0]).len()
    );
    assert_eq!(first["created"], "2026-01-02T03:04:05Z");
    let legacy = rows
        .iter()
        .find(|r| r["tag"] == alice_legacy.as_str())
        .expect("legacy");
    assert_eq!(legacy["user_bytes"], Value::Null, "no provenance, no size");

    // list --user, one image: alice's timeline only
    let table = run(
        &registry,
        &["list", "--user", "alice", "--image", "desk/ubuntu:4.1"],
    )
    .await
    .ok();
    assert!(table.stdout.starts_with("REPOSITORY"), "{}", table.stdout);
    assert_eq!(
        table
            .stdout
            .lines()
            .filter(|l| l.starts_with("desk/ubuntu ") && l.contains(" alice-"))
            .count(),
        6,
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains("bob-") && !table.stdout.contains("alice-1-"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("6 snapshots of 1 users in 1 repositories"),
        "{}",
        table.stdout
    );
    let jdoe_list = run(
        &registry,
        &["list", "--user", "jdoe@example.com", "--output", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(jdoe_list["snapshots"][0]["tag"], jdoe[0].as_str());

    // show
    let shown = run(&registry, &["show", &alice[3]]).await.ok();
    for want in [
        format!("image:        {}/{IMAGE}:{}", registry.host(), alice[3]),
        "base:         desk/ubuntu:4.1".to_string(),
        "user layers:  ".to_string(),
        "sha256:".to_string(),
    ] {
        assert!(shown.stdout.contains(&want), "{want}:\n{}", shown.stdout);
    }
    let missing = run(&registry, &["show", "alice-42"]).await;
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("no snapshot tagged \"alice-42\""),
        "{}",
        missing.stderr
    );

    // prune --dry-run: says what, changes nothing
    let before = sorted(registry.tags(IMAGE).await);
    let dry = run(
        &registry,
        &["prune", "--keep", "2", "--user", "alice", "--dry-run"],
    )
    .await
    .ok();
    for t in &alice[..2] {
        assert!(
            dry.stdout
                .lines()
                .any(|l| l.contains(t.as_str()) && l.ends_with("delete")),
            "{t}:\n{}",
            dry.stdout
        );
    }
    assert!(
        dry.stdout.contains("skip: no tag annotation"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("would delete 2"), "{}", dry.stdout);
    assert_eq!(
        sorted(registry.tags(IMAGE).await),
        before,
        "a dry run deletes nothing"
    );

    // prune for real, every user: the newest two stay, unannotated ones stay, no one else's touched
    let pruned = run(&registry, &["prune", "--keep", "2"]).await.ok();
    assert!(
        pruned
            .stderr
            .contains("] user alice (desk/ubuntu): deleted 2"),
        "{}",
        pruned.stderr
    );
    assert!(
        pruned.stdout.contains("deleted 2, skipped"),
        "{}",
        pruned.stdout
    );
    let left = registry.tags(IMAGE).await;
    let mut want_alice = vec![
        alice[2].clone(),
        alice[3].clone(),
        alice_legacy.clone(),
        shared[0].to_string(),
    ];
    want_alice.sort();
    assert_eq!(owned(&left, "alice"), want_alice);
    assert_eq!(
        owned(&left, "bob"),
        sorted([bob.clone(), vec![shared[1].to_string()]].concat())
    );
    assert_eq!(owned(&left, "alice-1"), sorted(lookalike.clone()));
    assert_eq!(owned(&left, "jdoe_40example.com"), jdoe);

    // forget --dry-run: nothing goes
    let dry = run(&registry, &["forget", "--user", "alice", "--dry-run"]).await;
    assert_eq!(
        dry.code, 1,
        "the shared manifest would stay: {}",
        dry.stderr
    );
    assert!(
        dry.stdout.contains("would delete 3 manifests"),
        "{}",
        dry.stdout
    );
    assert_eq!(owned(&registry.tags(IMAGE).await, "alice"), want_alice);

    // forget: alice's own manifests go, the one shared with bob stays and is reported
    let forgot = run(&registry, &["forget", "--user", "alice"]).await;
    assert_eq!(
        forgot.code, 1,
        "stdout:\n{}\nstderr:\n{}",
        forgot.stdout, forgot.stderr
    );
    assert!(
        forgot.stdout.contains("deleted 3 manifests"),
        "{}",
        forgot.stdout
    );
    // 4.1 and latest are that manifest too (push_tags pushes one image per repository)
    assert!(
        forgot.stderr.contains("kept: the manifest is also tagged")
            && forgot.stderr.contains("bob-1600000000000000000"),
        "{}",
        forgot.stderr
    );
    let left = registry.tags(IMAGE).await;
    assert_eq!(owned(&left, "alice"), [shared[0].to_string()]);
    assert_eq!(
        owned(&left, "alice-1"),
        sorted(lookalike.clone()),
        "a look-alike user is untouched"
    );
    for t in owned(&left, "bob").iter().chain(&lookalike).chain(&jdoe) {
        registry.manifest_and_config(IMAGE, t).await; // still pullable
    }
    assert_eq!(
        registry.tags("other/image").await,
        ["bob-1700000000000000000"]
    );
}

#[tokio::test]
async fn per_user_layout_through_a_token_service() {
    let registry = Registry::start_with(Auth::Token { lifetime_secs: 60 }).await;
    let alice_repo = format!("alice/{IMAGE}");
    let upper_repo = format!("u__416c696365/{IMAGE}"); // user "Alice"
    let bob_repo = format!("bob/{IMAGE}");
    let alice = snapshots(&registry, &alice_repo, "4.1", "alice", 3).await;
    let alice_42 = snapshots(&registry, &alice_repo, "4.2", "alice", 1).await;
    let upper = snapshots(&registry, &upper_repo, "4.1", "Alice", 2).await;
    let bob = snapshots(&registry, &bob_repo, "4.1", "bob", 2).await;
    registry.push_tags(IMAGE, &["4.1"]).await;

    let per_user = ["--layout", "per-user"];
    let all = run(
        &registry,
        &[&per_user[..], &["list", "--output", "json"]].concat(),
    )
    .await
    .ok()
    .json();
    let rows = all["snapshots"].as_array().expect("snapshots");
    let count = |user: &str| rows.iter().filter(|r| r["user"] == user).count();
    assert_eq!(
        (count("alice"), count("Alice"), count("bob"), rows.len()),
        (4, 2, 2, 8),
        "{all:#}"
    );

    let one = run(
        &registry,
        &[
            &per_user[..],
            &[
                "list",
                "--user",
                "Alice",
                "--image",
                "desk/ubuntu:4.1",
                "--output",
                "json",
            ],
        ]
        .concat(),
    )
    .await
    .ok()
    .json();
    let tags: Vec<&str> = one["snapshots"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["tag"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(tags, [upper[1].as_str(), upper[0].as_str()]);

    let shown = run(
        &registry,
        &[&per_user[..], &["show", &bob[0], "--user", "bob"]].concat(),
    )
    .await
    .ok();
    assert!(
        shown
            .stdout
            .contains(&format!("{}/{bob_repo}:{}", registry.host(), bob[0])),
        "{}",
        shown.stdout
    );

    // prune per base tag: 4.2's only snapshot stays
    run(
        &registry,
        &[&per_user[..], &["prune", "--keep", "1", "--user", "alice"]].concat(),
    )
    .await
    .ok();
    assert_eq!(
        sorted(registry.tags(&alice_repo).await),
        sorted(vec![alice[2].clone(), alice_42[0].clone()])
    );
    assert_eq!(
        registry.tags(&upper_repo).await.len(),
        2,
        "Alice is not alice"
    );

    let forgot = run(
        &registry,
        &[&per_user[..], &["forget", "--user", "bob"]].concat(),
    )
    .await
    .ok();
    assert!(
        forgot
            .stdout
            .contains("deleted 2 manifests (2 tags) in 1 repositories"),
        "{}",
        forgot.stdout
    );
    assert!(registry.tags(&bob_repo).await.is_empty());
    for t in upper {
        registry.manifest_and_config(&upper_repo, &t).await;
    }
    assert_eq!(registry.tags(IMAGE).await, ["4.1"]);
}

#[tokio::test]
async fn a_registry_that_refuses_deletes_fails_the_run_and_says_so() {
    let registry = Registry::start_refusing_deletes().await;
    let alice = snapshots(&registry, IMAGE, "alice", "alice", 3).await;
    let pruned = run(
        &registry,
        &["prune", "--keep", "1", "--image", "desk/ubuntu:4.1"],
    )
    .await;
    assert_eq!(
        pruned.code, 1,
        "stdout:\n{}\nstderr:\n{}",
        pruned.stdout, pruned.stderr
    );
    assert!(
        pruned.stderr.contains("the registry refuses deletes"),
        "{}",
        pruned.stderr
    );
    let forgot = run(&registry, &["forget", "--user", "alice"]).await;
    assert_eq!(forgot.code, 1, "{}", forgot.stderr);
    assert!(
        forgot
            .stderr
            .contains("refused: the registry does not delete"),
        "{}",
        forgot.stderr
    );
    assert_eq!(sorted(registry.tags(IMAGE).await), alice);
}

#[tokio::test]
async fn failures_and_bad_input_are_non_zero_with_the_reason() {
    let broken = BadRegistry::start(Misbehaviour::ServerError).await;
    let r = ctl(
        &broken.host,
        &broken.ca_path(),
        None,
        &["list", "--image", "desk/ubuntu:4.1"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("500") && r.stderr.contains("listing the tags"),
        "{}",
        r.stderr
    );
    let r = ctl(&broken.host, &broken.ca_path(), None, &["list"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("finding the repositories"),
        "{}",
        r.stderr
    );

    let garbage = BadRegistry::start(Misbehaviour::Garbage).await;
    let r = ctl(
        &garbage.host,
        &garbage.ca_path(),
        None,
        &["list", "--image", "desk/ubuntu:4.1"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("not a tag list"), "{}", r.stderr);

    let nobody = BadRegistry::start(Misbehaviour::Refused).await;
    let r = ctl(
        &nobody.host,
        &nobody.ca_path(),
        None,
        &["prune", "--keep", "1", "--image", "desk/ubuntu:4.1"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("registry connect"), "{}", r.stderr);

    let registry = Registry::start().await;
    let wrong = registry.dir.path().join("wrong.json");
    registry.write_dockerconfigjson(&wrong, USER, "not-the-password");
    let r = ctl(
        registry.host(),
        &registry.ca_path(),
        Some(&wrong),
        &["list", "--image", "desk/ubuntu:4.1"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("unauthorized"), "{}", r.stderr);

    let long = "x".repeat(200);
    for (args, says) in [
        (vec!["list", "--user", ""], "the user id is empty"),
        (vec!["forget", "--user", long.as_str()], "more than the 107"),
        (
            vec![
                "--layout",
                "per-user",
                "prune",
                "--keep",
                "1",
                "--user",
                long.as_str(),
            ],
            "more than the 128",
        ),
    ] {
        let r = run(&registry, &args).await;
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("cannot be a registry name") && r.stderr.contains(says),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = run(&registry, &["rebase", "--onto", "desk/ubuntu:4.2"]).await;
    assert_eq!(r.code, 2, "--user or --all: {}", r.stderr);
    let r = run(&registry, &["prune", "--keep", "0"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = ctl("", &registry.ca_path(), None, &["list"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--registry"), "{}", r.stderr);
}

/// `rebase --onto`: each user's newest snapshot gets the new base's layers
/// and keeps its own, as the webhook's `--on-new-base rebase` writes it;
/// dry run first; a snapshot without provenance, or already on the base, is
/// skipped; both layouts.
#[tokio::test]
async fn rebase_moves_each_users_newest_snapshot_onto_the_new_base() {
    use harness::registry::layer;
    for layout in ["shared", "per-user"] {
        let registry = Registry::start().await;
        let base = |t: &str| format!("{}/{IMAGE}:{t}", registry.host());
        let old_base = vec![layer("etc/base", "4.1")];
        let new_base = vec![layer("etc/base", "4.2"), layer("etc/extra", "4.2")];
        registry
            .push_image(IMAGE, "4.1", &old_base, json!({}))
            .await;
        registry
            .push_image(IMAGE, "4.2", &new_base, json!({}))
            .await;
        let repo_of = |user: &str| match layout {
            "shared" => (IMAGE.to_string(), format!("{user}-100")),
            _ => (format!("{user}/{IMAGE}"), "4.1-100".to_string()),
        };
        for (user, provenance) in [("alice", true), ("bob", false)] {
            let (repo, tag) = repo_of(user);
            let mut layers = old_base.clone();
            layers.push(layer("root/notes", user));
            let annotations = if provenance {
                json!({
                    "org.opencontainers.image.base.name": base("4.1"),
                    "io.abcdesktop.snapshot.first-user-layer": "1",
                    "io.abcdesktop.snapshot.user": user,
                    "io.abcdesktop.snapshot.tag": tag,
                })
            } else {
                json!({})
            };
            registry.push_image(&repo, &tag, &layers, annotations).await;
        }
        let onto = base("4.2");
        let args = |extra: &[&str]| -> Vec<String> {
            [
                "--layout",
                layout,
                "rebase",
                "--onto",
                onto.as_str(),
                "--all",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
        };
        fn as_refs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }

        let dry = run(&registry, &as_refs(&args(&["--dry-run"]))).await.ok();
        assert!(dry.stdout.contains("would rebase from"), "{}", dry.stdout);
        assert!(
            dry.stdout.contains("no provenance annotations"),
            "{}",
            dry.stdout
        );
        let (alice_repo, alice_tag) = repo_of("alice");
        assert_eq!(
            registry
                .tags(&alice_repo)
                .await
                .iter()
                .filter(|t| t.contains('-'))
                .count(),
            if layout == "shared" { 2 } else { 1 },
            "a dry run writes nothing"
        );

        let real = run(&registry, &as_refs(&args(&[]))).await.ok();
        assert!(
            real.stdout.contains("rebased 1,"),
            "{layout}: {}\n{}",
            real.stdout,
            real.stderr
        );
        let new_tag = registry
            .tags(&alice_repo)
            .await
            .into_iter()
            .find(|t| t.contains('-') && *t != alice_tag && !t.starts_with("bob"))
            .unwrap_or_else(|| panic!("{layout}: a rebased tag\n{}", real.stdout));
        if layout == "per-user" {
            assert!(new_tag.starts_with("4.2-"), "{new_tag}");
        }
        let (manifest, config) = registry.manifest_and_config(&alice_repo, &new_tag).await;
        let a = &manifest["annotations"];
        assert_eq!(a["org.opencontainers.image.base.name"], json!(base("4.2")));
        assert_eq!(a["io.abcdesktop.snapshot.first-user-layer"], "2");
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 3);
        assert_eq!(
            config["rootfs"]["diff_ids"][2],
            json!(layer("root/notes", "alice").1)
        );
        let again = run(&registry, &as_refs(&args(&[]))).await.ok();
        assert!(again.stdout.contains("already on it"), "{}", again.stdout);
    }
}

/// alice's chain in `registry`: each snapshot the layers of the one before
/// and one of its own, on one base layer, at its moment (`days` before
/// today's midnight UTC, then `hour`), with a trigger or none; the tags and
/// the layers (base first).
async fn chain(
    registry: &Registry,
    steps: &[(u32, u64, Option<&str>)],
) -> (Vec<String>, Vec<(Vec<u8>, String)>) {
    use harness::registry::layer;
    let secs = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let midnight = std::time::UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400);
    let mut layers = vec![layer("etc/base", "4.1")];
    let mut tags = Vec::new();
    for (i, (days, hour, trigger)) in steps.iter().enumerate() {
        let at = midnight - DAY * *days + Duration::from_secs(3_600 * hour);
        let tag = snapshot_tags::snapshot_tag("alice", at);
        layers.push(layer(&format!("root/step-{i}"), &"x".repeat(i * 100)));
        let provenance = Provenance {
            base_name: format!("{IMAGE}:4.1"),
            base_digest: None,
            first_user_layer: 1,
        };
        let mut notes = provenance.annotations("alice", &tag, "2026-01-02T03:04:05Z");
        if let Some(t) = trigger {
            notes.insert(snapshot_tags::provenance::TRIGGER.into(), t.to_string());
        }
        registry
            .push_image(IMAGE, &tag, &layers, json!(notes))
            .await;
        tags.push(tag);
    }
    (tags, layers)
}

/// The rows of `list --output json` by tag.
fn rows_by_tag(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|r| (r["tag"].as_str().unwrap_or_default().to_string(), r.clone()))
        .collect()
}

/// `list --user` is the user's timeline (when, trigger, bytes added, tag);
/// `pin` prints the annotation that restores a moment; `prune` by tiers
/// deletes in the middle of the chain and every snapshot kept still pulls
/// whole after the garbage collector ran.
#[tokio::test]
async fn timeline_pin_and_tiered_prune() {
    let mut registry = Registry::start().await;
    let (s, layers) = chain(
        &registry,
        &[
            (10, 12, Some("click")),
            (9, 10, Some("schedule")),
            (9, 12, Some("schedule")),
            (5, 12, Some("logoff")),
            (2, 12, Some("schedule")),
            (1, 10, None),
            (1, 12, Some("click")),
        ],
    )
    .await;
    snapshots(&registry, IMAGE, "bob", "bob", 1).await;
    let size = |i: usize| layers[i + 1].0.len() as u64;

    // the timeline: newest first, what each added over the one before
    let table = run(&registry, &["list", "--user", "alice"]).await.ok();
    let lines: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 1 + 7 + 1, "{}", table.stdout);
    assert_eq!(lines[0], ["REPOSITORY", "WHEN", "TRIGGER", "ADDED", "TAG"]);
    // ADDED is two words (`1.2 KiB`): the tag is the last
    fn tag_of<'a>(l: &[&'a str]) -> &'a str {
        l.last().copied().unwrap_or_default()
    }
    assert_eq!(
        (lines[1][0], lines[1][2], tag_of(&lines[1])),
        (IMAGE, "click", s[6].as_str())
    );
    assert_eq!(
        (lines[2][2], tag_of(&lines[2])),
        ("-", s[5].as_str()),
        "no trigger"
    );
    assert!(!table.stdout.contains("bob-"), "{}", table.stdout);
    let list = run(&registry, &["list", "--user", "alice", "--output", "json"])
        .await
        .ok()
        .json();
    let rows = rows_by_tag(&list);
    for (i, t) in s.iter().enumerate() {
        assert_eq!(
            rows[t]["added_bytes"],
            json!(size(i)),
            "{t}: one layer of its own"
        );
        assert!(
            rows[t]["taken"]
                .as_str()
                .is_some_and(|w| w.ends_with(":00:00Z")),
            "{t}: {}",
            rows[t]
        );
    }
    assert_eq!(rows[&s[3]]["trigger"], "logoff");
    assert_eq!(rows[&s[5]]["trigger"], Value::Null);

    // pin: at a moment (exactly, or just after), a time ago, a tag
    let pin = |args: Vec<String>| {
        let registry = &registry;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(registry, &[&["pin", "--user", "alice"][..], &args].concat()).await
        }
    };
    let taken = |i: usize| rows[&s[i]]["taken"].as_str().expect("taken").to_string();
    let annotation = |i: usize| format!("snapshot.abcdesktop.io/pin: \"{}\"", s[i]);
    for (args, want) in [
        (vec!["--at".to_string(), taken(5)], 5),
        (
            vec![
                "--at".to_string(),
                taken(5).replace('T', " ").replace('Z', ""),
            ],
            5,
        ),
        (vec!["--ago".into(), "3d".into()], 3),
        (vec!["--ago".into(), "7d".into()], 2),
        (vec!["--tag".into(), s[1].clone()], 1),
    ] {
        let out = pin(args.clone()).await.ok();
        assert!(
            out.stdout.lines().any(|l| l == annotation(want)),
            "{args:?}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains("metadata.annotations"),
            "{}",
            out.stdout
        );
    }
    let json = pin(vec![
        "--tag".into(),
        s[3].clone(),
        "--output".into(),
        "json".into(),
    ])
    .await
    .ok()
    .json();
    assert_eq!(
        json[0]["annotation"]["snapshot.abcdesktop.io/pin"],
        s[3].as_str()
    );
    assert_eq!(json[0]["image"], format!("{IMAGE}:4.1"));
    assert_eq!(json[0]["trigger"], "logoff");
    for args in [
        vec!["--at".to_string(), "2000-01-01T00:00:00Z".to_string()],
        vec!["--tag".into(), "alice-42".into()],
    ] {
        let out = pin(args.clone()).await;
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("no snapshot of user \"alice\""),
            "{}",
            out.stderr
        );
    }

    // prune by tiers: the newest, and the newest of the 3 newest days
    let dry = run(
        &registry,
        &["prune", "--user", "alice", "--keep-daily", "3", "--dry-run"],
    )
    .await
    .ok();
    assert!(
        dry.stdout.contains("prune --keep-last 1 --keep-daily 3:")
            && dry.stdout.contains("would delete 4"),
        "{}",
        dry.stdout
    );
    run(
        &registry,
        &["prune", "--user", "alice", "--keep-daily", "3"],
    )
    .await
    .ok();
    let kept = vec![s[3].clone(), s[4].clone(), s[6].clone()];
    assert_eq!(
        owned(&registry.tags(IMAGE).await, "alice"),
        sorted(kept.clone())
    );
    assert_eq!(owned(&registry.tags(IMAGE).await, "bob").len(), 1);

    // manifests only: after the collector, every kept snapshot pulls whole,
    // the one above the deleted middle (step 5) included
    registry.garbage_collect().await;
    for t in &kept {
        registry.pull_whole(IMAGE, t).await;
    }
    let rows = rows_by_tag(
        &run(&registry, &["list", "--user", "alice", "--output", "json"])
            .await
            .ok()
            .json(),
    );
    assert_eq!(
        rows[&s[6]]["added_bytes"],
        json!(size(5) + size(6)),
        "over step 4 now"
    );
    assert_eq!(
        rows[&s[3]]["added_bytes"],
        json!((0..=3).map(size).sum::<u64>()),
        "the oldest: its user layers"
    );
}
