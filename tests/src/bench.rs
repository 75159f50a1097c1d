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
