//! What an incremental layer carries: given the record of the last pushed
//! capture and the record now ([`record`]), the entries the layer writer
//! writes and the whiteouts it adds, so that the last snapshot plus this one
//! layer is the desktop as it is now (over any image below, as OCI applies
//! layers):
//!
//! - a new or changed entry is written (a directory's header alone when it
//!   is the same directory, its inode unchanged: no opaque marker, which
//!   would hide its unchanged children of the layers below; the children
//!   are decided one by one);
//! - a directory made anew (new path, new inode, another type before, or
//!   opaque now and not before) that overlay marks opaque is written whole:
//!   its header, its opaque marker, everything below it;
//! - an entry of the last capture that is gone from the upper directory gets
//!   an explicit whiteout (`.wh.name`): the session made it, pushed it, then
//!   deleted it, and overlay leaves no whiteout for a file it never had
//!   below; nothing is said of what lay below a gone, replaced or
//!   whole-written directory (its whiteout, replacement or opaque marker
//!   already hides it);
//! - a non-directory replacing a directory replaces its subtree;
//! - every path of a file with several links is written when one is (a
//!   hard link in a layer must find its target in the same layer).
//!
//! Pure: records in, selection out.

use super::record::{self, is_below, split, Change, Record};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// How the writer writes a picked entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pick {
    /// The entry alone: a file, link, device node or whiteout; for a
    /// directory its header, without opaque marker (its children are picked
    /// one by one).
    Entry,
    /// The entry, its opaque marker if overlay set one, and everything below.
    Whole,
}

/// The entries of an incremental layer (keys as in [`record`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    picks: BTreeMap<Vec<u8>, Pick>,
    /// Paths of the last capture gone now: an explicit whiteout each.
    gone: BTreeSet<Vec<u8>>,
}

impl Selection {
    /// Nothing changed: the layer would be empty.
    pub fn is_empty(&self) -> bool {
        self.picks.is_empty() && self.gone.is_empty()
    }

    pub fn pick(&self, key: &[u8]) -> Option<Pick> {
        self.picks.get(key).copied()
    }

    /// Whether anything strictly below directory `key` is picked or gone:
    /// the writer goes into it.
    pub fn any_below(&self, key: &[u8]) -> bool {
        let low = if key.is_empty() {
            Vec::new()
        } else {
            [key, &[0]].concat()
        };
        let first_pick = self.picks.range(low.clone()..).next().map(|(k, _)| k);
        let first_gone = self.gone.range(low..).next();
        [first_pick, first_gone]
            .into_iter()
            .flatten()
            .any(|k| is_below(k, key))
    }

    /// The names gone from directory `dir` (an explicit whiteout each), in
    /// byte order.
    pub fn gone_in(&self, dir: &[u8]) -> Vec<&[u8]> {
        let low = if dir.is_empty() {
            Vec::new()
        } else {
            [dir, &[0]].concat()
        };
        self.gone
            .range(low..)
            .take_while(|k| is_below(k, dir))
            .filter(|k| split(k).0 == dir)
            .map(|k| split(k).1)
            .collect()
    }

    /// The picked entries, in key order.
    pub fn picks(&self) -> impl Iterator<Item = (&[u8], Pick)> + '_ {
        self.picks.iter().map(|(k, p)| (k.as_slice(), *p))
    }

    /// The paths that get an explicit whiteout, in key order.
    pub fn gone(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.gone.iter().map(Vec::as_slice)
    }

    /// Whether `key` gets an explicit whiteout.
    pub fn is_gone(&self, key: &[u8]) -> bool {
        self.gone.contains(key)
    }

    /// Whether `key` is written whole as part of a picked directory.
    fn under_whole(&self, key: &[u8]) -> bool {
        key.iter()
            .enumerate()
            .filter(|(_, &b)| b == 0)
            .any(|(i, _)| self.picks.get(&key[..i]) == Some(&Pick::Whole))
    }
}

/// The increment from the capture recorded in `old` to the one in `new`.
pub fn select(old: &Record, new: &Record) -> Selection {
    let mut selection = Selection::default();
    // a subtree already decided: written whole, replaced, or gone
    let mut covered: Option<&[u8]> = None;
    for change in record::diff(old, new) {
        let key = change.key();
        if let Some(c) = covered {
            if is_below(key, c) {
                continue;
            }
            covered = None;
        }
        let pick = match change {
            Change::New { now, .. } => {
                if now.is_dir() && now.is_opaque() {
                    Pick::Whole
                } else {
                    Pick::Entry
                }
            }
            Change::Changed { was, now, .. } if now.is_dir() => {
                let anew =
                    !was.is_dir() || was.ino != now.ino || (now.is_opaque() && !was.is_opaque());
                if anew && now.is_opaque() {
                    Pick::Whole
                } else {
                    Pick::Entry
                }
            }
            Change::Changed { was, .. } => {
                if was.is_dir() {
                    covered = Some(key);
                }
                Pick::Entry
            }
            Change::Gone { was, .. } => {
                selection.gone.insert(key.to_vec());
                if was.is_dir() {
                    covered = Some(key);
                }
                continue;
            }
        };
        if pick == Pick::Whole {
            covered = Some(key);
        }
        selection.picks.insert(key.to_vec(), pick);
    }
    close_links(&mut selection, new);
    selection
}

/// Adds every path of the files with several links a picked entry holds.
fn close_links(selection: &mut Selection, new: &Record) {
    let linked = |s: &record::Stamp| !s.is_dir() && s.nlink > 1;
    let mut inodes = HashSet::new();
    for (key, pick) in &selection.picks {
        match pick {
            Pick::Entry => {
                if let Some(s) = new.get(key).filter(|s| linked(s)) {
                    inodes.insert(s.ino);
                }
            }
            Pick::Whole => {
                inodes.extend(
                    new.below(key)
                        .filter(|(_, s)| linked(s))
                        .map(|(_, s)| s.ino),
                );
            }
        }
    }
    if inodes.is_empty() {
        return;
    }
    let more: Vec<Vec<u8>> = new
        .iter()
        .filter(|(key, s)| {
            linked(s)
                && inodes.contains(&s.ino)
                && !selection.picks.contains_key(*key)
                && !selection.under_whole(key)
        })
        .map(|(key, _)| key.to_vec())
        .collect();
    for key in more {
        selection.picks.insert(key, Pick::Entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::record::{key_path, path_key, Stamp};
    use std::path::Path;

    const F: u32 = libc::S_IFREG;
    const D: u32 = libc::S_IFDIR;
    const L: u32 = libc::S_IFLNK;
    const C: u32 = libc::S_IFCHR;

    /// `(path, kind, inode, ctime)`; kind: `f` file, `d` dir, `o` opaque
    /// dir, `l` symlink, `w` whiteout, `2` a file with two links.
    type Row = (&'static str, char, u64, i64);

    fn record(rows: &[Row]) -> Record {
        let mut r = Record::default();
        for &(path, kind, ino, ctime) in rows {
            let (mode, opaque, nlink) = match kind {
                'f' => (F, false, 1),
                '2' => (F, false, 2),
                'd' => (D, false, 2),
                'o' => (D, true, 2),
                'l' => (L, false, 1),
                'w' => (C, false, 1),
                _ => unreachable!(),
            };
            let stamp = Stamp::new(ino, (ctime, 0), 0, mode | 0o644, nlink, 0, opaque);
            r.push(&path_key(Path::new(path)), stamp).unwrap();
        }
        r
    }

    fn shown(selection: &Selection) -> (Vec<String>, Vec<String>) {
        let picks = selection
            .picks()
            .map(|(k, p)| {
                let p = match p {
                    Pick::Entry => "",
                    Pick::Whole => " (whole)",
                };
                format!("{}{p}", key_path(k).display())
            })
            .collect();
        let gone = selection
            .gone()
            .map(|k| key_path(k).display().to_string())
            .collect();
        (picks, gone)
    }

    #[test]
    fn what_an_increment_carries() {
        struct Case {
            what: &'static str,
            old: &'static [Row],
            new: &'static [Row],
            picks: &'static [&'static str],
            gone: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "nothing changed",
                old: &[("a", 'd', 1, 1), ("a/f", 'f', 2, 1)],
                new: &[("a", 'd', 1, 1), ("a/f", 'f', 2, 1)],
                picks: &[],
                gone: &[],
            },
            Case {
                what: "a file changed in place: the file alone",
                old: &[("a", 'd', 1, 1), ("a/f", 'f', 2, 1), ("a/g", 'f', 3, 1)],
                new: &[("a", 'd', 1, 1), ("a/f", 'f', 2, 5), ("a/g", 'f', 3, 1)],
                picks: &["a/f"],
                gone: &[],
            },
            Case {
                what: "a new file: its directory's header (same inode) and the file",
                old: &[("a", 'd', 1, 1)],
                new: &[("a", 'd', 1, 5), ("a/n", 'f', 4, 5)],
                picks: &["a", "a/n"],
                gone: &[],
            },
            Case {
                what: "made, pushed, deleted: an explicit whiteout",
                old: &[("a", 'd', 1, 1), ("a/tmp", 'f', 2, 1)],
                new: &[("a", 'd', 1, 5)],
                picks: &["a"],
                gone: &["a/tmp"],
            },
            Case {
                what: "a deleted directory: one whiteout for its subtree",
                old: &[
                    ("a", 'd', 1, 1),
                    ("a/b", 'd', 2, 1),
                    ("a/b/c", 'f', 3, 1),
                    ("z", 'f', 9, 1),
                ],
                new: &[("z", 'f', 9, 1)],
                picks: &[],
                gone: &["a"],
            },
            Case {
                what: "overlay's whiteout for a base file: carried as an entry",
                old: &[("etc", 'd', 1, 1), ("etc/passwd", 'f', 2, 1)],
                new: &[("etc", 'd', 1, 5), ("etc/passwd", 'w', 3, 5)],
                picks: &["etc", "etc/passwd"],
                gone: &[],
            },
            Case {
                what: "a directory re-created, opaque: whole, nothing said of its old children",
                old: &[
                    ("opt", 'd', 1, 1),
                    ("opt/old", 'f', 2, 1),
                    ("opt/same", 'f', 3, 1),
                ],
                new: &[
                    ("opt", 'o', 7, 5),
                    ("opt/new", 'f', 8, 5),
                    ("opt/same", 'f', 3, 1),
                ],
                picks: &["opt (whole)"],
                gone: &[],
            },
            Case {
                what: "a directory re-created, not opaque: its header, children one by one",
                old: &[("d", 'd', 1, 1), ("d/old", 'f', 2, 1)],
                new: &[("d", 'd', 7, 5), ("d/new", 'f', 8, 5)],
                picks: &["d", "d/new"],
                gone: &["d/old"],
            },
            Case {
                what: "the same directory, opaque before and after: no marker again",
                old: &[("o", 'o', 1, 1), ("o/a", 'f', 2, 1), ("o/b", 'f', 3, 1)],
                new: &[("o", 'o', 1, 5), ("o/a", 'f', 2, 1), ("o/c", 'f', 4, 5)],
                picks: &["o", "o/c"],
                gone: &["o/b"],
            },
            Case {
                what: "a new opaque directory: whole",
                old: &[],
                new: &[("n", 'o', 1, 5), ("n/x", 'd', 2, 5), ("n/x/y", 'f', 3, 5)],
                picks: &["n (whole)"],
                gone: &[],
            },
            Case {
                what: "a file becomes a directory",
                old: &[("p", 'f', 1, 1)],
                new: &[("p", 'd', 2, 5), ("p/c", 'f', 3, 5)],
                picks: &["p", "p/c"],
                gone: &[],
            },
            Case {
                what: "a file becomes an opaque directory",
                old: &[("p", 'f', 1, 1)],
                new: &[("p", 'o', 2, 5), ("p/c", 'f', 3, 5)],
                picks: &["p (whole)"],
                gone: &[],
            },
            Case {
                what: "a directory becomes a symlink: it replaces the subtree",
                old: &[
                    ("d", 'd', 1, 1),
                    ("d/a", 'f', 2, 1),
                    ("d/b", 'd', 3, 1),
                    ("d/b/c", 'f', 4, 1),
                ],
                new: &[("d", 'l', 5, 5)],
                picks: &["d"],
                gone: &[],
            },
            Case {
                what: "a directory deleted and replaced by overlay's whiteout",
                old: &[("d", 'd', 1, 1), ("d/a", 'f', 2, 1)],
                new: &[("d", 'w', 5, 5)],
                picks: &["d"],
                gone: &[],
            },
            Case {
                what: "a whiteout's path made again as a file",
                old: &[("w", 'w', 1, 1)],
                new: &[("w", 'f', 2, 5)],
                picks: &["w"],
                gone: &[],
            },
            Case {
                what: "a changed hard-linked file: every path, wherever it is",
                old: &[
                    ("a", 'd', 1, 1),
                    ("a/x", '2', 5, 1),
                    ("b", 'd', 2, 1),
                    ("b/y", '2', 5, 1),
                ],
                new: &[
                    ("a", 'd', 1, 1),
                    ("a/x", '2', 5, 6),
                    ("b", 'd', 2, 1),
                    ("b/y", '2', 5, 1),
                ],
                picks: &["a/x", "b/y"],
                gone: &[],
            },
            Case {
                what: "a link inside a whole directory to a file outside it",
                old: &[("k", '2', 5, 1)],
                new: &[("k", '2', 5, 1), ("n", 'o', 6, 5), ("n/k2", '2', 5, 1)],
                picks: &["k", "n (whole)"],
                gone: &[],
            },
            Case {
                what: "names sorting around a directory's children",
                old: &[("a", 'd', 1, 1), ("a/c", 'f', 3, 1), ("a-b", 'f', 2, 1)],
                new: &[("a", 'd', 1, 5), ("a-b", 'f', 2, 5)],
                picks: &["a", "a-b"],
                gone: &["a/c"],
            },
        ];
        for case in cases {
            let selection = select(&record(case.old), &record(case.new));
            let (picks, gone) = shown(&selection);
            assert_eq!(picks, case.picks, "{}: picks", case.what);
            assert_eq!(gone, case.gone, "{}: whiteouts", case.what);
            assert_eq!(
                selection.is_empty(),
                case.picks.is_empty() && case.gone.is_empty(),
                "{}",
                case.what
            );
        }
    }

    #[test]
    fn a_racy_entry_is_sent_again() {
        let mut old = record(&[("f", 'f', 1, 10), ("g", 'f', 2, 3)]);
        old.mark_racy((10, 0));
        let new = record(&[("f", 'f', 1, 10), ("g", 'f', 2, 3)]);
        assert_eq!(shown(&select(&old, &new)).0, ["f"]);
    }

    #[test]
    fn the_walk_learns_where_to_go_and_what_is_gone() {
        let old = record(&[
            ("a", 'd', 1, 1),
            ("a/b", 'd', 2, 1),
            ("a/b/gone1", 'f', 3, 1),
            ("a/b/gone2", 'f', 4, 1),
            ("a/b/keep", 'd', 5, 1),
            ("a/b/keep/x", 'f', 6, 1),
            ("z", 'd', 7, 1),
        ]);
        let new = record(&[
            ("a", 'd', 1, 1),
            ("a/b", 'd', 2, 5),
            ("a/b/keep", 'd', 5, 1),
            ("a/b/keep/x", 'f', 6, 1),
            ("z", 'd', 7, 1),
        ]);
        let s = select(&old, &new);
        assert!(s.any_below(b""));
        assert!(s.any_below(b"a"));
        assert!(s.any_below(&path_key(Path::new("a/b"))));
        assert!(!s.any_below(&path_key(Path::new("a/b/keep"))));
        assert!(!s.any_below(b"z"));
        assert_eq!(
            s.gone_in(&path_key(Path::new("a/b"))),
            [&b"gone1"[..], &b"gone2"[..]]
        );
        assert!(s.gone_in(b"a").is_empty());
        assert_eq!(s.pick(&path_key(Path::new("a/b"))), Some(Pick::Entry));
        assert_eq!(s.pick(b"a"), None);
    }
}
