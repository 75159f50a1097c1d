//! Gzip members compressed in parallel, in order: the engine under both gzip
//! layer formats. The eStargz writer ([`crate::layer::estargz`]) hands it one member
//! per file or chunk; [`GzipWriter`] cuts a plain gzip layer into members of
//! [`MEMBER`] bytes (a multi-member gzip stream, as pigz and the gzip format
//! allow: every runtime's reader takes it).
//!
//! A member deflate cannot shrink by 1/[`STORE_BELOW`] is written in stored
//! blocks instead (random bytes, media, archives): a few bytes smaller than
//! what the level-1 deflater makes of it, and three times faster to read back
//! at login (see [`Compressor`]).

use sha2::{Digest, Sha256};
use std::{
    collections::VecDeque,
    io::{self, Write},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
};

/// Uncompressed bytes in each member of a plain gzip layer.
pub const MEMBER: usize = 1 << 20;

/// A job's members compressed: one buffer, each member's length and its chunk's digest.
pub(crate) struct Compressed {
    pub bytes: Vec<u8>,
    pub members: Vec<(usize, Option<[u8; 32]>)>,
}

/// A member to compress: its bytes, and the file chunk they start with.
pub(crate) struct Raw {
    pub data: Vec<u8>,
    pub chunk: Option<Chunk>,
    /// Compressed already (a member copied as it is), with its chunk's
    /// digest: passed through.
    pub compressed: Option<Precompressed>,
}

/// A gzip member compressed already (shared with whoever else reads it),
/// and its chunk's digest.
pub(crate) type Precompressed = (Arc<Vec<u8>>, Option<[u8; 32]>);

/// The file chunk a member starts with, whose digest goes to the TOC.
pub(crate) struct Chunk {
    /// Its bytes at the member's start.
    pub len: usize,
}

impl Raw {
    /// A member that starts with no chunk.
    pub fn plain(data: Vec<u8>) -> Self {
        Self {
            data,
            chunk: None,
            compressed: None,
        }
    }

    /// The sha256 of its chunk's bytes.
    fn chunk_digest(&self) -> Option<[u8; 32]> {
        let chunk = self.chunk.as_ref()?;
        Some(Sha256::digest(&self.data[..chunk.len.min(self.data.len())]).into())
    }
}

/// Members to compress and where to answer.
type Job = (Vec<Raw>, mpsc::SyncSender<io::Result<Compressed>>);

/// Compressing threads, each with its own reusable compressor.
pub(crate) struct Pool {
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

impl Pool {
    pub fn new(threads: usize, level: u32) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .filter_map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("gzip-{i}"))
                    .spawn(move || {
                        let mut compressor = Compressor::new(level);
                        loop {
                            let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok((members, reply)) = job else { return };
                            let _ = reply.send(compressor.job(members));
                        }
                    })
                    .ok()
            })
            .collect::<Vec<_>>();
        Self {
            threads: workers.len().max(1),
            jobs: Some(tx),
            workers,
        }
    }

    /// Whether `in_flight` jobs are as many as memory allows (two per thread).
    pub fn is_full(&self, in_flight: usize) -> bool {
        in_flight > self.threads * 2
    }

    /// A submitted job's members, once compressed.
    pub fn answer(reply: &mpsc::Receiver<io::Result<Compressed>>) -> io::Result<Compressed> {
        reply
            .recv()
            .map_err(|_| io::Error::other("a gzip compressor stopped"))?
    }

    pub fn submit(&self, members: Vec<Raw>) -> io::Result<mpsc::Receiver<io::Result<Compressed>>> {
        let (reply, rx) = mpsc::sync_channel(1);
        let sent = match (&self.jobs, self.workers.is_empty()) {
            (Some(jobs), false) => jobs.send((members, reply)).is_ok(),
            _ => false,
        };
        if !sent {
            return Err(io::Error::other("no gzip compressor is running"));
        }
        Ok(rx)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Writes gzip members with one deflate state, reset between members; data
/// that deflate cannot shrink by [`STORE_BELOW`] goes in stored blocks.
///
/// Why: at level 1 the deflate backend codes incompressible data (random
/// bytes, media, archives) with Huffman tables, a few bytes larger than the
/// data and slow to read back (Go's gzip reader, containerd's, inflates it
/// at about 65 MB/s against about 300 MB/s for stored blocks): restore-bench
/// measured the unpack of such a layer as most of a login on overlayfs.
///
/// A member of [`PROBED`] bytes or more is probed first: [`PROBES`] slices of
/// [`PROBE`] bytes (its start, middle and end) deflated alone; when none
/// shrinks by 1/[`STORE_BELOW`], the member is stored without deflating the
/// rest (random data then costs the probes and a copy: the merge past the
/// layer limit recompresses the user's whole data). The stored blocks are
/// written here ([`store_into`]): the backend's own level 0 runs them
/// through its compressor at about 200 MB/s, a fiftieth of a copy.
pub(crate) struct Compressor {
    deflate: flate2::Compress,
    probe: Vec<u8>,
}

/// Members at least this long are probed before they are deflated.
const PROBED: usize = 256 << 10;
/// Bytes of each probe, and how many.
const PROBE: usize = 16 << 10;
const PROBES: usize = 3;

/// A member is stored when deflate saves less than 1/`STORE_BELOW` of its data.
const STORE_BELOW: usize = 32;

impl Compressor {
    pub fn new(level: u32) -> Self {
        Self {
            deflate: flate2::Compress::new(flate2::Compression::new(level), false),
            probe: Vec::with_capacity(PROBE + 1024),
        }
    }

    /// Each member compressed, with the digest of its chunk.
    fn job(&mut self, members: Vec<Raw>) -> io::Result<Compressed> {
        let total: usize = members.iter().map(|m| m.data.len()).sum();
        let mut out = Compressed {
            bytes: Vec::with_capacity(total / 2 + 64 * members.len()),
            members: Vec::with_capacity(members.len()),
        };
        for raw in members {
            if let Some((bytes, digest)) = raw.compressed {
                out.bytes.extend_from_slice(&bytes);
                out.members.push((bytes.len(), digest));
                continue;
            }
            let before = out.bytes.len();
            let digest = raw.chunk_digest();
            self.member(&raw.data, &mut out.bytes)?;
            out.members.push((out.bytes.len() - before, digest));
        }
        Ok(out)
    }

    /// One gzip member of `data`, appended to `out` (header as Go writes it:
    /// no name, time 0, OS unknown).
    pub fn member(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(&GZIP_HEADER);
        let start = out.len();
        if self.incompressible(data)? {
            store_into(data, out);
        } else {
            deflate_into(&mut self.deflate, data, out)?;
            let shrunk = out.len() - start <= data.len() - data.len() / STORE_BELOW;
            if !data.is_empty() && !shrunk {
                out.truncate(start);
                store_into(data, out);
            }
        }
        trailer(data, out);
        Ok(())
    }
}

/// A gzip member's header as Go writes it: no name, time 0, OS unknown.
pub(crate) const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// A gzip member's end: `data`'s CRC-32 and length.
fn trailer(data: &[u8], out: &mut Vec<u8>) {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
}

impl Compressor {
    /// Whether `data` is long enough to probe and no probe of it shrinks.
    fn incompressible(&mut self, data: &[u8]) -> io::Result<bool> {
        if data.len() < PROBED {
            return Ok(false);
        }
        let step = (data.len() - PROBE) / (PROBES - 1);
        for i in 0..PROBES {
            let slice = &data[i * step..i * step + PROBE];
            self.probe.clear();
            deflate_into(&mut self.deflate, slice, &mut self.probe)?;
            if self.probe.len() <= PROBE - PROBE / STORE_BELOW {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// `data` as the raw deflate stream of stored blocks (RFC 1951, 3.2.4: each
/// block a byte of header, its length and the length's complement, then
/// up to 65,535 bytes as they are), appended to `out`.
fn store_into(data: &[u8], out: &mut Vec<u8>) {
    const MOST: usize = u16::MAX as usize;
    out.reserve(data.len() + 5 * (data.len() / MOST + 1));
    let mut blocks = data.chunks(MOST).peekable();
    if blocks.peek().is_none() {
        // an empty stream: one last block of no bytes
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let len = block.len() as u16;
        out.push(u8::from(blocks.peek().is_none()));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// The raw deflate stream of `data` through `deflate` (reset first), appended
/// to `out`. Into room made for it, zeroed: `compress_vec` would zero all of
/// `out`'s spare capacity at each call, which for a small member in a job's
/// buffer of hundreds of KiB cost more than its deflating.
fn deflate_into(deflate: &mut flate2::Compress, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    deflate.reset();
    let mut input = data;
    loop {
        let start = out.len();
        out.resize(start + input.len() / 2 + 4096, 0);
        let (before_in, before_out) = (deflate.total_in(), deflate.total_out());
        let status = deflate.compress(input, &mut out[start..], flate2::FlushCompress::Finish);
        out.truncate(start + (deflate.total_out() - before_out) as usize);
        let status = status.map_err(io::Error::other)?;
        input = &input[(deflate.total_in() - before_in) as usize..];
        if status == flate2::Status::StreamEnd {
            return Ok(());
        }
    }
}

/// A plain gzip layer: the bytes written, as members of [`MEMBER`] bytes
/// compressed on every thread, written to `out` in order; a few members in
/// flight, never the whole layer.
pub struct GzipWriter<W: Write> {
    out: W,
    pool: Pool,
    member: Vec<u8>,
    in_flight: VecDeque<mpsc::Receiver<io::Result<Compressed>>>,
}

impl<W: Write> GzipWriter<W> {
    /// Compresses into `out` at gzip `level` (1-9) on `threads` threads.
    pub fn new(out: W, level: u32, threads: usize) -> Self {
        Self {
            out,
            pool: Pool::new(threads.max(1), level.clamp(1, 9)),
            member: Vec::with_capacity(MEMBER),
            in_flight: VecDeque::new(),
        }
    }

    /// Writes what is left; the output back, flushed. An empty input is one
    /// empty member (a valid gzip stream).
    pub fn finish(mut self) -> io::Result<W> {
        if !self.member.is_empty() || self.in_flight.is_empty() {
            self.dispatch()?;
        }
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Sends the current member to the compressors; waits for the oldest when
    /// too many are in flight.
    fn dispatch(&mut self) -> io::Result<()> {
        let member = std::mem::replace(&mut self.member, Vec::with_capacity(MEMBER));
        self.in_flight
            .push_back(self.pool.submit(vec![Raw::plain(member)])?);
        while self.pool.is_full(self.in_flight.len()) {
            self.drain_one()?;
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        match self.in_flight.pop_front() {
            Some(reply) => self.out.write_all(&Pool::answer(&reply)?.bytes),
            None => Ok(()),
        }
    }
}

impl<W: Write> Write for GzipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MEMBER - self.member.len());
        self.member.extend_from_slice(&buf[..n]);
        if self.member.len() == MEMBER {
            self.dispatch()?;
        }
        Ok(n)
    }

    /// Compressed output waits for whole members: flushes what `out` holds.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;

    /// Deterministic noise (xorshift).
    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// The whole stream, every member, decompressed.
    pub(crate) fn gunzip(blob: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    #[test]
    fn data_deflate_cannot_shrink_is_stored_and_reads_back() {
        // a member's first deflate block type: bits 1-2 of the byte after the 10-byte header
        let block_type = |member: &[u8]| (member[10] >> 1) & 3;
        let noise = noise(1 << 20, 7);
        let text = b"desktop config line\n".repeat(50_000);
        let mut compressor = Compressor::new(1);
        for (data, stored) in [(&noise[..], true), (&text[..], false), (&[][..], false)] {
            let mut member = Vec::new();
            compressor.member(data, &mut member).unwrap();
            assert_eq!(block_type(&member) == 0, stored, "{} bytes", data.len());
            if stored {
                assert!(
                    member.len() < data.len() + data.len() / 1000,
                    "{}",
                    member.len()
                );
            } else {
                assert!(member.len() < data.len() / 10 + 64, "{}", member.len());
            }
            assert_eq!(gunzip(&member), data);
        }
    }

    /// Stored blocks inflate back to their bytes, whatever the length
    /// (none, one block, a full block, several).
    #[test]
    fn stored_blocks_inflate_to_their_bytes() {
        for len in [0, 1, 65_535, 65_536, 200_000] {
            let data = noise(len, len as u64 + 1);
            let mut raw = Vec::new();
            store_into(&data, &mut raw);
            assert_eq!(raw.len(), len + 5 * len.div_ceil(65_535).max(1), "{len}");
            let mut back = Vec::new();
            flate2::read::DeflateDecoder::new(&raw[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "{len}");
        }
    }

    #[test]
    fn a_gzip_layer_is_the_same_members_whatever_the_threads_and_writes() {
        let mut data = b"text of a desktop\n".repeat(200_000);
        data.extend(noise(3 * MEMBER + 12345, 3));
        let blob = |threads: usize, piece: usize| {
            let mut w = GzipWriter::new(Vec::new(), 1, threads);
            for part in data.chunks(piece) {
                w.write_all(part).unwrap();
            }
            w.finish().unwrap()
        };
        let one = blob(1, 1 << 20);
        assert_eq!(gunzip(&one), data);
        assert!(one.len() < data.len() * 3 / 4, "{}", one.len());
        for (threads, piece) in [(2, 4096), (4, 777_777), (3, 1)] {
            if piece == 1 {
                // byte by byte over the first member boundary only
                let mut w = GzipWriter::new(Vec::new(), 1, threads);
                w.write_all(&data[..MEMBER - 3]).unwrap();
                for b in &data[MEMBER - 3..MEMBER + 3] {
                    w.write_all(std::slice::from_ref(b)).unwrap();
                }
                w.write_all(&data[MEMBER + 3..]).unwrap();
                assert_eq!(w.finish().unwrap(), one, "{threads} threads, bytes");
            } else {
                assert_eq!(blob(threads, piece), one, "{threads} threads, {piece}");
            }
        }
        let empty = GzipWriter::new(Vec::new(), 1, 2).finish().unwrap();
        assert!(gunzip(&empty).is_empty() && !empty.is_empty());
    }
}
