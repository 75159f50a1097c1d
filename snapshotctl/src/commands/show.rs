//! `show TAG`: one snapshot in detail, from every repository in scope that has it.

use crate::{access::Access, cli::Output, inventory};
use anyhow::Result;
use futures::StreamExt;

pub async fn run(access: &Access, tag: &str, user: Option<&str>, output: Output) -> Result<()> {
    if let Some(u) = user {
        access.check_user(u)?;
    }
    let paths = access.repositories(user).await?;
    let searched = paths.len();
    let found: Vec<Result<Option<inventory::Detail>>> = futures::stream::iter(paths)
        .map(|path| async move {
            let Some(owner) = inventory::owner(access.layout, &path, tag)
                .filter(|o| user.is_none_or(|u| o.user == u))
            else {
                return Ok(None);
            };
            if access.digest(&path, tag).await?.is_none() {
                return Ok(None);
            }
            let (digest, manifest) = access.manifest(&path, tag).await?;
            Ok(Some(inventory::detail(
                &owner, &path, tag, &digest, &manifest,
            )))
        })
        .buffered(access.concurrency)
        .collect()
        .await;
    let mut details = Vec::new();
    for f in found {
        if let Some(d) = f? {
            details.push(d);
        }
    }
    if details.is_empty() {
        anyhow::bail!(
            "no snapshot tagged {tag:?} in the {searched} repositories searched on {}",
            access.host
        );
    }
    match output {
        Output::Table => {
            let texts: Vec<String> = details
                .iter()
                .map(|d| inventory::detail_text(d, &access.host))
                .collect();
            print!("{}", texts.join("\n"));
            Ok(())
        }
        Output::Json => super::print_json(&details),
    }
}
