//! The commit sidecar the webhook injects: its container and volumes. Pure code.
//!
//! The sidecar gets everything it needs from here, so the user-id mapping
//! lives only in the webhook: the target repository and tag prefix as env,
//! the pod's identity from the downward API, the registry secret as a file
//! (never as env or args), the node's containerd socket, and (for the fast
//! path) containerd's overlayfs snapshots, read-only, with CAP_SYS_ADMIN to read
//! overlay's attributes: nothing the socket does not already give.

use crate::{config::Protocol, target::Target};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
        EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, LifecycleHandler,
        ObjectFieldSelector, ResourceRequirements, SecretVolumeSource, SecurityContext, Volume,
        VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use std::collections::BTreeMap;

pub const CREDENTIALS_VOLUME: &str = "snapshot-registry-credentials";
pub const CONTAINERD_VOLUME: &str = "snapshot-containerd";
pub const CREDENTIALS_DIR: &str = "/var/run/desktop-snapshot/registry";
pub const CREDENTIALS_FILE: &str = ".dockerconfigjson";
pub const CA_VOLUME: &str = "snapshot-registry-ca";
pub const CA_DIR: &str = "/var/run/desktop-snapshot/registry-ca";
pub const SNAPSHOTTER_VOLUME: &str = "snapshot-containerd-snapshots";
pub const WORK_VOLUME: &str = "snapshot-work";
pub const WORK_DIR: &str = "/var/lib/desktop-snapshot";

/// How the sidecar is made, from the webhook's configuration.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    pub name: String,
    pub image: String,
    pub pull_policy: String,
    pub port: u16,
    pub native: bool,
    pub graphical_container: String,
    pub registry_secret_name: String,
    /// ConfigMap holding the registry's CA (`ca.crt`), when it has a private one.
    pub registry_ca_configmap: Option<String>,
    pub registry_protocol: Protocol,
    pub containerd_socket: String,
    pub containerd_namespace: String,
    /// containerd's overlayfs snapshotter directory on the node, mounted read-only
    /// at the same path so the sidecar reads the container's upper directory (the
    /// fast path); `None`: the sidecar uses containerd's Diff service.
    pub snapshotter_root: Option<String>,
    /// CPU limit; `None`: only a request, so the commit's burst uses every core.
    pub cpu_limit: Option<String>,
    /// Largest change a snapshot may spool on the node's disk, in bytes.
    pub max_change_bytes: u64,
    /// The sidecar's `--layer-format` (`gzip`, `zstd` or `estargz`).
    pub layer_format: String,
    /// The sidecar's `--pre-copy`.
    pub pre_copy: bool,
    /// The sidecar's `--incremental`.
    pub incremental: bool,
    /// Retention: what of the user's snapshots the sidecar keeps after a push.
    pub retention: crate::tag::retention::Rules,
    /// With a snapshot at logoff: the least termination grace period a pod gets.
    pub logoff_grace_period: std::time::Duration,
}

/// The sidecar's blocking endpoint the graphical container's preStop hook calls.
pub const LOGOFF_PATH: &str = "/snapshot/logoff";

/// The kubelet's default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Whether `container` is a sidecar this webhook made (it carries the env
/// only we inject), as opposed to pyos's own `t-snapshot`.
pub fn is_ours(container: &Container) -> bool {
    container
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "SNAPSHOT_REPOSITORY")
}

/// Room in the work emptyDir above the sidecar's own limits: the sidecar stops
/// a snapshot at its limit, before the kubelet would evict the pod.
pub const WORK_HEADROOM_BYTES: u64 = 256 << 20;

/// Files of one snapshot the work directory may hold at once, each held to
/// the sidecar's `--max-change-bytes`: with pre-copy, the first pass's
/// pieces, what the pause reads again, the eStargz members the first pass
/// compressed, and the spool of the layer (the emptyDir's `sizeLimit` is
/// this many limits and the headroom: the sidecar stops first).
pub const WORK_FILES: u64 = 4;

impl SidecarSpec {
    /// The sidecar container for `user`'s desktop pod; `logoff_grace_seconds`: the
    /// pod's grace period, when the desktop is snapshotted at logoff; `every`:
    /// the interval of its snapshots on a schedule, if any.
    pub fn container(
        &self,
        target: &Target,
        user: &str,
        original_image: &str,
        logoff_grace_seconds: Option<i64>,
        every: Option<std::time::Duration>,
    ) -> Container {
        let plain = |name: &str, value: &str| EnvVar {
            name: name.to_string(),
            value: Some(value.to_string()),
            value_from: None,
        };
        let field = |name: &str, path: &str| EnvVar {
            name: name.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.to_string(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        };
        let quantities = |memory: &str, cpu: Option<&str>| {
            let mut q = BTreeMap::from([("memory".to_string(), Quantity(memory.to_string()))]);
            if let Some(cpu) = cpu {
                q.insert("cpu".to_string(), Quantity(cpu.to_string()));
            }
            q
        };
        Container {
            name: self.name.clone(),
            image: Some(self.image.clone()),
            image_pull_policy: Some(self.pull_policy.clone()),
            restart_policy: self.native.then(|| "Always".to_string()),
            ports: Some(vec![ContainerPort {
                name: Some("snapshot".to_string()),
                container_port: i32::from(self.port),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            }]),
            env: Some(
                vec![
                    field("SNAPSHOT_POD_NAME", "metadata.name"),
                    field("SNAPSHOT_POD_NAMESPACE", "metadata.namespace"),
                    field("SNAPSHOT_POD_UID", "metadata.uid"),
                    plain("SNAPSHOT_CONTAINER", &self.graphical_container),
                    plain("SNAPSHOT_REPOSITORY", &target.repository()),
                    plain("SNAPSHOT_TAG_PREFIX", &target.tag_prefix),
                    plain("SNAPSHOT_BASE_IMAGE", original_image),
                    plain("SNAPSHOT_USER", user),
                    plain(
                        "SNAPSHOT_REGISTRY_PROTOCOL",
                        self.registry_protocol.as_str(),
                    ),
                    plain(
                        "SNAPSHOT_REGISTRY_CREDENTIALS",
                        &format!("{CREDENTIALS_DIR}/{CREDENTIALS_FILE}"),
                    ),
                    plain("SNAPSHOT_CONTAINERD_SOCKET", &self.containerd_socket),
                    plain("SNAPSHOT_CONTAINERD_NAMESPACE", &self.containerd_namespace),
                    plain("SNAPSHOT_LISTEN", &format!("0.0.0.0:{}", self.port)),
                    plain("SNAPSHOT_WORK_DIR", WORK_DIR),
                    plain(
                        "SNAPSHOT_MAX_CHANGE_BYTES",
                        &self.max_change_bytes.to_string(),
                    ),
                    plain("SNAPSHOT_LAYER_FORMAT", &self.layer_format),
                    plain("SNAPSHOT_PRE_COPY", &self.pre_copy.to_string()),
                    plain("SNAPSHOT_INCREMENTAL", &self.incremental.to_string()),
                    plain("SNAPSHOT_KEEP", &self.retention.last.to_string()),
                    plain("SNAPSHOT_KEEP_HOURLY", &self.retention.hourly.to_string()),
                    plain("SNAPSHOT_KEEP_DAILY", &self.retention.daily.to_string()),
                    plain("SNAPSHOT_KEEP_WEEKLY", &self.retention.weekly.to_string()),
                    plain(
                        "SNAPSHOT_KEEP_MIN_AGE",
                        &humantime::format_duration(self.retention.min_age).to_string(),
                    ),
                ]
                .into_iter()
                .chain(
                    self.registry_ca_configmap
                        .as_ref()
                        .map(|_| plain("SNAPSHOT_REGISTRY_CA", &format!("{CA_DIR}/ca.crt"))),
                )
                .chain(logoff_grace_seconds.into_iter().flat_map(|grace| {
                    [
                        plain("SNAPSHOT_ON_LOGOFF", "true"),
                        plain("SNAPSHOT_LOGOFF_GRACE_PERIOD", &format!("{grace}s")),
                    ]
                }))
                .chain(every.map(|every| {
                    plain(
                        "SNAPSHOT_EVERY",
                        &humantime::format_duration(every).to_string(),
                    )
                }))
                .collect(),
            ),
            volume_mounts: Some(
                vec![
                    VolumeMount {
                        name: CREDENTIALS_VOLUME.to_string(),
                        mount_path: CREDENTIALS_DIR.to_string(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: CONTAINERD_VOLUME.to_string(),
                        mount_path: self.containerd_socket.clone(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: WORK_VOLUME.to_string(),
                        mount_path: WORK_DIR.to_string(),
                        ..Default::default()
                    },
                ]
                .into_iter()
                .chain(self.snapshotter_root.as_ref().map(|root| VolumeMount {
                    name: SNAPSHOTTER_VOLUME.to_string(),
                    mount_path: root.clone(),
                    read_only: Some(true),
                    ..Default::default()
                }))
                .chain(self.registry_ca_configmap.as_ref().map(|_| VolumeMount {
                    name: CA_VOLUME.to_string(),
                    mount_path: CA_DIR.to_string(),
                    read_only: Some(true),
                    ..Default::default()
                }))
                .collect(),
            ),
            resources: Some(ResourceRequirements {
                requests: Some(quantities("32Mi", Some("50m"))),
                limits: Some(quantities("256Mi", self.cpu_limit.as_deref())),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                run_as_user: Some(0),
                run_as_group: Some(0),
                // overlay's opaque-directory marks are trusted.* attributes
                capabilities: self.snapshotter_root.as_ref().map(|_| Capabilities {
                    add: Some(vec!["SYS_ADMIN".to_string()]),
                    drop: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The grace period a pod that had `current` gets with a snapshot at
    /// logoff: raised to the configured one, never lowered.
    pub fn logoff_grace_seconds(&self, current: Option<i64>) -> i64 {
        let wanted = i64::try_from(self.logoff_grace_period.as_secs()).unwrap_or(i64::MAX);
        current.unwrap_or(DEFAULT_GRACE_SECONDS).max(wanted)
    }

    /// The graphical container's preStop hook: a request to the sidecar (in
    /// the same pod, so at the pod's address) that ends when the snapshot has.
    pub fn pre_stop(&self) -> LifecycleHandler {
        LifecycleHandler {
            http_get: Some(HTTPGetAction {
                path: Some(LOGOFF_PATH.to_string()),
                port: IntOrString::Int(i32::from(self.port)),
                scheme: Some("HTTP".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The volumes the sidecar mounts.
    pub fn volumes(&self) -> Vec<Volume> {
        vec![
            Volume {
                name: CREDENTIALS_VOLUME.to_string(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(self.registry_secret_name.clone()),
                    items: Some(vec![KeyToPath {
                        key: CREDENTIALS_FILE.to_string(),
                        path: CREDENTIALS_FILE.to_string(),
                        ..Default::default()
                    }]),
                    default_mode: Some(0o400),
                    // a namespace without the secret still starts desktops:
                    // the sidecar's snapshot then ends in `error` with the reason
                    optional: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: CONTAINERD_VOLUME.to_string(),
                host_path: Some(HostPathVolumeSource {
                    path: self.containerd_socket.clone(),
                    type_: Some("Socket".to_string()),
                }),
                ..Default::default()
            },
            Volume {
                name: WORK_VOLUME.to_string(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity(
                        self.max_change_bytes
                            .saturating_mul(WORK_FILES)
                            .saturating_add(WORK_HEADROOM_BYTES)
                            .to_string(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]
        .into_iter()
        .chain(self.snapshotter_root.as_ref().map(|root| Volume {
            name: SNAPSHOTTER_VOLUME.to_string(),
            host_path: Some(HostPathVolumeSource {
                path: root.clone(),
                type_: Some("Directory".to_string()),
            }),
            ..Default::default()
        }))
        .chain(self.registry_ca_configmap.as_ref().map(|name| Volume {
            name: CA_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".to_string(),
                    path: "ca.crt".to_string(),
                    ..Default::default()
                }]),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .collect()
    }
}
