//! What every writer of a layer tar shares: PAX records, the header of an
//! entry with no data, paths as error texts show them, and order keys (a
//! relative path whose names are joined by NUL bytes, so that a directory
//! sorts right before what it holds).

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// The header of an entry with no data, owned by root, dated 0: a whiteout
/// or opaque marker (a regular file, 0644) or a directory the layer implies.
pub fn empty_header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header
}

/// A path inside the container as the desktop sees it, quoted and escaped, for
/// error texts (a name may hold newlines or terminal escapes).
pub fn shown(rel: &Path) -> String {
    format!("{:?}", Path::new("/").join(rel).to_string_lossy())
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

/// The key of `name` in directory `parent`.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, &[0], name].concat()
    }
}

/// The relative path of a key (`a\0b` -> `a/b`).
pub fn key_path(key: &[u8]) -> PathBuf {
    let bytes: Vec<u8> = key.iter().map(|&b| if b == 0 { b'/' } else { b }).collect();
    PathBuf::from(OsStr::from_bytes(&bytes))
}

/// The key of a relative path (`a/b` -> `a\0b`; empty and `.` components go).
pub fn path_key(path: &Path) -> Vec<u8> {
    let mut key = Vec::new();
    for part in path.as_os_str().as_bytes().split(|&b| b == b'/') {
        if part.is_empty() || part == b"." {
            continue;
        }
        if !key.is_empty() {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}
