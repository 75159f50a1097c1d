//! The new layer as the stages hand it on: its format ([`Codec`]), what was
//! written into its spool ([`Written`]) and the compressed layer the upload
//! reads ([`NewLayer`]).

use crate::image::spool::SpoolReader;
use clap::ValueEnum;
use std::collections::BTreeMap;

/// The new layer's format (`--layer-format`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
    Estargz,
}

impl Codec {
    /// The media type of a layer in this format, in the manifest's family
    /// (eStargz is a gzip layer to everyone but the stargz snapshotter).
    pub fn media_type(self, docker: bool) -> &'static str {
        match (self, docker) {
            (Codec::Gzip | Codec::Estargz, true) => crate::image::DOCKER_LAYER_GZIP,
            (Codec::Gzip | Codec::Estargz, false) => crate::image::OCI_LAYER_GZIP,
            (Codec::Zstd, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What was written into a spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// sha256 of the uncompressed layer (the config's diff_id).
    pub diff_id: String,
    /// sha256 of the change's tar as its source wrote it: the diff_id, but
    /// for eStargz, whose layer adds a landmark and its TOC. Two snapshots of
    /// the same change have the same.
    pub change: String,
    /// sha256 and size of the compressed blob.
    pub digest: String,
    pub size: u64,
    /// The layer descriptor's annotations (eStargz: TOC digest, uncompressed size).
    pub annotations: BTreeMap<String, String>,
}

/// The snapshot's new layer, compressed, as the upload reads it.
pub struct NewLayer {
    pub diff_id: String,
    /// See [`Written::change`].
    pub change: String,
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    pub spool: SpoolReader,
    /// Where it came from: `upperdir` or `diff-service`.
    pub source: &'static str,
}

impl NewLayer {
    pub fn new(written: Written, spool: SpoolReader, source: &'static str) -> Self {
        Self {
            diff_id: written.diff_id,
            change: written.change,
            digest: written.digest,
            size: written.size,
            annotations: written.annotations,
            spool,
            source,
        }
    }
}
