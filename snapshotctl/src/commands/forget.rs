//! `forget --user U [--dry-run]`: erases every snapshot of one user (a
//! deletion request), in every repository in scope.
//!
//! Deletion is by manifest digest, and distribution deletes every tag on a
//! digest (see [`snapshot_sidecar::registry::prune`]). So a digest is deleted only when
//! no other user's tag can be on it: its manifest's tag annotation names one
//! of the user's tags (the sidecar's annotation makes each snapshot's
//! manifest its own), or, for a snapshot without it, none of the
//! repository's other tags (read by digest) has that digest. A digest shared
//! with another tag is left in place and reported: the command then fails,
//! since the user's snapshot is still there.

use crate::{
    access::{Access, Repository},
    cli::Output,
    inventory,
    progress::Progress,
};
use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;
use snapshot_sidecar::registry::push::Deleted;
use snapshot_tags::provenance;
use std::collections::{BTreeMap, BTreeSet};

/// What became of one manifest of the user.
#[derive(Debug, Clone, Serialize)]
struct Item {
    repository: String,
    digest: String,
    /// The user's tags on it.
    tags: Vec<String>,
    /// `deleted`, `gone`, `would delete`, `kept: ...`, `failed: ...`, `refused: ...`.
    result: String,
}

pub async fn run(access: &Access, user: &str, dry_run: bool, output: Output) -> Result<()> {
    access.check_user(user)?;
    let repositories = access.snapshots(Some(user)).await?;
    let progress = Progress::new(repositories.len(), access.quiet);
    let mut items = Vec::new();
    let mut refused = false;
    for repo in &repositories {
        let planned = plan(access, repo).await;
        let mut deleted = 0;
        for mut item in planned {
            if item.result.is_empty() {
                item.result = if dry_run || refused {
                    if refused {
                        "not tried: the registry refuses deletes".into()
                    } else {
                        "would delete".into()
                    }
                } else {
                    match access.delete(&repo.path, &item.digest).await {
                        Ok(Deleted::Done) => {
                            deleted += 1;
                            "deleted".into()
                        }
                        Ok(Deleted::Gone) => "gone already".into(),
                        Ok(Deleted::Refused(answer)) => {
                            refused = true;
                            format!("refused: the registry does not delete (storage.delete.enabled: false?): {answer}")
                        }
                        Err(e) => format!("failed: {e:#}"),
                    }
                };
            }
            items.push(item);
        }
        progress.step(format!(
            "user {user} ({}): {} {}",
            repo.path,
            if dry_run { "would delete" } else { "deleted" },
            if dry_run {
                items
                    .iter()
                    .filter(|i| i.repository == repo.path && i.result == "would delete")
                    .count()
            } else {
                deleted
            }
        ));
    }
    let count = |what: &str| items.iter().filter(|i| i.result.starts_with(what)).count();
    let erased = count("deleted") + count("gone");
    let left = items.len() - erased - count("would delete");
    let tags: usize = items
        .iter()
        .filter(|i| {
            ["deleted", "gone", "would delete"]
                .iter()
                .any(|w| i.result.starts_with(w))
        })
        .map(|i| i.tags.len())
        .sum();
    let summary =
        format!(
        "forget {user:?}: {} {} manifests ({tags} tags) in {} repositories; {left} left in place",
        if dry_run { "would delete" } else { "deleted" },
        if dry_run { count("would delete") } else { erased },
        repositories.len(),
    );
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i.repository.clone(),
                i.tags.join(","),
                i.digest.clone(),
                i.result.clone(),
            ]
        })
        .collect();
    super::print(
        output,
        &inventory::table(&["REPOSITORY", "TAGS", "DIGEST", "RESULT"], &rows),
        &summary,
        &serde_json::json!({"user": user, "dry_run": dry_run, "manifests": items, "summary": summary}),
    )?;
    if left > 0 {
        let why: Vec<String> = items
            .iter()
            .filter(|i| {
                !matches!(
                    i.result.as_str(),
                    "deleted" | "gone already" | "would delete"
                )
            })
            .map(|i| format!("{}:{} {}", i.repository, i.tags.join(","), i.result))
            .collect();
        anyhow::bail!(
            "{left} of {user:?}'s snapshot manifests are still in the registry: {}",
            why.join("; ")
        );
    }
    Ok(())
}

/// The user's manifests in `repo`, grouped by digest; `result` empty for those
/// safe to delete, else why they stay.
async fn plan(access: &Access, repo: &Repository) -> Vec<Item> {
    // digest and whether the manifest's own annotation names the tag
    let read: Vec<(String, Result<(String, bool)>)> = futures::stream::iter(&repo.snapshots)
        .map(|(t, _)| async move {
            let got = access
                .manifest(&repo.path, t)
                .await
                .map(|(digest, manifest)| {
                    let own = manifest["annotations"][provenance::TAG].as_str() == Some(t.as_str());
                    (digest, own)
                });
            (t.clone(), got)
        })
        .buffered(access.concurrency)
        .collect()
        .await;
    let mut items = Vec::new();
    let mut by_digest: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for (t, got) in read {
        match got {
            Ok((digest, own)) => {
                let entry = by_digest.entry(digest).or_insert((Vec::new(), true));
                entry.0.push(t);
                entry.1 &= own;
            }
            Err(e) => items.push(Item {
                repository: repo.path.clone(),
                digest: String::new(),
                tags: vec![t],
                result: format!("failed: {e:#}"),
            }),
        }
    }
    // Without the annotation, the other tags of the repository say whether the digest is shared.
    let others = if by_digest.values().all(|(_, own)| *own) {
        BTreeMap::new()
    } else {
        let mine: BTreeSet<&str> = repo.snapshots.iter().map(|(t, _)| t.as_str()).collect();
        other_digests(access, repo, &mine).await
    };
    for (digest, (tags, own)) in by_digest {
        let result = match others.get(&digest) {
            Some(Ok(shared)) => format!("kept: the manifest is also tagged {}", shared.join(",")),
            Some(Err(e)) => format!("kept: {e}"),
            None => String::new(),
        };
        let result = if !own && result.is_empty() && others.contains_key("") {
            "kept: the repository's other tags could not all be read".to_string()
        } else {
            result
        };
        items.push(Item {
            repository: repo.path.clone(),
            digest,
            tags,
            result,
        });
    }
    items
}

/// digest -> the other tags on it (not the user's); key "" when a tag could not be read.
async fn other_digests(
    access: &Access,
    repo: &Repository,
    mine: &BTreeSet<&str>,
) -> BTreeMap<String, std::result::Result<Vec<String>, String>> {
    let others: Vec<&String> = repo
        .all_tags
        .iter()
        .filter(|t| !mine.contains(t.as_str()))
        .collect();
    let read: Vec<(String, Result<Option<String>>)> = futures::stream::iter(others)
        .map(|t| async move { (t.clone(), access.digest(&repo.path, t).await) })
        .buffered(access.concurrency)
        .collect()
        .await;
    let mut out: BTreeMap<String, std::result::Result<Vec<String>, String>> = BTreeMap::new();
    for (t, got) in read {
        match got {
            Ok(Some(digest)) => {
                if let Ok(v) = out.entry(digest).or_insert_with(|| Ok(Vec::new())) {
                    v.push(t);
                }
            }
            Ok(None) => {}
            Err(e) => {
                out.insert(String::new(), Err(format!("{t}: {e:#}")));
            }
        }
    }
    out
}
