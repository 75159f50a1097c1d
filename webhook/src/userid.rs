//! The user id to registry-name mapping, in one place.
//!
//! A user id is whatever the identity provider gave (`access_userid`): upper
//! case, dots, dashes, `@`, anything. Two mappings, both injective (two
//! different ids never give the same name), both leaving ordinary ids as they
//! are:
//!
//! * [`tag_prefix`], for the shared layout's tags `<prefix>-<timestamp>`: the
//!   OCI tag alphabet is `[A-Za-z0-9_.-]`. Letters, digits, `.` and `-` stay;
//!   `_` is the escape character: `_` itself and every other byte of the UTF-8
//!   id become `_xx` (two lowercase hex digits). A leading `.` or `-` (a tag
//!   cannot start with one) is escaped too. `jdoe@example.com` becomes
//!   `jdoe_40example.com`, `a_b` becomes `a_5fb`.
//! * [`repository_component`], for the per-user layout's repository
//!   `<registry>/<component>/<image path>`: repository path components are
//!   lower case, `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`. An id that already has
//!   that form without `_` stays; any other id becomes `u__` followed by the
//!   lowercase hex of its UTF-8 bytes (`Alice` becomes `u__416c696365`). Kept
//!   ids never contain `_`, escaped ones always do, so the two never meet.

use std::fmt;

/// Longest tag the OCI distribution spec allows.
pub const MAX_TAG_LEN: usize = 128;
/// Digits kept free for the timestamp (epoch nanoseconds have 19, keep 20).
const TIMESTAMP_ROOM: usize = 20;
/// Longest tag prefix: room is left for `-` and the timestamp.
pub const MAX_PREFIX_LEN: usize = MAX_TAG_LEN - 1 - TIMESTAMP_ROOM;
/// Longest repository component we produce (registries cap whole names at 255).
pub const MAX_COMPONENT_LEN: usize = 128;

/// Why a user id has no registry name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmappable {
    Empty,
    TooLong { mapped_len: usize, max: usize },
}

impl fmt::Display for Unmappable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmappable::Empty => write!(f, "the user id is empty"),
            Unmappable::TooLong { mapped_len, max } => write!(
                f,
                "the user id maps to {mapped_len} characters, more than the {max} a registry name allows"
            ),
        }
    }
}

impl std::error::Error for Unmappable {}

/// The tag prefix of a user's snapshots in the shared layout.
pub fn tag_prefix(user_id: &str) -> Result<String, Unmappable> {
    if user_id.is_empty() {
        return Err(Unmappable::Empty);
    }
    let mut out = String::with_capacity(user_id.len());
    for (i, byte) in user_id.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || (i > 0 && (byte == b'.' || byte == b'-'));
        if plain {
            out.push(byte as char);
        } else {
            push_escape(&mut out, byte);
        }
    }
    if out.len() > MAX_PREFIX_LEN {
        return Err(Unmappable::TooLong {
            mapped_len: out.len(),
            max: MAX_PREFIX_LEN,
        });
    }
    Ok(out)
}

/// The user id a tag prefix was made from, if it is one [`tag_prefix`] can produce.
pub fn user_of_tag_prefix(prefix: &str) -> Option<String> {
    let bytes = prefix.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = prefix.get(i + 1..i + 3)?;
            if hex.bytes().any(|b| b.is_ascii_uppercase()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let user = String::from_utf8(out).ok()?;
    (tag_prefix(&user).ok()? == prefix).then_some(user)
}

/// The repository path component of a user in the per-user layout.
pub fn repository_component(user_id: &str) -> Result<String, Unmappable> {
    if user_id.is_empty() {
        return Err(Unmappable::Empty);
    }
    let out = if is_plain_component(user_id) {
        user_id.to_string()
    } else {
        let mut s = String::from("u__");
        s.push_str(&hex::encode(user_id.as_bytes()));
        s
    };
    if out.len() > MAX_COMPONENT_LEN {
        return Err(Unmappable::TooLong {
            mapped_len: out.len(),
            max: MAX_COMPONENT_LEN,
        });
    }
    Ok(out)
}

/// `[a-z0-9]+((\.|-+)[a-z0-9]+)*`: a valid component with no `_`.
fn is_plain_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !b.first().copied().is_some_and(alnum) || !b.last().copied().is_some_and(alnum) {
        return false;
    }
    b.windows(2).all(|w| match (w[0], w[1]) {
        (a, c) if alnum(a) || alnum(c) => {
            (alnum(a) || a == b'.' || a == b'-') && (alnum(c) || c == b'.' || c == b'-')
        }
        (b'-', b'-') => true,
        _ => false,
    })
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('_');
    out.push(HEX[(byte >> 4) as usize] as char);
    out.push(HEX[(byte & 0xf) as usize] as char);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tag_prefix_table() {
        let table: &[(&str, Result<&str, Unmappable>)] = &[
            ("12896316", Ok("12896316")),
            ("alice", Ok("alice")),
            ("Alice.Smith-2", Ok("Alice.Smith-2")),
            ("jdoe@example.com", Ok("jdoe_40example.com")),
            ("a_b", Ok("a_5fb")),
            ("a_40b", Ok("a_5f40b")),
            (".hidden", Ok("_2ehidden")),
            ("-dash", Ok("_2ddash")),
            ("a b/c", Ok("a_20b_2fc")),
            ("é", Ok("_c3_a9")),
            ("", Err(Unmappable::Empty)),
        ];
        for (id, want) in table {
            assert_eq!(
                tag_prefix(id).as_deref(),
                want.as_ref().map(|s| *s),
                "{id:?}"
            );
        }
        let long = "x".repeat(MAX_PREFIX_LEN + 1);
        assert!(matches!(tag_prefix(&long), Err(Unmappable::TooLong { .. })));
        assert!(tag_prefix(&"x".repeat(MAX_PREFIX_LEN)).is_ok());
    }

    #[test]
    fn repository_component_table() {
        let table: &[(&str, &str)] = &[
            ("alice", "alice"),
            ("12896316", "12896316"),
            ("john.doe", "john.doe"),
            ("a--b", "a--b"),
            ("Alice", "u__416c696365"),
            ("a_b", "u__615f62"),
            ("a..b", "u__612e2e62"),
            ("-a", "u__2d61"),
            ("a.", "u__612e"),
            ("a@b", "u__614062"),
        ];
        for (id, want) in table {
            assert_eq!(repository_component(id).as_deref(), Ok(*want), "{id:?}");
        }
    }

    fn is_valid_tag_prefix(p: &str) -> bool {
        let b = p.as_bytes();
        !b.is_empty()
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    }

    proptest! {
        #[test]
        fn tag_prefix_is_injective(a in "\\PC{1,24}", b in "\\PC{1,24}") {
            if let (Ok(pa), Ok(pb)) = (tag_prefix(&a), tag_prefix(&b)) {
                prop_assert_eq!(pa == pb, a == b);
            }
        }

        #[test]
        fn tag_prefix_is_injective_on_lookalikes(a in "[a-zA-Z0-9._@-]{1,12}", b in "[a-zA-Z0-9._@-]{1,12}") {
            let (pa, pb) = (tag_prefix(&a).unwrap(), tag_prefix(&b).unwrap());
            prop_assert_eq!(pa == pb, a == b);
        }

        #[test]
        fn tag_prefix_round_trips_and_is_a_tag(a in "\\PC{1,8}") {
            let p = tag_prefix(&a).unwrap();
            prop_assert!(is_valid_tag_prefix(&p), "{p:?}");
            prop_assert_eq!(user_of_tag_prefix(&p), Some(a));
        }

        #[test]
        fn ordinary_ids_are_unchanged(a in "[a-zA-Z0-9][a-zA-Z0-9.-]{0,40}") {
            prop_assert_eq!(tag_prefix(&a).unwrap(), a);
        }

        #[test]
        fn repository_component_is_injective(a in "[a-zA-Z0-9._@-]{1,12}", b in "[a-zA-Z0-9._@-]{1,12}") {
            let (pa, pb) = (repository_component(&a).unwrap(), repository_component(&b).unwrap());
            prop_assert_eq!(pa == pb, a == b);
        }

        #[test]
        fn repository_component_is_valid(a in "\\PC{1,15}") {
            let c = repository_component(&a).unwrap();
            let ok = c.bytes().all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric();
            prop_assert!(ok, "{c:?}");
        }
    }
}
