//! Compressing the new layer on every core: the uncompressed tar (from the
//! upper directory or from the Diff service) is hashed (its diff_id) and
//! becomes gzip ([`members`]: parallel members, what every
//! runtime reads),
//! zstd (multithreaded) or eStargz ([`estargz`]: gzip that
//! the stargz snapshotter can mount lazily). Memory stays bounded: a few
//! blocks in flight, never the whole layer.

pub mod estargz;
pub mod members;
pub mod merge;
pub mod pieces;
pub mod tar;
pub mod threaded;

use crate::image::new_layer::Codec;
use std::{
    io::{self, Write},
    path::PathBuf,
};

/// How the new layer is compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    pub codec: Codec,
    /// The codec's level; `None` for this crate's default (gzip 1, zstd 3:
    /// the desktop is paused while its layer is compressed).
    pub level: Option<i32>,
    pub threads: usize,
    /// eStargz: what goes before the prefetch landmark.
    pub prefetch: estargz::Prefetch,
    /// eStargz with prefetch: where the rest waits, and how large it may grow.
    pub spill_dir: PathBuf,
    pub spill_limit: u64,
}

impl Compression {
    /// Plain settings of `codec`: default level, no prefetch.
    pub fn new(codec: Codec, threads: usize) -> Self {
        Self {
            codec,
            level: None,
            threads,
            prefetch: estargz::Prefetch::default(),
            spill_dir: std::env::temp_dir(),
            spill_limit: u64::MAX,
        }
    }

    pub(crate) fn level(&self) -> i32 {
        match (self.codec, self.level) {
            (Codec::Gzip | Codec::Estargz, Some(l)) => l.clamp(1, 9),
            (Codec::Gzip | Codec::Estargz, None) => 1,
            (Codec::Zstd, Some(l)) => l.clamp(1, 19),
            (Codec::Zstd, None) => 3,
        }
    }

    /// A writer that compresses into `out` on `threads` threads; `finish` flushes it.
    pub fn encoder<W: Write + Send + 'static>(&self, out: W) -> io::Result<Encoder<W>> {
        let threads = self.threads.max(1);
        Ok(match self.codec {
            Codec::Gzip => {
                Encoder::Gzip(members::GzipWriter::new(out, self.level() as u32, threads))
            }
            Codec::Zstd => {
                let mut z = zstd::Encoder::new(out, self.level())?;
                z.multithread(threads as u32)?;
                Encoder::Zstd(z)
            }
            Codec::Estargz => {
                Encoder::Estargz(Box::new(estargz::Writer::new(out, self.estargz())?))
            }
        })
    }

    /// The eStargz writer's options.
    pub fn estargz(&self) -> estargz::Options {
        estargz::Options {
            level: self.level() as u32,
            threads: self.threads.max(1),
            chunk_size: estargz::DEFAULT_CHUNK_SIZE,
            prefetch: self.prefetch.clone(),
            spill_dir: self.spill_dir.clone(),
            spill_limit: self.spill_limit,
        }
    }
}

/// A compressing writer of any format.
pub enum Encoder<W: Write + Send + 'static> {
    Gzip(members::GzipWriter<W>),
    Zstd(zstd::Encoder<'static, W>),
    Estargz(Box<estargz::Writer<W>>),
}

impl<W: Write + Send + 'static> Encoder<W> {
    /// Ends the compressed stream; the inner writer back, and for eStargz
    /// what the blob is (its own diff_id, TOC digest, annotations).
    pub fn finish(self) -> io::Result<(W, Option<estargz::Done>)> {
        let (mut w, done) = match self {
            Encoder::Gzip(z) => (z.finish()?, None),
            Encoder::Zstd(z) => (z.finish()?, None),
            Encoder::Estargz(z) => {
                let (w, done) = z.finish()?;
                (w, Some(done))
            }
        };
        w.flush()?;
        Ok((w, done))
    }
}

impl<W: Write + Send + 'static> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(z) => z.write(data),
            Encoder::Zstd(z) => z.write(data),
            Encoder::Estargz(z) => z.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(z) => z.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Estargz(z) => z.flush(),
        }
    }
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

    /// Goes on from `hasher`'s state: what it hashed comes first.
    pub fn resumed(inner: W, hasher: sha2::Sha256) -> Self {
        Self { inner, hasher }
    }

    /// `sha256:<hex>` of everything written, and the inner writer.
    pub fn finish(self) -> (String, W) {
        let (sum, inner) = self.finish_raw();
        (format!("sha256:{}", hex::encode(sum)), inner)
    }

    /// The sha256 of everything written, as bytes, and the inner writer.
    pub fn finish_raw(self) -> ([u8; 32], W) {
        use sha2::Digest;
        (self.hasher.finalize().into(), self.inner)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(codec: Codec, level: Option<i32>, data: &[u8]) -> Vec<u8> {
        let compression = Compression {
            level,
            ..Compression::new(codec, 2)
        };
        let mut z = Hashing::new(compression.encoder(Vec::new()).unwrap());
        for chunk in data.chunks(100_000) {
            z.write_all(chunk).unwrap();
        }
        let (diff_id, z) = z.finish();
        use sha2::Digest;
        assert_eq!(
            diff_id,
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
        );
        let (out, _) = z.finish().unwrap();
        let mut back = Vec::new();
        match codec {
            Codec::Gzip | Codec::Estargz => flate2::read::MultiGzDecoder::new(out.as_slice())
                .read_to_end(&mut back)
                .unwrap(),
            Codec::Zstd => zstd::Decoder::new(out.as_slice())
                .unwrap()
                .read_to_end(&mut back)
                .unwrap(),
        };
        back
    }

    #[test]
    fn both_codecs_round_trip_at_any_level() {
        let data: Vec<u8> = (0..5_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect();
        for codec in [Codec::Gzip, Codec::Zstd] {
            for level in [None, Some(1), Some(9), Some(42)] {
                assert_eq!(roundtrip(codec, level, &data), data, "{codec:?} {level:?}");
            }
            assert!(roundtrip(codec, None, &[]).is_empty(), "{codec:?} empty");
        }
    }
}
