//! Every setting of the sidecar, from the env the webhook injects (each also a flag).

use crate::{image::new_layer::Codec, registry::Protocol};
use clap::{Parser, ValueEnum};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "snapshot-sidecar",
    version,
    about = "Commits the desktop container and pushes it as the user's snapshot"
)]
pub struct Config {
    /// Address of the HTTP API.
    #[arg(long, env = "SNAPSHOT_LISTEN", default_value = "0.0.0.0:29785")]
    pub listen: SocketAddr,
    /// Name of this pod (downward API).
    #[arg(long, env = "SNAPSHOT_POD_NAME")]
    pub pod_name: String,
    /// Namespace of this pod (downward API).
    #[arg(long, env = "SNAPSHOT_POD_NAMESPACE")]
    pub pod_namespace: String,
    /// UID of this pod (downward API); the container is looked up by it.
    #[arg(long, env = "SNAPSHOT_POD_UID", default_value = "")]
    pub pod_uid: String,
    /// Name of the container to commit.
    #[arg(long, env = "SNAPSHOT_CONTAINER", default_value = "x-graphical")]
    pub container: String,
    /// Repository to push to, `host[:port]/path`.
    #[arg(long, env = "SNAPSHOT_REPOSITORY")]
    pub repository: String,
    /// Snapshot tags are `<prefix>-<epoch nanoseconds>`.
    #[arg(long, env = "SNAPSHOT_TAG_PREFIX")]
    pub tag_prefix: String,
    /// The graphical image the pod named (its base): the snapshot's provenance.
    #[arg(long, env = "SNAPSHOT_BASE_IMAGE")]
    pub base_image: Option<String>,
    /// The desktop's user, as the pod's label says: annotated on each snapshot.
    #[arg(long, env = "SNAPSHOT_USER", default_value = "")]
    pub user: String,
    /// How to reach the registry: `https` or `http`.
    #[arg(long, env = "SNAPSHOT_REGISTRY_PROTOCOL", value_enum, default_value_t = Protocol::Https)]
    pub registry_protocol: Protocol,
    /// Extra CA (PEM) to trust for the registry.
    #[arg(long, env = "SNAPSHOT_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
    /// The registry secret as a mounted `.dockerconfigjson`, read at each commit.
    #[arg(long, env = "SNAPSHOT_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,
    /// containerd's socket.
    #[arg(
        long,
        env = "SNAPSHOT_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    /// containerd namespace of the kubelet's containers.
    #[arg(long, env = "SNAPSHOT_CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub containerd_namespace: String,
    /// Largest change a snapshot may write to the node's disk, in bytes: the
    /// compressed layer in the work directory (and, through the Diff service,
    /// the uncompressed change). Past it the snapshot ends in `error`, the
    /// desktop runs on, nothing is pushed.
    #[arg(long, env = "SNAPSHOT_MAX_CHANGE_BYTES", default_value_t = 8 << 30)]
    pub max_change_bytes: u64,
    /// Shortest time between the end of one snapshot and the start of the next
    /// (each pauses the desktop and pushes a tag). A click or a logoff counts
    /// it from the end of the last click's or logoff's snapshot (never from a
    /// scheduled one's); the schedule from the end of the last of any kind.
    #[arg(long, env = "SNAPSHOT_MIN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub min_interval: Duration,
    /// Snapshot the desktop on a schedule, every this long (`30m`), at least
    /// `--min-interval`; `0` or unset: off (the webhook sets it from
    /// `--snapshot-every` or the pod's annotation). The first comes at a
    /// random moment within the interval, each next one the interval ± a
    /// tenth after the end of the last snapshot; one with nothing new pushes
    /// nothing.
    #[arg(long, env = "SNAPSHOT_EVERY", value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// Retention after each push: the user's snapshots in the repository that
    /// no rule keeps are deleted (manifest DELETE by digest). This many newest
    /// stay (`--keep` is its older name); 0 turns retention off, every
    /// snapshot stays.
    #[arg(
        long,
        visible_alias = "keep",
        env = "SNAPSHOT_KEEP",
        default_value_t = 10
    )]
    pub keep_last: usize,
    /// The newest snapshot of each of this many newest hours (UTC) that have one stays.
    #[arg(long, env = "SNAPSHOT_KEEP_HOURLY", default_value_t = 24)]
    pub keep_hourly: usize,
    /// The newest snapshot of each of this many newest days (UTC) that have one stays.
    #[arg(long, env = "SNAPSHOT_KEEP_DAILY", default_value_t = 7)]
    pub keep_daily: usize,
    /// The newest snapshot of each of this many newest ISO weeks that have one stays.
    #[arg(long, env = "SNAPSHOT_KEEP_WEEKLY", default_value_t = 4)]
    pub keep_weekly: usize,
    /// Retention never deletes a snapshot younger than this, so a burst of
    /// snapshots cannot push out what was just saved.
    #[arg(long, env = "SNAPSHOT_KEEP_MIN_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub keep_min_age: Duration,
    /// Snapshot the desktop when its pod goes away (the webhook sets it with
    /// `--snapshot-on-logoff`): on SIGTERM the sidecar commits and pushes
    /// before it exits, unless the preStop hook's request already did.
    #[arg(long, env = "SNAPSHOT_ON_LOGOFF", default_value_t = false, action = clap::ArgAction::Set)]
    pub on_logoff: bool,
    /// The pod's termination grace period (the webhook writes the pod's
    /// `terminationGracePeriodSeconds` here): a logoff snapshot not finished
    /// within it less `--logoff-margin` is abandoned, nothing tagged.
    #[arg(long, env = "SNAPSHOT_LOGOFF_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub logoff_grace_period: Duration,
    /// Time kept back from the grace period for the desktop and the sidecar
    /// to stop after a logoff snapshot, before the kubelet's SIGKILL.
    #[arg(long, env = "SNAPSHOT_LOGOFF_MARGIN", default_value = "10s", value_parser = humantime::parse_duration)]
    pub logoff_margin: Duration,
    /// Pause the container while its changes are read (a consistent snapshot).
    /// The Diff service always pauses it.
    #[arg(long, env = "SNAPSHOT_PAUSE", default_value_t = true, action = clap::ArgAction::Set)]
    pub pause: bool,
    /// Pre-copy: read and compress the upper directory while the desktop
    /// runs, then pause it only to read again what changed meanwhile (the
    /// layer is still the desktop at the pause); `false`: paused for the whole
    /// read and compression. No effect with `--pause false` or through the
    /// Diff service, which pauses for its whole diff.
    #[arg(long, env = "SNAPSHOT_PRE_COPY", default_value_t = true, action = clap::ArgAction::Set)]
    pub pre_copy: bool,
    /// Incremental snapshots: after the first snapshot of a container, each
    /// adds to the last one a layer of what changed since it (read from the
    /// upper directory against the record of the last capture kept in
    /// `--work-dir`); `false`: every snapshot's layer holds the whole change
    /// since the desktop started, on the desktop's image.
    #[arg(long, env = "SNAPSHOT_INCREMENTAL", default_value_t = true, action = clap::ArgAction::Set)]
    pub incremental: bool,
    /// Most layers a snapshot may have; past it the whole desktop is squashed into one
    /// layer, so a desktop can be snapshotted any number of times and still start.
    #[arg(long, env = "SNAPSHOT_MAX_LAYERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub max_layers: u32,
    /// Format of the new layer (`--layer-format`, or its legacy spelling
    /// `--compression`).
    #[command(flatten)]
    pub compression: LayerFormat,
    /// eStargz: paths (relative to `/`, `*` within a name, comma-separated)
    /// whose entries go before the prefetch landmark, fetched before the
    /// desktop starts; `none` for no prefetch.
    #[arg(long, env = "SNAPSHOT_PREFETCH", value_delimiter = ',', default_value = crate::layer::estargz::Prefetch::DEFAULT_PATHS)]
    pub prefetch: Vec<String>,
    /// eStargz: most bytes of file data before the prefetch landmark (files
    /// of at most 1 MiB each, in name order).
    #[arg(long, env = "SNAPSHOT_PREFETCH_MAX_BYTES", default_value_t = 32 << 20)]
    pub prefetch_max_bytes: u64,
    /// Threads compressing the layer (default: every core).
    #[arg(long, env = "SNAPSHOT_COMPRESSION_THREADS", default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))]
    pub compression_threads: usize,
    /// Compression level (gzip 1-9, zstd 1-19); default gzip 1, zstd 3, fast
    /// because the desktop is paused while its layer is compressed.
    #[arg(long, env = "SNAPSHOT_COMPRESSION_LEVEL")]
    pub compression_level: Option<i32>,
    /// Where the layer comes from: `auto` reads the overlayfs upper directory
    /// when it is reachable (time in proportion to the change) and falls back to
    /// containerd's Diff service; `diff-service` always uses the Diff service.
    #[arg(long, env = "SNAPSHOT_LAYER_SOURCE", value_enum, default_value_t = LayerSource::Auto)]
    pub layer_source: LayerSource,
    /// Directory for the compressed layer between the pause and the upload.
    #[arg(long, env = "SNAPSHOT_WORK_DIR", default_value = "/tmp")]
    pub work_dir: PathBuf,
    /// Lifetime of the containerd lease that protects the work in progress.
    #[arg(long, env = "SNAPSHOT_LEASE_EXPIRY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub lease_expiry: Duration,
    /// File holding a token the API requires as `ABCAuthorization: Bearer <token>`; off when unset.
    #[arg(long, env = "SNAPSHOT_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Log format: `json` or `text`.
    #[arg(long, env = "SNAPSHOT_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

impl Config {
    /// The schedule's interval, when there is one: `--every`, raised to
    /// `--min-interval`.
    pub fn schedule(&self) -> Option<Duration> {
        self.every
            .filter(|every| !every.is_zero())
            .map(|every| every.max(self.min_interval))
    }

    /// What retention keeps (`--keep-last`, `--keep-hourly`, `--keep-daily`,
    /// `--keep-weekly`, `--keep-min-age`).
    pub fn retention(&self) -> snapshot_tags::retention::Rules {
        snapshot_tags::retention::Rules {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            min_age: self.keep_min_age,
        }
    }

    pub fn compression(&self) -> crate::layer::Compression {
        let paths = self
            .prefetch
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty() && p != "none")
            .collect();
        crate::layer::Compression {
            codec: *self.compression,
            level: self.compression_level,
            threads: self.compression_threads,
            prefetch: crate::layer::estargz::Prefetch {
                paths,
                max_bytes: self.prefetch_max_bytes,
            },
            spill_dir: self.work_dir.clone(),
            spill_limit: self.max_change_bytes,
        }
    }
}

/// The new layer's format: `--layer-format` (`SNAPSHOT_LAYER_FORMAT`), or
/// its legacy spelling `--compression` (`SNAPSHOT_COMPRESSION`); both given
/// and different is an error. Reads as the [`Codec`] it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerFormat(pub Codec);

impl std::ops::Deref for LayerFormat {
    type Target = Codec;
    fn deref(&self) -> &Codec {
        &self.0
    }
}

#[derive(clap::Args, Debug, Clone)]
struct LayerFormatFlags {
    /// Format of the new layer: `gzip` (every runtime reads it), `zstd`
    /// (faster, smaller; containerd >= 1.5) or `estargz` (gzip that the
    /// stargz snapshotter mounts before it is downloaded). Default `gzip`.
    #[arg(long = "layer-format", env = "SNAPSHOT_LAYER_FORMAT", value_enum)]
    layer_format: Option<Codec>,
    /// The legacy spelling of `--layer-format`.
    #[arg(
        long = "compression",
        env = "SNAPSHOT_COMPRESSION",
        value_enum,
        hide = true
    )]
    compression: Option<Codec>,
}

impl clap::FromArgMatches for LayerFormat {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let flags = LayerFormatFlags::from_arg_matches(matches)?;
        let name = |c: Codec| {
            c.to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        };
        match (flags.layer_format, flags.compression) {
            (Some(new), Some(old)) if new != old => Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--layer-format (SNAPSHOT_LAYER_FORMAT) says {} but its legacy spelling --compression (SNAPSHOT_COMPRESSION) says {}: give one\n",
                    name(new),
                    name(old)
                ),
            )),
            (new, old) => Ok(LayerFormat(new.or(old).unwrap_or(Codec::Gzip))),
        }
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for LayerFormat {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        LayerFormatFlags::augment_args(cmd)
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        LayerFormatFlags::augment_args_for_update(cmd)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSource {
    Auto,
    DiffService,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let base = [
            "snapshot-sidecar",
            "--pod-name=p",
            "--pod-namespace=n",
            "--repository=r/x",
            "--tag-prefix=t",
        ];
        Config::try_parse_from(base.iter().chain(args))
    }

    #[test]
    fn the_layer_format_has_a_legacy_spelling() {
        for (args, want) in [
            (&[][..], Some(Codec::Gzip)),
            (&["--layer-format=estargz"][..], Some(Codec::Estargz)),
            (&["--compression=zstd"][..], Some(Codec::Zstd)),
            (
                &["--layer-format=zstd", "--compression=zstd"][..],
                Some(Codec::Zstd),
            ),
            (&["--layer-format=gzip", "--compression=zstd"][..], None),
            (&["--layer-format=lz4"][..], None),
        ] {
            let got = parse(args).map(|c| *c.compression);
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{args:?}: {got:?}");
        }
        let err = parse(&["--layer-format=estargz", "--compression=gzip"]).unwrap_err();
        assert!(
            err.to_string().contains("legacy spelling --compression"),
            "{err}"
        );
    }

    #[test]
    fn retention_by_tiers_with_keep_as_the_older_name_of_keep_last() {
        use snapshot_tags::retention::Rules;
        let day = Duration::from_secs(86_400);
        let defaults = Rules {
            last: 10,
            hourly: 24,
            daily: 7,
            weekly: 4,
            min_age: Duration::from_secs(3_600),
        };
        for (args, want) in [
            (&[][..], defaults),
            (
                &["--keep=3"][..],
                Rules {
                    last: 3,
                    ..defaults
                },
            ),
            (
                &[
                    "--keep-last=3",
                    "--keep-hourly=0",
                    "--keep-daily=2",
                    "--keep-weekly=0",
                ][..],
                Rules {
                    last: 3,
                    hourly: 0,
                    daily: 2,
                    weekly: 0,
                    ..defaults
                },
            ),
            (
                &["--keep=0", "--keep-min-age=7d"][..],
                Rules {
                    last: 0,
                    min_age: day * 7,
                    ..defaults
                },
            ),
        ] {
            let got = parse(args).map(|c| c.retention());
            assert_eq!(got.as_ref().ok(), Some(&want), "{args:?}: {got:?}");
        }
        assert!(parse(&["--keep=0"]).unwrap().retention().off());
    }

    #[test]
    fn the_schedule_is_off_by_default_and_never_under_the_minimum_interval() {
        let m = |n: u64| Some(Duration::from_secs(60 * n));
        // (flags, schedule; None in the outer: refused)
        for (args, want) in [
            (&[][..], Some(None)),
            (&["--every=0"][..], Some(None)),
            (&["--every=0s"][..], Some(None)),
            (&["--every=15m"][..], Some(m(15))),
            (&["--every=1h", "--min-interval=2h"][..], Some(m(120))),
            (&["--every=10s"][..], Some(Some(Duration::from_secs(30)))),
            (&["--every=often"][..], None),
        ] {
            let got = parse(args).map(|c| c.schedule());
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{args:?}: {got:?}");
        }
    }

    #[test]
    fn prefetch_paths_default_to_the_desktop_start_and_can_be_off() {
        let c = parse(&["--layer-format=estargz"]).unwrap().compression();
        assert_eq!(c.codec, Codec::Estargz);
        assert!(c.prefetch.paths.iter().any(|p| p == "home/*/.config"));
        assert_eq!(c.prefetch.max_bytes, 32 << 20);
        let c = parse(&["--prefetch=none"]).unwrap().compression();
        assert!(c.prefetch.paths.is_empty());
        let c = parse(&["--prefetch=etc, opt/app", "--prefetch-max-bytes=10"])
            .unwrap()
            .compression();
        assert_eq!(c.prefetch.paths, ["etc", "opt/app"]);
        assert_eq!(c.prefetch.max_bytes, 10);
    }
}
