//! One node of a cluster, for whole-story tests: containerd with `ctr`
//! playing the kubelet, a registry, the webhook admitting desktop pods, and
//! a sidecar per desktop run exactly as the webhook injected it. The webhook
//! and the sidecar run from their OCI images (`just images`), as in a cluster.

use crate::{
    admission::{apply, as_pod, desktop_pod, image_of, review},
    containerd::{Containerd, Image, RunSpec, BASE_IMAGE},
    kubelet::{self, Identity, Objects},
    launch::{image_layout, Ended},
    ports,
    registry::Registry,
    sidecar::Sidecar,
    webhook::Webhook,
};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
use tokio::time::Instant;

/// The secret and configMap the webhook is told to use for the registry.
const REGISTRY_SECRET: &str = "abcdesktop-snapshot-registry";
const REGISTRY_CA_CONFIGMAP: &str = "snapshot-registry-ca";
const SIDECAR: &str = "t-snapshot";

pub struct Node {
    pub containerd: Containerd,
    pub registry: Registry,
    pub webhook: Webhook,
    pub creds: std::path::PathBuf,
    /// The images the webhook and the sidecar run from.
    pub webhook_image: Image,
    pub sidecar_image: Image,
    objects: Objects,
    pods: AtomicUsize,
}

/// A running desktop: its pod (as admitted) and its container.
pub struct Desktop {
    pub user: String,
    /// The pod as admitted (with what the webhook injected).
    pub pod: Value,
    pub pod_name: String,
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
        let webhook_image = containerd
            .import_layout(&image_layout("snapshot-webhook"))
            .await;
        let sidecar_image = containerd
            .import_layout(&image_layout("snapshot-sidecar"))
            .await;
        let registry = Registry::start().await;
        let creds = registry.credentials_file();
        let objects = Objects {
            secrets: BTreeMap::from([(
                REGISTRY_SECRET.to_string(),
                BTreeMap::from([(".dockerconfigjson".to_string(), creds.clone())]),
            )]),
            config_maps: BTreeMap::from([(
                REGISTRY_CA_CONFIGMAP.to_string(),
                BTreeMap::from([("ca.crt".to_string(), registry.ca_path())]),
            )]),
        };
        let (socket, snapshots) = (
            containerd.socket.to_string_lossy().into_owned(),
            containerd.snapshotter_root().to_string_lossy().into_owned(),
        );
        let mut flags = vec![
            "--sidecar-image",
            &sidecar_image.name,
            "--sidecar-pull-policy",
            "Never",
            "--registry-secret-name",
            REGISTRY_SECRET,
            "--sidecar-registry-ca-configmap",
            REGISTRY_CA_CONFIGMAP,
            "--containerd-socket",
            &socket,
            "--containerd-namespace",
            &containerd.namespace,
            "--containerd-snapshotter-root",
            &snapshots,
        ];
        flags.extend(webhook_flags);
        let webhook = Webhook::in_container(&containerd, &webhook_image, &registry, &flags).await;
        Self {
            containerd,
            registry,
            webhook,
            creds,
            webhook_image,
            sidecar_image,
            objects,
            pods: AtomicUsize::new(0),
        }
    }

    /// The desktops' namespace lacks the registry secret and CA configMap the
    /// webhook names (an operator forgot them).
    pub fn forget_registry_objects(&mut self) {
        self.objects.secrets.clear();
        self.objects.config_maps.clear();
    }

    /// What the kubelet would give container `name` of `desktop`'s pod (as
    /// stored, or `edit`ed), or why it would not start it.
    pub fn kubelet_spec(
        &self,
        desktop: &Desktop,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<RunSpec, String> {
        let mut stored = desktop.pod.clone();
        edit(&mut stored);
        let pod = as_pod(&stored);
        let dir = tempfile::tempdir().expect("temp dir");
        kubelet::try_run_spec(
            &pod,
            name,
            &Identity {
                name: &desktop.pod_name,
                namespace: "abcdesktop",
                uid: &desktop.pod_uid,
            },
            &self.objects,
            dir.path(),
            dir.path().join("log"),
        )
    }

    /// The AdmissionReview of a new desktop pod for `user`: the pod as stored.
    pub async fn admit(&self, user: &str) -> Value {
        self.admit_with(user, BASE_IMAGE).await
    }

    /// The same, for a desktop pod whose graphical image is `image`.
    pub async fn admit_with(&self, user: &str, image: &str) -> Value {
        let pod = desktop_pod(user, image);
        let answer = self.webhook.admit(&review(&pod, "CREATE", false)).await;
        apply(&pod, &answer)
    }

    /// Logs `user` in: admission, then the kubelet pulls (when needed) and starts the desktop.
    pub async fn login(&self, user: &str) -> Desktop {
        self.login_with(user, BASE_IMAGE).await
    }

    /// Logs `user` in with a desktop pod whose graphical image is `image`.
    pub async fn login_with(&self, user: &str, image: &str) -> Desktop {
        let pod = self.admit_with(user, image).await;
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
            pod_name: format!("{n}-pod"),
            repository: sidecar_env(&pod, "SNAPSHOT_REPOSITORY"),
            tag_prefix: sidecar_env(&pod, "SNAPSHOT_TAG_PREFIX"),
            pod,
            pod_uid,
            container,
            image,
        }
    }

    /// The sidecar of `desktop`, run from its image as the webhook injected it:
    /// its env (downward API resolved), volumes and capabilities. Two things
    /// differ from a pod: it shares the host's network (the pod's own would
    /// need a CNI), so it listens on a free loopback port; `extra_env` adds to
    /// or replaces the injected env.
    pub async fn sidecar(&self, desktop: &Desktop, extra_env: &[(&str, &str)]) -> Sidecar {
        self.sidecar_with(desktop, extra_env, |_| {}).await
    }

    /// The same, with `edit` applied to what the kubelet would give it (a
    /// capability less, say).
    pub async fn sidecar_with(
        &self,
        desktop: &Desktop,
        extra_env: &[(&str, &str)],
        edit: impl FnOnce(&mut RunSpec),
    ) -> Sidecar {
        let pod = as_pod(&desktop.pod);
        let image = kubelet::container(&pod, SIDECAR).image.clone();
        assert_eq!(
            image.as_deref(),
            Some(self.sidecar_image.name.as_str()),
            "the webhook injected another sidecar image"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = ports::free_port();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let mut spec = kubelet::run_spec(
            &pod,
            SIDECAR,
            &Identity {
                name: &desktop.pod_name,
                namespace: &namespace,
                uid: &desktop.pod_uid,
            },
            &self.objects,
            dir.path(),
            Sidecar::log_path(dir.path()),
        );
        let listen = format!("127.0.0.1:{port}");
        let overrides = [("SNAPSHOT_LISTEN", listen.as_str()), ("RUST_LOG", "info")];
        for (k, v) in overrides.iter().chain(extra_env) {
            spec.env.retain(|(name, _)| name != k);
            spec.env.push((k.to_string(), v.to_string()));
        }
        edit(&mut spec);
        Sidecar::in_container(&self.containerd, &self.sidecar_image, port, dir, spec).await
    }

    /// The user picks "snapshot"; panics unless it ends in `done`.
    pub async fn snapshot(&self, desktop: &Desktop, extra_env: &[(&str, &str)]) {
        let sidecar = self.sidecar(desktop, extra_env).await;
        sidecar.snapshot_done().await;
        sidecar.stop().await;
    }

    /// The pod is deleted (the user logs off) and the kubelet stops it as
    /// [`kubelet::termination`] says: the graphical container's preStop hook
    /// (its port is the sidecar's in the pod, here the sidecar's loopback
    /// port), SIGTERM, SIGKILL at the end of the grace period; the sidecar at
    /// once (a plain container) or after the desktop (a native sidecar).
    pub async fn delete_pod(&self, desktop: Desktop, sidecar: Sidecar) -> Deleted {
        let pod = as_pod(&desktop.pod);
        let plan = kubelet::termination(&pod);
        let started = Instant::now();
        let grace_end = started + plan.grace;
        // the kubelet gives a container at least 2 s after its hook
        let left = || {
            grace_end
                .saturating_duration_since(Instant::now())
                .max(kubelet::HOOK_EXTENSION)
        };
        let sidecar_port = kubelet::container(&pod, SIDECAR)
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .next();
        let native = plan.sidecars.iter().any(|n| n == SIDECAR);
        let hook = plan
            .main
            .iter()
            .find(|(name, _)| name == "x-graphical")
            .and_then(|(_, hook)| hook.clone());
        let hook_url = hook.map(|h| {
            assert_eq!(
                Some(i32::from(h.port)),
                sidecar_port,
                "the preStop hook calls a port no container of the pod listens on"
            );
            sidecar.url(&h.path)
        });
        let desktop_id = desktop.container.clone();
        let graphical = async {
            let hook = match hook_url {
                None => None,
                Some(url) => {
                    let call = async {
                        let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
                        let status = response.status().as_u16();
                        let body = response.json::<Value>().await.map_err(|e| e.to_string())?;
                        Ok((status, body))
                    };
                    Some(
                        tokio::time::timeout_at(grace_end, call)
                            .await
                            .unwrap_or_else(|_| {
                                Err("the preStop hook outlived the grace period".into())
                            }),
                    )
                }
            };
            let hook_ended = started.elapsed();
            self.containerd.signal(&desktop_id, "SIGTERM").await;
            let stopped = self.containerd.stopped_within(&desktop_id, left()).await;
            if !stopped {
                self.containerd.signal(&desktop_id, "SIGKILL").await;
            }
            self.containerd.remove(&desktop_id).await;
            (hook, hook_ended, stopped)
        };
        let ((hook, hook_ended, desktop_stopped), (sidecar, sidecar_log)) = if native {
            let graphical = graphical.await;
            (graphical, sidecar.terminate_within(left()).await)
        } else {
            tokio::join!(
                graphical,
                sidecar.terminate_within(plan.grace.max(kubelet::HOOK_EXTENSION))
            )
        };
        Deleted {
            grace: plan.grace,
            elapsed: started.elapsed(),
            hook,
            hook_ended,
            desktop_stopped,
            sidecar,
            sidecar_log,
        }
    }

    /// The repository path (no host) `desktop`'s snapshots go to.
    pub fn repository_path(desktop: &Desktop) -> &str {
        desktop
            .repository
            .split_once('/')
            .map(|(_, path)| path)
            .expect("a repository path")
    }

    /// `desktop`'s user's snapshot tags in the registry, oldest first.
    pub async fn tags(&self, desktop: &Desktop) -> Vec<String> {
        let all = self.registry.tags(Self::repository_path(desktop)).await;
        snapshot_tags::oldest_first(all.iter().map(String::as_str), &desktop.tag_prefix)
    }

    /// The user logs off: the container is removed.
    pub async fn logoff(&self, desktop: Desktop) {
        self.containerd.remove(&desktop.container).await;
    }

    /// Stops the webhook's container, then containerd and the registry.
    pub async fn stop(self) {
        drop(self.webhook);
        self.containerd.stop().await;
    }
}

/// How a pod's deletion went.
pub struct Deleted {
    /// Its `terminationGracePeriodSeconds`.
    pub grace: Duration,
    /// From the deletion to the last container stopped.
    pub elapsed: Duration,
    /// The preStop hook's answer (HTTP status, JSON body), when it had one.
    pub hook: Option<Result<(u16, Value), String>>,
    /// When the hook ended (and the desktop got SIGTERM).
    pub hook_ended: Duration,
    /// The desktop stopped on SIGTERM (false: SIGKILL).
    pub desktop_stopped: bool,
    /// How the sidecar ended (`None`: SIGKILL), and its log.
    pub sidecar: Option<Ended>,
    pub sidecar_log: String,
}

fn sidecar_env(pod: &Value, name: &str) -> String {
    as_pod(pod)
        .spec
        .and_then(|s| {
            s.containers
                .into_iter()
                .chain(s.init_containers.into_iter().flatten())
                .find(|c| c.name == "t-snapshot")
        })
        .and_then(|c| c.env)
        .and_then(|env| env.into_iter().find(|e| e.name == name))
        .and_then(|e| e.value)
        .unwrap_or_else(|| panic!("the webhook did not inject the sidecar with {name}"))
}
