//! The user story end to end on one node: login, install, snapshot, log off,
//! login again, with the real webhook, sidecar, containerd and registry.

use harness::story::Node;

#[tokio::test]
async fn the_demo_plays_the_whole_story() {
    let demo = harness::workspace_binary("demo");
    let out = tokio::process::Command::new(&demo)
        .output()
        .await
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("the user's files are there: notes 1.0, installed by the user | dark"),
        "{stdout}"
    );
    // the sidecar's image, run as injected (CAP_SYS_ADMIN, snapshots mounted), takes the fast path
    assert!(
        stdout.contains("layer read from the container's overlayfs upper directory"),
        "{stdout}"
    );
}

#[tokio::test]
async fn two_users_on_one_node_each_get_their_own_desktop_back() {
    let node = Node::start(&[]).await;
    let alice = node.login("alice").await;
    let bob = node.login("Bob.Smith@example.com").await;
    node.containerd
        .exec(&alice.container, "echo alice > /root/owner")
        .await;
    node.containerd
        .exec(&bob.container, "echo bob > /root/owner")
        .await;
    // alice's sidecar runs with the limits the webhook wrote (256Mi, no CPU limit)
    let sidecar = node.sidecar(&alice, &[]).await;
    let info = node
        .containerd
        .ctr(&[
            "containers",
            "info",
            &format!("snapshot-sidecar-{}", sidecar.port),
        ])
        .await
        .expect("the sidecar's container");
    let spec: serde_json::Value = serde_json::from_str(&info).expect("ctr's JSON");
    let resources = &spec["Spec"]["linux"]["resources"];
    assert_eq!(resources["memory"]["limit"], 268435456, "{resources}");
    assert!(resources["cpu"]["quota"].is_null(), "{resources}");
    sidecar.snapshot_done().await;
    sidecar.stop().await;
    node.snapshot(&bob, &[]).await;
    node.logoff(alice).await;
    node.logoff(bob).await;
    for (user, owner) in [("alice", "alice"), ("Bob.Smith@example.com", "bob")] {
        let desktop = node.login(user).await;
        assert_ne!(
            desktop.image,
            harness::containerd::BASE_IMAGE,
            "{user} restored"
        );
        assert_eq!(
            node.containerd
                .exec(&desktop.container, "cat /root/owner")
                .await
                .trim(),
            owner,
            "{user}"
        );
        node.logoff(desktop).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn snapshot_then_immediate_relogin_gets_the_newest() {
    let node = Node::start(&[]).await;
    let first = node.login("carol").await;
    node.containerd
        .exec(&first.container, "echo 1 > /root/version")
        .await;
    node.snapshot(&first, &[]).await;
    // the webhook has just answered for carol (a warm cache, if it had one)
    let _ = node.admit("carol").await;
    node.containerd
        .exec(&first.container, "echo 2 > /root/version")
        .await;
    node.snapshot(&first, &[]).await;
    node.logoff(first).await;
    let again = node.login("carol").await;
    assert_eq!(
        node.containerd
            .exec(&again.container, "cat /root/version")
            .await
            .trim(),
        "2"
    );
    node.stop().await;
}

/// Seventy days of a desktop under a limit of 16 layers: past it the user's
/// layers are merged into one above the base, whose layer stays the same,
/// byte for byte, in every snapshot; every restored desktop holds what the
/// live one held (whiteouts of base files and of the user's own files, an
/// opaque directory, carried through the merges).
#[tokio::test]
async fn seventy_successive_snapshots_merge_above_the_base_and_all_restore() {
    use snapshot_tags::provenance::FIRST_USER_LAYER;
    const MAX_LAYERS: usize = 16;
    let max = MAX_LAYERS.to_string();
    let node = Node::start(&[]).await;
    let mut desktop = node.login("dave").await;
    let repo = Node::repository_path(&desktop).to_string();
    let mut base_layer: Option<serde_json::Value> = None;
    let mut merged = 0;
    for round in 1..=70u32 {
        let mut change =
            format!("echo {round} > /root/round && echo r{round} > /root/file-{round}");
        if round == 1 {
            change.push_str(
                " && rm /etc/base-file-to-delete && echo changed > /etc/base-file-to-change \
                 && rm -rf /opt/base && mkdir /opt/base && echo mine > /opt/base/new",
            );
        }
        match round {
            10 => change
                .push_str(" && rm /root/file-3 && rm -rf /opt/base && mkdir -p /opt/base/again"),
            // a file of a merged layer, and one of a layer above it
            40 => change.push_str(" && rm /root/file-5 /root/file-35 && mkdir /root/file-5"),
            _ => {}
        }
        node.containerd.exec(&desktop.container, &change).await;
        let live = node.containerd.tree(&desktop.container).await;
        node.snapshot(&desktop, &[("SNAPSHOT_MAX_LAYERS", &max)])
            .await;
        node.logoff(desktop).await;
        desktop = node.login("dave").await;
        assert_eq!(
            node.containerd.tree(&desktop.container).await,
            live,
            "round {round}: the restored desktop is the live one"
        );
        let seen = node
            .containerd
            .exec(&desktop.container, "cat /root/round /etc/os-release")
            .await;
        assert!(
            seen.starts_with(&format!("{round}\n")),
            "round {round}: {seen}"
        );
        assert!(
            seen.contains("desktop-snapshot test base"),
            "round {round}: the base's files"
        );

        let tag = desktop.image.rsplit_once(':').unwrap().1.to_string();
        let (manifest, _) = node.registry.manifest_and_config(&repo, &tag).await;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        assert!(
            layers.len() <= MAX_LAYERS,
            "round {round}: {} layers",
            layers.len()
        );
        assert_eq!(
            manifest["annotations"][FIRST_USER_LAYER], "1",
            "round {round}"
        );
        let first = base_layer.get_or_insert_with(|| layers[0].clone());
        assert_eq!(
            &layers[0], first,
            "round {round}: the base layer, byte for byte"
        );
        if layers.len() == 2 && round > 1 {
            merged += 1;
        }
    }
    // merged at rounds 16, 31, 46 and 61
    assert_eq!(
        merged, 4,
        "the user's layers were merged {merged} times in 70 rounds"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_namespace_without_the_registry_secret_still_starts_desktops() {
    let mut node = Node::start(&[]).await;
    node.forget_registry_objects();
    let desktop = node.login("erin").await;
    assert_eq!(
        node.containerd.task_status(&desktop.container).await,
        "RUNNING"
    );
    // the kubelet starts the sidecar: its secret and CA volumes are optional
    let sidecar = node.sidecar(&desktop, &[]).await;
    let steps = sidecar.snapshot_expecting_error().await;
    let why = steps.last().expect("an error");
    assert!(
        why.contains(".dockerconfigjson") && why.contains("registry secret"),
        "the error says what is missing: {why}"
    );
    assert_eq!(
        node.containerd.task_status(&desktop.container).await,
        "RUNNING"
    );
    sidecar.stop().await;
    // as the real kubelet, ours refuses a volume whose secret is missing and not optional
    let refused = node.kubelet_spec(&desktop, "t-snapshot", |pod| {
        for v in pod["spec"]["volumes"].as_array_mut().into_iter().flatten() {
            if let Some(secret) = v.get_mut("secret") {
                secret["optional"] = serde_json::json!(false);
            }
        }
    });
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("not found")),
        "{:?}",
        refused.map(|_| ())
    );
    node.logoff(desktop).await;
    node.stop().await;
}

#[tokio::test]
async fn every_snapshot_says_what_it_sits_on_and_keeps_the_base_layers() {
    use snapshot_tags::provenance::{BASE_DIGEST, BASE_NAME, FIRST_USER_LAYER, USER};
    let node = Node::start(&[]).await;
    let alice = node.login("alice").await;
    node.containerd
        .exec(&alice.container, "echo 1 > /root/version")
        .await;
    node.snapshot(&alice, &[]).await;
    let repo = Node::repository_path(&alice).to_string();
    let first_tag = node.tags(&alice).await.pop().expect("a snapshot");
    let (m1, c1) = node.registry.manifest_and_config(&repo, &first_tag).await;
    let a1 = &m1["annotations"];
    assert_eq!(a1[BASE_NAME], harness::containerd::BASE_IMAGE, "{m1}");
    assert_eq!(a1[USER], "alice");
    assert!(
        a1[BASE_DIGEST]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{m1}"
    );
    let first: usize = a1[FIRST_USER_LAYER]
        .as_str()
        .and_then(|n| n.parse().ok())
        .expect("the first user layer");
    let layers = |m: &serde_json::Value| m["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        layers(&m1).len(),
        first + 1,
        "the base's layers, then the user's"
    );
    let marks = |c: &serde_json::Value| {
        c["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["comment"] == "desktop-snapshot: the user's changes")
            .count()
    };
    assert_eq!(marks(&c1), 1);
    node.logoff(alice).await;

    // restored, changed, snapshotted again: the same provenance, one more user layer
    let again = node.login("alice").await;
    node.containerd
        .exec(&again.container, "echo 2 > /root/version")
        .await;
    node.snapshot(&again, &[]).await;
    let second_tag = node.tags(&again).await.pop().expect("a snapshot");
    assert_ne!(first_tag, second_tag);
    let (m2, c2) = node.registry.manifest_and_config(&repo, &second_tag).await;
    for key in [BASE_NAME, BASE_DIGEST, FIRST_USER_LAYER, USER] {
        assert_eq!(m2["annotations"][key], a1[key], "{key}");
    }
    assert_eq!(layers(&m2).len(), first + 2);
    assert_eq!(
        layers(&m2)[..=first],
        layers(&m1)[..],
        "earlier layers unchanged, byte for byte"
    );
    assert_eq!(marks(&c2), 2);
    node.stop().await;
}

/// The operator moves desktops from `:4.1` to `:4.2` (both in the snapshot
/// registry); the webhook rebases the user's snapshot, and the desktop that
/// starts holds the new base's files and the user's changes, the user's
/// version winning where both changed a file.
#[tokio::test]
async fn a_snapshot_rebased_onto_a_new_base_restores_both_the_new_base_and_the_user() {
    let node = Node::start(&["--on-new-base", "rebase"]).await;
    let repo = "abcdesktopio/oc.user.rebase";
    let upgrade = harness::registry::layer("opt/base/new-in-4.2", "4.2");
    node.registry.push_on_base(repo, "4.1", &[]).await;
    node.registry.push_on_base(repo, "4.2", &[upgrade]).await;
    let image = |tag: &str| format!("{}/{repo}:{tag}", node.registry.host());

    let desktop = node.login_with("alice", &image("4.1")).await;
    node.containerd
        .exec(
            &desktop.container,
            "mkdir -p /root && echo mine > /root/notes && echo user > /etc/base-file-to-change && rm /etc/base-file-to-delete",
        )
        .await;
    node.snapshot(&desktop, &[]).await;
    let before = node.tags(&desktop).await;
    assert_eq!(before.len(), 1, "{before:?}");
    node.logoff(desktop).await;

    let desktop = node.login_with("alice", &image("4.2")).await;
    let restored = desktop.image.clone();
    assert!(
        restored.starts_with(&format!("{}/{repo}:", node.registry.host()))
            && !before.iter().any(|t| restored.ends_with(t.as_str())),
        "a new, rebased snapshot is restored: {restored}\n{}",
        node.webhook.log()
    );
    let seen = node
        .containerd
        .exec(
            &desktop.container,
            "cat /opt/base/new-in-4.2 /root/notes /etc/base-file-to-change; ls /etc/base-file-to-delete 2>&1 || true",
        )
        .await;
    assert!(seen.contains("layer of 4.2"), "the new base's file: {seen}");
    assert!(seen.contains("mine"), "the user's file: {seen}");
    assert!(
        seen.contains("user\n"),
        "the user's version of a base file: {seen}"
    );
    assert!(seen.contains("No such file"), "the user's deletion: {seen}");
    // the next snapshot sits on the new base
    node.containerd
        .exec(&desktop.container, "echo more > /root/more")
        .await;
    node.snapshot(&desktop, &[]).await;
    let tags = node.tags(&desktop).await;
    let newest = tags.last().expect("a snapshot");
    let (manifest, _) = node
        .registry
        .manifest_and_config(Node::repository_path(&desktop), newest)
        .await;
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.name"],
        serde_json::json!(image("4.2"))
    );
    assert_eq!(
        manifest["annotations"]["io.abcdesktop.snapshot.first-user-layer"],
        "2"
    );
    node.stop().await;
}

/// A merge that needs a user layer the node no longer has (garbage-collected,
/// or never fetched whole by a lazy snapshotter) reads it from the registry.
#[tokio::test]
async fn a_merge_reads_the_user_layers_the_node_lacks_from_the_registry() {
    let max = [("SNAPSHOT_MAX_LAYERS", "3")];
    let node = Node::start(&[]).await;
    let mut desktop = node.login("erin").await;
    let repo = Node::repository_path(&desktop).to_string();
    for round in 1..=2 {
        node.containerd
            .exec(
                &desktop.container,
                &format!("echo {round} > /root/file-{round}"),
            )
            .await;
        node.snapshot(&desktop, &max).await;
        node.logoff(desktop).await;
        desktop = node.login("erin").await;
    }
    // the restored image has the base layer and two user layers: drop the user's from the node
    let tag = desktop.image.rsplit_once(':').unwrap().1.to_string();
    let (manifest, _) = node.registry.manifest_and_config(&repo, &tag).await;
    let layers = manifest["layers"].as_array().cloned().unwrap();
    assert_eq!(layers.len(), 3);
    for layer in &layers[1..] {
        let digest = layer["digest"].as_str().unwrap();
        node.containerd
            .ctr(&["content", "rm", digest])
            .await
            .expect("removing a user layer from the content store");
    }
    node.containerd
        .exec(
            &desktop.container,
            "echo 3 > /root/file-3 && rm /root/file-1",
        )
        .await;
    let live = node.containerd.tree(&desktop.container).await;
    let sidecar = node.sidecar(&desktop, &max).await;
    sidecar.snapshot_done().await;
    let log = sidecar.log();
    sidecar.stop().await;
    assert!(
        log.contains("reading it from the registry"),
        "the merge fetched the missing layers:\n{log}"
    );
    node.logoff(desktop).await;
    let desktop = node.login("erin").await;
    assert_eq!(node.containerd.tree(&desktop.container).await, live);
    let tag = desktop.image.rsplit_once(':').unwrap().1.to_string();
    let (manifest, _) = node.registry.manifest_and_config(&repo, &tag).await;
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        2,
        "merged above the base"
    );
    node.stop().await;
}

/// A snapshot pushed before provenance annotations, restored on a node that
/// never pulled its base image: the sidecar reads the base from its registry
/// and the next snapshot says what it sits on.
#[tokio::test]
async fn a_legacy_snapshot_on_a_node_without_its_base_gets_its_provenance_from_the_registry() {
    let node = Node::start(&[]).await;
    let repo = "abcdesktopio/oc.user.legacy";
    node.registry.push_on_base(repo, "4.1", &[]).await;
    // what an older version pushed: the base's layers and the user's, no annotations
    let user_layer = harness::registry::layer("root/legacy", "frank");
    node.registry
        .push_on_base(repo, "frank-100", &[user_layer])
        .await;
    let base = format!("{}/{repo}:4.1", node.registry.host());
    let desktop = node.login_with("frank", &base).await;
    assert!(desktop.image.ends_with(":frank-100"), "{}", desktop.image);
    node.containerd
        .exec(&desktop.container, "echo more > /root/more")
        .await;
    node.snapshot(&desktop, &[]).await;
    let tags = node.tags(&desktop).await;
    let newest = tags.last().expect("a snapshot");
    let (manifest, _) = node.registry.manifest_and_config(repo, newest).await;
    let a = &manifest["annotations"];
    assert_eq!(
        a["org.opencontainers.image.base.name"],
        serde_json::json!(base)
    );
    assert_eq!(a["io.abcdesktop.snapshot.first-user-layer"], "1");
    node.stop().await;
}
