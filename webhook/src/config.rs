//! Every setting of the webhook: command-line flags, each with an environment
//! variable of the same meaning (`SNAPSHOT_WEBHOOK_*`) and a default.

use crate::policy::{Layout, OnNewBase};
use clap::{Parser, ValueEnum};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "snapshot-webhook",
    version,
    about = "Restores each desktop user's newest snapshot when a desktop pod is created"
)]
pub struct Config {
    /// Address to serve HTTPS on.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Serving certificate (PEM); re-read when it changes on disk.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_TLS_CERT",
        default_value = "/etc/snapshot-webhook/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,

    /// Private key of the serving certificate (PEM).
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_TLS_KEY",
        default_value = "/etc/snapshot-webhook/tls/tls.key"
    )]
    pub tls_key: PathBuf,

    /// How often the certificate files are checked for a change.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,

    /// The snapshot registry, `host[:port]` (the registry of od.config's snapshot secret).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_REGISTRY")]
    pub registry: String,

    /// How to reach the registry: `https` or `http` (od.config `desktop.snapshotregistryprotocol`).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_REGISTRY_PROTOCOL", value_enum, default_value_t = Protocol::Https)]
    pub registry_protocol: Protocol,

    /// Extra CA certificate (PEM) to trust for the registry, besides the system roots.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,

    /// The registry credentials as a mounted `.dockerconfigjson` file; anonymous when absent.
    /// Re-read when it changes.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,

    /// Name of the `kubernetes.io/dockerconfigjson` secret of the registry, in the desktop
    /// namespace (od.config `desktop.snapshotregistrysecretname`): added to the pod's
    /// `imagePullSecrets` and mounted in the sidecar.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_REGISTRY_SECRET_NAME",
        default_value = "abcdesktop-snapshot-registry"
    )]
    pub registry_secret_name: String,

    /// ConfigMap (in the desktop namespace) whose key `ca.crt` is the registry's CA, for a
    /// registry with a private CA: mounted in the sidecar, which then trusts it.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_REGISTRY_CA_CONFIGMAP")]
    pub sidecar_registry_ca_configmap: Option<String>,

    /// Ask the Kubernetes API whether the pod's namespace holds the registry
    /// secret (and the CA configMap, when set): a `get` of that one name, as
    /// metadata only. Without the secret a desktop is not restored (the
    /// kubelet could not pull its snapshot) and is told it has no snapshots;
    /// when the API does not answer, it is restored as if the secret were there.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_NAMESPACE_CHECK", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub namespace_check: bool,

    /// The API server to ask, without credentials (`http://127.0.0.1:8001`
    /// behind `kubectl proxy`, or a test's); unset: the pod's service account
    /// (in-cluster), else the kubeconfig.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// How long the API's "present" answer about a namespace's object is kept.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_NAMESPACE_PRESENT_TTL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub namespace_present_ttl: Duration,

    /// How long a "missing" (or no) answer is kept: creating the secret takes
    /// effect within this.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_NAMESPACE_MISSING_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub namespace_missing_ttl: Duration,

    /// Where snapshots live: `shared` (`<registry>/<image path>:<user>-<timestamp>`) or
    /// `per-user` (`<registry>/<user>/<image path>:<base tag>-<timestamp>`).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_LAYOUT", value_enum, default_value_t = Layout::Shared)]
    pub layout: Layout,

    /// Pods this webhook acts on: comma-separated `key=value` labels, all required.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_POD_SELECTOR",
        default_value = "type=x11server"
    )]
    pub pod_selector: String,

    /// Pod label that holds the user id.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_USER_LABEL",
        default_value = "access_userid"
    )]
    pub user_label: String,

    /// Name of the graphical container (the one restored and committed).
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_GRAPHICAL_CONTAINER",
        default_value = "x-graphical"
    )]
    pub graphical_container: String,

    /// Time budget of a whole admission, from the request's arrival at the
    /// webhook (a queue before the handler counts): when it is spent, the
    /// answer is the fail-open one (sidecar injected, original image, a
    /// warning), and a lookup not started yet is not started. Keep it well
    /// below the webhook configuration's `timeoutSeconds` (5).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_ADMISSION_BUDGET", default_value = "2s", value_parser = humantime::parse_duration)]
    pub admission_budget: Duration,

    /// When the pod's graphical image is not the base the user's newest
    /// snapshot sits on (the operator upgraded the desktops): `rebase`
    /// writes the user's layers on the new base as a new snapshot (config
    /// and manifest only; the new base must be in the snapshot registry) and
    /// restores it, falling back to `keep` on any failure; `keep` restores the
    /// snapshot on its old base; `fresh` starts from the new base (the
    /// snapshots stay for a pin).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_ON_NEW_BASE", value_enum, default_value_t = OnNewBase::Rebase)]
    pub on_new_base: OnNewBase,

    /// Time budget of one registry lookup; past it the pod keeps its image.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_LOOKUP_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lookup_timeout: Duration,

    /// Most lookups at the registry at once; a lookup past it waits for its
    /// turn within `--lookup-timeout`, then fails open having sent nothing,
    /// so a slow registry is not buried under requests nobody waits for.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_REGISTRY_MAX_IN_FLIGHT",
        default_value_t = 64
    )]
    pub registry_max_in_flight: usize,

    /// Pin the restored image by digest (`repo:tag@sha256:…`), one more registry request.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_PIN_DIGEST", default_value_t = false)]
    pub pin_digest: bool,

    /// Image of the commit sidecar.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_IMAGE",
        default_value = "desktop-snapshot/snapshot-sidecar:0.1.0"
    )]
    pub sidecar_image: String,

    /// imagePullPolicy of the sidecar.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub sidecar_pull_policy: String,

    /// Name of the injected sidecar container.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_NAME",
        default_value = "t-snapshot"
    )]
    pub sidecar_name: String,

    /// Port of the sidecar's HTTP API.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_PORT", default_value_t = 29785)]
    pub sidecar_port: u16,

    /// `container`: a plain container; `native`: an init container with `restartPolicy: Always`
    /// (Kubernetes >= 1.29).
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Container)]
    pub sidecar_mode: SidecarMode,

    /// The node's containerd socket, mounted in the sidecar.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: String,

    /// containerd namespace of the kubelet's containers.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_CONTAINERD_NAMESPACE",
        default_value = "k8s.io"
    )]
    pub containerd_namespace: String,

    /// containerd's overlayfs snapshotter directory on the nodes, mounted read-only
    /// in the sidecar (with CAP_SYS_ADMIN) so it reads only what the user changed;
    /// empty: the sidecar uses containerd's Diff service (slower, walks the whole
    /// root filesystem).
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_CONTAINERD_SNAPSHOTTER_ROOT",
        default_value = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
    )]
    pub containerd_snapshotter_root: String,

    /// CPU limit of the sidecar (a Kubernetes quantity, e.g. `1`); empty: none.
    /// A snapshot is a burst that compresses on every core while the desktop is
    /// paused, so a low limit lengthens the pause the user feels.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_CPU_LIMIT", default_value = "")]
    pub sidecar_cpu_limit: String,

    /// Largest change a snapshot may write to the node's disk, in bytes (the
    /// sidecar's `--max-change-bytes`): past it the snapshot ends in `error` and
    /// nothing is pushed. Each file a snapshot writes into its work directory
    /// is held to it; the sidecar's work emptyDir gets a `sizeLimit` of four
    /// times this (the files of a pre-copied snapshot) plus 256 MiB, so the
    /// sidecar stops first and the kubelet never has to evict the desktop.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_MAX_CHANGE_BYTES", default_value_t = 8 << 30)]
    pub sidecar_max_change_bytes: u64,

    /// The sidecar's `--layer-format`: `estargz` (the default: a gzip layer
    /// every runtime reads, restored fastest on overlayfs, and pulled lazily
    /// where nodes run the stargz snapshotter; with pre-copy the desktop's
    /// freeze no longer depends on the format), `zstd` (containerd >= 1.5,
    /// CRI-O >= 1.20; the shortest click-to-tag time), or `gzip`.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_LAYER_FORMAT",
        default_value = "estargz",
        value_parser = clap::builder::PossibleValuesParser::new(["gzip", "zstd", "estargz"])
    )]
    pub sidecar_layer_format: String,

    /// The sidecar's `--pre-copy`: the desktop's change is read and compressed
    /// while it runs, and the desktop frozen only to read again what changed
    /// meanwhile; `false`: frozen for the whole read and compression.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_PRE_COPY", default_value_t = true, action = clap::ArgAction::Set)]
    pub sidecar_pre_copy: bool,

    /// The sidecar's `--incremental`: after a desktop's first snapshot, each
    /// adds a layer of what changed since the last one; `false`: every
    /// snapshot's layer holds the whole change since the desktop started.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_INCREMENTAL", default_value_t = true, action = clap::ArgAction::Set)]
    pub sidecar_incremental: bool,

    /// The sidecar's retention (its `--keep-last`): after a push, the user's
    /// newest this many snapshots stay (0 turns retention off: every one
    /// stays). `--sidecar-keep` is its older name.
    #[arg(
        long,
        visible_alias = "sidecar-keep",
        env = "SNAPSHOT_WEBHOOK_SIDECAR_KEEP",
        default_value_t = 10
    )]
    pub sidecar_keep_last: usize,

    /// The sidecar's `--keep-hourly`: the newest snapshot of each of this many newest hours stays.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_KEEP_HOURLY",
        default_value_t = 24
    )]
    pub sidecar_keep_hourly: usize,

    /// The sidecar's `--keep-daily`: the newest snapshot of each of this many newest days stays.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_KEEP_DAILY", default_value_t = 7)]
    pub sidecar_keep_daily: usize,

    /// The sidecar's `--keep-weekly`: the newest snapshot of each of this many newest ISO weeks stays.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_SIDECAR_KEEP_WEEKLY",
        default_value_t = 4
    )]
    pub sidecar_keep_weekly: usize,

    /// Retention never deletes a snapshot younger than this.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SIDECAR_KEEP_MIN_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub sidecar_keep_min_age: std::time::Duration,

    /// Most admissions in flight on one HTTP/2 connection (kube-apiserver sends
    /// them over few connections); past it requests wait in the client, before
    /// the admission budget starts. hyper's default is 200.
    #[arg(
        long,
        env = "SNAPSHOT_WEBHOOK_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 2000
    )]
    pub http2_max_concurrent_streams: u32,

    /// Snapshot each desktop when its pod is deleted (the user logs off):
    /// the graphical container gets a preStop hook that asks the sidecar for
    /// a snapshot and waits for it. A pod's annotation
    /// `snapshot.abcdesktop.io/on-logoff: "true"|"false"` wins.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SNAPSHOT_ON_LOGOFF", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub snapshot_on_logoff: bool,

    /// With a snapshot at logoff, a pod's `terminationGracePeriodSeconds`
    /// shorter than this is raised to it: the time the kubelet gives the
    /// snapshot (less 10 s kept for stopping) before it kills the desktop.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_LOGOFF_GRACE_PERIOD", default_value = "5m", value_parser = humantime::parse_duration)]
    pub logoff_grace_period: Duration,

    /// Snapshot each desktop on a schedule, every this long (`30m`, `1h`);
    /// `0`, the default, is off. A pod's annotation
    /// `snapshot.abcdesktop.io/every` wins (`0` turns it off). The sidecar
    /// spreads the desktops' snapshots over the interval and skips one when
    /// nothing changed since the last.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_SNAPSHOT_EVERY", default_value = "0", value_parser = humantime::parse_duration)]
    pub snapshot_every: Duration,

    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Log format: `json` or `text`.
    #[arg(long, env = "SNAPSHOT_WEBHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Https => "https",
            Protocol::Http => "http",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    Container,
    Native,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}
