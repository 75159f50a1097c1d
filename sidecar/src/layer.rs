//! Compressing the new layer while it streams, on every core: the Diff service
//! hands out the uncompressed tar, this turns it into gzip (parallel, with gzp;
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

/// Compresses `input` with `codec` on `threads` threads; the output as a stream of chunks.
pub fn compress<S>(
    input: S,
    codec: Codec,
    threads: usize,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = anyhow::Result<Bytes>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let reader = SyncIoBridge::new(StreamReader::new(Box::pin(input.map_err(io::Error::other))));
    let errors = tx.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = run(
            reader,
            ChannelWriter {
                tx,
                buf: BytesMut::with_capacity(CHUNK),
            },
            codec,
            threads.max(1),
        ) {
            let _ = errors.blocking_send(Err(e));
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn run(
    mut reader: impl io::Read,
    writer: ChannelWriter,
    codec: Codec,
    threads: usize,
) -> io::Result<()> {
    match codec {
        Codec::Gzip => {
            use gzp::{deflate::Gzip, par::compress::ParCompressBuilder, ZWriter};
            let mut z = ParCompressBuilder::<Gzip>::new()
                .num_threads(threads)
                .map_err(io::Error::other)?
                .compression_level(gzp::Compression::new(3))
                .from_writer(writer);
            io::copy(&mut reader, &mut z)?;
            let mut w = z.finish().map_err(io::Error::other)?;
            w.flush()
        }
        Codec::Zstd => {
            let mut z = zstd::Encoder::new(writer, 3)?;
            z.multithread(threads as u32)?;
            io::copy(&mut reader, &mut z)?;
            let mut w = z.finish()?;
            w.flush()
        }
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
        let mut s = Box::pin(compress(input, codec, 2));
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
        let results: Vec<_> = compress(input, Codec::Gzip, 2).collect().await;
        assert!(results.iter().any(|r| r
            .as_ref()
            .is_err_and(|e| e.to_string().contains("containerd went away"))));
    }
}
