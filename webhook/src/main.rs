//! `snapshot-webhook`: wiring only (flags, telemetry, server).

use anyhow::{Context, Result};
use clap::Parser;
use snapshot_webhook::{
    admit::Admitter,
    config::{Config, SidecarMode},
    decision::Rules,
    lookup::Lookup,
    metrics::Metrics,
    namespace::{self, Namespaces},
    registry::{Registry, RegistrySettings},
    server::{self, AppState},
    sidecar::SidecarSpec,
    telemetry, tls,
};
use std::{
    sync::{atomic::AtomicBool, atomic::Ordering, Arc},
    time::Duration,
};
use tracing::{error, info, warn};

#[tokio::main]
async fn main() {
    // glibc gives each thread that allocates under contention its own arena
    // (up to 8 per core) and keeps what each held: a long-running process
    // whose blocking-pool threads come and go creeps up. Two arenas bound it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let config = Config::parse();
    telemetry::init(config.log_format);
    if let Err(e) = run(config).await {
        error!(error = %format!("{e:#}"), "snapshot-webhook stopped");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> Result<()> {
    // Errors only if a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let ca_pem = match &config.registry_ca {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading --registry-ca {}", p.display()))?,
        ),
        None => None,
    };
    let registry = Arc::new(Registry::new(RegistrySettings {
        host: config.registry.clone(),
        protocol: config.registry_protocol,
        ca_pem,
        credentials_file: config.registry_credentials.clone(),
    })?);
    registry
        .reload_credentials()
        .await
        .context("loading the registry credentials")?;
    let metrics = Arc::new(Metrics::new(registry.requests.clone()));
    metrics
        .admission_budget
        .set(config.admission_budget.as_secs_f64());
    let rules = Rules {
        selector: Rules::parse_selector(&config.pod_selector)
            .map_err(anyhow::Error::msg)
            .context("--pod-selector")?,
        user_label: config.user_label.clone(),
        graphical_container: config.graphical_container.clone(),
        registry: config.registry.clone(),
        layout: config.layout,
        on_logoff: config.snapshot_on_logoff,
        every: Some(config.snapshot_every).filter(|every| !every.is_zero()),
    };
    let sidecar = SidecarSpec {
        name: config.sidecar_name.clone(),
        image: config.sidecar_image.clone(),
        pull_policy: config.sidecar_pull_policy.clone(),
        port: config.sidecar_port,
        native: config.sidecar_mode == SidecarMode::Native,
        graphical_container: config.graphical_container.clone(),
        registry_secret_name: config.registry_secret_name.clone(),
        registry_ca_configmap: config.sidecar_registry_ca_configmap.clone(),
        registry_protocol: config.registry_protocol,
        containerd_socket: config.containerd_socket.clone(),
        containerd_namespace: config.containerd_namespace.clone(),
        snapshotter_root: Some(config.containerd_snapshotter_root.clone())
            .filter(|root| !root.is_empty()),
        cpu_limit: Some(config.sidecar_cpu_limit.clone()).filter(|limit| !limit.is_empty()),
        max_change_bytes: config.sidecar_max_change_bytes,
        layer_format: config.sidecar_layer_format.clone(),
        pre_copy: config.sidecar_pre_copy,
        incremental: config.sidecar_incremental,
        retention: snapshot_webhook::tag::retention::Rules {
            last: config.sidecar_keep_last,
            hourly: config.sidecar_keep_hourly,
            daily: config.sidecar_keep_daily,
            weekly: config.sidecar_keep_weekly,
            min_age: config.sidecar_keep_min_age,
        },
        logoff_grace_period: config.logoff_grace_period,
    };
    let lookup = Lookup::new(
        registry.clone(),
        config.lookup_timeout,
        config.registry_max_in_flight,
        metrics.clone(),
    );
    lookup.warm_up().await;
    let namespaces = if config.namespace_check {
        Some(
            Namespaces::new(namespace::Settings {
                api_url: config.kube_api_url.clone(),
                secret_name: config.registry_secret_name.clone(),
                ca_configmap: config.sidecar_registry_ca_configmap.clone(),
                present_ttl: config.namespace_present_ttl,
                missing_ttl: config.namespace_missing_ttl,
            })
            .await
            .context("--namespace-check")?,
        )
    } else {
        None
    };
    snapshot_webhook::target::warm_up();
    let admitter = Admitter {
        rules,
        sidecar,
        lookup,
        metrics,
        pin_digest: config.pin_digest,
        budget: config.admission_budget,
        on_new_base: config.on_new_base,
        namespaces,
    };
    let state = Arc::new(AppState {
        admitter,
        ready: AtomicBool::new(false),
    });

    let certs = tls::CertFiles {
        cert: config.tls_cert.clone(),
        key: config.tls_key.clone(),
    };
    let tls_config = certs.load().await?;
    tokio::spawn(certs.watch(tls_config.clone(), config.tls_reload_interval));
    tokio::spawn(reload_credentials(registry, config.tls_reload_interval));
    tokio::spawn(give_back_memory(Duration::from_secs(30)));

    let handle = axum_server::Handle::new();
    tokio::spawn(shutdown_on_signal(handle.clone(), state.clone()));
    let app = server::router(state.clone(), config.max_body_bytes);
    info!(listen = %config.listen, registry = %config.registry, layout = ?config.layout, "snapshot-webhook serving");
    state.ready.store(true, Ordering::Relaxed);
    let mut server = axum_server::bind_rustls(config.listen, tls_config).handle(handle);
    // kube-apiserver multiplexes admissions over HTTP/2: past the stream limit
    // its requests would wait on its side, where our budget cannot see them.
    server
        .http_builder()
        .http2()
        .max_concurrent_streams(config.http2_max_concurrent_streams);
    server
        .serve(app.into_make_service())
        .await
        .with_context(|| format!("serving on {}", config.listen))
}

async fn reload_credentials(registry: Arc<Registry>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match registry.reload_credentials().await {
            Ok(true) => info!("registry credentials reloaded"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot reload the registry credentials; keeping the ones in use")
            }
        }
    }
}

/// Hands the allocator's free pages back to the system now and then: after a
/// burst of admissions (connections, requests in flight) glibc keeps the
/// memory it freed, and the process would stay at its peak.
async fn give_back_memory(every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// On SIGTERM or Ctrl-C: stop being ready, let requests in flight finish, stop.
async fn shutdown_on_signal(
    handle: axum_server::Handle<std::net::SocketAddr>,
    state: Arc<AppState>,
) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
    state.ready.store(false, Ordering::Relaxed);
    handle.graceful_shutdown(Some(Duration::from_secs(10)));
}
