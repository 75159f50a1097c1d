//! The registry as snapshotctl reaches it: the webhook's client for tags
//! (every page) and digests, the sidecar's for manifests, deletes and the
//! catalog; both from the same flags (host, protocol, CA, credentials file;
//! Basic, or Bearer tokens from the registry's token service). And which
//! repositories and tags are in scope, with the webhook's layout and user-id
//! mapping ([`target`], [`userid`]).

use crate::{
    cli::RegistryArgs,
    inventory::{self, Owner},
    progress::Progress,
    UsageError,
};
use anyhow::{Context, Result};
use oci_client::Reference;
use serde_json::Value;
use snapshot_sidecar::registry::push::{self, Deleted};
use snapshot_webhook::{
    config::Protocol,
    policy::Layout,
    registry::{Registry, RegistrySettings},
    target, userid,
};

/// A user mapped by the placeholder when only an image's path is wanted (the
/// shared layout's path does not depend on the user).
const ANY_USER: &str = "snapshotctl";

pub struct Access {
    pub host: String,
    pub layout: Layout,
    pub concurrency: usize,
    pub quiet: bool,
    images: Vec<String>,
    tags: Registry,
    manifests: push::Registry,
}

/// One repository's snapshots in scope, with their owners.
pub struct Repository {
    pub path: String,
    /// Every tag of the repository (the user's and everything else).
    pub all_tags: Vec<String>,
    /// The snapshots in scope, in the registry's order.
    pub snapshots: Vec<(String, Owner)>,
}

impl Access {
    pub async fn connect(args: &RegistryArgs, quiet: bool) -> Result<Self> {
        if args.registry.trim().is_empty() {
            return Err(
                UsageError("--registry (or SNAPSHOTCTL_REGISTRY) is required".into()).into(),
            );
        }
        let ca_pem = match &args.registry_ca {
            Some(p) => Some(
                std::fs::read(p)
                    .with_context(|| format!("reading --registry-ca {}", p.display()))?,
            ),
            None => None,
        };
        let tags = Registry::new(RegistrySettings {
            host: args.registry.clone(),
            protocol: args.registry_protocol,
            ca_pem,
            credentials_file: args.registry_credentials.clone(),
        })?;
        tags.reload_credentials()
            .await
            .context("loading the registry credentials")?;
        let protocol = match args.registry_protocol {
            Protocol::Https => snapshot_sidecar::registry::Protocol::Https,
            Protocol::Http => snapshot_sidecar::registry::Protocol::Http,
        };
        let manifests = push::Registry::login(
            &args.registry,
            protocol,
            args.registry_ca.as_deref(),
            args.registry_credentials.as_deref(),
        )
        .await?;
        Ok(Self {
            host: args.registry.clone(),
            layout: args.layout,
            concurrency: usize::from(args.concurrency),
            quiet,
            images: args.images.clone(),
            tags,
            manifests,
        })
    }

    /// Checks that `user` has a registry name in this layout.
    pub fn check_user(&self, user: &str) -> Result<()> {
        let mapped = match self.layout {
            Layout::Shared => userid::tag_prefix(user),
            Layout::PerUser => userid::repository_component(user),
        };
        mapped.map(|_| ()).map_err(|e| {
            UsageError(format!(
                "--user {user:?}: the user id cannot be a registry name: {e}"
            ))
            .into()
        })
    }

    pub fn reference(&self, path: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), path.to_string(), tag.to_string())
    }

    /// The repositories that may hold snapshots in scope: those of `--image`,
    /// else the registry's catalog (per-user layout: the user's, or every
    /// user's).
    pub async fn repositories(&self, user: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if !self.images.is_empty() {
            let mut catalog: Option<Vec<String>> = None;
            for image in &self.images {
                let path_of = |layout: Layout, user: &str| {
                    target::derive(image, &self.host, layout, user)
                        .map(|t| t.path)
                        .map_err(|e| UsageError(format!("--image {image} --user {user:?}: {e}")))
                };
                match (self.layout, user) {
                    (Layout::PerUser, None) => {
                        // every user's repository of this image
                        let path = path_of(Layout::Shared, ANY_USER)?;
                        if catalog.is_none() {
                            catalog = Some(self.catalog().await?);
                        }
                        out.extend(
                            catalog
                                .iter()
                                .flatten()
                                .filter(|repo| {
                                    repo.split_once('/').is_some_and(|(c, rest)| {
                                        rest == path && inventory::user_of_component(c).is_some()
                                    })
                                })
                                .cloned(),
                        );
                    }
                    (layout, user) => out.push(path_of(layout, user.unwrap_or(ANY_USER))?),
                }
            }
        } else {
            let catalog = self.catalog().await?;
            out = match (self.layout, user) {
                (Layout::Shared, _) => catalog,
                (Layout::PerUser, Some(u)) => {
                    let component = userid::repository_component(u)
                        .map_err(|e| UsageError(format!("--user {u:?}: {e}")))?;
                    let prefix = format!("{component}/");
                    catalog
                        .into_iter()
                        .filter(|r| r.starts_with(&prefix))
                        .collect()
                }
                (Layout::PerUser, None) => catalog
                    .into_iter()
                    .filter(|r| {
                        r.split_once('/')
                            .is_some_and(|(c, _)| inventory::user_of_component(c).is_some())
                    })
                    .collect(),
            };
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn catalog(&self) -> Result<Vec<String>> {
        self.manifests
            .catalog(&self.host)
            .await
            .context("finding the repositories (give --image to name them instead)")
    }

    /// Every tag of `path`; none when the repository does not exist.
    pub async fn tags(&self, path: &str) -> Result<Vec<String>> {
        Ok(self
            .tags
            .tags(path)
            .await
            .with_context(|| format!("listing the tags of {}/{path}", self.host))?
            .unwrap_or_default())
    }

    /// The repositories in scope and their snapshots of `user` (every user's
    /// when `None`), with a progress line per repository.
    pub async fn snapshots(&self, user: Option<&str>) -> Result<Vec<Repository>> {
        let paths = self.repositories(user).await?;
        let progress = Progress::new(paths.len(), self.quiet || paths.len() < 2);
        let mut out = Vec::new();
        for path in paths {
            let all_tags = self.tags(&path).await?;
            let snapshots: Vec<(String, Owner)> = all_tags
                .iter()
                .filter_map(|t| Some((t.clone(), inventory::owner(self.layout, &path, t)?)))
                .filter(|(_, o)| user.is_none_or(|u| o.user == u))
                .collect();
            progress.step(format!("repository {path}: {} snapshots", snapshots.len()));
            if !snapshots.is_empty() {
                out.push(Repository {
                    path,
                    all_tags,
                    snapshots,
                });
            }
        }
        Ok(out)
    }

    /// The digest and whole manifest of `path:tag`.
    pub async fn manifest(&self, path: &str, tag: &str) -> Result<(String, Value)> {
        self.manifests
            .manifest(&self.reference(path, tag), tag)
            .await
            .with_context(|| format!("{path}:{tag}"))
    }

    /// The digest of `path:tag`, `None` when there is no such tag.
    pub async fn digest(&self, path: &str, tag: &str) -> Result<Option<String>> {
        self.tags
            .digest(path, tag)
            .await
            .with_context(|| format!("reading the digest of {path}:{tag}"))
    }

    /// Deletes the manifest `digest` of `path` (every tag on it).
    pub async fn delete(&self, path: &str, digest: &str) -> Result<Deleted> {
        self.manifests
            .delete_manifest(&self.reference(path, "latest"), digest)
            .await
            .with_context(|| format!("deleting {path}@{digest}"))
    }

    /// The webhook's client, for a rebase as the webhook makes it.
    pub fn webhook_registry(&self) -> &Registry {
        &self.tags
    }

    /// The sidecar's client, for its retention run.
    pub fn sidecar_registry(&self) -> &push::Registry {
        &self.manifests
    }
}
