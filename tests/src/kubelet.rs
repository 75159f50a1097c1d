//! The kubelet's part for a container of an admitted pod, on this machine:
//! its image, its environment with the downward API resolved, its volumes
//! made from the pod's volume list (secrets and configMaps from the files the
//! test's "cluster" holds, hostPaths checked, emptyDirs made) and the
//! capabilities its securityContext adds. Whatever the webhook injected is
//! run as written, so a mismatch between the webhook and the sidecar's image
//! fails here as it would on a node.

use crate::containerd::RunSpec;
use k8s_openapi::{
    api::core::v1::{Container, KeyToPath, Pod, Volume},
    apimachinery::pkg::util::intstr::IntOrString,
};
use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

/// The objects of the cluster a pod's volumes may name: secret and configMap
/// name -> key -> the file holding its value.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub secrets: BTreeMap<String, BTreeMap<String, PathBuf>>,
    pub config_maps: BTreeMap<String, BTreeMap<String, PathBuf>>,
}

/// What the API server knows of the pod once created.
pub struct Identity<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
}

/// The container `name` of `pod`; panics when the pod has none.
pub fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("the pod has no container {name}"))
}

/// How container `name` of `pod` runs: environment, mounts (volumes made under
/// `scratch`), capabilities; its output goes to `log`.
pub fn run_spec(
    pod: &Pod,
    name: &str,
    identity: &Identity<'_>,
    objects: &Objects,
    scratch: &Path,
    log: PathBuf,
) -> RunSpec {
    try_run_spec(pod, name, identity, objects, scratch, log)
        .unwrap_or_else(|why| panic!("the kubelet does not start {name}: {why}"))
}

/// The same, or why the kubelet would not start the container (it stays in
/// ContainerCreating): a secret or configMap that is not in the namespace and
/// not `optional: true`.
pub fn try_run_spec(
    pod: &Pod,
    name: &str,
    identity: &Identity<'_>,
    objects: &Objects,
    scratch: &Path,
    log: PathBuf,
) -> Result<RunSpec, String> {
    let c = container(pod, name);
    let env = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let path = from
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .unwrap_or_else(|| panic!("env {}: only fieldRef is played here", e.name));
                    match path {
                        "metadata.name" => identity.name.to_string(),
                        "metadata.namespace" => identity.namespace.to_string(),
                        "metadata.uid" => identity.uid.to_string(),
                        other => panic!("env {}: fieldRef {other} is not played here", e.name),
                    }
                }
                (None, None) => String::new(),
            };
            (e.name.clone(), value)
        })
        .collect();
    let volumes: Vec<&Volume> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .collect();
    let mounts = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            assert!(
                m.sub_path.is_none(),
                "{}: subPath is not played here",
                m.name
            );
            let volume = volumes
                .iter()
                .find(|v| v.name == m.name)
                .unwrap_or_else(|| panic!("mount {} names no volume of the pod", m.name));
            let source = make_volume(volume, objects, scratch)?;
            Ok((source, m.mount_path.clone(), m.read_only.unwrap_or(false)))
        })
        .collect::<Result<_, String>>()?;
    let limit = |name: &str| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(name))
            .map(|q| {
                quantity(&q.0).unwrap_or_else(|| panic!("limit {name}: {} is not a quantity", q.0))
            })
    };
    let cap_add = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| caps.add.clone())
        .unwrap_or_default();
    Ok(RunSpec {
        args: c.args.clone().unwrap_or_default(),
        env,
        mounts,
        cap_add,
        memory_limit: limit("memory").map(|bytes| bytes as u64),
        cpus: limit("cpu"),
        log,
    })
}

/// A container's preStop hook, as the kubelet runs an `httpGet` one: a GET
/// of `path` on `port` at the pod's address, waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHook {
    pub path: String,
    pub port: u16,
}

/// What the kubelet does when the pod is deleted, read from its spec (the
/// documented sequence, "Termination of Pods" and "Sidecar containers"):
/// every main container at once: its preStop hook, run and waited for within
/// the grace period (which gets a one-off extension of 2 s when the hook
/// outlives it), then SIGTERM, then SIGKILL when the grace period is spent;
/// native sidecars (init containers with `restartPolicy: Always`) only once
/// every main container has stopped, in the reverse of their order in the
/// spec, SIGTERM then SIGKILL in what is left of the grace period.
#[derive(Debug, Clone, PartialEq)]
pub struct Termination {
    /// `terminationGracePeriodSeconds`, 30 when unset.
    pub grace: Duration,
    /// The main containers, with their preStop hook.
    pub main: Vec<(String, Option<HttpHook>)>,
    /// The native sidecars, in the order they are stopped.
    pub sidecars: Vec<String>,
}

/// The one-off extension the kubelet grants a preStop hook still running
/// when the grace period ends.
pub const HOOK_EXTENSION: Duration = Duration::from_secs(2);

/// The termination of `pod`; panics on a preStop hook not played here (exec).
pub fn termination(pod: &Pod) -> Termination {
    let spec = pod.spec.as_ref().expect("a pod spec");
    let grace =
        Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
    let main = spec
        .containers
        .iter()
        .map(|c| {
            let hook = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .map(|h| {
                    let get = h.http_get.as_ref().unwrap_or_else(|| {
                        panic!("{}: only httpGet preStop hooks are played here", c.name)
                    });
                    let port = match &get.port {
                        IntOrString::Int(p) => u16::try_from(*p).expect("a port"),
                        IntOrString::String(name) => panic!(
                            "{}: the hook names port {name}: only numbers are played here",
                            c.name
                        ),
                    };
                    HttpHook {
                        path: get.path.clone().unwrap_or_else(|| "/".into()),
                        port,
                    }
                });
            (c.name.clone(), hook)
        })
        .collect();
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .rev()
        .map(|c| c.name.clone())
        .collect();
    Termination {
        grace,
        main,
        sidecars,
    }
}

/// A Kubernetes quantity as a number: `256Mi` -> 268435456, `500m` -> 0.5, `2` -> 2.
pub fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 11] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("m", 1e-3),
        ("u", 1e-6),
        ("n", 1e-9),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, f)| text.strip_suffix(suffix).map(|n| (n, *f)))
        .unwrap_or((text, 1.0));
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// The node-side path standing for `volume`; a missing secret or configMap
/// is an empty folder when the volume is optional, else the kubelet refuses.
fn make_volume(volume: &Volume, objects: &Objects, scratch: &Path) -> Result<PathBuf, String> {
    let dir = scratch.join(&volume.name);
    let missing = |kind: &str, name: &str, optional: Option<bool>| {
        if optional == Some(true) {
            std::fs::create_dir_all(&dir).expect("an empty volume");
            Ok(dir.clone())
        } else {
            Err(format!(
                "volume {}: {kind} \"{name}\" not found (MountVolume.SetUp failed)",
                volume.name
            ))
        }
    };
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().unwrap_or_default();
        let Some(data) = objects.secrets.get(name) else {
            return missing("secret", name, secret.optional);
        };
        project(&dir, data, secret.items.as_deref(), secret.default_mode);
        return Ok(dir);
    }
    if let Some(map) = &volume.config_map {
        let name = map.name.as_str();
        let Some(data) = objects.config_maps.get(name) else {
            return missing("configmap", name, map.optional);
        };
        project(&dir, data, map.items.as_deref(), map.default_mode);
        return Ok(dir);
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("volume {}: hostPath {}: {e}", volume.name, host.path));
        match host.type_.as_deref() {
            Some("Socket") => assert!(
                meta.file_type().is_socket(),
                "{} is not a socket",
                host.path
            ),
            Some("Directory") => assert!(meta.is_dir(), "{} is not a directory", host.path),
            _ => {}
        }
        return Ok(path);
    }
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&dir).expect("an emptyDir");
        return Ok(dir);
    }
    panic!("volume {}: this kind is not played here", volume.name)
}

/// Writes the keys of a secret or configMap into `dir`, as the kubelet projects them.
fn project(
    dir: &Path,
    data: &BTreeMap<String, PathBuf>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) {
    std::fs::create_dir_all(dir).expect("a volume folder");
    let wanted: Vec<(String, String, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .map(|i| (i.key.clone(), i.path.clone(), i.mode))
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone(), None)).collect(),
    };
    for (key, path, mode) in wanted {
        let source = data
            .get(&key)
            .unwrap_or_else(|| panic!("the object has no key {key}"));
        let target = dir.join(path);
        std::fs::copy(source, &target)
            .unwrap_or_else(|e| panic!("projecting {}: {e}", source.display()));
        let mode = mode.or(default_mode).unwrap_or(0o644) as u32;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .expect("the file's mode");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_termination_sequence_is_read_from_the_spec() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "spec": {
                "terminationGracePeriodSeconds": 300,
                "containers": [
                    {"name": "x-graphical", "lifecycle": {"preStop": {"httpGet": {"path": "/snapshot/logoff", "port": 29785}}}},
                    {"name": "c-printer"}
                ],
                "initContainers": [
                    {"name": "i-init"},
                    {"name": "a", "restartPolicy": "Always"},
                    {"name": "t-snapshot", "restartPolicy": "Always"}
                ]
            }
        }))
        .unwrap();
        let t = super::termination(&pod);
        assert_eq!(t.grace, std::time::Duration::from_secs(300));
        assert_eq!(
            t.main,
            vec![
                (
                    "x-graphical".to_string(),
                    Some(super::HttpHook {
                        path: "/snapshot/logoff".into(),
                        port: 29785
                    })
                ),
                ("c-printer".to_string(), None)
            ]
        );
        assert_eq!(t.sidecars, vec!["t-snapshot".to_string(), "a".to_string()]);
    }

    #[test]
    fn quantities() {
        for (text, want) in [
            ("256Mi", Some(268435456.0)),
            ("32Mi", Some(33554432.0)),
            ("500m", Some(0.5)),
            ("2", Some(2.0)),
            ("1G", Some(1e9)),
            ("lots", None),
        ] {
            assert_eq!(super::quantity(text), want, "{text}");
        }
    }
}
