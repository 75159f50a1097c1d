//! `rebase --onto IMAGE (--user U | --all) [--dry-run]`: moves each user's
//! newest snapshot onto a new base image, as the webhook's `--on-new-base
//! rebase` does at login and with the same code ([`rewrite::rebase`]): the
//! new base's layers, then the user's, as a new snapshot `<prefix>-<now>`
//! where the webhook will look for it (config and manifest only; the old
//! snapshot stays). A snapshot already on `IMAGE`, or without provenance
//! annotations (nothing says where its user layers start), is skipped.

use crate::{access::Access, cli::Output, inventory, progress::Progress};
use anyhow::Result;
use serde::Serialize;
use snapshot_tags::{self as tag, provenance::Provenance};
use snapshot_webhook::{newbase, rewrite, target};
use std::collections::BTreeMap;

#[derive(Debug, Serialize)]
struct Done {
    user: String,
    repository: String,
    snapshot: String,
    /// `rebased <new tag>`, `would rebase`, `skipped: <why>` or `failed: <why>`.
    result: String,
}

pub async fn run(
    access: &Access,
    onto: &str,
    user: Option<&str>,
    _all: bool,
    dry_run: bool,
    output: Output,
) -> Result<()> {
    if let Some(u) = user {
        access.check_user(u)?;
    }
    // each user's newest snapshot in each repository (per-user layout: under any base tag)
    let mut newest: BTreeMap<(String, String), tag::Snapshot> = BTreeMap::new();
    for repo in access.snapshots(user).await? {
        for (t, owner) in &repo.snapshots {
            let Some(s) = tag::owned_by(t, &owner.prefix) else {
                continue;
            };
            let key = (owner.user.clone(), repo.path.clone());
            if newest.get(&key).is_none_or(|n| tag::compare(&s, n).is_gt()) {
                newest.insert(key, s);
            }
        }
    }
    let progress = Progress::new(newest.len(), access.quiet);
    let mut done = Vec::new();
    for ((user, repository), snapshot) in newest {
        let result = one(access, onto, &user, &repository, &snapshot.tag, dry_run).await;
        progress.step(format!(
            "user {user} ({repository}:{}): {result}",
            snapshot.tag
        ));
        done.push(Done {
            user,
            repository,
            snapshot: snapshot.tag,
            result,
        });
    }
    let count = |p: &str| done.iter().filter(|d| d.result.starts_with(p)).count();
    let (rebased, would, skipped, failed) = (
        count("rebased"),
        count("would"),
        count("skipped"),
        count("failed"),
    );
    let summary = format!(
        "rebase --onto {onto}: {} users' newest snapshots; {} {}, skipped {skipped}, failed {failed}",
        done.len(),
        if dry_run { "would rebase" } else { "rebased" },
        if dry_run { would } else { rebased },
    );
    let rows: Vec<Vec<String>> = done
        .iter()
        .map(|d| {
            vec![
                d.user.clone(),
                d.repository.clone(),
                d.snapshot.clone(),
                d.result.clone(),
            ]
        })
        .collect();
    super::print(
        output,
        &inventory::table(&["USER", "REPOSITORY", "SNAPSHOT", "RESULT"], &rows),
        &summary,
        &serde_json::json!({"dry_run": dry_run, "onto": onto, "users": done, "summary": summary}),
    )?;
    if failed > 0 {
        anyhow::bail!("{failed} snapshots could not be rebased (the table says why)");
    }
    Ok(())
}

/// Rebases `user`'s snapshot `tag` of `repository` onto `onto`; says what came of it.
async fn one(
    access: &Access,
    onto: &str,
    user: &str,
    repository: &str,
    tag: &str,
    dry_run: bool,
) -> String {
    let target = match target::derive(onto, &access.host, access.layout, user) {
        Ok(t) => t,
        Err(e) => return format!("failed: {e}"),
    };
    if target.path != repository {
        return format!(
            "skipped: the webhook looks for {onto}'s snapshots in {}, not here",
            target.path
        );
    }
    let manifest = match access.webhook_registry().manifest(repository, tag).await {
        Ok(Some(m)) => m,
        Ok(None) => return "failed: the snapshot is gone".to_string(),
        Err(e) => return format!("failed: reading the snapshot's manifest: {e}"),
    };
    let provenance = serde_json::from_slice::<serde_json::Value>(&manifest.body)
        .ok()
        .and_then(|m| serde_json::from_value(m.get("annotations")?.clone()).ok())
        .and_then(|a| Provenance::read(&a));
    let Some(provenance) = provenance else {
        return "skipped: no provenance annotations (made before them): nothing says where its user layers start".to_string();
    };
    if newbase::same_image(&provenance.base_name, onto) {
        return "skipped: already on it".to_string();
    }
    if dry_run {
        return format!("would rebase from {}", provenance.base_name);
    }
    let now = std::time::SystemTime::now();
    let job = rewrite::Job {
        snapshot_manifest: manifest,
        first_user_layer: provenance.first_user_layer,
        onto: onto.to_string(),
        tag: tag::snapshot_tag(&target.tag_prefix, now),
        created: humantime::format_rfc3339_seconds(now).to_string(),
        target,
    };
    match rewrite::rebase(access.webhook_registry(), &job).await {
        Ok(w) => format!("rebased {} from {}", w.tag, provenance.base_name),
        Err(e) => format!("failed: {e}"),
    }
}
