//! `snapshotctl`: the operator's command for desktop snapshots in the
//! snapshot registry (list, show, prune, pin, forget, rebase), over the
//! same registry access as the webhook and the sidecar.
//!
//! Logs (tracing) and progress lines go to stderr, the command's output
//! (a table, or JSON with `--output json`) to stdout. Exit code 0 when
//! everything was done, 1 when anything failed (said on stderr), 2 for a
//! usage error (a flag, a user id that cannot be a registry name).

mod access;
mod cli;
mod commands;
mod inventory;
mod progress;
mod timeline;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

/// A request that cannot be carried out as given (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    // reqwest and oci-client are built without a crypto provider; errors only
    // when one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snapshotctl: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshotctl: error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let access = access::Access::connect(&cli.registry, cli.quiet).await?;
    let out = cli.output;
    match cli.command {
        Command::List { user } => commands::list::run(&access, user.as_deref(), out).await,
        Command::Show { tag, user } => {
            commands::show::run(&access, &tag, user.as_deref(), out).await
        }
        Command::Prune {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            min_age,
            user,
            dry_run,
        } => {
            let rules = snapshot_tags::retention::Rules {
                last: keep_last.unwrap_or(1) as usize,
                hourly: keep_hourly as usize,
                daily: keep_daily as usize,
                weekly: keep_weekly as usize,
                min_age,
            };
            commands::prune::run(&access, rules, user.as_deref(), dry_run, out).await
        }
        Command::Pin { user, at, ago, tag } => {
            let moment = match (tag, at, ago) {
                (Some(t), _, _) => commands::pin::Moment::Tag(t),
                (None, Some(at), _) => commands::pin::Moment::At(at),
                (None, None, ago) => commands::pin::Moment::At(
                    std::time::SystemTime::now()
                        .checked_sub(ago.unwrap_or_default())
                        .unwrap_or(std::time::UNIX_EPOCH),
                ),
            };
            commands::pin::run(&access, &user, &moment, out).await
        }
        Command::Rebase {
            onto,
            user,
            all,
            dry_run,
        } => commands::rebase::run(&access, &onto, user.as_deref(), all, dry_run, out).await,
        Command::Forget { user, dry_run } => {
            commands::forget::run(&access, &user, dry_run, out).await
        }
    }
}
