//! Merging layers: several OCI layer tars (uncompressed, oldest first) become
//! one layer with the same effect on whatever lies below them. It serves the
//! squash that keeps the base: the snapshot's own layers are merged, the base
//! image's stay as they are, so the merged layer must be right over a lower
//! filesystem it never sees. The rules (OCI image-spec, `layer.md`):
//!
//! - A layer's whiteouts (`dir/.wh.name`) and opaque markers
//!   (`dir/.wh..wh..opq`) act on the layers below it only; then its entries
//!   are applied in tar order, a later entry at a path winning over an earlier
//!   one, in the same layer or not.
//! - A non-directory replaces whatever was at its path, a directory's subtree
//!   included. A directory over a directory keeps the children and takes the
//!   newer header; a directory over anything else starts empty.
//! - A whiteout that survives is kept (it may delete a base file); one whose
//!   path a later layer re-creates is not: a re-created non-directory is just
//!   the entry, a re-created directory gets an opaque marker (the base's old
//!   content under it stays hidden). Whiteouts below a directory that is
//!   already opaque, deleted or replaced are left out: they change nothing.
//! - An opaque marker drops the earlier layers' entries below its directory
//!   and is kept (as a marker right after the directory's entry).
//! - Every entry, whiteouts and markers included, brings back its missing
//!   parents as containerd and Docker do (`0755`, root, mtime 0). Parents a
//!   layer had deleted or replaced by a non-directory are written out with
//!   those attributes and opaque; the directories below them as well (not
//!   opaque), so they stay even if what brought them back goes later.
//! - Hard links: a link shares its target's file as it was when the link was
//!   applied. Every group of surviving paths sharing one file is written as
//!   the file, with its data and header, at the group's first path, and links
//!   to it at the others; a link whose target was deleted or replaced is thus
//!   materialised as a regular file, chains of links resolve to the file.
//! - Headers are kept (mode, owner ids and names, times, device numbers,
//!   symlink targets, PAX records such as `SCHILY.xattr.*`); paths are
//!   normalised (`./a/b`, `/a/b` and `a/b` are one path) and rewritten, long
//!   ones with GNU long-name records. Whiteouts and markers get a fixed header.
//! - The output is in path order, component by component, each directory
//!   right before its children and its opaque marker right after it, so the
//!   same layers give the same bytes.
//!
//! Two passes: the first reads every layer's headers and keeps one small
//! record per path (which entry of which layer, at which offset); the second
//! reads the surviving entries again through fresh readers and streams their
//! data into the output. Layers in path order (every layer this project and
//! the usual runtimes write) are read once more each; entries out of order
//! cost extra readers or re-reads (counted in [`Summary::rereads`]).

use super::tar::{empty_header, join as join_key, key_path, pax_records, shown};
use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    io::{self, Read, Write},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};
use tar::{EntryType, Header};

/// The OCI whiteout prefix, the opaque-directory marker, and aufs's own
/// metadata names (skipped, as every runtime does).
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const AUFS_META: &[u8] = b".wh..wh.";
/// Readers open at once on one layer in the second pass.
const CURSORS: usize = 4;

/// What a merge wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries written: files, directories, links, devices (whiteouts and
    /// markers aside).
    pub entries: usize,
    /// Whiteouts and opaque markers written.
    pub whiteouts: usize,
    /// Entries of the layers (whiteouts and markers aside) the output does not
    /// carry: shadowed or deleted by a later layer.
    pub dropped: usize,
    /// Hard links written as the file itself (data and header) because their
    /// target did not survive, or sorts after them.
    pub materialised_links: usize,
    /// Layer reads in the second pass beyond one per layer.
    pub rereads: usize,
}

/// Why layers could not be merged; paths are quoted and escaped.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("layer {layer}: {what}: {source}")]
    Read {
        layer: usize,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: {path}: {reason}")]
    Invalid {
        layer: usize,
        path: String,
        reason: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Merges `count` layers (uncompressed tars, oldest first) into one layer
/// written to `out` (pass `&mut w` to keep the writer). `open(i)` opens layer
/// `i` from its start; it is called once per layer for the headers, then once
/// or more per layer for the data, and must give the same bytes every time.
pub fn merge<R, F, W>(mut open: F, count: usize, out: W) -> Result<Summary, MergeError>
where
    R: Read,
    F: FnMut(usize) -> io::Result<R>,
    W: Write,
{
    let mut state = State::default();
    let mut inputs = 0;
    for layer in 0..count {
        let records = read_layer(&mut open, layer)?;
        inputs += records
            .iter()
            .filter(|r| matches!(r.op, Op::Entry(..) | Op::Link(..)))
            .count();
        state.apply(layer, records)?;
    }
    let plan = state.plan();
    let mut summary = Summary {
        dropped: inputs.saturating_sub(
            plan.iter()
                .filter(|i| matches!(i, Item::Copy { .. }))
                .count(),
        ),
        ..Summary::default()
    };
    let mut layers = Layers {
        open,
        pools: (0..count).map(|_| Vec::new()).collect(),
        opened: 0,
    };
    let mut tar = tar::Builder::new(out);
    for item in &plan {
        match *item {
            Item::Whiteout(key) => {
                let (parent, name) = split(key);
                let name = [WHITEOUT, name].concat();
                let path = join(parent, &name);
                append_marker(&mut tar, &path)?;
                summary.whiteouts += 1;
            }
            Item::Marker(key) => {
                append_marker(&mut tar, &join(key, OPAQUE))?;
                summary.whiteouts += 1;
            }
            Item::Implicit(key, opaque) => {
                let mut header = empty_header(EntryType::Directory, 0o755);
                let path = dir_path(key);
                tar.append_data(&mut header, &path, io::empty())
                    .map_err(|e| write_error(&path, e))?;
                if opaque {
                    append_marker(&mut tar, &join(key, OPAQUE))?;
                }
                summary.entries += 1;
                summary.whiteouts += usize::from(opaque);
            }
            Item::Copy {
                key,
                from,
                link,
                opaque,
                materialised,
            } => {
                let cursor = layers.seek(from)?;
                copy(&mut tar, cursor, from, key, link, opaque)?;
                summary.entries += 1;
                summary.whiteouts += usize::from(opaque);
                summary.materialised_links += usize::from(materialised);
            }
        }
    }
    tar.into_inner()
        .map_err(|e| write_error(Path::new("the end of the layer"), e))?;
    summary.rereads = layers.opened - layers.pools.iter().filter(|p| !p.is_empty()).count();
    Ok(summary)
}

/// Where an entry starts in its layer: the first byte of its own extension
/// headers (long names, PAX records), or of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Loc {
    layer: u32,
    at: u64,
}

/// What an entry of a layer does, from its header alone. Paths are keys:
/// components joined by NUL (which no name holds), so that byte order is
/// path order component by component; the root is the empty key.
enum Op {
    Whiteout(Vec<u8>),
    Opaque(Vec<u8>),
    Entry(Vec<u8>, Kind),
    Link(Vec<u8>, Vec<u8>),
    Skip,
}

struct Record {
    loc: Loc,
    op: Op,
}

/// Pass 1 over one layer: every entry's header, none of its data.
fn read_layer<R: Read, F: FnMut(usize) -> io::Result<R>>(
    open: &mut F,
    layer: usize,
) -> Result<Vec<Record>, MergeError> {
    let read_error = |what: String| {
        move |source| MergeError::Read {
            layer,
            what,
            source,
        }
    };
    let reader = open(layer).map_err(read_error("opening it".into()))?;
    let mut archive = tar::Archive::new(reader);
    let mut records = Vec::new();
    let mut next = 0u64;
    let mut last = String::from("the start");
    for entry in archive
        .entries()
        .map_err(read_error("reading its entries".into()))?
    {
        let mut entry =
            entry.map_err(|e| read_error(format!("reading the entry after {last}"))(e))?;
        let loc = Loc {
            layer: layer as u32,
            at: next,
        };
        next = entry
            .size()
            .checked_add(511)
            .and_then(|s| entry.raw_file_position().checked_add(s & !511))
            .ok_or_else(|| MergeError::Invalid {
                layer,
                path: shown_raw(&entry.path_bytes()),
                reason: "its size overflows".into(),
            })?;
        last = shown_raw(&entry.path_bytes());
        let op = classify(&mut entry).map_err(|reason| MergeError::Invalid {
            layer,
            path: last.clone(),
            reason,
        })?;
        records.push(Record { loc, op });
    }
    Ok(records)
}

/// The kinds of paths as the first pass sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Deleted by a whiteout: gone from the layers and from the base.
    Gone,
    Dir,
    /// A directory an entry below it brought back; no header of its own.
    Implicit,
    /// Whatever the base has here, with its content hidden (an opaque marker
    /// with no directory entry).
    OpaqueOnly,
    File,
    /// A symlink, device node or FIFO.
    Other,
    /// A hard link: shares the file of [`Node::src`].
    Link,
}

impl Kind {
    fn is_dir(self) -> bool {
        matches!(self, Kind::Dir | Kind::Implicit | Kind::OpaqueOnly)
    }
    fn is_nondir(self) -> bool {
        matches!(self, Kind::File | Kind::Other | Kind::Link)
    }
}

fn classify<R: Read>(entry: &mut tar::Entry<R>) -> Result<Op, String> {
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(Op::Skip);
    }
    if kind.is_gnu_sparse() {
        return Err("GNU sparse files are not supported".into());
    }
    if let Some(pax) = entry.pax_extensions().map_err(|e| e.to_string())? {
        for record in pax {
            let record = record.map_err(|e| e.to_string())?;
            if record.key_bytes().starts_with(b"GNU.sparse.") {
                return Err("PAX sparse files are not supported".into());
            }
        }
    }
    let raw = entry.path_bytes();
    let key = normalise(&raw)?;
    let (parent, name) = split(&key);
    if name == OPAQUE {
        return Ok(Op::Opaque(parent.to_vec()));
    }
    if name.starts_with(AUFS_META) {
        return Ok(Op::Skip);
    }
    if let Some(target) = name.strip_prefix(WHITEOUT) {
        if target.is_empty() || target == b"." || target == b".." {
            return Err("a whiteout without a name".into());
        }
        return Ok(Op::Whiteout(join_key(parent, target)));
    }
    let kind = match kind {
        EntryType::Directory => Kind::Dir,
        EntryType::Regular if raw.ends_with(b"/") => Kind::Dir,
        EntryType::Regular | EntryType::Continuous => Kind::File,
        EntryType::Symlink | EntryType::Char | EntryType::Block | EntryType::Fifo => Kind::Other,
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or("a hard link without a target")?;
            return Ok(Op::Link(key, normalise(&target)?));
        }
        other => return Err(format!("entry type {:?} is not supported", other.as_byte())),
    };
    if key.is_empty() && kind != Kind::Dir {
        return Err("the root must be a directory".into());
    }
    Ok(Op::Entry(key, kind))
}

/// `./a//b/` -> `a\0b`; `..` is refused.
fn normalise(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut key = Vec::with_capacity(raw.len());
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("a path with `..`".into()),
            _ if part.contains(&0) => return Err("a path with a NUL byte".into()),
            _ => {}
        }
        if !key.is_empty() {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    Ok(key)
}

/// A key's parent and last name (the root's are both empty).
fn split(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().rposition(|&b| b == 0) {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (&[], key),
    }
}

/// The path in the layer of `name` under the directory `parent`.
fn join(parent: &[u8], name: &[u8]) -> PathBuf {
    key_path(&join_key(parent, name))
}

/// A directory's name in the layer ends with `/`; the root is `./`.
fn dir_path(key: &[u8]) -> PathBuf {
    if key.is_empty() {
        return PathBuf::from("./");
    }
    let mut path = key_path(key).into_os_string();
    path.push("/");
    PathBuf::from(path)
}

fn shown_raw(raw: &[u8]) -> String {
    shown(Path::new(OsStr::from_bytes(raw)))
}

fn shown_key(key: &[u8]) -> String {
    shown(&key_path(key))
}

/// One path's outcome so far.
#[derive(Debug, Clone, Copy)]
struct Node {
    kind: Kind,
    /// A directory that hides what the base has below it.
    opaque: bool,
    /// The entry that set it.
    at: Loc,
    /// Where its file is: itself, or for a hard link the linked entry.
    src: Loc,
}

/// The layers applied so far over an unknown base: the paths they touched.
#[derive(Default)]
struct State {
    map: BTreeMap<Vec<u8>, Node>,
}

impl State {
    fn apply(&mut self, layer: usize, records: Vec<Record>) -> Result<(), MergeError> {
        for record in &records {
            match &record.op {
                Op::Whiteout(key) => self.whiteout(key, record.loc),
                Op::Opaque(dir) => self.opaque(dir, record.loc),
                _ => {}
            }
        }
        for record in records {
            match record.op {
                Op::Entry(key, kind) => self.entry(key, kind, record.loc),
                Op::Link(key, target) => {
                    let Some(src) = self.map.get(&target).filter(|n| n.kind.is_nondir()) else {
                        return Err(MergeError::Invalid {
                            layer,
                            path: shown_key(&key),
                            reason: format!(
                                "a hard link to {}, which no earlier entry of the layers holds",
                                shown_key(&target)
                            ),
                        });
                    };
                    let src = src.src;
                    self.make_parents(&key, record.loc);
                    self.clear_below(&key);
                    self.map.insert(
                        key,
                        Node {
                            kind: Kind::Link,
                            opaque: false,
                            at: record.loc,
                            src,
                        },
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn clear_below(&mut self, key: &[u8]) {
        let below: Vec<Vec<u8>> = if key.is_empty() {
            self.map.keys().filter(|k| !k.is_empty()).cloned().collect()
        } else {
            let low = [key, &[0]].concat();
            let high = [key, &[1]].concat();
            self.map.range(low..high).map(|(k, _)| k.clone()).collect()
        };
        for k in below {
            self.map.remove(&k);
        }
    }

    /// The keys of `key`'s ancestors, the root first, `key` excluded.
    fn ancestors(key: &[u8]) -> impl Iterator<Item = &[u8]> {
        let inner = key
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == 0)
            .map(move |(i, _)| &key[..i]);
        let root: Option<&[u8]> = (!key.is_empty()).then_some(&[]);
        root.into_iter().chain(inner)
    }

    /// Whether the base's `key` is hidden by what is above it: a deleted,
    /// replaced or opaque ancestor.
    fn hidden(&self, key: &[u8]) -> bool {
        Self::ancestors(key).any(|a| {
            self.map
                .get(a)
                .is_some_and(|n| !n.kind.is_dir() || n.opaque)
        })
    }

    /// Brings back the parents of `key`, as appliers do for every entry
    /// (whiteouts and markers too): those a layer deleted or replaced come
    /// back opaque, those below them come back (the base's are hidden);
    /// others are the base's, or made by the applier of the output as well.
    fn make_parents(&mut self, key: &[u8], at: Loc) {
        let ancestors: Vec<Vec<u8>> = Self::ancestors(key).map(<[u8]>::to_vec).collect();
        let mut hidden = false;
        for a in ancestors {
            let implicit = |opaque| Node {
                kind: Kind::Implicit,
                opaque,
                at,
                src: at,
            };
            match self.map.get_mut(&a) {
                Some(node) if node.kind.is_dir() => hidden |= node.opaque,
                Some(node) => {
                    *node = implicit(true);
                    hidden = true;
                }
                None if hidden => {
                    self.map.insert(a, implicit(false));
                }
                None => {}
            }
        }
    }

    fn whiteout(&mut self, key: &[u8], at: Loc) {
        self.make_parents(key, at);
        self.clear_below(key);
        if self.hidden(key) {
            self.map.remove(key);
        } else {
            let at = Loc { layer: 0, at: 0 };
            self.map.insert(
                key.to_vec(),
                Node {
                    kind: Kind::Gone,
                    opaque: false,
                    at,
                    src: at,
                },
            );
        }
    }

    fn opaque(&mut self, dir: &[u8], at: Loc) {
        self.make_parents(dir, at);
        self.clear_below(dir);
        let node = Node {
            kind: Kind::Implicit,
            opaque: true,
            at,
            src: at,
        };
        match self.map.get_mut(dir) {
            Some(n) if n.kind.is_dir() => n.opaque = true,
            Some(n) => *n = node,
            None => {
                self.map.insert(
                    dir.to_vec(),
                    Node {
                        kind: Kind::OpaqueOnly,
                        ..node
                    },
                );
            }
        }
    }

    fn entry(&mut self, key: Vec<u8>, kind: Kind, at: Loc) {
        self.make_parents(&key, at);
        let mut node = Node {
            kind,
            opaque: false,
            at,
            src: at,
        };
        if kind == Kind::Dir {
            // over a directory: its children and opacity stay; over anything
            // the layers put (or deleted) here: nothing of the base shows
            node.opaque = self
                .map
                .get(&key)
                .is_some_and(|n| !n.kind.is_dir() || n.opaque);
        } else {
            self.clear_below(&key);
        }
        self.map.insert(key, node);
    }

    /// What the output holds, in order.
    fn plan(&self) -> Vec<Item<'_>> {
        let mut groups: HashMap<Loc, Option<&[u8]>> = self
            .map
            .values()
            .filter(|n| n.kind == Kind::Link)
            .map(|n| (n.src, None))
            .collect();
        let mut plan = Vec::with_capacity(self.map.len());
        for (key, node) in &self.map {
            let key = key.as_slice();
            let item = match node.kind {
                Kind::Gone => Item::Whiteout(key),
                Kind::OpaqueOnly => Item::Marker(key),
                Kind::Implicit => Item::Implicit(key, node.opaque),
                Kind::Dir => Item::Copy {
                    key,
                    from: node.at,
                    link: None,
                    opaque: node.opaque,
                    materialised: false,
                },
                Kind::File | Kind::Other | Kind::Link => match groups.get_mut(&node.src) {
                    Some(Some(first)) => Item::Copy {
                        key,
                        from: node.at,
                        link: Some(first),
                        opaque: false,
                        materialised: false,
                    },
                    Some(slot) => {
                        *slot = Some(key);
                        Item::Copy {
                            key,
                            from: node.src,
                            link: None,
                            opaque: false,
                            materialised: node.kind == Kind::Link,
                        }
                    }
                    None => Item::Copy {
                        key,
                        from: node.at,
                        link: None,
                        opaque: false,
                        materialised: false,
                    },
                },
            };
            plan.push(item);
        }
        plan
    }
}

enum Item<'a> {
    /// `parent/.wh.name`
    Whiteout(&'a [u8]),
    /// `dir/.wh..wh..opq` alone
    Marker(&'a [u8]),
    /// A directory brought back by an entry below it, and its marker if set.
    Implicit(&'a [u8], bool),
    /// The entry at `from` written at `key` (as a hard link to `link` if
    /// set), then an opaque marker if `opaque`.
    Copy {
        key: &'a [u8],
        from: Loc,
        link: Option<&'a [u8]>,
        opaque: bool,
        materialised: bool,
    },
}

/// A layer's reader that knows how far it is.
struct Cursor<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Cursor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The second pass's readers: a few per layer, each only ever going forward.
struct Layers<R, F> {
    open: F,
    pools: Vec<Vec<Cursor<R>>>,
    opened: usize,
}

impl<R: Read, F: FnMut(usize) -> io::Result<R>> Layers<R, F> {
    /// A reader of `loc.layer` positioned at `loc.at`: the open one closest
    /// behind it, else a fresh one.
    fn seek(&mut self, loc: Loc) -> Result<&mut Cursor<R>, MergeError> {
        let layer = loc.layer as usize;
        let pool = &mut self.pools[layer];
        let behind = pool
            .iter()
            .enumerate()
            .filter(|(_, c)| c.pos <= loc.at)
            .max_by_key(|(_, c)| c.pos)
            .map(|(i, _)| i);
        let i = match behind {
            Some(i) => i,
            None => {
                let inner = (self.open)(layer).map_err(|source| MergeError::Read {
                    layer,
                    what: "opening it again".into(),
                    source,
                })?;
                self.opened += 1;
                let fresh = Cursor { inner, pos: 0 };
                if pool.len() < CURSORS {
                    pool.push(fresh);
                    pool.len() - 1
                } else {
                    let i = (0..pool.len()).max_by_key(|&i| pool[i].pos).unwrap_or(0);
                    pool[i] = fresh;
                    i
                }
            }
        };
        let cursor = &mut pool[i];
        let skip = loc.at - cursor.pos;
        let skipped =
            io::copy(&mut (&mut *cursor).take(skip), &mut io::sink()).map_err(|source| {
                MergeError::Read {
                    layer,
                    what: "reading it again".into(),
                    source,
                }
            })?;
        if skipped < skip {
            return Err(MergeError::Read {
                layer,
                what: "reading it again".into(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it is shorter than on the first read",
                ),
            });
        }
        Ok(cursor)
    }
}

/// Writes the entry that starts at the reader's position at `key`.
fn copy<R: Read, W: Write>(
    tar: &mut tar::Builder<W>,
    reader: &mut Cursor<R>,
    from: Loc,
    key: &[u8],
    link: Option<&[u8]>,
    opaque: bool,
) -> Result<(), MergeError> {
    let layer = from.layer as usize;
    let changed = |what: &str| MergeError::Read {
        layer,
        what: format!("reading {} again", shown_key(key)),
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
    };
    let read_error = |source| MergeError::Read {
        layer,
        what: format!("reading {} again", shown_key(key)),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(read_error)?;
    let mut entry = entries
        .next()
        .ok_or_else(|| changed("the layer ends early: it changed since the first read"))?
        .map_err(read_error)?;
    let op = classify(&mut entry).map_err(|reason| changed(&reason))?;
    let mut records = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(read_error)? {
        for record in pax {
            let record = record.map_err(read_error)?;
            if !matches!(record.key_bytes(), b"path" | b"linkpath" | b"size") {
                records.push((record.key_bytes().to_vec(), record.value_bytes().to_vec()));
            }
        }
    }
    let path = key_path(key);
    let written = |e| write_error(&path, e);
    let mut header = entry.header().clone();
    let pax = |tar: &mut tar::Builder<W>| {
        if records.is_empty() {
            return Ok(());
        }
        append_pax(tar, split(key).1, &records).map_err(written)
    };
    if let Some(first) = link {
        header.set_entry_type(EntryType::Link);
        header.set_size(0);
        pax(tar)?;
        return tar
            .append_link(&mut header, &path, key_path(first))
            .map_err(written);
    }
    match op {
        Op::Entry(_, Kind::Dir) => {
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
            pax(tar)?;
            let dir = dir_path(key);
            tar.append_data(&mut header, &dir, io::empty())
                .map_err(|e| write_error(&dir, e))?;
            if opaque {
                append_marker(tar, &join(key, OPAQUE))?;
            }
            Ok(())
        }
        Op::Entry(_, Kind::File) => {
            let size = entry.size();
            header.set_size(size);
            pax(tar)?;
            let mut data = Exact {
                inner: &mut entry,
                left: size,
                failed: false,
            };
            tar.append_data(&mut header, &path, &mut data).map_err(|e| {
                if data.failed {
                    read_error(e)
                } else {
                    written(e)
                }
            })
        }
        Op::Entry(_, Kind::Other) if header.entry_type() == EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| changed("a symlink without a target"))?
                .into_owned();
            header.set_size(0);
            pax(tar)?;
            tar.append_link(&mut header, &path, OsStr::from_bytes(&target))
                .map_err(written)
        }
        Op::Entry(_, Kind::Other) => {
            header.set_size(0);
            pax(tar)?;
            tar.append_data(&mut header, &path, io::empty())
                .map_err(written)
        }
        _ => Err(changed("the entry is not the one of the first read")),
    }
}

/// A whiteout or opaque marker: an empty file with a fixed header.
fn append_marker<W: Write>(tar: &mut tar::Builder<W>, path: &Path) -> Result<(), MergeError> {
    let mut header = empty_header(EntryType::Regular, 0o644);
    tar.append_data(&mut header, path, io::empty())
        .map_err(|e| write_error(path, e))
}

/// A PAX extended header with `records` for the next entry, named after it.
fn append_pax<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &[u8],
    records: &[(Vec<u8>, Vec<u8>)],
) -> io::Result<()> {
    let data = pax_records(records.iter().map(|(k, v)| (k.clone(), v.as_slice())));
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::XHeader);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    let name: String = format!("PaxHeaders.0/{}", String::from_utf8_lossy(name))
        .chars()
        .take(99)
        .collect();
    header
        .set_path(&name)
        .or_else(|_| header.set_path("PaxHeaders.0/entry"))?;
    header.set_cksum();
    tar.append(&header, data.as_slice())
}

fn write_error(path: &Path, source: io::Error) -> MergeError {
    MergeError::Write {
        path: shown(path),
        source,
    }
}

/// An entry's data, exactly as long as its header says: a layer that ends
/// inside it is an error, not a short file in the output.
struct Exact<R> {
    inner: R,
    left: u64,
    /// The error came from the layer, not from the output.
    failed: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.failed = true)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            self.failed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer ends inside this file's data",
            ));
        }
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- layers, written as runtimes write them ----

    #[derive(Clone, Debug)]
    enum Put {
        File(String, Vec<u8>, u32),
        /// A file with an extended attribute (a PAX record).
        Xattr(String, Vec<u8>, &'static str, Vec<u8>),
        Dir(String, u32),
        Symlink(String, String),
        Hard(String, String),
        Whiteout(String),
        Opaque(String),
        Dev(String, EntryType, u32, u32),
    }

    fn file(path: &str, data: &str) -> Put {
        Put::File(path.into(), data.into(), 0o644)
    }
    fn dir(path: &str) -> Put {
        Put::Dir(path.into(), 0o755)
    }
    fn symlink(path: &str, target: &str) -> Put {
        Put::Symlink(path.into(), target.into())
    }
    fn hard(path: &str, target: &str) -> Put {
        Put::Hard(path.into(), target.into())
    }
    fn whiteout(path: &str) -> Put {
        Put::Whiteout(path.into())
    }
    fn opaque(path: &str) -> Put {
        Put::Opaque(path.into())
    }

    fn header(kind: EntryType, mode: u32) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(1000);
        header.set_gid(1001);
        header.set_mtime(1_700_000_000 + mode as u64);
        header.set_username("user").unwrap();
        header.set_groupname("group").unwrap();
        header.set_size(0);
        header
    }

    /// `parent/<prefix>name`, `parent` possibly empty.
    fn beside(path: &str, prefix: &str) -> String {
        match path.rsplit_once('/') {
            Some((parent, name)) => format!("{parent}/{prefix}{name}"),
            None => format!("{prefix}{path}"),
        }
    }

    fn layer(puts: &[Put]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        tar.preserve_absolute(true);
        for put in puts {
            match put {
                Put::File(path, data, mode) => {
                    let mut h = header(EntryType::Regular, *mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice()).unwrap();
                }
                Put::Xattr(path, data, key, value) => {
                    let records = [(format!("SCHILY.xattr.{key}").into_bytes(), value.clone())];
                    append_pax(&mut tar, path.as_bytes(), &records).unwrap();
                    let mut h = header(EntryType::Regular, 0o640);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice()).unwrap();
                }
                Put::Dir(path, mode) => {
                    let mut h = header(EntryType::Directory, *mode);
                    tar.append_data(&mut h, format!("{path}/"), io::empty())
                        .unwrap();
                }
                Put::Symlink(path, target) => {
                    let mut h = header(EntryType::Symlink, 0o777);
                    tar.append_link(&mut h, path, target).unwrap();
                }
                Put::Hard(path, target) => {
                    let mut h = header(EntryType::Link, 0o644);
                    tar.append_link(&mut h, path, target).unwrap();
                }
                Put::Whiteout(path) => {
                    let mut h = header(EntryType::Regular, 0o600);
                    tar.append_data(&mut h, beside(path, ".wh."), io::empty())
                        .unwrap();
                }
                Put::Opaque(path) => {
                    let mut h = header(EntryType::Regular, 0o600);
                    let marker = if path.is_empty() || path == "." {
                        ".wh..wh..opq".to_string()
                    } else {
                        format!("{path}/.wh..wh..opq")
                    };
                    tar.append_data(&mut h, marker, io::empty()).unwrap();
                }
                Put::Dev(path, kind, major, minor) => {
                    let mut h = header(*kind, 0o660);
                    if *kind != EntryType::Fifo {
                        h.set_device_major(*major).unwrap();
                        h.set_device_minor(*minor).unwrap();
                    }
                    tar.append_data(&mut h, path, io::empty()).unwrap();
                }
            }
        }
        tar.into_inner().unwrap()
    }

    fn run(layers: &[Vec<u8>]) -> Result<(Vec<u8>, Summary), MergeError> {
        let mut out = Vec::new();
        let summary = merge(|i| Ok(layers[i].as_slice()), layers.len(), &mut out)?;
        Ok((out, summary))
    }

    /// The output's entries as text: `dir/`, `file`, `link -> target`,
    /// `hard => first`.
    fn listing(layer: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(layer);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let target = entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned());
            seen.push(match entry.header().entry_type() {
                EntryType::Symlink => format!("{path} -> {}", target.unwrap()),
                EntryType::Link => format!("{path} => {}", target.unwrap()),
                _ => path,
            });
        }
        seen
    }

    // ---- the model: layers applied to a filesystem, as layer.md says ----

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Content {
        Dir,
        File(Vec<u8>),
        Symlink(Vec<u8>),
        Dev(u8, Option<u32>, Option<u32>),
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Inode {
        content: Content,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        names: (Vec<u8>, Vec<u8>),
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    impl Inode {
        fn implicit() -> Self {
            Inode {
                content: Content::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                names: Default::default(),
                xattrs: vec![],
            }
        }
        fn base(content: Content) -> Self {
            Inode {
                content,
                mode: 0o700,
                uid: 7,
                gid: 7,
                mtime: 1,
                names: (b"base".to_vec(), b"base".to_vec()),
                xattrs: vec![],
            }
        }
    }

    #[derive(Debug)]
    enum Rec {
        Whiteout(String),
        Opaque(String),
        Put(String, Inode),
        Hard(String, String),
    }

    fn model_path(raw: &[u8]) -> String {
        String::from_utf8(raw.to_vec())
            .unwrap()
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect::<Vec<_>>()
            .join("/")
    }

    fn parse(layer: &[u8]) -> Vec<Rec> {
        let mut archive = tar::Archive::new(layer);
        let mut recs = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = model_path(&entry.path_bytes());
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (p.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            if name == ".wh..wh..opq" {
                recs.push(Rec::Opaque(parent));
                continue;
            }
            if let Some(target) = name.strip_prefix(".wh.") {
                let target = if parent.is_empty() {
                    target.to_string()
                } else {
                    format!("{parent}/{target}")
                };
                recs.push(Rec::Whiteout(target));
                continue;
            }
            let h = entry.header().clone();
            let kind = h.entry_type();
            if kind == EntryType::Link {
                let target = model_path(&entry.link_name_bytes().unwrap());
                recs.push(Rec::Hard(path, target));
                continue;
            }
            let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = entry
                .pax_extensions()
                .unwrap()
                .into_iter()
                .flatten()
                .map(|r| r.unwrap())
                .filter(|r| r.key_bytes().starts_with(b"SCHILY.xattr."))
                .map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec()))
                .collect();
            xattrs.sort();
            let content = match kind {
                EntryType::Directory => Content::Dir,
                EntryType::Regular => {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).unwrap();
                    Content::File(data)
                }
                EntryType::Symlink => Content::Symlink(entry.link_name_bytes().unwrap().to_vec()),
                EntryType::Fifo => Content::Dev(b'6', None, None),
                other => Content::Dev(
                    other.as_byte(),
                    h.device_major().unwrap(),
                    h.device_minor().unwrap(),
                ),
            };
            let inode = Inode {
                content,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                names: (
                    h.username_bytes().unwrap_or_default().to_vec(),
                    h.groupname_bytes().unwrap_or_default().to_vec(),
                ),
                xattrs,
            };
            recs.push(Rec::Put(path, inode));
        }
        recs
    }

    fn under(path: &str, dir: &str) -> bool {
        (dir.is_empty() && !path.is_empty())
            || (path.len() > dir.len()
                && path.starts_with(dir)
                && path.as_bytes()[dir.len()] == b'/')
    }

    /// A filesystem: paths to inodes (hard links share one).
    #[derive(Clone, Default, Debug)]
    struct Fs {
        paths: BTreeMap<String, usize>,
        inodes: Vec<Inode>,
    }

    /// What a filesystem holds: every path's inode and the paths sharing it.
    type Snapshot = BTreeMap<String, (Inode, Vec<String>)>;

    impl Fs {
        fn put(&mut self, path: &str, inode: Inode) {
            self.inodes.push(inode);
            self.paths.insert(path.to_string(), self.inodes.len() - 1);
        }
        fn is_dir(&self, path: &str) -> Option<bool> {
            if path.is_empty() {
                return Some(true);
            }
            self.paths
                .get(path)
                .map(|&i| self.inodes[i].content == Content::Dir)
        }
        fn remove_tree(&mut self, path: &str) {
            self.paths
                .retain(|k, _| !(k == path || under(k, path)) || path.is_empty() && k.is_empty());
        }
        fn remove_children(&mut self, path: &str) {
            self.paths.retain(|k, _| !under(k, path));
        }
        fn ensure_parents(&mut self, path: &str) {
            let parts: Vec<&str> = path.split('/').collect();
            for n in 1..parts.len() {
                let a = parts[..n].join("/");
                match self.is_dir(&a) {
                    Some(true) => {}
                    Some(false) => {
                        self.paths.remove(&a);
                        self.put(&a, Inode::implicit());
                    }
                    None => self.put(&a, Inode::implicit()),
                }
            }
        }
        fn apply(&mut self, recs: &[Rec]) -> Result<(), String> {
            for rec in recs {
                match rec {
                    Rec::Whiteout(path) => {
                        self.ensure_parents(path);
                        self.remove_tree(path);
                    }
                    Rec::Opaque(dir) => {
                        if !dir.is_empty() {
                            self.ensure_parents(dir);
                            if self.is_dir(dir) != Some(true) {
                                self.paths.remove(dir);
                                self.put(dir, Inode::implicit());
                            }
                        }
                        self.remove_children(dir);
                    }
                    _ => {}
                }
            }
            for rec in recs {
                match rec {
                    Rec::Put(path, inode) => {
                        if !path.is_empty() {
                            self.ensure_parents(path);
                        }
                        if inode.content == Content::Dir && self.is_dir(path) == Some(true) {
                            self.put(path, inode.clone());
                        } else {
                            self.remove_tree(path);
                            self.put(path, inode.clone());
                        }
                    }
                    Rec::Hard(path, target) => {
                        let &ino = self
                            .paths
                            .get(target)
                            .ok_or(format!("{path}: no {target} to link to"))?;
                        if self.inodes[ino].content == Content::Dir {
                            return Err(format!("{path}: {target} is a directory"));
                        }
                        self.ensure_parents(path);
                        self.remove_tree(path);
                        self.paths.insert(path.clone(), ino);
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        fn snapshot(&self) -> Snapshot {
            self.paths
                .iter()
                .map(|(path, &ino)| {
                    let inode = self.inodes[ino].clone();
                    let group = if inode.content == Content::Dir {
                        vec![]
                    } else {
                        self.paths
                            .iter()
                            .filter(|(_, &i)| i == ino)
                            .map(|(p, _)| p.clone())
                            .collect()
                    };
                    (path.clone(), (inode, group))
                })
                .collect()
        }
    }

    fn apply_all(base: &Fs, layers: &[Vec<u8>]) -> Result<Snapshot, String> {
        let mut fs = base.clone();
        for layer in layers {
            fs.apply(&parse(layer))?;
        }
        Ok(fs.snapshot())
    }

    /// Bases that hold the paths the layers touch: as directories with
    /// content of their own, as files, and mixed.
    fn bases(layers: &[Vec<u8>]) -> Vec<Fs> {
        let mut touched = std::collections::BTreeSet::new();
        for layer in layers {
            for rec in parse(layer) {
                let path = match rec {
                    Rec::Whiteout(p) | Rec::Opaque(p) | Rec::Put(p, _) | Rec::Hard(p, _) => p,
                };
                let parts: Vec<&str> = path.split('/').collect();
                for n in 1..=parts.len() {
                    touched.insert(parts[..n].join("/"));
                }
            }
        }
        touched.remove("");
        let mut out = vec![Fs::default()];
        for style in 0..3u64 {
            let mut fs = Fs::default();
            for (n, path) in touched.iter().enumerate() {
                let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                if fs.is_dir(parent) != Some(true) {
                    continue;
                }
                let leaf = !touched.iter().any(|p| under(p, path));
                let as_file = match style {
                    0 => false,
                    1 => leaf,
                    _ => (n as u64 * 7 + path.len() as u64).is_multiple_of(3),
                };
                if as_file {
                    fs.put(path, Inode::base(Content::File(b"base".to_vec())));
                } else {
                    fs.put(path, Inode::base(Content::Dir));
                    fs.put(
                        &format!("{path}/x"),
                        Inode::base(Content::File(b"x".to_vec())),
                    );
                    fs.put(&format!("{path}/y"), Inode::base(Content::Dir));
                    fs.put(
                        &format!("{path}/y/z"),
                        Inode::base(Content::Symlink(b"../x".to_vec())),
                    );
                }
            }
            out.push(fs);
        }
        out
    }

    /// Component by component: `a/b` < `a/b/c` < `a/b.c`.
    fn path_order(path: &str) -> Vec<&str> {
        path.split('/').filter(|c| !c.is_empty()).collect()
    }

    /// The merged layer's shape: one entry a path, in order, markers right
    /// after their directory, no whiteout next to or above an entry, links
    /// to an earlier entry.
    fn check_shape(merged: &[u8]) {
        let mut archive = tar::Archive::new(merged);
        let mut previous: Option<(String, bool)> = None;
        let mut seen: Vec<String> = Vec::new();
        let mut whiteouts: Vec<String> = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = model_path(&entry.path_bytes());
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (p.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            if name == ".wh..wh..opq" {
                if seen.contains(&parent) {
                    assert_eq!(
                        previous.as_ref().map(|p| p.0.as_str()),
                        Some(parent.as_str()),
                        "the marker of {parent} follows it"
                    );
                }
                continue;
            }
            let (key, is_whiteout) = match name.strip_prefix(".wh.") {
                Some(t) if parent.is_empty() => (t.to_string(), true),
                Some(t) => (format!("{parent}/{t}"), true),
                None => (path.clone(), false),
            };
            if let Some((prev, _)) = &previous {
                assert!(
                    path_order(prev) < path_order(&key),
                    "{prev} before {key}, once"
                );
            }
            if is_whiteout {
                whiteouts.push(key.clone());
            } else {
                for w in &whiteouts {
                    assert!(
                        !(key == *w || under(&key, w)),
                        "{key} below its whiteout {w}"
                    );
                }
                if entry.header().entry_type() == EntryType::Link {
                    let target = model_path(&entry.link_name_bytes().unwrap());
                    assert!(seen.contains(&target), "{key} links to {target}, before it");
                }
                seen.push(key.clone());
            }
            previous = Some((key, is_whiteout));
        }
    }

    /// Merges `layers`, and checks that the result does what the layers do
    /// over every base, is well formed, and merges into itself.
    fn check(layers: &[Vec<u8>]) -> (Vec<u8>, Summary) {
        let (merged, summary) = run(layers).unwrap();
        for base in bases(layers) {
            let want = apply_all(&base, layers).unwrap();
            let got = apply_all(&base, std::slice::from_ref(&merged)).unwrap();
            assert_eq!(
                got,
                want,
                "\nlayers: {:#?}\nmerged: {:#?}\nbase: {:?}",
                layers.iter().map(|l| listing(l)).collect::<Vec<_>>(),
                listing(&merged),
                base.paths.keys().collect::<Vec<_>>()
            );
        }
        check_shape(&merged);
        let (again, _) = run(std::slice::from_ref(&merged)).unwrap();
        assert_eq!(listing(&again), listing(&merged), "merging is idempotent");
        assert_eq!(again, merged, "merging is idempotent");
        (merged, summary)
    }

    fn layers(stack: &[&[Put]]) -> Vec<Vec<u8>> {
        stack.iter().map(|puts| layer(puts)).collect()
    }

    // ---- cases ----

    #[test]
    fn a_whiteout_of_a_base_file_survives() {
        let stack = layers(&[
            &[dir("etc"), file("etc/new", "n")],
            &[whiteout("etc/passwd")],
        ]);
        let (merged, summary) = check(&stack);
        assert_eq!(listing(&merged), ["etc/", "etc/new", "etc/.wh.passwd"]);
        assert_eq!(summary.whiteouts, 1);
        assert_eq!(summary.entries, 2);
        let mut base = Fs::default();
        base.put("etc", Inode::base(Content::Dir));
        base.put("etc/passwd", Inode::base(Content::File(b"root".to_vec())));
        let after = apply_all(&base, std::slice::from_ref(&merged)).unwrap();
        assert!(!after.contains_key("etc/passwd"));
    }

    #[test]
    fn a_whiteout_then_a_directory_again_is_an_opaque_directory() {
        let stack = layers(&[
            &[dir("a"), file("a/one", "1")],
            &[whiteout("a")],
            &[dir("a"), file("a/new", "n")],
        ]);
        let (merged, summary) = check(&stack);
        assert_eq!(listing(&merged), ["a/", "a/.wh..wh..opq", "a/new"]);
        assert_eq!(summary.dropped, 2);
        // the base's a/old stays hidden
        let mut base = Fs::default();
        base.put("a", Inode::base(Content::Dir));
        base.put("a/old", Inode::base(Content::File(b"old".to_vec())));
        let after = apply_all(&base, std::slice::from_ref(&merged)).unwrap();
        assert_eq!(after.keys().collect::<Vec<_>>(), ["a", "a/new"]);
    }

    #[test]
    fn an_entry_below_a_deleted_directory_brings_it_back_opaque() {
        let stack = layers(&[&[whiteout("a")], &[file("a/b/c", "c")]]);
        let (merged, _) = check(&stack);
        assert_eq!(
            listing(&merged),
            ["a/", "a/.wh..wh..opq", "a/b/", "a/b/c"],
            "a/b as the applier makes it"
        );
        // the parent stays when what brought it back goes
        let stack = layers(&[
            &[whiteout("a")],
            &[file("a/b/c", "c")],
            &[whiteout("a/b/c")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["a/", "a/.wh..wh..opq", "a/b/"]);
    }

    #[test]
    fn an_opaque_directory_in_the_middle() {
        let stack = layers(&[
            &[dir("d"), file("d/one", "1"), file("d/two", "old")],
            &[dir("d"), opaque("d"), file("d/two", "2")],
            &[dir("d"), file("d/three", "3"), whiteout("d/two")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(
            listing(&merged),
            ["d/", "d/.wh..wh..opq", "d/three"],
            "d/two's whiteout changes nothing below an opaque d"
        );
        // a marker without a directory entry: the base's directory stays, emptied
        let stack = layers(&[&[file("d/one", "1")], &[opaque("d"), file("d/two", "2")]]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["d/.wh..wh..opq", "d/two"]);
    }

    #[test]
    fn a_file_replaced_by_a_directory_and_back() {
        let stack = layers(&[
            &[file("x", "file")],
            &[dir("x"), file("x/in", "in")],
            &[file("x", "again")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["x"]);
        let stack = layers(&[
            &[dir("x"), file("x/in", "in")],
            &[file("x", "file")],
            &[dir("x"), file("x/new", "new")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["x/", "x/.wh..wh..opq", "x/new"]);
        // a directory over a directory keeps the children, takes the header
        let stack = layers(&[
            &[Put::Dir("x".into(), 0o700), file("x/in", "in")],
            &[Put::Dir("x".into(), 0o750), file("x/new", "new")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["x/", "x/in", "x/new"]);
        let mut archive = tar::Archive::new(merged.as_slice());
        let first = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(first.header().mode().unwrap(), 0o750);
    }

    #[test]
    fn a_hard_link_whose_target_is_deleted_is_materialised() {
        let stack = layers(&[
            &[
                dir("data"),
                Put::File("data/a".into(), b"AAA".to_vec(), 0o640),
                hard("data/b", "data/a"),
                hard("data/c", "./data/b"),
                hard("data/d", "data/a"),
            ],
            &[whiteout("data/a"), whiteout("data/d")],
        ]);
        let (merged, summary) = check(&stack);
        assert_eq!(
            listing(&merged),
            [
                "data/",
                "data/.wh.a",
                "data/b",
                "data/c => data/b",
                "data/.wh.d"
            ]
        );
        assert_eq!(summary.materialised_links, 1);
        let mut archive = tar::Archive::new(merged.as_slice());
        let mut entry = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path_bytes().as_ref() == b"data/b")
            .unwrap();
        assert_eq!(entry.header().entry_type(), EntryType::Regular);
        assert_eq!(entry.header().mode().unwrap(), 0o640, "the file's header");
        let mut data = String::new();
        entry.read_to_string(&mut data).unwrap();
        assert_eq!(data, "AAA");

        // replaced rather than deleted: the link keeps the old data
        let stack = layers(&[&[file("a", "old"), hard("b", "a")], &[file("a", "new")]]);
        let (merged, summary) = check(&stack);
        assert_eq!(listing(&merged), ["a", "b"]);
        assert_eq!(summary.materialised_links, 1);

        // both survive, the link sorts first: it carries the data
        let stack = layers(&[&[file("z", "zzz"), hard("a", "z")], &[file("other", "o")]]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["a", "other", "z => a"]);

        // a link re-linked in a later layer, and a link to an older layer's file
        let stack = layers(&[
            &[file("f", "1"), file("g", "2"), hard("l", "f")],
            &[hard("l", "g"), hard("m", "l")],
            &[whiteout("g")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["f", ".wh.g", "l", "m => l"]);
    }

    #[test]
    fn xattrs_devices_long_names_and_owners_are_kept() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let target = format!("/{}", "t".repeat(200));
        let stack = layers(&[
            &[
                Put::Xattr(
                    "usr/bin/ping".into(),
                    b"ELF".to_vec(),
                    "security.capability",
                    vec![1, 0, 0, 2, 0x20, 0, 0, 0],
                ),
                Put::Dev("dev/null".into(), EntryType::Char, 1, 3),
                Put::Dev("dev/sda1".into(), EntryType::Block, 8, 1),
                Put::Dev("run/fifo".into(), EntryType::Fifo, 0, 0),
                file(&long, "deep"),
                symlink("far", &target),
            ],
            &[file("other", "o")],
        ]);
        let (merged, _) = check(&stack);
        let mut archive = tar::Archive::new(merged.as_slice());
        let mut found = 0;
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let h = entry.header().clone();
            assert_eq!(h.username().unwrap(), Some("user"), "{path}");
            assert_eq!(h.groupname().unwrap(), Some("group"), "{path}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1000, 1001));
            match path.as_str() {
                "usr/bin/ping" => {
                    let records: Vec<(String, Vec<u8>)> = entry
                        .pax_extensions()
                        .unwrap()
                        .unwrap()
                        .map(|r| r.unwrap())
                        .map(|r| (r.key().unwrap().to_string(), r.value_bytes().to_vec()))
                        .collect();
                    assert_eq!(
                        records,
                        [(
                            "SCHILY.xattr.security.capability".to_string(),
                            vec![1, 0, 0, 2, 0x20, 0, 0, 0]
                        )]
                    );
                    assert_eq!(h.mode().unwrap(), 0o640);
                    found += 1;
                }
                "dev/null" => {
                    assert_eq!(h.entry_type(), EntryType::Char);
                    assert_eq!(
                        (h.device_major().unwrap(), h.device_minor().unwrap()),
                        (Some(1), Some(3))
                    );
                    found += 1;
                }
                "dev/sda1" => {
                    assert_eq!(h.entry_type(), EntryType::Block);
                    assert_eq!(
                        (h.device_major().unwrap(), h.device_minor().unwrap()),
                        (Some(8), Some(1))
                    );
                    found += 1;
                }
                "run/fifo" => {
                    assert_eq!(h.entry_type(), EntryType::Fifo);
                    found += 1;
                }
                "far" => {
                    assert_eq!(entry.link_name_bytes().unwrap().as_ref(), target.as_bytes());
                    found += 1;
                }
                p if p == long => {
                    let mut data = String::new();
                    entry.read_to_string(&mut data).unwrap();
                    assert_eq!(data, "deep");
                    found += 1;
                }
                _ => {}
            }
        }
        assert_eq!(found, 6);
    }

    #[test]
    fn a_path_deleted_and_made_again_as_a_symlink() {
        let stack = layers(&[
            &[dir("p"), file("p/child", "c")],
            &[whiteout("p")],
            &[symlink("p", "/elsewhere")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["p -> /elsewhere"]);
        let stack = layers(&[&[file("q", "q")], &[whiteout("q"), symlink("q", "r")]]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), ["q -> r"]);
    }

    #[test]
    fn paths_are_one_however_written() {
        let stack = layers(&[
            &[dir("./a"), file("./a/b", "1"), file("/a/c", "c")],
            &[file("a/b", "2"), whiteout("./a/c"), file("a//d", "d")],
        ]);
        let (merged, summary) = check(&stack);
        assert_eq!(listing(&merged), ["a/", "a/b", "a/.wh.c", "a/d"]);
        assert_eq!(summary.dropped, 2);
    }

    #[test]
    fn whiteouts_and_markers_a_later_layer_makes_useless_are_left_out() {
        let stack = layers(&[
            &[whiteout("a/x"), whiteout("b/y"), whiteout("c")],
            &[whiteout("a")],
            &[opaque("b"), file("c", "c")],
        ]);
        let (merged, _) = check(&stack);
        assert_eq!(listing(&merged), [".wh.a", "b/.wh..wh..opq", "c"]);
    }

    #[test]
    fn the_output_is_the_same_for_the_same_layers_in_another_order() {
        // entries out of path order: the second pass reads layers again
        let sorted = [
            file("a", "a"),
            file("b", "b"),
            file("c", "c"),
            dir("d"),
            file("d/e", "e"),
        ];
        let mut reversed = sorted.to_vec();
        reversed.reverse();
        let (one, _) = run(&layers(&[&sorted])).unwrap();
        let (two, summary) = run(&layers(&[&reversed])).unwrap();
        assert_eq!(one, two);
        assert!(summary.rereads > 0);
        let (_, summary) = run(&layers(&[&sorted])).unwrap();
        assert_eq!(summary.rereads, 0);
        let many: Vec<Put> = (0..40)
            .rev()
            .map(|i| file(&format!("f{i:02}"), "x"))
            .collect();
        check(&layers(&[&many]));
    }

    #[test]
    fn bad_layers_are_refused_with_the_layer_and_path() {
        let err = run(&layers(&[&[file("a", "a")], &[hard("b\nc", "missing")]])).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, MergeError::Invalid { layer: 1, .. }),
            "{text}"
        );
        assert!(
            text.contains("\"/b\\nc\"") && text.contains("\"/missing\""),
            "{text}"
        );

        let mut bad = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Regular, 0o644);
        h.as_old_mut().name[..6].copy_from_slice(b"../etc");
        h.set_cksum();
        bad.append(&h, io::empty()).unwrap();
        let bad = bad.into_inner().unwrap();
        let err = run(&[bad]).unwrap_err();
        assert!(matches!(err, MergeError::Invalid { layer: 0, .. }), "{err}");

        // a layer that is shorter the second time it is read
        let full = layer(&[file("a", &"x".repeat(5000))]);
        let mut opened = 0;
        let mut out = Vec::new();
        let err = merge(
            |_| {
                opened += 1;
                Ok(if opened == 1 {
                    &full[..]
                } else {
                    &full[..2000]
                })
            },
            1,
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(err, MergeError::Read { layer: 0, .. }), "{err}");
    }

    #[test]
    fn no_layers_give_an_empty_layer() {
        let (merged, summary) = run(&[]).unwrap();
        assert!(listing(&merged).is_empty());
        assert_eq!(summary, Summary::default());
    }

    // ---- many small stacks ----

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn path(&mut self) -> String {
            let depth = 1 + self.below(3);
            (0..depth)
                .map(|_| ["a", "b", "c"][self.below(3)])
                .collect::<Vec<_>>()
                .join("/")
        }
    }

    fn random_stack(rng: &mut Rng) -> Vec<Vec<Put>> {
        let mut stack = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let mut puts = Vec::new();
            // what a hard link may point at: entries of this layer still there
            let mut targets: Vec<String> = Vec::new();
            for _ in 0..1 + rng.below(7) {
                let path = rng.path();
                let put = match rng.below(12) {
                    0 | 1 => Put::File(
                        path.clone(),
                        format!("{}", rng.below(3)).into_bytes(),
                        [0o644, 0o600, 0o755][rng.below(3)],
                    ),
                    2 => Put::Xattr(
                        path.clone(),
                        b"x".to_vec(),
                        "user.k",
                        vec![rng.below(2) as u8],
                    ),
                    3 | 4 => Put::Dir(path.clone(), [0o755, 0o700][rng.below(2)]),
                    5 => symlink(&path, ["/etc", "../a", "b"][rng.below(3)]),
                    6 if !targets.is_empty() => {
                        let target = targets[rng.below(targets.len())].clone();
                        if target == path || under(&path, &target) || under(&target, &path) {
                            continue;
                        }
                        hard(&path, &target)
                    }
                    6..=8 => whiteout(&path),
                    9 => {
                        if rng.below(2) == 0 {
                            targets.retain(|t| !(*t == path || under(t, &path) || under(&path, t)));
                            puts.push(dir(&path));
                        }
                        opaque(&path)
                    }
                    10 => Put::Dev(path.clone(), EntryType::Char, 1, rng.below(5) as u32),
                    _ => Put::Dev(path.clone(), EntryType::Fifo, 0, 0),
                };
                if !matches!(put, Put::Whiteout(_) | Put::Opaque(_)) {
                    targets.retain(|t| !(*t == path || under(t, &path) || under(&path, t)));
                    if !matches!(put, Put::Dir(..)) {
                        targets.push(path.clone());
                    }
                }
                puts.push(put);
            }
            stack.push(puts);
        }
        stack
    }

    #[test]
    fn merged_stacks_do_what_the_layers_do_over_any_base() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..3000 {
            let stack = random_stack(&mut rng);
            let layers: Vec<Vec<u8>> = stack.iter().map(|puts| layer(puts)).collect();
            let result = std::panic::catch_unwind(|| check(&layers));
            if result.is_err() {
                panic!("case {case}: {stack:#?}");
            }
        }
    }
}
