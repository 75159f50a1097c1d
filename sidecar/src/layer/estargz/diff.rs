//! The diff_id's sha256 (of the whole decompressed blob) on a thread of its
//! own. It takes the blob's bytes in order: plain ones as the writer has
//! them, and members copied from pre-copy's first pass compressed, which it
//! inflates itself ([`Diff::member`]): the writer that copies them waits for
//! neither the hash nor the inflating.

use crate::layer::members::GZIP_HEADER;
use miniz_oxide::inflate::{
    core::{
        decompress, inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF, DecompressorOxide,
    },
    TINFLStatus,
};
use sha2::{Digest, Sha256};
use std::{
    io,
    sync::{mpsc, Arc},
    thread::JoinHandle,
};

/// Plain bytes gathered before they are handed over.
const BLOCK: usize = 1 << 20;
/// Messages handed over and not yet hashed.
const IN_FLIGHT: usize = 16;

enum Fed {
    Plain(Vec<u8>),
    /// A gzip member this crate wrote (shared with the blob's output), and
    /// how many bytes it holds.
    Member(Arc<Vec<u8>>, usize),
}

pub(super) struct Diff {
    block: Vec<u8>,
    tx: Option<mpsc::SyncSender<Fed>>,
    thread: Option<JoinHandle<io::Result<(Sha256, u64)>>>,
}

impl Diff {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Fed>(IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("estargz-diff-id".into())
            .spawn(move || -> io::Result<(Sha256, u64)> {
                let mut hasher = Sha256::new();
                let mut inflater = Box::<DecompressorOxide>::default();
                let mut count = 0u64;
                for fed in rx {
                    let bytes = match fed {
                        Fed::Plain(bytes) => bytes,
                        Fed::Member(member, len) => inflate_member(&member, len, &mut inflater)?,
                    };
                    hasher.update(&bytes);
                    count += bytes.len() as u64;
                }
                Ok((hasher, count))
            })?;
        Ok(Self {
            block: Vec::with_capacity(BLOCK),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Plain bytes of the blob, next.
    pub fn plain(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.block.len() + bytes.len() > BLOCK {
            self.hand_over()?;
        }
        if bytes.len() >= BLOCK {
            return self.send(Fed::Plain(bytes.to_vec()));
        }
        self.block.extend_from_slice(bytes);
        Ok(())
    }

    /// A gzip member of `len` bytes, next: inflated on the hash's thread.
    pub fn member(&mut self, member: Arc<Vec<u8>>, len: usize) -> io::Result<()> {
        self.hand_over()?;
        self.send(Fed::Member(member, len))
    }

    fn hand_over(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        self.send(Fed::Plain(block))
    }

    fn send(&mut self, fed: Fed) -> io::Result<()> {
        if self.tx.as_ref().is_some_and(|tx| tx.send(fed).is_ok()) {
            return Ok(());
        }
        // the thread stopped at an error: it is what the caller must see
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("the diff_id's thread has ended")),
        }
    }

    fn join(&mut self) -> io::Result<(Sha256, u64)> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| io::Error::other("the diff_id's thread panicked"))?,
            None => Err(io::Error::other("the diff_id's thread has ended")),
        }
    }

    /// The hash of everything given, and how many bytes.
    pub fn finish(mut self) -> io::Result<(Sha256, u64)> {
        self.hand_over()?;
        self.join()
    }
}

impl Drop for Diff {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The `len` bytes of `member`, a gzip member this crate wrote (its fixed
/// header, raw deflate, CRC and length), inflated with `inflater`; an error
/// if it does not hold exactly that many.
pub(super) fn inflate_member(
    member: &[u8],
    len: usize,
    inflater: &mut DecompressorOxide,
) -> io::Result<Vec<u8>> {
    let broken =
        || io::Error::other("a gzip member of the first pass does not inflate to its bytes");
    let deflated = member
        .strip_prefix(&GZIP_HEADER[..])
        .and_then(|rest| rest.get(..rest.len().checked_sub(8)?))
        .ok_or_else(broken)?;
    let mut plain = vec![0u8; len];
    inflater.init();
    let (status, read, written) = decompress(
        inflater,
        deflated,
        &mut plain,
        0,
        TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if status != TINFLStatus::Done || read != deflated.len() || written != len {
        return Err(broken());
    }
    Ok(plain)
}
