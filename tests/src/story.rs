//! One node of a cluster, for whole-story tests: containerd playing the
//! kubelet, a registry, the webhook admitting desktop pods, and a sidecar per
//! desktop configured from what the webhook injected.

use crate::{
    admission::{apply, as_pod, desktop_pod, image_of, review},
    containerd::{Containerd, BASE_IMAGE},
    registry::Registry,
    sidecar::{Sidecar, Target},
    webhook::Webhook,
};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Node {
    pub containerd: Containerd,
    pub registry: Registry,
    pub webhook: Webhook,
    pub creds: std::path::PathBuf,
    pods: AtomicUsize,
}

/// A running desktop: its pod (as admitted) and its container.
pub struct Desktop {
    pub user: String,
    pub pod_uid: String,
    pub container: String,
    pub image: String,
    pub repository: String,
    pub tag_prefix: String,
}

impl Node {
    pub async fn start(webhook_flags: &[&str]) -> Self {
        let containerd = Containerd::start().await;
        containerd.import_base_image().await;
        let registry = Registry::start().await;
        let creds = registry.credentials_file();
        let webhook = Webhook::for_registry(&registry, webhook_flags).await;
        Self {
            containerd,
            registry,
            webhook,
            creds,
            pods: AtomicUsize::new(0),
        }
    }

    /// The AdmissionReview of a new desktop pod for `user`: the pod as stored.
    pub async fn admit(&self, user: &str) -> Value {
        let pod = desktop_pod(user, BASE_IMAGE);
        let answer: Value = self
            .webhook
            .client()
            .post(self.webhook.url("/mutate"))
            .json(&review(&pod, "CREATE", false))
            .send()
            .await
            .expect("the webhook answers")
            .json()
            .await
            .expect("an AdmissionReview");
        apply(&pod, &answer)
    }

    /// Logs `user` in: admission, then the kubelet pulls (when needed) and starts the desktop.
    pub async fn login(&self, user: &str) -> Desktop {
        let pod = self.admit(user).await;
        let image = image_of(&as_pod(&pod), "x-graphical").expect("a graphical image");
        if image != BASE_IMAGE {
            self.containerd.pull(&image, &self.registry).await;
        }
        let n = self.pods.fetch_add(1, Ordering::SeqCst);
        let (pod_uid, container) = (format!("pod-{n}"), format!("desktop-{n}"));
        self.containerd
            .run_desktop_from(
                &image,
                &container,
                &pod_uid,
                &format!("{n}-pod"),
                "x-graphical",
            )
            .await;
        Desktop {
            user: user.to_string(),
            pod_uid,
            container,
            image,
            repository: sidecar_env(&pod, "SNAPSHOT_REPOSITORY"),
            tag_prefix: sidecar_env(&pod, "SNAPSHOT_TAG_PREFIX"),
        }
    }

    /// The sidecar of `desktop`, configured from what the webhook injected.
    pub async fn sidecar(&self, desktop: &Desktop, extra_env: &[(&str, &str)]) -> Sidecar {
        let path = desktop
            .repository
            .split_once('/')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        let ca = self.registry.ca_path();
        Sidecar::start_with(
            Target {
                containerd: &self.containerd,
                pod_uid: &desktop.pod_uid,
                registry_host: &self.registry.host,
                registry_ca: Some(&ca),
                credentials: Some(&self.creds),
                repository_path: &path,
                tag_prefix: &desktop.tag_prefix,
            },
            None,
            extra_env,
        )
        .await
    }

    /// The user picks "snapshot"; panics unless it ends in `done`.
    pub async fn snapshot(&self, desktop: &Desktop, extra_env: &[(&str, &str)]) {
        let sidecar = self.sidecar(desktop, extra_env).await;
        sidecar.snapshot_done().await;
        sidecar.stop().await;
    }

    /// The user logs off: the container is removed.
    pub async fn logoff(&self, desktop: Desktop) {
        self.containerd.remove(&desktop.container).await;
    }

    pub async fn stop(self) {
        self.containerd.stop().await;
    }
}

fn sidecar_env(pod: &Value, name: &str) -> String {
    as_pod(pod)
        .spec
        .and_then(|s| s.containers.into_iter().find(|c| c.name == "t-snapshot"))
        .and_then(|c| c.env)
        .and_then(|env| env.into_iter().find(|e| e.name == name))
        .and_then(|e| e.value)
        .unwrap_or_else(|| panic!("the webhook did not inject the sidecar with {name}"))
}
