//! Small OCI building blocks shared by the harness and the tools: digests and
//! tar headers with fixed times (reproducible layers).

use sha2::{Digest, Sha256};

/// Modification time of every entry the harness writes.
pub const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar header owned by root, with the fixed time.
pub fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Gzip of `data`, fast.
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, data)?;
    gz.finish()
}
