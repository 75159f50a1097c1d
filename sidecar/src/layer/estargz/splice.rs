//! Pre-copy's eStargz: the blob's members are written once, while the
//! desktop runs, and copied after the resume.
//!
//! The first pass runs the writer as a snapshot without pre-copy would
//! ([`Writer::recording`]): the part before the landmark into one file, the
//! rest into the spill, every member compressed there. The recording notes
//! each member (where its bytes lie in its part's uncompressed stream, the
//! chunk it starts with, its compressed bytes) and each entry (its bytes in
//! that stream, its TOC entries, how it was routed, where it started in the
//! tar). The first pass's pieces (one per path of the upper directory: a
//! directory and its opaque marker are two entries of one piece) are cut
//! from the entries ([`Recorded::cut`]).
//!
//! After the resume, a writer given the final tar twice ([`Writer::twice`])
//! takes each piece that stands ([`Writer::splice`]) without its bytes:
//! each entry routed where the first pass put it adds its span of the first
//! pass's stream to the member being filled, a member starting at each of
//! its chunks as the first pass's did. A member that ends up exactly a
//! member of the first pass is copied as it is (its bytes inflated for the
//! diff_id only, as the spill is without pre-copy); one whose bytes differ
//! (the entry after it moved, the landmark follows it) is inflated and
//! compressed again; an entry routed elsewhere than in the first pass (the
//! prefetch budget moved) is written again from its bytes. Entries read
//! again under the pause are given as plain tar bytes, as to any writer.
//! The blob is the one a single pass over the final tar writes, byte for
//! byte (members are cut where the reference cuts them: at each chunk).

use super::{diff::inflate_member, Member, Part, TocEntry, Writer};
use miniz_oxide::inflate::core::DecompressorOxide;
use std::{
    fs::File,
    io::{self, BufWriter, Write},
    ops::Range,
    os::unix::fs::FileExt,
    sync::{Arc, Mutex},
};
use tar::EntryType;

/// How an entry was routed: what [`Writer::route`] decides from.
#[derive(Debug, Clone)]
pub(super) struct Routed {
    pub kind: EntryType,
    pub clean: Vec<u8>,
    pub link: Vec<u8>,
    pub size: u64,
}

/// One entry of the first pass: its bytes in its part's uncompressed
/// stream, its TOC entries in that part's TOC, how it was routed.
#[derive(Debug, Clone)]
struct Extent {
    part: Part,
    range: Range<u64>,
    toc: Range<usize>,
    routed: Routed,
}

/// One member of the first pass.
#[derive(Debug, Clone)]
struct Written {
    /// Its bytes in its part's uncompressed stream.
    start: u64,
    len: u64,
    /// The chunk it starts with: its TOC entry in the part's TOC, its
    /// length, whether it is its file's only one.
    chunk: Option<(usize, usize, bool)>,
    /// Where its compressed bytes end in the part's file, and its chunk's
    /// digest (once written).
    end: u64,
    digest: Option<[u8; 32]>,
}

/// The entry being recorded: where it started.
struct Started {
    start: u64,
    part: Part,
    at: u64,
    toc: usize,
    routed: Routed,
}

/// What a recording writer notes as it goes.
#[derive(Default)]
pub(super) struct Recording {
    /// Each entry of the tar given, in order, with where it started in the
    /// tar; `None` for one left out (an earlier layer's TOC or landmark).
    extents: Vec<(u64, Option<Extent>)>,
    started: Option<Started>,
    /// Each part's members, in order, and how many of them are written.
    members: [Vec<Written>; 2],
    written: [usize; 2],
    /// Uncompressed bytes of each part's closed members.
    closed: [u64; 2],
}

impl Recording {
    /// `member` of `part` is closed (compressed later, in order).
    pub(super) fn member_closed(&mut self, part: Part, member: &Member) {
        let len = member.buf.len() as u64;
        let start = self.closed[part as usize];
        self.closed[part as usize] += len;
        self.members[part as usize].push(Written {
            start,
            len,
            chunk: member
                .chunk
                .map(|(len, entry)| (entry, len, member.whole_file)),
            end: 0,
            digest: None,
        });
    }

    /// The members of a job just written into `part` from `offset` on.
    pub(super) fn members_written(
        &mut self,
        part: Part,
        offset: u64,
        members: &[(usize, Option<[u8; 32]>)],
    ) {
        let mut at = offset;
        for (len, digest) in members {
            at += *len as u64;
            let i = self.written[part as usize];
            if let Some(m) = self.members[part as usize].get_mut(i) {
                (m.end, m.digest) = (at, *digest);
            }
            self.written[part as usize] += 1;
        }
    }
}

/// How the entries of a first pass went into the layer after the resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Members of the first pass copied as they were.
    pub copied: u64,
    /// Members of the first pass compressed again (their bytes joined
    /// others: what follows them moved).
    pub remade: u64,
    /// Entries routed across the landmark, written again.
    pub rerouted: u64,
}

/// The first pass's blob parts and where each entry and member lies in them.
pub struct Recorded {
    files: [Option<File>; 2],
    tocs: [Vec<TocEntry>; 2],
    members: [Vec<Written>; 2],
    extents: Vec<(u64, Option<Extent>)>,
    /// The entries of each piece ([`Recorded::cut`]).
    pieces: Vec<Range<usize>>,
    /// The member inflated last, for the entries that share it, and the
    /// inflater: one for all, writing straight into the member's bytes (a
    /// gzip reader per member zeroes a window of 32 KiB, more than a small
    /// file's inflating costs).
    inflated: Mutex<Option<Inflated>>,
    inflater: Mutex<Box<DecompressorOxide>>,
}

/// A member of a part, inflated.
type Inflated = (Part, usize, Arc<Vec<u8>>);

impl Recorded {
    /// Cuts the entries into pieces: `pieces` gives where each piece starts
    /// in the tar and how many bytes it holds, in order, covering the tar.
    pub fn cut(&mut self, pieces: impl IntoIterator<Item = (u64, u64)>) -> io::Result<()> {
        let mut next = 0;
        self.pieces.clear();
        for (start, len) in pieces {
            let first = next;
            while next < self.extents.len() && self.extents[next].0 < start + len {
                if self.extents[next].0 < start {
                    return Err(io::Error::other(
                        "an eStargz entry of the first pass starts outside its piece",
                    ));
                }
                next += 1;
            }
            self.pieces.push(first..next);
        }
        if next != self.extents.len() {
            return Err(io::Error::other(
                "eStargz entries of the first pass past its last piece",
            ));
        }
        Ok(())
    }

    /// Pieces cut.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Whether piece `i` holds an entry the layer leaves out (an earlier
    /// eStargz layer's TOC or landmark).
    pub fn left_out(&self, i: usize) -> bool {
        self.pieces
            .get(i)
            .is_some_and(|r| self.extents[r.clone()].iter().any(|(_, e)| e.is_none()))
    }

    /// The plain tar bytes of piece `i`, inflated from its members, into
    /// `out`; how many.
    pub fn piece(&self, i: usize, out: &mut impl Write) -> io::Result<u64> {
        let mut n = 0;
        for extent in self.extents(i)? {
            let extent = extent.ok_or_else(|| {
                io::Error::other("a piece holding an entry left out of the eStargz layer")
            })?;
            n += self.copy_plain(extent.part, extent.range.clone(), out)?;
        }
        Ok(n)
    }

    /// The entries of piece `i` (`None`: one left out).
    fn extents(&self, i: usize) -> io::Result<impl Iterator<Item = Option<&Extent>>> {
        let range = self
            .pieces
            .get(i)
            .ok_or_else(|| io::Error::other("a piece the eStargz first pass did not record"))?;
        Ok(self.extents[range.clone()].iter().map(|(_, e)| e.as_ref()))
    }

    /// Bytes `range` of `part`'s uncompressed stream into `out`, inflated
    /// member by member; how many.
    fn copy_plain(&self, part: Part, range: Range<u64>, out: &mut impl Write) -> io::Result<u64> {
        let members = &self.members[part as usize];
        let mut j = members.partition_point(|m| m.start + m.len <= range.start);
        let mut n = 0;
        while n < range.end - range.start {
            let m = members
                .get(j)
                .ok_or_else(|| io::Error::other("bytes past the end of the eStargz first pass"))?;
            let plain = self.inflate(part, j)?;
            let from = (range.start + n - m.start) as usize;
            let to = ((range.end - m.start) as usize).min(plain.len());
            out.write_all(&plain[from..to])?;
            n += (to - from) as u64;
            j += 1;
        }
        Ok(n)
    }

    /// Bytes `range` of `part`'s uncompressed stream.
    fn plain(&self, part: Part, range: Range<u64>) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        self.copy_plain(part, range, &mut out)?;
        Ok(out)
    }

    /// Member `j` of `part`, inflated.
    fn inflate(&self, part: Part, j: usize) -> io::Result<Arc<Vec<u8>>> {
        let mut cached = self.inflated.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, i, plain)) = cached.as_ref() {
            if (*p, *i) == (part, j) {
                return Ok(plain.clone());
            }
        }
        let m = &self.members[part as usize][j];
        let compressed = self.compressed(part, j)?;
        let mut inflater = self.inflater.lock().unwrap_or_else(|p| p.into_inner());
        let plain = inflate_member(&compressed, m.len as usize, &mut inflater)?;
        drop(inflater);
        let plain = Arc::new(plain);
        *cached = Some((part, j, plain.clone()));
        Ok(plain)
    }

    /// Member `j` of `part` as it was written.
    fn compressed(&self, part: Part, j: usize) -> io::Result<Vec<u8>> {
        let members = &self.members[part as usize];
        let start = match j {
            0 => 0,
            _ => members[j - 1].end,
        };
        let file = self.files[part as usize]
            .as_ref()
            .ok_or_else(|| io::Error::other("the eStargz first pass wrote no such part"))?;
        let mut bytes = vec![0u8; (members[j].end - start) as usize];
        file.read_exact_at(&mut bytes, start)?;
        Ok(bytes)
    }

    /// The member of `part` that is exactly `range`, if one is.
    fn exactly(&self, part: Part, range: &Range<u64>) -> Option<usize> {
        let members = &self.members[part as usize];
        let j = members.partition_point(|m| m.start < range.start);
        members
            .get(j)
            .filter(|m| m.start == range.start && m.start + m.len == range.end)
            .map(|_| j)
    }
}

impl Writer<BufWriter<File>> {
    /// A writer for pre-copy's first pass: the blob's parts into `front`
    /// and the spill (in `options.spill_dir`), each member and entry noted;
    /// no diff_id, no TOC ([`Writer::into_recorded`]).
    pub fn recording(front: File, options: super::Options) -> io::Result<Self> {
        Self::build(BufWriter::with_capacity(1 << 20, front), options, true)
    }

    /// Ends a recording: every member written, where each entry lies.
    pub fn into_recorded(mut self) -> io::Result<Recorded> {
        self.tar_ended()?;
        self.end_recorded_entry();
        for part in [Part::Front, Part::Rest] {
            self.close_member(part)?;
            self.dispatch(part)?;
        }
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        let recording = self
            .recording
            .take()
            .ok_or_else(|| io::Error::other("an eStargz writer that did not record"))?;
        let front = self.out.into_inner().map_err(|e| e.into_error())?;
        let rest = match self.spill.take() {
            Some(spill) => Some(spill.file.into_inner().map_err(|e| e.into_error())?),
            None => None,
        };
        let [front_state, rest_state] = std::mem::take(&mut self.parts);
        let pieces = (0..recording.extents.len()).map(|i| i..i + 1).collect();
        Ok(Recorded {
            files: [Some(front), rest],
            tocs: [front_state.toc, rest_state.toc],
            members: recording.members,
            extents: recording.extents,
            pieces,
            inflated: Mutex::new(None),
            inflater: Mutex::new(Box::default()),
        })
    }
}

impl<W: Write> Writer<W> {
    /// A recording notes that an entry starts here, at `start` in the tar
    /// (`None`: one left out); the entry before it ends.
    pub(super) fn record_entry(&mut self, start: u64, entry: Option<(Part, Routed)>) {
        if self.recording.is_none() {
            return;
        }
        self.end_recorded_entry();
        let started = entry.map(|(part, routed)| {
            let state = &self.parts[part as usize];
            Started {
                start,
                part,
                at: state.uncompressed,
                toc: state.toc.len(),
                routed,
            }
        });
        if let Some(r) = self.recording.as_mut() {
            match started {
                Some(s) => r.started = Some(s),
                None => r.extents.push((start, None)),
            }
        }
    }

    /// The entry being recorded ends where its part's stream stands.
    fn end_recorded_entry(&mut self) {
        let Some(started) = self.recording.as_mut().and_then(|r| r.started.take()) else {
            return;
        };
        let state = &self.parts[started.part as usize];
        let extent = Extent {
            part: started.part,
            range: started.at..state.uncompressed,
            toc: started.toc..state.toc.len(),
            routed: started.routed,
        };
        if let Some(r) = self.recording.as_mut() {
            r.extents.push((started.start, Some(extent)));
        }
    }

    /// A writer given the final tar twice ([`Writer::twice`]) that takes
    /// pieces of the first pass `from` ([`Writer::splice`]).
    pub fn splicing(mut self, from: Arc<Recorded>) -> Self {
        self.splicing = Some(from);
        self
    }

    /// Piece `i` of the first pass, as it stands, in place of its tar bytes
    /// (between entries of the tar given).
    pub fn splice(&mut self, i: usize) -> io::Result<()> {
        if self.order == super::Order::Spilled {
            // the rest's hash is taken from the spill: nothing is spliced into it
            return Err(io::Error::other(
                "splicing into an eStargz writer given the tar once",
            ));
        }
        let from = self.first()?;
        self.tar_ended()?;
        for extent in from.extents(i)?.flatten() {
            self.splice_entry(&from, extent)?;
        }
        Ok(())
    }

    fn first(&self) -> io::Result<Arc<Recorded>> {
        self.splicing
            .clone()
            .ok_or_else(|| io::Error::other("an eStargz writer given no first pass"))
    }

    /// One entry of a piece [`Writer::splice`] takes: its span of the first
    /// pass's stream, a member starting at each of its chunks.
    fn splice_entry(&mut self, from: &Recorded, extent: &Extent) -> io::Result<()> {
        let r = &extent.routed;
        let part = extent.part;
        let now = self.route_of(r.kind, &r.clean, &r.link, r.size);
        let taken = match self.order {
            super::Order::TwiceFront => now == Part::Front,
            _ => now == Part::Rest,
        };
        if now != part {
            // its bytes (a file of at most PREFETCH_FILE_MAX, or no data)
            let bytes = from.plain(part, extent.range.clone())?;
            self.write_all(&bytes)?;
            self.spliced.rerouted += u64::from(taken);
            return self.tar_ended();
        }
        self.route(r.kind, &r.clean, &r.link, r.size);
        if !taken {
            return Ok(());
        }
        // its TOC entries; their offsets are set as their members are written
        let base = self.parts[part as usize].toc.len();
        for entry in &from.tocs[part as usize][extent.toc.clone()] {
            let mut entry = entry.clone();
            entry.offset = 0;
            self.parts[part as usize].toc.push(entry);
        }
        let members = &from.members[part as usize];
        let first = members.partition_point(|m| m.start <= extent.range.start);
        let mut at = extent.range.start;
        for m in members[first..]
            .iter()
            .take_while(|m| m.start < extent.range.end)
        {
            let Some((toc, len, whole_file)) = m.chunk else {
                continue;
            };
            self.append_first(part, at..m.start)?;
            let entry = base + toc - extent.toc.start;
            self.start_chunk(part, entry, len as u64, whole_file)?;
            at = m.start;
        }
        self.append_first(part, at..extent.range.end)
    }

    /// Bytes `range` of the first pass's stream of `part`, at the end of
    /// the member being filled, not read while they are all it holds.
    fn append_first(&mut self, part: Part, range: Range<u64>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let state = &mut self.parts[part as usize];
        state.uncompressed += range.end - range.start;
        let open = state
            .open
            .get_or_insert_with(|| Member::new(0, None, false));
        match &mut open.from {
            Some(from) if from.end == range.start => {
                from.end = range.end;
                return Ok(());
            }
            None if open.buf.is_empty() => {
                open.from = Some(range);
                return Ok(());
            }
            _ => {}
        }
        self.materialize(part)?;
        let bytes = self.first()?.plain(part, range)?;
        if let Some(open) = self.parts[part as usize].open.as_mut() {
            open.buf.extend_from_slice(&bytes);
        }
        Ok(())
    }

    /// The member being filled, if it is the first pass's bytes not read
    /// yet, read: other bytes follow them.
    pub(super) fn materialize(&mut self, part: Part) -> io::Result<()> {
        let Some(range) = self.parts[part as usize]
            .open
            .as_mut()
            .and_then(|m| m.from.take())
        else {
            return Ok(());
        };
        let bytes = self.first()?.plain(part, range)?;
        self.spliced.remade += 1;
        if let Some(open) = self.parts[part as usize].open.as_mut() {
            open.buf = bytes;
        }
        Ok(())
    }

    /// Closing `member`, which is the first pass's bytes `range`: the first
    /// pass's member as it is if it is exactly one (inflated for the
    /// diff_id on its thread, when `hashed`), else read to be compressed
    /// again.
    pub(super) fn close_spliced(
        &mut self,
        part: Part,
        member: &mut Member,
        range: Range<u64>,
        hashed: bool,
    ) -> io::Result<()> {
        let from = self.first()?;
        match from.exactly(part, &range) {
            Some(j) => {
                let written = &from.members[part as usize][j];
                let compressed = Arc::new(from.compressed(part, j)?);
                if hashed {
                    if let Some(diff) = self.diff.as_mut() {
                        diff.member(Arc::clone(&compressed), written.len as usize)?;
                    }
                }
                member.compressed = Some((compressed, written.digest));
                self.spliced.copied += 1;
            }
            None => {
                member.buf = from.plain(part, range)?;
                self.spliced.remade += 1;
                if hashed {
                    if let Some(diff) = self.diff.as_mut() {
                        diff.plain(&member.buf)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// What [`Writer::splice`] did so far.
    pub fn spliced(&self) -> Spliced {
        self.spliced
    }
}
