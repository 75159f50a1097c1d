//! The record of a capture: the upper directory's metadata, one stamp per
//! entry, taken by one walk that reads no data ([`scan`]). Two records tell
//! what changed between two captures ([`diff`]): an entry whose inode, ctime,
//! size, type, link count or device numbers differ, a new one, a gone one.
//! The incremental snapshot and the pre-copy both decide from it what to read.
//!
//! Entries are keyed by their path inside the upper directory, components
//! joined by NUL (which no name holds), so that byte order is the walk's
//! order: a directory, then its children, then its next sibling. The record
//! of the last pushed capture is kept in the work directory ([`save`],
//! [`load`]), so a restarted sidecar finds it. On disk an entry costs
//! [`ENTRY_BYTES`] (51) plus the part of its path it does not share with the
//! entry before (paths are front-coded): about 60-70 bytes for a usual tree,
//! 1.3 MB for 20,000 entries; in memory 56 bytes plus its path. The file is
//! versioned and checksummed, and names the container it describes: a
//! missing, damaged or foreign record is no record ([`load`] says why),
//! and the next layer is a full one, never a wrong one.

use super::beneath::Names;
use crate::layer::Hashing;
use anyhow::{bail, Context, Result};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, StatxFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    cmp::Ordering,
    ffi::OsStr,
    io::{self, Read, Write},
    ops::ControlFlow,
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

/// What tells a changed entry from an unchanged one, read by `statx` without
/// opening the entry. A write changes the ctime (and a ctime that did not
/// move within the clock's tick is caught by [`Stamp::racy`]); setting an
/// attribute, renaming, linking and `chmod` change it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub size: u64,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u32,
    /// A device node's numbers (`st_rdev`; 0:0 is overlay's whiteout).
    pub rdev: u64,
    flags: u8,
}

/// A directory overlay marks opaque (nothing below it shows through).
const OPAQUE: u8 = 1;
/// Changed too close to the capture for its ctime to prove anything later.
const RACY: u8 = 2;

impl Stamp {
    pub fn new(
        ino: u64,
        (ctime_sec, ctime_nsec): (i64, u32),
        size: u64,
        mode: u32,
        nlink: u32,
        rdev: u64,
        opaque: bool,
    ) -> Self {
        Self {
            ino,
            ctime_sec,
            ctime_nsec,
            size,
            mode,
            nlink,
            rdev,
            flags: if opaque { OPAQUE } else { 0 },
        }
    }

    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.mode as _)
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == FileType::Directory
    }

    /// Overlay's whiteout: a character device 0:0.
    pub fn is_whiteout(&self) -> bool {
        self.kind() == FileType::CharacterDevice && self.rdev == 0
    }

    /// A directory overlay marked opaque.
    pub fn is_opaque(&self) -> bool {
        self.flags & OPAQUE != 0
    }

    /// Changed so close to the capture that a later change in the same clock
    /// tick would leave the same ctime: it counts as changed next time.
    pub fn racy(&self) -> bool {
        self.flags & RACY != 0
    }

    /// Whether an entry stamped `self` now is the one stamped `was` at the
    /// last capture, unchanged.
    pub fn unchanged_since(&self, was: &Stamp) -> bool {
        !was.racy()
            && (self.ino, self.ctime_sec, self.ctime_nsec, self.size)
                == (was.ino, was.ctime_sec, was.ctime_nsec, was.size)
            && (self.mode, self.nlink, self.rdev) == (was.mode, was.nlink, was.rdev)
            && self.is_opaque() == was.is_opaque()
    }
}

/// Entries of an upper directory, sorted by key (see the module's doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    keys: Vec<u8>,
    slots: Vec<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    start: u32,
    end: u32,
    stamp: Stamp,
}

/// Most entries a record holds (a larger upper directory has no record, and
/// gets full layers).
pub const MAX_ENTRIES: usize = 8_000_000;

impl Record {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Adds an entry; keys must come in increasing order.
    pub fn push(&mut self, key: &[u8], stamp: Stamp) -> Result<()> {
        if let Some(last) = self.slots.last() {
            if self.key_of(last) >= key {
                bail!("record entries out of order at {}", shown_key(key));
            }
        }
        if self.slots.len() >= MAX_ENTRIES {
            bail!("more than {MAX_ENTRIES} entries");
        }
        let start = u32::try_from(self.keys.len()).context("the record's paths exceed 4 GiB")?;
        self.keys.extend_from_slice(key);
        let end = u32::try_from(self.keys.len()).context("the record's paths exceed 4 GiB")?;
        self.slots.push(Slot { start, end, stamp });
        Ok(())
    }

    fn key_of(&self, slot: &Slot) -> &[u8] {
        &self.keys[slot.start as usize..slot.end as usize]
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Stamp)> + '_ {
        self.slots.iter().map(|s| (self.key_of(s), &s.stamp))
    }

    fn index(&self, key: &[u8]) -> Result<usize, usize> {
        self.slots.binary_search_by(|s| self.key_of(s).cmp(key))
    }

    pub fn get(&self, key: &[u8]) -> Option<&Stamp> {
        self.index(key).ok().map(|i| &self.slots[i].stamp)
    }

    /// The entries strictly below directory `key` (all of them for the root,
    /// the empty key), in key order.
    pub fn below<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = (&'a [u8], &'a Stamp)> + 'a {
        let low = if key.is_empty() {
            0
        } else {
            let first = [key, &[0]].concat();
            self.index(&first).unwrap_or_else(|i| i)
        };
        let key = key.to_vec();
        self.slots[low..]
            .iter()
            .map(|s| (self.key_of(s), &s.stamp))
            .take_while(move |(k, _)| is_below(k, &key))
    }

    /// Marks every entry whose ctime is at or after `since` racy (see
    /// [`Stamp::racy`]).
    pub fn mark_racy(&mut self, since: (i64, u32)) {
        for slot in &mut self.slots {
            if (slot.stamp.ctime_sec, slot.stamp.ctime_nsec) >= since {
                slot.stamp.flags |= RACY;
            }
        }
    }
}

/// Whether `key` is strictly below directory `dir` (everything but the root
/// is below the root).
pub fn is_below(key: &[u8], dir: &[u8]) -> bool {
    if dir.is_empty() {
        return !key.is_empty();
    }
    key.len() > dir.len() && key.starts_with(dir) && key[dir.len()] == 0
}

/// A key's parent and last name (the root's are both empty).
pub fn split(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().rposition(|&b| b == 0) {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (&[], key),
    }
}

pub use crate::layer::tar::{join, key_path, path_key};

/// A key as the desktop sees its path, quoted and escaped, for error texts.
fn shown_key(key: &[u8]) -> String {
    format!("{:?}", Path::new("/").join(key_path(key)).to_string_lossy())
}

/// What differs between two records, for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Not in the old record.
    New { key: &'a [u8], now: &'a Stamp },
    /// In both, with another stamp (or a racy old one).
    Changed {
        key: &'a [u8],
        was: &'a Stamp,
        now: &'a Stamp,
    },
    /// Not in the new record.
    Gone { key: &'a [u8], was: &'a Stamp },
}

impl<'a> Change<'a> {
    pub fn key(&self) -> &'a [u8] {
        match self {
            Change::New { key, .. } | Change::Changed { key, .. } | Change::Gone { key, .. } => key,
        }
    }
}

/// What changed from `old` to `new`, in key order (one pass over both).
pub fn diff<'a>(old: &'a Record, new: &'a Record) -> impl Iterator<Item = Change<'a>> + 'a {
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    std::iter::from_fn(move || loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            Ordering::Less => {
                let (key, was) = a.next()?;
                return Some(Change::Gone { key, was });
            }
            Ordering::Greater => {
                let (key, now) = b.next()?;
                return Some(Change::New { key, now });
            }
            Ordering::Equal => {
                let (key, was) = a.next()?;
                let (_, now) = b.next()?;
                if !now.unchanged_since(was) {
                    return Some(Change::Changed { key, was, now });
                }
            }
        }
    })
}

/// The time from which a change may share its ctime with a later one: the
/// coarse clock the filesystems stamp with, less one of its ticks. Taken
/// before a scan, for [`Record::mark_racy`].
pub fn racy_since() -> (i64, u32) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers are to valid timespecs.
    unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now);
        libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut tick);
    }
    #[allow(clippy::unnecessary_cast)] // field widths differ between architectures
    let ns = |t: &libc::timespec| t.tv_sec as i64 * 1_000_000_000 + t.tv_nsec as i64;
    // two ticks back: a change in the tick the scan starts in is caught
    let at = ns(&now) - 2 * ns(&tick).max(1_000_000);
    (
        at.div_euclid(1_000_000_000),
        at.rem_euclid(1_000_000_000) as u32,
    )
}

/// The record of the tree at `dir` (the upper directory itself is not an
/// entry), walked as [`walk`] walks it.
pub fn scan(dir: &Path, userxattr: bool) -> Result<Record> {
    let mut record = Record::default();
    // never breaks: every entry is pushed
    let _walked = walk(dir, userxattr, |key, stamp| {
        record.push(key, stamp)?;
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(record)
}

/// Whether the tree at `dir` is as `old` records it, entry for entry (no
/// new, changed, racy or gone entry); the walk stops at the first
/// difference, and holds no second record.
pub fn same_as(dir: &Path, userxattr: bool, old: &Record) -> Result<bool> {
    let mut was = old.iter();
    let walked = walk(dir, userxattr, |key, now| match was.next() {
        Some((k, w)) if k == key && now.unchanged_since(w) => Ok(ControlFlow::Continue(())),
        _ => Ok(ControlFlow::Break(())),
    })?;
    Ok(walked.is_continue() && was.next().is_none())
}

/// Walks the tree at `dir` (the upper directory itself is not an entry) like
/// the layer writer walks it, giving `visit` each entry's key and stamp in
/// key order until it breaks: every entry stamped through its parent's
/// descriptor (`statx`, links never followed), only directories opened
/// (`O_NOFOLLOW`), nothing outside the tree reachable. A directory's names
/// are held packed ([`Names`]): a million entries in one directory cost
/// tens of MiB. `userxattr`: overlay's attributes are `user.overlay.*`.
pub fn walk(
    dir: &Path,
    userxattr: bool,
    mut visit: impl FnMut(&[u8], Stamp) -> Result<ControlFlow<()>>,
) -> Result<ControlFlow<()>> {
    let opaque_name = if userxattr {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    };
    let (root, _) = open_dir_at(None, dir)
        .with_context(|| format!("opening the upper directory {}", dir.display()))?;
    let names = Names::of(&root).context("listing the upper directory")?;
    // one frame per open directory: its descriptor, key, names and the next
    let mut stack: Vec<(OwnedFd, Vec<u8>, Names, usize)> = vec![(root, Vec::new(), names, 0)];
    while let Some((fd, key, names, next)) = stack.last_mut() {
        let Some(name) = names.get(*next) else {
            stack.pop();
            continue;
        };
        *next += 1;
        let name = OsStr::from_bytes(name);
        let child = join(key, name.as_bytes());
        let st = match rfs::statx(
            &*fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS,
        ) {
            Ok(st) => st,
            // removed since the listing
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", shown_key(&child))),
        };
        let mut stamp = stamp_of(&st, false);
        if stamp.is_dir() {
            match open_dir_at(Some(&*fd), name) {
                Ok((sub, sub_st)) => {
                    // the directory now at that name: its own stamp
                    let opaque = is_y(&sub, opaque_name);
                    stamp = stamp_of(&sub_st, opaque);
                    let names = Names::of(&sub)
                        .with_context(|| format!("listing {}", shown_key(&child)))?;
                    if visit(&child, stamp)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                    stack.push((sub, child, names, 0));
                    continue;
                }
                Err(rustix::io::Errno::NOENT) => continue,
                // swapped for something else since the stat: what is there now
                Err(rustix::io::Errno::NOTDIR) | Err(rustix::io::Errno::LOOP) => {
                    match rfs::statx(
                        &*fd,
                        name,
                        AtFlags::SYMLINK_NOFOLLOW,
                        StatxFlags::BASIC_STATS,
                    ) {
                        Ok(st) => stamp = stamp_of(&st, false),
                        Err(_) => continue,
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", shown_key(&child))),
            }
        }
        if visit(&child, stamp)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// Whether the attribute `name` of `fd` is `y`.
fn is_y(fd: &OwnedFd, name: &str) -> bool {
    let mut buf = [0u8; 8];
    matches!(rfs::fgetxattr(fd, name, &mut buf[..]), Ok(1) if buf[0] == b'y')
}

fn open_dir_at(
    parent: Option<&OwnedFd>,
    name: impl rustix::path::Arg,
) -> rustix::io::Result<(OwnedFd, rfs::Statx)> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match parent {
        Some(p) => rfs::openat(p, name, flags, Mode::empty())?,
        None => rfs::open(name, flags, Mode::empty())?,
    };
    let st = rfs::statx(&fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)?;
    Ok((fd, st))
}

fn stamp_of(st: &rfs::Statx, opaque: bool) -> Stamp {
    let rdev = libc::makedev(st.stx_rdev_major, st.stx_rdev_minor);
    Stamp::new(
        st.stx_ino,
        (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
        st.stx_size,
        st.stx_mode as u32,
        st.stx_nlink,
        rdev,
        opaque,
    )
}

/// Which container and upper directory a record describes; a record saved
/// for another is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub container_id: String,
    pub snapshot_key: String,
    /// The upper directory's path on the node, device and inode.
    pub upper: PathBuf,
    pub upper_dev: u64,
    pub upper_ino: u64,
    /// Where the snapshots go (`SNAPSHOT_REPOSITORY`).
    pub repository: String,
}

impl Identity {
    /// The identity of the upper directory at `upper` for container
    /// `container_id` (snapshot `snapshot_key`), pushed to `repository`.
    pub fn of(
        upper: &Path,
        container_id: &str,
        snapshot_key: &str,
        repository: &str,
    ) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(upper)?;
        use std::os::unix::fs::MetadataExt;
        Ok(Self {
            container_id: container_id.to_string(),
            snapshot_key: snapshot_key.to_string(),
            upper: upper.to_path_buf(),
            upper_dev: meta.dev(),
            upper_ino: meta.ino(),
            repository: repository.to_string(),
        })
    }
}

const MAGIC: &[u8; 8] = b"DSNAPREC";
const VERSION: u32 = 1;
/// A header larger than this is damage (it holds an identity and a manifest).
const MAX_HEADER: usize = 16 << 20;
/// Bytes of an entry beyond its path: prefix length, suffix length, stamp.
pub const ENTRY_BYTES: usize = 2 + 4 + 8 + 8 + 4 + 8 + 4 + 4 + 8 + 1;

#[derive(Serialize, Deserialize)]
struct Header {
    identity: Identity,
    /// What the caller keeps with the record (the image the capture made).
    payload: serde_json::Value,
}

/// Writes the record, with the identity it describes and the caller's
/// `payload`, into `out` (see [`save`]): streamed, entry by entry, the
/// checksum last, so that a record of millions of entries needs no second
/// copy in memory.
pub fn encode(
    out: impl Write,
    identity: &Identity,
    payload: &serde_json::Value,
    record: &Record,
) -> Result<()> {
    let header = serde_json::to_vec(&Header {
        identity: identity.clone(),
        payload: payload.clone(),
    })?;
    let mut out = Hashing::new(out);
    out.write_all(MAGIC)?;
    out.write_all(&VERSION.to_le_bytes())?;
    out.write_all(&(header.len() as u32).to_le_bytes())?;
    out.write_all(&header)?;
    out.write_all(&(record.len() as u64).to_le_bytes())?;
    let mut previous: &[u8] = &[];
    for (key, s) in record.iter() {
        let shared = previous
            .iter()
            .zip(key)
            .take_while(|(a, b)| a == b)
            .count()
            .min(u16::MAX as usize);
        let suffix = &key[shared..];
        out.write_all(&(shared as u16).to_le_bytes())?;
        out.write_all(&(suffix.len() as u32).to_le_bytes())?;
        out.write_all(suffix)?;
        out.write_all(&s.ino.to_le_bytes())?;
        out.write_all(&s.ctime_sec.to_le_bytes())?;
        out.write_all(&s.ctime_nsec.to_le_bytes())?;
        out.write_all(&s.size.to_le_bytes())?;
        out.write_all(&s.mode.to_le_bytes())?;
        out.write_all(&s.nlink.to_le_bytes())?;
        out.write_all(&s.rdev.to_le_bytes())?;
        out.write_all(&[s.flags])?;
        previous = key;
    }
    let (sum, mut out) = out.finish_raw();
    out.write_all(&sum)?;
    out.flush()?;
    Ok(())
}

/// The identity, payload and record in the `len` bytes `input` holds (as
/// [`encode`] wrote them), read as a stream; an error says what is wrong.
pub fn decode(input: impl Read, len: u64) -> Result<(Identity, serde_json::Value, Record)> {
    let body_len = len.checked_sub(32).context("too short")?;
    let mut r = Reader {
        input,
        left: body_len,
        sum: Sha256::new(),
    };
    if r.take(8)? != MAGIC {
        bail!("not a record");
    }
    let version = r.u32()?;
    if version != VERSION {
        bail!("version {version}, not {VERSION}");
    }
    let header_len = r.u32()? as usize;
    if header_len > MAX_HEADER {
        bail!("a header of {header_len} bytes");
    }
    let header: Header = serde_json::from_slice(&r.take(header_len)?).context("the header")?;
    let count = r.u64()? as usize;
    if count > MAX_ENTRIES || count as u64 > r.left / ENTRY_BYTES as u64 {
        bail!("{count} entries in {} bytes", r.left);
    }
    let mut record = Record::default();
    let mut key: Vec<u8> = Vec::new();
    for _ in 0..count {
        let shared = r.u16()? as usize;
        let suffix_len = r.u32()? as usize;
        if shared > key.len() {
            bail!("a path sharing more than the one before");
        }
        if suffix_len as u64 > r.left {
            bail!("it ends early");
        }
        key.resize(shared + suffix_len, 0);
        r.fill(&mut key[shared..])?;
        let stamp = Stamp {
            ino: r.u64()?,
            ctime_sec: r.u64()? as i64,
            ctime_nsec: r.u32()?,
            size: r.u64()?,
            mode: r.u32()?,
            nlink: r.u32()?,
            rdev: r.u64()?,
            flags: r.take(1)?[0],
        };
        record.push(&key, stamp)?;
    }
    if r.left != 0 {
        bail!("{} bytes after the last entry", r.left);
    }
    let mut sum = [0u8; 32];
    r.input
        .read_exact(&mut sum)
        .context("it ends before its checksum")?;
    if r.sum.finalize().as_slice() != sum {
        bail!("the checksum does not match");
    }
    Ok((header.identity, header.payload, record))
}

/// The body of a record: what is left of it, hashed as it is read.
struct Reader<R> {
    input: R,
    left: u64,
    sum: Sha256,
}

impl<R: Read> Reader<R> {
    /// The next `buf.len()` bytes of the body, into `buf`.
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.left {
            bail!("it ends early");
        }
        self.input.read_exact(buf).context("it ends early")?;
        self.left -= buf.len() as u64;
        self.sum.update(&*buf);
        Ok(())
    }
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        if n as u64 > self.left {
            bail!("it ends early");
        }
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        Ok(buf)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Writes the record to `path` whole or not at all (a temporary file in the
/// same directory, synced, renamed over it).
pub fn save(
    path: &Path,
    identity: &Identity,
    payload: &serde_json::Value,
    record: &Record,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("a temporary file in {}", dir.display()))?;
    encode(
        io::BufWriter::with_capacity(1 << 16, file.as_file()),
        identity,
        payload,
        record,
    )
    .and_then(|()| Ok(file.as_file().sync_all()?))
    .with_context(|| format!("writing {}", file.path().display()))?;
    file.persist(path)
        .with_context(|| format!("renaming the record to {}", path.display()))?;
    Ok(())
}

/// The payload and record saved at `path` for `identity`; `None` (with the
/// reason) when there is none, it is damaged, or it describes another
/// container or upper directory.
pub fn load(path: &Path, identity: &Identity) -> Result<(serde_json::Value, Record), String> {
    let (file, len) = match std::fs::File::open(path).and_then(|f| Ok((f.metadata()?.len(), f))) {
        Ok((len, f)) => (f, len),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err("no record of an earlier capture".into())
        }
        Err(e) => return Err(format!("the record cannot be read: {e}")),
    };
    let (found, payload, record) = decode(io::BufReader::with_capacity(1 << 16, file), len)
        .map_err(|e| format!("the record is damaged: {e:#}"))?;
    if &found != identity {
        return Err(format!(
            "the record describes another capture (container {}, snapshot {})",
            found.container_id, found.snapshot_key
        ));
    }
    Ok((payload, record))
}

/// Removes the record at `path`, if any (the last push made none).
pub fn forget(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    pub(crate) fn stamp(ino: u64, ctime: i64, kind: u32) -> Stamp {
        Stamp::new(ino, (ctime, 0), 0, kind | 0o644, 1, 0, false)
    }

    fn record(entries: &[(&str, Stamp)]) -> Record {
        let mut r = Record::default();
        for (path, s) in entries {
            r.push(&path_key(Path::new(path)), *s).unwrap();
        }
        r
    }

    const F: u32 = libc::S_IFREG;
    const D: u32 = libc::S_IFDIR;

    #[test]
    fn keys_sort_like_the_walk() {
        // a directory, its children, then the names after it
        let mut keys = [
            path_key(Path::new("a-c")),
            path_key(Path::new("a/b")),
            path_key(Path::new("a")),
        ];
        keys.sort();
        let paths: Vec<_> = keys.iter().map(|k| key_path(k)).collect();
        assert_eq!(paths, [Path::new("a"), Path::new("a/b"), Path::new("a-c")]);
        assert!(is_below(&path_key(Path::new("a/b")), b"a"));
        assert!(!is_below(b"a-c", b"a"));
        assert!(!is_below(b"a", b"a"));
        assert!(is_below(b"a", b""));
        assert_eq!(
            split(&path_key(Path::new("x/y/z"))),
            (&b"x\0y"[..], &b"z"[..])
        );
    }

    #[test]
    fn what_differs_between_two_records() {
        let old = record(&[
            ("a", stamp(1, 10, D)),
            ("a/gone", stamp(2, 10, F)),
            ("a/same", stamp(3, 10, F)),
            ("b", stamp(4, 10, F)),
        ]);
        let new = record(&[
            ("a", stamp(1, 11, D)),
            ("a/same", stamp(3, 10, F)),
            ("a/x", stamp(5, 11, F)),
            ("b", stamp(4, 12, F)),
        ]);
        let got: Vec<(String, &str)> = diff(&old, &new)
            .map(|c| {
                let what = match c {
                    Change::New { .. } => "new",
                    Change::Changed { .. } => "changed",
                    Change::Gone { .. } => "gone",
                };
                (key_path(c.key()).display().to_string(), what)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), "changed"),
                ("a/gone".to_string(), "gone"),
                ("a/x".to_string(), "new"),
                ("b".to_string(), "changed"),
            ]
        );
        assert_eq!(diff(&new, &new).count(), 0);
        let mut racy = new.clone();
        racy.mark_racy((12, 0));
        let racy_changes: Vec<_> = diff(&racy, &new).map(|c| key_path(c.key())).collect();
        assert_eq!(racy_changes, [Path::new("b")], "changed too late to trust");
    }

    #[test]
    fn every_field_of_a_stamp_counts() {
        let base = Stamp::new(1, (10, 5), 3, F | 0o644, 1, 0, false);
        let others = [
            Stamp { ino: 2, ..base },
            Stamp {
                ctime_sec: 11,
                ..base
            },
            Stamp {
                ctime_nsec: 6,
                ..base
            },
            Stamp { size: 4, ..base },
            Stamp {
                mode: F | 0o600,
                ..base
            },
            Stamp {
                mode: D | 0o644,
                ..base
            },
            Stamp { nlink: 2, ..base },
            Stamp { rdev: 1, ..base },
            Stamp {
                flags: OPAQUE,
                ..base
            },
        ];
        assert!(base.unchanged_since(&base));
        for other in others {
            assert!(!other.unchanged_since(&base), "{other:?}");
        }
    }

    #[test]
    fn a_record_reads_back_and_damage_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("fs");
        fs::create_dir_all(tree.join("etc/deep/er")).unwrap();
        fs::write(tree.join("etc/deep/er/file"), "x").unwrap();
        fs::write(tree.join("etc/a-b"), "xy").unwrap();
        std::os::unix::fs::symlink("/nowhere", tree.join("link")).unwrap();
        let record = scan(&tree, false).unwrap();
        let keys: Vec<_> = record.iter().map(|(k, _)| key_path(k)).collect();
        assert_eq!(
            keys,
            [
                "etc",
                "etc/a-b",
                "etc/deep",
                "etc/deep/er",
                "etc/deep/er/file",
                "link"
            ]
            .map(PathBuf::from)
        );
        let get = |p: &str| *record.get(&path_key(Path::new(p))).unwrap();
        assert_eq!(get("etc/a-b").size, 2);
        assert_eq!(get("link").kind(), FileType::Symlink);
        assert!(get("etc").is_dir());
        assert_eq!(record.below(b"etc").count(), 4);
        assert_eq!(record.below(b"").count(), 6);

        let id = Identity::of(&tree, "desk", "desk", "r/u").unwrap();
        let payload = serde_json::json!({"image": "r/u:t"});
        let path = dir.path().join("rec");
        save(&path, &id, &payload, &record).unwrap();
        assert_eq!(load(&path, &id).unwrap(), (payload.clone(), record.clone()));
        let other = Identity {
            container_id: "other".into(),
            ..id.clone()
        };
        assert!(load(&path, &other).unwrap_err().contains("another"));

        let bytes = fs::read(&path).unwrap();
        for at in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            assert!(
                load(&path, &id).unwrap_err().contains("damaged"),
                "byte {at}"
            );
        }
        fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(load(&path, &id).is_err());
        forget(&path).unwrap();
        forget(&path).unwrap();
        assert!(load(&path, &id).unwrap_err().contains("no record"));
    }

    #[test]
    fn a_scan_sees_what_a_change_does() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        fs::create_dir(tree.join("d")).unwrap();
        fs::write(tree.join("d/f"), "one").unwrap();
        fs::write(tree.join("keep"), "k").unwrap();
        let before = scan(tree, false).unwrap();
        // a ctime tick may be coarse: step past it
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(tree.join("d/f"), "two").unwrap();
        fs::hard_link(tree.join("keep"), tree.join("keep2")).unwrap();
        let after = scan(tree, false).unwrap();
        let changed: Vec<_> = diff(&before, &after).map(|c| key_path(c.key())).collect();
        assert_eq!(changed, ["d/f", "keep", "keep2"].map(PathBuf::from));
        assert_eq!(after.get(b"keep").unwrap().nlink, 2);
    }
}
