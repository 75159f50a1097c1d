//! AdmissionReview v1 bodies as kube-apiserver sends them, and the answers'
//! patches applied the way it applies them.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

/// The realistic desktop pod of tests/fixtures, for `user`, with the graphical image `image`.
pub fn desktop_pod(user: &str, image: &str) -> Value {
    let text = include_str!("../fixtures/desktop-pod.json");
    let mut pod: Value =
        serde_json::from_str(text).expect("tests/fixtures/desktop-pod.json is JSON");
    pod["metadata"]["labels"]["access_userid"] = json!(user);
    let containers = pod["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    for c in containers.iter_mut() {
        if c["name"] == "x-graphical" {
            c["image"] = json!(image);
        }
    }
    pod
}

/// An AdmissionReview v1 for `object`.
pub fn review(object: &Value, operation: &str, dry_run: bool) -> Value {
    let kind = object["kind"].as_str().unwrap_or("Pod");
    let resource = format!("{}s", kind.to_lowercase());
    let uid = format!("{:016x}", rand_u64());
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:abcdesktop:pyos-serviceaccount", "groups": ["system:serviceaccounts"]},
            "object": object,
            "oldObject": if operation == "UPDATE" { object.clone() } else { Value::Null },
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": if operation == "UPDATE" { "UpdateOptions" } else { "CreateOptions" }}
        }
    });
    // kube-apiserver leaves `name` out (omitempty) for a generateName pod
    if object["metadata"]["name"].is_null() {
        if let Some(request) = review["request"].as_object_mut() {
            request.remove("name");
        }
    }
    review
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// The `response` of an AdmissionReview answer.
pub fn response(answer: &Value) -> &Value {
    &answer["response"]
}

/// The warnings of an answer (none when it has none).
pub fn warnings(answer: &Value) -> Vec<String> {
    response(answer)["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(String::from))
        .collect()
}

/// The decoded JSON Patch of an answer, if any.
pub fn patch(answer: &Value) -> Option<json_patch::Patch> {
    let encoded = answer["response"]["patch"].as_str()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("patch is base64");
    Some(serde_json::from_slice(&raw).expect("patch is a JSON Patch"))
}

/// Applies the answer's patch to `object`; returns the patched object as JSON.
pub fn apply(object: &Value, answer: &Value) -> Value {
    let mut doc = object.clone();
    if let Some(p) = patch(answer) {
        json_patch::patch(&mut doc, &p).expect("the patch applies to the object");
    }
    doc
}

/// Applies the answer's patch (base64 JSON Patch in `response.patch`) to `pod`
/// with json-patch, as kube-apiserver does, and parses the result as a Pod.
pub fn apply_patch(pod: &Value, answer: &Value) -> Pod {
    as_pod(&apply(pod, answer))
}

/// The patched object as a typed Pod (what the API server would store).
pub fn as_pod(object: &Value) -> Pod {
    serde_json::from_value(object.clone()).expect("the patched object is a valid Pod")
}

/// The image of container `name`.
pub fn image_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == name)?
        .image
        .clone()
}
