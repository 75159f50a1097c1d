//! A layer in pieces that can be put together again in another selection:
//! the uncompressed layer tar, cut at entry boundaries into groups of about
//! [`GROUP`] bytes, each group compressed on its own (gzip members, zstd
//! frames; [`Unit::Plain`] keeps the bytes as they are). A gzip stream of
//! several members and a zstd stream of several frames are one stream to every
//! reader, so any run of groups, copied as they are, is a valid part of the
//! final blob, and a group whose entries changed is decompressed, mended and
//! compressed again without touching the others.
//!
//! [`Pieces`] writes such a stream on every core (blocks of [`BLOCK`] bytes
//! in flight, in order) and, when asked, indexes it: each entry's order key
//! and uncompressed range, each group's compressed range and the diff_id
//! hasher's state where it starts. [`plan`] (pure) says which groups of an
//! indexed stream stay and where entries read again go in between;
//! [`assemble`] writes the result.

use super::{members::Compressor, threaded::Threaded, Compression, Hashing};
use crate::image::new_layer::Codec;
use sha2::{Digest, Sha256};
use std::{
    collections::VecDeque,
    fs::File,
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
};

/// Uncompressed bytes of one gzip member or zstd frame.
pub const BLOCK: usize = 1 << 20;
/// A group ends at the first entry boundary past this many uncompressed bytes.
pub const GROUP: u64 = 1 << 20;
/// A tar's end: two zero blocks.
const TAR_END: [u8; 1024] = [0; 1024];

/// How each block is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// gzip members at this level (1-9); incompressible data stored, as
    /// [`members`](crate::layer::members) does.
    Gzip(u32),
    /// zstd frames at this level.
    Zstd(i32),
    /// The bytes themselves.
    Plain,
}

impl Unit {
    /// The pieces of a layer written as `compression` says: its codec's own
    /// units; plain for eStargz, whose chunks, landmark and table of contents
    /// are laid out when the whole layer is known.
    pub fn of(compression: &Compression) -> Self {
        match compression.codec {
            Codec::Gzip => Unit::Gzip(compression.level() as u32),
            Codec::Zstd => Unit::Zstd(compression.level()),
            Codec::Estargz => Unit::Plain,
        }
    }

    /// A reader of the uncompressed bytes of `compressed` (one or more units).
    fn decoder<'a>(self, compressed: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Unit::Gzip(_) => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(
                compressed,
            ))),
            Unit::Zstd(_) => Box::new(zstd::stream::read::Decoder::new(compressed)?),
            Unit::Plain => Box::new(compressed),
        })
    }
}

/// One entry of an indexed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Its order key: entries come in increasing keys (a record's keys,
    /// [`record`](crate::capture::record), are the layer's order).
    pub key: Vec<u8>,
    /// Its uncompressed bytes: where they start in the stream, how many.
    pub start: u64,
    pub len: u64,
    pub group: usize,
}

/// One group of an indexed stream.
#[derive(Debug, Clone)]
pub struct Group {
    /// Its first entry (the group runs to the next group's first).
    pub first: usize,
    pub plain_start: u64,
    pub compressed_start: u64,
    pub compressed_len: u64,
    /// The diff_id hasher after every byte before this group.
    pub hash_before: Sha256,
}

/// What an indexed stream holds.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub entries: Vec<Piece>,
    pub groups: Vec<Group>,
    /// Uncompressed and compressed bytes in all.
    pub plain_len: u64,
    pub compressed_len: u64,
    /// The hasher after every byte.
    pub hash_end: Sha256,
}

impl Index {
    /// The entries of group `g`.
    pub fn group_entries(&self, g: usize) -> std::ops::Range<usize> {
        let end = self
            .groups
            .get(g + 1)
            .map_or(self.entries.len(), |next| next.first);
        self.groups[g].first..end
    }
}

/// Compressing threads, each with its own encoder.
struct Pool {
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

type Job = (Vec<u8>, mpsc::SyncSender<io::Result<Vec<u8>>>);

/// One thread's encoder: a block in, its unit out.
type Encode = Box<dyn FnMut(&[u8]) -> io::Result<Vec<u8>> + Send>;

impl Pool {
    fn new(unit: Unit, threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let mut encode: Encode = match unit {
                Unit::Gzip(level) => {
                    let mut c = Compressor::new(level.clamp(1, 9));
                    Box::new(move |data| {
                        let mut out = Vec::with_capacity(data.len() / 2 + 64);
                        c.member(data, &mut out)?;
                        Ok(out)
                    })
                }
                Unit::Zstd(level) => {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    Box::new(move |data| c.compress(data))
                }
                Unit::Plain => Box::new(|data| Ok(data.to_vec())),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("pieces-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((data, reply)) = job else { return };
                        let _ = reply.send(encode(&data));
                    })?,
            );
        }
        Ok(Self {
            threads: workers.len(),
            jobs: Some(tx),
            workers,
        })
    }

    fn submit(&self, data: Vec<u8>) -> io::Result<mpsc::Receiver<io::Result<Vec<u8>>>> {
        let (reply, rx) = mpsc::sync_channel(1);
        match &self.jobs {
            Some(jobs) if jobs.send((data, reply)).is_ok() => Ok(rx),
            _ => Err(io::Error::other("no compressing thread is running")),
        }
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

enum Queued {
    Job(mpsc::Receiver<io::Result<Vec<u8>>>),
    Ready(Vec<u8>),
    /// Group `g` starts here in the compressed stream.
    Group(usize),
}

/// Writes a stream of pieces into `sink`: what is written, in blocks of
/// [`BLOCK`] bytes encoded in parallel, in order; [`Pieces::begin`] marks an
/// entry (a group boundary when the group is full); [`Pieces::copy`] puts
/// already encoded units in between.
pub struct Pieces<S: Write> {
    sink: S,
    unit: Unit,
    pool: Option<Pool>,
    block: Vec<u8>,
    queue: VecDeque<Queued>,
    index: Index,
    hasher: Option<Sha256>,
    /// After [`Pieces::seal`], writes are dropped (a tar writer's end).
    sealed: bool,
}

impl<S: Write> Pieces<S> {
    /// `hash`: keep the diff_id hasher (and its state at each group).
    pub fn new(sink: S, unit: Unit, threads: usize, hash: bool) -> io::Result<Self> {
        Ok(Self {
            sink,
            unit,
            pool: match unit {
                Unit::Plain => None,
                _ => Some(Pool::new(unit, threads)?),
            },
            block: Vec::new(),
            queue: VecDeque::new(),
            index: Index::default(),
            hasher: hash.then(Sha256::new),
            sealed: false,
        })
    }

    /// An entry with order key `key` starts here.
    pub fn begin(&mut self, key: Vec<u8>) -> io::Result<()> {
        self.end_entry();
        let full = self
            .index
            .groups
            .last()
            .is_none_or(|g| self.index.plain_len - g.plain_start >= GROUP);
        if full {
            self.flush_block()?;
            let g = self.index.groups.len();
            self.queue.push_back(Queued::Group(g));
            self.index.groups.push(Group {
                first: self.index.entries.len(),
                plain_start: self.index.plain_len,
                compressed_start: 0,
                compressed_len: 0,
                hash_before: self.hasher.clone().unwrap_or_default(),
            });
        }
        self.index.entries.push(Piece {
            key,
            start: self.index.plain_len,
            len: 0,
            group: self.index.groups.len() - 1,
        });
        Ok(())
    }

    /// What follows is dropped (the tar's end, which [`assemble`] writes).
    pub fn seal(&mut self) {
        self.end_entry();
        self.sealed = true;
    }

    fn end_entry(&mut self) {
        let at = self.index.plain_len;
        if let Some(last) = self.index.entries.last_mut() {
            if last.len == 0 {
                last.len = at - last.start;
            }
        }
    }

    /// Encoded units (of this stream's [`Unit`]) written as they are, after
    /// everything before; `plain` bytes once decoded.
    pub fn copy(&mut self, encoded: &mut impl Read, plain: u64) -> io::Result<()> {
        self.flush_block()?;
        while !self.queue.is_empty() {
            self.drain_one()?;
        }
        let n = copy_all(encoded, &mut self.sink)?;
        self.index.compressed_len += n;
        self.index.plain_len += plain;
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        match &self.pool {
            Some(pool) => {
                let (job, most) = (pool.submit(block)?, pool.threads * 2 + 1);
                self.queue.push_back(Queued::Job(job));
                while self.queue.len() > most {
                    self.drain_one()?;
                }
            }
            None => {
                self.queue.push_back(Queued::Ready(block));
                while !self.queue.is_empty() {
                    self.drain_one()?;
                }
            }
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        let bytes = match self.queue.pop_front() {
            None => return Ok(()),
            Some(Queued::Group(g)) => {
                self.index.groups[g].compressed_start = self.index.compressed_len;
                return Ok(());
            }
            Some(Queued::Ready(bytes)) => bytes,
            Some(Queued::Job(reply)) => reply
                .recv()
                .map_err(|_| io::Error::other("a compressing thread stopped"))??,
        };
        self.sink.write_all(&bytes)?;
        self.index.compressed_len += bytes.len() as u64;
        Ok(())
    }

    /// Everything written: the sink, flushed, and the index.
    pub fn finish(mut self) -> io::Result<(S, Index)> {
        self.end_entry();
        self.flush_block()?;
        while !self.queue.is_empty() {
            self.drain_one()?;
        }
        self.sink.flush()?;
        let mut index = std::mem::take(&mut self.index);
        let ends: Vec<u64> = index
            .groups
            .iter()
            .skip(1)
            .map(|g| g.compressed_start)
            .chain(std::iter::once(index.compressed_len))
            .collect();
        for (g, end) in index.groups.iter_mut().zip(ends) {
            g.compressed_len = end - g.compressed_start;
        }
        index.hash_end = self.hasher.take().unwrap_or_default();
        drop(self.pool.take());
        let Self { sink, .. } = self;
        Ok((sink, index))
    }

    /// The diff_id hasher, as it stands.
    pub fn hasher(&self) -> Option<&Sha256> {
        self.hasher.as_ref()
    }
}

impl<S: Write> Write for Pieces<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.sealed {
            return Ok(data.len());
        }
        if self.block.capacity() == 0 {
            self.block.reserve_exact(BLOCK);
        }
        let n = data.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&data[..n]);
        if let Some(h) = self.hasher.as_mut() {
            h.update(&data[..n]);
        }
        self.index.plain_len += n as u64;
        if self.block.len() == BLOCK {
            self.flush_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One step of an assembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A whole group of the first stream, as it is.
    Copy(usize),
    /// An entry of the first stream, from its decompressed group.
    Old(usize),
    /// An entry read again (the second stream).
    Again(usize),
}

/// How a first stream (`old`, its entries still `valid` or not) and entries
/// read again (`again`, their keys in increasing order) make one stream in key
/// order: every group whose entries are all valid and between whose first and
/// last no entry read again falls is copied whole.
pub fn plan(old: &Index, valid: &[bool], again: &[&[u8]]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut r = 0;
    for g in 0..old.groups.len() {
        let range = old.group_entries(g);
        if range.is_empty() {
            continue;
        }
        let (first, last) = (
            &old.entries[range.start].key,
            &old.entries[range.end - 1].key,
        );
        while r < again.len() && again[r] < first.as_slice() {
            steps.push(Step::Again(r));
            r += 1;
        }
        let intact =
            range.clone().all(|e| valid[e]) && !(r < again.len() && again[r] <= last.as_slice());
        if intact {
            steps.push(Step::Copy(g));
            continue;
        }
        for e in range {
            let key = old.entries[e].key.as_slice();
            while r < again.len() && (again[r] < key || (again[r] == key && !valid[e])) {
                steps.push(Step::Again(r));
                r += 1;
            }
            if valid[e] {
                steps.push(Step::Old(e));
            }
        }
    }
    steps.extend((r..again.len()).map(Step::Again));
    steps
}

/// A stream's bytes from `file`, from `start`, `len` of them.
struct Section<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl<'a> Section<'a> {
    fn new(file: &'a File, start: u64, len: u64) -> Self {
        Self {
            file,
            at: start,
            end: start + len,
        }
    }
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.at).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a layer piece ended early",
            ));
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// The group of `old` being read for its entries, decoded as far as `at`.
struct Open<'a> {
    group: usize,
    at: u64,
    reader: Box<dyn Read + 'a>,
}

/// An indexed stream written to a file.
#[derive(Clone, Copy)]
pub struct Stream<'a> {
    pub index: &'a Index,
    pub file: &'a File,
    pub unit: Unit,
}

/// Writes into `out` the layer tar of `plan(old, valid, again)` and its end:
/// groups of `old` copied whole, entries from its decompressed groups and
/// from `again` (plain). `out` must encode as `old` does for the copies to
/// fit. With `hash`, the diff_id of the result: the hasher resumes from the
/// state `old` recorded before the first group that is not copied in its
/// place, so an unchanged prefix is never read again.
pub fn assemble<S: Write>(
    old: Stream,
    valid: &[bool],
    again: Stream,
    out: &mut Pieces<S>,
    hash: bool,
) -> io::Result<Option<String>> {
    if out.unit != old.unit || again.unit != Unit::Plain {
        return Err(io::Error::other(
            "the pieces and the output differ in encoding",
        ));
    }
    let (old_file, old_unit, again_file) = (old.file, old.unit, again.file);
    let (old, again) = (old.index, again.index);
    let keys: Vec<&[u8]> = again.entries.iter().map(|p| p.key.as_slice()).collect();
    let steps = plan(old, valid, &keys);
    let prefix = steps
        .iter()
        .enumerate()
        .take_while(|(i, s)| **s == Step::Copy(*i))
        .count();
    // the diff_id's sha256 on a thread of its own: the copies wait for
    // nothing but the reads
    let mut hasher = match hash {
        false => None,
        true => {
            let state = match old.groups.get(prefix) {
                Some(g) => g.hash_before.clone(),
                None => old.hash_end.clone(),
            };
            Some(Threaded::new(
                "diff-id",
                Hashing::resumed(io::sink(), state),
            )?)
        }
    };
    let mut open: Option<Open> = None;
    let mut buf = vec![0u8; 1 << 20];
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Copy(g) => {
                let group = &old.groups[g];
                let plain = old_plain_len(old, g);
                let mut section =
                    Section::new(old_file, group.compressed_start, group.compressed_len);
                let Some(h) = hasher.as_mut().filter(|_| i >= prefix) else {
                    out.copy(&mut section, plain)?;
                    continue;
                };
                let hashed = if old_unit == Unit::Plain {
                    // the bytes copied are the bytes hashed: read once
                    let mut tee = Tee {
                        from: section,
                        to: h,
                        count: 0,
                    };
                    out.copy(&mut tee, plain)?;
                    tee.count
                } else {
                    out.copy(&mut section, plain)?;
                    let mut reader = old_unit.decoder(Section::new(
                        old_file,
                        group.compressed_start,
                        group.compressed_len,
                    ))?;
                    copy_all(&mut reader, h)?
                };
                if hashed != plain {
                    return Err(io::Error::other("a layer piece does not decompress whole"));
                }
            }
            Step::Old(e) => {
                let piece = &old.entries[e];
                let g = piece.group;
                let group = &old.groups[g];
                let reuse = open
                    .as_ref()
                    .is_some_and(|o| o.group == g && o.at <= piece.start);
                if !reuse {
                    open = Some(Open {
                        group: g,
                        at: group.plain_start,
                        reader: old_unit.decoder(Section::new(
                            old_file,
                            group.compressed_start,
                            group.compressed_len,
                        ))?,
                    });
                }
                let o = open.as_mut().expect("opened above");
                let skip = piece.start - o.at;
                io::copy(&mut (&mut o.reader).take(skip), &mut io::sink())?;
                o.at = piece.start;
                pass(&mut o.reader, piece.len, out, hasher.as_mut(), &mut buf)?;
                o.at += piece.len;
            }
            Step::Again(r) => {
                let piece = &again.entries[r];
                let mut reader = Section::new(again_file, piece.start, piece.len);
                pass(&mut reader, piece.len, out, hasher.as_mut(), &mut buf)?;
            }
        }
    }
    out.write_all(&TAR_END)?;
    let Some(hasher) = hasher else {
        return Ok(None);
    };
    let mut hashing = hasher.finish()?;
    hashing.write_all(&TAR_END)?;
    Ok(Some(hashing.finish().0))
}

/// The diff_id's hasher on its thread.
type DiffHash = Threaded<Hashing<io::Sink>>;

/// What is read from `from` is also written to `to`, and counted.
struct Tee<'a, R> {
    from: R,
    to: &'a mut DiffHash,
    count: u64,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        self.to.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Uncompressed bytes of group `g`.
fn old_plain_len(old: &Index, g: usize) -> u64 {
    let end = old
        .groups
        .get(g + 1)
        .map_or(old.plain_len, |next| next.plain_start);
    end - old.groups[g].plain_start
}

/// Exactly `len` bytes from `reader` into `out` (and the hasher).
fn pass<S: Write>(
    reader: &mut dyn Read,
    mut len: u64,
    out: &mut Pieces<S>,
    mut hasher: Option<&mut DiffHash>,
    buf: &mut [u8],
) -> io::Result<()> {
    while len > 0 {
        let want = len.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..want])?;
        out.write_all(&buf[..want])?;
        if let Some(h) = hasher.as_deref_mut() {
            h.write_all(&buf[..want])?;
        }
        len -= want as u64;
    }
    Ok(())
}

/// `io::copy` in blocks of [`BLOCK`] bytes (its own are 8 KiB): the bytes
/// copied.
fn copy_all(from: &mut dyn Read, to: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer's order: names compared one by one (a record's keys).
    fn order_key(path: &[u8]) -> Vec<u8> {
        path.iter()
            .map(|&b| if b == b'/' { 0 } else { b })
            .collect()
    }

    /// An indexed stream of `entries` (key, bytes), groups cut by [`GROUP`].
    fn stream(unit: Unit, entries: &[(&str, Vec<u8>)]) -> (File, Index) {
        let file = tempfile::tempfile().unwrap();
        let mut p = Pieces::new(file.try_clone().unwrap(), unit, 2, true).unwrap();
        for (key, data) in entries {
            p.begin(order_key(key.as_bytes())).unwrap();
            p.write_all(data).unwrap();
        }
        p.seal();
        p.write_all(&TAR_END).unwrap();
        let (_, index) = p.finish().unwrap();
        (file, index)
    }

    fn decode(unit: Unit, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        unit.decoder(bytes).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn bytes(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[test]
    fn groups_end_at_entry_boundaries_and_big_entries_span_blocks() {
        let entries = vec![
            ("a", bytes(1, 700_000)),
            ("b", bytes(2, 700_000)),
            ("c", bytes(3, 3 * BLOCK + 5)),
            ("d", bytes(4, 10)),
        ];
        for unit in [Unit::Gzip(1), Unit::Zstd(3), Unit::Plain] {
            let (file, index) = stream(unit, &entries);
            let firsts: Vec<usize> = index.groups.iter().map(|g| g.first).collect();
            assert_eq!(firsts, [0, 2, 3], "{unit:?}");
            assert_eq!(index.entries[2].len, 3 * BLOCK as u64 + 5);
            let mut all = vec![0u8; index.compressed_len as usize];
            file.read_exact_at(&mut all, 0).unwrap();
            let plain: Vec<u8> = entries.iter().flat_map(|e| e.1.clone()).collect();
            assert_eq!(decode(unit, &all), plain, "{unit:?}: the end is sealed off");
            // each group decodes on its own
            for (g, group) in index.groups.iter().enumerate() {
                let part = &all[group.compressed_start as usize..][..group.compressed_len as usize];
                let range = index.group_entries(g);
                let want: Vec<u8> = entries[range].iter().flat_map(|e| e.1.clone()).collect();
                assert_eq!(decode(unit, part), want, "{unit:?} group {g}");
            }
        }
    }

    #[test]
    fn plans_copy_whole_groups_and_mend_the_others() {
        let entries = vec![
            ("a", vec![1; 600_000]),
            ("a/x", vec![2; 600_000]),
            ("b", vec![3; 600_000]),
            ("c", vec![4; 600_000]),
            ("e", vec![5; 600_000]),
            ("f", vec![6; 600_000]),
        ];
        let (_, index) = stream(Unit::Plain, &entries);
        assert_eq!(index.groups.len(), 3);
        let keys = |ks: &[&str]| {
            ks.iter()
                .map(|k| order_key(k.as_bytes()))
                .collect::<Vec<_>>()
        };
        type Case = (&'static [bool], &'static [&'static str], &'static [Step]);
        use Step::*;
        let cases: [Case; 5] = [
            (&[true; 6], &[], &[Copy(0), Copy(1), Copy(2)]),
            // an entry gone from the middle group
            (
                &[true, true, false, true, true, true],
                &[],
                &[Copy(0), Old(3), Copy(2)],
            ),
            // one read again (changed), one new between groups, one new at the end
            (
                &[true, true, true, false, true, true],
                &["a.b", "c", "g"],
                &[Copy(0), Again(0), Old(2), Again(1), Copy(2), Again(2)],
            ),
            // new inside a group's span: the group is mended
            (
                &[true; 6],
                &["a/w"],
                &[Old(0), Again(0), Old(1), Copy(1), Copy(2)],
            ),
            // before everything
            (&[true; 6], &["0"], &[Again(0), Copy(0), Copy(1), Copy(2)]),
        ];
        for (valid, again, want) in cases {
            let again = keys(again);
            let refs: Vec<&[u8]> = again.iter().map(Vec::as_slice).collect();
            assert_eq!(plan(&index, valid, &refs), want, "{valid:?} {again:?}");
        }
    }

    /// A stream mended from pieces equals the stream written in one go, and
    /// its diff_id is the sha256 of that, for every unit.
    #[test]
    fn an_assembled_stream_is_the_stream_of_the_final_entries() {
        let before = vec![
            ("a", bytes(1, 300_000)),
            ("b", bytes(2, 900_000)),
            ("c", bytes(3, 2 * BLOCK + 77)),
            ("d", bytes(4, 100)),
            ("e", bytes(5, 1_500_000)),
            ("f", bytes(6, 512)),
        ];
        // "b" changed, "d" gone, "c.new" and "z" new
        let valid = [true, false, true, false, true, true];
        let again_entries = vec![
            ("b", bytes(7, 1000)),
            ("c.new", bytes(8, 5000)),
            ("z", bytes(9, 64)),
        ];
        let after: Vec<(&str, Vec<u8>)> = vec![
            before[0].clone(),
            again_entries[0].clone(),
            before[2].clone(),
            again_entries[1].clone(),
            before[4].clone(),
            before[5].clone(),
            again_entries[2].clone(),
        ];
        let mut want: Vec<u8> = after.iter().flat_map(|e| e.1.clone()).collect();
        want.extend_from_slice(&TAR_END);
        for unit in [Unit::Gzip(1), Unit::Zstd(3), Unit::Plain] {
            let (old_file, old) = stream(unit, &before);
            let (again_file, again) = stream(Unit::Plain, &again_entries);
            for (valid, again_index, expect) in [
                (&valid[..], &again, &want),
                (&[true; 6][..], &Index::default(), &{
                    let mut all: Vec<u8> = before.iter().flat_map(|e| e.1.clone()).collect();
                    all.extend_from_slice(&TAR_END);
                    all
                }),
            ] {
                let mut out = Pieces::new(Vec::new(), unit, 2, false).unwrap();
                let diff_id = assemble(
                    Stream {
                        index: &old,
                        file: &old_file,
                        unit,
                    },
                    valid,
                    Stream {
                        index: again_index,
                        file: &again_file,
                        unit: Unit::Plain,
                    },
                    &mut out,
                    true,
                )
                .unwrap();
                let (blob, _) = out.finish().unwrap();
                assert_eq!(&decode(unit, &blob), expect, "{unit:?}");
                assert_eq!(diff_id.unwrap(), sha(expect), "{unit:?}");
                if again_index.entries.is_empty() {
                    // nothing moved: the first pass's bytes and a fresh end
                    let mut first = vec![0u8; old.compressed_len as usize];
                    old_file.read_exact_at(&mut first, 0).unwrap();
                    assert_eq!(&blob[..first.len()], first, "{unit:?}");
                }
            }
        }
    }
}
