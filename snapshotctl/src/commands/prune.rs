//! `prune [--keep-last N] [--keep-hourly H] [--keep-daily D] [--keep-weekly W]
//! [--min-age A] [--user U] [--dry-run]`: the sidecar's
//! retention ([`snapshot_sidecar::registry::prune::run`]) applied to each user's
//! snapshots, per repository and tag prefix (per base tag in the per-user
//! layout). As in the sidecar, a manifest is deleted only when its own tag
//! annotation names the tag: distribution deletes every tag on a digest, and
//! an unannotated (older) snapshot may share its manifest with another
//! user's tag, so it is skipped.

use crate::{access::Access, cli::Output, inventory, progress::Progress};
use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;
use snapshot_sidecar::{metrics::Metrics, registry::prune};
use snapshot_tags::{
    self as tag, provenance,
    retention::{self, Rules},
};
use std::{collections::BTreeMap, time::SystemTime};

/// One user's snapshots in one repository under one prefix, with what retention deletes.
#[derive(Debug, Serialize)]
struct Unit {
    user: String,
    repository: String,
    prefix: String,
    newest: String,
    candidates: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct Done {
    user: String,
    repository: String,
    /// Dry run: what each candidate would come to (`delete`, `skip: ...`, `unreadable: ...`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    plan: BTreeMap<String, String>,
    deleted: u64,
    skipped: u64,
    failed: u64,
}

pub async fn run(
    access: &Access,
    rules: Rules,
    user: Option<&str>,
    dry_run: bool,
    output: Output,
) -> Result<()> {
    if let Some(u) = user {
        access.check_user(u)?;
    }
    let now = SystemTime::now();
    let mut units = Vec::new();
    let mut series = 0;
    for repo in access.snapshots(user).await? {
        let mut by_prefix: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
        for (t, owner) in &repo.snapshots {
            by_prefix
                .entry((owner.user.clone(), owner.prefix.clone()))
                .or_default()
                .push(t);
        }
        for ((user, prefix), tags) in by_prefix {
            let Some(newest) = tag::newest(tags.iter().copied(), &prefix) else {
                continue;
            };
            series += 1;
            let candidates = retention::to_delete(tags, &prefix, rules, now, &newest.tag);
            if !candidates.is_empty() {
                units.push(Unit {
                    user,
                    repository: repo.path.clone(),
                    prefix,
                    newest: newest.tag,
                    candidates,
                });
            }
        }
    }
    let progress = Progress::new(units.len(), access.quiet);
    let metrics = Metrics::default();
    let mut done = Vec::new();
    let mut refused = false;
    for unit in &units {
        let mut d = Done {
            user: unit.user.clone(),
            repository: unit.repository.clone(),
            ..Done::default()
        };
        if dry_run {
            d.plan = plan(access, unit).await;
            d.deleted = d.plan.values().filter(|v| *v == "delete").count() as u64;
            d.failed = d
                .plan
                .values()
                .filter(|v| v.starts_with("unreadable"))
                .count() as u64;
            d.skipped = d.plan.len() as u64 - d.deleted - d.failed;
            progress.step(format!(
                "user {} ({}): would delete {}, skip {}",
                unit.user, unit.repository, d.deleted, d.skipped
            ));
        } else {
            let target = access.reference(&unit.repository, &unit.newest);
            let pruned = prune::run(
                access.sidecar_registry(),
                &target,
                &unit.prefix,
                rules,
                &metrics,
            )
            .await;
            (d.deleted, d.skipped, d.failed) = (pruned.deleted, pruned.skipped, pruned.failed);
            progress.step(format!(
                "user {} ({}): deleted {}, skipped {}, failed {}",
                unit.user, unit.repository, d.deleted, d.skipped, d.failed
            ));
            refused = pruned.refused;
        }
        done.push(d);
        if refused {
            break;
        }
    }
    let (deleted, skipped, failed): (u64, u64, u64) = done.iter().fold((0, 0, 0), |a, d| {
        (a.0 + d.deleted, a.1 + d.skipped, a.2 + d.failed)
    });
    let verb = if dry_run { "would delete" } else { "deleted" };
    let summary = format!(
        "prune {}: {} of {series} snapshot series (user, repository, prefix) had more; {verb} {deleted}, skipped {skipped} (no tag annotation), failed {failed}{}",
        flags(&rules),
        units.len(),
        if refused { "; the registry refuses deletes" } else { "" }
    );
    let rows: Vec<Vec<String>> = if dry_run {
        done.iter()
            .flat_map(|d| {
                d.plan.iter().map(|(t, what)| {
                    vec![
                        d.user.clone(),
                        d.repository.clone(),
                        t.clone(),
                        what.clone(),
                    ]
                })
            })
            .collect()
    } else {
        done.iter()
            .map(|d| {
                vec![
                    d.user.clone(),
                    d.repository.clone(),
                    d.deleted.to_string(),
                    d.skipped.to_string(),
                    d.failed.to_string(),
                ]
            })
            .collect()
    };
    let table = if dry_run {
        inventory::table(&["USER", "REPOSITORY", "TAG", "WOULD"], &rows)
    } else {
        inventory::table(
            &["USER", "REPOSITORY", "DELETED", "SKIPPED", "FAILED"],
            &rows,
        )
    };
    super::print(
        output,
        &table,
        &summary,
        &serde_json::json!({"dry_run": dry_run, "users": done, "refused": refused, "summary": summary}),
    )?;
    if refused {
        anyhow::bail!(
            "the registry refuses deletes (storage.delete.enabled: false?): {deleted} deleted before it said so, the rest stay"
        );
    }
    if failed > 0 {
        anyhow::bail!("{failed} snapshots could not be deleted (the log above says why)");
    }
    Ok(())
}

/// The rules as the flags that say them (`--keep-last 3 --keep-daily 7`).
fn flags(rules: &Rules) -> String {
    let mut out = format!("--keep-last {}", rules.last);
    for (flag, n) in [
        ("hourly", rules.hourly),
        ("daily", rules.daily),
        ("weekly", rules.weekly),
    ] {
        if n > 0 {
            out.push_str(&format!(" --keep-{flag} {n}"));
        }
    }
    if !rules.min_age.is_zero() {
        out.push_str(&format!(
            " --min-age {}",
            humantime::format_duration(rules.min_age)
        ));
    }
    out
}

/// What the real run would do with each candidate: read its manifest's tag annotation.
async fn plan(access: &Access, unit: &Unit) -> BTreeMap<String, String> {
    futures::stream::iter(&unit.candidates)
        .map(|t| async move {
            let what = match access.manifest(&unit.repository, t).await {
                Ok((_, manifest)) => {
                    if manifest["annotations"][provenance::TAG].as_str() == Some(t.as_str()) {
                        "delete".to_string()
                    } else {
                        "skip: no tag annotation (may share its manifest)".to_string()
                    }
                }
                Err(e) => format!("unreadable: {e:#}"),
            };
            (t.clone(), what)
        })
        .buffered(access.concurrency)
        .collect()
        .await
}
