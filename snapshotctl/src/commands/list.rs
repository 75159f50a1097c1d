//! `list [--user U]`: every snapshot in scope with its creation time, base
//! image, the size of the user's layers and what it added over the one before
//! it (one manifest read each). With `--user`, the user's timeline: when,
//! trigger, bytes added, tag.

use crate::{
    access::Access,
    cli::Output,
    inventory::{self, Snapshot},
    progress::Progress,
    timeline,
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
                got.map(|(digest, manifest)| timeline::Read {
                    snapshot: inventory::describe(owner, path, tag, &digest, &manifest),
                    prefix: owner.prefix.clone(),
                    manifest,
                })
            }
        })
        .buffered(access.concurrency)
        .collect()
        .await;
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for r in read {
        match r {
            Ok(s) => found.push(s),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let mut snapshots: Vec<Snapshot> = timeline::with_added(found);
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
        &match user {
            Some(_) => timeline::table(&snapshots),
            None => inventory::snapshot_table(&snapshots),
        },
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
