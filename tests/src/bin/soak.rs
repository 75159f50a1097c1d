//! `just soak` (issue 11 §5; not part of `just test`): the release webhook
//! and sidecar under a steady load for a long time, against the real
//! registry and containerd, with a registry restart and a certificate
//! rotation on the way.
//!
//! For `--minutes` (10): AdmissionReview v1 bodies for the desktop pods of
//! `--users` (200) users at `--rate` (200) admissions/s, open loop (latency
//! measured from each request's scheduled send time), half of the users
//! holding snapshots in the registry; one desktop container whose user writes
//! a change of `--change-mib` (4) MiB (half random, half text, replacing the
//! previous change) before each snapshot, a snapshot every `--snapshot-every`
//! (10) seconds through a real sidecar process, polled until done or error.
//! The registry is restarted once in the middle (same address, storage, TLS
//! and auth), the webhook's serving certificate rotated once (same CA, as
//! kubelet updates the secret volume).
//!
//! Prints one row per minute: admissions answered and not answered, the
//! client's p99 and the webhook's own (its `admission_duration_seconds`
//! histogram: the bucket bound the 99th percentile falls under), admissions
//! over the budget and answered fail-open, snapshots done and failed (and the
//! longest), RSS and open descriptors of the webhook and the sidecar (sampled
//! at the minute's end, between two snapshots), the machine's load average,
//! and what happened in that minute. Ends non-zero, with one line per violated condition, when an
//! admission exceeded the budget or went unanswered, a desktop was left
//! paused, a tag points at an incomplete image, or the RSS or descriptors of
//! either process grew by more than 10 % between the first minute and the
//! last (and by more than 2 MiB / 4 descriptors, so tiny figures do not trip
//! it). Snapshots that fail while the registry is down are counted, not fatal.

use harness::{
    admission::{desktop_pod, review},
    registry::{Registry, PASSWORD, USER},
    sidecar::{Rig, Sidecar, Target, RIG_REPO},
    webhook::Webhook,
};
use hdrhistogram::Histogram;
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::time::Instant;

/// The graphical image of the desktops: its repository is the sidecar's.
const IMAGE: &str = "abcdesktopio/oc.user.test:4.1";
/// The webhook's `--admission-budget`, given explicitly; a bucket bound of its histogram.
const BUDGET_SECS: f64 = 2.0;
const DESKTOP: &str = "soak-desktop";
/// Growth allowed after the first minute, and the absolute floors under which it is noise.
const GROWTH: f64 = 0.10;
const RSS_FLOOR_MIB: f64 = 2.0;
const FD_FLOOR: f64 = 4.0;

/// Soak: the webhook, sidecar, registry and containerd under steady load.
#[derive(clap::Parser)]
#[command(name = "soak")]
struct Args {
    /// How long the load runs, in minutes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Admissions per second, open loop.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Users whose desktop pods are admitted.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// Seconds between two snapshots of the desktop.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,
    /// MiB the desktop's user changes before each snapshot.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    change_mib: u64,
}

/// What happened since the last row.
struct Window {
    answered: u64,
    failed: u64,
    latency: Histogram<u64>,
    snaps_done: u64,
    snaps_failed: u64,
    snap_max_secs: f64,
    notes: Vec<String>,
}

impl Window {
    fn new() -> Self {
        Self {
            answered: 0,
            failed: 0,
            latency: Histogram::new(3).expect("histogram"),
            snaps_done: 0,
            snaps_failed: 0,
            snap_max_secs: 0.0,
            notes: Vec::new(),
        }
    }
}

/// State shared by the load, the snapshots and the rows.
struct Shared {
    window: Mutex<Window>,
    in_flight: AtomicUsize,
    snapshot_running: AtomicBool,
    /// (started, ended: seconds into the run; what the sidecar said) of every failed snapshot.
    snapshot_failures: Mutex<Vec<(f64, f64, String)>>,
    /// Every time the desktop was found not running after a snapshot.
    paused: Mutex<Vec<String>>,
    /// First transport errors or refusals, to show what they were.
    admission_errors: Mutex<Vec<String>>,
    totals: Mutex<(u64, u64, u64, u64)>,
}

impl Shared {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One printed row.
struct Row {
    webhook_rss: f64,
    webhook_fds: f64,
    sidecar_rss: f64,
    sidecar_fds: f64,
}

enum Event {
    Minute(u64),
    RestartRegistry,
    RotateCert,
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    let args = <Args as clap::Parser>::parse();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "snapshot soak: {} min, {} admissions/s for {} users, a snapshot every {} s of a {} MiB change, release build, {} cores",
        args.minutes, args.rate, args.users, args.snapshot_every, args.change_mib, cores
    );

    let Rig {
        containerd,
        mut registry,
        creds,
    } = Rig::new().await;
    let users: Vec<String> = (0..args.users)
        .map(|i| format!("{}", 30_000_000 + i))
        .collect();
    // every other user already has two snapshots; users[0] is the desktop's user
    let tags: Vec<String> = users
        .iter()
        .skip(1)
        .step_by(2)
        .flat_map(|u| {
            [
                format!("{u}-1700000000000000000"),
                format!("{u}-1700000001000000000"),
            ]
        })
        .collect();
    if !tags.is_empty() {
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        registry.push_tags(RIG_REPO, &refs).await;
    }
    let mut webhook = Webhook::for_registry(
        &registry,
        &["--admission-budget", &format!("{BUDGET_SECS}s")],
    )
    .await;
    containerd
        .run_desktop(DESKTOP, "pod-soak", "soak-desktop-name", "x-graphical")
        .await;
    let ca = registry.ca_path();
    let sidecar = Sidecar::start_with(
        Target {
            containerd: &containerd,
            pod_uid: "pod-soak",
            registry_host: &registry.host,
            registry_ca: Some(&ca),
            credentials: Some(&creds),
            repository_path: RIG_REPO,
            tag_prefix: &users[0],
        },
        None,
        &[("RUST_LOG", "info")],
    )
    .await;
    let webhook_pid = webhook.pid().expect("the webhook runs as a process");
    let sidecar_pid = sidecar.pid().expect("the sidecar runs as a process");

    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        users
            .iter()
            .map(|u| serde_json::to_vec(&review(&desktop_pod(u, IMAGE), "CREATE", false)))
            .collect::<Result<_, _>>()
            .expect("reviews"),
    );
    let client = webhook.client();
    let url = webhook.url("/mutate");
    // warm: connection, registry authorization
    for b in bodies.iter() {
        let _ = client.post(&url).body(b.clone()).send().await;
    }

    let shared = Arc::new(Shared {
        window: Mutex::new(Window::new()),
        in_flight: AtomicUsize::new(0),
        snapshot_running: AtomicBool::new(false),
        snapshot_failures: Mutex::new(Vec::new()),
        paused: Mutex::new(Vec::new()),
        admission_errors: Mutex::new(Vec::new()),
        totals: Mutex::new((0, 0, 0, 0)),
    });
    let duration = Duration::from_secs(args.minutes * 60);
    let start = Instant::now();
    let deadline = start + duration;

    println!(
        "{:>3} {:>8} {:>6} {:>8} {:>10} {:>6} {:>9} {:>5} {:>5} {:>7} {:>8} {:>6} {:>8} {:>6} {:>5}  notes",
        "min",
        "adm ok",
        "adm x",
        "p99 ms",
        "wh p99",
        ">2s",
        "fail-open",
        "snap",
        "snapx",
        "snap s",
        "wh MiB",
        "wh fd",
        "sc MiB",
        "sc fd",
        "load"
    );

    let load = admissions(
        client.clone(),
        url.clone(),
        bodies.clone(),
        args.rate,
        start,
        deadline,
        shared.clone(),
    );
    let snaps = snapshots(&containerd, &sidecar, &args, start, deadline, &shared);
    let control = async {
        let mut events: Vec<(Instant, Event)> = (1..=args.minutes)
            .map(|m| (start + Duration::from_secs(m * 60), Event::Minute(m)))
            .collect();
        events.push((
            start + duration / 2 + Duration::from_secs(25),
            Event::RestartRegistry,
        ));
        events.push((
            start + duration / 4 + Duration::from_secs(15),
            Event::RotateCert,
        ));
        events.sort_by_key(|(at, _)| *at);
        let mut rows: Vec<Row> = Vec::new();
        let mut before = webhook.admission_histogram().await;
        let mut fail_open_before = fail_open(&webhook).await;
        for (at, event) in events {
            tokio::time::sleep_until(at).await;
            match event {
                Event::RestartRegistry => {
                    let t = Instant::now();
                    registry.restart().await;
                    let note = format!(
                        "registry restarted at {:.0} s (answering again after {:.2} s)",
                        (t - start).as_secs_f64(),
                        t.elapsed().as_secs_f64()
                    );
                    shared.window().notes.push(note);
                }
                Event::RotateCert => {
                    let note = rotate(&mut webhook, start).await;
                    shared.window().notes.push(note);
                }
                Event::Minute(m) => {
                    if m == args.minutes {
                        // the last row waits for what is still in flight
                        let until = Instant::now() + Duration::from_secs(150);
                        while (shared.in_flight.load(Ordering::SeqCst) > 0
                            || shared.snapshot_running.load(Ordering::SeqCst))
                            && Instant::now() < until
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    let w = std::mem::replace(&mut *shared.window(), Window::new());
                    let after = webhook.admission_histogram().await;
                    let fail_open_after = fail_open(&webhook).await;
                    let window = after.since(&before);
                    let (own, over) = (window.p99(), window.over(BUDGET_SECS).unwrap_or(0.0));
                    let row = Row {
                        webhook_rss: rss_mib(webhook_pid),
                        webhook_fds: fds(webhook_pid),
                        sidecar_rss: rss_mib(sidecar_pid),
                        sidecar_fds: fds(sidecar_pid),
                    };
                    println!(
                        "{:>3} {:>8} {:>6} {:>8.1} {:>10} {:>6} {:>9} {:>5} {:>5} {:>7.2} {:>8.1} {:>6} {:>8.1} {:>6} {:>5.2}  {}",
                        m,
                        w.answered,
                        w.failed,
                        w.latency.value_at_quantile(0.99) as f64 / 1000.0,
                        own,
                        over,
                        fail_open_after - fail_open_before,
                        w.snaps_done,
                        w.snaps_failed,
                        w.snap_max_secs,
                        row.webhook_rss,
                        row.webhook_fds,
                        row.sidecar_rss,
                        row.sidecar_fds,
                        load_average(),
                        w.notes.join("; ")
                    );
                    {
                        let mut t = shared.totals.lock().unwrap_or_else(|p| p.into_inner());
                        t.0 += w.answered;
                        t.1 += w.failed;
                        t.2 += w.snaps_done;
                        t.3 += w.snaps_failed;
                    }
                    rows.push(row);
                    before = after;
                    fail_open_before = fail_open_after;
                }
            }
        }
        rows
    };
    let ((), (), rows) = tokio::join!(load, snaps, control);

    // ---- the verdict ----
    let mut violations: Vec<String> = Vec::new();
    let (answered, failed, done, snap_failed) =
        *shared.totals.lock().unwrap_or_else(|p| p.into_inner());
    let final_hist = webhook.admission_histogram().await;
    let observed = final_hist.total();
    let over_budget = final_hist.over(BUDGET_SECS).unwrap_or_else(|| {
        violations.push(format!(
            "the webhook's admission histogram has no bucket bound at the budget ({BUDGET_SECS} s): cannot judge it"
        ));
        observed
    });
    println!();
    println!(
        "admissions: {answered} answered, {failed} not answered; the webhook observed {observed:.0} admissions (warm-up included), {over_budget:.0} over its {BUDGET_SECS} s budget"
    );
    if over_budget > 0.0 {
        violations.push(format!(
            "{over_budget:.0} admissions took longer than the {BUDGET_SECS} s budget by the webhook's own clock"
        ));
    }
    if failed > 0 {
        let errors = shared
            .admission_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        violations.push(format!(
            "{failed} admissions were not answered (transport error or not 200); first: {}",
            errors.join(" | ")
        ));
    }
    println!("snapshots: {done} done, {snap_failed} failed");
    for (at, end, why) in shared
        .snapshot_failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        println!("  started at {at:.0} s, failed at {end:.0} s: {why}");
    }
    let final_status = containerd.task_status(DESKTOP).await;
    let mut paused = shared
        .paused
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if final_status != "RUNNING" {
        paused.push(format!("at the end the desktop's task is {final_status}"));
    }
    if paused.is_empty() {
        println!("desktop: RUNNING after every snapshot and at the end");
    }
    for p in paused {
        violations.push(format!("desktop left paused or not running: {p}"));
    }
    let (checked, incomplete) = check_images(&registry, RIG_REPO).await;
    println!(
        "registry: {checked} tags of {RIG_REPO} checked (manifest, config and every layer present)"
    );
    for i in incomplete {
        violations.push(format!("incomplete image: {i}"));
    }
    println!(
        "sidecar peak RSS (VmHWM) {:.1} MiB; webhook peak RSS {:.1} MiB",
        status_kib(sidecar_pid, "VmHWM:") / 1024.0,
        status_kib(webhook_pid, "VmHWM:") / 1024.0
    );
    if rows.len() >= 2 {
        let (first, last) = (&rows[0], &rows[rows.len() - 1]);
        println!(
            "growth from minute 1 to minute {} (limit: +{:.0} %, and more than +{RSS_FLOOR_MIB} MiB / +{FD_FLOOR} fds, under which it is noise):",
            rows.len(),
            GROWTH * 100.0
        );
        for (what, a, b, floor, unit) in [
            (
                "webhook RSS",
                first.webhook_rss,
                last.webhook_rss,
                RSS_FLOOR_MIB,
                "MiB",
            ),
            (
                "webhook fds",
                first.webhook_fds,
                last.webhook_fds,
                FD_FLOOR,
                "",
            ),
            (
                "sidecar RSS",
                first.sidecar_rss,
                last.sidecar_rss,
                RSS_FLOOR_MIB,
                "MiB",
            ),
            (
                "sidecar fds",
                first.sidecar_fds,
                last.sidecar_fds,
                FD_FLOOR,
                "",
            ),
        ] {
            let grew = b - a;
            let pct = if a > 0.0 { grew / a * 100.0 } else { 0.0 };
            let bad = grew > a * GROWTH && grew > floor;
            println!(
                "  {what:<12} {a:>7.1} -> {b:>7.1} {unit:<3} ({pct:+.1} %) {}",
                if bad { "GREW" } else { "ok" }
            );
            if bad {
                violations.push(format!(
                    "{what} grew from {a:.1} to {b:.1} {unit} ({pct:+.1} %) after the first minute"
                ));
            }
        }
    } else {
        println!("growth: not judged (one minute only; run at least 2)");
    }

    drop(sidecar);
    drop(webhook);
    containerd.stop().await;
    drop(registry);
    if violations.is_empty() {
        println!("soak passed");
    } else {
        for v in &violations {
            println!("FAILED: {v}");
        }
        std::process::exit(1);
    }
}

/// Admissions at `rate`/s, open loop, until `deadline`; each one's latency is
/// counted from its scheduled time in the window it completes in.
async fn admissions(
    client: reqwest::Client,
    url: String,
    bodies: Arc<Vec<Vec<u8>>>,
    rate: u64,
    start: Instant,
    deadline: Instant,
    shared: Arc<Shared>,
) {
    for i in 0u64.. {
        let scheduled = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        if scheduled >= deadline {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        let (client, url, body, shared) = (
            client.clone(),
            url.clone(),
            bodies[i as usize % bodies.len()].clone(),
            shared.clone(),
        );
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let outcome = match client.post(&url).body(body).send().await {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
                        Ok(v) if v["response"]["allowed"].is_boolean() => Ok(()),
                        _ => Err("an answer that is not an AdmissionReview".to_string()),
                    },
                    Err(e) => Err(format!("reading the answer: {e}")),
                },
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(format!("{e:#}")),
            };
            let micros = scheduled.elapsed().as_micros() as u64;
            {
                let mut w = shared.window();
                match &outcome {
                    Ok(()) => {
                        w.answered += 1;
                        w.latency.record(micros).ok();
                    }
                    Err(_) => w.failed += 1,
                }
            }
            if let Err(e) = outcome {
                let mut errors = shared
                    .admission_errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A snapshot every `--snapshot-every` seconds (the first 5 s in, so a
/// minute's end falls between two), each after the desktop replaced its
/// change; after each one the desktop must be running.
async fn snapshots(
    containerd: &harness::containerd::Containerd,
    sidecar: &Sidecar,
    args: &Args,
    start: Instant,
    deadline: Instant,
    shared: &Shared,
) {
    let http = reqwest::Client::new();
    let every = Duration::from_secs(args.snapshot_every);
    let kib = args.change_mib * 1024;
    let (random_kib, text_bytes) = (kib / 2, (kib - kib / 2) * 1024);
    for k in 0u32.. {
        let scheduled = start + Duration::from_secs(5) + every * k;
        // none starts in the last 5 s: the last row sees it end
        if scheduled + Duration::from_secs(5) > deadline {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        shared.snapshot_running.store(true, Ordering::SeqCst);
        containerd
            .exec(
                DESKTOP,
                &format!(
                    "rm -rf /root/soak && mkdir -p /root/soak && \
                     dd if=/dev/urandom of=/root/soak/random-{k} bs=1024 count={random_kib} 2>/dev/null && \
                     yes 'soak {k}: the quick brown fox jumps over the lazy desktop user 0123456789' | head -c {text_bytes} > /root/soak/text-{k}"
                ),
            )
            .await;
        let began = Instant::now();
        let outcome = snapshot_once(&http, sidecar).await;
        let secs = began.elapsed().as_secs_f64();
        let status = containerd.task_status(DESKTOP).await;
        let at = (scheduled - start).as_secs_f64();
        if status != "RUNNING" {
            shared
                .paused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("{status} after the snapshot started at {at:.0} s"));
        }
        {
            let mut w = shared.window();
            match &outcome {
                Ok(()) => w.snaps_done += 1,
                Err(_) => w.snaps_failed += 1,
            }
            w.snap_max_secs = w.snap_max_secs.max(secs);
        }
        if let Err(why) = outcome {
            shared
                .snapshot_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((at, (Instant::now() - start).as_secs_f64(), why));
        }
        shared.snapshot_running.store(false, Ordering::SeqCst);
    }
}

/// POST /snapshot as the front end does and poll until done or error (stuck
/// after 120 s); the sidecar's error message on failure.
async fn snapshot_once(http: &reqwest::Client, sidecar: &Sidecar) -> Result<(), String> {
    let started: serde_json::Value = http
        .post(sidecar.url("/snapshot/snapshot"))
        .header("ABCAuthorization", "Bearer front-end-jwt")
        .send()
        .await
        .map_err(|e| format!("POST /snapshot: {e}"))?
        .json()
        .await
        .map_err(|e| format!("POST /snapshot answer: {e}"))?;
    if started["message"] != "snapshot process started" {
        return Err(format!("not started: {started}"));
    }
    let id = started["session_id"]
        .as_str()
        .ok_or_else(|| format!("no session id in {started}"))?
        .to_string();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let v: serde_json::Value = http
            .get(sidecar.url(&format!("/snapshot/{id}")))
            .send()
            .await
            .map_err(|e| format!("GET /snapshot/{id}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GET /snapshot/{id} answer: {e}"))?;
        let message = v["message"].as_str().unwrap_or_default();
        if message == "done" {
            return Ok(());
        }
        if v["status"] == "error" {
            return Err(message.to_string());
        }
        if Instant::now() > until {
            return Err(format!("stuck at {message:?} after 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rotates the webhook's serving certificate (same CA) and waits until a new
/// connection is served the new one; what happened, for the row's notes.
async fn rotate(webhook: &mut Webhook, start: Instant) -> String {
    let at = (Instant::now() - start).as_secs_f64();
    let ca = webhook.rotate_cert(false);
    let new_der = std::fs::read_to_string(webhook.dir.path().join("tls.crt"))
        .ok()
        .and_then(|pem| first_der(&pem));
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(10) {
        // a fresh client: a new TLS handshake, trusting the CA only
        let served = match reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem(ca.as_bytes()).ok())
            .tls_info(true)
            .build()
        {
            Ok(c) => match c.get(webhook.url("/healthz")).send().await {
                Ok(r) => r
                    .extensions()
                    .get::<reqwest::tls::TlsInfo>()
                    .and_then(|t| t.peer_certificate().map(<[u8]>::to_vec)),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if served.is_some() && served == new_der {
            return format!(
                "certificate rotated at {at:.0} s (new one served after {:.2} s)",
                began.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    format!("certificate rotated at {at:.0} s, BUT the new one was not served within 10 s")
}

/// The DER of the first certificate of a PEM text.
fn first_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Admissions answered fail-open because the registry lookup failed.
async fn fail_open(webhook: &Webhook) -> f64 {
    webhook
        .metric("snapshot_webhook_admissions_total{outcome=\"registry_error\"}")
        .await
}

/// Every tag of `repo` must name a complete image: the manifest, its config
/// and every layer blob present. (tags checked, problems)
async fn check_images(registry: &Registry, repo: &str) -> (usize, Vec<String>) {
    let tags = registry.tags(repo).await;
    let client = registry.http_client();
    let base = format!("https://{}/v2/{repo}", registry.host);
    let mut present: HashSet<String> = HashSet::new();
    let mut problems = Vec::new();
    for tag in &tags {
        let r = client
            .get(format!("{base}/manifests/{tag}"))
            .basic_auth(USER, Some(PASSWORD))
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await;
        let manifest: serde_json::Value = match r {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{repo}:{tag}: the manifest is not JSON: {e}"));
                    continue;
                }
            },
            Ok(r) => {
                problems.push(format!("{repo}:{tag}: manifest answered {}", r.status()));
                continue;
            }
            Err(e) => {
                problems.push(format!("{repo}:{tag}: manifest: {e}"));
                continue;
            }
        };
        let mut digests: Vec<String> = Vec::new();
        match manifest["config"]["digest"].as_str() {
            Some(d) => digests.push(d.to_string()),
            None => problems.push(format!("{repo}:{tag}: the manifest names no config")),
        }
        match manifest["layers"].as_array() {
            Some(layers) if !layers.is_empty() => digests.extend(
                layers
                    .iter()
                    .filter_map(|l| l["digest"].as_str().map(str::to_string)),
            ),
            _ => problems.push(format!("{repo}:{tag}: the manifest names no layers")),
        }
        for d in digests {
            if present.contains(&d) {
                continue;
            }
            match client
                .head(format!("{base}/blobs/{d}"))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    present.insert(d);
                }
                Ok(r) => problems.push(format!("{repo}:{tag}: blob {d} answered {}", r.status())),
                Err(e) => problems.push(format!("{repo}:{tag}: blob {d}: {e}")),
            }
        }
    }
    (tags.len(), problems)
}

/// A `/proc/<pid>/status` figure in kB (0 when the process is gone).
fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

/// The machine's 1-minute load average (other work on these cores shows there).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0)
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as f64)
        .unwrap_or(0.0)
}
