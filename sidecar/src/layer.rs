//! Compressing the new layer on every core: the uncompressed tar (from the
//! upper directory or from the Diff service) becomes gzip (parallel, with gzp;
//! the default, what every runtime reads) or zstd (multithreaded). Memory stays
//! bounded: a few chunks in flight, never the whole layer.

use bytes::{Bytes, BytesMut};
use clap::ValueEnum;
use futures::{Stream, TryStreamExt};
use std::io::{self, Write};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

/// Chunk size handed to the uploader.
const CHUNK: usize = 1 << 20;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
}

impl Codec {
    /// The OCI media type of a layer compressed with this codec.
    pub fn media_type(self, docker: bool) -> &'static str {
        match (self, docker) {
            (Codec::Gzip, true) => crate::image::DOCKER_LAYER_GZIP,
            (Codec::Gzip, false) => crate::image::OCI_LAYER_GZIP,
            (Codec::Zstd, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// The snapshot's new layer, compressed, as the upload reads it.
pub struct NewLayer {
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    pub compressed: futures::stream::BoxStream<'static, io::Result<Bytes>>,
    /// Where it came from: `upperdir` or `diff-service`.
    pub source: &'static str,
}

/// How the new layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub codec: Codec,
    /// The codec's level; `None` for this crate's default (gzip 1, zstd 3:
    /// the desktop is paused while its layer is compressed).
    pub level: Option<i32>,
    pub threads: usize,
}

impl Compression {
    fn level(&self) -> i32 {
        match (self.codec, self.level) {
            (Codec::Gzip, Some(l)) => l.clamp(1, 9),
            (Codec::Gzip, None) => 1,
            (Codec::Zstd, Some(l)) => l.clamp(1, 19),
            (Codec::Zstd, None) => 3,
        }
    }

    /// A writer that compresses into `out` on `threads` threads; `finish` flushes it.
    pub fn encoder<W: Write + Send + 'static>(&self, out: W) -> io::Result<Encoder<W>> {
        let threads = self.threads.max(1);
        Ok(match self.codec {
            Codec::Gzip => {
                use gzp::{deflate::Gzip, par::compress::ParCompressBuilder};
                Encoder::Gzip(
                    ParCompressBuilder::<Gzip>::new()
                        .num_threads(threads)
                        .map_err(io::Error::other)?
                        .compression_level(gzp::Compression::new(self.level() as u32))
                        .from_writer(out),
                )
            }
            Codec::Zstd => {
                let mut z = zstd::Encoder::new(out, self.level())?;
                z.multithread(threads as u32)?;
                Encoder::Zstd(z)
            }
        })
    }
}

/// A compressing writer of either codec.
pub enum Encoder<W: Write + Send + 'static> {
    Gzip(gzp::par::compress::ParCompress<'static, gzp::deflate::Gzip, W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write + Send + 'static> Encoder<W> {
    /// Ends the compressed stream; the inner writer back.
    pub fn finish(self) -> io::Result<W> {
        use gzp::ZWriter;
        let mut w = match self {
            Encoder::Gzip(mut z) => z.finish().map_err(io::Error::other)?,
            Encoder::Zstd(z) => z.finish()?,
        };
        w.flush()?;
        Ok(w)
    }
}

impl<W: Write + Send + 'static> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(z) => z.write(data),
            Encoder::Zstd(z) => z.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(z) => z.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

/// Compresses `input`; the output as a stream of chunks.
pub fn compress<S>(
    input: S,
    compression: Compression,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = anyhow::Result<Bytes>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let mut reader =
        SyncIoBridge::new(StreamReader::new(Box::pin(input.map_err(io::Error::other))));
    let errors = tx.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
        };
        let done = compression.encoder(writer).and_then(|mut z| {
            io::copy(&mut reader, &mut z)?;
            z.finish().map(drop)
        });
        if let Err(e) = done {
            let _ = errors.blocking_send(Err(e));
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Hashes what passes through (sha256 of the uncompressed layer: its diff_id).
pub struct Hashing<W> {
    pub inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        use sha2::Digest;
        Self {
            inner,
            hasher: sha2::Sha256::new(),
        }
    }

    /// `sha256:<hex>` of everything written, and the inner writer.
    pub fn finish(self) -> (String, W) {
        use sha2::Digest;
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.inner,
        )
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `Write` that hands full chunks to the async side.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Read;

    async fn roundtrip(codec: Codec, data: Vec<u8>) -> Vec<u8> {
        let input = futures::stream::iter(
            data.chunks(100_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let mut out = Vec::new();
        let mut s = Box::pin(compress(
            input,
            Compression {
                codec,
                level: None,
                threads: 2,
            },
        ));
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        let mut back = Vec::new();
        match codec {
            Codec::Gzip => flate2::read::MultiGzDecoder::new(out.as_slice())
                .read_to_end(&mut back)
                .unwrap(),
            Codec::Zstd => zstd::Decoder::new(out.as_slice())
                .unwrap()
                .read_to_end(&mut back)
                .unwrap(),
        };
        back
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_codecs_round_trip() {
        let data: Vec<u8> = (0..5_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect();
        for codec in [Codec::Gzip, Codec::Zstd] {
            assert_eq!(roundtrip(codec, data.clone()).await, data, "{codec:?}");
            assert!(
                roundtrip(codec, Vec::new()).await.is_empty(),
                "{codec:?} empty"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_input_error_reaches_the_output() {
        let input = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(anyhow::anyhow!("containerd went away")),
        ]);
        let results: Vec<_> = compress(
            input,
            Compression {
                codec: Codec::Gzip,
                level: None,
                threads: 2,
            },
        )
        .collect()
        .await;
        assert!(results.iter().any(|r| r
            .as_ref()
            .is_err_and(|e| e.to_string().contains("containerd went away"))));
    }
}
