//! A snapshot moved onto another base image: the new base's layers, byte for
//! byte, then the snapshot's user layers, unchanged. Only a config and a
//! manifest are written; every layer is a blob the registry already has (or
//! mounts). Pure code: the documents in, the documents out.
//!
//! The new image takes the new base's config (its environment, entrypoint,
//! and so on: what the operator upgraded to) with the user's layers' diff_ids
//! and history entries after the base's. A file both the user and the new
//! base changed keeps the user's version: the user's layers lie above.

use crate::{
    registry::Document,
    tag::provenance::{self, Provenance},
};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A snapshot as the registry holds it.
pub struct Image<'a> {
    pub manifest: &'a Document,
    pub config: &'a Document,
}

/// What to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebased {
    pub config: Document,
    pub manifest: Document,
    /// The new base's layers, which the snapshot's repository must hold.
    pub base_layers: Vec<String>,
}

/// Who and when the rebased snapshot is.
pub struct Naming<'a> {
    /// The new base as the pod names it.
    pub base_name: &'a str,
    /// The tag the rebased snapshot is written as.
    pub tag: &'a str,
    /// RFC 3339.
    pub created: &'a str,
}

/// Puts `snapshot`'s user layers (from `first_user_layer` on) on `base`.
pub fn onto(
    snapshot: &Image,
    first_user_layer: usize,
    base: &Image,
    naming: &Naming,
) -> Result<Rebased, String> {
    let (s_manifest, s_config) = parse(snapshot, "the snapshot")?;
    let (b_manifest, b_config) = parse(base, "the new base")?;
    let s_layers = array(&s_manifest, "layers", "the snapshot's manifest")?;
    let s_diff_ids = array(&s_config["rootfs"], "diff_ids", "the snapshot's config")?;
    if s_layers.len() != s_diff_ids.len() {
        return Err(format!(
            "the snapshot has {} layers but {} diff_ids",
            s_layers.len(),
            s_diff_ids.len()
        ));
    }
    if first_user_layer > s_layers.len() {
        return Err(format!(
            "the snapshot's user layers start at {first_user_layer}, past its {} layers",
            s_layers.len()
        ));
    }
    let b_layers = array(&b_manifest, "layers", "the new base's manifest")?;
    let b_diff_ids = array(&b_config["rootfs"], "diff_ids", "the new base's config")?;
    if b_layers.len() != b_diff_ids.len() {
        return Err(format!(
            "the new base has {} layers but {} diff_ids",
            b_layers.len(),
            b_diff_ids.len()
        ));
    }
    for (what, a, b) in [
        (
            "architecture",
            &s_config["architecture"],
            &b_config["architecture"],
        ),
        ("os", &s_config["os"], &b_config["os"]),
    ] {
        if a != b {
            return Err(format!("the new base's {what} is {b}, the snapshot's {a}"));
        }
    }

    let mut config = b_config.clone();
    let mut diff_ids = b_diff_ids.clone();
    diff_ids.extend_from_slice(&s_diff_ids[first_user_layer..]);
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    let mut history = b_config["history"].as_array().cloned().unwrap_or_default();
    history.extend(user_history(&s_config, first_user_layer));
    config["history"] = Value::Array(history);
    config["created"] = json!(naming.created);
    let config = Document::new(String::new(), to_vec(&config)?);

    let mut layers = b_layers.clone();
    layers.extend_from_slice(&s_layers[first_user_layer..]);
    let provenance = Provenance {
        base_name: naming.base_name.to_string(),
        base_digest: Some(base.manifest.digest.clone()),
        first_user_layer: b_layers.len(),
    };
    let old: BTreeMap<String, String> =
        serde_json::from_value(s_manifest["annotations"].clone()).unwrap_or_default();
    let user = old.get(provenance::USER).map(String::as_str).unwrap_or("");
    let mut annotations = old.clone();
    annotations.remove(provenance::BASE_DIGEST);
    annotations.extend(provenance.annotations(user, naming.tag, naming.created));
    // the timeline (`snapshotctl list`) says where this point came from
    annotations.insert(
        provenance::TRIGGER.to_string(),
        provenance::Trigger::Rebase.as_str().to_string(),
    );
    let media_type = b_manifest["mediaType"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| base.manifest.media_type.clone());
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": b_manifest["config"]["mediaType"],
            "digest": config.digest,
            "size": config.body.len(),
        },
        "layers": layers,
        "annotations": annotations,
    });
    if media_type.is_empty() {
        if let Some(m) = manifest.as_object_mut() {
            m.remove("mediaType");
        }
    }
    let base_layers = b_layers
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "a layer of the new base has no digest".to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok(Rebased {
        manifest: Document::new(media_type, to_vec(&manifest)?),
        config,
        base_layers,
    })
}

/// The snapshot's history entries of its user layers: those after the entry
/// of its last base layer (entries marked `empty_layer` have no layer).
fn user_history(config: &Value, first_user_layer: usize) -> Vec<Value> {
    let history = config["history"].as_array().cloned().unwrap_or_default();
    let mut layers_seen = 0;
    let mut start = None;
    for (i, entry) in history.iter().enumerate() {
        if layers_seen == first_user_layer {
            start = Some(i);
            break;
        }
        if !entry["empty_layer"].as_bool().unwrap_or(false) {
            layers_seen += 1;
        }
    }
    match start {
        Some(i) => history[i..].to_vec(),
        None if layers_seen == first_user_layer => Vec::new(),
        // a history that does not account for the layers: one entry per user layer
        None => {
            let layers = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
            (first_user_layer..layers)
                .map(|_| {
                    json!({
                        "created_by": provenance::HISTORY_CREATED_BY,
                        "comment": provenance::USER_LAYER_COMMENT,
                    })
                })
                .collect()
        }
    }
}

fn parse(image: &Image, what: &str) -> Result<(Value, Value), String> {
    let manifest: Value = serde_json::from_slice(&image.manifest.body)
        .map_err(|e| format!("{what}'s manifest is not JSON: {e}"))?;
    if manifest.get("manifests").is_some() {
        return Err(format!(
            "{what}'s manifest is an index, not an image manifest"
        ));
    }
    let config: Value = serde_json::from_slice(&image.config.body)
        .map_err(|e| format!("{what}'s config is not JSON: {e}"))?;
    Ok((manifest, config))
}

fn array(value: &Value, key: &str, what: &str) -> Result<Vec<Value>, String> {
    value[key]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("{what} has no {key}"))
}

fn to_vec(value: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("serialising: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

    /// A manifest and its config, as the registry holds them.
    struct Stored {
        manifest: Document,
        config: Document,
    }

    impl Stored {
        fn image(&self) -> Image<'_> {
            pair(&self.manifest, &self.config)
        }
    }

    fn pair<'a>(manifest: &'a Document, config: &'a Document) -> Image<'a> {
        Image { manifest, config }
    }

    fn layer(d: &str) -> Value {
        json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{d}"), "size": 1})
    }

    fn config(value: Value) -> Document {
        Document::new(String::new(), serde_json::to_vec(&value).unwrap())
    }

    fn manifest(body: &[u8]) -> Document {
        Document::new(OCI.into(), body.to_vec())
    }

    fn image(layers: &[&str], history: Value, annotations: Value) -> Stored {
        let config = config(json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": [format!("BASE={}", layers[0])]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:d{l}")).collect::<Vec<_>>()},
            "history": history,
        }));
        let manifest = manifest(
            &serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.body.len()},
                "layers": layers.iter().map(|l| layer(l)).collect::<Vec<_>>(),
                "annotations": annotations,
            }))
            .unwrap(),
        );
        Stored { manifest, config }
    }

    /// An image with no history and no annotations.
    fn plain(layers: &[&str]) -> Stored {
        image(layers, json!([]), json!({}))
    }

    /// One history entry a layer, each `created_by` its layer.
    fn history(created_by: &[&str]) -> Value {
        created_by
            .iter()
            .map(|c| json!({"created_by": c}))
            .collect()
    }

    fn naming() -> Naming<'static> {
        Naming {
            base_name: "r.example/oc.user:4.2",
            tag: "alice-20261128T030000Z",
            created: "2026-11-28T03:00:00Z",
        }
    }

    fn rebase(snapshot: Image, first_user_layer: usize, base: Image) -> Result<Rebased, String> {
        onto(&snapshot, first_user_layer, &base, &naming())
    }

    fn json_of(d: &Document) -> Value {
        serde_json::from_slice(&d.body).unwrap()
    }

    /// `key` of each element of the array `value`.
    fn strings<'a>(value: &'a Value, key: &str) -> Vec<&'a str> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[key].as_str().unwrap())
            .collect()
    }

    #[test]
    fn the_user_layers_move_onto_the_new_base() {
        let s = image(
            &["old1", "old2", "u1", "u2"],
            json!([{"created_by": "old1"}, {"created_by": "env", "empty_layer": true}, {"created_by": "old2"}, {"created_by": "desktop-snapshot"}, {"created_by": "desktop-snapshot"}]),
            json!({provenance::BASE_NAME: "r.example/oc.user:4.1", provenance::FIRST_USER_LAYER: "2", provenance::USER: "alice", provenance::TAG: "alice-1", "other": "kept"}),
        );
        let b = image(&["new1"], history(&["new1"]), json!({}));
        let r = rebase(s.image(), 2, b.image()).unwrap();
        let m = json_of(&r.manifest);
        let c = json_of(&r.config);
        assert_eq!(
            strings(&m["layers"], "digest"),
            ["sha256:new1", "sha256:u1", "sha256:u2"]
        );
        assert_eq!(
            c["rootfs"]["diff_ids"],
            json!(["sha256:dnew1", "sha256:du1", "sha256:du2"])
        );
        assert_eq!(
            c["config"]["Env"],
            json!(["BASE=new1"]),
            "the new base's config"
        );
        assert_eq!(
            strings(&c["history"], "created_by"),
            ["new1", "desktop-snapshot", "desktop-snapshot"]
        );
        assert_eq!(m["config"]["digest"], json!(r.config.digest));
        assert_eq!(m["config"]["size"], json!(r.config.body.len()));
        let a = &m["annotations"];
        assert_eq!(a[provenance::BASE_NAME], "r.example/oc.user:4.2");
        assert_eq!(a[provenance::BASE_DIGEST], json!(b.manifest.digest));
        assert_eq!(a[provenance::FIRST_USER_LAYER], "1");
        assert_eq!(a[provenance::USER], "alice");
        assert_eq!(a[provenance::TAG], "alice-20261128T030000Z");
        assert_eq!(a["other"], "kept");
        assert_eq!(a[provenance::TRIGGER], "rebase", "the timeline's trigger");
        assert_eq!(r.base_layers, ["sha256:new1"]);
        assert_eq!(r.manifest.media_type, OCI);
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        let s = plain(&["old1", "u1"]);
        let b = plain(&["new1"]);
        assert!(rebase(s.image(), 3, b.image())
            .unwrap_err()
            .contains("past its 2 layers"));
        let index = manifest(br#"{"manifests": []}"#);
        let e = rebase(s.image(), 1, pair(&index, &b.config)).unwrap_err();
        assert!(e.contains("index"), "{e}");
        let garbage = manifest(b"<html>");
        assert!(rebase(pair(&garbage, &s.config), 1, b.image())
            .unwrap_err()
            .contains("not JSON"));
        let arm = config(
            json!({"architecture": "arm64", "os": "linux", "rootfs": {"diff_ids": ["sha256:dnew1"]}}),
        );
        let e = rebase(s.image(), 1, pair(&b.manifest, &arm)).unwrap_err();
        assert!(e.contains("architecture"), "{e}");
    }

    #[test]
    fn history_that_does_not_count_the_layers_gets_one_entry_per_user_layer() {
        let s = plain(&["old1", "u1", "u2"]);
        let b = image(&["new1"], history(&["new1"]), json!({}));
        let r = rebase(s.image(), 1, b.image()).unwrap();
        assert_eq!(json_of(&r.config)["history"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn the_same_inputs_give_the_same_documents() {
        let s = plain(&["old1", "u1"]);
        let b = plain(&["new1"]);
        let run = || rebase(s.image(), 1, b.image()).unwrap();
        assert_eq!(run(), run());
    }
}
