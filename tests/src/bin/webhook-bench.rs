//! `just bench` (webhook part): admissions per second and latency over TLS,
//! against the real registry and the release build of snapshot-webhook.
//!
//! Prints, for each workload: the most admissions/s a closed loop of 64
//! concurrent requests gets, p50/p99 latency at a fixed offered load of
//! 1,000 admissions/s (and 250/s where the registry is the limit; open loop, measured from the scheduled send time, so a
//! stall is not hidden), the webhook's own p99 over the same window (its
//! `admission_duration_seconds` histogram, from each request's arrival: the
//! bucket bound the 99th percentile falls in), and registry requests per
//! lookup. A last run puts a registry that answers in 3 s behind the webhook:
//! every admission must still be answered within the webhook's budget.

use harness::{
    admission::{desktop_pod, review},
    badregistry::{BadRegistry, Misbehaviour},
    registry::{Auth, Registry, PASSWORD, USER},
    webhook::{RegistryAccess, Webhook},
};
use hdrhistogram::Histogram;
use serde_json::json;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

const IMAGE: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1";
const REPO: &str = "abcdesktopio/oc.user.ubuntu.sudo.24.04";
const USERS: usize = 200;
const CONCURRENCY: usize = 64;
const RATE: u64 = 1000;
const SECONDS: u64 = 5;

struct Workload {
    name: String,
    /// Offered load of the latency measurement, admissions/s.
    rate: u64,
    bodies: Vec<Vec<u8>>,
}

#[tokio::main]
async fn main() {
    harness::init_crypto();
    println!(
        "snapshot-webhook benchmark: release build, TLS with CA check, real registry (docker-registry), load generator on the same {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12}",
        "workload",
        "max adm/s",
        "at adm/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "req/lookup",
        "webhook p99"
    );
    run("htpasswd", Registry::start().await, true).await;
    run(
        "token",
        Registry::start_with(Auth::Token {
            lifetime_secs: 3600,
        })
        .await,
        false,
    )
    .await;
    slow_registry().await;
}

/// A registry that answers every lookup in 3 s, lookups allowed 10 s: the
/// admission budget (2 s, the default) is what bounds each answer.
async fn slow_registry() {
    let slow = BadRegistry::start(Misbehaviour::Slow(Duration::from_secs(3))).await;
    let ca = slow.ca_path();
    let webhook = Webhook::start(
        RegistryAccess {
            host: &slow.host,
            ca: Some(&ca),
            credentials: None,
        },
        &["--lookup-timeout", "10s"],
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..USERS)
        .map(|i| {
            let pod = desktop_pod(&format!("{}", 20_000_000 + i), IMAGE);
            serde_json::to_vec(&review(&pod, "CREATE", false)).expect("a review")
        })
        .collect();
    let client = webhook.client();
    let url = webhook.url("/mutate");
    let before = webhook.admission_histogram().await;
    let latency = open_loop(&client, &url, &bodies, 250).await;
    let own = webhook.admission_histogram().await.since(&before).p99();
    println!(
        "{:<44} {:>9} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>12}",
        "registry answering in 3 s (budget 2 s)",
        "-",
        250,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
        "-",
        own
    );
}

/// The workloads against one registry; `all` adds the no-lookup and cold ones.
async fn run(auth: &str, registry: Registry, all: bool) {
    let users: Vec<String> = (0..USERS).map(|i| format!("{}", 10_000_000 + i)).collect();
    let tags: Vec<String> = users
        .iter()
        .flat_map(|u| {
            [
                format!("{u}-1700000000000000000"),
                format!("{u}-1700000001000000000"),
            ]
        })
        .collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    registry.push_tags(REPO, &tag_refs).await;
    let creds = registry.dir.path().join("dockerconfig.json");
    registry.write_dockerconfigjson(&creds, USER, PASSWORD);
    let ca = registry.ca_path();
    let access = || RegistryAccess {
        host: &registry.host,
        ca: Some(&ca),
        credentials: Some(&creds),
    };

    let body = |user: &str, annotations: serde_json::Value| {
        let mut pod = desktop_pod(user, IMAGE);
        for (k, v) in annotations.as_object().into_iter().flatten() {
            pod["metadata"]["annotations"][k] = v.clone();
        }
        serde_json::to_vec(&review(&pod, "CREATE", false)).expect("a review")
    };
    let mut workloads = vec![
        Workload {
            name: format!("[{auth}] restore, 200 users (warm)"),
            rate: 1000,
            bodies: users.iter().map(|u| body(u, json!({}))).collect(),
        },
        Workload {
            name: format!("[{auth}] restore, one user (coalesced)"),
            rate: RATE,
            bodies: vec![body(&users[0], json!({}))],
        },
    ];
    // below the registry's own capacity on these shared cores
    workloads.push(Workload {
        name: format!("[{auth}] restore, 200 users (warm)"),
        rate: 250,
        bodies: workloads[0].bodies.clone(),
    });
    if all {
        workloads.push(Workload {
            name: "no lookup (opt-out: sidecar only)".to_string(),
            rate: RATE,
            bodies: users
                .iter()
                .map(|u| body(u, json!({"snapshot.abcdesktop.io/restore": "false"})))
                .collect(),
        });
    }

    let webhook = Webhook::start(access(), &[]).await;
    let client = webhook.client();
    let url = webhook.url("/mutate");
    // warm: tokens, connections, caches
    for b in workloads[0].bodies.iter().take(USERS) {
        send(&client, &url, b.clone()).await;
    }
    for w in &workloads {
        let before = counters(&webhook).await;
        let throughput = closed_loop(&client, &url, &w.bodies).await;
        let own_before = webhook.admission_histogram().await;
        let latency = open_loop(&client, &url, &w.bodies, w.rate).await;
        let own = webhook.admission_histogram().await.since(&own_before).p99();
        let after = counters(&webhook).await;
        let lookups = after.1 - before.1;
        let per_lookup = if lookups > 0.0 {
            format!("{:.2}", (after.0 - before.0) / lookups)
        } else {
            "-".into()
        };
        println!(
            "{:<44} {:>9.0} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>12}",
            w.name,
            throughput,
            w.rate,
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0,
            latency.max() as f64 / 1000.0,
            per_lookup,
            own
        );
    }
    drop(webhook);
    if !all {
        return;
    }

    // cold: a fresh process, its first admission (auth handshake, new connection)
    let mut cold = Histogram::<u64>::new(3).expect("histogram");
    let mut cold_requests = 0.0;
    const STARTS: u64 = 5;
    for i in 0..STARTS {
        let webhook = Webhook::start(access(), &[]).await;
        let client = webhook.client();
        send(&client, &webhook.url("/healthz"), Vec::new()).await;
        let started = Instant::now();
        send(
            &client,
            &webhook.url("/mutate"),
            workloads[0].bodies[i as usize].clone(),
        )
        .await;
        cold.record(started.elapsed().as_micros() as u64).ok();
        cold_requests += counters(&webhook).await.0;
    }
    println!(
        "{:<44} {:>9} {:>8} {:>8.2} {:>8} {:>8.2} {:>10.2} {:>12}",
        format!("[{auth}] cold: first admission, new process"),
        "-",
        "1",
        cold.value_at_quantile(0.5) as f64 / 1000.0,
        "-",
        cold.max() as f64 / 1000.0,
        cold_requests / STARTS as f64,
        "-"
    );
}

/// (registry requests, lookups) so far.
async fn counters(webhook: &Webhook) -> (f64, f64) {
    let requests = webhook
        .metric("snapshot_webhook_registry_requests_total")
        .await;
    let misses = webhook.metric("snapshot_webhook_cache_misses_total").await;
    let coalesced = webhook
        .metric("snapshot_webhook_cache_hits_total{kind=\"coalesced\"}")
        .await;
    (requests, misses + coalesced)
}

async fn send(client: &reqwest::Client, url: &str, body: Vec<u8>) {
    let r = if body.is_empty() {
        client.get(url).send().await
    } else {
        client.post(url).body(body).send().await
    };
    match r {
        Ok(r) if r.status().is_success() => {
            let _ = r.bytes().await;
        }
        Ok(r) => panic!("{url} answered {}", r.status()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// Most admissions per second with CONCURRENCY requests always in flight.
async fn closed_loop(client: &reqwest::Client, url: &str, bodies: &[Vec<u8>]) -> f64 {
    let bodies = Arc::new(bodies.to_vec());
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let started = Instant::now();
    let workers = (0..CONCURRENCY).map(|w| {
        let (client, url, bodies) = (client.clone(), url.to_string(), bodies.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                send(
                    &client,
                    &url,
                    bodies[(w + n * CONCURRENCY) % bodies.len()].clone(),
                )
                .await;
                n += 1;
            }
            n
        })
    });
    let done: usize = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.expect("worker"))
        .sum();
    done as f64 / started.elapsed().as_secs_f64()
}

/// Latency at RATE admissions per second, from each request's scheduled time.
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    bodies: &[Vec<u8>],
    rate: u64,
) -> Histogram<u64> {
    let total = rate * SECONDS;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (client, url, body) = (
            client.clone(),
            url.to_string(),
            bodies[i as usize % bodies.len()].clone(),
        );
        tasks.push(tokio::spawn(async move {
            send(&client, &url, body).await;
            scheduled.elapsed().as_micros() as u64
        }));
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        h.record(t.await.expect("request")).ok();
    }
    h
}
