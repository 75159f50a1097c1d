//! `list [--user U]`: every snapshot in scope with its creation time, base
//! image and the size of the user's layers (one manifest read each).

use crate::{
    access::Access,
    cli::Output,
    inventory::{self, Snapshot},
    progress::Progress,
};
use anyhow::Result;
use futures::StreamExt;
use std::collections::BTreeSet;

pub async fn run(access: &Access, user: Option<&str>, output: Output) -> Result<()> {
    if let Some(u) = user {
        access.check_user(u)?;
    }
    let repositories = access.snapshots(user).await?;
    let wanted: Vec<_> = repositories
        .iter()
        .flat_map(|r| {
            r.snapshots
                .iter()
                .map(move |(t, o)| (r.path.as_str(), t, o))
        })
        .collect();
    let progress = Progress::new(wanted.len(), access.quiet);
    let read: Vec<_> = futures::stream::iter(wanted)
        .map(|(path, tag, owner)| {
            let progress = &progress;
            async move {
                let got = access.manifest(path, tag).await;
                progress.step(format!("read {path}:{tag}"));
                got.map(|(digest, manifest)| {
                    inventory::describe(owner, path, tag, &digest, &manifest)
                })
            }
        })
        .buffered(access.concurrency)
        .collect()
        .await;
    let mut snapshots: Vec<Snapshot> = Vec::new();
    let mut failures = Vec::new();
    for r in read {
        match r {
            Ok(s) => snapshots.push(s),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    inventory::sort(&mut snapshots);
    let users: BTreeSet<&str> = snapshots.iter().map(|s| s.user.as_str()).collect();
    let repos: BTreeSet<&str> = snapshots.iter().map(|s| s.repository.as_str()).collect();
    let summary = format!(
        "{} snapshots of {} users in {} repositories{}",
        snapshots.len(),
        users.len(),
        repos.len(),
        if failures.is_empty() {
            String::new()
        } else {
            format!("; {} could not be read", failures.len())
        }
    );
    super::print(
        output,
        &inventory::snapshot_table(&snapshots),
        &summary,
        &serde_json::json!({"snapshots": snapshots, "unreadable": failures, "summary": summary}),
    )?;
    if !failures.is_empty() {
        anyhow::bail!(
            "{} snapshot manifests could not be read: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}
