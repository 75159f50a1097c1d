//! End to end: the real snapshot-webhook binary over HTTPS (CA-checked, as
//! kube-apiserver calls it) against a real registry (docker-registry, TLS,
//! htpasswd or token auth), with AdmissionReview v1 bodies built from a
//! realistic abcdesktop desktop pod.

use harness::{
    admission::{self, apply, as_pod, desktop_pod, image_of, review, warnings},
    badregistry::{BadRegistry, Misbehaviour},
    registry::{Auth, Registry, PASSWORD, USER},
    webhook::{client_trusting, RegistryAccess, Webhook},
};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const IMAGE: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1";
const REPO: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04";
const STATUS: &str = "snapshot.abcdesktop.io/status";

/// A registry with credentials on disk, and a webhook using it.
struct Setup {
    registry: Registry,
    webhook: Webhook,
}

impl Setup {
    async fn new(extra: &[&str]) -> Self {
        Self::with(Registry::start().await, extra).await
    }

    async fn with(registry: Registry, extra: &[&str]) -> Self {
        let webhook = Webhook::for_registry(&registry, extra).await;
        Self { registry, webhook }
    }

    fn snapshot(&self, tag: &str) -> String {
        format!("{}/{REPO}:{tag}", self.registry.host)
    }
}

async fn admit(webhook: &Webhook, object: &Value, operation: &str, dry_run: bool) -> Value {
    let body = review(object, operation, dry_run);
    let answer = webhook.admit(&body).await;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"], body["request"]["uid"],
        "the uid is echoed"
    );
    if answer["response"]
        .get("patch")
        .is_some_and(|p| !p.is_null())
    {
        assert_eq!(
            answer["response"]["patchType"], "JSONPatch",
            "a patch comes with patchType JSONPatch: {answer}"
        );
    }
    answer
}

/// Admits a CREATE of `user`'s desktop pod; returns the answer and the patched pod.
async fn login(webhook: &Webhook, user: &str) -> (Value, Value) {
    let pod = desktop_pod(user, IMAGE);
    let answer = admit(webhook, &pod, "CREATE", false).await;
    let patched = apply(&pod, &answer);
    (answer, patched)
}

fn allowed(answer: &Value) -> bool {
    admission::response(answer)["allowed"] == json!(true)
}

fn sidecar_of(patched: &Value) -> Option<k8s_openapi::api::core::v1::Container> {
    as_pod(patched)
        .spec?
        .containers
        .into_iter()
        .find(|c| c.name == "t-snapshot")
}

fn env_of(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[tokio::test]
async fn first_login_keeps_the_image_and_injects_the_sidecar() {
    let s = Setup::new(&[]).await;
    let (answer, patched) = login(&s.webhook, "12896316").await;
    assert!(allowed(&answer));
    assert!(warnings(&answer).is_empty(), "{:?}", warnings(&answer));
    let pod = as_pod(&patched);
    assert_eq!(image_of(&pod, "x-graphical").as_deref(), Some(IMAGE));
    let sidecar = sidecar_of(&patched).expect("t-snapshot injected");
    assert_eq!(sidecar.ports.as_ref().unwrap()[0].container_port, 29785);
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
        Some("12896316")
    );
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_REPOSITORY"),
        Some(format!("{}/{REPO}", s.registry.host))
    );
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    let secret = volumes
        .iter()
        .find_map(|v| v.secret.as_ref())
        .expect("the registry secret volume");
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("abcdesktop-snapshot-registry")
    );
    let socket = volumes
        .iter()
        .find_map(|v| v.host_path.as_ref())
        .expect("the containerd socket");
    assert_eq!(socket.type_.as_deref(), Some("Socket"));
    // the secret is mounted in the sidecar only
    let mounts_secret = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "snapshot-registry-credentials")
    };
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers.iter().filter(|c| mounts_secret(c)).count(),
        1
    );
    assert!(
        spec.image_pull_secrets.is_none(),
        "no pull secret is needed for the original image"
    );
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()[STATUS],
        "no snapshot yet"
    );
    assert!(
        !patched.to_string().contains(PASSWORD),
        "no credential in the pod"
    );
    assert!(
        !s.webhook.log().contains(PASSWORD),
        "no credential in the logs"
    );
}

#[tokio::test]
async fn the_newest_snapshot_wins_as_a_number_and_lookalikes_never_count() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(
            REPO,
            &[
                "12896316-999",
                "12896316-1700000000",
                "12896316-1000",
                "12896316-1700000000000000000",
                "12896316-1-99999999999999999999",
                "128963160-99999999999999999999",
                "x12896316-99999999999999999999",
                "12896316-latest",
                "4.1",
            ],
        )
        .await;
    let (answer, patched) = login(&s.webhook, "12896316").await;
    assert!(allowed(&answer));
    let pod = as_pod(&patched);
    assert_eq!(
        image_of(&pod, "x-graphical"),
        Some(s.snapshot("12896316-1700000000000000000"))
    );
    let spec = pod.spec.as_ref().unwrap();
    let secrets = spec.image_pull_secrets.as_ref().expect("pull secret added");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].name, "abcdesktop-snapshot-registry");
    let status = &pod.metadata.annotations.as_ref().unwrap()[STATUS];
    assert!(status.starts_with("restored "), "{status}");
    // every other container is untouched
    let original = as_pod(&desktop_pod("12896316", IMAGE));
    for name in ["c-printer", "s-sound", "f-filer"] {
        assert_eq!(image_of(&pod, name), image_of(&original, name));
    }
    assert_eq!(
        spec.init_containers,
        original.spec.as_ref().unwrap().init_containers
    );
    // a user whose id the other tags start with gets their own
    let (_, patched) = login(&s.webhook, "12896316-1").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("12896316-1-99999999999999999999"))
    );
}

#[tokio::test]
async fn user_ids_with_special_characters_map_to_their_own_tags() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(
            REPO,
            &["jdoe_40example.com-5", "jdoe-9", "jdoe.example.com-7"],
        )
        .await;
    let (_, patched) = login(&s.webhook, "jdoe@example.com").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("jdoe_40example.com-5"))
    );
    let sidecar = sidecar_of(&patched).unwrap();
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
        Some("jdoe_40example.com")
    );
}

#[tokio::test]
async fn per_user_layout() {
    let s = Setup::new(&["--layout", "per-user"]).await;
    s.registry
        .push_tags(
            &format!("alice/{REPO}"),
            &["4.1-100", "4.1-20", "4.0-90", "latest"],
        )
        .await;
    s.registry
        .push_tags(&format!("bob/{REPO}"), &["4.1-500"])
        .await;
    let (_, patched) = login(&s.webhook, "alice").await;
    let want = format!("{}/alice/{REPO}:4.1-100", s.registry.host);
    assert_eq!(image_of(&as_pod(&patched), "x-graphical"), Some(want));
    let sidecar = sidecar_of(&patched).unwrap();
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_REPOSITORY"),
        Some(format!("{}/alice/{REPO}", s.registry.host))
    );
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
        Some("4.1")
    );
    let (_, patched) = login(&s.webhook, "carol").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical").as_deref(),
        Some(IMAGE)
    );
}

/// A registry that fails in `kind`: the pod is admitted on time with its image,
/// the sidecar, a warning, and the failure counted.
async fn registry_failure_admits_unchanged(
    host: &str,
    ca: Option<&std::path::Path>,
    creds: Option<&std::path::Path>,
    why: &str,
    reason_words: &[&str],
) {
    let webhook = Webhook::start(
        RegistryAccess {
            host,
            ca,
            credentials: creds,
        },
        &["--lookup-timeout", "300ms"],
    )
    .await;
    let started = Instant::now();
    let (answer, patched) = login(&webhook, "12896316").await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "{why}: answered after {took:?}"
    );
    assert!(allowed(&answer), "{why}");
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical").as_deref(),
        Some(IMAGE),
        "{why}"
    );
    assert!(
        sidecar_of(&patched).is_some(),
        "{why}: sidecar still injected"
    );
    let w = warnings(&answer);
    assert!(
        !w.is_empty() && w[0].contains("snapshot lookup failed"),
        "{why}: {w:?}"
    );
    let said = w.join(" ").to_lowercase();
    assert!(
        reason_words.iter().any(|r| said.contains(r)),
        "{why}: the warning does not say why (expected one of {reason_words:?}): {w:?}"
    );
    let status = as_pod(&patched).metadata.annotations.unwrap()[STATUS].clone();
    assert!(status.starts_with("not restored"), "{why}: {status}");
    assert_eq!(
        webhook
            .metric("snapshot_webhook_admissions_total{outcome=\"registry_error\"}")
            .await,
        1.0,
        "{why}"
    );
    assert!(
        webhook.log().contains("desktop admitted without restore"),
        "{why}: logged"
    );
}

#[tokio::test]
async fn registry_refused() {
    let bad = BadRegistry::start(Misbehaviour::Refused).await;
    registry_failure_admits_unchanged(
        &bad.host,
        Some(&bad.ca_path()),
        None,
        "refused",
        &["connect", "refused", "unreachable"],
    )
    .await;
}

#[tokio::test]
async fn registry_silent_past_the_deadline() {
    let bad = BadRegistry::start(Misbehaviour::Silent).await;
    registry_failure_admits_unchanged(
        &bad.host,
        Some(&bad.ca_path()),
        None,
        "silent",
        &["timeout", "timed out", "deadline"],
    )
    .await;
}

#[tokio::test]
async fn registry_answering_500() {
    let bad = BadRegistry::start(Misbehaviour::ServerError).await;
    registry_failure_admits_unchanged(
        &bad.host,
        Some(&bad.ca_path()),
        None,
        "500",
        &["server", "500"],
    )
    .await;
}

#[tokio::test]
async fn registry_answering_garbage() {
    let bad = BadRegistry::start(Misbehaviour::Garbage).await;
    registry_failure_admits_unchanged(
        &bad.host,
        Some(&bad.ca_path()),
        None,
        "garbage",
        &["garbage", "invalid", "malformed", "not json"],
    )
    .await;
}

#[tokio::test]
async fn registry_refusing_our_credentials() {
    let registry = Registry::start().await;
    registry.push_tags(REPO, &["12896316-5"]).await;
    let creds = registry.dir.path().join("wrong.json");
    registry.write_dockerconfigjson(&creds, USER, "not-the-password");
    registry_failure_admits_unchanged(
        &registry.host,
        Some(&registry.ca_path()),
        Some(&creds),
        "401",
        &["unauthorized", "401", "credentials", "denied"],
    )
    .await;
}

#[tokio::test]
async fn rotated_registry_credentials_are_used_without_restart() {
    let registry = Registry::start().await;
    registry.push_tags(REPO, &["12896316-5"]).await;
    let creds = registry.dir.path().join("rotating.json");
    registry.write_dockerconfigjson(&creds, USER, "old-password");
    let webhook = Webhook::start(
        RegistryAccess {
            host: &registry.host,
            ca: Some(&registry.ca_path()),
            credentials: Some(&creds),
        },
        &[],
    )
    .await;
    let (answer, _) = login(&webhook, "12896316").await;
    assert!(!warnings(&answer).is_empty(), "the old password is refused");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);
    let restored = harness::ports::wait_until(Duration::from_secs(5), || async {
        let (_, patched) = login(&webhook, "12896316").await;
        image_of(&as_pod(&patched), "x-graphical")
            == Some(format!("{}/{REPO}:12896316-5", registry.host))
    })
    .await;
    assert!(
        restored,
        "the rotated secret was not picked up; log:\n{}",
        webhook.log()
    );
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_and_reused() {
    let s = Setup::with(
        Registry::start_with(Auth::Token { lifetime_secs: 300 }).await,
        &[],
    )
    .await;
    s.registry
        .push_tags(REPO, &["12896316-7", "12896316-8"])
        .await;
    let service = s.registry.token.as_ref().unwrap();
    let before = service.issued();
    for _ in 0..5 {
        let (_, patched) = login(&s.webhook, "12896316").await;
        assert_eq!(
            image_of(&as_pod(&patched), "x-graphical"),
            Some(s.snapshot("12896316-8")),
            "log:\n{}",
            s.webhook.log()
        );
    }
    assert_eq!(service.issued() - before, 1, "one token for five lookups");
}

#[tokio::test]
async fn bearer_tokens_are_renewed_when_they_expire() {
    let s = Setup::with(
        Registry::start_with(Auth::Token { lifetime_secs: 6 }).await,
        &[],
    )
    .await;
    s.registry.push_tags(REPO, &["12896316-7"]).await;
    let service = s.registry.token.as_ref().unwrap();
    let before = service.issued();
    login(&s.webhook, "12896316").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, patched) = login(&s.webhook, "12896316").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("12896316-7"))
    );
    assert_eq!(
        service.issued() - before,
        2,
        "a token about to expire is renewed before use"
    );
}

#[tokio::test]
async fn malformed_reviews_get_400_with_a_reason_and_oversized_413() {
    let s = Setup::new(&["--max-body-bytes", "65536"]).await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not an AdmissionReview"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
        (serde_json::to_vec(&{
            let mut r = review(&desktop_pod("u", IMAGE), "CREATE", false);
            r["apiVersion"] = json!("admission.k8s.io/v1beta1");
            r
        }).unwrap(), "expected apiVersion admission.k8s.io/v1"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(), "not an AdmissionReview"),
    ];
    for (body, want) in cases {
        let (status, answer) = s.webhook.send_bytes(body).await;
        assert_eq!(status, 400, "{answer}");
        let text = answer.as_str().unwrap_or_default();
        assert!(text.contains(want), "{want:?} not in {answer}");
    }
    let mut pod = desktop_pod("u", IMAGE);
    pod["metadata"]["annotations"]["padding"] = json!("x".repeat(100_000));
    let (status, _) = s.webhook.send(&review(&pod, "CREATE", false)).await;
    assert_eq!(status, 413);
    // still serving
    let (answer, _) = login(&s.webhook, "u").await;
    assert!(allowed(&answer));
}

#[tokio::test]
async fn other_kinds_other_operations_and_other_pods_pass_untouched() {
    let s = Setup::new(&[]).await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let pod = desktop_pod("12896316", IMAGE);
    let update = admit(&s.webhook, &pod, "UPDATE", false).await;
    assert!(allowed(&update) && admission::patch(&update).is_none());
    let mut plain = pod.clone();
    plain["metadata"]["labels"]["type"] = json!("web");
    let other = admit(&s.webhook, &plain, "CREATE", false).await;
    assert!(allowed(&other) && admission::patch(&other).is_none());
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "abcdesktop",
        "labels": {"type": "x11server", "access_userid": "12896316"}}, "data": {}});
    let cm_answer = admit(&s.webhook, &cm, "CREATE", false).await;
    assert!(allowed(&cm_answer) && admission::patch(&cm_answer).is_none());
}

#[tokio::test]
async fn dry_run_is_answered_like_a_real_request() {
    let s = Setup::new(&[]).await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let pod = desktop_pod("12896316", IMAGE);
    let real = admit(&s.webhook, &pod, "CREATE", false).await;
    let dry = admit(&s.webhook, &pod, "CREATE", true).await;
    assert_eq!(admission::patch(&real), admission::patch(&dry));
    assert!(admission::patch(&dry).is_some());
    // the whole answer is the same, but for the echoed uid
    let strip = |a: &Value| {
        let mut r = admission::response(a).clone();
        r.as_object_mut().unwrap().remove("uid");
        r
    };
    assert_eq!(strip(&real), strip(&dry));
    assert_eq!(
        image_of(&as_pod(&apply(&pod, &dry)), "x-graphical"),
        Some(s.snapshot("12896316-5"))
    );
}

#[tokio::test]
async fn readmitting_a_patched_pod_changes_nothing() {
    for mode in ["container", "native"] {
        let s = Setup::new(&["--sidecar-mode", mode]).await;
        s.registry.push_tags(REPO, &["12896316-5"]).await;
        let (_, patched) = login(&s.webhook, "12896316").await;
        s.registry.push_tags(REPO, &["12896316-6"]).await;
        let again = admit(&s.webhook, &patched, "CREATE", false).await;
        assert!(allowed(&again));
        let ops = admission::patch(&again).map(|p| p.0.len()).unwrap_or(0);
        assert_eq!(ops, 0, "{mode}: {again}");
        let pod = as_pod(&patched);
        assert_eq!(
            image_of(&pod, "x-graphical"),
            Some(s.snapshot("12896316-5"))
        );
        if mode == "native" {
            let init = pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
            let sidecar = init
                .iter()
                .find(|c| c.name == "t-snapshot")
                .expect("native sidecar");
            assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        }
    }
}

#[tokio::test]
async fn opt_out_and_pin_annotations() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(REPO, &["12896316-5", "12896316-9", "bob-3"])
        .await;
    let with = |annotations: Value| {
        let mut pod = desktop_pod("12896316", IMAGE);
        for (k, v) in annotations.as_object().unwrap() {
            pod["metadata"]["annotations"][k] = v.clone();
        }
        pod
    };
    // opt-out: a fresh desktop, sidecar still there
    let pod = with(json!({"snapshot.abcdesktop.io/restore": "false"}));
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    let patched = apply(&pod, &answer);
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical").as_deref(),
        Some(IMAGE)
    );
    assert!(sidecar_of(&patched).is_some());
    // pin to an older snapshot of the same user: rollback
    let pod = with(json!({"snapshot.abcdesktop.io/pin": "12896316-5"}));
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    assert_eq!(
        image_of(&as_pod(&apply(&pod, &answer)), "x-graphical"),
        Some(s.snapshot("12896316-5"))
    );
    // pin to another user's snapshot: refused
    let pod = with(json!({"snapshot.abcdesktop.io/pin": "bob-3"}));
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    assert!(!allowed(&answer));
    let message = admission::response(&answer)["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("not a snapshot of user"), "{message}");
    // pin to a snapshot that does not exist: refused
    let pod = with(json!({"snapshot.abcdesktop.io/pin": "12896316-7"}));
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    assert!(!allowed(&answer));
    assert!(admission::response(&answer)["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("does not exist"));
}

#[tokio::test]
async fn pin_by_digest() {
    let s = Setup::new(&["--pin-digest"]).await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let (_, patched) = login(&s.webhook, "12896316").await;
    let image = image_of(&as_pod(&patched), "x-graphical").unwrap();
    let (name, digest) = image.split_once('@').expect("pinned by digest");
    assert_eq!(name, s.snapshot("12896316-5"));
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
}

#[tokio::test]
async fn concurrent_logins_of_one_user_all_get_the_newest() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(REPO, &["12896316-5", "12896316-50", "12896316-49"])
        .await;
    let logins = (0..20).map(|_| login(&s.webhook, "12896316"));
    for (answer, patched) in futures::future::join_all(logins).await {
        assert!(allowed(&answer));
        assert_eq!(
            image_of(&as_pod(&patched), "x-graphical"),
            Some(s.snapshot("12896316-50"))
        );
    }
    let misses = s
        .webhook
        .metric("snapshot_webhook_cache_misses_total")
        .await;
    let coalesced = s
        .webhook
        .metric("snapshot_webhook_cache_hits_total{kind=\"coalesced\"}")
        .await;
    let manifests = s
        .webhook
        .metric("snapshot_webhook_cache_hits_total{kind=\"manifest\"}")
        .await;
    // each login: one tag lookup, one manifest read (the snapshot's base);
    // the 20 concurrent manifest reads of one tag make one request
    assert_eq!(manifests, 19.0);
    assert_eq!(misses + coalesced + manifests, 40.0);
}

#[tokio::test]
async fn a_snapshot_pushed_just_before_login_is_seen() {
    let s = Setup::new(&[]).await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let (_, patched) = login(&s.webhook, "12896316").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("12896316-5"))
    );
    s.registry.push_tags(REPO, &["12896316-6"]).await;
    let (_, patched) = login(&s.webhook, "12896316").await;
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("12896316-6")),
        "no stale answer"
    );
}

#[tokio::test]
async fn certificate_rotation_while_serving() {
    let mut s = Setup::new(&[]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ca = s.webhook.ca_pem.clone();
    let url = s.webhook.url("/mutate");
    let body =
        serde_json::to_vec(&review(&desktop_pod("12896316", IMAGE), "CREATE", false)).unwrap();
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // a new connection each time, so every request makes a handshake
                let client = client_trusting(&ca);
                let r = client.post(&url).body(body.clone()).send().await;
                results.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        s.webhook.rotate_cert(false);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = load.await.unwrap();
    assert!(results.len() > 10, "{} requests", results.len());
    let failed: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(200))).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed during rotation: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    assert!(s.webhook.log().contains("serving certificate reloaded"));

    // a new CA: clients trusting it get through within about a second
    // (reload interval 200 ms; 1.5 s leaves room for a busy 2-core machine)
    let old_ca = ca_of(&s);
    let new_ca = s.webhook.rotate_cert(true);
    let rotated = Instant::now();
    let url = s.webhook.url("/healthz");
    let ok = harness::ports::wait_until(Duration::from_millis(1500), || {
        // a fresh client each time: a new connection, a new handshake
        let (client, url) = (client_trusting(&new_ca), url.clone());
        async move { client.get(&url).send().await.is_ok() }
    })
    .await;
    assert!(
        ok,
        "the certificate of the new CA is not served 1.5 s after the rotation; log:\n{}",
        s.webhook.log()
    );
    eprintln!("new CA served after {:?}", rotated.elapsed());
    // and a client trusting only the old CA is now turned away
    let old = client_trusting(&old_ca).get(&url).send().await;
    assert!(old.is_err(), "the old CA still verifies: {old:?}");
}

fn ca_of(s: &Setup) -> String {
    s.webhook.ca_pem.clone()
}

#[tokio::test]
async fn metrics_and_probes() {
    let s = Setup::new(&[]).await;
    login(&s.webhook, "12896316").await;
    let text = s.webhook.metrics().await;
    for name in [
        "snapshot_webhook_admissions_total{outcome=\"no_snapshot\"} 1",
        "snapshot_webhook_lookup_duration_seconds_count 1",
        "snapshot_webhook_cache_misses_total 1",
        "snapshot_webhook_registry_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing in:\n{text}");
    }
    for path in ["/healthz", "/readyz"] {
        let r = s
            .webhook
            .client()
            .get(s.webhook.url(path))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}");
    }
}

/// Every string a container is started with: env values, command, args.
fn startup_strings(c: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone())
        .chain(c.command.iter().flatten().cloned())
        .chain(c.args.iter().flatten().cloned())
        .collect()
}

fn pull_secrets(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .into_iter()
        .flatten()
        .map(|r| r.name)
        .collect()
}

fn has_no_patch(answer: &Value) -> bool {
    admission::patch(answer).map(|p| p.0.len()).unwrap_or(0) == 0
}

#[tokio::test]
async fn the_sidecar_has_what_it_needs_and_no_container_sees_the_password() {
    let sidecar_image = "registry.example.net/desktop-snapshot/snapshot-sidecar:9.9";
    let s = Setup::new(&[
        "--sidecar-image",
        sidecar_image,
        "--registry-secret-name",
        "od-snapshot-secret",
    ])
    .await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let (answer, patched) = login(&s.webhook, "12896316").await;
    assert!(allowed(&answer));
    let pod = admission::apply_patch(&desktop_pod("12896316", IMAGE), &answer);
    assert_eq!(
        image_of(&pod, "x-graphical"),
        Some(s.snapshot("12896316-5"))
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(pull_secrets(&pod), ["od-snapshot-secret"]);
    assert_eq!(
        spec.containers
            .iter()
            .filter(|c| c.name == "t-snapshot")
            .count(),
        1,
        "one sidecar"
    );
    let sidecar = sidecar_of(&patched).expect("t-snapshot injected");
    assert_eq!(sidecar.image.as_deref(), Some(sidecar_image));
    let port = &sidecar.ports.as_ref().expect("a port")[0];
    assert_eq!(
        (port.container_port, port.name.as_deref()),
        (29785, Some("snapshot"))
    );
    for (name, path) in [
        ("SNAPSHOT_POD_NAME", "metadata.name"),
        ("SNAPSHOT_POD_NAMESPACE", "metadata.namespace"),
        ("SNAPSHOT_POD_UID", "metadata.uid"),
    ] {
        let e = sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing in the sidecar's env"));
        let field = e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(field, Some(path), "{name} comes from the downward API");
    }
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_CONTAINER").as_deref(),
        Some("x-graphical")
    );
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_REPOSITORY"),
        Some(format!("{}/{REPO}", s.registry.host()))
    );
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
        Some("12896316")
    );
    // the registry secret as a secret volume, the node's containerd socket as a hostPath
    let volumes = spec.volumes.as_ref().expect("volumes");
    let secret = volumes
        .iter()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("od-snapshot-secret")
        })
        .expect("a secret volume of --registry-secret-name");
    let socket = volumes
        .iter()
        .find(|v| v.host_path.is_some())
        .expect("a hostPath volume for containerd");
    let host_path = socket.host_path.as_ref().unwrap();
    assert_eq!(host_path.path, "/run/containerd/containerd.sock");
    assert_eq!(host_path.type_.as_deref(), Some("Socket"));
    // containerd's overlayfs snapshots, read-only at the same path, for the fast path
    let snapshots = volumes
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.type_.as_deref() == Some("Directory"))
        })
        .expect("a hostPath volume for containerd's snapshots");
    let root = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs";
    assert_eq!(snapshots.host_path.as_ref().unwrap().path, root);
    let mount = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == snapshots.name)
        .expect("the snapshots mounted in the sidecar");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        (root, Some(true))
    );
    let caps = sidecar
        .security_context
        .as_ref()
        .and_then(|c| c.capabilities.as_ref())
        .and_then(|c| c.add.clone());
    assert_eq!(caps, Some(vec!["SYS_ADMIN".to_string()]));
    let work = env_of(&sidecar, "SNAPSHOT_WORK_DIR").expect("a work directory");
    let work_mount = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == work)
        .expect("the work directory is a volume");
    let work_volume = volumes
        .iter()
        .find(|v| v.name == work_mount.name)
        .and_then(|v| v.empty_dir.as_ref())
        .expect("the work directory is an emptyDir");
    // the sidecar stops a snapshot at its limit, below the emptyDir's, so a
    // desktop that writes without end never gets its pod evicted: each of the
    // files a pre-copied snapshot holds at once (pieces, what the pause read
    // again, kept eStargz members, the spool) is held to the limit
    let limit: u64 = env_of(&sidecar, "SNAPSHOT_MAX_CHANGE_BYTES")
        .expect("a change limit")
        .parse()
        .expect("a number of bytes");
    assert_eq!(limit, 8 << 30);
    let size_limit = work_volume
        .size_limit
        .as_ref()
        .and_then(|q| harness::kubelet::quantity(&q.0))
        .expect("a sizeLimit on the work emptyDir");
    assert_eq!(size_limit as u64, 4 * limit + (256 << 20));
    for (name, value) in [
        ("SNAPSHOT_KEEP", "10"),
        ("SNAPSHOT_KEEP_HOURLY", "24"),
        ("SNAPSHOT_KEEP_DAILY", "7"),
        ("SNAPSHOT_KEEP_WEEKLY", "4"),
    ] {
        assert_eq!(env_of(&sidecar, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_LAYER_FORMAT").as_deref(),
        Some("estargz"),
        "the webhook's default layer format: the fastest restore, lazy on stargz nodes"
    );
    assert_eq!(
        env_of(&sidecar, "SNAPSHOT_KEEP_MIN_AGE").as_deref(),
        Some("1h")
    );
    for name in ["home", "tmp", "x11socket"] {
        assert!(
            volumes.iter().any(|v| v.name == name),
            "the pod's own volume {name} is kept"
        );
    }
    // mounted in the sidecar only; no container is started with the password
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.as_str())
            .collect();
        let is_sidecar = c.name == "t-snapshot";
        assert_eq!(
            mounts.contains(&secret.name.as_str()),
            is_sidecar,
            "{}: the registry secret is mounted in the sidecar only",
            c.name
        );
        assert_eq!(
            mounts.contains(&socket.name.as_str()),
            is_sidecar,
            "{}: the containerd socket is mounted in the sidecar only",
            c.name
        );
        for w in startup_strings(c) {
            assert!(
                !w.contains(PASSWORD) && !w.contains(&auth),
                "{}: the registry password in {w:?}",
                c.name
            );
        }
    }
    assert!(!patched.to_string().contains(PASSWORD));
    assert!(!patched.to_string().contains(&auth));
}

#[tokio::test]
async fn existing_pull_secrets_are_kept_and_ours_is_added_once() {
    let s = Setup::new(&[]).await;
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    const OURS: &str = "abcdesktop-snapshot-registry";
    for existing in [
        json!([{"name": "corp-mirror"}]),
        json!([{"name": OURS}, {"name": "corp-mirror"}]),
    ] {
        let mut pod = desktop_pod("12896316", IMAGE);
        pod["spec"]["imagePullSecrets"] = existing.clone();
        let answer = admit(&s.webhook, &pod, "CREATE", false).await;
        let patched = admission::apply_patch(&pod, &answer);
        assert_eq!(
            image_of(&patched, "x-graphical"),
            Some(s.snapshot("12896316-5"))
        );
        let names = pull_secrets(&patched);
        assert_eq!(
            names.iter().filter(|n| *n == OURS).count(),
            1,
            "{existing}: {names:?}"
        );
        assert!(
            names.iter().any(|n| n == "corp-mirror"),
            "{existing}: {names:?}"
        );
        assert_eq!(names.len(), 2, "{existing}: {names:?}");
    }
}

#[tokio::test]
async fn shared_layout_numbers_lookalikes_and_escaped_ids() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(
            REPO,
            &[
                "alice-999",
                "alice-1000",
                "alice-1-500",
                "alicex-5000",
                "xalice-5000",
                "Alice-7000",
                "alice_5f-9000",
                "alice-12a",
                "alice-latest",
                "a_5fb-3",
                "a_b-9",
                "_2dx-4",
                "_2ex-6",
            ],
        )
        .await;
    let cases: &[(&str, Option<&str>, &str)] = &[
        // user, snapshot restored, tag prefix
        ("alice", Some("alice-1000"), "alice"),
        ("alice-1", Some("alice-1-500"), "alice-1"),
        ("alicex", Some("alicex-5000"), "alicex"),
        ("Alice", Some("Alice-7000"), "Alice"),
        ("alice_", Some("alice_5f-9000"), "alice_5f"),
        ("a_b", Some("a_5fb-3"), "a_5fb"),
        ("-x", Some("_2dx-4"), "_2dx"),
        (".x", Some("_2ex-6"), "_2ex"),
        ("bob", None, "bob"),
    ];
    for (user, want, prefix) in cases {
        let (answer, patched) = login(&s.webhook, user).await;
        assert!(allowed(&answer), "{user}: {answer}");
        let want = want.map(|t| s.snapshot(t)).unwrap_or_else(|| IMAGE.into());
        assert_eq!(
            image_of(&as_pod(&patched), "x-graphical"),
            Some(want),
            "user {user:?}"
        );
        let sidecar = sidecar_of(&patched).expect("sidecar");
        assert_eq!(
            env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
            Some(*prefix),
            "user {user:?}"
        );
    }
}

#[tokio::test]
async fn per_user_layout_escapes_ids_that_are_not_repository_names() {
    let s = Setup::new(&["--layout", "per-user"]).await;
    let hex = |u: &str| format!("u__{}", hex::encode(u.as_bytes()));
    let cases: Vec<(&str, String)> = vec![
        ("alice", "alice".into()),
        ("a--b", "a--b".into()),
        ("j.doe", "j.doe".into()),
        ("12896316", "12896316".into()),
        ("Alice", hex("Alice")),
        ("jdoe@example.com", hex("jdoe@example.com")),
        ("a_b", hex("a_b")),
        ("a..b", hex("a..b")),
        ("-a", hex("-a")),
        ("a.", hex("a.")),
        ("u__61", hex("u__61")),
    ];
    assert_eq!(hex("Alice"), "u__416c696365");
    s.registry
        .push_tags(
            &format!("alice/{REPO}"),
            // the user's snapshots under other base tags count when newer (tests/tests/newbase.rs)
            &["4.1-100", "4.1-20", "4.1-1-90", "4.10-90", "4.0-99"],
        )
        .await;
    s.registry
        .push_tags(&format!("{}/{REPO}", hex("Alice")), &["4.1-5"])
        .await;
    s.registry
        .push_tags(&format!("a--b/{REPO}"), &["4.1-7"])
        .await;
    for (user, component) in &cases {
        let (answer, patched) = login(&s.webhook, user).await;
        assert!(allowed(&answer), "{user}: {answer}");
        let sidecar = sidecar_of(&patched).expect("sidecar");
        let repository = format!("{}/{component}/{REPO}", s.registry.host());
        assert_eq!(
            env_of(&sidecar, "SNAPSHOT_REPOSITORY"),
            Some(repository.clone()),
            "user {user:?}"
        );
        assert_eq!(
            env_of(&sidecar, "SNAPSHOT_TAG_PREFIX").as_deref(),
            Some("4.1"),
            "user {user:?}"
        );
        let want = match *user {
            "alice" => format!("{repository}:4.1-100"),
            "Alice" => format!("{repository}:4.1-5"),
            "a--b" => format!("{repository}:4.1-7"),
            _ => IMAGE.to_string(),
        };
        assert_eq!(
            image_of(&as_pod(&patched), "x-graphical"),
            Some(want),
            "user {user:?}"
        );
    }
}

#[tokio::test]
async fn pins_to_lookalike_or_non_snapshot_tags_are_refused() {
    let s = Setup::new(&[]).await;
    s.registry
        .push_tags(
            REPO,
            &["12896316-5", "12896316-9", "12896316-1-99", "latest"],
        )
        .await;
    let pinned = |tag: &str| {
        let mut pod = desktop_pod("12896316", IMAGE);
        pod["metadata"]["annotations"]["snapshot.abcdesktop.io/pin"] = json!(tag);
        pod
    };
    for tag in ["12896316-1-99", "latest", "4.1", "12896316-"] {
        let answer = admit(&s.webhook, &pinned(tag), "CREATE", false).await;
        assert!(!allowed(&answer), "pin {tag:?} was allowed: {answer}");
        let message = admission::response(&answer)["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(tag),
            "pin {tag:?}: the refusal names the pin: {message:?}"
        );
    }
    // a pin of one's own older snapshot restores it, and re-admission keeps it
    let pod = pinned("12896316-5");
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    assert!(allowed(&answer));
    let patched = apply(&pod, &answer);
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical"),
        Some(s.snapshot("12896316-5"))
    );
    let again = admit(&s.webhook, &patched, "CREATE", false).await;
    assert!(allowed(&again) && has_no_patch(&again), "{again}");
}

#[tokio::test]
async fn readmitting_is_a_no_op_whatever_was_decided() {
    let s = Setup::new(&[]).await;
    // no snapshot yet: sidecar injected; a snapshot pushed before the re-admission
    let (answer, patched) = login(&s.webhook, "12896316").await;
    assert!(allowed(&answer) && sidecar_of(&patched).is_some());
    s.registry.push_tags(REPO, &["12896316-5"]).await;
    let again = admit(&s.webhook, &patched, "CREATE", false).await;
    assert!(
        allowed(&again) && has_no_patch(&again),
        "no snapshot, then re-admitted: {again}"
    );
    // opted out
    let mut pod = desktop_pod("12896316", IMAGE);
    pod["metadata"]["annotations"]["snapshot.abcdesktop.io/restore"] = json!("false");
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    let patched = apply(&pod, &answer);
    assert_eq!(
        image_of(&as_pod(&patched), "x-graphical").as_deref(),
        Some(IMAGE)
    );
    assert!(sidecar_of(&patched).is_some());
    let again = admit(&s.webhook, &patched, "CREATE", false).await;
    assert!(
        allowed(&again) && has_no_patch(&again),
        "opted out, then re-admitted: {again}"
    );
}

#[tokio::test]
async fn native_sidecar_mode() {
    let s = Setup::new(&["--sidecar-mode", "native"]).await;
    for tags in [&[][..], &["12896316-5"][..]] {
        if !tags.is_empty() {
            s.registry.push_tags(REPO, tags).await;
        }
        let (answer, patched) = login(&s.webhook, "12896316").await;
        assert!(allowed(&answer));
        let pod = as_pod(&patched);
        let spec = pod.spec.as_ref().unwrap();
        assert!(
            !spec.containers.iter().any(|c| c.name == "t-snapshot"),
            "{tags:?}: native sidecar is not a plain container"
        );
        let init = spec.init_containers.as_ref().expect("init containers");
        assert!(
            init.iter().any(|c| c.name == "i-init"),
            "the pod's own init container is kept"
        );
        let sidecar = init
            .iter()
            .find(|c| c.name == "t-snapshot")
            .expect("the sidecar as an init container");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar.ports.as_ref().unwrap()[0].container_port, 29785);
        let want = if tags.is_empty() {
            IMAGE.to_string()
        } else {
            s.snapshot("12896316-5")
        };
        assert_eq!(image_of(&pod, "x-graphical"), Some(want));
    }
}

/// pyos's own commit sidecar, as it builds it from abcdesktop's documented
/// od.config entry `desktop.pod['snapshot']` with `enable: True` (which also
/// gives users the "snapshot" menu entry).
fn pyos_snapshot_container() -> Value {
    serde_json::from_str(include_str!("../fixtures/pyos-snapshot-container.json"))
        .expect("tests/fixtures/pyos-snapshot-container.json is JSON")
}

#[tokio::test]
async fn pyos_own_snapshot_container_is_taken_over_under_the_same_name_and_port() {
    let s = Setup::new(&[]).await;
    for mode in ["container", "native"] {
        let webhook = Webhook::for_registry(&s.registry, &["--sidecar-mode", mode]).await;
        let mut pod = desktop_pod("12896316", IMAGE);
        pod["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(pyos_snapshot_container());
        let answer = admit(&webhook, &pod, "CREATE", false).await;
        assert!(allowed(&answer));
        let patched = apply(&pod, &answer);
        let spec = as_pod(&patched).spec.expect("a spec");
        let named: Vec<_> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name == "t-snapshot")
            .collect();
        assert_eq!(named.len(), 1, "{mode}: one t-snapshot");
        let ours = named[0];
        assert_ne!(
            ours.image.as_deref(),
            Some("ghcr.io/abcdesktopio/oc.snapshot:main"),
            "{mode}: ours answers the menu"
        );
        assert_eq!(ours.ports.as_ref().expect("ports")[0].container_port, 29785);
        assert_eq!(
            env_of(ours, "SNAPSHOT_TAG_PREFIX").as_deref(),
            Some("12896316")
        );
        // admitted again (reinvocation): nothing changes
        let again = admit(&webhook, &patched, "CREATE", false).await;
        let twice = apply(&patched, &again);
        assert_eq!(twice, patched, "{mode}: re-admission changes nothing");
        assert!(
            !patched.to_string().contains("hunter2"),
            "{mode}: pyos's container and the password in its env are gone"
        );
    }
}

#[tokio::test]
async fn a_generate_name_pod_is_logged_by_its_generate_name() {
    let s = Setup::new(&[]).await;
    let mut pod = desktop_pod("12896316", IMAGE);
    pod["metadata"]["generateName"] = json!("12896316-gen-");
    pod["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("name");
    let answer = admit(&s.webhook, &pod, "CREATE", false).await;
    assert!(allowed(&answer));
    let log = s.webhook.log();
    let line = log
        .lines()
        .find(|l| l.contains("desktop admitted"))
        .unwrap_or_else(|| panic!("no admission logged:\n{log}"));
    assert!(
        line.contains(r#""pod":"12896316-gen-""#) && line.contains(r#""generated_name":true"#),
        "{line}"
    );
}

#[tokio::test]
async fn admissions_are_answered_within_their_budget_from_arrival_even_when_the_lookup_takes_longer(
) {
    let bad = BadRegistry::start(Misbehaviour::Silent).await;
    let webhook = Webhook::start(
        RegistryAccess {
            host: &bad.host,
            ca: Some(&bad.ca_path()),
            credentials: None,
        },
        // a lookup may take 10 s; a whole admission 500 ms
        &["--lookup-timeout", "10s", "--admission-budget", "500ms"],
    )
    .await;
    const LOGINS: usize = 20;
    let started = Instant::now();
    let answers = futures::future::join_all((0..LOGINS).map(|i| {
        let webhook = &webhook;
        async move { login(webhook, &format!("user{i}")).await }
    }))
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    for (answer, patched) in &answers {
        assert!(allowed(answer));
        assert_eq!(
            image_of(&as_pod(patched), "x-graphical").as_deref(),
            Some(IMAGE),
            "fail-open: the original image"
        );
        assert!(sidecar_of(patched).is_some(), "fail-open: the sidecar");
        let w = warnings(answer).join(" ");
        assert!(w.contains("admission budget"), "{w}");
    }
    // the webhook's own measure, from each request's arrival: all long before
    // the 10 s the lookups were allowed (2 s leaves room for a loaded machine)
    let within = webhook
        .metric("snapshot_webhook_admission_duration_seconds_bucket{le=\"2.0\"}")
        .await;
    assert_eq!(within as usize, LOGINS, "{}", webhook.metrics().await);
}

#[tokio::test]
async fn a_request_whose_budget_is_gone_starts_no_lookup() {
    let s = Setup::new(&["--admission-budget", "1ms"]).await;
    let (answer, patched) = login(&s.webhook, "12896316").await;
    assert!(allowed(&answer));
    assert!(sidecar_of(&patched).is_some());
    assert!(
        warnings(&answer).join(" ").contains("admission budget"),
        "{:?}",
        warnings(&answer)
    );
    assert_eq!(
        s.webhook
            .metric("snapshot_webhook_cache_misses_total")
            .await,
        0.0,
        "no lookup was started"
    );
    assert_eq!(
        s.webhook
            .metric("snapshot_webhook_registry_requests_total")
            .await,
        0.0,
        "nothing was asked of the registry"
    );
}

#[tokio::test]
async fn a_slow_registry_gets_no_more_lookups_than_the_cap() {
    let bad = BadRegistry::start(Misbehaviour::Slow(Duration::from_secs(3))).await;
    let webhook = Webhook::start(
        RegistryAccess {
            host: &bad.host,
            ca: Some(&bad.ca_path()),
            credentials: None,
        },
        &["--lookup-timeout", "300ms", "--registry-max-in-flight", "2"],
    )
    .await;
    let before = webhook
        .metric("snapshot_webhook_registry_requests_total")
        .await;
    let started = Instant::now();
    let answers = futures::future::join_all((0..12).map(|n| {
        let webhook = &webhook;
        async move { login(webhook, &format!("user{n}")).await }
    }))
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );
    for (answer, patched) in &answers {
        assert!(allowed(answer));
        assert!(
            sidecar_of(patched).is_some(),
            "fail-open: the sidecar is injected"
        );
    }
    let sent = webhook
        .metric("snapshot_webhook_registry_requests_total")
        .await
        - before;
    // two lookups at a time, each a tags/list (and perhaps a /v2/ probe first)
    assert!(
        (1.0..=4.0).contains(&sent),
        "{sent} requests went to a registry that answers in 3 s, for 12 logins"
    );
    assert_eq!(
        webhook
            .metric("snapshot_webhook_admissions_total{outcome=\"registry_error\"}")
            .await,
        12.0
    );
}
