//! The new layer as eStargz: a gzip tar every runtime pulls as usual, whose
//! regular files' data (in chunks of at most 4 MiB) each start a gzip member
//! of their own, followed by a table of contents (`stargz.index.json`, a tar
//! entry in its own member) and a 51-byte footer pointing at it, so that the
//! stargz snapshotter can mount the layer before it is downloaded and fetch
//! each file by range (the format of
//! `github.com/containerd/stargz-snapshotter/estargz`).
//!
//! [`Writer`] takes the uncompressed layer tar the other writers take (from
//! the upper directory, the Diff service or the merge) and passes every
//! entry's bytes through unchanged (the reference's lossless mode): names,
//! whiteouts, hard links, PAX records (extended attributes) stay exactly the
//! gzip writer's. It adds the prefetch landmark, the TOC entry and the tar's
//! end. The gzip members are compressed on every core, in batches, in order;
//! a few batches are in flight, never the whole layer.
//!
//! Prefetch: entries under [`Prefetch`]'s paths (the files a desktop reads at
//! start) go first, then `.prefetch.landmark`, which tells the snapshotter how
//! much of the blob to fetch before the container starts. Since they come in
//! name order mixed with the rest, the rest waits, compressed, in an unnamed
//! spill file and is appended at the end (its uncompressed bytes, which the
//! diff_id needs after the landmark's, are hashed by decompressing the spill
//! while it is copied). Without prefetch paths, `.no.prefetch.landmark` comes
//! first and everything streams straight through. A tar that can be read
//! twice (pre-copy's, put together after the resume) needs no spill:
//! [`Writer::twice`] takes the entries before the landmark from a first
//! reading and the rest from a second.
//!
//! The layer's diff_id is the sha256 of the whole decompressed blob (entries,
//! landmark, TOC entry, tar end), as the reference computes it.

mod diff;
mod splice;

pub use splice::{Recorded, Spliced};

use super::members::{Chunk, Compressed, Compressor, Pool, Precompressed, Raw};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    fs::File,
    io::{self, BufWriter, Read, Seek, Write},
    ops::Range,
    path::PathBuf,
    sync::mpsc,
};
use tar::{EntryType, Header};

/// The TOC's tar entry name.
pub const TOC_NAME: &str = "stargz.index.json";
/// Ends the part of the blob the snapshotter fetches before the container starts.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Tells the snapshotter not to prefetch.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The layer descriptor's annotation: sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The layer descriptor's annotation: size of the decompressed blob.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// The footer's size: an empty gzip member whose Extra field says where the TOC is.
pub const FOOTER_SIZE: usize = 51;
/// The reference's chunk size: a file's data starts a new gzip member every 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Largest file put before the landmark: a configuration file is small, a
/// larger file (a database, a cache) would delay the start for everyone.
pub const PREFETCH_FILE_MAX: u64 = 1 << 20;
/// The landmark's one byte, as the reference writes it.
const LANDMARK_CONTENTS: u8 = 0xf;
/// Uncompressed bytes a compression job gathers (many small members together).
const BATCH: usize = 1 << 20;

/// How the layer is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// gzip level, 1-9.
    pub level: u32,
    /// Compressing threads.
    pub threads: usize,
    pub chunk_size: u64,
    pub prefetch: Prefetch,
    /// Where entries past the landmark wait while the prefetched ones are
    /// written (an unnamed file; only with prefetch paths).
    pub spill_dir: PathBuf,
    /// Most bytes the spill may hold (the node's disk is shared).
    pub spill_limit: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            level: 1,
            threads: 2,
            chunk_size: DEFAULT_CHUNK_SIZE,
            prefetch: Prefetch::default(),
            spill_dir: std::env::temp_dir(),
            spill_limit: u64::MAX,
        }
    }
}

/// What goes before the landmark: entries whose path (relative to `/`) is one
/// of `paths` or lies below one (`*` matches within one name: `home/*/.config`),
/// the directories leading to them, files of at most [`PREFETCH_FILE_MAX`]
/// bytes up to `max_bytes` in all (in name order), hard links whose target
/// went first. No paths: no prefetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefetch {
    pub paths: Vec<String>,
    pub max_bytes: u64,
}

impl Prefetch {
    /// The default paths: what a desktop session reads when it starts.
    pub const DEFAULT_PATHS: &'static str = "etc,home/*/.config,home/*/.local/share/applications,home/*/.bashrc,home/*/.profile,home/*/.Xresources,home/*/.gtkrc-2.0,root/.config,root/.bashrc,root/.profile";

    /// Whether `path` (clean: no leading `./` or `/`, no trailing `/`) is at or
    /// below one of the paths, or (a directory) on the way to one.
    pub fn matches(&self, path: &[u8], dir: bool) -> bool {
        let names: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        self.paths.iter().any(|pattern| {
            let pattern: Vec<&[u8]> = pattern
                .trim_matches('/')
                .as_bytes()
                .split(|&b| b == b'/')
                .filter(|p| !p.is_empty())
                .collect();
            if pattern.is_empty() {
                return false;
            }
            let common = names.len().min(pattern.len());
            let prefix = names[..common]
                .iter()
                .zip(&pattern[..common])
                .all(|(name, glob)| glob_match(glob, name));
            prefix && (names.len() >= pattern.len() || dir)
        })
    }
}

/// `*` matches any run of bytes within one name; everything else itself.
fn glob_match(glob: &[u8], name: &[u8]) -> bool {
    match glob.iter().position(|&b| b == b'*') {
        None => glob == name,
        Some(star) => {
            let (head, tail) = (&glob[..star], &glob[star + 1..]);
            name.starts_with(head)
                && (head.len()..=name.len()).any(|i| glob_match(tail, &name[i..]))
        }
    }
}

/// What the blob is, once written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// sha256 of the decompressed blob (the image config's diff_id).
    pub diff_id: String,
    /// sha256 of the TOC JSON.
    pub toc_digest: String,
    /// Bytes of the decompressed blob.
    pub uncompressed_size: u64,
    /// Where the TOC's gzip member starts (the footer says it too).
    pub toc_offset: u64,
    /// Entries before the landmark, their files' bytes, and the landmark's
    /// offset in the blob (the bytes the snapshotter prefetches).
    pub prefetched_entries: u64,
    pub prefetched_bytes: u64,
    pub landmark_offset: u64,
}

impl Done {
    /// The layer descriptor's annotations the snapshotter reads.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TOC_DIGEST_ANNOTATION.to_string(), self.toc_digest.clone()),
            (
                UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                self.uncompressed_size.to_string(),
            ),
        ])
    }
}

/// One entry of the TOC, as the reference's `TOCEntry` serialises it.
#[derive(Debug, Clone, Default, Serialize)]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(
        rename = "modtime",
        skip_serializing_if = "is_zero_i",
        serialize_with = "rfc3339"
    )]
    mtime: i64,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(rename = "userName", skip_serializing_if = "String::is_empty")]
    uname: String,
    #[serde(rename = "groupName", skip_serializing_if = "String::is_empty")]
    gname: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    dev_minor: u64,
    /// Values base64, as Go's `[]byte`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "digest")]
    digest: Option<[u8; 32]>,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(
        rename = "chunkDigest",
        skip_serializing_if = "Option::is_none",
        serialize_with = "digest"
    )]
    chunk_digest: Option<[u8; 32]>,
}

impl TocEntry {
    /// Whether the entry carries data at an offset of the blob.
    fn has_data(&self) -> bool {
        (self.kind == "reg" && self.size > 0) || self.kind == "chunk"
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
fn is_zero_i(n: &i64) -> bool {
    *n <= 0
}
fn rfc3339<S: serde::Serializer>(t: &i64, s: S) -> Result<S::Ok, S::Error> {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs((*t).max(0) as u64);
    s.collect_str(&humantime::format_rfc3339_seconds(at))
}
fn digest<S: serde::Serializer>(d: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&format_args!("sha256:{}", hex::encode(d))),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
struct Toc<'a> {
    version: u32,
    entries: &'a [TocEntry],
}

/// The front of the blob (the output) or the part after the landmark (the spill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Front = 0,
    Rest = 1,
}

/// A gzip member being filled.
struct Member {
    buf: Vec<u8>,
    /// Its first bytes are a chunk of a file: how many, and the chunk's TOC entry.
    chunk: Option<(usize, usize)>,
    /// The chunk is the whole file: its digest is the file's too.
    whole_file: bool,
    /// The member so far is exactly these bytes of the first pass's stream
    /// of its part, not read yet (`buf` is empty then, [`Writer::splice`]).
    from: Option<Range<u64>>,
    /// Already compressed: the first pass's member, and its chunk's digest.
    compressed: Option<Precompressed>,
}

impl Member {
    fn new(capacity: usize, chunk: Option<(usize, usize)>, whole_file: bool) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            chunk,
            whole_file,
            from: None,
            compressed: None,
        }
    }
}

/// Members of one part waiting to be compressed together.
#[derive(Default)]
struct Batch {
    members: Vec<Member>,
    bytes: usize,
}

/// The state of one part: its TOC entries, its open member, its pending
/// batch, its compressed and uncompressed sizes so far.
#[derive(Default)]
struct PartState {
    toc: Vec<TocEntry>,
    open: Option<Member>,
    batch: Batch,
    written: u64,
    uncompressed: u64,
}

/// Where the input tar stands.
enum Input {
    /// Reading a header block.
    Header,
    /// Reading an extension's data (PAX records, GNU long name or link) and padding.
    Extension {
        kind: EntryType,
        size: u64,
        data: Vec<u8>,
    },
    /// Passing an entry's data into `part` (chunked if it is a file's).
    Data {
        part: Part,
        left: u64,
        padding: u64,
        file: Option<FileData>,
    },
    /// An entry left out (an input TOC or landmark): its data is skipped.
    Skip(u64),
    /// After the tar's end: what follows is ignored.
    End,
}

/// A regular file's data being cut into chunks.
struct FileData {
    /// Its TOC entry, in its part.
    entry: usize,
    name: String,
    size: u64,
    done: u64,
    /// The current chunk's remaining bytes.
    chunk_left: u64,
    /// It is cut into several chunks.
    several: bool,
    /// The whole file's sha256, for files of several chunks.
    hasher: Option<Sha256>,
}

/// A chunk of a file's data about to start.
struct ChunkStart {
    /// The file's TOC entry, in its part.
    file_entry: usize,
    /// Where the chunk starts in the file.
    offset: u64,
    file_size: u64,
    name: String,
    /// The file is one chunk.
    whole_file: bool,
    len: u64,
}

impl ChunkStart {
    /// The chunk `file` starts now (its `chunk_left` set to the chunk's length).
    fn of(file: &FileData) -> Self {
        Self {
            file_entry: file.entry,
            offset: file.done,
            file_size: file.size,
            name: file.name.clone(),
            whole_file: !file.several,
            len: file.chunk_left,
        }
    }
}

/// Extensions read for the next entry.
#[derive(Default)]
struct Pending {
    raw: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Vec<(String, Vec<u8>)>,
}

/// Writes an eStargz blob into `out` from the uncompressed layer tar written into it.
pub struct Writer<W: Write> {
    out: W,
    spill: Option<Spill>,
    options: Options,
    pool: Pool,
    parts: [PartState; 2],
    /// Compression jobs in flight, oldest first.
    in_flight: VecDeque<InFlight>,
    /// sha256 of the decompressed blob, on a thread of its own while the
    /// entries stream (none in a recording).
    diff: Option<diff::Diff>,
    input: Input,
    block: Vec<u8>,
    pending: Pending,
    /// Regular files put before the landmark (hard links may follow them).
    front_files: HashSet<Vec<u8>>,
    prefetched_bytes: u64,
    /// Whether entries are put before a landmark (prefetch paths given).
    prefetching: bool,
    order: Order,
    /// Once the part before the landmark is ended: its entries, and the
    /// landmark's place in its TOC.
    landmark: Option<(u64, usize)>,
    /// Where each entry's members are (pre-copy's first pass, [`Recorded`]).
    recording: Option<splice::Recording>,
    /// The first pass whose members [`Writer::splice`] copies.
    splicing: Option<std::sync::Arc<Recorded>>,
    spliced: Spliced,
    /// Bytes of the tar given, and where the header block being read ends.
    given: u64,
    block_end: u64,
}

/// How the entries after the landmark reach the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The tar is given once: the rest waits, compressed, in the spill.
    Spilled,
    /// The tar is given twice ([`Writer::twice`]): the first time only the
    /// entries before the landmark are written...
    TwiceFront,
    /// ...the second time only the rest, straight after the landmark.
    TwiceRest,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, options: Options) -> io::Result<Self> {
        Self::build(out, options, false)
    }

    /// A writer given the layer tar twice, [`Writer::second_pass`] in
    /// between: the entries before the landmark are taken from the first,
    /// the rest from the second, written straight into `out`. The same blob
    /// as [`Writer::new`], without the spill to write, read back and
    /// inflate for the diff_id; for a tar that can be read twice.
    pub fn twice(out: W, options: Options) -> io::Result<Self> {
        let mut writer = Self::build(out, options, false)?;
        writer.spill = None;
        writer.order = Order::TwiceFront;
        Ok(writer)
    }

    /// Ends the first reading of the tar ([`Writer::twice`]): what comes
    /// before the landmark is written, with the landmark; the tar is read
    /// again from its start.
    pub fn second_pass(&mut self) -> io::Result<()> {
        if self.order != Order::TwiceFront {
            return Err(io::Error::other(
                "a second pass of an eStargz writer given the tar once",
            ));
        }
        self.tar_ended()?;
        self.end_front()?;
        self.close_member(Part::Front)?;
        self.dispatch(Part::Front)?;
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        // the same decisions again, from the start
        self.input = Input::Header;
        self.block.clear();
        self.pending = Pending::default();
        self.front_files.clear();
        self.prefetched_bytes = 0;
        self.order = Order::TwiceRest;
        Ok(())
    }

    /// Whether [`Writer::second_pass`] wants the tar again: without prefetch
    /// paths every entry was taken from the first reading.
    pub fn reads_again(&self) -> bool {
        self.prefetching
    }

    /// Whether the tar read so far ended where an entry may start.
    fn tar_ended(&self) -> io::Result<()> {
        match self.input {
            Input::Header if self.block.is_empty() && self.pending.raw.is_empty() => Ok(()),
            Input::End => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer tar ended inside an entry",
            )),
        }
    }

    /// With prefetch: the landmark after the entries before it (once).
    fn end_front(&mut self) -> io::Result<()> {
        if !self.prefetching || self.landmark.is_some() {
            return Ok(());
        }
        let toc = &self.parts[Part::Front as usize].toc;
        let entries = toc.iter().filter(|e| e.kind != "chunk").count() as u64;
        self.landmark = Some((entries, toc.len()));
        self.landmark(if entries > 0 {
            PREFETCH_LANDMARK
        } else {
            NO_PREFETCH_LANDMARK
        })
    }

    /// A writer into `out`; `recording`: pre-copy's first pass, which notes
    /// every member from the first ([`Writer::recording`]) and makes no
    /// diff_id.
    fn build(out: W, mut options: Options, recording: bool) -> io::Result<Self> {
        options.chunk_size = options.chunk_size.max(1);
        options.level = options.level.clamp(1, 9);
        options
            .prefetch
            .paths
            .retain(|p| !p.trim_matches('/').is_empty());
        let spill = if options.prefetch.paths.is_empty() {
            None
        } else {
            let file = tempfile::tempfile_in(&options.spill_dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "creating the eStargz spill file in {}: {e}",
                        options.spill_dir.display()
                    ),
                )
            })?;
            Some(Spill {
                file: BufWriter::with_capacity(1 << 20, file),
                written: 0,
                limit: options.spill_limit,
            })
        };
        let mut writer = Self {
            out,
            spill,
            pool: Pool::new(options.threads.max(1), options.level),
            options,
            parts: Default::default(),
            in_flight: VecDeque::new(),
            diff: match recording {
                true => None,
                false => Some(diff::Diff::new()?),
            },
            input: Input::Header,
            block: Vec::with_capacity(512),
            pending: Pending::default(),
            front_files: HashSet::new(),
            prefetched_bytes: 0,
            prefetching: false,
            order: Order::Spilled,
            landmark: None,
            recording: recording.then(splice::Recording::default),
            splicing: None,
            spliced: Spliced::default(),
            given: 0,
            block_end: 0,
        };
        writer.prefetching = writer.spill.is_some();
        if !writer.prefetching {
            writer.landmark(NO_PREFETCH_LANDMARK)?;
        }
        Ok(writer)
    }

    /// Ends the blob: landmark, the spilled rest, TOC, footer. The output
    /// back, flushed, and what was written.
    pub fn finish(mut self) -> io::Result<(W, Done)> {
        self.tar_ended()?;
        if self.order == Order::TwiceFront && self.prefetching {
            return Err(io::Error::other(
                "an eStargz writer given the tar twice ended after the first",
            ));
        }
        self.end_front()?;
        let (prefetched_entries, landmark_index) = self.landmark.unwrap_or((0, 0));
        for part in [Part::Front, Part::Rest] {
            self.close_member(part)?;
            self.dispatch(part)?;
        }
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        let landmark_offset = self.parts[0]
            .toc
            .get(landmark_index)
            .map_or(0, |e| e.offset);
        let front = self.parts[Part::Front as usize].written;
        let mut uncompressed = self.parts[0].uncompressed;
        let mut diff = match self.diff.take() {
            Some(diff) => diff.finish()?.0,
            None => return Err(io::Error::other("a recording eStargz writer makes no blob")),
        };
        if let Some(spill) = self.spill.take() {
            let rest = append_spill(spill, &mut self.out, &mut diff)?;
            if rest != self.parts[Part::Rest as usize].uncompressed {
                return Err(io::Error::other(
                    "the spilled part of the eStargz layer does not read back whole",
                ));
            }
        }
        if self.prefetching {
            uncompressed += self.parts[Part::Rest as usize].uncompressed;
            for entry in &mut self.parts[Part::Rest as usize].toc {
                if entry.has_data() {
                    entry.offset += front;
                }
            }
        }
        let toc_offset = front + self.parts[Part::Rest as usize].written;
        let [front_state, rest_state] = std::mem::take(&mut self.parts);
        let mut entries = front_state.toc;
        entries.extend(rest_state.toc);
        drop_repeated_names(&mut entries);
        let mut json = Vec::new();
        let mut serializer = serde_json::Serializer::with_formatter(
            &mut json,
            serde_json::ser::PrettyFormatter::with_indent(b"\t"),
        );
        Toc {
            version: 1,
            entries: &entries,
        }
        .serialize(&mut serializer)
        .map_err(io::Error::other)?;
        drop(entries);
        let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
        let mut tail = entry_bytes(TOC_NAME, &json)?;
        tail.extend_from_slice(&[0u8; 1024]);
        diff.update(&tail);
        uncompressed += tail.len() as u64;
        let mut compressor = Compressor::new(self.options.level);
        let mut member = Vec::new();
        compressor.member(&tail, &mut member)?;
        self.out.write_all(&member)?;
        self.out.write_all(&footer(toc_offset))?;
        self.out.flush()?;
        let done = Done {
            diff_id: format!("sha256:{}", hex::encode(diff.finalize())),
            toc_digest,
            uncompressed_size: uncompressed,
            toc_offset,
            prefetched_entries,
            prefetched_bytes: self.prefetched_bytes,
            landmark_offset,
        };
        Ok((self.out, done))
    }

    /// Appends bytes to `part`'s open member (a new one if none is open).
    fn append(&mut self, part: Part, bytes: &[u8]) -> io::Result<()> {
        self.materialize(part)?;
        let state = &mut self.parts[part as usize];
        state.uncompressed += bytes.len() as u64;
        state
            .open
            .get_or_insert_with(|| Member::new(16 << 10, None, false))
            .buf
            .extend_from_slice(bytes);
        Ok(())
    }

    /// Ends `part`'s open member (hashed for the diff_id, the rest as it
    /// comes after the front); a full batch goes to the compressors.
    fn close_member(&mut self, part: Part) -> io::Result<()> {
        let Some(mut member) = self.parts[part as usize].open.take() else {
            return Ok(());
        };
        let hashed = part == Part::Front || self.order == Order::TwiceRest;
        if let Some(range) = member.from.take() {
            self.close_spliced(part, &mut member, range, hashed)?;
        } else if hashed {
            if let Some(diff) = self.diff.as_mut() {
                diff.plain(&member.buf)?;
            }
        }
        if let Some(recording) = self.recording.as_mut() {
            recording.member_closed(part, &member);
        }
        let state = &mut self.parts[part as usize];
        state.batch.bytes += match &member.compressed {
            Some((bytes, _)) => bytes.len(),
            None => member.buf.len(),
        };
        state.batch.members.push(member);
        if state.batch.bytes >= BATCH {
            self.dispatch(part)?;
        }
        Ok(())
    }

    /// Opens a member whose first `len` bytes are a chunk with TOC entry
    /// `entry` (at `at` in its file, if it is a file's).
    fn start_chunk(
        &mut self,
        part: Part,
        entry: usize,
        len: u64,
        whole_file: bool,
    ) -> io::Result<()> {
        self.close_member(part)?;
        let capacity = (len as usize).saturating_add(1024).min(BATCH * 8);
        self.parts[part as usize].open = Some(Member::new(
            capacity,
            Some((len as usize, entry)),
            whole_file,
        ));
        Ok(())
    }

    /// Sends `part`'s batch to the compressors; waits for the oldest job when
    /// too many are in flight (memory stays bounded).
    fn dispatch(&mut self, part: Part) -> io::Result<()> {
        let batch = std::mem::take(&mut self.parts[part as usize].batch);
        if batch.members.is_empty() {
            return Ok(());
        }
        let chunks: Vec<_> = batch
            .members
            .iter()
            .map(|m| (m.chunk, m.whole_file))
            .collect();
        let inputs = batch
            .members
            .into_iter()
            .map(|m| Raw {
                data: m.buf,
                chunk: m.chunk.map(|(len, _)| Chunk { len }),
                compressed: m.compressed,
            })
            .collect();
        let reply = self.pool.submit(inputs)?;
        self.in_flight.push_back(InFlight {
            part,
            chunks,
            reply,
        });
        while self.pool.is_full(self.in_flight.len()) {
            self.drain_one()?;
        }
        Ok(())
    }

    /// Writes the oldest job's members to their part, and their offsets and
    /// digests to the TOC.
    fn drain_one(&mut self) -> io::Result<()> {
        let Some(job) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let done = Pool::answer(&job.reply)?;
        self.sink(job.part)?.write_all(&done.bytes)?;
        let state = &mut self.parts[job.part as usize];
        let mut offset = state.written;
        if let Some(recording) = self.recording.as_mut() {
            recording.members_written(job.part, offset, &done.members);
        }
        for ((len, chunk_digest), (chunk, whole_file)) in done.members.iter().zip(&job.chunks) {
            if let (Some((_, entry)), Some(d)) = (chunk, chunk_digest) {
                let entry = &mut state.toc[*entry];
                entry.offset = offset;
                entry.chunk_digest = Some(*d);
                if *whole_file {
                    entry.digest = Some(*d);
                }
            }
            offset += *len as u64;
        }
        state.written = offset;
        Ok(())
    }

    /// Where `part`'s members go: the front into the output, the rest into
    /// the spill (or the output, in a second reading).
    fn sink(&mut self, part: Part) -> io::Result<&mut dyn Write> {
        Ok(match part {
            Part::Front => &mut self.out,
            Part::Rest if self.order == Order::TwiceRest => &mut self.out,
            Part::Rest => match self.spill.as_mut() {
                Some(spill) => spill,
                None => return Err(io::Error::other("no spill for the eStargz rest")),
            },
        })
    }

    /// A landmark entry (one byte, its own member) in the front.
    fn landmark(&mut self, name: &str) -> io::Result<()> {
        let header = header_bytes(name, 1)?;
        self.append(Part::Front, &header)?;
        let entry = self.push_entry(
            Part::Front,
            TocEntry {
                name: name.to_string(),
                kind: "reg",
                size: 1,
                mode: 0o644,
                ..Default::default()
            },
        );
        self.start_chunk(Part::Front, entry, 1, true)?;
        self.append(Part::Front, &[LANDMARK_CONTENTS])?;
        self.append(Part::Front, &[0u8; 511])?;
        Ok(())
    }

    fn push_entry(&mut self, part: Part, entry: TocEntry) -> usize {
        let toc = &mut self.parts[part as usize].toc;
        toc.push(entry);
        toc.len() - 1
    }

    /// A header block is complete.
    fn header(&mut self, block: &[u8]) -> io::Result<()> {
        if block.iter().all(|&b| b == 0) {
            if !self.pending.raw.is_empty() {
                return Err(invalid("the layer tar ends after an extension header"));
            }
            self.input = Input::End;
            return Ok(());
        }
        let header = Header::from_byte_slice(block);
        let kind = header.entry_type();
        let size = match self.pending.pax_value("size") {
            Some(s) => parse_number(s, "size")?,
            None => header.entry_size()?,
        };
        if matches!(
            kind,
            EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            if size > 64 << 20 {
                return Err(invalid("an extension header of more than 64 MiB"));
            }
            self.pending.raw.extend_from_slice(block);
            self.input = Input::Extension {
                kind,
                size,
                data: Vec::with_capacity(size as usize),
            };
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        // where the entry starts in the tar given, its extensions included
        let start = self.block_end - 512 - pending.raw.len() as u64;
        let name_bytes = pending
            .long_name
            .clone()
            .or_else(|| pending.pax_value("path").map(<[u8]>::to_vec))
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let name_bytes = trim_nul(name_bytes);
        let link_bytes = pending
            .long_link
            .clone()
            .or_else(|| pending.pax_value("linkpath").map(<[u8]>::to_vec))
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
            .map(trim_nul)
            .unwrap_or_default();
        let clean = clean_name(&name_bytes);
        let padding = (512 - size % 512) % 512;
        if matches!(
            clean.as_slice(),
            b"stargz.index.json" | b".prefetch.landmark" | b".no.prefetch.landmark"
        ) {
            // an earlier eStargz layer's own entries (a merge, a whole tree): the
            // reference drops them too, this layer has its own
            self.record_entry(start, None);
            self.input = Input::Skip(size + padding);
            return Ok(());
        }
        let type_name = match kind {
            EntryType::Regular => "reg",
            EntryType::Link => "hardlink",
            EntryType::Symlink => "symlink",
            EntryType::Directory => "dir",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Fifo => "fifo",
            other => {
                return Err(invalid(&format!(
                    "{:?}: an entry of type {:?} cannot go into an eStargz layer",
                    String::from_utf8_lossy(&name_bytes),
                    other.as_byte() as char
                )))
            }
        };
        let part = self.route(kind, &clean, &link_bytes, size);
        let taken = match self.order {
            Order::Spilled => true,
            Order::TwiceFront => part == Part::Front,
            Order::TwiceRest => part == Part::Rest,
        };
        if !taken {
            // written in the other reading of the tar
            self.input = Input::Skip(size + padding);
            return Ok(());
        }
        if self.recording.is_some() {
            let routed = splice::Routed {
                kind,
                clean: clean.clone(),
                link: link_bytes.clone(),
                size,
            };
            self.record_entry(start, Some((part, routed)));
        }
        let mut entry = TocEntry {
            name: String::from_utf8_lossy(&name_bytes).into_owned(),
            kind: type_name,
            mode: numeric(header.mode().map(u64::from), &header.as_old().mode)?,
            uid: match pending.pax_value("uid") {
                Some(v) => parse_number(v, "uid")?,
                None => numeric(header.uid(), &header.as_old().uid)?,
            },
            gid: match pending.pax_value("gid") {
                Some(v) => parse_number(v, "gid")?,
                None => numeric(header.gid(), &header.as_old().gid)?,
            },
            uname: String::from_utf8_lossy(
                pending
                    .pax_value("uname")
                    .or_else(|| header.username_bytes())
                    .unwrap_or_default(),
            )
            .into_owned(),
            gname: String::from_utf8_lossy(
                pending
                    .pax_value("gname")
                    .or_else(|| header.groupname_bytes())
                    .unwrap_or_default(),
            )
            .into_owned(),
            mtime: match pending.pax_value("mtime") {
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .map(|t| t.round() as i64)
                    .ok_or_else(|| invalid("a PAX mtime that is not a number"))?,
                None => numeric(header.mtime(), &header.as_old().mtime)? as i64,
            },
            xattrs: pending
                .pax
                .iter()
                .filter_map(|(k, v)| {
                    use base64::Engine;
                    let name = k.strip_prefix("SCHILY.xattr.")?;
                    Some((
                        name.to_string(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    ))
                })
                .collect(),
            ..Default::default()
        };
        match kind {
            EntryType::Link | EntryType::Symlink => {
                entry.link_name = String::from_utf8_lossy(&link_bytes).into_owned()
            }
            EntryType::Char | EntryType::Block => {
                entry.dev_major = u64::from(header.device_major()?.unwrap_or(0));
                entry.dev_minor = u64::from(header.device_minor()?.unwrap_or(0));
            }
            EntryType::Regular => entry.size = size,
            _ => {}
        }
        if kind == EntryType::Regular && size == 0 {
            entry.digest = Some(Sha256::digest([]).into());
        }
        let several = size > self.options.chunk_size;
        let hasher = several.then(Sha256::new);
        let name = entry.name.clone();
        let index = self.push_entry(part, entry);
        self.append(part, &pending.raw)?;
        self.append(part, block)?;
        let file = (kind == EntryType::Regular && size > 0).then_some(FileData {
            entry: index,
            name,
            size,
            done: 0,
            chunk_left: 0,
            several,
            hasher,
        });
        self.input = Input::Data {
            part,
            left: size,
            padding,
            file,
        };
        Ok(())
    }

    /// Which part an entry goes to; a regular file put before the landmark
    /// is counted in the prefetch budget.
    fn route(&mut self, kind: EntryType, clean: &[u8], link: &[u8], size: u64) -> Part {
        let part = self.route_of(kind, clean, link, size);
        if self.prefetching && part == Part::Front && kind == EntryType::Regular {
            self.prefetched_bytes = self.prefetched_bytes.saturating_add(size);
            self.front_files.insert(clean.to_vec());
        }
        part
    }

    /// Which part an entry would go to now.
    fn route_of(&self, kind: EntryType, clean: &[u8], link: &[u8], size: u64) -> Part {
        if !self.prefetching {
            return Part::Front;
        }
        let prefetch = &self.options.prefetch;
        if !prefetch.matches(clean, kind == EntryType::Directory) {
            return Part::Rest;
        }
        match kind {
            EntryType::Regular => {
                let total = self.prefetched_bytes.saturating_add(size);
                if size > PREFETCH_FILE_MAX || total > prefetch.max_bytes {
                    return Part::Rest;
                }
                Part::Front
            }
            // a hard link before its target would not extract
            EntryType::Link if !self.front_files.contains(&clean_name(link)) => Part::Rest,
            _ => Part::Front,
        }
    }

    /// Passes entry data (at most what the current entry has left).
    fn data(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let chunk_size = self.options.chunk_size;
        let Input::Data {
            part, left, file, ..
        } = &mut self.input
        else {
            return Ok(0);
        };
        let (part, avail) = (*part, (*left).min(bytes.len() as u64) as usize);
        let start = match file {
            None => {
                *left -= avail as u64;
                self.append(part, &bytes[..avail])?;
                return Ok(avail);
            }
            Some(f) if f.chunk_left == 0 => {
                f.chunk_left = (f.size - f.done).min(chunk_size);
                Some(ChunkStart::of(f))
            }
            Some(_) => None,
        };
        if let Some(c) = start {
            let toc = &mut self.parts[part as usize].toc;
            let entry = if c.offset == 0 {
                c.file_entry
            } else {
                toc.push(TocEntry {
                    name: c.name,
                    kind: "chunk",
                    chunk_offset: c.offset,
                    ..Default::default()
                });
                toc.len() - 1
            };
            // as the reference: a chunk's size is written unless it runs to the file's end
            if c.file_size - c.offset >= chunk_size {
                toc[entry].chunk_size = c.len;
            }
            let whole_file = c.whole_file && c.offset == 0;
            self.start_chunk(part, entry, c.len, whole_file)?;
        }
        let Input::Data {
            left,
            file: Some(f),
            ..
        } = &mut self.input
        else {
            return Ok(0);
        };
        let take = avail.min(f.chunk_left as usize);
        let slice = &bytes[..take];
        if let Some(h) = f.hasher.as_mut() {
            h.update(slice);
        }
        f.chunk_left -= take as u64;
        f.done += take as u64;
        *left -= take as u64;
        let finished = if *left == 0 {
            f.hasher.take().map(|h| (f.entry, h.finalize().into()))
        } else {
            None
        };
        self.append(part, slice)?;
        if let Some((entry, digest)) = finished {
            self.parts[part as usize].toc[entry].digest = Some(digest);
        }
        Ok(take)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut used = 0;
        let base = self.given;
        self.given += buf.len() as u64;
        while used < buf.len() {
            let rest = &buf[used..];
            match &mut self.input {
                Input::End => return Ok(buf.len()),
                Input::Header => {
                    let take = (512 - self.block.len()).min(rest.len());
                    self.block.extend_from_slice(&rest[..take]);
                    used += take;
                    if self.block.len() == 512 {
                        self.block_end = base + used as u64;
                        let block = std::mem::take(&mut self.block);
                        let result = self.header(&block);
                        self.block = block;
                        self.block.clear();
                        result?;
                    }
                }
                Input::Extension { kind, size, data } => {
                    let total = *size + (512 - *size % 512) % 512;
                    let take = ((total - data.len() as u64) as usize).min(rest.len());
                    data.extend_from_slice(&rest[..take]);
                    used += take;
                    if data.len() as u64 == total {
                        let (kind, size, data) = (*kind, *size as usize, std::mem::take(data));
                        self.pending.raw.extend_from_slice(&data);
                        let value = &data[..size];
                        match kind {
                            EntryType::GNULongName => {
                                self.pending.long_name = Some(trim_nul(value.to_vec()))
                            }
                            EntryType::GNULongLink => {
                                self.pending.long_link = Some(trim_nul(value.to_vec()))
                            }
                            _ => {
                                for record in tar::PaxExtensions::new(value) {
                                    let record =
                                        record.map_err(|_| invalid("a malformed PAX record"))?;
                                    let key = record
                                        .key()
                                        .map_err(|_| invalid("a PAX key that is not UTF-8"))?;
                                    self.pending
                                        .pax
                                        .push((key.to_string(), record.value_bytes().to_vec()));
                                }
                            }
                        }
                        self.input = Input::Header;
                    }
                }
                Input::Skip(left) => {
                    let take = (*left).min(rest.len() as u64);
                    *left -= take;
                    used += take as usize;
                    if *left == 0 {
                        self.input = Input::Header;
                    }
                }
                Input::Data {
                    part,
                    left,
                    padding,
                    ..
                } => {
                    if *left > 0 {
                        used += self.data(rest)?;
                    } else {
                        let (part, take) = (*part, (*padding).min(rest.len() as u64));
                        *padding -= take;
                        let done = *padding == 0;
                        self.append(part, &rest[..take as usize])?;
                        used += take as usize;
                        if done {
                            self.input = Input::Header;
                        }
                    }
                }
            }
            // an entry without data (or whose data just ended) ends at its padding
            if let Input::Data {
                left: 0,
                padding: 0,
                ..
            }
            | Input::Skip(0) = self.input
            {
                self.input = Input::Header;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Pending {
    fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn parse_number(value: &[u8], what: &str) -> io::Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| invalid(&format!("a PAX {what} that is not a number")))
}

/// A header's number; an empty field is 0, as Go's reader takes it.
fn numeric(value: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match value {
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        other => other,
    }
}

fn trim_nul(mut name: Vec<u8>) -> Vec<u8> {
    while name.last() == Some(&0) {
        name.pop();
    }
    name
}

/// A name as the reference compares it: without `./`, `/` around it.
fn clean_name(name: &[u8]) -> Vec<u8> {
    let mut out: Vec<&[u8]> = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join(&b'/')
}

/// The reference writes a user or group name only where it changes for its id.
fn drop_repeated_names(entries: &mut [TocEntry]) {
    let (mut users, mut groups) = (BTreeMap::new(), BTreeMap::new());
    for e in entries.iter_mut().filter(|e| e.kind != "chunk") {
        for (names, id, name) in [
            (&mut users, e.uid, &mut e.uname),
            (&mut groups, e.gid, &mut e.gname),
        ] {
            if name.is_empty() {
                continue;
            }
            if names.get(&id) == Some(&*name) {
                name.clear();
            } else {
                names.insert(id, name.clone());
            }
        }
    }
}

/// A ustar header of a regular file of `size` bytes, root's, mode 0644, time 0.
fn header_bytes(name: &str, size: u64) -> io::Result<[u8; 512]> {
    let mut header = Header::new_ustar();
    header.set_path(name)?;
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_mtime(0);
    header.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(header.as_bytes());
    Ok(out)
}

/// A whole tar entry: header, data, padding.
fn entry_bytes(name: &str, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = header_bytes(name, data.len() as u64)?.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len() + (512 - data.len() % 512) % 512, 0);
    Ok(out)
}

/// The 51-byte footer: an empty gzip member, uncompressed, whose Extra field
/// `SG` holds `%016xSTARGZ` with the TOC's offset.
pub fn footer(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut out = [0u8; FOOTER_SIZE];
    out[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255]);
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12..14].copy_from_slice(b"SG");
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    out[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // a final stored block of no bytes, then CRC32 and size, both 0
    out[38..43].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    out
}

/// The TOC's offset from a footer; `None` if it is not one.
pub fn parse_footer(footer: &[u8]) -> Option<u64> {
    if footer.len() != FOOTER_SIZE
        || footer[..4] != [0x1f, 0x8b, 8, 4]
        || footer[10..16] != [26, 0, b'S', b'G', 22, 0]
        || &footer[32..38] != b"STARGZ"
    {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&footer[16..32]).ok()?, 16).ok()
}

/// The rest, from the spill, after the front; its bytes decompressed on
/// another thread into the diff_id's hash. Returns their number.
fn append_spill<W: Write>(spill: Spill, out: &mut W, diff: &mut Sha256) -> io::Result<u64> {
    let mut file = spill.file.into_inner().map_err(|e| e.into_error())?;
    if file.stream_position()? == 0 {
        // everything was prefetched (or there was nothing): no member to
        // inflate, and an empty gzip stream is no stream
        return Ok(0);
    }
    file.rewind()?;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
    let hasher = std::mem::take(diff);
    let inflater = std::thread::Builder::new()
        .name("estargz-rehash".into())
        .spawn(move || -> io::Result<(Sha256, u64)> {
            let mut reader = flate2::read::MultiGzDecoder::new(ChannelReader {
                rx,
                buf: Vec::new(),
                at: 0,
            });
            let mut hashing = HashWrite { hasher, count: 0 };
            io::copy(&mut reader, &mut hashing)?;
            Ok((hashing.hasher, hashing.count))
        })?;
    let copied = (|| -> io::Result<()> {
        loop {
            let mut block = vec![0u8; 1 << 20];
            let n = file.read(&mut block)?;
            if n == 0 {
                return Ok(());
            }
            block.truncate(n);
            out.write_all(&block)?;
            if tx.send(block).is_err() {
                return Ok(()); // the inflater failed: its error follows
            }
        }
    })();
    drop(tx);
    let inflated = inflater
        .join()
        .map_err(|_| io::Error::other("the eStargz rehash panicked"))?;
    copied?;
    let (hasher, count) = inflated?;
    *diff = hasher;
    Ok(count)
}

struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => (self.buf, self.at) = (b, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct HashWrite {
    hasher: Sha256,
    count: u64,
}

impl Write for HashWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.count += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The unnamed file where the part after the landmark waits.
struct Spill {
    file: BufWriter<File>,
    written: u64,
    limit: u64,
}

impl Write for Spill {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::other(crate::image::spool::TooLarge {
                limit: self.limit,
            }));
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

struct InFlight {
    part: Part,
    chunks: Vec<(Option<(usize, usize)>, bool)>,
    reply: mpsc::Receiver<io::Result<Compressed>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::members::tests::gunzip as gunzip_all;
    use serde_json::Value;
    use std::io::Read;

    /// A small deterministic generator (xorshift), for trees and contents.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            // half compressible text, half noise
            (0..n)
                .map(|i| {
                    if (i / 4096) % 2 == 0 {
                        b"desktop config line\n"[i % 20]
                    } else {
                        self.next() as u8
                    }
                })
                .collect()
        }
    }

    /// A layer tar as upper.rs writes it: GNU headers, PAX records for
    /// attributes, whiteouts, an opaque marker, hard and symbolic links.
    struct Layer {
        tar: tar::Builder<Vec<u8>>,
    }

    impl Layer {
        fn new() -> Self {
            Self {
                tar: tar::Builder::new(Vec::new()),
            }
        }
        fn header(kind: EntryType, size: u64) -> Header {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            h.set_size(size);
            h
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(EntryType::Directory, 0);
            self.tar
                .append_data(&mut h, format!("{name}/"), io::empty())
                .unwrap();
            self
        }
        fn file(mut self, name: &str, data: &[u8]) -> Self {
            let mut h = Self::header(EntryType::Regular, data.len() as u64);
            self.tar.append_data(&mut h, name, data).unwrap();
            self
        }
        fn xattr(mut self, name: &str, key: &str, value: &[u8]) -> Self {
            let records = crate::layer::tar::pax_records(std::iter::once((
                format!("SCHILY.xattr.{key}").into_bytes(),
                value,
            )));
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::XHeader);
            h.set_mode(0o644);
            h.set_size(records.len() as u64);
            h.set_path(format!(
                "PaxHeaders.0/{}",
                name.rsplit('/').next().unwrap_or(name)
            ))
            .unwrap();
            h.set_cksum();
            self.tar.append(&h, records.as_slice()).unwrap();
            self
        }
        fn link(mut self, kind: EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0);
            self.tar.append_link(&mut h, name, target).unwrap();
            self
        }
        fn device(mut self, kind: EntryType, name: &str) -> Self {
            let mut h = Self::header(kind, 0);
            if kind != EntryType::Fifo {
                h.set_device_major(8).unwrap();
                h.set_device_minor(1).unwrap();
            }
            self.tar.append_data(&mut h, name, io::empty()).unwrap();
            self
        }
        fn done(self) -> Vec<u8> {
            self.tar.into_inner().unwrap()
        }
    }

    const CHUNK: u64 = 64 << 10;

    /// A desktop's change: dotfiles, a big file of several chunks, every kind of entry.
    fn desktop(rng: &mut Rng) -> Vec<u8> {
        let long = format!("opt/{}/file", "d".repeat(120));
        Layer::new()
            .file(".no.prefetch.landmark", &[0xf])
            .dir("etc")
            .file("etc/.wh.gone", b"")
            .file("etc/hosts", &rng.bytes(300))
            .dir("home")
            .dir("home/alice")
            .file("home/alice/.bashrc", &rng.bytes(2000))
            .dir("home/alice/.cache")
            .file(
                "home/alice/.cache/big",
                &rng.bytes(2 * CHUNK as usize + 1234),
            )
            .dir("home/alice/.config")
            .file("home/alice/.config/.wh..wh..opq", b"")
            .xattr("home/alice/.config/app.conf", "user.origin", b"desktop")
            .file(
                "home/alice/.config/app.conf",
                &rng.bytes(CHUNK as usize * 2),
            )
            .link(
                EntryType::Link,
                "home/alice/.config/same.conf",
                "home/alice/.config/app.conf",
            )
            .link(
                EntryType::Link,
                "home/alice/.config/cached",
                "home/alice/.cache/big",
            )
            .file("home/alice/.config/empty", b"")
            .file(
                "home/alice/.config/huge",
                &rng.bytes(PREFETCH_FILE_MAX as usize + 1),
            )
            .file("home/alice/notes.txt", &rng.bytes(5000))
            .dir(&long[..long.len() - 5])
            .file(&long, &rng.bytes(700))
            .device(EntryType::Char, "dev-null")
            .device(EntryType::Fifo, "pipe")
            .link(EntryType::Symlink, "link", "/etc/hosts")
            .file("stargz.index.json", b"{\"version\":1}")
            .done()
    }

    fn options(paths: &[&str], threads: usize) -> Options {
        Options {
            threads,
            chunk_size: CHUNK,
            prefetch: Prefetch {
                paths: paths.iter().map(|p| p.to_string()).collect(),
                max_bytes: 1 << 30,
            },
            ..Options::default()
        }
    }

    /// The blob of `tar`, written in pieces of `piece` bytes.
    fn blob(tar: &[u8], options: Options, piece: usize) -> (Vec<u8>, Done) {
        let mut w = Writer::new(Vec::new(), options).unwrap();
        for p in tar.chunks(piece) {
            w.write_all(p).unwrap();
        }
        w.finish().unwrap()
    }

    type Seen = (String, EntryType, Option<String>, Vec<u8>, Vec<String>);

    /// Every entry of a tar: name, type, link, data, PAX records.
    fn entries(tar: &[u8]) -> Vec<Seen> {
        let mut archive = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let pax = e
                .pax_extensions()
                .unwrap()
                .into_iter()
                .flatten()
                .map(|x| {
                    let x = x.unwrap();
                    format!("{}={}", x.key().unwrap(), x.value().unwrap())
                })
                .collect();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, e.header().entry_type(), link, data, pax));
        }
        out
    }

    /// The TOC: the footer's offset opens one gzip member holding a tar
    /// whose only entry is the TOC; its JSON and bytes.
    fn toc(blob: &[u8]) -> (Value, Vec<u8>, u64) {
        let offset = parse_footer(&blob[blob.len() - FOOTER_SIZE..]).expect("a footer");
        let mut member = flate2::read::GzDecoder::new(&blob[offset as usize..]);
        let mut tar = Vec::new();
        member.read_to_end(&mut tar).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut first = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(first.path().unwrap().to_str(), Some(TOC_NAME));
        let mut json = Vec::new();
        first.read_to_end(&mut json).unwrap();
        (serde_json::from_slice(&json).unwrap(), json, offset)
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn the_blob_is_the_plain_layer_with_its_landmark_and_toc() {
        let tar = desktop(&mut Rng(7));
        let plain: Vec<Seen> = entries(&tar)
            .into_iter()
            .filter(|e| e.0 != "stargz.index.json" && e.0 != ".no.prefetch.landmark")
            .collect();
        for paths in [
            &[][..],
            &["home/*/.config", "etc", "home/alice/.bashrc"][..],
        ] {
            let (blob, done) = blob(&tar, options(paths, 2), 1 << 16);
            let whole = gunzip_all(&blob);
            assert_eq!(done.diff_id, sha(&whole), "{paths:?}");
            assert_eq!(done.uncompressed_size, whole.len() as u64);
            let got = entries(&whole);
            let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(names.last(), Some(&TOC_NAME));
            let landmark = if paths.is_empty() {
                NO_PREFETCH_LANDMARK
            } else {
                PREFETCH_LANDMARK
            };
            let at = names.iter().position(|n| *n == landmark).unwrap();
            assert_eq!(got[at].3, [LANDMARK_CONTENTS]);
            let mut rest: Vec<Seen> = got[..got.len() - 1]
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != at)
                .map(|(_, e)| e.clone())
                .collect();
            if paths.is_empty() {
                assert_eq!(at, 0, "no prefetch: the landmark comes first");
                assert_eq!(rest, plain, "byte for byte the plain layer's entries");
            } else {
                let front: Vec<&str> = names[..at].to_vec();
                assert_eq!(
                    front,
                    [
                        "etc/",
                        "etc/.wh.gone",
                        "etc/hosts",
                        "home/",
                        "home/alice/",
                        "home/alice/.bashrc",
                        "home/alice/.config/",
                        "home/alice/.config/.wh..wh..opq",
                        "home/alice/.config/app.conf",
                        "home/alice/.config/same.conf",
                        "home/alice/.config/empty",
                    ],
                    "prefetched: the paths, the directories to them, small files, links to what went first"
                );
                let (mut want, mut rest_sorted) = (plain.clone(), rest.clone());
                want.sort_by(|a, b| a.0.cmp(&b.0));
                rest_sorted.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(rest_sorted, want, "the same entries, reordered");
                rest.retain(|e| !front.contains(&e.0.as_str()));
                let after: Vec<&Seen> = plain
                    .iter()
                    .filter(|e| !front.contains(&e.0.as_str()))
                    .collect();
                assert_eq!(
                    rest.iter().collect::<Vec<_>>(),
                    after,
                    "the rest in its order"
                );
            }
            let xattrs = got
                .iter()
                .find(|e| e.0 == "home/alice/.config/app.conf")
                .unwrap();
            assert_eq!(xattrs.4, ["SCHILY.xattr.user.origin=desktop"]);
        }
    }

    /// With prefetch paths, an empty layer (a desktop that changed nothing)
    /// and one whose every entry is prefetched leave nothing spilled: still
    /// a blob whose TOC lists what the tar holds.
    #[test]
    fn nothing_left_after_the_prefetched_part_is_a_blob_too() {
        let mut only_etc = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        only_etc
            .append_data(&mut header, "etc/hosts", &b"hosts"[..])
            .unwrap();
        let only_etc = only_etc.into_inner().unwrap();
        for (tar, names) in [(vec![0u8; 1024], &[][..]), (only_etc, &["etc/hosts"][..])] {
            for piece in [1 << 16, 7] {
                let (blob, done) = blob(&tar, options(&["etc", "home"], 2), piece);
                let whole = gunzip_all(&blob);
                assert_eq!(done.diff_id, sha(&whole));
                let got: Vec<String> = entries(&whole).into_iter().map(|e| e.0).collect();
                let kept: Vec<&str> = got
                    .iter()
                    .map(String::as_str)
                    .filter(|n| *n != TOC_NAME && !n.starts_with("."))
                    .collect();
                assert_eq!(kept, names);
            }
        }
    }

    #[test]
    fn the_toc_points_at_every_chunk_and_the_footer_at_the_toc() {
        let tar = desktop(&mut Rng(11));
        let files: BTreeMap<String, Vec<u8>> = entries(&tar)
            .into_iter()
            .filter(|e| e.1 == EntryType::Regular)
            .map(|e| (e.0, e.3))
            .collect();
        for paths in [&[][..], &["home/*/.config", "etc"][..]] {
            let (blob, done) = blob(&tar, options(paths, 3), 4096);
            let (toc, json, offset) = toc(&blob);
            assert_eq!(offset, done.toc_offset);
            assert_eq!(done.toc_digest, sha(&json));
            assert_eq!(done.annotations()[TOC_DIGEST_ANNOTATION], sha(&json));
            assert_eq!(
                done.annotations()[UNCOMPRESSED_SIZE_ANNOTATION],
                gunzip_all(&blob).len().to_string()
            );
            assert_eq!(toc["version"], 1);
            let list = toc["entries"].as_array().unwrap();
            assert!(!list.iter().any(|e| e["name"] == TOC_NAME));
            let mut last_offset = 0;
            let mut name = String::new();
            let mut chunks = 0;
            for e in list {
                let kind = e["type"].as_str().unwrap();
                if kind != "chunk" {
                    name = e["name"].as_str().unwrap().to_string();
                }
                let Some(offset) = e["offset"].as_u64() else {
                    assert!(
                        kind != "chunk" && e["size"].as_u64().unwrap_or(0) == 0,
                        "{e}"
                    );
                    continue;
                };
                assert!(offset > last_offset, "offsets grow: {e}");
                last_offset = offset;
                let data = match files.get(&name) {
                    Some(d) => d.clone(),
                    None => vec![LANDMARK_CONTENTS],
                };
                let from = e["chunkOffset"].as_u64().unwrap_or(0) as usize;
                let len = match e["chunkSize"].as_u64() {
                    Some(n) => n as usize,
                    None => data.len() - from,
                };
                let mut got = vec![0u8; len];
                flate2::read::GzDecoder::new(&blob[offset as usize..])
                    .read_exact(&mut got)
                    .unwrap();
                assert_eq!(got, data[from..from + len], "{e}");
                assert_eq!(e["chunkDigest"], sha(&got), "{e}");
                if kind == "reg" {
                    assert_eq!(e["digest"], sha(&data), "{e}");
                    assert_eq!(e["size"], data.len() as u64);
                }
                chunks += 1;
            }
            assert!(chunks > 10, "{chunks}");
            let find = |n: &str| list.iter().find(|e| e["name"] == n).unwrap();
            assert_eq!(find("home/alice/.config/empty")["digest"], sha(b""));
            let app = find("home/alice/.config/app.conf");
            assert_eq!(app["xattrs"]["user.origin"], "ZGVza3RvcA==");
            assert_eq!(app["uid"], 1000);
            assert_eq!(app["mode"], 0o644);
            assert_eq!(app["modtime"], "2023-11-14T22:13:20Z");
            let same = find("home/alice/.config/same.conf");
            assert_eq!(
                (same["type"].as_str(), same["linkName"].as_str()),
                (Some("hardlink"), Some("home/alice/.config/app.conf"))
            );
            assert_eq!(find("link")["linkName"], "/etc/hosts");
            assert_eq!(
                (
                    find("dev-null")["devMajor"].as_u64(),
                    find("dev-null")["devMinor"].as_u64()
                ),
                (Some(8), Some(1))
            );
            assert_eq!(find("pipe")["type"], "fifo");
            assert_eq!(find("etc/.wh.gone")["type"], "reg");
            // the landmark ends the prefetched part: every offset before it is a prefetched file's
            let landmark = if paths.is_empty() {
                NO_PREFETCH_LANDMARK
            } else {
                PREFETCH_LANDMARK
            };
            let at = list.iter().position(|e| e["name"] == landmark).unwrap();
            assert_eq!(list[at]["offset"].as_u64(), Some(done.landmark_offset));
            assert_eq!(done.prefetched_entries > 0, !paths.is_empty());
            for (i, e) in list.iter().enumerate() {
                if let Some(o) = e["offset"].as_u64() {
                    assert_eq!(o < done.landmark_offset, i < at, "{e}");
                }
            }
        }
    }

    #[test]
    fn big_files_are_cut_into_chunks_as_the_reference_does() {
        for (size, want) in [
            // (file size, the TOC's (type, chunkOffset, chunkSize) of its entries)
            (
                CHUNK * 2 + 5,
                vec![
                    ("reg", 0, CHUNK),
                    ("chunk", CHUNK, CHUNK),
                    ("chunk", 2 * CHUNK, 0),
                ],
            ),
            (CHUNK * 2, vec![("reg", 0, CHUNK), ("chunk", CHUNK, CHUNK)]),
            (CHUNK, vec![("reg", 0, CHUNK)]),
            (CHUNK - 1, vec![("reg", 0, 0)]),
        ] {
            let data = Rng(size).bytes(size as usize);
            let tar = Layer::new().file("f", &data).done();
            let (blob, _) = blob(&tar, options(&[], 2), 1 << 20);
            let (toc, _, _) = toc(&blob);
            let got: Vec<(&str, u64, u64)> = toc["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "f")
                .map(|e| {
                    (
                        e["type"].as_str().unwrap(),
                        e["chunkOffset"].as_u64().unwrap_or(0),
                        e["chunkSize"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            assert_eq!(got, want, "{size}");
            let reg = &toc["entries"][1];
            assert_eq!(reg["digest"], sha(&data));
        }
    }

    #[test]
    fn the_same_change_gives_the_same_blob_whatever_the_threads_and_writes() {
        for seed in 1..6u64 {
            let mut rng = Rng(seed * 7919);
            let mut layer = Layer::new()
                .dir("home")
                .dir("home/bob")
                .dir("home/bob/.config");
            for i in 0..(rng.next() % 40) {
                let dir = if rng.next() & 1 == 0 {
                    "home/bob/.config"
                } else {
                    "home/bob"
                };
                let size = match rng.next() % 4 {
                    0 => 0,
                    1 => rng.next() % 600,
                    2 => rng.next() % (3 * CHUNK),
                    _ => CHUNK,
                };
                let data = rng.bytes(size as usize);
                layer = layer.file(&format!("{dir}/f{i:03}"), &data);
            }
            let tar = layer.done();
            for paths in [&[][..], &["home/*/.config"][..]] {
                let (first, done) = blob(&tar, options(paths, 1), 1 << 20);
                for (threads, piece) in [(2, 1), (3, 511), (4, 7777)] {
                    let (again, again_done) = blob(&tar, options(paths, threads), piece);
                    assert!(
                        first == again,
                        "seed {seed} {paths:?} threads {threads} piece {piece}"
                    );
                    assert_eq!(done, again_done);
                }
                assert_eq!(done.diff_id, sha(&gunzip_all(&first)));
            }
        }
    }

    /// A tar given twice ([`Writer::twice`]) makes the blob it makes given
    /// once: every kind of entry, hard links after their prefetched target,
    /// with and without prefetch, whatever the writes.
    /// A tar's entries, each with its extension headers, without the end.
    fn split(tar: &[u8]) -> Vec<Vec<u8>> {
        let (mut out, mut at, mut start) = (Vec::new(), 0, 0);
        while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|&b| b != 0) {
            let header = Header::from_byte_slice(&tar[at..at + 512]);
            let size = header.entry_size().unwrap() as usize;
            at += 512 + size.div_ceil(512) * 512;
            if !matches!(
                header.entry_type(),
                EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
            ) {
                out.push(tar[start..at].to_vec());
                start = at;
            }
        }
        out
    }

    /// What a final tar is made of: an entry of the first pass as it
    /// stands, or bytes given.
    enum Final {
        Old(usize),
        New(Vec<u8>),
    }

    /// The blob of `list` from a recording of `first`: spliced, the
    /// others given as bytes, in pieces of `piece`.
    fn spliced(first: &[u8], list: &[Final], options: Options, piece: usize) -> (Vec<u8>, Done) {
        let dir = tempfile::tempdir().unwrap();
        let mut recording = Writer::recording(
            tempfile::tempfile_in(dir.path()).unwrap(),
            Options {
                spill_dir: dir.path().to_path_buf(),
                ..options.clone()
            },
        )
        .unwrap();
        for p in first.chunks(piece) {
            recording.write_all(p).unwrap();
        }
        let recorded = recording.into_recorded().unwrap();
        assert_eq!(recorded.len(), split(first).len());
        let mut w = Writer::twice(Vec::new(), options)
            .unwrap()
            .splicing(std::sync::Arc::new(recorded));
        for pass in 0..2 {
            if pass == 1 {
                w.second_pass().unwrap();
                if !w.reads_again() {
                    break;
                }
            }
            for f in list {
                match f {
                    Final::Old(i) => w.splice(*i).unwrap(),
                    Final::New(bytes) => {
                        for p in bytes.chunks(piece) {
                            w.write_all(p).unwrap();
                        }
                    }
                }
            }
        }
        w.finish().unwrap()
    }

    #[test]
    fn entries_of_a_first_pass_spliced_make_the_blob_of_the_final_tar() {
        let one = |layer: Layer| {
            let tar = layer.done();
            tar[..tar.len() - 1024].to_vec()
        };
        for seed in 1..3u64 {
            let mut rng = Rng(seed * 7919);
            let first = desktop(&mut rng);
            let entries = split(&first);
            let at = |name: &str| {
                entries
                    .iter()
                    .position(|e| {
                        let mut archive = tar::Archive::new(&e[..]);
                        let mut all = archive.entries().unwrap();
                        let entry = all.next().unwrap().unwrap();
                        entry.path().unwrap().to_string_lossy() == name
                    })
                    .unwrap_or_else(|| panic!("{name}"))
            };
            let (bashrc, hosts, app) = (
                at("home/alice/.bashrc"),
                at("etc/hosts"),
                at("home/alice/.config/app.conf"),
            );
            let changed = |list: &mut Vec<Final>| {
                list[bashrc] = Final::New(one(
                    Layer::new().file("home/alice/.bashrc", &rng_bytes(seed, 3000))
                ));
                list.remove(hosts);
                // before app.conf: eats the prefetch budget, app.conf and its
                // link go after the landmark
                let app = app - 1;
                list.insert(
                    app,
                    Final::New(one(Layer::new()
                        .file("home/alice/.config/a-first", &rng_bytes(seed, 100 << 10)))),
                );
            };
            for paths in [&[][..], &["etc", "home/*/.config"][..]] {
                let mut options = options(paths, 2);
                options.prefetch.max_bytes = 200 << 10;
                for change in [false, true] {
                    let mut list: Vec<Final> = (0..entries.len()).map(Final::Old).collect();
                    if change {
                        changed(&mut list);
                    }
                    let mut tar = Vec::new();
                    for f in &list {
                        tar.extend_from_slice(match f {
                            Final::Old(i) => &entries[*i],
                            Final::New(b) => b,
                        });
                    }
                    tar.extend_from_slice(&[0; 1024]);
                    let (expected, expected_done) = blob(&tar, options.clone(), 1 << 20);
                    for piece in [1 << 20, 777] {
                        let (got, done) = spliced(&first, &list, options.clone(), piece);
                        if got != expected {
                            eprintln!("TOC spliced: {}", toc(&got).0);
                            eprintln!("TOC of the final tar: {}", toc(&expected).0);
                        }
                        assert!(
                            got == expected,
                            "seed {seed} {paths:?} change {change} piece {piece}"
                        );
                        assert_eq!(done, expected_done, "seed {seed} {paths:?} change {change}");
                    }
                }
            }
        }
    }

    fn rng_bytes(seed: u64, n: usize) -> Vec<u8> {
        Rng(seed * 31 + 5).bytes(n)
    }

    #[test]
    fn a_tar_given_twice_is_the_blob_of_one_given_once() {
        for seed in 1..4u64 {
            let tar = desktop(&mut Rng(seed * 104_729));
            for paths in [
                &[][..],
                &["etc", "home/*/.config"][..],
                &["nothing/here"][..],
            ] {
                let (once, once_done) = blob(&tar, options(paths, 2), 1 << 20);
                for piece in [1 << 20, 511, 7777] {
                    let mut w = Writer::twice(Vec::new(), options(paths, 3)).unwrap();
                    for p in tar.chunks(piece) {
                        w.write_all(p).unwrap();
                    }
                    w.second_pass().unwrap();
                    if w.reads_again() {
                        for p in tar.chunks(piece) {
                            w.write_all(p).unwrap();
                        }
                    }
                    let (twice, twice_done) = w.finish().unwrap();
                    assert!(once == twice, "seed {seed} {paths:?} piece {piece}");
                    assert_eq!(once_done, twice_done, "seed {seed} {paths:?}");
                }
            }
        }
        // with prefetch, given once or ended after the first reading: an error
        let tar = desktop(&mut Rng(1));
        let mut w = Writer::twice(Vec::new(), options(&["etc"], 2)).unwrap();
        w.write_all(&tar).unwrap();
        assert!(w.finish().is_err());
        let mut w = Writer::new(Vec::new(), options(&["etc"], 2)).unwrap();
        w.write_all(&tar).unwrap();
        assert!(w.second_pass().is_err());
    }

    #[test]
    fn prefetch_paths_match_what_lies_below_and_the_way_to_it() {
        let prefetch = Prefetch {
            paths: vec![
                "home/*/.config".into(),
                "/etc/".into(),
                "root/.bash*".into(),
            ],
            max_bytes: 0,
        };
        for (path, dir, want) in [
            ("etc", true, true),
            ("etc/hosts", false, true),
            ("etcetera", false, false),
            ("home", true, true),
            ("home", false, false),
            ("home/alice", true, true),
            ("home/alice/.config", true, true),
            ("home/alice/.config/xfce4/panel.xml", false, true),
            ("home/alice/.cache", true, false),
            ("home/alice/.configs", false, false),
            ("root/.bashrc", false, true),
            ("root/.bash_history", false, true),
            ("root/.profile", false, false),
            ("usr", true, false),
        ] {
            assert_eq!(prefetch.matches(path.as_bytes(), dir), want, "{path} {dir}");
        }
        assert!(!Prefetch::default().matches(b"etc", true));
    }

    #[test]
    fn the_prefetch_budget_and_the_file_cap_hold() {
        let tar = Layer::new()
            .file("etc/a", &[1; 600])
            .file("etc/b", &[2; 600])
            .file("etc/c", &[3; 100])
            .done();
        let mut o = options(&["etc"], 2);
        o.prefetch.max_bytes = 800;
        let (out, done) = blob(&tar, o, 1000);
        let names: Vec<String> = entries(&gunzip_all(&out))
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            names,
            ["etc/a", "etc/c", PREFETCH_LANDMARK, "etc/b", TOC_NAME],
            "b passes the budget, c still fits"
        );
        assert_eq!((done.prefetched_entries, done.prefetched_bytes), (2, 700));
        // nothing matched: no prefetch at all
        let (blob, done) = blob(&tar, options(&["opt"], 2), 1000);
        let names: Vec<String> = entries(&gunzip_all(&blob))
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(names[0], NO_PREFETCH_LANDMARK);
        assert_eq!(done.prefetched_entries, 0);
    }

    #[test]
    fn footers_are_51_bytes_and_read_back() {
        for offset in [0, 1, 0x1234_5678_9abc, u64::MAX >> 1] {
            let f = footer(offset);
            assert_eq!(parse_footer(&f), Some(offset));
            let mut empty = Vec::new();
            flate2::read::GzDecoder::new(&f[..])
                .read_to_end(&mut empty)
                .unwrap();
            assert!(empty.is_empty(), "an empty gzip member");
        }
        assert_eq!(parse_footer(&[0; FOOTER_SIZE]), None);
    }

    #[test]
    fn broken_input_is_an_error_and_the_spill_has_a_limit() {
        let tar = Layer::new().file("etc/a", &[1; 5000]).done();
        let mut w = Writer::new(Vec::new(), options(&[], 2)).unwrap();
        w.write_all(&tar[..1000]).unwrap();
        assert!(w.finish().is_err(), "a tar cut inside an entry");

        let mut sparse = Header::new_gnu();
        sparse.set_entry_type(EntryType::GNUSparse);
        sparse.set_path("s").unwrap();
        sparse.set_size(0);
        sparse.set_cksum();
        let mut w = Writer::new(Vec::new(), options(&[], 2)).unwrap();
        let err = w.write_all(sparse.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("cannot go into an eStargz layer"),
            "{err}"
        );

        let big = Layer::new().file("opt/a", &Rng(3).bytes(1 << 20)).done();
        let mut o = options(&["etc"], 2);
        o.spill_limit = 1000;
        let mut w = Writer::new(Vec::new(), o).unwrap();
        let err = w
            .write_all(&big)
            .and_then(|_| w.finish().map(|_| ()))
            .unwrap_err();
        assert!(err.to_string().contains("--max-change-bytes"), "{err}");
    }
}
