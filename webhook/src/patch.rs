//! The JSON Patch that carries a [`Resolution`] into the pod. Pure code.
//!
//! Every operation is emitted only when it changes something, so admitting an
//! already-patched pod again yields an empty patch (reinvocation-safe).

use crate::{
    decision::{Resolution, ANNOTATION_STATUS},
    sidecar::SidecarSpec,
};
use json_patch::{jsonptr::PointerBuf, AddOperation, Patch, PatchOperation, ReplaceOperation};
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
        let present = spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == sidecar.name)
        });
        if !present {
            let list = if sidecar.native {
                "initContainers"
            } else {
                "containers"
            };
            let container = to_value(&sidecar.container(target, original_image))?;
            match (
                sidecar.native,
                spec.and_then(|s| s.init_containers.as_ref()),
            ) {
                (true, None) => ops.push(add(&["spec", list], json!([container]))),
                _ => ops.push(add(&["spec", list, "-"], container)),
            }
            let existing = spec.and_then(|s| s.volumes.as_ref());
            let mut missing = sidecar
                .volumes()
                .into_iter()
                .filter(|v| !existing.is_some_and(|e| e.iter().any(|x| x.name == v.name)))
                .map(|v| to_value(&v))
                .collect::<Result<Vec<_>, _>>()?;
            if existing.is_none() {
                ops.push(add(&["spec", "volumes"], Value::Array(missing)));
            } else {
                for v in missing.drain(..) {
                    ops.push(add(&["spec", "volumes", "-"], v));
                }
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

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
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
