//! The JSON Patch that carries a [`Resolution`] into the pod. Pure code.
//!
//! Every operation is emitted only when it changes something, so admitting an
//! already-patched pod again yields an empty patch (reinvocation-safe).

use crate::{
    decision::{Action, Resolution, ANNOTATION_STATUS},
    sidecar::SidecarSpec,
};
use json_patch::{
    jsonptr::PointerBuf, AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation,
};
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use serde_json::{json, Value};

/// Builds the patch for `pod`, as `action` planned and `resolution` decided.
pub fn build(
    pod: &Pod,
    action: &Action,
    resolution: &Resolution,
    sidecar: &SidecarSpec,
) -> Result<Patch, serde_json::Error> {
    let (container, original_image) = (action.container, action.original_image.as_str());
    let mut ops = Vec::new();
    let spec = pod.spec.as_ref();

    if let Some(image) = resolution.image.as_deref() {
        if image != original_image {
            ops.push(replace(
                &["spec", "containers", &container.to_string(), "image"],
                json!(image),
            ));
        }
        let secrets = spec.and_then(|s| s.image_pull_secrets.as_ref());
        let wanted = json!({ "name": sidecar.registry_secret_name });
        match secrets {
            None => ops.push(add(&["spec", "imagePullSecrets"], json!([wanted]))),
            Some(list) if !list.iter().any(|s| s.name == sidecar.registry_secret_name) => {
                ops.push(add(&["spec", "imagePullSecrets", "-"], wanted))
            }
            Some(_) => {}
        }
    }

    // snapshot at logoff: the grace period, and the graphical container's
    // hook (before any container is removed below, which would shift indices)
    let logoff_grace = (resolution.sidecar.is_some() && resolution.on_logoff).then(|| {
        sidecar.logoff_grace_seconds(spec.and_then(|s| s.termination_grace_period_seconds))
    });
    if let Some(grace) = logoff_grace {
        if spec.and_then(|s| s.termination_grace_period_seconds) != Some(grace) {
            ops.push(add(
                &["spec", "terminationGracePeriodSeconds"],
                json!(grace),
            ));
        }
        let graphical = spec.and_then(|s| s.containers.get(container));
        let lifecycle = graphical.and_then(|c| c.lifecycle.as_ref());
        let index = container.to_string();
        match lifecycle {
            None => ops.push(add(
                &["spec", "containers", &index, "lifecycle"],
                json!({ "preStop": to_value(&sidecar.pre_stop())? }),
            )),
            Some(l) if l.pre_stop.is_none() => ops.push(add(
                &["spec", "containers", &index, "lifecycle", "preStop"],
                to_value(&sidecar.pre_stop())?,
            )),
            // ours already, or the pod's own hook, which stays: with a plain
            // sidecar container, the sidecar's SIGTERM still snapshots
            Some(_) => {}
        }
    }

    if let Some(target) = &resolution.sidecar {
        // A container of that name may be there already: ours (a re-admission:
        // nothing to do), or pyos's own commit sidecar (`enable: True` in
        // od.config, which also gives users the menu entry): ours takes its place.
        let named = spec.and_then(|s| {
            let find = |list: &'static str, cs: &[k8s_openapi::api::core::v1::Container]| {
                cs.iter()
                    .position(|c| c.name == sidecar.name)
                    .map(|i| (list, i, crate::sidecar::is_ours(&cs[i])))
            };
            find("containers", &s.containers).or_else(|| {
                find(
                    "initContainers",
                    s.init_containers.as_deref().unwrap_or(&[]),
                )
            })
        });
        let list = if sidecar.native {
            "initContainers"
        } else {
            "containers"
        };
        let container = to_value(&sidecar.container(
            target,
            &action.user,
            original_image,
            logoff_grace,
            resolution.every,
        ))?;
        match named {
            Some((_, _, true)) => {}
            Some((found_in, index, false)) if found_in == list => {
                ops.push(replace(&["spec", list, &index.to_string()], container));
                ops.extend(missing_volumes(pod, sidecar)?);
            }
            found => {
                if let Some((found_in, index, _)) = found {
                    ops.push(remove(&["spec", found_in, &index.to_string()]));
                }
                match (
                    sidecar.native,
                    spec.and_then(|s| s.init_containers.as_ref()),
                ) {
                    (true, None) => ops.push(add(&["spec", list], json!([container]))),
                    _ => ops.push(add(&["spec", list, "-"], container)),
                }
                ops.extend(missing_volumes(pod, sidecar)?);
            }
        }
    }

    if let Some(status) = resolution.status.as_deref() {
        let annotations = pod.metadata.annotations.as_ref();
        if annotations
            .and_then(|a| a.get(ANNOTATION_STATUS))
            .map(String::as_str)
            != Some(status)
        {
            match annotations {
                None => ops.push(add(
                    &["metadata", "annotations"],
                    json!({ ANNOTATION_STATUS: status }),
                )),
                Some(_) => ops.push(add(
                    &["metadata", "annotations", ANNOTATION_STATUS],
                    json!(status),
                )),
            }
        }
    }
    Ok(Patch(ops))
}

/// Adds the sidecar's volumes the pod does not have yet.
fn missing_volumes(
    pod: &Pod,
    sidecar: &SidecarSpec,
) -> Result<Vec<PatchOperation>, serde_json::Error> {
    let existing = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let missing = sidecar
        .volumes()
        .into_iter()
        .filter(|v| !existing.is_some_and(|e| e.iter().any(|x| x.name == v.name)))
        .map(|v| to_value(&v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match existing {
        None => vec![add(&["spec", "volumes"], Value::Array(missing))],
        Some(_) => missing
            .into_iter()
            .map(|v| add(&["spec", "volumes", "-"], v))
            .collect(),
    })
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn remove(tokens: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: pointer(tokens),
    })
}

fn replace(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(tokens),
        value,
    })
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Protocol,
        decision::{self, Found, Plan, Rules},
        policy::Layout,
    };
    use kube::core::admission::Operation;

    fn spec(native: bool) -> SidecarSpec {
        SidecarSpec {
            name: "t-snapshot".into(),
            image: "snapshot-sidecar:1".into(),
            pull_policy: "IfNotPresent".into(),
            port: 29785,
            native,
            graphical_container: "x-graphical".into(),
            registry_secret_name: "regcred".into(),
            registry_ca_configmap: Some("registry-ca".into()),
            registry_protocol: Protocol::Https,
            containerd_socket: "/run/containerd/containerd.sock".into(),
            containerd_namespace: "k8s.io".into(),
            snapshotter_root: Some(
                "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs".into(),
            ),
            cpu_limit: None,
            max_change_bytes: 8 << 30,
            layer_format: "zstd".to_string(),
            pre_copy: true,
            incremental: true,
            retention: crate::tag::retention::Rules {
                last: 10,
                hourly: 24,
                daily: 7,
                weekly: 4,
                min_age: std::time::Duration::from_secs(3_600),
            },
            logoff_grace_period: std::time::Duration::from_secs(300),
        }
    }

    fn pod(extra_spec: Value, annotations: Option<Value>) -> Pod {
        let mut v = json!({
            "metadata": {"name": "1000-1", "labels": {"type": "x11server", "access_userid": "alice"}},
            "spec": {"containers": [
                {"name": "x-graphical", "image": "abcdesktopio/oc.user:4.1", "env": [{"name": "A", "value": "1"}]},
                {"name": "c-printer", "image": "abcdesktopio/oc.cupsd:4.1"}
            ]}
        });
        if let Some(a) = annotations {
            v["metadata"]["annotations"] = a;
        }
        for (k, val) in extra_spec.as_object().cloned().unwrap_or_default() {
            v["spec"][k] = val;
        }
        serde_json::from_value(v).unwrap()
    }

    fn rules() -> Rules {
        Rules {
            selector: vec![("type".into(), "x11server".into())],
            user_label: "access_userid".into(),
            graphical_container: "x-graphical".into(),
            registry: "reg:5000".into(),
            layout: Layout::Shared,
            on_logoff: false,
            every: None,
        }
    }

    /// Runs plan -> resolve -> build -> apply, returning the patched pod.
    fn run(pod: &Pod, found: Found, native: bool) -> (Pod, usize) {
        run_with(&rules(), pod, found, native)
    }

    fn run_with(rules: &Rules, pod: &Pod, found: Found, native: bool) -> (Pod, usize) {
        let Plan::Act(action) = decision::plan(rules, &Operation::Create, "Pod", Some(pod)) else {
            panic!()
        };
        let r = decision::resolve(&action, found);
        let patch = build(pod, &action, &r, &spec(native)).unwrap();
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        (serde_json::from_value(doc).unwrap(), patch.0.len())
    }

    fn snap(tag: &str) -> Found {
        Found::Snapshot {
            tag: tag.into(),
            digest: None,
            change: None,
        }
    }

    #[test]
    fn restore_patches_image_secret_sidecar_and_status() {
        let (p, _) = run(&pod(json!({}), None), snap("alice-9"), false);
        let s = p.spec.as_ref().unwrap();
        assert_eq!(
            s.containers[0].image.as_deref(),
            Some("reg:5000/abcdesktopio/oc.user:alice-9")
        );
        assert_eq!(
            s.containers[0].env.as_ref().unwrap().len(),
            1,
            "the graphical container is otherwise untouched"
        );
        assert_eq!(s.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        let sc = s
            .containers
            .iter()
            .find(|c| c.name == "t-snapshot")
            .unwrap();
        let env = sc.env.as_ref().unwrap();
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            get("SNAPSHOT_REPOSITORY").as_deref(),
            Some("reg:5000/abcdesktopio/oc.user")
        );
        assert_eq!(get("SNAPSHOT_TAG_PREFIX").as_deref(), Some("alice"));
        assert_eq!(get("SNAPSHOT_USER").as_deref(), Some("alice"));
        assert_eq!(
            s.volumes.as_ref().unwrap().len(),
            5,
            "credentials, socket, work directory, snapshots, registry CA"
        );
        assert_eq!(
            get("SNAPSHOT_REGISTRY_CA").as_deref(),
            Some("/var/run/desktop-snapshot/registry-ca/ca.crt")
        );
        assert_eq!(
            p.metadata.annotations.unwrap()[ANNOTATION_STATUS],
            "restored reg:5000/abcdesktopio/oc.user:alice-9"
        );
    }

    #[test]
    fn existing_lists_are_appended_to_and_secret_added_once() {
        let extra = json!({
            "imagePullSecrets": [{"name": "other"}, {"name": "regcred"}],
            "volumes": [{"name": "home", "emptyDir": {}}],
            "initContainers": [{"name": "i-init", "image": "busybox"}]
        });
        let (p, _) = run(
            &pod(extra, Some(json!({"keep": "me"}))),
            snap("alice-9"),
            true,
        );
        let s = p.spec.as_ref().unwrap();
        assert_eq!(s.image_pull_secrets.as_ref().unwrap().len(), 2);
        assert_eq!(s.volumes.as_ref().unwrap().len(), 6);
        let init = s.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 2);
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            s.containers.len(),
            2,
            "native sidecar is not a plain container"
        );
        assert_eq!(p.metadata.annotations.as_ref().unwrap()["keep"], "me");
    }

    #[test]
    fn no_snapshot_injects_only_the_sidecar() {
        let (p, _) = run(&pod(json!({}), None), Found::Nothing, false);
        let s = p.spec.as_ref().unwrap();
        assert_eq!(
            s.containers[0].image.as_deref(),
            Some("abcdesktopio/oc.user:4.1")
        );
        assert!(s.image_pull_secrets.is_none());
        assert_eq!(s.containers.len(), 3);
    }

    #[test]
    fn readmission_changes_nothing() {
        for native in [false, true] {
            for found in [snap("alice-9"), Found::Nothing] {
                let (once, _) = run(&pod(json!({}), None), found, native);
                let (twice, ops) = run(&once, snap("alice-99"), native);
                assert_eq!(ops, 0, "native={native}");
                assert_eq!(once, twice);
            }
        }
    }

    /// The commit sidecar pyos adds with od.config's `desktop.pod['snapshot']`
    /// `enable: True` (abcdesktop's documented entry; the fixture the
    /// end-to-end test uses too).
    fn pyos_sidecar() -> Value {
        serde_json::from_str(include_str!(
            "../../tests/fixtures/pyos-snapshot-container.json"
        ))
        .unwrap()
    }

    #[test]
    fn pyos_own_sidecar_is_replaced_by_ours_and_readmission_keeps_it() {
        for native in [false, true] {
            let mut v = serde_json::to_value(pod(json!({}), None)).unwrap();
            v["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .push(pyos_sidecar());
            v["spec"]["volumes"] = json!([{"name": "containerd-socket",
                "hostPath": {"path": "/run/containerd/containerd.sock", "type": "Socket"}}]);
            let from_pyos: Pod = serde_json::from_value(v).unwrap();
            let (p, _) = run(&from_pyos, snap("alice-9"), native);
            let s = p.spec.as_ref().unwrap();
            let all: Vec<_> = s
                .containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .filter(|c| c.name == "t-snapshot")
                .collect();
            assert_eq!(all.len(), 1, "one t-snapshot, native={native}");
            let ours = all[0];
            assert_eq!(ours.image.as_deref(), Some("snapshot-sidecar:1"));
            assert_eq!(ours.ports.as_ref().unwrap()[0].container_port, 29785);
            assert!(crate::sidecar::is_ours(ours));
            assert_eq!(
                s.init_containers.iter().flatten().count(),
                usize::from(native),
                "native={native}"
            );
            let text = serde_json::to_string(&p).unwrap();
            assert!(
                !text.contains("hunter2"),
                "pyos's sidecar and its password are gone"
            );
            assert!(
                s.volumes
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|v| v.name == "snapshot-work"),
                "our volumes added"
            );
            let (twice, ops) = run(&p, snap("alice-99"), native);
            assert_eq!(ops, 0, "re-admission keeps ours, native={native}");
            assert_eq!(p, twice);
        }
    }

    fn env_of(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn snapshot_at_logoff_adds_the_hook_and_raises_the_grace_period_once() {
        let on = Rules {
            on_logoff: true,
            ..rules()
        };
        let hook =
            json!({"httpGet": {"path": "/snapshot/logoff", "port": 29785, "scheme": "HTTP"}});
        for native in [false, true] {
            for (extra, grace) in [
                (json!({}), 300),
                (json!({"terminationGracePeriodSeconds": 10}), 300),
                (json!({"terminationGracePeriodSeconds": 900}), 900),
            ] {
                let (p, _) = run_with(&on, &pod(extra.clone(), None), snap("alice-9"), native);
                let s = p.spec.as_ref().unwrap();
                assert_eq!(s.termination_grace_period_seconds, Some(grace), "{extra}");
                let graphical = serde_json::to_value(&s.containers[0]).unwrap();
                assert_eq!(graphical["lifecycle"]["preStop"], hook);
                let sidecar = s
                    .containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .find(|c| c.name == "t-snapshot")
                    .unwrap();
                assert_eq!(
                    env_of(sidecar, "SNAPSHOT_ON_LOGOFF").as_deref(),
                    Some("true")
                );
                assert_eq!(
                    env_of(sidecar, "SNAPSHOT_LOGOFF_GRACE_PERIOD"),
                    Some(format!("{grace}s"))
                );
                let (again, ops) = run_with(&on, &p, snap("alice-99"), native);
                assert_eq!((ops, &again), (0, &p), "re-admission changes nothing");
            }
        }
        // off (the default): none of it
        let (p, _) = run(&pod(json!({}), None), snap("alice-9"), false);
        let s = p.spec.as_ref().unwrap();
        assert!(
            s.termination_grace_period_seconds.is_none() && s.containers[0].lifecycle.is_none()
        );
        let sidecar = s
            .containers
            .iter()
            .find(|c| c.name == "t-snapshot")
            .unwrap();
        assert!(env_of(sidecar, "SNAPSHOT_ON_LOGOFF").is_none());
        // the pod's own preStop hook stays; a postStart one gets ours beside it
        let own = json!({"exec": {"command": ["/bin/true"]}});
        let (p, _) = run_with(
            &on,
            &pod(
                json!({"containers": [{"name": "x-graphical", "image": "abcdesktopio/oc.user:4.1", "lifecycle": {"preStop": own}}]}),
                None,
            ),
            snap("alice-9"),
            false,
        );
        let graphical = serde_json::to_value(&p.spec.as_ref().unwrap().containers[0]).unwrap();
        assert_eq!(graphical["lifecycle"]["preStop"], own);
        let (p, _) = run_with(
            &on,
            &pod(
                json!({"containers": [{"name": "x-graphical", "image": "abcdesktopio/oc.user:4.1", "lifecycle": {"postStart": own}}]}),
                None,
            ),
            snap("alice-9"),
            false,
        );
        let graphical = serde_json::to_value(&p.spec.as_ref().unwrap().containers[0]).unwrap();
        assert_eq!(
            (
                &graphical["lifecycle"]["preStop"],
                &graphical["lifecycle"]["postStart"]
            ),
            (&hook, &own)
        );
    }

    #[test]
    fn the_schedule_reaches_the_sidecar_as_its_env() {
        let hour = std::time::Duration::from_secs(3600);
        // (flag, annotation, SNAPSHOT_EVERY)
        for (flag, annotation, want) in [
            (None, None, None),
            (Some(hour), None, Some("1h")),
            (None, Some("15m"), Some("15m")),
            (Some(hour), Some("90s"), Some("1m 30s")),
            (Some(hour), Some("0"), None),
        ] {
            let r = Rules {
                every: flag,
                ..rules()
            };
            let annotations = annotation.map(|v| json!({ decision::ANNOTATION_EVERY: v }));
            for native in [false, true] {
                let (p, _) = run_with(
                    &r,
                    &pod(json!({}), annotations.clone()),
                    snap("a-1"),
                    native,
                );
                let s = p.spec.as_ref().unwrap();
                let sidecar = s
                    .containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .find(|c| c.name == "t-snapshot")
                    .unwrap();
                assert_eq!(
                    env_of(sidecar, "SNAPSHOT_EVERY").as_deref(),
                    want,
                    "flag {flag:?}, annotation {annotation:?}"
                );
                assert!(
                    s.termination_grace_period_seconds.is_none()
                        && s.containers[0].lifecycle.is_none(),
                    "a schedule alone adds no logoff hook"
                );
                let (again, ops) = run_with(&r, &p, snap("a-2"), native);
                assert_eq!((ops, &again), (0, &p), "re-admission changes nothing");
            }
        }
    }

    #[test]
    fn no_credential_in_env_or_args() {
        let c = spec(false).container(&decision_target(), "alice", "img", Some(300), None);
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("password") && c.args.is_none() && c.command.is_none());
    }

    #[test]
    fn the_cpu_limit_is_left_out_unless_configured() {
        let quantity = |spec: &SidecarSpec, which: &str| {
            let c = spec.container(&decision_target(), "alice", "img", None, None);
            let r = c.resources.unwrap();
            let side = if which == "request" {
                r.requests
            } else {
                r.limits
            };
            side.unwrap().get("cpu").map(|q| q.0.clone())
        };
        let mut s = spec(false);
        for (limit, want) in [(None, None), (Some("2"), Some("2".to_string()))] {
            s.cpu_limit = limit.map(str::to_string);
            assert_eq!(quantity(&s, "limit"), want);
            assert_eq!(quantity(&s, "request").as_deref(), Some("50m"));
        }
    }

    fn decision_target() -> crate::target::Target {
        crate::target::derive(
            "abcdesktopio/oc.user:4.1",
            "reg:5000",
            Layout::Shared,
            "alice",
        )
        .unwrap()
    }
}
