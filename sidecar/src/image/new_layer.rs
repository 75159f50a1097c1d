//! The new layer as the stages hand it on: its format ([`Codec`]), what was
//! written into its spool ([`Written`]), the compressed layer the upload
//! reads ([`NewLayer`]), and a layer still being put together after the
//! resume whose spool can already be read ([`Layer::Assembling`]).

use crate::image::spool::SpoolReader;
use anyhow::Context;
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

/// A new layer as a capture hands it on: written, or still being put
/// together after the resume (pre-copy's assembly), its spool readable (and
/// uploadable) as it grows.
pub enum Layer {
    Ready(NewLayer),
    Assembling(Assembling),
}

/// A layer whose spool is still being written.
pub struct Assembling {
    /// The spool, readable while it is written (the writer's end is in `written`).
    pub spool: SpoolReader,
    pub source: &'static str,
    /// Large enough that uploading it while it is written saves time.
    pub large: bool,
    /// What the writing ends with.
    pub written: tokio::task::JoinHandle<anyhow::Result<Written>>,
}

impl Layer {
    /// The layer once its spool is written.
    pub async fn finish(self) -> anyhow::Result<NewLayer> {
        match self {
            Layer::Ready(layer) => Ok(layer),
            Layer::Assembling(a) => {
                let written = a.written.await.context("the layer writer panicked")??;
                Ok(NewLayer::new(written, a.spool, a.source))
            }
        }
    }
}
