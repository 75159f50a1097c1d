//! `pin --user U (--at TIME | --ago D | --tag T)`: the pod annotation that
//! restores one of the user's snapshots (the webhook's
//! `snapshot.abcdesktop.io/pin`): the one tagged `T`, or in each of the user's
//! series (repository and tag prefix) the snapshot taken at or just before
//! the moment. One manifest read per snapshot chosen (its trigger and base).

use crate::{
    access::Access,
    cli::Output,
    inventory,
    timeline::{self, Pin},
};
use anyhow::Result;
use snapshot_webhook::decision::ANNOTATION_PIN;
use std::{collections::BTreeMap, time::SystemTime};

/// Which snapshot to restore.
#[derive(Debug, Clone)]
pub enum Moment {
    /// The one with this tag.
    Tag(String),
    /// The one taken at or just before this time.
    At(SystemTime),
}

pub async fn run(access: &Access, user: &str, moment: &Moment, output: Output) -> Result<()> {
    access.check_user(user)?;
    let mut chosen = Vec::new();
    for repo in access.snapshots(Some(user)).await? {
        let mut by_prefix: BTreeMap<&str, Vec<(&str, &inventory::Owner)>> = BTreeMap::new();
        for (t, owner) in &repo.snapshots {
            by_prefix
                .entry(owner.prefix.as_str())
                .or_default()
                .push((t, owner));
        }
        for (prefix, tags) in by_prefix {
            let pick = match moment {
                Moment::Tag(wanted) => tags
                    .iter()
                    .find(|(t, _)| t == wanted)
                    .map(|(t, _)| t.to_string()),
                Moment::At(at) => timeline::at_or_before(tags.iter().map(|(t, _)| *t), prefix, *at),
            };
            if let Some(t) = pick {
                let owner = tags[0].1.clone();
                chosen.push((repo.path.clone(), t, owner));
            }
        }
    }
    let mut pins = Vec::new();
    for (path, t, owner) in chosen {
        let (digest, manifest) = access.manifest(&path, &t).await?;
        let snapshot = inventory::describe(&owner, &path, &t, &digest, &manifest);
        pins.push(Pin::of(&snapshot, ANNOTATION_PIN));
    }
    if pins.is_empty() {
        anyhow::bail!(
            "no snapshot of user {user:?} {} on {} (snapshotctl list --user shows their timeline)",
            match moment {
                Moment::Tag(t) => format!("tagged {t:?}"),
                Moment::At(at) => format!(
                    "taken at or before {}",
                    humantime::format_rfc3339_seconds(*at)
                ),
            },
            access.host
        );
    }
    match output {
        Output::Table => {
            print!("{}", timeline::pin_text(&pins, &access.host));
            Ok(())
        }
        Output::Json => super::print_json(&pins),
    }
}
