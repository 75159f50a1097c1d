//! `just demo`: the whole story on this machine, with real components: a
//! registry (docker-registry, TLS, htpasswd), containerd with runc, the
//! snapshot-webhook over HTTPS answering AdmissionReviews as kube-apiserver
//! sends them, and the snapshot-sidecar committing through containerd.
//! The kubelet's part (pull, create, start, remove) is played with `ctr`.

use harness::{
    admission::{apply, as_pod, desktop_pod, image_of, review},
    containerd::{Containerd, BASE_IMAGE},
    registry::{Registry, PASSWORD, USER},
    sidecar::{Sidecar, Target},
    webhook::{RegistryAccess, Webhook},
};
use serde_json::Value;
use std::time::Instant;

const USER_ID: &str = "jdoe@example.com";

fn step(n: u32, what: &str) -> Instant {
    println!("\n{n}. {what}");
    Instant::now()
}

fn done(started: Instant, result: &str) {
    println!("   -> {result} ({:.0} ms)", started.elapsed().as_secs_f64() * 1000.0);
}

/// The AdmissionReview answer for a new desktop pod, and the pod as the API server would store it.
async fn admit(webhook: &Webhook) -> (Value, Value) {
    let pod = desktop_pod(USER_ID, BASE_IMAGE);
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

fn sidecar_env(patched: &Value, name: &str) -> String {
    let pod = as_pod(patched);
    pod.spec
        .and_then(|s| s.containers.into_iter().find(|c| c.name == "t-snapshot"))
        .and_then(|c| c.env)
        .and_then(|env| env.into_iter().find(|e| e.name == name))
        .and_then(|e| e.value)
        .unwrap_or_else(|| panic!("the webhook did not inject the sidecar with {name}"))
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    println!("desktop-snapshot demo: user {USER_ID}, desktop image {BASE_IMAGE}");

    let t = step(1, "start containerd, a private registry (TLS, htpasswd) and the snapshot webhook (HTTPS, CA-checked)");
    let containerd = Containerd::start().await;
    containerd.import_base_image().await;
    let registry = Registry::start().await;
    let creds = registry.dir.path().join("dockerconfig.json");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);
    let ca = registry.ca_path();
    let webhook =
        Webhook::start(RegistryAccess { host: &registry.host, ca: Some(&ca), credentials: Some(&creds) }, &[]).await;
    done(t, &format!("containerd on {}, registry on {}, webhook on {}", containerd.socket.display(), registry.host, webhook.url("/mutate")));

    let t = step(2, "first login: the desktop pod is created and goes through the webhook");
    let (_, patched) = admit(&webhook).await;
    let image = image_of(&as_pod(&patched), "x-graphical").unwrap_or_default();
    let repository = sidecar_env(&patched, "SNAPSHOT_REPOSITORY");
    let prefix = sidecar_env(&patched, "SNAPSHOT_TAG_PREFIX");
    done(t, &format!("no snapshot yet: x-graphical keeps {image}; sidecar t-snapshot injected (pushes to {repository}:{prefix}-<time>)"));

    let t = step(3, "the kubelet starts the desktop; the user installs an application");
    containerd.run_desktop_from(&image, "desktop-1", "pod-1", "12896316-aaaaa", "x-graphical").await;
    containerd
        .exec("desktop-1", "mkdir -p /opt/notes && echo 'notes 1.0, installed by the user' > /opt/notes/VERSION && echo 'dark' > /root/.theme")
        .await;
    done(t, "/opt/notes/VERSION and /root/.theme written in the running container");

    let t = step(4, "the user picks \"snapshot\" in the desktop menu (POST /snapshot/snapshot to the sidecar)");
    let path = repository.split_once('/').map(|(_, p)| p.to_string()).unwrap_or_default();
    let sidecar = Sidecar::start(Target {
        containerd: &containerd,
        pod_uid: "pod-1",
        registry_host: &registry.host,
        registry_ca: Some(&ca),
        credentials: Some(&creds),
        repository_path: &path,
        tag_prefix: &prefix,
    })
    .await;
    let started = sidecar.post("/snapshot/snapshot").await;
    let id = started["session_id"].as_str().expect("a session id").to_string();
    println!("   {} (session {id})", started["message"].as_str().unwrap_or_default());
    let mut last = String::new();
    loop {
        let (_, v) = sidecar.get(&format!("/snapshot/{id}")).await;
        let message = v["message"].as_str().unwrap_or_default().to_string();
        if message != last {
            println!("   [{:>5.0} ms] {message}", t.elapsed().as_secs_f64() * 1000.0);
            last = message.clone();
        }
        if message == "done" {
            break;
        }
        assert!(v["status"] != "error", "the snapshot failed: {message}\nsidecar log:\n{}", sidecar.log());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(containerd.task_status("desktop-1").await, "RUNNING", "the desktop runs on");
    done(t, &format!("snapshot pushed; the desktop kept running; tags: {:?}", registry.tags(&path).await));

    let t = step(5, "log off: the desktop container is removed");
    sidecar.stop().await;
    containerd.remove("desktop-1").await;
    done(t, "gone");

    let t = step(6, "second login: a new desktop pod goes through the webhook");
    let (_, patched) = admit(&webhook).await;
    let image = image_of(&as_pod(&patched), "x-graphical").unwrap_or_default();
    assert!(image.starts_with(&format!("{repository}:{prefix}-")), "not restored: {image}\nwebhook log:\n{}", webhook.log());
    done(t, &format!("x-graphical now runs {image}"));

    let t = step(7, "the kubelet pulls the snapshot and starts the desktop from it");
    containerd.pull(&image, &registry).await;
    containerd.run_desktop_from(&image, "desktop-2", "pod-2", "12896316-bbbbb", "x-graphical").await;
    let found = containerd.exec("desktop-2", "cat /opt/notes/VERSION /root/.theme").await;
    done(t, &format!("the user's files are there: {}", found.trim().replace('\n', " | ")));
    assert!(found.contains("notes 1.0"), "the installed application is missing");

    let t = step(8, "clean up");
    containerd.stop().await;
    drop(webhook);
    drop(registry);
    done(t, "containers, containerd, registry and webhook stopped; temp dirs removed");
    println!("\ndemo finished: what the user installed came back at the next login.");
}
