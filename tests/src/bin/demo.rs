//! `just demo`: the whole story on this machine, with real components: a
//! registry (docker-registry, TLS, htpasswd), containerd with runc, the
//! snapshot-webhook over HTTPS answering AdmissionReviews as kube-apiserver
//! sends them, and the snapshot-sidecar committing through containerd. Both
//! run from their OCI images (`just images`) as containers of that containerd;
//! the kubelet's part (pull, create, start, remove) is played with `ctr`.

use harness::{containerd::BASE_IMAGE, story::Node};
use std::time::Instant;

const USER_ID: &str = "jdoe@example.com";

fn step(n: u32, what: &str) -> Instant {
    println!("\n{n}. {what}");
    Instant::now()
}

fn done(started: Instant, result: &str) {
    println!(
        "   -> {result} ({:.0} ms)",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    println!("desktop-snapshot demo: user {USER_ID}, desktop image {BASE_IMAGE}");

    let t = step(1, "start containerd, a private registry (TLS, htpasswd) and the snapshot webhook (HTTPS, CA-checked) from its image");
    let node = Node::start(&[]).await;
    done(
        t,
        &format!(
            "containerd on {}, registry on {}, webhook ({}) on {}",
            node.containerd.socket.display(),
            node.registry.host,
            node.webhook_image.name,
            node.webhook.url("/mutate")
        ),
    );

    let t = step(
        2,
        "first login: the desktop pod goes through the webhook, the kubelet starts it",
    );
    let desktop = node.login(USER_ID).await;
    done(
        t,
        &format!(
            "no snapshot yet: x-graphical runs {}; sidecar t-snapshot injected (pushes to {}:{}-<time>)",
            desktop.image, desktop.repository, desktop.tag_prefix
        ),
    );

    let t = step(3, "the user installs an application");
    node.containerd
        .exec(&desktop.container, "mkdir -p /opt/notes && echo 'notes 1.0, installed by the user' > /opt/notes/VERSION && echo 'dark' > /root/.theme")
        .await;
    done(
        t,
        "/opt/notes/VERSION and /root/.theme written in the running container",
    );

    let t = step(
        4,
        "the user picks \"snapshot\" in the desktop menu (POST /snapshot/snapshot to the sidecar)",
    );
    let sidecar = node.sidecar(&desktop, &[]).await;
    println!(
        "   sidecar t-snapshot runs {} with the env, volumes and capabilities the webhook injected",
        node.sidecar_image.name
    );
    let started = sidecar.post("/snapshot/snapshot").await;
    let id = started["session_id"]
        .as_str()
        .expect("a session id")
        .to_string();
    println!(
        "   {} (session {id})",
        started["message"].as_str().unwrap_or_default()
    );
    let mut last = String::new();
    loop {
        let (_, v) = sidecar.get(&format!("/snapshot/{id}")).await;
        let message = v["message"].as_str().unwrap_or_default().to_string();
        if message != last {
            println!(
                "   [{:>5.0} ms] {message}",
                t.elapsed().as_secs_f64() * 1000.0
            );
            last = message.clone();
        }
        if message == "done" {
            break;
        }
        assert!(
            v["status"] != "error",
            "the snapshot failed: {message}\nsidecar log:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        node.containerd.task_status(&desktop.container).await,
        "RUNNING",
        "the desktop runs on"
    );
    let path = desktop
        .repository
        .split_once('/')
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let metrics = sidecar.metrics().await;
    let source = if metrics.contains("snapshot_sidecar_layers_total{source=\"upperdir\"} 1") {
        "the container's overlayfs upper directory"
    } else {
        "containerd's Diff service"
    };
    done(
        t,
        &format!(
            "snapshot pushed; the desktop kept running; layer read from {source}; tags: {:?}",
            node.registry.tags(&path).await
        ),
    );

    let t = step(5, "log off: the desktop container is removed");
    sidecar.stop().await;
    node.logoff(desktop).await;
    done(t, "gone");

    let t = step(6, "second login: the new desktop pod goes through the webhook; the kubelet pulls and starts it");
    let desktop = node.login(USER_ID).await;
    assert_ne!(
        desktop.image,
        BASE_IMAGE,
        "not restored; webhook log:\n{}",
        node.webhook.log()
    );
    done(t, &format!("x-graphical now runs {}", desktop.image));

    let t = step(7, "the user looks for what they installed");
    let found = node
        .containerd
        .exec(&desktop.container, "cat /opt/notes/VERSION /root/.theme")
        .await;
    done(
        t,
        &format!(
            "the user's files are there: {}",
            found.trim().replace('\n', " | ")
        ),
    );
    assert!(
        found.contains("notes 1.0"),
        "the installed application is missing"
    );

    let t = step(8, "clean up");
    node.stop().await;
    done(
        t,
        "containers, containerd, registry and webhook stopped; temp dirs removed",
    );
    println!("\ndemo finished: what the user installed came back at the next login.");
}
