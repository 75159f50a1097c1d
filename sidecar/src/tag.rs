//! The snapshot's tag: `<prefix>-<epoch nanoseconds>`, the form the webhook
//! restores (the largest timestamp, as a number, wins).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn snapshot_tag(prefix: &str, now: SystemTime) -> String {
    let ns = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{ns}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nanoseconds_after_the_prefix() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(
            snapshot_tag("jdoe_40example.com", t),
            "jdoe_40example.com-1700000000123456789"
        );
    }
}
