//! The compressed layer on local disk: written while the desktop is paused (so
//! the pause never waits for the network), with its size and digest, which a
//! single-request upload needs before it starts; read back by the upload (the
//! reader can also follow a writer that is not done). The file has no name (it disappears
//! with its last handle, whatever happens to the process).

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::Stream;
use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::Arc,
};
use tokio::sync::watch;

/// Bytes per read, the size of one upload request.
const PIECE: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Writing(u64),
    Done(u64),
    Failed(String),
}

/// Creates a spool in `dir`: the writer, and the reader that streams it. The
/// writer refuses to hold more than `limit` bytes (the node's disk is shared):
/// the write that would pass it fails with [`TooLarge`], and the file, which
/// has no name, is gone with its last handle.
pub fn create(dir: &Path, limit: u64) -> Result<(SpoolWriter, SpoolReader)> {
    let file = tempfile::tempfile_in(dir)
        .with_context(|| format!("creating the layer's spool file in {}", dir.display()))?;
    let reader = file.try_clone().context("opening the spool file")?;
    let (tx, rx) = watch::channel(State::Writing(0));
    Ok((
        SpoolWriter {
            file,
            hasher: sha2::Sha256::default(),
            written: 0,
            published: 0,
            limit,
            tx,
            finished: false,
        },
        SpoolReader {
            file: Arc::new(reader),
            rx,
        },
    ))
}

pub struct SpoolWriter {
    file: File,
    hasher: sha2::Sha256,
    written: u64,
    published: u64,
    limit: u64,
    tx: watch::Sender<State>,
    finished: bool,
}

/// The change is larger than the sidecar may keep on the node's disk.
#[derive(Debug, thiserror::Error)]
#[error("the change is larger than this sidecar may write to the node's disk ({limit} bytes, --max-change-bytes): nothing was pushed")]
pub struct TooLarge {
    pub limit: u64,
}

impl SpoolWriter {
    /// Everything is written: the reader may finish. The spool's size and digest.
    pub fn finish(mut self) -> (u64, String) {
        use sha2::Digest;
        self.finished = true;
        self.tx.send_replace(State::Done(self.written));
        let digest = std::mem::take(&mut self.hasher).finalize();
        (self.written, format!("sha256:{}", hex::encode(digest)))
    }

    /// The layer cannot be completed; the reader fails with `why`.
    pub fn fail(mut self, why: String) {
        self.finished = true;
        self.tx.send_replace(State::Failed(why));
    }
}

impl Write for SpoolWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        if self.written + data.len() as u64 > self.limit {
            return Err(io::Error::other(TooLarge { limit: self.limit }));
        }
        let n = self.file.write(data)?;
        self.hasher.update(&data[..n]);
        self.written += n as u64;
        if self.written - self.published >= PIECE {
            self.published = self.written;
            self.tx.send_replace(State::Writing(self.written));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.tx
                .send_replace(State::Failed("the layer was abandoned".to_string()));
        }
    }
}

/// Reads the spool; each clone reads it from its start.
#[derive(Clone)]
pub struct SpoolReader {
    file: Arc<File>,
    rx: watch::Receiver<State>,
}

impl SpoolReader {
    /// The spool's bytes in pieces of 4 MiB (the last one shorter), as soon as
    /// they are written; an error if the writer fails or gives up.
    pub fn stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures::stream::unfold(
            (self, 0u64, false),
            |(mut reader, offset, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let state = reader.rx.borrow_and_update().clone();
                    let (available, done) = match state {
                        State::Writing(n) => (n, false),
                        State::Done(n) => (n, true),
                        State::Failed(why) => {
                            return Some((Err(io::Error::other(why)), (reader, offset, true)))
                        }
                    };
                    let ready = available - offset;
                    if ready >= PIECE || (done && ready > 0) {
                        let len = ready.min(PIECE);
                        let file = reader.file.clone();
                        let piece = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; len as usize];
                            file.read_exact_at(&mut buf, offset)
                                .map(|()| Bytes::from(buf))
                        })
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e)));
                        let ended = piece.is_err();
                        return Some((piece, (reader, offset + len, ended)));
                    }
                    if done {
                        return None;
                    }
                    if reader.rx.changed().await.is_err() {
                        return Some((
                            Err(io::Error::other("the layer was abandoned")),
                            (reader, offset, true),
                        ));
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_follows_the_writer_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = create(dir.path(), u64::MAX).unwrap();
        let data: Vec<u8> = (0..(10u32 << 20) + 12345)
            .map(|i| (i % 253) as u8)
            .collect();
        let input = data.clone();
        let writer = tokio::task::spawn_blocking(move || {
            for chunk in input.chunks(300_000) {
                w.write_all(chunk).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            w.finish()
        });
        let pieces: Vec<Bytes> = r.stream().map(|p| p.unwrap()).collect().await;
        let (size, digest) = writer.await.unwrap();
        assert_eq!(size, data.len() as u64);
        use sha2::Digest;
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
        );
        assert!(pieces[..pieces.len() - 1]
            .iter()
            .all(|p| p.len() as u64 == PIECE));
        assert_eq!(pieces.concat(), data);
    }

    #[tokio::test]
    async fn an_empty_spool_is_an_empty_stream_and_failures_reach_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = create(dir.path(), u64::MAX).unwrap();
        w.finish();
        assert!(r.stream().collect::<Vec<_>>().await.is_empty());

        let (mut w, r) = create(dir.path(), u64::MAX).unwrap();
        w.write_all(b"half a layer").unwrap();
        w.fail("containerd went away".to_string());
        let out: Vec<_> = r.stream().collect().await;
        assert_eq!(out.len(), 1);
        assert!(out[0]
            .as_ref()
            .is_err_and(|e| e.to_string().contains("containerd went away")));

        let (w, r) = create(dir.path(), u64::MAX).unwrap();
        drop(w);
        let out: Vec<_> = r.stream().collect().await;
        assert!(
            out[0].is_err(),
            "a dropped writer is an error, not a short layer"
        );

        let (mut w, r) = create(dir.path(), 10).unwrap();
        w.write_all(b"0123456789").unwrap();
        let err = w.write_all(b"x").unwrap_err();
        assert!(err.to_string().contains("--max-change-bytes"), "{err}");
        drop(w);
        let out: Vec<_> = r.stream().collect().await;
        assert!(
            out[0].is_err(),
            "a dropped writer is an error, not a short layer"
        );
    }
}
