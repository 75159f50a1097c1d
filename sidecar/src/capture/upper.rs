//! The layer straight from the overlayfs upper directory: with containerd's
//! overlayfs snapshotter, everything the user changed is in the container
//! snapshot's `upperdir`, and nothing else is. Walking it alone costs time in
//! proportion to the change, not to the whole root filesystem (the Diff
//! service walks both trees). Overlay's own notation is translated to OCI:
//! a whiteout (character device 0:0) becomes `.wh.<name>`, an opaque directory
//! (`trusted.overlay.opaque=y`, or `user.overlay.opaque` with `userxattr`)
//! gets `.wh..wh..opq`; hard links within the change stay links; other
//! extended attributes (file capabilities, ACLs) travel as PAX records.
//!
//! What this cannot translate (a renamed directory's `redirect`, a `metacopy`
//! file whose data is still below) is refused with [`Unsupported`], and the
//! caller uses the Diff service instead.

use super::beneath::{Dir, Entry, Meta};
use super::increment::{Pick, Selection};
use super::record;
use crate::layer::tar::{empty_header, pax_records, shown};
use anyhow::{Context, Result};
use rustix::fs::FileType;
use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, BufReader, Read, Write},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};
use tar::{EntryType, Header};

/// The OCI whiteout prefix, and the opaque-directory marker.
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The upper directory of an overlay mount, from containerd's mount list; `None`
/// for anything else (a bind mount of a snapshot without parents, another
/// snapshotter).
pub fn upperdir(mounts: &[containerd_client::types::Mount]) -> Option<Upper> {
    let [mount] = mounts else { return None };
    if mount.r#type != "overlay" {
        return None;
    }
    let mut dir = None;
    let mut userxattr = false;
    for option in &mount.options {
        if let Some(path) = option.strip_prefix("upperdir=") {
            dir = Some(PathBuf::from(path));
        } else if option == "userxattr" {
            userxattr = true;
        }
    }
    Some(Upper {
        dir: dir?,
        userxattr,
        options: mount.options.clone(),
    })
}

/// A container snapshot's upper directory, as containerd mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upper {
    pub dir: PathBuf,
    /// Overlay keeps its own attributes in `user.overlay.*` (rootless) instead
    /// of `trusted.overlay.*`.
    pub userxattr: bool,
    options: Vec<String>,
}

/// Why the upper directory cannot be used; the Diff service is used instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

impl Upper {
    /// Whether this process can read the upper directory faithfully: it must be
    /// reachable (the webhook mounts containerd's snapshotter directory at the
    /// same path), overlay's attributes must be readable (`trusted.*` needs
    /// CAP_SYS_ADMIN), and no overlay feature the OCI format cannot carry may
    /// be on (`redirect_dir`, `metacopy`).
    pub fn check(&self, capabilities: &Capabilities) -> Result<(), Unsupported> {
        let meta = fs::symlink_metadata(&self.dir).map_err(|e| {
            Unsupported(format!(
                "the upper directory {} is not reachable from the sidecar ({e})",
                self.dir.display()
            ))
        })?;
        if !meta.is_dir() {
            return Err(Unsupported(format!(
                "{} is not a directory",
                self.dir.display()
            )));
        }
        if !self.userxattr && !capabilities.sys_admin {
            return Err(Unsupported(
                "reading overlay's trusted.* attributes needs CAP_SYS_ADMIN".to_string(),
            ));
        }
        for feature in ["redirect_dir", "metacopy"] {
            let off = self
                .options
                .iter()
                .any(|o| o == &format!("{feature}=off") || o == &format!("{feature}=nofollow"));
            if !off && capabilities.overlay_defaults.iter().any(|f| f == feature) {
                return Err(Unsupported(format!(
                    "overlay's {feature} is on by default on this node"
                )));
            }
        }
        Ok(())
    }
}

/// What this process and node allow, read once per commit.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub sys_admin: bool,
    /// Overlay features the kernel turns on unless a mount says otherwise.
    pub overlay_defaults: Vec<String>,
}

impl Capabilities {
    pub fn read() -> Self {
        let sys_admin = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << 21) != 0);
        let overlay_defaults = ["redirect_dir", "metacopy"]
            .into_iter()
            .filter(|f| {
                fs::read_to_string(format!("/sys/module/overlay/parameters/{f}"))
                    .is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "on" | "1"))
            })
            .map(String::from)
            .collect();
        Self {
            sys_admin,
            overlay_defaults,
        }
    }
}

/// Writes the upper directory as an uncompressed OCI layer tar into `out`.
/// Entries come in name order, so the same change gives the same layer.
///
/// The walk never leaves the upper directory, whatever the desktop does while
/// it runs (with the pause off it may rename and swap its own entries): every
/// entry is opened through its parent's descriptor without following links
/// ([`beneath`]), and read through its own descriptor. Errors name paths as
/// the desktop sees them (`/etc/...`), never the node's.
pub fn write_layer<W: Write>(upper: &Upper, out: W) -> Result<W> {
    write_selected(upper, None, out)
}

/// [`write_layer`] holding only what `selection` picks, with its explicit
/// whiteouts: an increment over the last capture
/// ([`increment`](super::increment)); `None` writes everything. The walk goes
/// only into the directories that hold something picked or gone.
pub fn write_selected<W: Write>(upper: &Upper, selection: Option<&Selection>, out: W) -> Result<W> {
    let mut walk = Walk::new(upper, selection, out, None);
    walk.dir(&root(upper)?, Path::new(""), &[], selection.is_none())?;
    walk.tar.into_inner().context("finishing the layer tar")
}

/// Where the layer's entries start, for a writer that keeps them apart
/// ([`precopy`](super::precopy)): told by the walk as it goes.
pub trait Cuts {
    /// The entry at `rel` starts here, written as `pick` says (a directory
    /// with its opaque marker for [`Pick::Whole`], without for
    /// [`Pick::Entry`]); `meta` is what its descriptor said when it was
    /// opened, just after `at_ns` (ns since the epoch).
    fn begin(&self, rel: &Path, meta: &Meta, pick: Pick, at_ns: i128) -> io::Result<()>;
    /// The explicit whiteout of `rel` (an increment's entry of the last
    /// capture gone since, [`Selection::gone`]) starts here: it has no
    /// inode, and its bytes depend on its path alone.
    fn whiteout(&self, rel: &Path) -> io::Result<()>;
    /// The entry begun last changed while it was read: its bytes are no
    /// state it had at one moment (or it was left out).
    fn damaged(&self);
    /// The entries are over: what follows is the tar's end.
    fn end(&self);
    /// Writing the output failed: the walk must stop.
    fn failed(&self) -> bool;
}

/// [`write_layer`] while the desktop runs, telling `cuts` where each entry
/// starts: an entry that changes while it is read (a file that shrinks, an
/// entry that cannot be opened any more) is reported
/// [damaged](Cuts::damaged) instead of ending the walk, a file that shrank
/// padded to the size its header says. What a layer cannot express is still
/// refused ([`Unsupported`]). With `selection`, only what it picks and its
/// whiteouts, as [`write_selected`] writes them (a directory holding picks
/// that cannot be opened any more is passed over: what is missing is read
/// again at the pause).
pub fn write_running<W: Write>(
    upper: &Upper,
    selection: Option<&Selection>,
    cuts: &dyn Cuts,
    out: W,
) -> Result<W> {
    let mut walk = Walk::new(upper, selection, out, Some(cuts));
    walk.dir(&root(upper)?, Path::new(""), &[], selection.is_none())?;
    cuts.end();
    walk.tar.into_inner().context("finishing the layer tar")
}

/// Writes the entries at `keys` ([`record`]'s keys, in their order), each
/// alone, as [`write_selected`] with `selection` writes it (a directory
/// without its children, with its opaque marker unless the selection picks
/// it as a [`Pick::Entry`]; the whiteout of a key the selection says gone),
/// telling `cuts` where each starts; an entry gone is left out. The paths
/// of a file with several links must all be there: the first holds the
/// data, the others link to it.
pub fn write_entries<W: Write>(
    upper: &Upper,
    keys: &[Vec<u8>],
    selection: Option<&Selection>,
    cuts: &dyn Cuts,
    out: W,
) -> Result<W> {
    let mut walk = Walk::new(upper, selection, out, Some(cuts));
    let root = root(upper)?;
    // the directory of the last key, kept for its siblings
    let mut parent: Option<(Vec<u8>, Option<Dir>)> = None;
    for key in keys {
        let (dir_key, name) = record::split(key);
        if name.is_empty() {
            continue;
        }
        if selection.is_some_and(|s| s.is_gone(key)) {
            walk.gone(&record::key_path(dir_key), name)?;
            continue;
        }
        let pick = match selection.and_then(|s| s.pick(key)) {
            Some(Pick::Entry) => Pick::Entry,
            _ => Pick::Whole,
        };
        if parent.as_ref().is_none_or(|(k, _)| k != dir_key) {
            let dir = open_dir(&root, dir_key)
                .with_context(|| format!("opening {}", shown(&record::key_path(dir_key))))?;
            parent = Some((dir_key.to_vec(), dir));
        }
        let dir = match &parent {
            _ if dir_key.is_empty() => &root,
            Some((_, Some(dir))) => dir,
            // its directory is gone: so is it
            _ => continue,
        };
        let rel = record::key_path(key);
        let name = OsStr::from_bytes(name);
        let at = now_ns();
        let Some(entry) =
            Entry::open(dir, name).with_context(|| format!("opening {}", shown(&rel)))?
        else {
            continue;
        };
        cuts.begin(&rel, &entry.meta, pick, at)
            .with_context(|| format!("adding {}", shown(&rel)))?;
        walk.entry(&entry, &rel, name, pick == Pick::Whole)?;
    }
    cuts.end();
    walk.tar.into_inner().context("finishing the layer tar")
}

fn root(upper: &Upper) -> Result<Dir> {
    Entry::root(&upper.dir)
        .and_then(|e| e.dir())
        .context("opening the container's upper directory")
}

/// The directory at `key` below `root`, one name at a time, never following
/// a link; `None` if it is gone or is the root itself.
fn open_dir(root: &Dir, key: &[u8]) -> io::Result<Option<Dir>> {
    let mut dir: Option<Dir> = None;
    for name in key.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let at = dir.as_ref().unwrap_or(root);
        let Some(entry) = Entry::open(at, OsStr::from_bytes(name))? else {
            return Ok(None);
        };
        dir = Some(entry.dir()?);
    }
    Ok(dir)
}

/// The time in ns since the epoch (the clock file times come from).
fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

struct Walk<'s, W: Write> {
    /// What an increment holds; `None`: everything.
    selection: Option<&'s Selection>,
    tar: tar::Builder<W>,
    overlay_prefix: &'static str,
    /// (device, inode) of files with several links -> their first path in the layer.
    links: HashMap<(u64, u64), PathBuf>,
    /// Told where entries start; with it, the desktop runs while it is read
    /// (see [`write_running`]).
    cuts: Option<&'s dyn Cuts>,
}

impl<'s, W: Write> Walk<'s, W> {
    fn new(
        upper: &Upper,
        selection: Option<&'s Selection>,
        out: W,
        cuts: Option<&'s dyn Cuts>,
    ) -> Self {
        Self {
            selection,
            tar: tar::Builder::new(out),
            overlay_prefix: if upper.userxattr {
                "user.overlay."
            } else {
                "trusted.overlay."
            },
            links: HashMap::new(),
            cuts,
        }
    }

    /// Whether `error` only says the desktop changed what was read (then the
    /// entry begun last is damaged, and the walk goes on).
    fn damaged(&self, error: &anyhow::Error) -> bool {
        match self.cuts {
            Some(cuts) if error.downcast_ref::<Unsupported>().is_none() && !cuts.failed() => {
                cuts.damaged();
                true
            }
            _ => false,
        }
    }

    /// The entries of directory `dir` (at `rel`, record key `key`): all of
    /// them when `whole`, else those the selection picks, the directories
    /// holding picks, and the selection's whiteouts, in name order.
    fn dir(&mut self, dir: &Dir, rel: &Path, key: &[u8], whole: bool) -> Result<()> {
        let names = match dir
            .names()
            .with_context(|| format!("listing {}", shown(rel)))
        {
            Ok(names) => names,
            Err(e) if self.damaged(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let selection = if whole { None } else { self.selection };
        let gone = selection.map(|s| s.gone_in(key)).unwrap_or_default();
        let mut gone = gone.into_iter().peekable();
        for name in names.iter() {
            let bytes = name.as_bytes();
            while let Some(g) = gone.next_if(|g| *g < bytes) {
                self.gone(rel, g)?;
            }
            // gone at the scan: its whiteout, whatever the name holds now
            if gone.next_if(|g| *g == bytes).is_some() {
                self.gone(rel, bytes)?;
                continue;
            }
            let (pick, child) = match selection {
                None => (Some(Pick::Whole), Vec::new()),
                Some(s) => {
                    let child = record::join(key, bytes);
                    match s.pick(&child) {
                        Some(p) => (Some(p), child),
                        None if s.any_below(&child) => (None, child),
                        None => continue,
                    }
                }
            };
            let rel = rel.join(name);
            let at = now_ns();
            // gone since the listing: the desktop removed it, nothing to carry
            // (nor what cannot be opened while it runs: read again at the pause)
            let entry = match Entry::open(dir, name) {
                Ok(Some(entry)) => entry,
                Ok(None) => continue,
                Err(_) if self.cuts.is_some() => continue,
                Err(e) => return Err(e).with_context(|| format!("opening {}", shown(&rel))),
            };
            if let (Some(cuts), Some(pick)) = (self.cuts, pick) {
                cuts.begin(&rel, &entry.meta, pick, at)
                    .with_context(|| format!("adding {}", shown(&rel)))?;
            }
            let below = match pick {
                Some(p) => match self.entry(&entry, &rel, name, p == Pick::Whole) {
                    Ok(below) => below,
                    Err(e) if self.damaged(&e) => None,
                    Err(e) => return Err(e),
                },
                // a directory holding picks, itself unchanged: not written
                None if entry.meta.kind == FileType::Directory => match entry.dir() {
                    Ok(dir) => Some(dir),
                    // changed since it was opened, with the desktop running
                    Err(_) if self.cuts.is_some() => None,
                    Err(e) => {
                        return Err(e).with_context(|| format!("opening directory {}", shown(&rel)))
                    }
                },
                None => None,
            };
            if let Some(sub) = below {
                let whole = pick == Some(Pick::Whole);
                if whole || selection.is_some_and(|s| s.any_below(&child)) {
                    self.dir(&sub, &rel, &child, whole)?;
                }
            }
        }
        for g in gone {
            self.gone(rel, g)?;
        }
        Ok(())
    }

    /// Writes one entry (with its opaque marker if `marker` and overlay set
    /// one); a directory comes back opened, for its children.
    fn entry(
        &mut self,
        entry: &Entry,
        rel: &Path,
        name: &OsStr,
        marker: bool,
    ) -> Result<Option<Dir>> {
        let meta = &entry.meta;
        if meta.is_whiteout() {
            let whiteout = rel
                .parent()
                .unwrap_or(Path::new(""))
                .join(OsStr::from_bytes(
                    &[WHITEOUT.as_bytes(), name.as_bytes()].concat(),
                ));
            return self.empty_file(&whiteout, meta).map(|()| None);
        }
        let xattrs = self.xattrs(entry, rel)?;
        let opaque = xattrs
            .overlay
            .iter()
            .any(|(k, v)| k == "opaque" && v == b"y");
        if let Some((key, _)) = xattrs
            .overlay
            .iter()
            .find(|(k, v)| k == "redirect" || k == "metacopy" || (k == "opaque" && v != b"y"))
        {
            return Err(Unsupported(format!(
                "{} carries overlay's {key} attribute, which a layer cannot express",
                shown(rel)
            ))
            .into());
        }
        if !xattrs.others.is_empty() {
            self.pax(rel, &xattrs.others)?;
        }
        let mut header = header_from(meta);
        match meta.kind {
            FileType::Directory => {
                // opened before its entry is written: a directory swapped for
                // something else since it was opened is an error, not a path
                let dir = entry
                    .dir()
                    .with_context(|| format!("opening directory {}", shown(rel)))?;
                header.set_entry_type(EntryType::Directory);
                header.set_size(0);
                self.tar
                    .append_data(&mut header, dir_name(rel), io::empty())
                    .with_context(|| format!("adding {}", shown(rel)))?;
                if opaque && marker {
                    self.empty_file(&rel.join(OPAQUE), meta)?;
                }
                Ok(Some(dir))
            }
            FileType::Symlink => {
                let target = entry
                    .link_target()
                    .with_context(|| format!("reading link {}", shown(rel)))?;
                header.set_entry_type(EntryType::Symlink);
                header.set_size(0);
                self.tar
                    .append_link(&mut header, rel, target)
                    .with_context(|| format!("adding {}", shown(rel)))?;
                Ok(None)
            }
            FileType::RegularFile => {
                if meta.nlink > 1 {
                    let key = (meta.dev, meta.ino);
                    if let Some(first) = self.links.get(&key) {
                        header.set_entry_type(EntryType::Link);
                        header.set_size(0);
                        let first = first.clone();
                        self.tar
                            .append_link(&mut header, rel, first)
                            .with_context(|| format!("adding {}", shown(rel)))?;
                        return Ok(None);
                    }
                    self.links.insert(key, rel.to_path_buf());
                }
                let file = entry
                    .file()
                    .with_context(|| format!("opening {}", shown(rel)))?;
                header.set_entry_type(EntryType::Regular);
                header.set_size(meta.size);
                let short = std::rc::Rc::new(std::cell::Cell::new(false));
                // with the desktop running, a file that shrinks is padded
                let data = Exact::new(file, meta.size, rel, self.cuts.map(|_| short.clone()));
                self.tar
                    .append_data(&mut header, rel, BufReader::with_capacity(1 << 20, data))
                    .with_context(|| format!("adding {}", shown(rel)))?;
                if short.get() {
                    if let Some(cuts) = self.cuts {
                        cuts.damaged();
                    }
                }
                Ok(None)
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                header.set_entry_type(match meta.kind {
                    FileType::CharacterDevice => EntryType::Char,
                    FileType::BlockDevice => EntryType::Block,
                    _ => EntryType::Fifo,
                });
                header.set_size(0);
                if meta.kind != FileType::Fifo {
                    let (major, minor) = device_numbers(meta.rdev);
                    header.set_device_major(major)?;
                    header.set_device_minor(minor)?;
                }
                self.tar
                    .append_data(&mut header, rel, io::empty())
                    .with_context(|| format!("adding {}", shown(rel)))?;
                Ok(None)
            }
            // a socket: a layer cannot hold one, and a socket is never worth restoring
            _ => Ok(None),
        }
    }

    /// The whiteout of `name` in directory `rel`: an entry of the last
    /// capture gone since (a fixed header, as the merge writes them).
    fn gone(&mut self, rel: &Path, name: &[u8]) -> Result<()> {
        if let Some(cuts) = self.cuts {
            let gone = rel.join(OsStr::from_bytes(name));
            cuts.whiteout(&gone)
                .with_context(|| format!("adding the whiteout of {}", shown(&gone)))?;
        }
        let path = rel.join(OsStr::from_bytes(&[WHITEOUT.as_bytes(), name].concat()));
        let mut header = empty_header(EntryType::Regular, 0o644);
        self.tar
            .append_data(&mut header, &path, io::empty())
            .with_context(|| format!("adding {}", shown(&path)))
    }

    fn empty_file(&mut self, rel: &Path, like: &Meta) -> Result<()> {
        let mut header = header_from(like);
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        self.tar
            .append_data(&mut header, rel, io::empty())
            .with_context(|| format!("adding {}", shown(rel)))
    }

    /// A PAX extended header with `SCHILY.xattr.` records for the next entry.
    fn pax(&mut self, rel: &Path, xattrs: &[(OsString, Vec<u8>)]) -> Result<()> {
        let records = pax_records(
            xattrs
                .iter()
                .map(|(k, v)| ([b"SCHILY.xattr.", k.as_bytes()].concat(), v.as_slice())),
        );
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        header.set_mode(0o644);
        header.set_size(records.len() as u64);
        let name = format!(
            "PaxHeaders.0/{}",
            rel.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let name: String = name.chars().take(99).collect();
        header
            .set_path(&name)
            .or_else(|_| header.set_path("PaxHeaders.0/entry"))?;
        header.set_cksum();
        self.tar
            .append(&header, records.as_slice())
            .with_context(|| format!("adding the attributes of {}", shown(rel)))
    }

    fn xattrs(&self, entry: &Entry, rel: &Path) -> Result<Xattrs> {
        let mut found = Xattrs::default();
        let all = entry
            .xattrs()
            .with_context(|| format!("attributes of {}", shown(rel)))?;
        for (name, value) in all {
            let bytes = name.as_bytes();
            if let Some(key) = bytes.strip_prefix(self.overlay_prefix.as_bytes()) {
                found
                    .overlay
                    .push((String::from_utf8_lossy(key).into_owned(), value));
            } else if bytes.starts_with(b"trusted.overlay.") || bytes.starts_with(b"user.overlay.")
            {
                // the other mode's names are overlay's too, never the user's
            } else {
                found.others.push((name, value));
            }
        }
        Ok(found)
    }
}

#[derive(Default)]
struct Xattrs {
    /// overlay's own attributes, without their prefix (`opaque`, `redirect`, ...)
    overlay: Vec<(String, Vec<u8>)>,
    /// everything else, carried into the layer
    others: Vec<(OsString, Vec<u8>)>,
}

fn header_from(meta: &Meta) -> Header {
    let mut header = Header::new_gnu();
    header.set_mode(meta.mode & 0o7777);
    header.set_uid(meta.uid as u64);
    header.set_gid(meta.gid as u64);
    header.set_mtime(meta.mtime.max(0) as u64);
    header
}

/// A directory's name in the layer ends with `/`, as every runtime writes it.
fn dir_name(rel: &Path) -> PathBuf {
    let mut name = rel.as_os_str().to_os_string();
    name.push("/");
    PathBuf::from(name)
}

/// Linux's `major()` and `minor()` of a device number.
pub fn device_numbers(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// A file's data, exactly as long as its header says: a file that shrank while
/// it was read (possible only with the pause off) is an error, not a corrupt tar.
struct Exact {
    inner: io::Take<File>,
    left: u64,
    path: PathBuf,
    /// Set, the data is padded with zeros instead (and the flag raised).
    pad: Option<std::rc::Rc<std::cell::Cell<bool>>>,
}

impl Exact {
    fn new(
        file: File,
        len: u64,
        rel: &Path,
        pad: Option<std::rc::Rc<std::cell::Cell<bool>>>,
    ) -> Self {
        Self {
            inner: file.take(len),
            left: len,
            path: rel.to_path_buf(),
            pad,
        }
    }
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = match (self.inner.read(buf), &self.pad) {
            (Ok(n), _) if n > 0 => n,
            (Ok(_), None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was read", shown(&self.path)),
                ))
            }
            (Err(e), None) => return Err(e),
            // shrank, or unreadable: zeros, and the entry is damaged
            (_, Some(flag)) => {
                flag.set(true);
                self.inner.set_limit(0);
                let n = buf.len().min(self.left as usize);
                buf[..n].fill(0);
                n
            }
        };
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::types::Mount;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.to_string(),
            source: kind.to_string(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_upper_directory_comes_from_an_overlay_mount_only() {
        type Case = (Vec<Mount>, Option<(&'static str, bool)>);
        let cases: [Case; 5] = [
            (
                vec![mount(
                    "overlay",
                    &[
                        "index=off",
                        "workdir=/s/2/work",
                        "upperdir=/s/2/fs",
                        "lowerdir=/s/1/fs",
                    ],
                )],
                Some(("/s/2/fs", false)),
            ),
            (
                vec![mount(
                    "overlay",
                    &["userxattr", "upperdir=/u", "lowerdir=/l"],
                )],
                Some(("/u", true)),
            ),
            // a view: overlay with lower directories only
            (vec![mount("overlay", &["lowerdir=/a:/b"])], None),
            (vec![mount("bind", &["rbind", "rw"])], None),
            (vec![], None),
        ];
        for (mounts, want) in cases {
            let got = upperdir(&mounts);
            assert_eq!(
                got.as_ref().map(|u| (u.dir.to_str().unwrap(), u.userxattr)),
                want,
                "{mounts:?}"
            );
        }
    }

    #[test]
    fn overlay_features_a_layer_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let upper = |options: &[&str]| Upper {
            dir: dir.path().to_path_buf(),
            userxattr: false,
            options: options.iter().map(|s| s.to_string()).collect(),
        };
        let admin = |defaults: &[&str]| Capabilities {
            sys_admin: true,
            overlay_defaults: defaults.iter().map(|s| s.to_string()).collect(),
        };
        assert!(upper(&[]).check(&admin(&[])).is_ok());
        assert!(upper(&[]).check(&admin(&["redirect_dir"])).is_err());
        assert!(upper(&["redirect_dir=off"])
            .check(&admin(&["redirect_dir"]))
            .is_ok());
        assert!(upper(&["redirect_dir=off"])
            .check(&admin(&["redirect_dir", "metacopy"]))
            .is_err());
        let no_admin = Capabilities::default();
        assert!(upper(&[]).check(&no_admin).is_err());
        let rootless = Upper {
            userxattr: true,
            ..upper(&[])
        };
        assert!(rootless.check(&no_admin).is_ok());
        let gone = Upper {
            dir: dir.path().join("missing"),
            ..upper(&[])
        };
        assert!(gone.check(&admin(&[])).is_err());
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for (key, value, want) in [
            ("a", "b", "6 a=b\n"),
            ("SCHILY.xattr.user.x", "1", "25 SCHILY.xattr.user.x=1\n"),
            // 98 bytes plus a 2-digit length would be 100: the length needs 3 digits
            ("k", &"v".repeat(94)[..], ""),
        ] {
            let out = pax_records(std::iter::once((key.as_bytes().to_vec(), value.as_bytes())));
            let text = String::from_utf8(out).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), text.len(), "{text:?}");
            if !want.is_empty() {
                assert_eq!(text, want);
            }
        }
    }

    #[test]
    fn device_numbers_split_like_linux() {
        assert_eq!(device_numbers(0x801), (8, 1));
        let rdev = libc::makedev(259, 65536);
        assert_eq!(device_numbers(rdev), (259, 65536));
    }
    /// Needs root: whiteouts are device nodes, opaque marks are trusted.* attributes.
    #[test]
    fn an_upper_directory_becomes_an_oci_layer() {
        use std::ffi::CString;
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("fs");
        for d in ["etc", "opt", "data", "usr/bin"] {
            fs::create_dir_all(up.join(d)).unwrap();
        }
        fs::write(up.join("etc/new.conf"), "hello").unwrap();
        let gone = CString::new(up.join("etc/gone").as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(gone.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0,
            "mknod needs root"
        );
        xattr::set(up.join("opt"), "trusted.overlay.opaque", b"y").unwrap();
        fs::write(up.join("opt/fresh"), "new").unwrap();
        fs::write(up.join("data/a"), "same").unwrap();
        fs::hard_link(up.join("data/a"), up.join("data/b")).unwrap();
        std::os::unix::fs::symlink("/etc/new.conf", up.join("link")).unwrap();
        fs::write(up.join("usr/bin/tool"), "#!/bin/sh").unwrap();
        xattr::set(up.join("usr/bin/tool"), "user.origin", b"desktop").unwrap();
        let fifo = CString::new(up.join("pipe").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(up.join("sock")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(up.join(&long)).unwrap();
        fs::write(up.join(&long).join("f"), "deep").unwrap();

        let upper = Upper {
            dir: up.clone(),
            userxattr: false,
            options: vec![],
        };
        let layer = write_layer(&upper, Vec::new()).unwrap();
        let again = write_layer(&upper, Vec::new()).unwrap();
        assert_eq!(layer, again, "the same change gives the same layer");

        let mut archive = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let kind = entry.header().entry_type();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let xattrs: Vec<String> = entry
                .pax_extensions()
                .unwrap()
                .into_iter()
                .flatten()
                .map(|e| {
                    let e = e.unwrap();
                    format!("{}={}", e.key().unwrap(), e.value().unwrap())
                })
                .collect();
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            seen.push((path, kind, link, data, xattrs));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "data/",
                "data/a",
                "data/b",
                &format!("{long}/"),
                &format!("{long}/f"),
                "etc/",
                "etc/.wh.gone",
                "etc/new.conf",
                "link",
                "opt/",
                "opt/.wh..wh..opq",
                "opt/fresh",
                "pipe",
                "usr/",
                "usr/bin/",
                "usr/bin/tool",
            ]
        );
        let get = |name: &str| seen.iter().find(|s| s.0 == name).unwrap();
        assert_eq!(get("data/b").1, EntryType::Link);
        assert_eq!(get("data/b").2.as_deref(), Some("data/a"));
        assert_eq!(get("link").1, EntryType::Symlink);
        assert_eq!(get("link").2.as_deref(), Some("/etc/new.conf"));
        assert_eq!(get("etc/.wh.gone").1, EntryType::Regular);
        assert_eq!(get("etc/new.conf").3, "hello");
        assert_eq!(get("pipe").1, EntryType::Fifo);
        assert_eq!(get("usr/bin/tool").4, ["SCHILY.xattr.user.origin=desktop"]);
        assert!(
            get("opt/").4.is_empty(),
            "overlay's own attributes stay out"
        );
    }

    /// Every name and byte of a layer's entries, link targets aside.
    fn names_and_data(layer: &[u8]) -> (Vec<String>, Vec<u8>) {
        let mut archive = tar::Archive::new(layer);
        let (mut names, mut data) = (Vec::new(), Vec::new());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            names.push(entry.path().unwrap().to_string_lossy().into_owned());
            entry.read_to_end(&mut data).unwrap();
        }
        (names, data)
    }

    #[test]
    fn a_desktop_swapping_its_directories_for_links_never_leads_the_walk_outside() {
        let neighbour = tempfile::tempdir().unwrap();
        fs::create_dir_all(neighbour.path().join(".ssh")).unwrap();
        fs::write(neighbour.path().join(".ssh/id_neighbour"), "NEIGHBOUR-KEY").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home/alice");
        fs::create_dir_all(home.join("d/sub")).unwrap();
        fs::write(home.join("d/sub/mine"), "mine").unwrap();
        std::os::unix::fs::symlink(neighbour.path(), home.join("l")).unwrap();
        let upper = Upper {
            dir: dir.path().to_path_buf(),
            userxattr: false,
            options: vec![],
        };
        // the strong form of the race: atomic exchanges, as fast as a core goes
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (stop, a, b) = (stop.clone(), home.join("d"), home.join("l"));
            std::thread::spawn(move || {
                let a = std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap();
                let b = std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap();
                let mut swaps = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = unsafe {
                        libc::syscall(
                            libc::SYS_renameat2,
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    assert_eq!(r, 0);
                    swaps += 1;
                }
                swaps
            })
        };
        let (mut whole, mut failed) = (0, 0);
        for _ in 0..300 {
            match write_layer(&upper, Vec::new()) {
                Ok(layer) => {
                    whole += 1;
                    let (names, data) = names_and_data(&layer);
                    assert!(
                        !names
                            .iter()
                            .any(|n| n.contains("id_neighbour") || n.contains(".ssh")),
                        "{names:?}"
                    );
                    assert!(!data.windows(13).any(|w| w == b"NEIGHBOUR-KEY"));
                }
                Err(e) => {
                    failed += 1;
                    let text = format!("{e:#}");
                    assert!(
                        !text.contains("id_neighbour") && !text.contains(".ssh"),
                        "{text}"
                    );
                    assert!(
                        !text.contains(&dir.path().to_string_lossy().into_owned()),
                        "errors name paths in the container only: {text}"
                    );
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let swaps = racer.join().unwrap();
        assert!(swaps > 1000, "the race ran ({swaps} swaps)");
        assert!(whole > 0, "{whole} whole layers, {failed} failed");
    }

    #[test]
    fn names_in_error_texts_are_escaped_and_inside_the_container() {
        let shown = shown(Path::new("home/a\nb\u{1b}[31m"));
        assert_eq!(shown, "\"/home/a\\nb\\u{1b}[31m\"");
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}'));
    }

    #[test]
    fn a_redirected_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("moved")).unwrap();
        xattr::set(
            dir.path().join("moved"),
            "trusted.overlay.redirect",
            b"/old",
        )
        .unwrap();
        let upper = Upper {
            dir: dir.path().to_path_buf(),
            userxattr: false,
            options: vec![],
        };
        let err = write_layer(&upper, Vec::new()).unwrap_err();
        assert!(err.downcast_ref::<Unsupported>().is_some(), "{err:#}");
    }
    /// An increment holds what changed since the last capture and the
    /// whiteouts of what is gone, in the walk's order. Needs root (whiteouts
    /// are device nodes, opaque marks trusted.* attributes).
    #[test]
    fn an_increment_holds_the_changes_and_explicit_whiteouts() {
        use crate::capture::{increment, record};
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path();
        for d in ["keep/sub", "gone-dir/x", "opt", "a"] {
            fs::create_dir_all(up.join(d)).unwrap();
        }
        fs::write(up.join("keep/sub/same"), "same").unwrap();
        fs::write(up.join("keep/tmp"), "made then deleted").unwrap();
        fs::write(up.join("gone-dir/x/f"), "f").unwrap();
        fs::write(up.join("opt/old"), "old").unwrap();
        fs::write(up.join("a/f"), "one").unwrap();
        let before = record::scan(up, false).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        fs::remove_file(up.join("keep/tmp")).unwrap();
        fs::remove_dir_all(up.join("gone-dir")).unwrap();
        fs::remove_dir_all(up.join("opt")).unwrap();
        fs::create_dir(up.join("opt")).unwrap();
        xattr::set(up.join("opt"), "trusted.overlay.opaque", b"y").unwrap();
        fs::write(up.join("opt/new"), "new").unwrap();
        fs::write(up.join("a/f"), "two").unwrap();
        fs::hard_link(up.join("a/f"), up.join("a-link")).unwrap();
        let after = record::scan(up, false).unwrap();
        let selection = increment::select(&before, &after);
        let upper = Upper {
            dir: up.to_path_buf(),
            userxattr: false,
            options: vec![],
        };
        let layer = write_selected(&upper, Some(&selection), Vec::new()).unwrap();
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            seen.push((path, entry.header().entry_type(), data));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "a/f",
                "a-link",
                ".wh.gone-dir",
                "keep/",
                "keep/.wh.tmp",
                "opt/",
                "opt/.wh..wh..opq",
                "opt/new",
            ]
        );
        assert_eq!(seen[0].2, "two");
        assert_eq!(
            seen[1].1,
            EntryType::Link,
            "the other path of the changed file"
        );
        let full = write_selected(&upper, None, Vec::new()).unwrap();
        assert_eq!(full, write_layer(&upper, Vec::new()).unwrap());
        let none = increment::select(&after, &after);
        assert!(none.is_empty());
        let empty = write_selected(&upper, Some(&none), Vec::new()).unwrap();
        assert_eq!(empty, tar::Builder::new(Vec::new()).into_inner().unwrap());
    }
}
