//! Every setting of the sidecar, from the env the webhook injects (each also a flag).

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
    /// (each pauses the desktop and pushes a tag).
    #[arg(long, env = "SNAPSHOT_MIN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub min_interval: Duration,
    /// After a push, the user's snapshots in the repository beyond this many
    /// newest are deleted (manifest DELETE by digest); 0 keeps every one.
    #[arg(long, env = "SNAPSHOT_KEEP", default_value_t = 10)]
    pub keep: usize,
    /// Retention never deletes a snapshot younger than this, so a burst of
    /// snapshots cannot erase a user's history.
    #[arg(long, env = "SNAPSHOT_KEEP_MIN_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
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
    /// Most layers a snapshot may have; past it the whole desktop is squashed into one
    /// layer, so a desktop can be snapshotted any number of times and still start.
    #[arg(long, env = "SNAPSHOT_MAX_LAYERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub max_layers: u32,
    /// Compression of the new layer: `gzip` (every runtime reads it) or `zstd`
    /// (faster, smaller; containerd >= 1.5).
    #[arg(long, env = "SNAPSHOT_COMPRESSION", value_enum, default_value_t = crate::layer::Codec::Gzip)]
    pub compression: crate::layer::Codec,
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
    pub fn compression(&self) -> crate::layer::Compression {
        crate::layer::Compression {
            codec: self.compression,
            level: self.compression_level,
            threads: self.compression_threads,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSource {
    Auto,
    DiffService,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
}
