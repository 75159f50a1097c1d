//! End to end: the real snapshot-sidecar commits a running desktop container
//! through a real containerd and pushes it to a real registry.

use harness::{
    containerd::Containerd,
    registry::{Registry, PASSWORD, USER},
    sidecar::{layers, Sidecar, Target},
};

const REPO: &str = "abcdesktopio/oc.user.test";

struct Setup {
    containerd: Containerd,
    registry: Registry,
    creds: std::path::PathBuf,
}

impl Setup {
    async fn new() -> Self {
        Self::with(Registry::start().await).await
    }

    async fn with(registry: Registry) -> Self {
        let containerd = Containerd::start().await;
        containerd.import_base_image().await;
        containerd
            .run_desktop("desk-a", "pod-a", "12896316-aaaaa", "x-graphical")
            .await;
        containerd
            .run_desktop("desk-b", "pod-b", "12896317-bbbbb", "x-graphical")
            .await;
        let creds = registry.dir.path().join("dockerconfig.json");
        registry.write_dockerconfigjson(&creds, USER, PASSWORD);
        Self {
            containerd,
            registry,
            creds,
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            containerd: &self.containerd,
            pod_uid: "pod-a",
            registry_host: &self.registry.host,
            registry_ca: Some(self.registry.dir.path().join("ca.crt").leak()),
            credentials: Some(&self.creds),
            repository_path: REPO,
            tag_prefix: "alice",
        }
    }

    /// [`Setup::target`] reached through `proxy`: credentials for its host,
    /// written into the file `name`.
    fn through<'a>(
        &'a self,
        proxy: &'a harness::badregistry::FailingProxy,
        name: &str,
    ) -> Target<'a> {
        let creds = self.registry.dir.path().join(name);
        self.registry.write_dockerconfigjson(&creds, USER, PASSWORD);
        let doc = std::fs::read_to_string(&creds)
            .unwrap()
            .replace(&self.registry.host, &proxy.host);
        std::fs::write(&creds, doc).unwrap();
        Target {
            registry_host: &proxy.host,
            registry_ca: Some(proxy.ca_path().leak()),
            credentials: Some(creds.leak()),
            ..self.target()
        }
    }

    async fn snapshot_tags(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .registry
            .tags(REPO)
            .await
            .into_iter()
            .filter(|t| t.starts_with("alice-"))
            .collect();
        t.sort_by_key(|t| t.trim_start_matches("alice-").parse::<u128>().unwrap_or(0));
        t
    }
}

fn file<'a>(layer: &'a [(String, Vec<u8>)], path: &str) -> Option<&'a [u8]> {
    layer
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, d)| d.as_slice())
}

#[tokio::test]
async fn a_snapshot_holds_the_users_changes_and_nothing_else() {
    let s = Setup::new().await;
    s.containerd
        .exec(
            "desk-a",
            "echo installed > /root/new.txt && mkdir -p /opt/app && echo app > /opt/app/bin && \
             echo changed > /etc/base-file-to-change && rm /etc/base-file-to-delete",
        )
        .await;
    s.containerd
        .exec("desk-b", "echo other > /root/other-user.txt")
        .await;
    let sidecar = Sidecar::start(s.target()).await;
    let steps = sidecar.snapshot().await;
    assert_eq!(
        steps.last().map(String::as_str),
        Some("done"),
        "steps {steps:?}; log:\n{}",
        sidecar.log()
    );
    for step in ["generate desktop image", "push desktop image to registry"] {
        assert!(
            steps.iter().any(|m| m == step) || steps.len() >= 2,
            "{steps:?}"
        );
    }
    assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
    assert_eq!(
        s.containerd.task_status("desk-b").await,
        "RUNNING",
        "the other pod's container is untouched"
    );

    let tags = s.snapshot_tags().await;
    assert_eq!(tags.len(), 1, "{tags:?}");
    let first = layers(&s.registry, REPO, &tags[0]).await;
    assert_eq!(first.len(), 2, "the base layer and the user's layer");
    let (base, user) = (&first[0], &first[1]);
    assert_eq!(
        file(base, "etc/os-release"),
        Some(&b"NAME=\"desktop-snapshot test base\"\n"[..]),
        "base intact"
    );
    assert_eq!(file(base, "opt/base/keep"), Some(&b"kept\n"[..]));
    assert_eq!(file(user, "root/new.txt"), Some(&b"installed\n"[..]));
    assert_eq!(file(user, "opt/app/bin"), Some(&b"app\n"[..]));
    assert_eq!(
        file(user, "etc/base-file-to-change"),
        Some(&b"changed\n"[..])
    );
    assert!(
        file(user, "etc/.wh.base-file-to-delete").is_some(),
        "the deletion is a whiteout: {:?}",
        user.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>()
    );
    assert!(
        file(user, "root/other-user.txt").is_none(),
        "nothing of the other pod"
    );
    assert!(file(user, "opt/base/keep").is_none(), "only the changes");
    assert!(!sidecar.log().contains(PASSWORD));

    let base_uploads = |log: &str| log.matches("uploading a base layer").count();
    assert_eq!(
        base_uploads(&sidecar.log()),
        1,
        "the base layer went up once"
    );

    // a second snapshot: one more tag, the newest, with the new change; the
    // base layer is not uploaded again
    s.containerd
        .exec("desk-a", "echo second > /root/second.txt")
        .await;
    sidecar.snapshot_done().await;
    let tags = s.snapshot_tags().await;
    assert_eq!(tags.len(), 2);
    let second = layers(&s.registry, REPO, &tags[1]).await;
    assert!(file(second.last().unwrap(), "root/second.txt").is_some());
    assert_eq!(
        base_uploads(&sidecar.log()),
        1,
        "only the new layer was uploaded the second time"
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn bad_credentials_end_in_error_with_the_task_running_and_no_tag() {
    let s = Setup::new().await;
    let wrong = s.registry.dir.path().join("wrong.json");
    s.registry
        .write_dockerconfigjson(&wrong, USER, "not-the-password");
    let sidecar = Sidecar::start(Target {
        credentials: Some(&wrong),
        ..s.target()
    })
    .await;
    let started = sidecar.post("/snapshot").await;
    let id = started["session_id"].as_str().unwrap().to_string();
    let steps = sidecar.wait(&id).await;
    let (_, last) = sidecar.get(&format!("/snapshot/{id}")).await;
    assert_eq!(last["status"], "error", "{steps:?}");
    assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
    assert!(s.snapshot_tags().await.is_empty());
    assert!(!sidecar.log().contains("not-the-password"));
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// Issue 19 §1: without usable credentials for the registry the snapshot
/// fails at once and the desktop is never paused (a click used to pause it,
/// build the layer, and only then fail).
#[tokio::test]
async fn without_credentials_for_the_registry_a_snapshot_fails_before_any_pause() {
    let s = Setup::new().await;
    let events = s.containerd.events("desk-a").await;
    let dir = s.registry.dir.path();
    let (missing, garbage, elsewhere) = (
        dir.join("missing/.dockerconfigjson"),
        dir.join("garbage.json"),
        dir.join("elsewhere.json"),
    );
    std::fs::write(&garbage, "not a document").unwrap();
    harness::registry::write_dockerconfigjson(&elsewhere, "other.example:5000", USER, PASSWORD);
    let host = s.registry.host.clone();
    // (credentials file, what the error names)
    let cases: [(&std::path::Path, &[&str]); 3] = [
        (
            &missing,
            &[".dockerconfigjson does not exist", "registry secret", &host],
        ),
        (
            &garbage,
            &["garbage.json", "not a .dockerconfigjson document"],
        ),
        (
            &elsewhere,
            &["elsewhere.json", &format!("no entry for {host}")],
        ),
    ];
    for (file, names) in cases {
        let sidecar = Sidecar::start(Target {
            credentials: Some(file),
            ..s.target()
        })
        .await;
        let steps = sidecar.snapshot_expecting_error().await;
        let why = steps.last().expect("an error");
        for name in names {
            assert!(why.contains(name), "{file:?}: {name:?} not in {why:?}");
        }
        assert!(why.contains("the desktop was not paused"), "{why}");
        assert!(
            !steps.iter().any(|m| m == "generate desktop image"),
            "{steps:?}"
        );
        assert!(!sidecar.log().contains(PASSWORD));
        assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
        sidecar.stop().await;
    }
    assert_eq!(
        events.count("/tasks/paused", "desk-a"),
        0,
        "{:#?}",
        events.lines()
    );
    assert!(s.snapshot_tags().await.is_empty());
    // the same desktop with its credentials: paused (the recording sees it), pushed
    let sidecar = Sidecar::start(s.target()).await;
    sidecar.snapshot_done().await;
    assert!(
        events.count("/tasks/paused", "desk-a") >= 1,
        "{:#?}",
        events.lines()
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn registry_refused_ends_in_error_with_the_task_running() {
    let s = Setup::new().await;
    let refused = format!("127.0.0.1:{}", harness::ports::free_port());
    let creds = s.registry.dir.path().join("refused.json");
    harness::registry::write_dockerconfigjson(&creds, &refused, USER, PASSWORD);
    let sidecar = Sidecar::start(Target {
        registry_host: &refused,
        credentials: Some(&creds),
        ..s.target()
    })
    .await;
    let steps = sidecar.snapshot_expecting_error().await;
    assert!(steps.last().unwrap().contains("127.0.0.1"), "{steps:?}");
    assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn containerd_unreachable_is_a_clear_error() {
    let s = Setup::new().await;
    let missing = s.registry.dir.path().join("no-such.sock");
    let sidecar = Sidecar::start_with_socket(s.target(), Some(&missing)).await;
    let steps = sidecar.snapshot_expecting_error().await;
    assert!(
        steps.last().unwrap().contains("cannot reach containerd"),
        "{steps:?}"
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn two_requests_share_one_operation_and_unknown_sessions_are_404() {
    let s = Setup::new().await;
    let sidecar = Sidecar::start(s.target()).await;
    let (a, b) = tokio::join!(
        sidecar.post("/snapshot/snapshot"),
        sidecar.post("/snapshot")
    );
    assert_eq!(a["session_id"], b["session_id"], "{a} {b}");
    let id = a["session_id"].as_str().unwrap().to_string();
    let steps = sidecar.wait(&id).await;
    assert_eq!(
        steps.last().map(String::as_str),
        Some("done"),
        "{steps:?}; log:\n{}",
        sidecar.log()
    );
    assert_eq!(s.snapshot_tags().await.len(), 1, "one commit, not two");
    let (status, v) = sidecar.get("/snapshot/no-such-session").await;
    assert_eq!(
        (status, v["message"].as_str()),
        (404, Some("unknown session"))
    );
    let (status, v) = sidecar.get("/snapshot/version").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "success");
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn past_the_layer_limit_the_desktop_is_squashed_into_one_layer() {
    let s = Setup::new().await;
    s.containerd
        .exec(
            "desk-a",
            "echo installed > /root/new.txt && rm /etc/base-file-to-delete",
        )
        .await;
    let sidecar = Sidecar::start_with(s.target(), None, &[("SNAPSHOT_MAX_LAYERS", "1")]).await;
    sidecar.snapshot_done().await;
    let tags = s.snapshot_tags().await;
    let image = layers(&s.registry, REPO, &tags[0]).await;
    assert_eq!(image.len(), 1, "squashed into one layer");
    let all = &image[0];
    assert!(file(all, "root/new.txt").is_some(), "the user's file");
    assert!(
        file(all, "etc/os-release").is_some() && file(all, "bin/busybox").is_some(),
        "the base's files"
    );
    assert!(
        file(all, "etc/base-file-to-delete").is_none(),
        "the deleted file stays deleted"
    );
    assert!(
        !all.iter().any(|(p, _)| p.contains(".wh.")),
        "no whiteouts in a squashed layer"
    );
    assert!(sidecar.log().contains("squashing"));
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn sigterm_during_a_commit_leaves_the_desktop_running() {
    let s = Setup::new().await;
    // enough data that the diff takes a while
    s.containerd
        .exec(
            "desk-a",
            "dd if=/dev/zero of=/root/big bs=1048576 count=400 2>/dev/null; sync",
        )
        .await;
    // paused for the whole read (with pre-copy the pause is too short to see)
    let sidecar = Sidecar::start_with(s.target(), None, &[("SNAPSHOT_PRE_COPY", "false")]).await;
    let started = sidecar.post("/snapshot").await;
    let id = started["session_id"].as_str().unwrap().to_string();
    let mut paused = false;
    for _ in 0..500 {
        if s.containerd.task_status("desk-a").await == "PAUSED" {
            paused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        paused,
        "never saw the task paused; steps: {:?}",
        sidecar.get(&format!("/snapshot/{id}")).await
    );
    let (ended, log) = sidecar.terminate().await;
    assert!(ended.success, "exit {ended}; log:\n{log}");
    assert_eq!(
        s.containerd.task_status("desk-a").await,
        "RUNNING",
        "log:\n{log}"
    );
    assert!(
        s.snapshot_tags().await.is_empty(),
        "an interrupted commit leaves no tag"
    );
    s.containerd.stop().await;
}

#[tokio::test]
async fn the_api_can_require_a_bearer_token_and_counts_operations() {
    let s = Setup::new().await;
    let token = s.registry.dir.path().join("api-token");
    std::fs::write(&token, "front-end-jwt\n").unwrap();
    let token_path = token.to_string_lossy().into_owned();
    let sidecar = Sidecar::start_with(
        s.target(),
        None,
        &[("SNAPSHOT_API_TOKEN_FILE", &token_path)],
    )
    .await;
    let refused = reqwest::Client::new()
        .post(sidecar.url("/snapshot"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let steps = sidecar.snapshot().await; // sends the right token
    assert_eq!(steps.last().map(String::as_str), Some("done"), "{steps:?}");
    let metrics = reqwest::get(sidecar.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("snapshot_sidecar_snapshots_total{trigger=\"click\",result=\"done\"} 1"),
        "{metrics}"
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn zstd_snapshots_restore_too() {
    let s = Setup::new().await;
    s.containerd.exec("desk-a", "echo zstd > /root/z.txt").await;
    let sidecar = Sidecar::start_with(s.target(), None, &[("SNAPSHOT_COMPRESSION", "zstd")]).await;
    sidecar.snapshot_done().await;
    let tag = s.snapshot_tags().await.remove(0);
    let image = format!("{}/{REPO}:{tag}", s.registry.host);
    // the runtime reads it: pull, start, find the file
    s.containerd.pull(&image, &s.registry).await;
    s.containerd
        .run_desktop_from(&image, "desk-z", "pod-z", "1-z", "x-graphical")
        .await;
    assert_eq!(
        s.containerd.exec("desk-z", "cat /root/z.txt").await.trim(),
        "zstd"
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// Base layers the target repository lacks: mounted within one registry, and
/// streamed from the base image's registry when the node no longer has them.
#[tokio::test]
async fn base_layers_are_mounted_or_streamed_from_the_base_registry() {
    use base64::Engine;
    let s = Setup::new().await;
    s.containerd
        .exec("desk-a", "echo first > /root/first.txt")
        .await;
    let sidecar = Sidecar::start(s.target()).await;
    sidecar.snapshot_done().await;
    sidecar.stop().await;
    let tag = s.snapshot_tags().await.remove(0);
    let image = format!("{}/{REPO}:{tag}", s.registry.host);
    s.containerd.pull(&image, &s.registry).await;
    s.containerd
        .run_desktop_from(&image, "desk-c", "pod-c", "1-c", "x-graphical")
        .await;
    s.containerd
        .exec("desk-c", "echo third > /root/third.txt")
        .await;

    // same registry, another repository: mounted, not uploaded
    let mut per_user = s.target();
    per_user.pod_uid = "pod-c";
    per_user.repository_path = "alice/abcdesktopio/oc.user.test";
    let sidecar = Sidecar::start(per_user).await;
    sidecar.snapshot_done().await;
    assert!(
        sidecar.log().contains("base layer mounted"),
        "{}",
        sidecar.log()
    );
    assert!(
        !sidecar.log().contains("uploading a base layer"),
        "{}",
        sidecar.log()
    );
    sidecar.stop().await;

    // the node lost the base layers; the target is another registry: streamed from the first
    let client = s.registry.oci_client();
    let auth = oci_client::secrets::RegistryAuth::Basic(USER.into(), PASSWORD.into());
    let reference: oci_client::Reference = image.parse().unwrap();
    let (manifest, _) = client.pull_image_manifest(&reference, &auth).await.unwrap();
    for layer in &manifest.layers {
        s.containerd
            .ctr(&["content", "rm", &layer.digest])
            .await
            .unwrap();
    }
    let other = Registry::start().await;
    let both = s.registry.dir.path().join("both.json");
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let entry = serde_json::json!({"username": USER, "password": PASSWORD, "auth": b64});
    std::fs::write(&both, serde_json::json!({"auths": {s.registry.host.clone(): entry.clone(), other.host.clone(): entry}}).to_string()).unwrap();
    let bundle = s.registry.dir.path().join("bundle.crt");
    std::fs::write(&bundle, format!("{}{}", s.registry.ca_pem, other.ca_pem)).unwrap();
    let bundle_path: &'static std::path::Path = bundle.leak();
    let sidecar = Sidecar::start(Target {
        containerd: &s.containerd,
        pod_uid: "pod-c",
        registry_host: &other.host,
        registry_ca: Some(bundle_path),
        credentials: Some(&both),
        repository_path: REPO,
        tag_prefix: "alice",
    })
    .await;
    sidecar.snapshot_done().await;
    assert!(
        sidecar
            .log()
            .contains("streaming a base layer from the base image's registry"),
        "{}",
        sidecar.log()
    );
    let tags: Vec<String> = other.tags(REPO).await;
    let restored = layers(&other, REPO, &tags[0]).await;
    assert_eq!(restored.len(), 3, "base, first snapshot, new layer");
    assert!(
        file(&restored[1], "root/first.txt").is_some()
            && file(&restored[2], "root/third.txt").is_some()
    );
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// The registry answers 500 in the middle of the push: on a layer upload, or on
/// the manifest itself. The operation ends in `error`, the desktop runs on, and
/// no tag appears: the previous snapshot stays the newest.
#[tokio::test]
async fn a_500_in_the_middle_of_a_push_leaves_no_tag() {
    use harness::badregistry::FailingProxy;
    let s = Setup::new().await;
    s.containerd.exec("desk-a", "echo x > /root/x.txt").await;
    type Failing = fn(&str, &str) -> bool;
    let cases: [(&str, Failing); 2] = [
        ("layer upload", |m, p| {
            (m == "PATCH" || m == "PUT") && p.contains("/blobs/uploads/")
        }),
        ("manifest", |m, p| m == "PUT" && p.contains("/manifests/")),
    ];
    for (what, fail) in cases {
        let proxy = FailingProxy::start(&s.registry, fail).await;
        let sidecar =
            Sidecar::start(s.through(&proxy, &format!("proxy-{}.json", what.len()))).await;
        let steps = sidecar.snapshot_expecting_error().await;
        assert!(
            steps.iter().any(|m| m == "push desktop image to registry"),
            "{what}: {steps:?}"
        );
        assert!(steps.last().unwrap().contains("500"), "{what}: {steps:?}");
        assert_eq!(
            s.containerd.task_status("desk-a").await,
            "RUNNING",
            "{what}"
        );
        assert!(s.snapshot_tags().await.is_empty(), "{what}: no tag");
        sidecar.stop().await;
    }
    s.containerd.stop().await;
}

/// A large layer put together after the resume (pre-copy) goes to the
/// registry while it is written: an upload session opened, its bytes sent as
/// the spool grows, the session closed with the digest at the end; with
/// htpasswd and with a token service. A registry (here a proxy) that refuses
/// the streamed PATCH gets the layer in one request after it is written.
/// Either way the snapshot holds the desktop's file whole. A logoff that
/// finds the same change (increments off: a full layer again) drops the
/// upload it began while the layer was put together: no second tag, the
/// sidecar exits cleanly.
#[tokio::test]
async fn a_large_layer_is_uploaded_while_it_is_written_or_in_one_request_after() {
    use harness::{badregistry::FailingProxy, registry::Auth};
    const BIG: usize = 24 << 20;
    for auth in ["basic", "token", "patch refused"] {
        let registry = match auth {
            "token" => Registry::start_with(Auth::Token { lifetime_secs: 60 }).await,
            _ => Registry::start().await,
        };
        let s = Setup::with(registry).await;
        s.containerd
            .exec(
                "desk-a",
                &format!(
                    "head -c {BIG} /dev/urandom > /root/big && sha256sum /root/big > /root/big.sum"
                ),
            )
            .await;
        let proxy = match auth {
            "patch refused" => Some(
                FailingProxy::start(&s.registry, |m, p| {
                    m == "PATCH" && p.contains("/blobs/uploads/")
                })
                .await,
            ),
            _ => None,
        };
        let target = match &proxy {
            Some(proxy) => s.through(proxy, "proxy.json"),
            None => s.target(),
        };
        let env = [
            ("SNAPSHOT_LAYER_FORMAT", "gzip"),
            ("SNAPSHOT_INCREMENTAL", "false"),
            ("SNAPSHOT_MIN_INTERVAL", "0s"),
            ("SNAPSHOT_ON_LOGOFF", "true"),
        ];
        let sidecar = Sidecar::start_with(target, None, &env).await;
        sidecar.snapshot_done().await;
        let log = sidecar.log();
        let streamed = log.contains(r#""while_written":true"#);
        let refused = log.contains("could not be uploaded while it was written");
        match auth {
            "patch refused" => assert!(!streamed && refused, "{auth}: {log}"),
            _ => assert!(streamed && !refused, "{auth}: {log}"),
        }
        if auth == "basic" {
            let (ended, log) = sidecar.terminate().await;
            assert!(ended.success, "exit {ended}; log:\n{log}");
            let count = |what: &str| log.matches(what).count();
            assert_eq!(count("desktop image generated"), 2, "{log}");
            assert_eq!(count("snapshot layer uploaded"), 1, "{log}");
            assert!(
                count("nothing changed since the last snapshot") > 0,
                "{log}"
            );
        } else {
            sidecar.stop().await;
        }
        let tags = s.snapshot_tags().await;
        assert_eq!(tags.len(), 1, "{auth}: {tags:?}");
        let layers = layers(&s.registry, REPO, &tags[0]).await;
        let files = layers.last().expect("the snapshot's layer");
        let file = |name: &str| {
            files
                .iter()
                .find(|(path, _)| path == name)
                .map(|(_, data)| data.clone())
                .unwrap_or_else(|| panic!("{auth}: {name} is not in the layer"))
        };
        let big = file("root/big");
        assert_eq!(big.len(), BIG, "{auth}");
        let sum = String::from_utf8(file("root/big.sum")).unwrap();
        assert!(
            sum.starts_with(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big))),
            "{auth}: {sum}"
        );
        s.containerd.stop().await;
    }
}

#[tokio::test]
async fn the_upper_directory_and_the_diff_service_restore_the_same_desktop() {
    let s = Setup::new().await;
    s.containerd
        .exec(
            "desk-a",
            "echo installed > /root/new.txt && ln /root/new.txt /root/hard && \
             ln -s /root/new.txt /root/sym && mkfifo /root/pipe && \
             mkdir -p /root/a/b/c && echo deep > /root/a/b/c/d && \
             chmod 600 /etc/os-release && chown 1234:4321 /root/new.txt && \
             echo changed > /etc/base-file-to-change && rm /etc/base-file-to-delete && \
             rm -rf /opt/base && mkdir /opt/base && echo fresh > /opt/base/fresh",
        )
        .await;
    let live = s.containerd.tree("desk-a").await;
    assert!(
        live.contains("root/hard regular file 644 1234:4321 10\nlinks 2"),
        "{live}"
    );
    assert!(!live.contains("opt/base/keep"), "{live}");

    let mut images = Vec::new();
    for source in ["auto", "diff-service"] {
        let sidecar = Sidecar::start_with(
            Target {
                tag_prefix: &format!("alice-{source}"),
                ..s.target()
            },
            None,
            &[("SNAPSHOT_LAYER_SOURCE", source)],
        )
        .await;
        sidecar.snapshot_done().await;
        let used = if source == "auto" {
            "upperdir"
        } else {
            "diff-service"
        };
        let metrics = sidecar.metrics().await;
        assert!(
            metrics.contains(&format!(
                "snapshot_sidecar_layers_total{{source=\"{used}\"}} 1"
            )),
            "{metrics}\n{}",
            sidecar.log()
        );
        assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
        sidecar.stop().await;
        let tag = s
            .registry
            .tags(REPO)
            .await
            .into_iter()
            .find(|t| t.starts_with(&format!("alice-{source}-")))
            .expect("the snapshot's tag");
        images.push((source, format!("{}/{REPO}:{tag}", s.registry.host)));
    }
    for (i, (source, image)) in images.iter().enumerate() {
        s.containerd.pull(image, &s.registry).await;
        let id = format!("restored-{i}");
        s.containerd
            .run_desktop_from(
                image,
                &id,
                &format!("pod-r{i}"),
                &format!("r{i}"),
                "x-graphical",
            )
            .await;
        let restored = s.containerd.tree(&id).await;
        assert_eq!(
            restored, live,
            "the desktop restored from the {source} layer"
        );
    }
    s.containerd.stop().await;
}

#[tokio::test]
async fn without_cap_sys_admin_the_layer_comes_from_the_diff_service() {
    let s = Setup::new().await;
    s.containerd
        .exec(
            "desk-a",
            "echo installed > /root/new.txt && rm -rf /opt/base",
        )
        .await;
    let sidecar = Sidecar::start_without_sys_admin(s.target(), &[]).await;
    sidecar.snapshot_done().await;
    assert!(
        sidecar.log().contains("CAP_SYS_ADMIN"),
        "the log says why: {}",
        sidecar.log()
    );
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("snapshot_sidecar_layers_total{source=\"diff-service\"} 1"),
        "{metrics}"
    );
    let tags = s.snapshot_tags().await;
    let user = layers(&s.registry, REPO, &tags[0])
        .await
        .pop()
        .expect("the user's layer");
    assert_eq!(file(&user, "root/new.txt"), Some(&b"installed\n"[..]));
    assert!(file(&user, "opt/base/keep").is_none());
    sidecar.stop().await;
    s.containerd.stop().await;
}

#[tokio::test]
async fn base_layers_are_asked_about_together_and_once() {
    let s = Setup::new().await;
    let sidecar = Sidecar::start(s.target()).await;
    sidecar.snapshot().await;
    s.containerd.exec("desk-a", "echo 2 > /root/again").await;
    sidecar.snapshot().await;
    let asked: Vec<(u64, u64)> = sidecar
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "base layers checked")
        .map(|l| {
            (
                l["layers"].as_u64().unwrap_or(0),
                l["asked"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(asked.len(), 2, "{}", sidecar.log());
    let (layers, first) = asked[0];
    assert!(
        layers >= 1 && first == layers,
        "the first push asks about each base layer: {asked:?}"
    );
    assert_eq!(asked[1].1, 0, "the second knows them: {asked:?}");
}
