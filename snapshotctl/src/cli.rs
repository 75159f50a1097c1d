//! Every flag of `snapshotctl`, each also read from an environment variable
//! `SNAPSHOTCTL_*`, with its default. The registry flags mean what the
//! webhook's `--registry*` and `--layout` flags mean.

use clap::{Args, Parser, Subcommand, ValueEnum};
use snapshot_webhook::{config::Protocol, policy::Layout};
use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

#[derive(Parser, Debug)]
#[command(
    name = "snapshotctl",
    version,
    about = "Lists, shows, prunes, pins and forgets desktop snapshots in the snapshot registry"
)]
pub struct Cli {
    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Output of the command on stdout: `table` or `json`.
    #[arg(long, global = true, env = "SNAPSHOTCTL_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// No progress lines on stderr.
    #[arg(long, global = true, env = "SNAPSHOTCTL_QUIET")]
    pub quiet: bool,

    /// Log filter (tracing `EnvFilter` syntax) for the logs on stderr.
    #[arg(long, global = true, env = "SNAPSHOTCTL_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the snapshots are and how to reach them (as the webhook's flags).
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// The snapshot registry, `host[:port]`.
    #[arg(long, global = true, env = "SNAPSHOTCTL_REGISTRY", default_value = "")]
    pub registry: String,

    /// How to reach the registry: `https` or `http`.
    #[arg(long, global = true, env = "SNAPSHOTCTL_REGISTRY_PROTOCOL", value_enum, default_value_t = Protocol::Https)]
    pub registry_protocol: Protocol,

    /// Extra CA certificate (PEM) to trust for the registry, besides the system roots.
    #[arg(long, global = true, env = "SNAPSHOTCTL_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,

    /// The registry credentials, a `.dockerconfigjson` file; anonymous when absent.
    #[arg(long, global = true, env = "SNAPSHOTCTL_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,

    /// Where snapshots live: `shared` (`<registry>/<image path>:<user>-<timestamp>`) or
    /// `per-user` (`<registry>/<user>/<image path>:<base tag>-<timestamp>`).
    #[arg(long, global = true, env = "SNAPSHOTCTL_LAYOUT", value_enum, default_value_t = Layout::Shared)]
    pub layout: Layout,

    /// Desktop images whose snapshots to act on, as pods name them
    /// (`abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1`); repeat or separate with
    /// commas. Default: every repository of the registry's catalog.
    #[arg(
        long = "image",
        global = true,
        env = "SNAPSHOTCTL_IMAGE",
        value_delimiter = ','
    )]
    pub images: Vec<String>,

    /// Registry requests in flight at once (manifest reads).
    #[arg(long, global = true, env = "SNAPSHOTCTL_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The snapshots (tag, created, base image, size of the user's layers), newest first per
    /// user; with `--user`, the user's timeline (when, trigger, bytes added, tag).
    List {
        /// Only this user's snapshots (the user id, as the pod's user label has it).
        #[arg(long, env = "SNAPSHOTCTL_USER")]
        user: Option<String>,
    },
    /// Prints the pod annotation that restores one of the user's snapshots: the one at or just
    /// before a moment (in each of the user's series), or the one with a tag.
    #[command(group(clap::ArgGroup::new("moment").required(true).args(["at", "ago", "tag"])))]
    Pin {
        /// The user whose desktop to restore.
        #[arg(long, env = "SNAPSHOTCTL_USER")]
        user: String,
        /// The moment, RFC 3339 in UTC (`2026-12-01T18:00:00Z`): the snapshot taken at or
        /// just before it.
        #[arg(long, value_parser = parse_utc)]
        at: Option<SystemTime>,
        /// The moment as a time ago (`1d`, `3h 30m`): the snapshot taken at or just before it.
        #[arg(long, value_parser = humantime::parse_duration)]
        ago: Option<Duration>,
        /// The snapshot's tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// One snapshot in detail: digest, provenance, layers, annotations.
    Show {
        /// The snapshot's tag.
        tag: String,
        /// Look only among this user's repositories (per-user layout).
        #[arg(long, env = "SNAPSHOTCTL_USER")]
        user: Option<String>,
    },
    /// Deletes each user's snapshots that no rule keeps (per image and base tag): the newest
    /// `--keep-last`, the newest of each of the `--keep-hourly` newest hours, `--keep-daily`
    /// days and `--keep-weekly` ISO weeks (UTC) that have one, and those younger than
    /// `--min-age`. The newest always stays.
    #[command(group(clap::ArgGroup::new("rules").required(true).multiple(true)
        .args(["keep_last", "keep_hourly", "keep_daily", "keep_weekly"])))]
    Prune {
        /// How many of each user's newest snapshots stay (default 1: the newest, which always
        /// stays). `--keep` is its older name.
        #[arg(long, visible_alias = "keep", env = "SNAPSHOTCTL_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// The newest snapshot of each of this many newest hours that have one.
        #[arg(long, env = "SNAPSHOTCTL_KEEP_HOURLY", default_value_t = 0)]
        keep_hourly: u32,
        /// The newest snapshot of each of this many newest days that have one.
        #[arg(long, env = "SNAPSHOTCTL_KEEP_DAILY", default_value_t = 0)]
        keep_daily: u32,
        /// The newest snapshot of each of this many newest ISO weeks that have one.
        #[arg(long, env = "SNAPSHOTCTL_KEEP_WEEKLY", default_value_t = 0)]
        keep_weekly: u32,
        /// Snapshots younger than this stay whatever their number.
        #[arg(long, env = "SNAPSHOTCTL_MIN_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
        min_age: Duration,
        /// Only this user's snapshots.
        #[arg(long, env = "SNAPSHOTCTL_USER")]
        user: Option<String>,
        /// Print what would be deleted; delete nothing.
        #[arg(long, env = "SNAPSHOTCTL_DRY_RUN")]
        dry_run: bool,
    },
    /// Moves snapshots onto a new base image (not wired yet).
    Rebase {
        /// The new base image.
        #[arg(long, env = "SNAPSHOTCTL_ONTO")]
        onto: String,
        /// Only this user's snapshots.
        #[arg(
            long,
            env = "SNAPSHOTCTL_USER",
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        user: Option<String>,
        /// Every user's snapshots.
        #[arg(long, env = "SNAPSHOTCTL_ALL")]
        all: bool,
        /// Print what would be rebased; change nothing.
        #[arg(long, env = "SNAPSHOTCTL_DRY_RUN")]
        dry_run: bool,
    },
    /// Erases every snapshot of one user (a deletion request).
    Forget {
        /// The user whose snapshots go.
        #[arg(long, env = "SNAPSHOTCTL_USER")]
        user: String,
        /// Print what would be deleted; delete nothing.
        #[arg(long, env = "SNAPSHOTCTL_DRY_RUN")]
        dry_run: bool,
    },
}

/// An RFC 3339 time in UTC (`2026-12-01T18:00:00Z`; the `T` may be a space,
/// the `Z` left out).
fn parse_utc(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s.trim()).map_err(|e| {
        format!("{e}: give an RFC 3339 time in UTC, such as 2026-12-01T18:00:00Z, or use --ago")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_flags_hold_together() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_each_subcommand() {
        let table: &[&[&str]] = &[
            &["snapshotctl", "--registry", "r:5000", "list"],
            &["snapshotctl", "list", "--user", "alice", "--output", "json"],
            &["snapshotctl", "show", "alice-1", "--image", "a/b:1,c/d:2"],
            &["snapshotctl", "prune", "--keep", "3", "--dry-run"],
            &[
                "snapshotctl",
                "prune",
                "--keep-last",
                "3",
                "--keep-daily",
                "7",
            ],
            &["snapshotctl", "prune", "--keep-weekly", "4"],
            &[
                "snapshotctl",
                "pin",
                "--user",
                "alice",
                "--at",
                "2026-12-01T18:00:00Z",
            ],
            &["snapshotctl", "pin", "--user", "alice", "--ago", "1d"],
            &["snapshotctl", "pin", "--user", "alice", "--tag", "alice-1"],
            &["snapshotctl", "rebase", "--onto", "a/b:2", "--all"],
            &["snapshotctl", "forget", "--user", "alice"],
        ];
        for args in table {
            assert!(Cli::try_parse_from(*args).is_ok(), "{args:?}");
        }
        let cli =
            Cli::try_parse_from(["snapshotctl", "show", "t-1", "--image", "a/b:1,c/d:2"]).unwrap();
        assert_eq!(cli.registry.images, ["a/b:1", "c/d:2"]);
    }

    #[test]
    fn refuses_what_makes_no_sense() {
        let table: &[&[&str]] = &[
            &["snapshotctl", "prune", "--keep", "0"],
            &[
                "snapshotctl",
                "prune",
                "--keep-last",
                "0",
                "--keep-daily",
                "1",
            ],
            &["snapshotctl", "prune"],
            &["snapshotctl", "prune", "--min-age", "1d"],
            &["snapshotctl", "pin", "--user", "alice"],
            &[
                "snapshotctl",
                "pin",
                "--user",
                "alice",
                "--ago",
                "1d",
                "--tag",
                "t-1",
            ],
            &["snapshotctl", "pin", "--user", "alice", "--at", "yesterday"],
            &[
                "snapshotctl",
                "pin",
                "--user",
                "alice",
                "--at",
                "2026-12-01T18:00:00+02:00",
            ],
            &["snapshotctl", "pin", "--at", "2026-12-01T18:00:00Z"],
            &["snapshotctl", "rebase", "--onto", "a/b:2"],
            &[
                "snapshotctl",
                "rebase",
                "--onto",
                "a/b:2",
                "--all",
                "--user",
                "a",
            ],
            &["snapshotctl", "forget"],
            &["snapshotctl", "list", "--concurrency", "0"],
        ];
        for args in table {
            assert!(Cli::try_parse_from(*args).is_err(), "{args:?}");
        }
    }
}
