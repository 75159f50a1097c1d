//! What the benchmarks share: their settings from the environment and the
//! time their tables are stamped with.

/// The setting `name` from the environment, or `default` when unset or
/// not a `T`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Now, UTC, to the minute (`2026-12-02 05:43 UTC`), as `date` prints it;
/// empty if `date` cannot run.
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A sidecar's JSON log lines whose message starts with `message` (every
/// line for an empty one).
pub fn log_lines(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}
