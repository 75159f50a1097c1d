//! End to end: a snapshot the kubelet cannot pull is never restored. The real
//! snapshot-webhook over HTTPS, a real registry holding the user's snapshot,
//! and the Kubernetes API's answers about the desktop's namespace
//! (harness::kubeapi): with the registry secret there the desktop is
//! restored; without it, it starts from its image with a warning, the status
//! annotation, a log line and a metric, until the secret is created; an API
//! that refuses or does not answer changes nothing but a warning, within the
//! admission budget.

use harness::{
    admission::{apply, as_pod, desktop_pod, image_of, review, warnings},
    badregistry::{BadRegistry, Misbehaviour},
    kubeapi::{KubeApi, METADATA_ONLY},
    ports,
    registry::Registry,
    webhook::Webhook,
};
use serde_json::Value;
use std::time::Duration;

const IMAGE: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1";
const REPO: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04";
const USER: &str = "12896316";
const TAG: &str = "12896316-1700000000";
const STATUS: &str = "snapshot.abcdesktop.io/status";
/// The desktop pod's namespace (tests/fixtures/desktop-pod.json).
const NAMESPACE: &str = "abcdesktop";
/// The webhook's default `--registry-secret-name`.
const SECRET: &str = "abcdesktop-snapshot-registry";

/// A registry holding `USER`'s snapshot, and a webhook on it asking `api`.
async fn setup(api: &str, extra: &[&str]) -> (Registry, Webhook) {
    let registry = Registry::start().await;
    registry.push_tags(REPO, &[TAG]).await;
    let mut flags = vec!["--kube-api-url", api];
    flags.extend_from_slice(extra);
    let webhook = Webhook::for_registry(&registry, &flags).await;
    (registry, webhook)
}

/// What one login of `USER` gets: the answer and the patched pod.
struct Login {
    answer: Value,
    pod: k8s_openapi::api::core::v1::Pod,
}

impl Login {
    async fn of(webhook: &Webhook) -> Self {
        let pod = desktop_pod(USER, IMAGE);
        let answer = webhook.admit(&review(&pod, "CREATE", false)).await;
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let pod = as_pod(&apply(&pod, &answer));
        Self { answer, pod }
    }

    fn image(&self) -> Option<String> {
        image_of(&self.pod, "x-graphical")
    }

    fn warnings(&self) -> Vec<String> {
        warnings(&self.answer)
    }

    fn status(&self) -> String {
        self.pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATUS).cloned())
            .unwrap_or_default()
    }

    fn pull_secrets(&self) -> Vec<String> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.clone())
            .into_iter()
            .flatten()
            .map(|r| r.name)
            .collect()
    }

    fn has_sidecar(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .is_some_and(|s| s.containers.iter().any(|c| c.name == "t-snapshot"))
    }
}

#[tokio::test]
async fn with_the_secret_the_snapshot_is_restored_asking_for_its_metadata_only() {
    let api = KubeApi::start().await;
    api.create(NAMESPACE, "secrets", SECRET);
    let (registry, webhook) = setup(&api.url, &[]).await;

    let login = Login::of(&webhook).await;
    let snapshot = format!("{}/{REPO}:{TAG}", registry.host);
    assert_eq!(login.image(), Some(snapshot.clone()));
    assert_eq!(login.pull_secrets(), [SECRET]);
    assert!(login.warnings().is_empty(), "{:?}", login.warnings());
    assert_eq!(login.status(), format!("restored {snapshot}"));

    // a second login is answered from the cache
    let again = Login::of(&webhook).await;
    assert_eq!(again.image(), Some(snapshot));
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "one read for two logins: {seen:?}");
    assert_eq!(
        seen[0].path,
        format!("/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}"),
        "a get of that one name"
    );
    assert_eq!(
        seen[0].accept, METADATA_ONLY,
        "metadata only, never the data"
    );
    assert_eq!(
        webhook
            .metric(
                "snapshot_webhook_namespace_checks_total{object=\"registry_secret\",answer=\"present\"}"
            )
            .await,
        2.0
    );
}

#[tokio::test]
async fn without_the_secret_no_restore_until_it_is_created() {
    let api = KubeApi::start().await;
    let (registry, webhook) = setup(&api.url, &[]).await;

    let login = Login::of(&webhook).await;
    assert_eq!(login.image().as_deref(), Some(IMAGE), "the original image");
    assert!(
        login.pull_secrets().is_empty(),
        "{:?}",
        login.pull_secrets()
    );
    assert!(
        login.has_sidecar(),
        "the sidecar snapshots once the secret is there"
    );
    let missing = format!("the registry secret {SECRET} is missing in namespace {NAMESPACE}");
    assert_eq!(
        login.warnings(),
        [format!(
            "desktop-snapshot: not restored and no snapshots: {missing}"
        )]
    );
    assert_eq!(login.status(), format!("not restored: {missing}"));
    assert_eq!(
        webhook
            .metric("snapshot_webhook_admissions_total{outcome=\"no_pull_secret\"}")
            .await,
        1.0
    );
    assert_eq!(
        webhook
            .metric(
                "snapshot_webhook_namespace_checks_total{object=\"registry_secret\",answer=\"missing\"}"
            )
            .await,
        1.0
    );
    let log = webhook.log();
    assert!(
        log.lines()
            .any(|l| l.contains("desktop admitted without restore")
                && l.contains("no_pull_secret")
                && l.contains(SECRET)),
        "a log line says why:\n{log}"
    );

    // the operator creates the secret: a later login is restored
    api.create(NAMESPACE, "secrets", SECRET);
    let snapshot = format!("{}/{REPO}:{TAG}", registry.host);
    let mut logins = 0;
    let restored = ports::wait_until(Duration::from_secs(30), || {
        logins += 1;
        let (webhook, snapshot) = (&webhook, &snapshot);
        async move { Login::of(webhook).await.image().as_deref() == Some(snapshot.as_str()) }
    })
    .await;
    assert!(restored, "not restored 30 s after the secret was created");
    let login = Login::of(&webhook).await;
    assert_eq!(login.pull_secrets(), [SECRET]);
    assert!(login.warnings().is_empty(), "{:?}", login.warnings());
    eprintln!("restored at login {logins} after the secret was created");
}

#[tokio::test]
async fn without_the_ca_configmap_restored_but_told_there_are_no_snapshots() {
    let api = KubeApi::start().await;
    api.create(NAMESPACE, "secrets", SECRET);
    let (registry, webhook) = setup(
        &api.url,
        &["--sidecar-registry-ca-configmap", "registry-ca"],
    )
    .await;

    let login = Login::of(&webhook).await;
    assert_eq!(
        login.image(),
        Some(format!("{}/{REPO}:{TAG}", registry.host))
    );
    assert_eq!(
        login.warnings(),
        [format!(
            "desktop-snapshot: no snapshots: the registry CA configMap registry-ca is missing in namespace {NAMESPACE}"
        )]
    );
    assert!(api.seen().iter().any(|s| s.path
        == format!("/api/v1/namespaces/{NAMESPACE}/configmaps/registry-ca")
        && s.accept == METADATA_ONLY));

    api.create(NAMESPACE, "configmaps", "registry-ca");
    let told = ports::wait_until(Duration::from_secs(30), || {
        let webhook = &webhook;
        async move { Login::of(webhook).await.warnings().is_empty() }
    })
    .await;
    assert!(told, "still warned 30 s after the configMap was created");
}

#[tokio::test]
async fn an_api_refusing_or_not_answering_restores_with_a_warning_within_the_budget() {
    let forbidding = KubeApi::start().await;
    forbidding.create(NAMESPACE, "secrets", SECRET);
    forbidding.forbid("secrets");
    let silent = BadRegistry::start(Misbehaviour::Silent).await;
    let cases = [
        (
            "403: no RBAC rule",
            forbidding.url.clone(),
            "the API answered 403 Forbidden",
        ),
        (
            "refused",
            format!("http://127.0.0.1:{}", ports::free_port()),
            "the API is unreachable",
        ),
        (
            "silent",
            format!("http://{}", silent.host),
            "no answer within the admission budget",
        ),
    ];
    for (what, url, why) in cases {
        let (registry, webhook) = setup(&url, &["--admission-budget", "1s"]).await;
        let login = Login::of(&webhook).await;
        assert_eq!(
            login.image(),
            Some(format!("{}/{REPO}:{TAG}", registry.host)),
            "{what}: restored as if the secret were there"
        );
        assert_eq!(login.pull_secrets(), [SECRET], "{what}");
        assert_eq!(
            login.warnings(),
            [format!(
                "desktop-snapshot: could not check the registry secret {SECRET} in namespace {NAMESPACE} ({why}); without it restores and snapshots fail"
            )],
            "{what}"
        );
        assert!(login.status().starts_with("restored "), "{what}");
        assert_eq!(
            webhook
                .metric(
                    "snapshot_webhook_namespace_checks_total{object=\"registry_secret\",answer=\"unknown\"}"
                )
                .await,
            1.0,
            "{what}"
        );
        // the webhook's own measure: never past its budget
        let took = webhook.admission_histogram().await;
        assert_eq!(took.total(), 1.0, "{what}");
        assert_eq!(took.over(1.0), Some(0.0), "{what}: past the budget");
    }
    assert!(
        forbidding.seen().iter().all(|s| s.accept == METADATA_ONLY),
        "metadata only"
    );
}
