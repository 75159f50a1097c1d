//! Pre-copy's eStargz: the blob's members are written once, while the
//! desktop runs, and copied after the resume.
//!
//! The first pass runs the writer as a snapshot without pre-copy would
//! ([`Writer::recording`]): the part before the landmark into one file, the
//! rest into the spill, every member compressed there. Since every entry
//! starts a member of its own, each entry of the tar is a run of whole
//! members of one part; the recording notes the run ([`Extent`]), how the
//! entry was routed and where it started in the tar. The first pass's
//! pieces (one per path of the upper directory: a directory and its opaque
//! marker are two entries of one piece) are then cut from them
//! ([`Recorded::cut`]). After the resume, a writer given the final tar
//! twice ([`Writer::twice`]) takes each piece that stands as it is
//! ([`Writer::splice`]): each of its entries routed where the first pass put
//! it has its members copied and its TOC entries moved to where they now
//! lie; one routed elsewhere (the prefetch budget moved) is inflated and
//! written again.
//! Entries read again under the pause are given as plain tar bytes, as to
//! any writer. The diff_id's hash still sees every byte of the blob: the
//! copied members are inflated for it, as the spill is without pre-copy.

use super::{Part, TocEntry, Writer};
use std::{
    fs::File,
    io::{self, BufWriter, Read, Write},
    ops::Range,
    os::unix::fs::FileExt,
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

/// One entry of the first pass: the members of its part that hold it, how
/// many uncompressed bytes they hold, its TOC entries in that part's TOC.
#[derive(Debug, Clone)]
pub(super) struct Extent {
    part: Part,
    members: Range<usize>,
    uncompressed: u64,
    toc: Range<usize>,
    routed: Routed,
}

/// The entry being recorded: where it started.
struct Started {
    start: u64,
    part: Part,
    member: usize,
    uncompressed: u64,
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
    /// Where each member of each part ends in the part's stream.
    ends: [Vec<u64>; 2],
}

impl Recording {
    /// The members of a job just written into `part` from `offset` on.
    pub(super) fn members_written(
        &mut self,
        part: Part,
        offset: u64,
        members: &[(usize, Option<[u8; 32]>)],
    ) {
        let ends = &mut self.ends[part as usize];
        let mut at = offset;
        for (len, _) in members {
            at += *len as u64;
            ends.push(at);
        }
    }
}

/// How the entries of a first pass went into the layer after the resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Entries whose members were copied.
    pub copied: u64,
    /// Entries routed elsewhere than in the first pass, written again.
    pub rewritten: u64,
}

/// The first pass's blob parts and where each entry lies in them.
pub struct Recorded {
    front: File,
    rest: Option<File>,
    tocs: [Vec<TocEntry>; 2],
    ends: [Vec<u64>; 2],
    extents: Vec<(u64, Option<Extent>)>,
    /// The entries of each piece ([`Recorded::cut`]).
    pieces: Vec<Range<usize>>,
}

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

    /// The compressed bytes of `extent` in its part's file.
    fn compressed(&self, extent: &Extent) -> Range<u64> {
        let ends = &self.ends[extent.part as usize];
        let at = |m: usize| if m == 0 { 0 } else { ends[m - 1] };
        at(extent.members.start)..at(extent.members.end)
    }

    fn file(&self, part: Part) -> io::Result<&File> {
        match part {
            Part::Front => Ok(&self.front),
            Part::Rest => self
                .rest
                .as_ref()
                .ok_or_else(|| io::Error::other("the first pass wrote no eStargz rest")),
        }
    }

    /// The plain tar bytes of piece `i`, its members inflated, into `out`;
    /// how many.
    pub fn piece(&self, i: usize, out: &mut impl Write) -> io::Result<u64> {
        let mut n = 0;
        for extent in self.extents(i)? {
            let extent = extent.ok_or_else(|| {
                io::Error::other("a piece holding an entry left out of the eStargz layer")
            })?;
            n += io::copy(&mut self.inflated(extent)?, out)?;
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

    fn inflated(&self, extent: &Extent) -> io::Result<impl Read + '_> {
        let range = self.compressed(extent);
        let section = Section {
            file: self.file(extent.part)?,
            at: range.start,
            end: range.end,
        };
        Ok(flate2::read::MultiGzDecoder::new(section).take(extent.uncompressed))
    }
}

impl Writer<BufWriter<File>> {
    /// A writer for pre-copy's first pass: the blob's parts into `front`
    /// and the spill (in `options.spill_dir`), each entry's members noted;
    /// no diff_id, no TOC ([`Writer::into_recorded`]).
    pub fn recording(front: File, options: super::Options) -> io::Result<Self> {
        let mut writer = Self::build(BufWriter::with_capacity(1 << 20, front), options)?;
        writer.diff = None;
        writer.recording = Some(Recording::default());
        Ok(writer)
    }

    /// Ends a recording: every member written, where each entry lies.
    pub fn into_recorded(mut self) -> io::Result<Recorded> {
        self.tar_ended()?;
        self.end_recorded_entry()?;
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
            front,
            rest,
            tocs: [front_state.toc, rest_state.toc],
            ends: recording.ends,
            extents: recording.extents,
            pieces,
        })
    }
}

impl<W: Write> Writer<W> {
    /// A recording notes that an entry starts here, at `start` in the tar
    /// (`None`: one left out); the entry before it ends.
    pub(super) fn record_entry(
        &mut self,
        start: u64,
        entry: Option<(Part, Routed)>,
    ) -> io::Result<()> {
        if self.recording.is_none() {
            return Ok(());
        }
        self.end_recorded_entry()?;
        let Some((part, routed)) = entry else {
            if let Some(r) = self.recording.as_mut() {
                r.extents.push((start, None));
            }
            return Ok(());
        };
        let state = &self.parts[part as usize];
        let started = Started {
            start,
            part,
            member: state.members,
            uncompressed: state.uncompressed,
            toc: state.toc.len(),
            routed,
        };
        if let Some(r) = self.recording.as_mut() {
            r.started = Some(started);
        }
        Ok(())
    }

    /// The entry being recorded ends: its last member is closed.
    fn end_recorded_entry(&mut self) -> io::Result<()> {
        let Some(started) = self.recording.as_mut().and_then(|r| r.started.take()) else {
            return Ok(());
        };
        self.close_member(started.part)?;
        let state = &self.parts[started.part as usize];
        let extent = Extent {
            part: started.part,
            members: started.member..state.members,
            uncompressed: state.uncompressed - started.uncompressed,
            toc: started.toc..state.toc.len(),
            routed: started.routed,
        };
        if let Some(r) = self.recording.as_mut() {
            r.extents.push((started.start, Some(extent)));
        }
        Ok(())
    }

    /// Piece `i` of the first pass `from`, as it stands, in place of its
    /// tar bytes (between entries of the tar given). Each of its entries
    /// routed where the first pass put it has its members copied; the
    /// others are inflated and written as any entry.
    pub fn splice(&mut self, from: &Recorded, i: usize) -> io::Result<()> {
        if self.order == super::Order::Spilled {
            // the rest's hash is taken from the spill: nothing is spliced into it
            return Err(io::Error::other(
                "splicing into an eStargz writer given the tar once",
            ));
        }
        self.tar_ended()?;
        for extent in from.extents(i)?.flatten() {
            self.splice_entry(from, extent)?;
        }
        Ok(())
    }

    /// One entry of a piece [`Writer::splice`] takes.
    fn splice_entry(&mut self, from: &Recorded, extent: &Extent) -> io::Result<()> {
        let r = &extent.routed;
        let part = self.route_of(r.kind, &r.clean, &r.link, r.size);
        if part != extent.part {
            let mut bytes = from.inflated(extent)?;
            io::copy(&mut bytes, self)?;
            self.spliced.rewritten += 1;
            return self.tar_ended();
        }
        self.route(r.kind, &r.clean, &r.link, r.size);
        let taken = match self.order {
            super::Order::TwiceFront => part == Part::Front,
            _ => part == Part::Rest,
        };
        if !taken {
            return Ok(());
        }
        // what is compressed before it is written before it
        self.close_member(part)?;
        self.dispatch(part)?;
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        let range = from.compressed(extent);
        let file = from.file(part)?;
        let base = self.parts[part as usize].written;
        let mut buf = vec![0u8; (range.end - range.start).min(1 << 20) as usize];
        let mut at = range.start;
        while at < range.end {
            let n = ((range.end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            self.sink(part)?.write_all(&buf[..n])?;
            at += n as u64;
        }
        if let Some(diff) = self.diff.as_mut() {
            let inflated = io::copy(&mut from.inflated(extent)?, diff)?;
            if inflated != extent.uncompressed {
                return Err(io::Error::other(
                    "an eStargz entry of the first pass does not inflate whole",
                ));
            }
        }
        let state = &mut self.parts[part as usize];
        for entry in &from.tocs[part as usize][extent.toc.clone()] {
            let mut entry = entry.clone();
            if entry.has_data() {
                entry.offset = entry.offset - range.start + base;
            }
            state.toc.push(entry);
        }
        state.written += range.end - range.start;
        state.uncompressed += extent.uncompressed;
        state.members += extent.members.len();
        self.spliced.copied += 1;
        Ok(())
    }

    /// What [`Writer::splice`] did so far.
    pub fn spliced(&self) -> Spliced {
        self.spliced
    }
}

/// Bytes `at..end` of `file`.
struct Section<'a> {
    file: &'a File,
    at: u64,
    end: u64,
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
                "the eStargz first pass's file ended early",
            ));
        }
        self.at += n as u64;
        Ok(n)
    }
}
