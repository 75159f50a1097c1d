//! Small OCI building blocks shared by the harness and the tools: digests,
//! tar headers with fixed times (reproducible layers), and image layout
//! archives for `ctr images import`.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Modification time of every entry the harness writes.
pub const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar header owned by root, with the fixed time.
pub fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Gzip of `data`, fast.
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, data)?;
    gz.finish()
}

/// An image written as an OCI image layout archive (for `ctr images import`) by [`Archive::write`].
#[derive(Debug, Default)]
pub struct Archive<'a> {
    /// `io.containerd.image.name` in the index: the name the import gives it.
    pub name: &'a str,
    /// `org.opencontainers.image.ref.name` in the index (the tag), if any.
    pub ref_name: Option<&'a str>,
    /// Uncompressed tars, bottom first; each stored gzip.
    pub layers: &'a [Vec<u8>],
    /// The config's `history`, if any.
    pub history: Option<serde_json::Value>,
}

impl Archive<'_> {
    /// Writes the archive to `out`: `oci-layout`, `index.json` (one manifest,
    /// annotated with the name), then the blobs (layers, config, manifest);
    /// the image is linux/amd64 with `PATH=/bin` and `/bin/sh` as its command.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut blobs = Vec::new();
        let (mut descriptors, mut diff_ids) = (Vec::new(), Vec::new());
        for tar in self.layers {
            diff_ids.push(sha256(tar));
            let gz = gzip(tar)?;
            descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(&gz), "size": gz.len()}));
            blobs.push(gz);
        }
        let mut config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(history) = &self.history {
            config["history"] = history.clone();
        }
        let config = serde_json::to_vec(&config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": descriptors,
        }))?;
        let mut annotations = serde_json::json!({"io.containerd.image.name": self.name});
        if let Some(tag) = self.ref_name {
            annotations["org.opencontainers.image.ref.name"] = tag.into();
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(&manifest), "size": manifest.len(),
                "annotations": annotations}]
        }))?;
        blobs.push(config);
        blobs.push(manifest);
        let mut b = tar::Builder::new(std::fs::File::create(out)?);
        let mut add = |path: String, data: &[u8]| -> Result<()> {
            let mut h = tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, path, data)?;
            Ok(())
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json".into(), &index)?;
        for blob in &blobs {
            add(format!("blobs/sha256/{}", &sha256(blob)[7..]), blob)?;
        }
        b.into_inner()?;
        Ok(())
    }
}
