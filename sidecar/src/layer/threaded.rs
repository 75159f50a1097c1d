//! A writer on a thread of its own: what is written is gathered into blocks
//! and handed over, so that the thread that writes goes on while the bytes
//! are hashed or written out. A layer laid out after the resume is bound by
//! one thread otherwise (the diff_id's sha256 of every uncompressed byte,
//! then the spool's of every compressed one), while the compressing threads
//! wait for it.
//!
//! Bytes reach the inner writer in the order written; memory stays bounded
//! (a block being filled and [`IN_FLIGHT`] handed over). An error of the
//! inner writer is returned by the next write, or by [`Threaded::finish`].

use std::{
    io::{self, Write},
    sync::mpsc,
    thread::JoinHandle,
};

/// Bytes of a block handed over.
const BLOCK: usize = 1 << 20;
/// Blocks handed over and not yet written.
const IN_FLIGHT: usize = 4;

pub struct Threaded<W: Write + Send + 'static> {
    block: Vec<u8>,
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> Threaded<W> {
    /// `inner` on a thread named `name`.
    pub fn new(name: &str, mut inner: W) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(
            move || -> io::Result<W> {
                for block in rx {
                    inner.write_all(&block)?;
                }
                inner.flush()?;
                Ok(inner)
            },
        )?;
        Ok(Self {
            block: Vec::with_capacity(BLOCK),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands the block over; the inner writer's error if its thread ended.
    fn hand_over(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let sent = self.tx.as_ref().map(|tx| tx.send(block).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // the thread stopped at an error: it is what the caller must see
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("the writer's thread has ended")),
        }
    }

    fn join(&mut self) -> io::Result<W> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| io::Error::other("the writer's thread panicked"))?,
            None => Err(io::Error::other("the writer's thread has ended")),
        }
    }

    /// Every byte written through, flushed; the inner writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.hand_over()?;
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for Threaded<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK {
            self.hand_over()?;
        }
        Ok(n)
    }

    /// Hands the bytes over (they reach the inner writer soon, in order; the
    /// inner writer is flushed by [`Threaded::finish`]).
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

impl<W: Write + Send + 'static> Drop for Threaded<W> {
    fn drop(&mut self) {
        // unfinished (an error on the way): the thread ends with the channel
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn every_byte_arrives_in_order_whatever_the_writes() {
        let data: Vec<u8> = (0..(3 * BLOCK + 12_345))
            .map(|i| (i * 7 + i / 13) as u8)
            .collect();
        for piece in [1, 4096, BLOCK - 1, BLOCK, 2 * BLOCK + 5] {
            let mut w = Threaded::new("test", Vec::new()).unwrap();
            for chunk in data.chunks(piece) {
                w.write_all(chunk).unwrap();
                if piece == 4096 {
                    w.flush().unwrap();
                }
            }
            assert_eq!(w.finish().unwrap(), data, "pieces of {piece}");
        }
        let w = Threaded::new("test", Vec::<u8>::new()).unwrap();
        assert!(w.finish().unwrap().is_empty());
    }

    struct Failing(usize);
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 < buf.len() {
                return Err(io::Error::other("the disk is full"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_inner_writers_error_reaches_the_writer() {
        let mut w = Threaded::new("test", Failing(BLOCK)).unwrap();
        let block = vec![1u8; BLOCK];
        let mut failed = None;
        for _ in 0..(IN_FLIGHT + 4) {
            if let Err(e) = w.write_all(&block) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => w.finish().err().expect("an error at the end at least"),
        };
        assert!(e.to_string().contains("the disk is full"), "{e}");
        // and dropped unfinished, it does not hang
        let mut w = Threaded::new("test", Failing(0)).unwrap();
        let _ = w.write_all(&block);
        drop(w);
    }

    #[test]
    fn a_hash_on_its_thread_is_the_hash() {
        let data = vec![42u8; 5 * BLOCK / 2];
        let mut w = Threaded::new("test", crate::layer::Hashing::new(io::sink())).unwrap();
        w.write_all(&data).unwrap();
        let (digest, _) = w.finish().unwrap().finish();
        assert_eq!(digest, format!("sha256:{:x}", Sha256::digest(&data)));
    }
}
