//! Pre-copy: the desktop is frozen only for what changed while its snapshot
//! was taken. The upper directory is read and compressed while the desktop
//! runs, in [pieces](crate::layer::pieces), each entry's stamp (inode, ctime,
//! size, type, links) noted as it is opened. Then the task is paused, the
//! directory's metadata walked once more, and only what is new, changed or
//! gone since the first pass is read again, into a plain side file; the task
//! resumes. The layer is put together after the resume: the first pass's
//! groups copied as they are where nothing in them moved, the rest mended
//! with what was read under the pause. It equals, entry for entry, the
//! upper directory as it stood at the pause: what a snapshot read entirely
//! under the pause gives. An eStargz layer's first pass writes the blob's
//! own members instead of pieces ([`estargz::Recorded`]); after the resume
//! each entry that stands is copied from them ([`assemble_estargz`]).
//!
//! What makes an entry of the first pass stale ([`again`], pure):
//! - it is gone, or its stamp differs at the pause (any write, truncation,
//!   attribute or link change, rename onto it moves its ctime);
//! - its ctime was within [`RACY`] of the moment it was stamped: a change in
//!   the same tick of the file system's clock could leave the ctime as it was
//!   (git's "racily clean" entries);
//! - it changed while it was read (a file that shrank, an entry that could
//!   not be opened: the walk of the first pass never fails on the desktop's
//!   own changes);
//! - it is one path of a file with several links, and any path of that file
//!   moved: all its paths are read again, so that the first of them in the
//!   layer holds the data and the others link to it.
//!
//! New entries are read; gone ones are left out. A directory whose listing
//! changed has a new ctime: its own entry is written again, its children
//! are judged one by one.
//!
//! An increment ([`increment`]) is pre-copied the same way: the first pass
//! writes the layer of what changed since the last capture as a scan just
//! before it selects; under the pause the selection is made again from the
//! record then, and what that layer holds ([`layer_of`]) is compared with
//! the first pass: an entry also stands only if it is written in the same
//! form (a directory picked alone or with everything below, [`Pick`]), an
//! explicit whiteout only if the entry is still gone; what the first pass
//! wrote and the layer no longer holds is left out.

use crate::{
    capture::{
        beneath::Meta,
        increment::{self, Pick, Selection},
        record::{self, Record},
        upper::{self, Cuts, Upper},
    },
    image::spool::TooLarge,
    layer::{
        estargz,
        pieces::{self, Group, Index, Piece, Pieces, Step, Stream, Unit},
        Hashing,
    },
};
use anyhow::{Context, Result};
use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

/// Most entries a first pass keeps (it holds about 200 bytes for each: its
/// key, stamp and place in the pieces): past it the first pass stops and the
/// change is read under the pause as without pre-copy, so that a desktop of
/// a million files stays within the sidecar's memory limit.
pub const MAX_ENTRIES: usize = 200_000;

/// Entries whose ctime is this close to the moment they were stamped are
/// read again under the pause, whatever their stamp says then (more than a
/// tick of the coarse clock file times come from).
pub const RACY_NS: i128 = 20_000_000;

/// What decides whether an entry moved: its inode, ctime, size, type, links
/// and device numbers (a whiteout is a character device 0:0), and how the
/// layer writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub ino: u64,
    pub ctime_ns: i128,
    pub size: u64,
    /// `st_mode & S_IFMT` (0 for an explicit whiteout, [`Stamp::WHITEOUT`]).
    pub kind: u32,
    pub nlink: u64,
    pub rdev: u64,
    /// A directory alone ([`Pick::Entry`]: no opaque marker), or with its
    /// marker and everything below ([`Pick::Whole`], as a full layer writes
    /// every entry).
    pub pick: Pick,
}

impl Stamp {
    /// An increment's explicit whiteout of an entry gone since the last
    /// capture: no inode, its bytes its path's alone.
    pub const WHITEOUT: Stamp = Stamp {
        ino: 0,
        ctime_ns: 0,
        size: 0,
        kind: 0,
        nlink: 0,
        rdev: 0,
        pick: Pick::Entry,
    };

    pub fn of(meta: &Meta, pick: Pick) -> Self {
        Self {
            ino: meta.ino,
            ctime_ns: meta.ctime_ns,
            size: meta.size,
            kind: meta.mode & libc::S_IFMT,
            nlink: meta.nlink,
            rdev: meta.rdev,
            pick,
        }
    }

    /// The same of a [`record`] stamp.
    pub fn recorded(stamp: &record::Stamp, pick: Pick) -> Self {
        Self {
            ino: stamp.ino,
            ctime_ns: stamp.ctime_sec as i128 * 1_000_000_000 + stamp.ctime_nsec as i128,
            size: stamp.size,
            kind: stamp.mode & libc::S_IFMT,
            nlink: stamp.nlink.into(),
            rdev: stamp.rdev,
            pick,
        }
    }

    /// A regular file with several names.
    fn linked(&self) -> bool {
        self.kind == libc::S_IFREG && self.nlink > 1
    }
}

/// An entry as the first pass saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its key ([`record`]'s: its path below the upper directory, names
    /// joined by NUL, so that byte order is the layer's).
    pub path: Vec<u8>,
    pub stamp: Stamp,
    /// When it was stamped (ns since the epoch, the clock of file times).
    pub at_ns: i128,
    /// It changed while it was read.
    pub damaged: bool,
}

/// What the pause must do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Again {
    /// For each entry of the first pass: whether it stands as it was read.
    pub valid: Vec<bool>,
    /// Keys to read under the pause, in the layer's order.
    pub paths: Vec<Vec<u8>>,
}

/// Compares the first pass (`seen`, in the layer's order) with the upper
/// directory's metadata at the pause (`now`: every entry but the root the
/// layer holds then, [`layer_of`]).
/// Every path of a file with several links is read when one is, so the
/// walk that reads them writes the data at the first and links the others.
pub fn again(seen: &[Seen], now: &[(&[u8], Stamp)], racy_ns: i128) -> Again {
    let now_by_path: HashMap<&[u8], &Stamp> = now.iter().map(|(p, s)| (*p, s)).collect();
    let mut valid: Vec<bool> = seen
        .iter()
        .map(|s| {
            !s.damaged
                && s.stamp.ctime_ns < s.at_ns - racy_ns
                && now_by_path.get(s.path.as_slice()) == Some(&&s.stamp)
        })
        .collect();
    let seen_paths: HashMap<&[u8], usize> = seen
        .iter()
        .enumerate()
        .map(|(i, s)| (s.path.as_slice(), i))
        .collect();
    // files with several links: their paths then and now, in the layer's order
    let mut groups_now: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
    for (path, stamp) in now.iter().filter(|(_, s)| s.linked()) {
        groups_now.entry(stamp.ino).or_default().push(*path);
    }
    let mut groups_then: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, s) in seen.iter().enumerate().filter(|(_, s)| s.stamp.linked()) {
        groups_then.entry(s.stamp.ino).or_default().push(i);
    }
    let mut read: Vec<&[u8]> = now
        .iter()
        .filter(|(p, _)| seen_paths.get(p).is_none_or(|&i| !valid[i]))
        .map(|(p, _)| *p)
        .collect();
    for (ino, paths) in groups_now {
        let then: Vec<&[u8]> = groups_then
            .remove(&ino)
            .unwrap_or_default()
            .into_iter()
            .filter(|&i| valid[i])
            .map(|i| seen[i].path.as_slice())
            .collect();
        let stands = paths.iter().all(|p| {
            seen_paths
                .get(p)
                .is_some_and(|&i| valid[i] && seen[i].stamp.ino == ino)
        }) && then.len() == paths.len();
        if !stands {
            for p in &paths {
                if let Some(&i) = seen_paths.get(p) {
                    if valid[i] {
                        valid[i] = false;
                        read.push(p);
                    }
                }
            }
        }
    }
    // a linked file of the first pass none of whose paths is linked now
    for (_, indexes) in groups_then {
        for i in indexes {
            if valid[i] {
                valid[i] = false;
                read.push(&seen[i].path);
            }
        }
    }
    read.sort_unstable();
    read.dedup();
    Again {
        valid,
        paths: read.into_iter().map(<[u8]>::to_vec).collect(),
    }
}

/// The first pass: the pieces (in an unnamed file of the work directory),
/// their index, and each entry as it was stamped.
pub struct FirstPass {
    pub file: File,
    pub index: Index,
    pub seen: Vec<Seen>,
    pub unit: Unit,
    /// An empty unnamed file of the work directory, made before the pause
    /// for what the pause reads again: creating a file is a journal
    /// operation, which may wait behind the writeback of the pieces just
    /// written (ext4's ordered mode), and nothing under the pause should.
    spare: File,
    /// eStargz: the blob's members, written by the first pass in place of
    /// its plain tar (`file` then holds nothing, `index` says where each
    /// entry was in the tar).
    pub estargz: Option<std::sync::Arc<estargz::Recorded>>,
}

/// What the pause read again: the plain pieces of the entries read, which
/// entries of the first pass still stand, and the record of the upper
/// directory at the pause (what the layer holds), its racy entries marked.
pub struct Reread {
    pub file: File,
    pub index: Index,
    pub valid: Vec<bool>,
    pub record: Option<Record>,
    /// Entries read under the pause.
    pub read: usize,
    /// An increment's picks and explicit whiteouts at the pause.
    pub picked: usize,
    pub whiteouts: usize,
}

/// The entries of the layer `selection` gives over `record` (`None`: the
/// full layer), each with its stamp as [`again`] compares it: the picks, in
/// their form; everything below a [`Pick::Whole`] directory, whole too; the
/// explicit whiteouts ([`Stamp::WHITEOUT`]); in key order. Pure.
pub fn layer_of<'a>(
    selection: Option<&'a Selection>,
    record: &'a Record,
) -> Vec<(&'a [u8], Stamp)> {
    let mut layer: Vec<_> = entries_of(selection, record).collect();
    if selection.is_some() {
        layer.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    layer
}

/// How many entries [`layer_of`] holds, without making it.
pub fn layer_len(selection: Option<&Selection>, record: &Record) -> usize {
    match selection {
        None => record.len(),
        Some(_) => entries_of(selection, record).count(),
    }
}

/// [`layer_of`]'s entries, in no particular order (the record's, without
/// a selection).
fn entries_of<'a>(
    selection: Option<&'a Selection>,
    record: &'a Record,
) -> Box<dyn Iterator<Item = (&'a [u8], Stamp)> + 'a> {
    let Some(selection) = selection else {
        return Box::new(
            record
                .iter()
                .map(|(key, stamp)| (key, Stamp::recorded(stamp, Pick::Whole))),
        );
    };
    let picked = selection.picks().flat_map(move |(key, pick)| {
        let own = record
            .get(key)
            .map(|stamp| (key, Stamp::recorded(stamp, pick)));
        let below = (pick == Pick::Whole)
            .then(|| {
                record
                    .below(key)
                    .map(|(k, stamp)| (k, Stamp::recorded(stamp, Pick::Whole)))
            })
            .into_iter()
            .flatten();
        own.into_iter().chain(below)
    });
    Box::new(picked.chain(selection.gone().map(|key| (key, Stamp::WHITEOUT))))
}

/// Where the first pass goes: its pieces, and what else sees its tar.
pub struct Output<'a> {
    pub unit: Unit,
    pub threads: usize,
    pub work_dir: &'a Path,
    /// Most bytes of the pieces.
    pub limit: u64,
    /// eStargz: the first pass writes the blob's members (its parts in the
    /// work directory, [`estargz::Writer::recording`]) and keeps no plain
    /// tar, only where each entry was in it and the tar's sha256 before
    /// each group ([`Pieces`]' index).
    pub estargz: Option<estargz::Options>,
}

/// Reads the upper directory (with `selection`, only the increment it
/// picks, [`upper::write_selected`]) into pieces while the desktop runs;
/// `None` past [`MAX_ENTRIES`] entries.
pub fn first_pass(
    upper: &Upper,
    selection: Option<&Selection>,
    into: Output<'_>,
) -> Result<Option<FirstPass>> {
    first_pass_of_at_most(upper, selection, into, MAX_ENTRIES)
}

fn first_pass_of_at_most(
    upper: &Upper,
    selection: Option<&Selection>,
    into: Output<'_>,
    most: usize,
) -> Result<Option<FirstPass>> {
    let unit = match into.estargz {
        Some(_) => Unit::Plain,
        None => into.unit,
    };
    let keep = into.estargz.is_none();
    let (file, mut collect) = collector_into(
        unnamed(into.work_dir)?,
        unit,
        into.threads,
        into.limit,
        keep,
    )?;
    collect.most = most;
    let mut writer = match into.estargz {
        Some(options) => {
            let options = estargz::Options {
                spill_dir: into.work_dir.to_path_buf(),
                spill_limit: into.limit,
                ..options
            };
            let front = unnamed(into.work_dir)?;
            Some(
                estargz::Writer::recording(front, options)
                    .context("starting the eStargz writer")?,
            )
        }
        None => None,
    };
    let walked = match writer.as_mut() {
        Some(writer) => {
            let mut both = Both {
                first: &collect,
                then: writer,
            };
            upper::write_running(upper, selection, &collect, &mut both).map(drop)
        }
        None => upper::write_running(upper, selection, &collect, &mut &collect).map(drop),
    };
    match walked {
        Ok(_) => {}
        Err(_) if collect.state.borrow().overflow => return Ok(None),
        Err(e) => return Err(e),
    }
    let (index, mut seen) = collect.finish().context("writing the layer's pieces")?;
    let estargz = match writer {
        Some(writer) => {
            let mut recorded = writer
                .into_recorded()
                .context("writing the eStargz layer")?;
            recorded
                .cut(index.entries.iter().map(|p| (p.start, p.len)))
                .context("cutting the eStargz layer into the first pass's pieces")?;
            anyhow::ensure!(
                recorded.len() == seen.len(),
                "the eStargz writer saw {} entries of the first pass, not {}",
                recorded.len(),
                seen.len()
            );
            // an entry the layer leaves out (named as an eStargz layer's own
            // files) has no members: read again under the pause, left out again
            for (i, s) in seen.iter_mut().enumerate() {
                s.damaged |= recorded.left_out(i);
            }
            Some(std::sync::Arc::new(recorded))
        }
        None => None,
    };
    Ok(Some(FirstPass {
        file,
        index,
        seen,
        unit,
        spare: unnamed(into.work_dir)?,
        estargz,
    }))
}

/// The first pass's tar into its pieces' index and into the eStargz writer.
struct Both<'f, 'w, W: Write, E: Write> {
    first: &'f Collect<W>,
    then: &'w mut E,
}

impl<W: Write, E: Write> Write for Both<'_, '_, W, E> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (&mut &*self.first).write(data)?;
        self.then.write_all(&data[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Under the pause: the metadata walked once more ([`record::scan`]), and
/// what moved since the first pass read again. With `last`, the record of
/// the last capture, the layer is the increment over it selected now
/// ([`increment::select`]); past [`MAX_ENTRIES`] entries in the layer, it
/// is read whole here.
pub fn under_pause(
    upper: &Upper,
    first: &FirstPass,
    last: Option<&Record>,
    work_dir: &Path,
    limit: u64,
) -> Result<Reread> {
    under_pause_of_at_most(upper, first, last, work_dir, limit, MAX_ENTRIES)
}

fn under_pause_of_at_most(
    upper: &Upper,
    first: &FirstPass,
    last: Option<&Record>,
    work_dir: &Path,
    limit: u64,
    most: usize,
) -> Result<Reread> {
    let since = record::racy_since();
    let mut record = record::scan(&upper.dir, upper.userxattr)?;
    record.mark_racy(since);
    let selection = last.map(|last| increment::select(last, &record));
    let (picked, whiteouts) = selection
        .as_ref()
        .map_or((0, 0), |s| (s.picks().count(), s.gone().count()));
    let entries = layer_len(selection.as_ref(), &record);
    if entries > most {
        let (file, index) = whole(upper, selection.as_ref(), work_dir, limit)?;
        return Ok(Reread {
            file,
            index,
            valid: vec![false; first.seen.len()],
            record: Some(record),
            read: entries,
            picked,
            whiteouts,
        });
    }
    let now = layer_of(selection.as_ref(), &record);
    let again = again(&first.seen, &now, RACY_NS);
    drop(now);
    let spare = first
        .spare
        .try_clone()
        .context("the file for what the pause reads again")?;
    let (file, collect) = collector_into(spare, Unit::Plain, 1, limit, true)?;
    upper::write_entries(upper, &again.paths, selection.as_ref(), &collect, &collect)?;
    let (index, _) = collect.finish().context("writing what changed")?;
    Ok(Reread {
        file,
        index,
        valid: again.valid,
        record: Some(record),
        read: again.paths.len(),
        picked,
        whiteouts,
    })
}

/// The whole layer of `selection`, plain, as one piece that comes before
/// everything (its key the root's): with every entry of the first pass
/// stale, the assembly is this piece and the tar's end.
fn whole(
    upper: &Upper,
    selection: Option<&Selection>,
    work_dir: &Path,
    limit: u64,
) -> Result<(File, Index)> {
    let file = plain(work_dir, limit, |out| {
        upper::write_selected(upper, selection, out).map(drop)
    })?;
    let len = file
        .metadata()
        .context("the size of the layer's tar")?
        .len()
        .checked_sub(TAR_END)
        .context("the layer's tar has no end")?;
    let index = Index {
        entries: vec![Piece {
            key: Vec::new(),
            start: 0,
            len,
            group: 0,
        }],
        groups: vec![Group {
            first: 0,
            plain_start: 0,
            compressed_start: 0,
            compressed_len: len,
            hash_before: Default::default(),
        }],
        plain_len: len,
        compressed_len: len,
        hash_end: Default::default(),
    };
    Ok((file, index))
}

/// The bytes of a tar's end (two zero blocks), which [`pieces::assemble`]
/// writes itself.
const TAR_END: u64 = 1024;

/// After the resume: the layer tar, from the first pass's pieces and what
/// the pause read again, into `out` (of the first pass's unit); its diff_id
/// with `hash`.
pub fn assemble<S: Write>(
    first: &FirstPass,
    reread: &Reread,
    out: &mut Pieces<S>,
    hash: bool,
) -> Result<Option<String>> {
    let (old, again) = streams(first, reread);
    pieces::assemble(old, &reread.valid, again, out, hash).context("putting the layer together")
}

/// The first pass's pieces and what the pause read again (plain), as the
/// assembly reads them.
fn streams<'a>(first: &'a FirstPass, reread: &'a Reread) -> (Stream<'a>, Stream<'a>) {
    let old = Stream {
        index: &first.index,
        file: &first.file,
        unit: first.unit,
    };
    let again = Stream {
        index: &reread.index,
        file: &reread.file,
        unit: Unit::Plain,
    };
    (old, again)
}

/// After the resume: the eStargz blob of the layer at the pause, into
/// `out`, from the members the first pass wrote ([`FirstPass::estargz`]):
/// each entry that stands is copied as it is
/// ([`estargz::Writer::splice`]), each entry read again is written from
/// its bytes. Also the plain tar's sha256 (the layer's `change`), resumed
/// where the first change is, on a thread of its own.
pub fn assemble_estargz<W: Write>(
    first: &FirstPass,
    reread: &Reread,
    options: estargz::Options,
    out: W,
) -> Result<(W, String, estargz::Done, estargz::Spliced)> {
    let recorded = first
        .estargz
        .as_ref()
        .context("the first pass wrote no eStargz layer")?;
    let keys: Vec<&[u8]> = reread
        .index
        .entries
        .iter()
        .map(|p| p.key.as_slice())
        .collect();
    let steps = pieces::plan(&first.index, &reread.valid, &keys);
    // the layer's entries in the tar's order: those of the first pass that
    // stand, those read again
    let entries: Vec<Step> = steps
        .iter()
        .flat_map(|step| match *step {
            Step::Copy(g) => first.index.group_entries(g).map(Step::Old).collect(),
            other => vec![other],
        })
        .collect();
    std::thread::scope(|scope| {
        let change = std::thread::Builder::new()
            .name("change-sha256".into())
            .spawn_scoped(scope, || change_of(first, reread, recorded, &steps))
            .context("starting the layer's sha256")?;
        let mut writer = estargz::Writer::twice(out, options)
            .context("starting the eStargz writer")?
            .splicing(recorded.clone());
        let written = (|| -> io::Result<()> {
            for reading in 0..2 {
                if reading == 1 {
                    writer.second_pass()?;
                    if !writer.reads_again() {
                        return Ok(());
                    }
                }
                for step in &entries {
                    match *step {
                        Step::Old(e) => writer.splice(e)?,
                        Step::Again(r) => {
                            let piece = &reread.index.entries[r];
                            copy_range(&reread.file, piece.start, piece.len, &mut writer)?;
                        }
                        Step::Copy(_) => unreachable!("groups were opened into their entries"),
                    }
                }
            }
            Ok(())
        })();
        let spliced = writer.spliced();
        let finished = written.and_then(|()| writer.finish());
        let change = change
            .join()
            .map_err(|_| anyhow::anyhow!("the layer's sha256 panicked"))?
            .context("the layer's sha256")?;
        let (out, done) = finished.context("writing the eStargz layer")?;
        Ok((out, change, done, spliced))
    })
}

/// The sha256 of the layer's plain tar: resumed from the first pass's state
/// before the first group that is not copied in its place (nothing to read
/// when nothing moved), then every entry from there in the tar's order:
/// those that stand inflated from their members, those read again as they
/// are.
fn change_of(
    first: &FirstPass,
    reread: &Reread,
    recorded: &estargz::Recorded,
    steps: &[Step],
) -> io::Result<String> {
    let prefix = steps
        .iter()
        .enumerate()
        .take_while(|(i, s)| **s == Step::Copy(*i))
        .count();
    let state = match first.index.groups.get(prefix) {
        Some(g) => g.hash_before.clone(),
        None => first.index.hash_end.clone(),
    };
    let mut hashing = Hashing::resumed(io::sink(), state);
    let old = |e: usize, hashing: &mut Hashing<io::Sink>| -> io::Result<()> {
        let n = recorded.piece(e, hashing)?;
        if n != first.index.entries[e].len {
            return Err(io::Error::other(
                "an entry of the eStargz first pass does not inflate to its bytes",
            ));
        }
        Ok(())
    };
    for step in &steps[prefix..] {
        match *step {
            Step::Copy(g) => {
                for e in first.index.group_entries(g) {
                    old(e, &mut hashing)?;
                }
            }
            Step::Old(e) => old(e, &mut hashing)?,
            Step::Again(r) => {
                let piece = &reread.index.entries[r];
                copy_range(&reread.file, piece.start, piece.len, &mut hashing)?;
            }
        }
    }
    hashing.write_all(&[0u8; TAR_END as usize])?;
    Ok(hashing.finish().0)
}

/// `len` bytes of `file` from `start` into `out`.
fn copy_range(file: &File, start: u64, len: u64, out: &mut impl Write) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let (mut at, end) = (start, start + len);
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// A tar written by `write` into an unnamed file of `work_dir` (at most
/// `limit` bytes), plain: what is read under the pause, to be compressed
/// after the resume ([`copy_plain`]).
pub fn plain(
    work_dir: &Path,
    limit: u64,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<File> {
    let file = tempfile::tempfile_in(work_dir).with_context(|| {
        format!(
            "creating a file for the layer's tar in {}",
            work_dir.display()
        )
    })?;
    let mut sink = Limited {
        inner: BufWriter::with_capacity(1 << 20, file.try_clone()?),
        written: 0,
        limit,
        keep: true,
    };
    write(&mut sink)?;
    sink.flush().context("writing the layer's tar")?;
    Ok(file)
}

/// The tar [`plain`] wrote, into `out`.
pub fn copy_plain(mut file: File, out: &mut impl Write) -> Result<()> {
    use std::io::{Read, Seek};
    file.rewind().context("reading the layer's tar")?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).context("reading the layer's tar")?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
    }
}

/// An unnamed file of `work_dir` (gone when closed).
fn unnamed(work_dir: &Path) -> Result<File> {
    tempfile::tempfile_in(work_dir).with_context(|| {
        format!(
            "creating a file for the layer's pieces in {}",
            work_dir.display()
        )
    })
}

/// A collector writing pieces of `unit` into `file` (empty); without
/// `keep`, only their index is made, nothing written.
fn collector_into(
    file: File,
    unit: Unit,
    threads: usize,
    limit: u64,
    keep: bool,
) -> Result<(File, Collect<Limited<BufWriter<File>>>)> {
    let sink = Limited {
        inner: BufWriter::with_capacity(1 << 20, file.try_clone()?),
        written: 0,
        limit,
        keep,
    };
    let pieces = Pieces::new(sink, unit, threads, true).context("starting the compressors")?;
    Ok((
        file,
        Collect {
            state: RefCell::new(Collected {
                pieces,
                seen: Vec::new(),
                failed: false,
                overflow: false,
            }),
            most: usize::MAX,
        },
    ))
}

/// The walk's output (pieces) and what it tells of each entry (its stamp):
/// the walk writes into it and tells it where entries start.
struct Collect<W: Write> {
    state: RefCell<Collected<W>>,
    /// Most entries kept: past it, the walk stops (`overflow`).
    most: usize,
}

struct Collected<W: Write> {
    pieces: Pieces<W>,
    seen: Vec<Seen>,
    /// Writing failed: the walk stops.
    failed: bool,
    /// More entries than the most kept.
    overflow: bool,
}

impl<W: Write> Collect<W> {
    fn finish(self) -> io::Result<(Index, Vec<Seen>)> {
        let Collected { pieces, seen, .. } = self.state.into_inner();
        let (_, index) = pieces.finish()?;
        Ok((index, seen))
    }
}

impl<W: Write> Write for &Collect<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut c = self.state.borrow_mut();
        let written = c.pieces.write(data);
        c.failed |= written.is_err();
        written
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Collect<W> {
    /// An entry of `stamp` at `rel` starts here.
    fn start(&self, rel: &Path, stamp: Stamp, at_ns: i128) -> io::Result<()> {
        let mut c = self.state.borrow_mut();
        if c.seen.len() >= self.most {
            (c.failed, c.overflow) = (true, true);
            return Err(io::Error::other("too many entries to pre-copy"));
        }
        let key = record::path_key(rel);
        let begun = c.pieces.begin(key.clone());
        c.failed |= begun.is_err();
        begun?;
        c.seen.push(Seen {
            path: key,
            stamp,
            at_ns,
            damaged: false,
        });
        Ok(())
    }
}

impl<W: Write> Cuts for Collect<W> {
    fn begin(&self, rel: &Path, meta: &Meta, pick: Pick, at_ns: i128) -> io::Result<()> {
        self.start(rel, Stamp::of(meta, pick), at_ns)
    }

    fn whiteout(&self, rel: &Path) -> io::Result<()> {
        // no ctime to be racy: it stands while the entry stays gone
        self.start(rel, Stamp::WHITEOUT, i128::MAX)
    }

    fn damaged(&self) {
        if let Some(last) = self.state.borrow_mut().seen.last_mut() {
            last.damaged = true;
        }
    }

    fn end(&self) {
        self.state.borrow_mut().pieces.seal();
    }

    fn failed(&self) -> bool {
        self.state.borrow().failed
    }
}

/// A file that refuses to grow past `limit` bytes (the node's disk is
/// shared); without `keep`, one that takes everything and keeps nothing.
struct Limited<W> {
    inner: W,
    written: u64,
    limit: u64,
    keep: bool,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.keep {
            return Ok(data.len());
        }
        if self.written + data.len() as u64 > self.limit {
            return Err(io::Error::other(TooLarge { limit: self.limit }));
        }
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, ctime: i128, size: u64) -> Stamp {
        Stamp {
            ino,
            ctime_ns: ctime,
            size,
            kind: libc::S_IFREG,
            nlink: 1,
            rdev: 0,
            pick: Pick::Whole,
        }
    }

    fn key(path: &str) -> Vec<u8> {
        record::path_key(Path::new(path))
    }

    fn seen(path: &str, stamp: Stamp) -> Seen {
        Seen {
            path: key(path),
            stamp,
            at_ns: 1_000_000_000_000,
            damaged: false,
        }
    }

    fn names(keys: &[Vec<u8>]) -> Vec<String> {
        keys.iter()
            .map(|k| record::key_path(k).to_string_lossy().into_owned())
            .collect()
    }

    fn again_of(first: &[Seen], now: &[(&str, Stamp)]) -> Again {
        let keys: Vec<(Vec<u8>, Stamp)> = now.iter().map(|(p, s)| (key(p), *s)).collect();
        let now: Vec<(&[u8], Stamp)> = keys.iter().map(|(k, s)| (k.as_slice(), *s)).collect();
        again(first, &now, RACY_NS)
    }

    #[test]
    fn what_is_read_again_under_the_pause() {
        let old = 1_000;
        let dir = |ino, ctime| Stamp {
            kind: libc::S_IFDIR,
            nlink: 2,
            ..stamp(ino, ctime, 4096)
        };
        let first = vec![
            seen("a", dir(1, old)),
            seen("a/same", stamp(2, old, 10)),
            seen("a/written", stamp(3, old, 10)),
            seen("a/gone", stamp(4, old, 10)),
            seen("b", stamp(5, old, 10)),
            Seen {
                damaged: true,
                ..seen("c", stamp(6, old, 10))
            },
            // stamped 10 ms after its last change: racily clean
            seen("d", stamp(7, 1_000_000_000_000 - 10_000_000, 10)),
            seen("e", dir(8, old)),
        ];
        let now = vec![
            ("a", dir(1, old + 5)),
            ("a/same", stamp(2, old, 10)),
            ("a/written", stamp(3, old + 7, 10)),
            ("a/new", stamp(9, old + 5, 1)),
            // same path, another inode: replaced
            ("b", stamp(10, old, 10)),
            ("c", stamp(6, old, 10)),
            ("d", stamp(7, 1_000_000_000_000 - 10_000_000, 10)),
            ("e", dir(8, old)),
        ];
        let got = again_of(&first, &now);
        assert_eq!(
            got.valid,
            [false, true, false, false, false, false, false, true]
        );
        assert_eq!(
            names(&got.paths),
            ["a", "a/new", "a/written", "b", "c", "d"]
        );
    }

    #[test]
    fn a_file_with_several_links_is_read_again_by_all_its_paths() {
        let linked = |ctime| Stamp {
            nlink: 2,
            ..stamp(5, ctime, 10)
        };
        let base = vec![
            seen("x/one", linked(1)),
            seen("x/two", linked(1)),
            seen("y", stamp(6, 1, 3)),
        ];
        // nothing moved: all stands, the first path holds the data
        let same: Vec<(&[u8], Stamp)> = base.iter().map(|s| (s.path.as_slice(), s.stamp)).collect();
        let got = again(&base, &same, RACY_NS);
        assert_eq!(got.valid, [true, true, true]);
        assert!(got.paths.is_empty());

        // one path renamed (the inode's ctime moves): every path read again
        let now = vec![
            ("a/moved", linked(2)),
            ("x/two", linked(2)),
            ("y", stamp(6, 1, 3)),
        ];
        let got = again_of(&base, &now);
        assert_eq!(got.valid, [false, false, true]);
        assert_eq!(names(&got.paths), ["a/moved", "x/two"]);

        // the first path was read damaged: the others follow it
        let mut damaged = base.clone();
        damaged[0].damaged = true;
        let got = again(&damaged, &same, RACY_NS);
        assert_eq!(got.valid, [false, false, true]);
        assert_eq!(names(&got.paths), ["x/one", "x/two"]);

        // a second link made to a file that had one: both paths read
        let single = vec![seen("p", stamp(7, 1, 3)), seen("q", stamp(8, 1, 3))];
        let twice = Stamp {
            nlink: 2,
            ..stamp(7, 2, 3)
        };
        let now = vec![("p", twice), ("q", stamp(8, 1, 3)), ("r", twice)];
        let got = again_of(&single, &now);
        assert_eq!(got.valid, [false, true]);
        assert_eq!(names(&got.paths), ["p", "r"]);

        // one of two links removed: the survivor is a plain file again, read again
        let now = vec![
            (
                "x/two",
                Stamp {
                    nlink: 1,
                    ..linked(3)
                },
            ),
            ("y", stamp(6, 1, 3)),
        ];
        let got = again_of(&base, &now);
        assert_eq!(got.valid, [false, false, true]);
        assert_eq!(names(&got.paths), ["x/two"]);
    }

    #[test]
    fn paths_to_read_come_in_the_layers_order() {
        let now = vec![
            ("a.b", stamp(1, 1, 1)),
            ("a/x", stamp(2, 1, 1)),
            ("a", stamp(3, 1, 1)),
        ];
        let got = again_of(&[], &now);
        assert_eq!(names(&got.paths), ["a", "a/x", "a.b"]);
    }

    /// `(path, kind, inode, ctime)`; kind: `f` file, `d` directory, `o`
    /// opaque directory.
    fn recorded(rows: &[(&str, char, u64, i64)]) -> Record {
        let mut r = Record::default();
        for &(path, kind, ino, ctime) in rows {
            let (mode, opaque) = match kind {
                'f' => (libc::S_IFREG, false),
                'd' => (libc::S_IFDIR, false),
                _ => (libc::S_IFDIR, true),
            };
            let stamp = record::Stamp::new(ino, (ctime, 0), 0, mode | 0o644, 1, 0, opaque);
            r.push(&key(path), stamp).unwrap();
        }
        r
    }

    #[test]
    fn what_the_layer_of_an_increment_holds() {
        let last = recorded(&[
            ("a", 'd', 1, 1),
            ("a/same", 'f', 2, 1),
            ("a/tmp", 'f', 3, 1),
            ("b", 'd', 4, 1),
            ("b/x", 'f', 5, 1),
            ("c", 'f', 6, 1),
        ]);
        let now = recorded(&[
            ("a", 'd', 1, 5),
            ("a/new", 'f', 7, 5),
            ("a/same", 'f', 2, 1),
            ("c", 'f', 6, 1),
            // made anew, opaque: whole, with everything below
            ("o", 'o', 8, 5),
            ("o/p", 'd', 9, 5),
            ("o/p/q", 'f', 10, 5),
        ]);
        let selection = increment::select(&last, &now);
        let layer = layer_of(Some(&selection), &now);
        let shown: Vec<(String, Option<Pick>)> = layer
            .iter()
            .map(|(k, s)| {
                let path = record::key_path(k).to_string_lossy().into_owned();
                (path, (*s != Stamp::WHITEOUT).then_some(s.pick))
            })
            .collect();
        let want: Vec<(String, Option<Pick>)> = [
            ("a", Some(Pick::Entry)),
            ("a/new", Some(Pick::Entry)),
            // made, pushed, deleted: its whiteout
            ("a/tmp", None),
            // a directory gone: its whiteout alone
            ("b", None),
            ("o", Some(Pick::Whole)),
            ("o/p", Some(Pick::Whole)),
            ("o/p/q", Some(Pick::Whole)),
        ]
        .into_iter()
        .map(|(p, f)| (p.to_string(), f))
        .collect();
        assert_eq!(shown, want);
        assert_eq!(layer_len(Some(&selection), &now), want.len());
        assert_eq!(
            layer[1].1,
            Stamp::recorded(now.get(&key("a/new")).unwrap(), Pick::Entry)
        );

        // a full layer: every entry, whole
        let full = layer_of(None, &now);
        assert_eq!(full.len(), now.len());
        assert_eq!(layer_len(None, &now), now.len());
        assert!(full.iter().all(|(_, s)| s.pick == Pick::Whole));
    }

    /// An entry of the first pass of an increment stands only in the same
    /// form: a directory picked alone then and whole now (or the reverse)
    /// is read again, a whiteout stands while its entry stays gone, and a
    /// whiteout whose entry came back gives way to the entry.
    #[test]
    fn an_increments_entries_stand_in_the_same_form_only() {
        let dir = |pick| Stamp {
            kind: libc::S_IFDIR,
            pick,
            ..stamp(1, 1, 0)
        };
        let entry = |pick| Stamp {
            pick,
            ..stamp(2, 1, 5)
        };
        let first = vec![
            seen("d", dir(Pick::Entry)),
            seen("d/f", entry(Pick::Entry)),
            seen("gone", Stamp::WHITEOUT),
            seen("back", Stamp::WHITEOUT),
            seen("dropped", stamp(3, 1, 1)),
        ];
        let now = vec![
            ("d", dir(Pick::Whole)),
            ("d/f", entry(Pick::Whole)),
            ("gone", Stamp::WHITEOUT),
            ("back", stamp(4, 1, 1)),
        ];
        let got = again_of(&first, &now);
        assert_eq!(got.valid, [false, false, true, false, false]);
        assert_eq!(names(&got.paths), ["back", "d", "d/f"]);
    }
}

/// The pre-copy on real trees: whatever moves between the first pass and the
/// pause, the assembled layer is the layer of the tree at the pause.
#[cfg(test)]
mod trees {
    use super::*;
    use crate::{image::new_layer::Codec, layer::Compression};
    use std::{
        fs,
        io::Read,
        os::unix::{ffi::OsStrExt, fs::FileExt},
        path::PathBuf,
    };

    pub(super) fn upper(dir: &Path) -> Upper {
        upper::upperdir(&[containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![format!("upperdir={}", dir.display())],
        }])
        .expect("an overlay mount")
    }

    fn write(path: PathBuf, data: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 4096) % 2 == 0 {
                    b"desktop text\n"[i % 13]
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn mknod_whiteout(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0,
            "mknod needs root"
        );
    }

    /// A desktop's change: small and large files, links, a whiteout, an
    /// opaque directory, attributes.
    fn tree(root: &Path) {
        for i in 0..300 {
            write(
                root.join(format!("etc/conf{i:03}")),
                format!("line {i}\n").as_bytes(),
            );
        }
        write(root.join("home/alice/big"), &noise(1, 3 << 20));
        write(root.join("home/alice/notes"), b"first notes");
        write(root.join("home/alice/same-size"), b"aaaaaaaa");
        write(root.join("home/alice/docs/a"), &noise(2, 200_000));
        write(root.join("home/alice/docs/b"), b"b");
        write(root.join("opt/app/bin"), &noise(3, 1_500_000));
        fs::hard_link(root.join("opt/app/bin"), root.join("opt/app/bin2")).unwrap();
        write(root.join("usr/one"), b"linked once");
        fs::hard_link(root.join("usr/one"), root.join("usr/two")).unwrap();
        std::os::unix::fs::symlink("/etc/conf001", root.join("link")).unwrap();
        mknod_whiteout(&root.join("etc/gone"));
        fs::create_dir_all(root.join("var/opaque")).unwrap();
        xattr::set(root.join("var/opaque"), "trusted.overlay.opaque", b"y").unwrap();
        write(root.join("var/opaque/x"), b"x");
        xattr::set(root.join("home/alice/notes"), "user.tag", b"v1").unwrap();
    }

    /// Everything a desktop may do between the first pass and the pause.
    fn change(root: &Path) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(root.join("home/alice/notes"))
            .unwrap();
        f.write_all(b" and more").unwrap();
        // in place, same size: only the ctime says it
        fs::OpenOptions::new()
            .write(true)
            .open(root.join("home/alice/same-size"))
            .unwrap()
            .write_all_at(b"bbbb", 2)
            .unwrap();
        fs::remove_file(root.join("etc/conf100")).unwrap();
        write(root.join("etc/conf100.new"), b"new");
        write(root.join("etc/new-dir/inside"), b"inside");
        fs::rename(root.join("home/alice/docs"), root.join("home/alice/papers")).unwrap();
        fs::rename(root.join("etc/conf200"), root.join("zz-moved")).unwrap();
        // the first of two links gone: the second holds the data now
        fs::remove_file(root.join("opt/app/bin")).unwrap();
        fs::hard_link(root.join("usr/one"), root.join("a-third-link")).unwrap();
        xattr::set(root.join("etc/conf050"), "user.changed", b"yes").unwrap();
        fs::create_dir_all(root.join("home/alice/newly-opaque")).unwrap();
        xattr::set(
            root.join("home/alice/newly-opaque"),
            "trusted.overlay.opaque",
            b"y",
        )
        .unwrap();
        mknod_whiteout(&root.join("etc/gone-too"));
        fs::remove_file(root.join("link")).unwrap();
        std::os::unix::fs::symlink("/elsewhere", root.join("link")).unwrap();
        fs::remove_file(root.join("etc/conf001")).unwrap();
        fs::create_dir(root.join("etc/conf001")).unwrap();
        let big = fs::OpenOptions::new()
            .write(true)
            .open(root.join("home/alice/big"))
            .unwrap();
        big.write_all_at(b"CHANGED", 2 << 20).unwrap();
    }

    fn decode(unit: Unit, blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match unit {
            Unit::Gzip(_) => flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap(),
            Unit::Zstd(_) => zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap(),
            Unit::Plain => {
                out.extend_from_slice(blob);
                0
            }
        };
        out
    }

    /// The whole pre-copy without containerd: first pass, `between`, the
    /// "pause", assembly; the layer's bytes (decoded), its diff_id, and how
    /// many entries were read again.
    fn precopy(root: &Path, unit: Unit, between: impl FnOnce()) -> (Vec<u8>, String, usize) {
        let (first, reread, _work) = passes(root, unit, between, None);
        let mut out = Pieces::new(Vec::new(), unit, 2, false).unwrap();
        let diff_id = assemble(&first, &reread, &mut out, true).unwrap().unwrap();
        let (blob, _) = out.finish().unwrap();
        (decode(unit, &blob), diff_id, reread.index.entries.len())
    }

    /// The first pass (eStargz members with `estargz`), `between`, the
    /// "pause": what the assembly takes, and the work directory it is in.
    fn passes(
        root: &Path,
        unit: Unit,
        between: impl FnOnce(),
        estargz: Option<crate::layer::estargz::Options>,
    ) -> (FirstPass, Reread, tempfile::TempDir) {
        let work = tempfile::tempdir().unwrap();
        let into = Output {
            estargz,
            ..output(unit, work.path())
        };
        let first = first_pass(&upper(root), None, into)
            .unwrap()
            .expect("few entries");
        between();
        let reread = under_pause(&upper(root), &first, None, work.path(), u64::MAX).unwrap();
        (first, reread, work)
    }

    /// A first pass into pieces of `unit` in `work`, on 2 threads, unbounded.
    pub(super) fn output(unit: Unit, work: &Path) -> Output<'_> {
        Output {
            unit,
            threads: 2,
            work_dir: work,
            limit: u64::MAX,
            estargz: None,
        }
    }

    fn sha(data: &[u8]) -> String {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
    }

    const UNITS: [Unit; 3] = [Unit::Gzip(1), Unit::Zstd(3), Unit::Plain];

    #[test]
    fn past_the_most_entries_there_is_no_first_pass() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        let work = tempfile::tempdir().unwrap();
        let first = |most| {
            first_pass_of_at_most(
                &upper(dir.path()),
                None,
                output(Unit::Zstd(3), work.path()),
                most,
            )
            .unwrap()
        };
        assert!(first(100).is_none());
        assert!(first(1000).is_some_and(|f| f.seen.len() > 300));
    }

    #[test]
    fn unchanged_the_pieces_are_the_layer_and_nothing_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
        for unit in UNITS {
            let (layer, diff_id, again) = precopy(dir.path(), unit, || {});
            assert_eq!(layer, want, "{unit:?}");
            assert_eq!(diff_id, sha(&want), "{unit:?}");
            assert_eq!(again, 0, "{unit:?}: nothing moved, nothing read again");
        }
    }

    #[test]
    fn whatever_moved_before_the_pause_the_layer_is_the_tree_at_the_pause() {
        for unit in UNITS {
            let dir = tempfile::tempdir().unwrap();
            tree(dir.path());
            std::thread::sleep(std::time::Duration::from_millis(50));
            let (layer, diff_id, again) = precopy(dir.path(), unit, || change(dir.path()));
            let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
            assert_eq!(layer.len(), want.len(), "{unit:?}");
            assert!(
                layer == want,
                "{unit:?}: the layer of the tree at the pause"
            );
            assert_eq!(diff_id, sha(&want), "{unit:?}");
            assert!(
                again < 40,
                "{unit:?}: only what moved is read again ({again})"
            );
        }
    }

    /// eStargz is written after the resume from the assembled tar: the same
    /// blob, landmark and TOC as from a single pass.
    #[test]
    fn an_estargz_layer_from_pieces_is_the_single_pass_blob() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (plain, _, _) = precopy(dir.path(), Unit::Plain, || change(dir.path()));
        let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
        let mut compression = Compression::new(Codec::Estargz, 2);
        compression.prefetch = crate::layer::estargz::Prefetch {
            paths: vec!["etc".into(), "home/*/notes".into()],
            max_bytes: 1 << 20,
        };
        let blob = |tar: &[u8]| {
            let mut e = compression.encoder(Vec::new()).unwrap();
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        };
        let (ours, done) = blob(&plain);
        let (single, single_done) = blob(&want);
        assert!(ours == single);
        assert_eq!(done, single_done);
        assert!(done.unwrap().prefetched_entries > 300);
    }

    /// The eStargz members the first pass wrote are copied after the
    /// resume for every entry that stands, the others written from what the
    /// pause read: the blob is the single pass's over the tree at the
    /// pause, byte for byte (TOC, diff_id), with or without prefetch, and
    /// nothing of the first pass is kept plain.
    #[test]
    fn an_estargz_layer_from_the_first_passs_members_is_the_single_pass_blob() {
        use crate::layer::estargz;
        for prefetch in [vec![], vec!["etc".to_string(), "home/*/notes".into()]] {
            let dir = tempfile::tempdir().unwrap();
            tree(dir.path());
            // files of several chunks: one stands, one is rewritten in place
            // (same size, other bytes: only its ctime says it)
            write(dir.path().join("home/alice/stays"), &noise(4, 2_600_000));
            write(
                dir.path().join("home/alice/rewritten"),
                &noise(5, 2_600_000),
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut compression = Compression::new(Codec::Estargz, 2);
            compression.prefetch = estargz::Prefetch {
                paths: prefetch.clone(),
                max_bytes: 1 << 20,
            };
            let options = estargz::Options {
                chunk_size: 1 << 20,
                ..compression.estargz()
            };
            let (first, reread, _work) = passes(
                dir.path(),
                Unit::Plain,
                || {
                    change(dir.path());
                    fs::OpenOptions::new()
                        .write(true)
                        .open(dir.path().join("home/alice/rewritten"))
                        .unwrap()
                        .write_all_at(&noise(6, 2_600_000), 0)
                        .unwrap();
                },
                Some(options.clone()),
            );
            assert_eq!(
                first.file.metadata().unwrap().len(),
                0,
                "{prefetch:?}: no plain tar"
            );
            assert!(reread.read > 0, "{prefetch:?}: something moved");
            let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
            let mut single = estargz::Writer::new(Vec::new(), options.clone()).unwrap();
            single.write_all(&want).unwrap();
            let (single, single_done) = single.finish().unwrap();
            let (ours, change, done, spliced) =
                assemble_estargz(&first, &reread, options, Vec::new()).unwrap();
            assert!(ours == single, "{prefetch:?}");
            assert_eq!(done, single_done, "{prefetch:?}");
            assert_eq!(change, sha(&want));
            assert!(
                spliced.copied as usize > 10 * reread.read,
                "{prefetch:?}: what moved is written again, the rest copied: {spliced:?}, {} read again",
                reread.read
            );
        }
    }

    /// An empty upper directory (a new user who changed nothing): an empty
    /// layer tar, its end only, in every unit and as eStargz.
    #[test]
    fn an_empty_change_is_an_empty_layer() {
        let dir = tempfile::tempdir().unwrap();
        let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
        for unit in UNITS {
            let (layer, diff_id, again) = precopy(dir.path(), unit, || {});
            assert!(layer == want, "{unit:?}");
            assert_eq!(diff_id, sha(&want), "{unit:?}");
            assert_eq!(again, 0, "{unit:?}");
        }
        let (plain, _, _) = precopy(dir.path(), Unit::Plain, || {});
        let mut e = Compression::new(Codec::Estargz, 2)
            .encoder(Vec::new())
            .unwrap();
        e.write_all(&plain).unwrap();
        let (blob, done) = e.finish().unwrap();
        assert!(!blob.is_empty() && done.is_some());
    }

    /// A desktop writing, renaming, linking and deleting as fast as it can
    /// in `root`, already at it when this returns; it stops when told.
    struct Racer {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        racer: std::thread::JoinHandle<u64>,
    }

    impl Racer {
        fn start(root: &Path) -> Self {
            let root = root.to_path_buf();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let racer = {
                let (stop, done, root) = (stop.clone(), done.clone(), root.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        done.store(n, std::sync::atomic::Ordering::Relaxed);
                        let i = n % 300;
                        let conf = root.join(format!("etc/conf{i:03}"));
                        let _ = match n % 7 {
                            0 => fs::write(&conf, noise(n, (n % 5000) as usize)),
                            1 => fs::remove_file(&conf),
                            2 => fs::rename(&conf, root.join(format!("etc/moved{i:03}"))),
                            3 => fs::OpenOptions::new()
                                .write(true)
                                .open(root.join("home/alice/big"))
                                .and_then(|f| f.set_len(n % (3 << 20))),
                            4 => fs::create_dir_all(root.join(format!("home/alice/d{}/e", n % 13)))
                                .and_then(|()| {
                                    fs::write(
                                        root.join(format!("home/alice/d{}/e/f", n % 13)),
                                        b"f",
                                    )
                                }),
                            5 => fs::hard_link(&conf, root.join(format!("usr/link{i:03}"))),
                            _ => fs::remove_dir_all(root.join(format!("home/alice/d{}", n % 13))),
                        };
                    }
                    n
                })
            };
            // the desktop is at it before the first pass starts
            while done.load(std::sync::atomic::Ordering::Relaxed) < 100 {
                std::thread::yield_now();
            }
            Self { stop, racer }
        }

        /// The pause: the desktop stops.
        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.racer.join().unwrap();
        }
    }

    /// A desktop writing, renaming and deleting as fast as it can during the
    /// first pass: once it stops (the pause), the layer is the tree then.
    #[test]
    fn a_desktop_racing_the_first_pass_gets_the_tree_at_the_pause() {
        for (round, unit) in UNITS.iter().cycle().take(6).enumerate() {
            let dir = tempfile::tempdir().unwrap();
            tree(dir.path());
            let root = dir.path().to_path_buf();
            let racer = Racer::start(&root);
            let unit = *unit;
            let (layer, diff_id, _) = precopy(&root, unit, || racer.stop());
            let want = upper::write_layer(&upper(&root), Vec::new()).unwrap();
            assert!(layer == want, "round {round}, {unit:?}");
            assert_eq!(diff_id, sha(&want), "round {round}, {unit:?}");
        }
    }

    /// The record of the tree now, racy entries marked (as a capture keeps it).
    fn recorded(root: &Path) -> Record {
        let since = record::racy_since();
        let mut now = record::scan(root, false).unwrap();
        now.mark_racy(since);
        now
    }

    /// An increment pre-copied.
    struct Increment {
        /// Its bytes (decoded) and diff_id.
        layer: Vec<u8>,
        diff_id: String,
        /// The entries read again under the "pause".
        again: Vec<String>,
        /// The increment `write_selected` gives of the selection at the pause.
        want: Vec<u8>,
    }

    /// The pre-copy of the increment over `last` without containerd: the
    /// scan and selection, the first pass, `between`, the "pause" (the
    /// selection made again there), assembly.
    fn precopy_increment(
        root: &Path,
        last: &Record,
        unit: Unit,
        between: impl FnOnce(),
    ) -> Increment {
        precopy_increment_of_at_most(root, last, unit, between, MAX_ENTRIES)
    }

    fn precopy_increment_of_at_most(
        root: &Path,
        last: &Record,
        unit: Unit,
        between: impl FnOnce(),
        most: usize,
    ) -> Increment {
        let work = tempfile::tempdir().unwrap();
        let before = increment::select(last, &recorded(root));
        let first = first_pass(&upper(root), Some(&before), output(unit, work.path()))
            .unwrap()
            .expect("few entries");
        between();
        let reread = under_pause_of_at_most(
            &upper(root),
            &first,
            Some(last),
            work.path(),
            u64::MAX,
            most,
        )
        .unwrap();
        let at_pause = increment::select(last, reread.record.as_ref().expect("the record"));
        let want = upper::write_selected(&upper(root), Some(&at_pause), Vec::new()).unwrap();
        assert_eq!(reread.picked, at_pause.picks().count());
        assert_eq!(reread.whiteouts, at_pause.gone().count());
        if reread.read <= most {
            assert_eq!(reread.read, reread.index.entries.len());
        }
        let mut out = Pieces::new(Vec::new(), unit, 2, false).unwrap();
        let diff_id = assemble(&first, &reread, &mut out, true).unwrap().unwrap();
        let (blob, _) = out.finish().unwrap();
        Increment {
            layer: decode(unit, &blob),
            diff_id,
            again: reread
                .index
                .entries
                .iter()
                .map(|p| record::key_path(&p.key).to_string_lossy().into_owned())
                .collect(),
            want,
        }
    }

    fn tar_names(tar: &[u8]) -> Vec<String> {
        tar::Archive::new(tar)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// A desktop racing the first pass of an increment: once it stops (the
    /// pause), the layer is the increment over the last capture as the tree
    /// stands then, new and changed entries, and whiteouts of what is gone.
    #[test]
    fn a_desktop_racing_the_first_pass_of_an_increment_gets_the_increment_at_the_pause() {
        for (round, unit) in UNITS.iter().cycle().take(6).enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            tree(&root);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let last = recorded(&root);
            change(&root);
            let racer = Racer::start(&root);
            let got = precopy_increment(&root, &last, *unit, || racer.stop());
            assert_eq!(
                got.layer.len(),
                got.want.len(),
                "round {round}, {unit:?}: {:?} / {:?}",
                tar_names(&got.layer),
                tar_names(&got.want)
            );
            assert!(got.layer == got.want, "round {round}, {unit:?}");
            assert_eq!(got.diff_id, sha(&got.want), "round {round}, {unit:?}");
            assert!(
                tar_names(&got.want).iter().any(|n| n.contains(".wh.")),
                "round {round}: whiteouts of what the desktop deleted"
            );
        }
    }

    /// A large file written since the last capture and left alone while the
    /// increment is taken is read once, by the first pass: the pause reads
    /// only what moved meanwhile.
    #[test]
    fn an_increment_whose_big_file_stands_reads_nothing_of_it_again() {
        for unit in UNITS {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            tree(&root);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let last = recorded(&root);
            write(root.join("home/alice/installed/big"), &noise(7, 8 << 20));
            fs::write(root.join("etc/conf010"), b"changed").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));

            let got = precopy_increment(&root, &last, unit, || {});
            assert!(got.layer == got.want, "{unit:?}");
            assert_eq!(got.diff_id, sha(&got.want), "{unit:?}");
            assert!(got.again.is_empty(), "{unit:?}: {:?}", got.again);
            assert!(tar_names(&got.want).contains(&"home/alice/installed/big".to_string()));

            let got = precopy_increment(&root, &last, unit, || {
                fs::write(root.join("etc/conf020"), b"changed meanwhile").unwrap();
            });
            assert!(got.layer == got.want, "{unit:?}");
            assert_eq!(got.diff_id, sha(&got.want), "{unit:?}");
            assert_eq!(got.again, ["etc/conf020"], "{unit:?}");
        }
    }

    /// An increment whose layer at the pause holds more entries than a
    /// pre-copy keeps is read whole under the pause: the same layer.
    #[test]
    fn past_the_most_entries_at_the_pause_the_increment_is_read_whole() {
        for unit in UNITS {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            tree(&root);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let last = recorded(&root);
            change(&root);
            let got = precopy_increment_of_at_most(&root, &last, unit, || change_more(&root), 10);
            assert!(got.layer == got.want, "{unit:?}");
            assert_eq!(got.diff_id, sha(&got.want), "{unit:?}");
            assert_eq!(got.again, [""], "{unit:?}: one piece, the whole layer");
        }
    }

    /// More changes, after [`change`].
    fn change_more(root: &Path) {
        for i in 100..140 {
            fs::write(root.join(format!("etc/conf{i:03}")), b"again").unwrap();
        }
        fs::remove_file(root.join("etc/conf200")).unwrap_or_default();
        fs::remove_dir_all(root.join("home/alice/papers")).unwrap();
    }

    /// Entries gone between the first pass and the pause: a whiteout for
    /// what the last capture had, nothing for what the session made since;
    /// a whiteout of the first pass whose entry came back gives way to it.
    #[test]
    fn entries_gone_between_the_passes_get_their_whiteouts() {
        for unit in UNITS {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            tree(&root);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let last = recorded(&root);
            fs::remove_file(root.join("etc/conf001")).unwrap();
            write(root.join("home/alice/tmp/made"), b"made since");
            write(root.join("home/alice/docs/c"), b"new in docs");
            std::thread::sleep(std::time::Duration::from_millis(50));

            let got = precopy_increment(&root, &last, unit, || {
                fs::remove_file(root.join("etc/conf002")).unwrap();
                fs::write(root.join("etc/conf001"), b"back").unwrap();
                fs::remove_dir_all(root.join("home/alice/tmp")).unwrap();
                fs::remove_dir_all(root.join("home/alice/docs")).unwrap();
                fs::remove_file(root.join("usr/two")).unwrap();
            });
            assert!(got.layer == got.want, "{unit:?}");
            assert_eq!(got.diff_id, sha(&got.want), "{unit:?}");
            let names = tar_names(&got.layer);
            for whiteout in ["etc/.wh.conf002", "home/alice/.wh.docs", "usr/.wh.two"] {
                assert!(names.iter().any(|n| n == whiteout), "{unit:?}: {names:?}");
            }
            for not in ["etc/.wh.conf001", "home/alice/tmp", "home/alice/.wh.tmp"] {
                assert!(
                    !names.iter().any(|n| n.trim_end_matches('/') == not),
                    "{unit:?}: {not} in {names:?}"
                );
            }
            assert!(names.iter().any(|n| n == "etc/conf001"), "{unit:?}");
            assert!(
                !names.iter().any(|n| n.starts_with("home/alice/docs/")),
                "{unit:?}: {names:?}"
            );
        }
    }
}

/// The steps of the consistency test's desktop writer (`tests/tests/precopy.rs`)
/// racing the first pass: the assembled layer is the tree at the "pause".
#[cfg(test)]
mod writer_steps {
    use super::trees::{output, upper};
    use super::*;
    use std::fs;

    #[test]
    fn the_consistency_writers_steps() {
        for round in 0..6 {
            let dir = tempfile::tempdir().unwrap();
            let w = dir.path().join("root/w");
            fs::create_dir_all(w.join("new")).unwrap();
            fs::create_dir_all(w.join("dirs")).unwrap();
            fs::write(w.join("tag.0"), "tag\n").unwrap();
            for i in 0..2000 {
                fs::create_dir_all(dir.path().join("opt/many")).unwrap();
                fs::write(dir.path().join(format!("opt/many/{i}")), format!("{i}\n")).unwrap();
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let racer = {
                let (stop, w) = (stop.clone(), w.clone());
                std::thread::spawn(move || {
                    let mut n = 0i64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        let line = format!("{n}\n");
                        for f in ["f0", "f1", "f2", "f3"] {
                            use std::io::Write;
                            fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(w.join(f))
                                .unwrap()
                                .write_all(line.as_bytes())
                                .unwrap();
                        }
                        fs::write(w.join(format!("new/{n}")), &line).unwrap();
                        let _ = fs::remove_file(w.join(format!("new/{}", n - 3)));
                        fs::create_dir(w.join(format!("dirs/{n}"))).unwrap();
                        fs::write(w.join(format!("dirs/{n}/x")), &line).unwrap();
                        let _ = fs::remove_dir_all(w.join(format!("dirs/{}", n - 3)));
                        fs::rename(w.join(format!("tag.{}", n - 1)), w.join(format!("tag.{n}")))
                            .unwrap();
                        fs::write(w.join("bulk.tmp"), line.repeat(1000)).unwrap();
                        fs::rename(w.join("bulk.tmp"), w.join("bulk")).unwrap();
                    }
                })
            };
            std::thread::sleep(std::time::Duration::from_millis(20));
            let work = tempfile::tempdir().unwrap();
            let unit = [Unit::Gzip(1), Unit::Zstd(3), Unit::Plain][round % 3];
            let first = first_pass(&upper(dir.path()), None, output(unit, work.path()))
                .unwrap()
                .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            racer.join().unwrap();
            let reread =
                under_pause(&upper(dir.path()), &first, None, work.path(), u64::MAX).unwrap();
            let mut out = Pieces::new(Vec::new(), unit, 2, false).unwrap();
            let diff_id = assemble(&first, &reread, &mut out, true).unwrap().unwrap();
            let (blob, _) = out.finish().unwrap();
            let mut plain = Vec::new();
            use std::io::Read;
            match unit {
                Unit::Gzip(_) => {
                    flate2::read::MultiGzDecoder::new(blob.as_slice())
                        .read_to_end(&mut plain)
                        .unwrap();
                }
                Unit::Zstd(_) => {
                    zstd::stream::read::Decoder::new(blob.as_slice())
                        .unwrap()
                        .read_to_end(&mut plain)
                        .unwrap();
                }
                Unit::Plain => plain = blob,
            }
            let want = upper::write_layer(&upper(dir.path()), Vec::new()).unwrap();
            let names = |t: &[u8]| -> Vec<String> {
                tar::Archive::new(t)
                    .entries()
                    .unwrap()
                    .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                    .filter(|p| p.contains("dirs"))
                    .collect()
            };
            assert_eq!(names(&plain), names(&want), "round {round} {unit:?}");
            assert!(plain == want, "round {round}");
            use sha2::Digest;
            assert_eq!(
                diff_id,
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(&want)))
            );
        }
    }
}
