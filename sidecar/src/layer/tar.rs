//! What every writer of a layer tar shares: PAX records, and paths as error
//! texts show them.

use std::path::Path;

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
