//! `just demo`: the restore half of the story on this machine, with real
//! components: a registry (docker-registry, TLS, htpasswd), the snapshot-webhook
//! binary over HTTPS, AdmissionReviews as kube-apiserver sends them.
//!
//! The commit sidecar is not written yet (issue 3): its step pushes the
//! snapshot image to the registry under the name the sidecar will use,
//! and says so.

use harness::{
    admission::{apply, as_pod, desktop_pod, image_of, review},
    registry::{Registry, PASSWORD, USER},
    webhook::{RegistryAccess, Webhook},
};
use serde_json::Value;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const IMAGE: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1";
const REPO: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04";
const USER_ID: &str = "12896316";

fn step(n: u32, what: &str) -> Instant {
    println!("\n{n}. {what}");
    Instant::now()
}

fn done(started: Instant, result: &str) {
    println!("   -> {result} ({:.0} ms)", started.elapsed().as_secs_f64() * 1000.0);
}

async fn login(webhook: &Webhook) -> (Value, Value) {
    let pod = desktop_pod(USER_ID, IMAGE);
    let answer: Value = webhook
        .client()
        .post(webhook.url("/mutate"))
        .json(&review(&pod, "CREATE", false))
        .send()
        .await
        .expect("the webhook answers")
        .json()
        .await
        .expect("an AdmissionReview");
    let patched = apply(&pod, &answer);
    (answer, patched)
}

fn describe(answer: &Value, patched: &Value) -> String {
    let pod = as_pod(patched);
    let image = image_of(&pod, "x-graphical").unwrap_or_default();
    let sidecar = pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == "t-snapshot"));
    let warnings = answer["response"]["warnings"].as_array().map(|w| format!(", warning: {}", w[0])).unwrap_or_default();
    format!("x-graphical runs {image}; sidecar t-snapshot injected: {sidecar}{warnings}")
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    println!("desktop-snapshot demo: user {USER_ID}, desktop image {IMAGE}");

    let t = step(1, "start a private registry (docker-registry with TLS and htpasswd) and the snapshot webhook (HTTPS, CA-checked)");
    let mut registry = Registry::start().await;
    let creds = registry.dir.path().join("dockerconfig.json");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);
    let ca = registry.ca_path();
    let webhook = Webhook::start(
        RegistryAccess { host: &registry.host, ca: Some(&ca), credentials: Some(&creds) },
        &["--log-format", "text"],
    )
    .await;
    done(t, &format!("registry on {}, webhook on {}", registry.host, webhook.url("/mutate")));

    let t = step(2, "first login: the desktop pod is created, the webhook looks for a snapshot");
    let (answer, patched) = login(&webhook).await;
    done(t, &describe(&answer, &patched));

    let t = step(3, "the user installs software and picks \"snapshot\" (stand-in: the sidecar is issue 3; the image is pushed under the sidecar's name)");
    let ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tag = format!("{USER_ID}-{ns}");
    registry.push_tags(REPO, &[&format!("{USER_ID}-1700000000"), &tag]).await;
    done(t, &format!("pushed {}/{REPO}:{tag}", registry.host));

    let t = step(4, "log off, log in again: a new desktop pod is created");
    let (answer, patched) = login(&webhook).await;
    let restored = image_of(&as_pod(&patched), "x-graphical") == Some(format!("{}/{REPO}:{tag}", registry.host));
    done(t, &describe(&answer, &patched));
    assert!(restored, "the second login did not get the snapshot; webhook log:\n{}", webhook.log());

    let t = step(5, "the registry goes down; the user logs in again");
    registry.stop().await;
    let (answer, patched) = login(&webhook).await;
    done(t, &describe(&answer, &patched));

    let t = step(6, "clean up");
    let metrics = webhook.metrics().await;
    drop(webhook);
    drop(registry);
    done(t, "registry and webhook stopped, temp dirs removed");
    println!("\nwebhook metrics:");
    for line in metrics.lines().filter(|l| l.starts_with("snapshot_webhook_admissions_total")) {
        println!("   {line}");
    }
    println!("\ndemo finished: the second login got the user's snapshot back.");
}
