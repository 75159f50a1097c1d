//! Reading a tree that its owner may change while it is read, without ever
//! leaving it. Every entry is opened relative to its parent directory's
//! descriptor, one component at a time, with `O_NOFOLLOW` (a symbolic link is
//! opened as itself, never followed) and first with `O_PATH` (a device node is
//! never opened for real, a FIFO never blocks). Its type, size and attributes
//! come from that descriptor, and its data and children are read through it.
//! An entry swapped for another between the listing and the open is simply
//! the entry now at that name: the owner's change of it, inside the same tree.
//!
//! This is what keeps a desktop that races renames against its own snapshot
//! from making the sidecar read another desktop's files: no path is resolved
//! twice, and no link is followed, so nothing outside the tree can be reached.

use rustix::fs::{self as rfs, FileType, Mode, OFlags};
use std::{
    ffi::{CStr, OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// What the walk needs of an entry, read from its descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub kind: FileType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub rdev: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Last status change, ns since the epoch: moves on every write,
    /// truncation, attribute, link or name change.
    pub ctime_ns: i128,
}

impl Meta {
    fn of(fd: impl AsFd) -> io::Result<Self> {
        let st = rfs::fstat(fd)?;
        #[allow(clippy::unnecessary_cast)] // field widths differ between architectures
        Ok(Self {
            kind: FileType::from_raw_mode(st.st_mode as _),
            mode: st.st_mode as u32,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: st.st_size.max(0) as u64,
            mtime: st.st_mtime as i64,
            rdev: st.st_rdev as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        })
    }

    /// A whiteout in overlay's notation: a character device 0:0.
    pub fn is_whiteout(&self) -> bool {
        self.kind == FileType::CharacterDevice && self.rdev == 0
    }
}

/// An entry held by an `O_PATH` descriptor: the object itself, not its name.
pub struct Entry {
    fd: OwnedFd,
    pub meta: Meta,
}

impl Entry {
    /// The directory at `path` (the root of the tree: a path the caller trusts,
    /// its last component not followed if it is a link).
    pub fn root(path: &Path) -> io::Result<Self> {
        let fd = rfs::open(
            path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let meta = Meta::of(&fd)?;
        if meta.kind != FileType::Directory {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Self { fd, meta })
    }

    /// The entry called `name` in directory `parent`; `None` when it is gone
    /// (removed since the listing).
    pub fn open(parent: &Dir, name: &OsStr) -> io::Result<Option<Self>> {
        if name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a single name",
            ));
        }
        match rfs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(Self {
                meta: Meta::of(&fd)?,
                fd,
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// This directory, opened for listing (the same inode, no name resolved).
    pub fn dir(&self) -> io::Result<Dir> {
        if self.meta.kind != FileType::Directory {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let fd = rfs::openat(
            &self.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd })
    }

    /// This regular file, opened for reading: the same inode, reopened through
    /// its descriptor (`/proc/self/fd`), never by name.
    pub fn file(&self) -> io::Result<File> {
        if self.meta.kind != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let fd = rfs::open(
            self.proc_path(),
            OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let reopened = Meta::of(&fd)?;
        if (reopened.dev, reopened.ino) != (self.meta.dev, self.meta.ino) {
            return Err(io::Error::other(
                "the file was replaced while it was opened",
            ));
        }
        Ok(File::from(fd))
    }

    /// This symbolic link's target, read from the link itself.
    pub fn link_target(&self) -> io::Result<OsString> {
        let target = rfs::readlinkat(&self.fd, c"", Vec::new())?;
        Ok(OsStr::from_bytes(target.as_bytes()).to_os_string())
    }

    /// This entry's extended attributes, names and values (none for a link).
    pub fn xattrs(&self) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        if self.meta.kind == FileType::Symlink {
            return Ok(Vec::new());
        }
        // `/proc/self/fd/N` is the inode this descriptor holds; the dereferencing
        // calls read that inode's attributes without opening it
        let path = self.proc_path();
        let names = match xattr::list_deref(&path) {
            Ok(names) => names,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for name in names {
            if let Some(value) = xattr::get_deref(&path, &name)? {
                out.push((name, value));
            }
        }
        Ok(out)
    }

    fn proc_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A directory opened for listing; its entries are opened relative to it.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// The names in this directory (without `.` and `..`), in byte order; kept
    /// in one buffer, so a directory of a million entries costs tens of MiB.
    pub fn names(&self) -> io::Result<Names> {
        Names::of(&self.fd)
    }
}

/// Names packed in one buffer: `(start, end)` ranges into `bytes`.
#[derive(Default)]
pub struct Names {
    bytes: Vec<u8>,
    ranges: Vec<(u32, u32)>,
}

impl Names {
    /// The names in the directory open at `fd` (without `.` and `..`), in
    /// byte order.
    pub fn of(fd: &OwnedFd) -> io::Result<Self> {
        let mut listing = rfs::Dir::read_from(fd)?;
        let mut names = Names::default();
        for entry in &mut listing {
            let entry = entry?;
            let name: &CStr = entry.file_name();
            let bytes = name.to_bytes();
            if bytes != b"." && bytes != b".." {
                names.push(bytes);
            }
        }
        names.sort();
        Ok(names)
    }

    fn push(&mut self, name: &[u8]) {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        self.ranges.push((start, self.bytes.len() as u32));
    }

    fn sort(&mut self) {
        let bytes = &self.bytes;
        self.ranges.sort_unstable_by(|a, b| {
            bytes[a.0 as usize..a.1 as usize].cmp(&bytes[b.0 as usize..b.1 as usize])
        });
        self.ranges.shrink_to_fit();
        self.bytes.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The `i`th name, if there are that many.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let &(s, e) = self.ranges.get(i)?;
        Some(&self.bytes[s as usize..e as usize])
    }

    pub fn iter(&self) -> impl Iterator<Item = &OsStr> + '_ {
        self.ranges
            .iter()
            .map(|&(s, e)| OsStr::from_bytes(&self.bytes[s as usize..e as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, io::Read};

    #[test]
    fn entries_are_opened_as_themselves_and_links_are_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "neighbour").unwrap();
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join("d")).unwrap();
        fs::write(tree.path().join("d/f"), "mine").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tree.path().join("s")).unwrap();

        let root = Entry::root(tree.path()).unwrap().dir().unwrap();
        let names: Vec<_> = root
            .names()
            .unwrap()
            .iter()
            .map(|n| n.to_os_string())
            .collect();
        assert_eq!(names, ["d", "escape", "s"]);

        let escape = Entry::open(&root, OsStr::new("escape")).unwrap().unwrap();
        assert_eq!(escape.meta.kind, FileType::Symlink);
        assert!(
            escape.dir().is_err(),
            "a link to a directory is not a directory"
        );
        assert_eq!(escape.link_target().unwrap(), outside.path().as_os_str());
        let s = Entry::open(&root, OsStr::new("s")).unwrap().unwrap();
        assert!(s.file().is_err(), "a link to a file is not opened");

        let d = Entry::open(&root, OsStr::new("d"))
            .unwrap()
            .unwrap()
            .dir()
            .unwrap();
        let f = Entry::open(&d, OsStr::new("f")).unwrap().unwrap();
        let mut text = String::new();
        f.file().unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "mine");
        assert_eq!(f.meta.size, 4);

        assert!(Entry::open(&root, OsStr::new("gone")).unwrap().is_none());
        for bad in ["..", ".", "d/f", ""] {
            assert!(Entry::open(&root, OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_fifo_is_opened_without_blocking_and_never_read() {
        let tree = tempfile::tempdir().unwrap();
        let fifo = std::ffi::CString::new(tree.path().join("p").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let root = Entry::root(tree.path()).unwrap().dir().unwrap();
        let p = Entry::open(&root, OsStr::new("p")).unwrap().unwrap();
        assert_eq!(p.meta.kind, FileType::Fifo);
        assert!(p.file().is_err());
    }

    #[test]
    fn names_come_sorted_by_bytes() {
        let tree = tempfile::tempdir().unwrap();
        for n in ["b", "a", "B", "ab", "\u{e9}"] {
            fs::write(tree.path().join(n), "").unwrap();
        }
        let root = Entry::root(tree.path()).unwrap().dir().unwrap();
        let names = root.names().unwrap();
        let got: Vec<_> = names
            .iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, ["B", "a", "ab", "b", "\u{e9}"]);
        assert_eq!(names.len(), 5);
    }
}
