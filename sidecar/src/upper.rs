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

use anyhow::{Context, Result};
use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    fs::{self, File, Metadata},
    io::{self, BufReader, Read, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
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

/// Writes the upper directory as an uncompressed OCI layer tar into `out`; the
/// container must be paused (nothing in it may change while it is read).
/// Entries come in name order, so the same change gives the same layer.
pub fn write_layer<W: Write>(upper: &Upper, out: W) -> Result<W> {
    let mut walk = Walk {
        tar: tar::Builder::new(out),
        overlay_prefix: if upper.userxattr {
            "user.overlay."
        } else {
            "trusted.overlay."
        },
        links: HashMap::new(),
    };
    walk.dir(&upper.dir, Path::new(""))?;
    walk.tar.into_inner().context("finishing the layer tar")
}

struct Walk<W: Write> {
    tar: tar::Builder<W>,
    overlay_prefix: &'static str,
    /// (device, inode) of files with several links -> their first path in the layer.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Walk<W> {
    fn dir(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<OsString> = fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .with_context(|| format!("listing {}", dir.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            self.entry(&path, &rel.join(&name), &name, &meta)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &Path, name: &OsStr, meta: &Metadata) -> Result<()> {
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            let whiteout = rel
                .parent()
                .unwrap_or(Path::new(""))
                .join(OsStr::from_bytes(
                    &[WHITEOUT.as_bytes(), name.as_bytes()].concat(),
                ));
            return self.empty_file(&whiteout, meta);
        }
        let xattrs = self.xattrs(path, meta)?;
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
                rel.display()
            ))
            .into());
        }
        if !xattrs.others.is_empty() {
            self.pax(rel, &xattrs.others)?;
        }
        let mut header = header_from(meta);
        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
            self.tar
                .append_data(&mut header, dir_name(rel), io::empty())
                .with_context(|| format!("adding {}", rel.display()))?;
            if opaque {
                self.empty_file(&rel.join(OPAQUE), meta)?;
            }
            return self.dir(path, rel);
        }
        if kind.is_symlink() {
            let target =
                fs::read_link(path).with_context(|| format!("reading link {}", path.display()))?;
            header.set_entry_type(EntryType::Symlink);
            header.set_size(0);
            return self
                .tar
                .append_link(&mut header, rel, target)
                .with_context(|| format!("adding {}", rel.display()));
        }
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(EntryType::Link);
                header.set_size(0);
                let first = first.clone();
                return self
                    .tar
                    .append_link(&mut header, rel, first)
                    .with_context(|| format!("adding {}", rel.display()));
            }
            self.links.insert(key, rel.to_path_buf());
        }
        if kind.is_file() {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let data = Exact::new(file, meta.len(), path);
            return self
                .tar
                .append_data(&mut header, rel, BufReader::with_capacity(1 << 20, data))
                .with_context(|| format!("adding {}", rel.display()));
        }
        let (kind, device) = if kind.is_char_device() {
            (EntryType::Char, true)
        } else if kind.is_block_device() {
            (EntryType::Block, true)
        } else if kind.is_fifo() {
            (EntryType::Fifo, false)
        } else {
            // a socket: a layer cannot hold one, and a socket is never worth restoring
            return Ok(());
        };
        header.set_entry_type(kind);
        header.set_size(0);
        if device {
            let (major, minor) = device_numbers(meta.rdev());
            header.set_device_major(major)?;
            header.set_device_minor(minor)?;
        }
        self.tar
            .append_data(&mut header, rel, io::empty())
            .with_context(|| format!("adding {}", rel.display()))
    }

    fn empty_file(&mut self, rel: &Path, like: &Metadata) -> Result<()> {
        let mut header = header_from(like);
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        self.tar
            .append_data(&mut header, rel, io::empty())
            .with_context(|| format!("adding {}", rel.display()))
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
            .with_context(|| format!("adding the attributes of {}", rel.display()))
    }

    fn xattrs(&self, path: &Path, meta: &Metadata) -> Result<Xattrs> {
        let mut found = Xattrs::default();
        if meta.file_type().is_symlink() {
            // a symlink's own attributes are rare; overlay only marks directories and files
            return Ok(found);
        }
        let names = match xattr::list(path) {
            Ok(names) => names,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("attributes of {}", path.display())),
        };
        for name in names {
            let value = xattr::get(path, &name)
                .with_context(|| format!("attribute {name:?} of {}", path.display()))?
                .unwrap_or_default();
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

fn header_from(meta: &Metadata) -> Header {
    let mut header = Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(meta.uid() as u64);
    header.set_gid(meta.gid() as u64);
    header.set_mtime(meta.mtime().max(0) as u64);
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

/// PAX records: `"<length> <key>=<value>\n"`, the length counting itself.
pub fn pax_records<'a>(records: impl Iterator<Item = (Vec<u8>, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(&key);
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// A file's data, exactly as long as its header says: a file that shrank while
/// it was read (possible only with the pause off) is an error, not a corrupt tar.
struct Exact {
    inner: io::Take<File>,
    left: u64,
    path: PathBuf,
}

impl Exact {
    fn new(file: File, len: u64, path: &Path) -> Self {
        Self {
            inner: file.take(len),
            left: len,
            path: path.to_path_buf(),
        }
    }
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was read", self.path.display()),
            ));
        }
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
}
