//! The JSON Patch that carries a [`Resolution`] into the pod. Pure code.
//!
//! Every operation is emitted only when it changes something, so admitting an
//! already-patched pod again yields an empty patch (reinvocation-safe).

use crate::{
    decision::{Resolution, ANNOTATION_STATUS},
    sidecar::SidecarSpec,
};
use json_patch::{
    jsonptr::PointerBuf, AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation,
};
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use serde_json::{json, Value};

/// Builds the patch for `pod`; `container` is the graphical container's index.
pub fn build(
    pod: &Pod,
    container: usize,
    original_image: &str,
    resolution: &Resolution,
    sidecar: &SidecarSpec,
) -> Result<Patch, serde_json::Error> {
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
        let container = to_value(&sidecar.container(target, original_image))?;
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
        config::{Layout, Protocol},
        decision::{self, Found, Plan, Rules},
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
            keep: 10,
            keep_min_age: std::time::Duration::from_secs(7 * 86_400),
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
        }
    }

    /// Runs plan -> resolve -> build -> apply, returning the patched pod.
    fn run(pod: &Pod, found: Found, native: bool) -> (Pod, usize) {
        let Plan::Act(action) = decision::plan(&rules(), &Operation::Create, "Pod", Some(pod))
        else {
            panic!()
        };
        let r = decision::resolve(&action, found);
        let patch = build(
            pod,
            action.container,
            &action.original_image,
            &r,
            &spec(native),
        )
        .unwrap();
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        (serde_json::from_value(doc).unwrap(), patch.0.len())
    }

    fn snap(tag: &str) -> Found {
        Found::Snapshot {
            tag: tag.into(),
            digest: None,
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

    #[test]
    fn no_credential_in_env_or_args() {
        let c = spec(false).container(&decision_target(), "img");
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("password") && c.args.is_none() && c.command.is_none());
    }

    #[test]
    fn the_cpu_limit_is_left_out_unless_configured() {
        let quantity = |spec: &SidecarSpec, which: &str| {
            let c = spec.container(&decision_target(), "img");
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
