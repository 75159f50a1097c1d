//! `snapshot-sidecar`: wiring only (flags, telemetry, server).

use anyhow::Context;
use clap::Parser;
use snapshot_sidecar::{
    api::{self, logoff, schedule, AppState},
    capture::commit,
    config::Config,
    harden,
};
use std::sync::Arc;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    // first, before anything sensitive is read or opened
    if let Err(e) = harden::not_dumpable() {
        eprintln!("snapshot-sidecar: {e:#}");
        std::process::exit(1);
    }
    // glibc gives each thread that allocates under contention its own arena
    // (up to 8 per core) and keeps what each held: a long-running process
    // whose blocking-pool threads come and go creeps up. Two arenas bound it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if config.log_format == "text" {
        logs.init();
    } else {
        logs.json().flatten_event(true).init();
    }
    if let Err(e) = run(config).await {
        error!(error = %format!("{e:#}"), "snapshot-sidecar stopped");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let token = match &config.api_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    info!(listen = %config.listen, repository = %config.repository, container = %config.container, "snapshot-sidecar serving");
    let state = Arc::new(AppState {
        config,
        sessions: Default::default(),
        metrics: Default::default(),
        token,
    });
    let schedule = state
        .config
        .schedule()
        .map(|every| tokio::spawn(schedule::run(state.clone(), every)));
    let app = api::router(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // With --on-logoff the desktop is snapshotted first (the API keeps
            // serving meanwhile, for the preStop hook's request); that ends
            // the schedule.
            logoff::on_terminate(state).await;
            if let Some(schedule) = schedule {
                schedule.abort();
            }
            // A commit still in progress is abandoned (no tag is written without
            // its manifest), but the desktop must never stay frozen.
            commit::resume_all().await;
            info!("shutting down");
        })
        .await
        .context("serving the API")
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
