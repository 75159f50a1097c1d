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
//! change, is decompressed once, as it is staged in a private folder of the
//! work directory (the user's layers one per core); the merge reads the
//! staged tars (its two passes: headers, then the surviving entries' data)
//! while the result is compressed into a spool.

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
use futures::{StreamExt, TryStreamExt};
use std::{
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};
use tokio_util::io::{StreamReader, SyncIoBridge};
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
    let user = base.manifest["layers"]
        .as_array()
        .map(|l| l.iter().skip(first).cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    let mut staging_each = Vec::new();
    for (i, layer) in user.iter().enumerate() {
        let path = staging.path().join(format!("{i}"));
        staging_each.push(stage_user_layer(ctrd, (registry, from), layer, path));
    }
    let staged = futures::stream::iter(staging_each).buffered(compression.threads.max(1));
    let mut layers: Vec<PathBuf> = staged.try_collect().await?;
    let path = staging.path().join("change");
    stage(change.spool.stream(), &path, encoding(change_media_type)?)
        .await
        .context("staging the new change")?;
    layers.push(path);

    let (writer, reader) = spool::create(work_dir, max_bytes)?;
    let count = layers.len();
    let (written, summary) =
        tokio::task::spawn_blocking(move || -> Result<(Written, merge::Summary)> {
            let mut summary = None;
            let written = compress_into(writer, compression, |mut out| {
                let open = |i: usize| open(&layers[i]);
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

/// Stages one user layer at `path` from the node's content store, or else
/// from the registry.
async fn stage_user_layer(
    ctrd: &Ctrd,
    (registry, from): (&Registry, &oci_client::Reference),
    layer: &serde_json::Value,
    path: PathBuf,
) -> Result<PathBuf> {
    let digest = layer["digest"]
        .as_str()
        .context("a user layer without digest")?;
    let encoding = encoding(layer["mediaType"].as_str().unwrap_or_default())?;
    let stream = image::read_stream(ctrd, digest);
    if let Err(e) = stage(stream, &path, encoding).await {
        info!(layer = digest, reason = %format!("{e:#}"), "a user layer is not in the node's content store: reading it from the registry");
        let stream = registry.blob_stream(from, digest).await?;
        stage(stream, &path, encoding).await.with_context(|| {
            format!(
                "user layer {digest}: not in the node's content store ({e:#}), nor readable from {}",
                from.whole()
            )
        })?;
    }
    Ok(path)
}

/// Writes a blob stream into `path`, decompressed (`encoding`): the one
/// time the layer is decompressed.
async fn stage<E: Into<anyhow::Error>>(
    stream: impl futures::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    path: &Path,
    encoding: Encoding,
) -> Result<()> {
    let input = SyncIoBridge::new(StreamReader::new(Box::pin(
        stream.map_err(|e| io::Error::other(e.into())),
    )));
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut input = decoder(BufReader::with_capacity(1 << 20, input), encoding)?;
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        io::copy(&mut input, &mut out).context("reading the layer")?;
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })
    .await
    .context("the staging panicked")?
}

/// A layer read decompressed.
fn decoder<R: io::BufRead + Send + 'static>(
    input: R,
    encoding: Encoding,
) -> io::Result<Box<dyn Read + Send>> {
    Ok(match encoding {
        Encoding::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Encoding::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Encoding::Plain => Box::new(input),
    })
}

/// A staged layer, as the merge reads it.
fn open(path: &Path) -> io::Result<BufReader<std::fs::File>> {
    Ok(BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(path)?,
    ))
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
