//! Gzip members kept by their content, so that a layer written a second
//! time compresses only what it has not compressed before.
//!
//! Pre-copy writes an eStargz layer twice: once while the desktop runs
//! (the first pass's tar, [`Reuse::Record`]: every member compressed is
//! kept in an unnamed file of the work directory), and again after the
//! resume from the assembled tar ([`Reuse::Replay`]). The eStargz writer
//! cuts its members the same way from the same bytes (a member starts at
//! every file chunk), so each member the desktop did not touch between the
//! two is found by the sha256 of its uncompressed bytes and copied instead
//! of compressed. The hash costs nearly nothing: the writer digests each
//! chunk anyway, and the key continues that digest over the member's few
//! header bytes.
//!
//! What is copied is checked against what it stands for (the member's own
//! CRC-32 and length); the store is bounded, past its limit it keeps no
//! more and the rest is compressed as usual. A member deflate could not
//! shrink (stored blocks: random data, media, archives) is not kept, only
//! its key noted: its bytes are the data's own, so making it again costs
//! what reading it back would, and the recording writes half as much.
//!
//! The recording also notes the sha256 of each large chunk (by its file's
//! name and offset) and of each file of several chunks. Told which files
//! hold in the replay's tar the very bytes the recording read
//! ([`Kept::stand`]: pre-copy's files whose stamp did not move, copied from
//! the first pass's pieces), the replay takes their digests and keys from
//! those notes instead of hashing their bytes again; any other file is
//! hashed as usual.

use sha2::Sha256;
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, Mutex},
};

/// The sha256 of a member's uncompressed bytes.
pub type Key = [u8; 32];

/// Where a chunk is: its file's name (as the layer's tar gives it) and its
/// offset in the file.
pub(crate) type ChunkAt = (Arc<[u8]>, u64);

/// Chunks shorter than this are not noted (hashing them again costs less
/// than noting them).
pub const NOTED: usize = 64 << 10;

/// Most notes held, of chunks and of files (about 200 bytes each).
const MOST_NOTES: usize = 1 << 17;

/// Compressed members by the sha256 of their uncompressed bytes.
pub struct Kept {
    file: File,
    limit: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Where each member's compressed bytes are in the file, and how many.
    at: HashMap<Key, (u64, u32)>,
    /// The members written in stored blocks (not kept).
    stored: HashSet<Key>,
    stored_again: u64,
    end: u64,
    found: u64,
    missed: u64,
    /// What the recording noted of each file, by its name.
    notes: HashMap<Arc<[u8]>, Notes>,
    /// Notes held, of both kinds.
    held: usize,
    hashes_taken: u64,
}

/// What a recording noted of one file.
#[derive(Default)]
struct Notes {
    /// The sha256 state after each noted chunk's bytes, by its offset in
    /// the file, with its length.
    chunks: HashMap<u64, (usize, Sha256)>,
    /// The digest of the whole file, of several chunks.
    digest: Option<Key>,
    /// Its bytes in the replay's tar are the recording's ([`Kept::stand`]).
    stands: bool,
}

/// How a writer uses a store.
#[derive(Clone)]
pub enum Reuse {
    /// Every member compressed goes into the store.
    Record(Arc<Kept>),
    /// A member found in the store is copied from it.
    Replay(Arc<Kept>),
}

/// How often a replay found its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Members kept.
    pub kept: usize,
    /// Members of the replay copied from the store, and compressed.
    pub found: u64,
    pub missed: u64,
    /// Chunks and files whose digest the replay took from the recording's notes.
    pub hashes_taken: u64,
    /// Members the recording wrote in stored blocks, written so again.
    pub stored_again: u64,
}

impl Kept {
    /// An empty store in an unnamed file of `dir`, of at most `limit` bytes.
    pub fn new(dir: &Path, limit: u64) -> io::Result<Arc<Self>> {
        let file = tempfile::tempfile_in(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "creating the file for compressed members in {}: {e}",
                    dir.display()
                ),
            )
        })?;
        Ok(Arc::new(Self {
            file,
            limit,
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `member`, the compression of bytes of sha256 `key` (nothing
    /// past the limit, nor a key kept already).
    pub(crate) fn keep(&self, key: Key, member: &[u8]) -> io::Result<()> {
        let Ok(len) = u32::try_from(member.len()) else {
            return Ok(());
        };
        let at = {
            let mut state = self.state();
            if state.at.contains_key(&key) || state.end + u64::from(len) > self.limit {
                return Ok(());
            }
            let at = state.end;
            state.end += u64::from(len);
            at
        };
        self.file.write_all_at(member, at)?;
        self.state().at.insert(key, (at, len));
        Ok(())
    }

    /// Appends to `out` the member kept for `data` (of sha256 `key`);
    /// whether there was one.
    pub(crate) fn find(&self, key: &Key, data: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        let found = self.state().at.get(key).copied();
        let Some((at, len)) = found else {
            self.state().missed += 1;
            return Ok(false);
        };
        let start = out.len();
        out.resize(start + len as usize, 0);
        self.file.read_exact_at(&mut out[start..], at)?;
        if !stands_for(&out[start..], data) {
            return Err(io::Error::other(
                "a kept gzip member does not hold the bytes it was kept for",
            ));
        }
        self.state().found += 1;
        Ok(true)
    }

    pub fn counts(&self) -> Counts {
        let state = self.state();
        Counts {
            kept: state.at.len(),
            found: state.found,
            missed: state.missed,
            hashes_taken: state.hashes_taken,
            stored_again: state.stored_again,
        }
    }

    /// Notes that the member of bytes of sha256 `key` was written in stored
    /// blocks (up to the most notes held).
    pub(crate) fn note_stored(&self, key: Key) {
        let mut state = self.state();
        if state.held < MOST_NOTES && state.stored.insert(key) {
            state.held += 1;
        }
    }

    /// Whether the recording wrote the member of `key` in stored blocks
    /// (counted when it did).
    pub(crate) fn was_stored(&self, key: &Key) -> bool {
        let mut state = self.state();
        let stored = state.stored.contains(key);
        state.stored_again += u64::from(stored);
        stored
    }

    /// Notes the sha256 state `hashed` after the `len` bytes of the chunk
    /// `at` (its file's name, its offset in the file).
    pub(crate) fn note_chunk(&self, at: &ChunkAt, len: usize, hashed: &Sha256) {
        let mut state = self.state();
        if len >= NOTED && state.held < MOST_NOTES {
            state.held += 1;
            let notes = state.notes.entry(at.0.clone()).or_default();
            notes.chunks.insert(at.1, (len, hashed.clone()));
        }
    }

    /// Notes the digest of the file `name`, of several chunks.
    pub(crate) fn note_file(&self, name: &Arc<[u8]>, digest: Key) {
        let mut state = self.state();
        if state.held < MOST_NOTES {
            state.held += 1;
            state.notes.entry(name.clone()).or_default().digest = Some(digest);
        }
    }

    /// Names the files (as the layer's tar names them) whose bytes in the
    /// replay's tar are the very bytes the recording read: their notes
    /// hold. Until then no note is given out.
    pub fn stand(&self, names: impl IntoIterator<Item = Vec<u8>>) {
        let mut state = self.state();
        for name in names {
            if let Some(notes) = state.notes.get_mut(&name[..]) {
                notes.stands = true;
            }
        }
    }

    /// What was noted of the file `name`, if it stands; counted as taken
    /// when `take` finds something in it.
    fn taken<T>(&self, name: &[u8], take: impl FnOnce(&Notes) -> Option<T>) -> Option<T> {
        let mut state = self.state();
        let taken = state.notes.get(name).filter(|n| n.stands).and_then(take)?;
        state.hashes_taken += 1;
        Some(taken)
    }

    /// The sha256 state after the `len` bytes at `offset` of the file
    /// `name`, if they were noted and the file stands.
    pub(crate) fn hashed(&self, name: &[u8], offset: u64, len: usize) -> Option<Sha256> {
        self.taken(name, |notes| match notes.chunks.get(&offset) {
            Some((noted, hashed)) if *noted == len => Some(hashed.clone()),
            _ => None,
        })
    }

    /// The digest of the file `name`, if it was noted and the file stands.
    pub(crate) fn file_digest(&self, name: &[u8]) -> Option<Key> {
        self.taken(name, |notes| notes.digest)
    }
}

/// Whether the gzip member `member` ends with `data`'s CRC-32 and length.
fn stands_for(member: &[u8], data: &[u8]) -> bool {
    let Some(trailer) = member.len().checked_sub(8).map(|at| &member[at..]) else {
        return false;
    };
    let mut crc = flate2::Crc::new();
    crc.update(data);
    trailer[..4] == crc.sum().to_le_bytes() && trailer[4..] == (data.len() as u32).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::members::Compressor;

    fn member(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Compressor::new(1).member(data, &mut out).unwrap();
        out
    }

    #[test]
    fn a_member_kept_is_found_by_its_bytes_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Kept::new(dir.path(), u64::MAX).unwrap();
        let (a, b) = (b"first member".to_vec(), b"second".to_vec());
        kept.keep([1; 32], &member(&a)).unwrap();
        kept.keep([2; 32], &member(&b)).unwrap();
        let mut out = b"before".to_vec();
        assert!(kept.find(&[2; 32], &b, &mut out).unwrap());
        assert_eq!(&out[6..], member(&b).as_slice());
        assert!(!kept.find(&[3; 32], &a, &mut out).unwrap());
        // a key whose member holds other bytes is an error, never a wrong layer
        assert!(kept.find(&[1; 32], &b, &mut Vec::new()).is_err());
        let counts = kept.counts();
        assert_eq!((counts.kept, counts.found, counts.missed), (2, 1, 1));
    }

    #[test]
    fn notes_are_given_out_for_the_files_that_stand_only() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let kept = Kept::new(dir.path(), u64::MAX).unwrap();
        let (name, other): (Arc<[u8]>, Arc<[u8]>) = (b"home/a"[..].into(), b"home/b"[..].into());
        let mut hashed = Sha256::new();
        hashed.update([7u8; NOTED]);
        kept.note_chunk(&(name.clone(), 0), NOTED, &hashed);
        kept.note_chunk(&(other.clone(), 0), NOTED, &hashed);
        kept.note_chunk(&(name.clone(), 1 << 20), NOTED - 1, &hashed);
        kept.note_file(&name, [9; 32]);
        assert!(kept.hashed(&name, 0, NOTED).is_none(), "nothing stands yet");
        assert!(kept.file_digest(&name).is_none());
        kept.stand([name.to_vec()]);
        let taken = kept.hashed(&name, 0, NOTED).unwrap();
        assert_eq!(taken.finalize(), hashed.clone().finalize());
        assert_eq!(kept.file_digest(&name), Some([9; 32]));
        assert!(kept.hashed(&name, 0, NOTED + 1).is_none(), "another length");
        assert!(
            kept.hashed(&name, 1 << 20, NOTED - 1).is_none(),
            "too short to note"
        );
        assert!(kept.hashed(&other, 0, NOTED).is_none(), "does not stand");
        assert_eq!(kept.counts().hashes_taken, 2);
    }

    /// A member in stored blocks is noted, not kept: the replay makes it
    /// again; past the most notes held, it is compressed as any other.
    #[test]
    fn a_stored_member_is_noted_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Kept::new(dir.path(), u64::MAX).unwrap();
        kept.note_stored([4; 32]);
        assert!(kept.was_stored(&[4; 32]));
        assert!(!kept.was_stored(&[5; 32]));
        assert!(!kept.find(&[4; 32], b"not kept", &mut Vec::new()).unwrap());
        let counts = kept.counts();
        assert_eq!((counts.kept, counts.stored_again), (0, 1));
        kept.state().held = MOST_NOTES;
        kept.note_stored([6; 32]);
        assert!(!kept.was_stored(&[6; 32]), "past the most notes held");
    }

    #[test]
    fn past_its_limit_the_store_keeps_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let first = member(b"fits");
        let kept = Kept::new(dir.path(), first.len() as u64 + 10).unwrap();
        kept.keep([1; 32], &first).unwrap();
        kept.keep([2; 32], &member(b"does not fit")).unwrap();
        assert_eq!(kept.counts().kept, 1);
        assert!(!kept
            .find(&[2; 32], b"does not fit", &mut Vec::new())
            .unwrap());
    }
}
