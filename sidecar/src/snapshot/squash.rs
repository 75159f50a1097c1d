//! The squash that keeps the base: past the layer limit, the user's layers
//! (everything above the base image's, as the provenance says) and the new
//! change are merged into one layer ([`merge`](crate::layer::merge): OCI semantics,
//! whiteouts of base files kept). The base image's layers stay below it byte
//! for byte, shared with every other desktop; the work grows with the user's
//! data, never with the base.
//!
//! The user's layers come from the node's content store (the node pulled
//! them to run this desktop) or, for one the node lacks (garbage-collected,
//! or a snapshotter that pulls lazily), from the registry; each, and the new
//! change, is staged compressed
//! in a private folder of the work directory, then read twice by the merge
//! (decompressed on the fly) while the result is compressed into a spool.

use crate::{
    capture::commit::compress_into,
    config::Config,
    ctrd::Ctrd,
    image::{
        self,
        new_layer::{NewLayer, Written},
        spool,
    },
    layer::merge,
    registry::push::Registry,
};
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use std::{
    io::{BufReader, Read},
    path::{Path, PathBuf},
};
use tokio::io::AsyncWriteExt;
use tracing::info;

/// How a staged layer is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Gzip,
    Zstd,
    Plain,
}

fn encoding(media_type: &str) -> Result<Encoding> {
    Ok(if media_type.ends_with("gzip") {
        Encoding::Gzip
    } else if media_type.ends_with("zstd") {
        Encoding::Zstd
    } else if media_type.ends_with(".tar") {
        Encoding::Plain
    } else {
        bail!("a user layer of media type {media_type} cannot be merged")
    })
}

/// The user's layers of `base` (from index `first`) and the new `change`
/// (compressed as `config` says) as one layer, compressed the same way.
pub async fn merged(
    ctrd: &Ctrd,
    (registry, from): (&Registry, &oci_client::Reference),
    base: &image::Base,
    first: usize,
    change: NewLayer,
    config: &Config,
) -> Result<NewLayer> {
    let change_media_type = config
        .compression
        .media_type(image::is_docker(&base.manifest));
    let (compression, work_dir, max_bytes) = (
        config.compression(),
        config.work_dir.as_path(),
        config.max_change_bytes,
    );
    let started = std::time::Instant::now();
    let staging = tempfile::Builder::new()
        .prefix("squash-")
        .tempdir_in(work_dir)
        .with_context(|| format!("a staging folder in {}", work_dir.display()))?;
    let mut layers: Vec<(PathBuf, Encoding)> = Vec::new();
    let user = base.manifest["layers"]
        .as_array()
        .map(|l| l.iter().skip(first).cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    for (i, layer) in user.iter().enumerate() {
        let digest = layer["digest"]
            .as_str()
            .context("a user layer without digest")?;
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        let path = staging.path().join(format!("{i}"));
        let stream = image::read_stream(ctrd, digest);
        if let Err(e) = stage(stream, &path).await {
            info!(layer = digest, reason = %format!("{e:#}"), "a user layer is not in the node's content store: reading it from the registry");
            let stream = registry.blob_stream(from, digest).await?;
            stage(stream, &path).await.with_context(|| {
                format!("user layer {digest}: not in the node's content store ({e:#}), nor readable from {}", from.whole())
            })?;
        }
        layers.push((path, encoding(media_type)?));
    }
    let path = staging.path().join("change");
    stage(change.spool.stream(), &path)
        .await
        .context("staging the new change")?;
    layers.push((path, encoding(change_media_type)?));

    let (writer, reader) = spool::create(work_dir, max_bytes)?;
    let count = layers.len();
    let (written, summary) =
        tokio::task::spawn_blocking(move || -> Result<(Written, merge::Summary)> {
            let mut summary = None;
            let written = compress_into(writer, compression, |mut out| {
                let open = |i: usize| open(&layers[i].0, layers[i].1);
                summary =
                    Some(merge::merge(open, count, &mut out).context("merging the user's layers")?);
                Ok(out)
            })?;
            Ok((written, summary.context("the merge did not run")?))
        })
        .await
        .context("the merge panicked")??;
    drop(staging);
    info!(
        user_layers = count - 1,
        entries = summary.entries,
        whiteouts = summary.whiteouts,
        dropped = summary.dropped,
        bytes = written.size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "user layers merged into one above the base"
    );
    Ok(NewLayer::new(written, reader, "merge"))
}

/// Writes a blob stream into `path`.
async fn stage<E: Into<anyhow::Error>>(
    stream: impl futures::Stream<Item = Result<bytes::Bytes, E>>,
    path: &Path,
) -> Result<()> {
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    let mut stream = Box::pin(stream);
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk.map_err(Into::into)?).await?;
    }
    file.flush().await?;
    Ok(())
}

/// A staged layer, decompressed as it is read.
fn open(path: &Path, encoding: Encoding) -> std::io::Result<Box<dyn Read>> {
    let file = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    Ok(match encoding {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Encoding::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
        Encoding::Plain => Box::new(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_read_back() {
        for (media_type, want) in [
            (image::OCI_LAYER_GZIP, Some(Encoding::Gzip)),
            (image::DOCKER_LAYER_GZIP, Some(Encoding::Gzip)),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Encoding::Zstd),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Encoding::Plain),
            ),
            ("application/vnd.oci.image.layer.v1.tar+lz4", None),
        ] {
            assert_eq!(encoding(media_type).ok(), want, "{media_type}");
        }
    }
}
