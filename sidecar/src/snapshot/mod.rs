//! One snapshot, top to bottom: click (or logoff, or the schedule) -> the
//! registry credentials -> find -> pause/read the changes/resume -> (a logoff
//! or a scheduled snapshot with nothing new stops here) -> push.

pub mod chain;
pub mod session;
pub mod squash;

use crate::{
    capture::{
        commit::{self, Lease},
        find::{self, Identity},
        lineage,
        record::{self, Identity as Recorded, Record},
        upper::{self, Capabilities, Unsupported, Upper},
    },
    config::{Config, LayerSource},
    ctrd::Ctrd,
    image::{self, new_layer::Layer},
    metrics::Metrics,
    registry::{
        self, prune,
        push::{KnownBlobs, Registry},
    },
    tag,
};
use anyhow::{Context, Result};
use containerd_client::services::v1::Container;
use session::{Sessions, Step, Trigger};
use snapshot_tags::provenance;
use std::time::{Instant, SystemTime};
use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, warn};

/// The uncompressed digest of a layer without any entry (a tar's end only).
pub const EMPTY_LAYER: &str =
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// Whether a change whose tar has digest `diff_id` ([`NewLayer::change`](image::new_layer::NewLayer::change)) adds
/// nothing: no entry at all, or the same bytes as the last layer pushed from
/// this desktop (the upper directory holds everything since the restore, so
/// an unchanged desktop gives the same layer).
pub fn unchanged(diff_id: &str, last_pushed: Option<&str>) -> bool {
    diff_id == EMPTY_LAYER || Some(diff_id) == last_pushed
}

/// What a snapshot made.
pub enum Made {
    /// Pushed: `image@digest`, with its layer's source and its change's digest
    /// ([`NewLayer::change`](image::new_layer::NewLayer::change): the diff_id but for eStargz).
    Pushed {
        image: String,
        source: &'static str,
        diff_id: String,
    },
    /// A logoff or a scheduled snapshot found nothing new: nothing pushed.
    Unchanged,
    /// A click found nothing changed since the last snapshot of the chain:
    /// its answer is that snapshot, the newest tag (`image@digest`).
    Newest { image: String },
}

/// What the front end reads when a snapshot pushed nothing.
pub const UNCHANGED: &str = "nothing changed since the last snapshot: no new tag";

/// Runs operation `id` to its end: `done` or `error`, never stuck. Returns
/// the result's word: `done`, `unchanged` or `error`.
pub async fn run(
    config: &Config,
    sessions: &Sessions,
    metrics: &Metrics,
    id: &str,
    trigger: Trigger,
) -> &'static str {
    let started = Instant::now();
    let op = Progress {
        sessions,
        id,
        trigger,
    };
    let result = commit_and_push(config, metrics, &op).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let (word, source) = match &result {
        Ok(Made::Pushed { source, .. }) => ("done", Some(*source)),
        Ok(Made::Unchanged | Made::Newest { .. }) => ("unchanged", None),
        Err(_) => ("error", None),
    };
    metrics.finished(
        op.answers_as().word(),
        word,
        source,
        started.elapsed().as_secs_f64(),
    );
    match result {
        Ok(Made::Pushed {
            image,
            source,
            diff_id,
        }) => {
            info!(session = id, ?trigger, image = %image, source, elapsed_ms, "snapshot done");
            sessions.done(id, image, diff_id);
        }
        Ok(Made::Unchanged) => {
            info!(
                session = id,
                ?trigger,
                elapsed_ms,
                "nothing changed since the last snapshot: no new tag"
            );
            sessions.unchanged(id, UNCHANGED);
        }
        Ok(Made::Newest { image }) => {
            info!(session = id, ?trigger, image = %image, elapsed_ms, "nothing changed since the last snapshot: the newest tag answers");
            sessions.newest(id, image);
        }
        Err(e) => {
            let why = format!("{e:#}");
            error!(session = id, ?trigger, error = %why, elapsed_ms, "snapshot failed");
            sessions.fail(id, why);
        }
    }
    give_back_memory();
    word
}

/// A snapshot is a burst (compression blocks, upload buffers) in a process
/// that idles between two: the allocator's free pages go back to the system
/// instead of keeping the sidecar at its peak.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The operation a snapshot runs as: its steps, what it answers as.
struct Progress<'a> {
    sessions: &'a Sessions,
    id: &'a str,
    trigger: Trigger,
}

impl Progress<'_> {
    fn step(&self, s: Step) {
        info!(session = self.id, step = s.words(), "step");
        self.sessions.step(self.id, s);
    }

    /// The trigger that started it, or a click that joined it.
    fn answers_as(&self) -> Trigger {
        self.sessions
            .get(self.id)
            .map_or(self.trigger, |op| op.answers_as())
    }

    /// Whether the snapshot ends here, its change (digest `change`) adding
    /// nothing: a logoff's or a scheduled one's, unless a click joined it
    /// (a click always answers with a tag); the operation is then ended.
    fn nothing_new(&self, change: &str) -> bool {
        unchanged(change, self.sessions.last_pushed().as_deref())
            && self.sessions.end_unchanged(self.id, UNCHANGED)
    }
}

async fn commit_and_push(config: &Config, metrics: &Metrics, op: &Progress<'_>) -> Result<Made> {
    // before anything is paused: a snapshot that cannot be pushed must not
    // freeze the desktop first
    if let Some(file) = &config.registry_credentials {
        registry::credentials::check(&config.repository, file)
            .await
            .context("the desktop was not paused")?;
    }
    op.step(Step::SearchDesktop);
    let ctrd = Ctrd::connect(&config.containerd_socket, &config.containerd_namespace).await?;
    let container = find::container(
        &ctrd,
        &Identity {
            pod_uid: &config.pod_uid,
            pod_name: &config.pod_name,
            pod_namespace: &config.pod_namespace,
            container: &config.container,
        },
    )
    .await?;

    op.step(Step::GenerateImage);
    let lease = Lease::create(&ctrd, config.lease_expiry).await?;
    let result = chained(
        config,
        &op.sessions.known,
        &ctrd.with_lease(&lease.id),
        &container,
        op,
        metrics,
    )
    .await;
    lease.release().await;
    result
}

/// The snapshot as an increment over the last pushed capture of this
/// container when its record is there ([`chain`]), else with the whole
/// change; nothing changed since that capture (its record says so, before any
/// pause or registry request): no tag, or for a click the newest tag.
async fn chained(
    config: &Config,
    known: &KnownBlobs,
    ctrd: &Ctrd,
    container: &Container,
    op: &Progress<'_>,
    metrics: &Metrics,
) -> Result<Made> {
    let upper = match config.layer_source {
        LayerSource::Auto => upper_of(ctrd, container).await.map_err(|e| e.0),
        _ => Err("the layer source is the Diff service".to_string()),
    };
    let identity = match &upper {
        Ok(u) if config.incremental => Recorded::of(
            &u.dir,
            &container.id,
            &container.snapshot_key,
            &config.repository,
        )
        .map_err(|e| warn!(error = %e, "the upper directory cannot be identified: no increment"))
        .ok(),
        _ => None,
    };
    let mut last = identity.as_ref().and_then(|id| chain::load(config, id));
    if let (Some((newest, old)), Ok(upper)) = (last.take(), &upper) {
        let (same, old) = unchanged_since(upper, old).await;
        if same {
            if op.sessions.end_unchanged(op.id, UNCHANGED) {
                return Ok(Made::Unchanged);
            }
            return Ok(Made::Newest {
                image: newest.image.clone(),
            });
        }
        last = old.map(|old| (newest, old));
    }
    let upper = upper
        .map_err(|why| info!(reason = %why, "the layer comes from the Diff service"))
        .ok();
    let chained = last.is_some();
    let made = generate_and_push(
        config,
        known,
        ctrd,
        container,
        op,
        metrics,
        (upper.clone(), identity.as_ref(), last),
    )
    .await;
    match made {
        Err(e) if e.downcast_ref::<NotAnIncrement>().is_some() => {
            warn!(reason = %format!("{e:#}"), "this snapshot's layer is a full one");
            chain::forget(config);
            generate_and_push(
                config,
                known,
                ctrd,
                container,
                op,
                metrics,
                (upper, identity.as_ref(), None),
            )
            .await
        }
        // the chain's last snapshot may be what failed (deleted, its layers
        // collected): the next snapshot starts a chain anew, never stuck
        Err(e) if chained => {
            warn!("the snapshot failed: the next one's layer is a full one");
            chain::forget(config);
            Err(e)
        }
        other => other,
    }
}

/// The upper directory cannot give an increment (what it holds now cannot
/// be read from it): the snapshot is made again with a full layer.
#[derive(Debug, thiserror::Error)]
#[error("the increment cannot be read from the upper directory: {0}")]
struct NotAnIncrement(String);

/// Whether the upper directory is as the record `old` says: one metadata
/// walk that stops at the first difference, no pause, no data read. The
/// record comes back for the increment (none if the walk's thread died:
/// the next layer is a full one).
async fn unchanged_since(upper: &Upper, old: Record) -> (bool, Option<Record>) {
    let (dir, userxattr) = (upper.dir.clone(), upper.userxattr);
    let started = Instant::now();
    let walked = tokio::task::spawn_blocking(move || {
        let same = record::same_as(&dir, userxattr, &old);
        (same, old)
    })
    .await;
    match walked {
        Ok((Ok(same), old)) => {
            info!(
                entries = old.len(),
                unchanged = same,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "the upper directory compared with the record of the last capture"
            );
            (same, Some(old))
        }
        Ok((Err(e), old)) => {
            warn!(error = %format!("{e:#}"), "the upper directory cannot be recorded");
            (false, Some(old))
        }
        Err(_) => (false, None),
    }
}

/// What a snapshot starts from: the upper directory when it can be read,
/// its identity when increments are on, and the last pushed capture of the
/// chain (its image and record) when there is one.
type Start<'a> = (
    Option<Upper>,
    Option<&'a Recorded>,
    Option<(chain::Last, Record)>,
);

async fn generate_and_push(
    config: &Config,
    known: &KnownBlobs,
    ctrd: &Ctrd,
    container: &Container,
    op: &Progress<'_>,
    metrics: &Metrics,
    (upper, identity, last): Start<'_>,
) -> Result<Made> {
    let started = Instant::now();
    let (last, old) = last.unzip();
    let mut base = match &last {
        Some(newest) => newest.base(),
        None => image::base(ctrd, &container.image).await?,
    };
    let mut provenance = match &last {
        // the chain's last snapshot says what it sits on
        Some(_) => provenance::Provenance::read(&base.annotations()),
        None => lineage::of(ctrd, &container.image, &base, config.base_image.as_deref()).await,
    };
    // a snapshot made before provenance on a node without its base: ask the base's registry
    let mut registry = None;
    if let (None, None, Some(base_name)) = (&last, &provenance, config.base_image.as_deref()) {
        let r = login(config, known).await?;
        provenance = lineage::from_registry(&r, &base, base_name).await;
        registry = Some(r);
    }
    let layers = image::layer_count(&base);
    let over_limit = layers + 1 > config.max_layers as usize;
    // past the limit, the user's layers are merged above the base when the
    // base's layers are known and leave room for one more
    let keep_base = provenance
        .as_ref()
        .map(|p| p.first_user_layer)
        .filter(|first| over_limit && *first < layers && *first < config.max_layers as usize);
    let scope = if over_limit && keep_base.is_none() {
        info!(
            layers,
            max = config.max_layers,
            "layer limit reached, the base's layers unknown: squashing the whole desktop into one layer"
        );
        base = image::squashed(&base);
        // one layer holds everything: it sits on nothing
        provenance = None;
        commit::Scope::Everything
    } else {
        commit::Scope::Changes
    };
    let (layer, record) = new_layer(config, ctrd, container, scope, upper, old).await?;
    let now = SystemTime::now();
    let tag = tag::snapshot_tag(&config.tag_prefix, now);
    let image_ref = format!("{}:{tag}", config.repository);
    let target: oci_client::Reference = image_ref
        .parse()
        .with_context(|| format!("{image_ref} is not an image reference"))?;
    // a large layer still being put together after the resume goes to the
    // registry as it is written (unless it is to be merged first)
    let sending = match &layer {
        Layer::Assembling(a) if a.large && keep_base.is_none() => {
            let r = match registry.take() {
                Some(r) => r,
                None => login(config, known).await?,
            };
            let sending = AbortOnDropHandle::new(tokio::spawn(
                r.upload_while_written(&target, a.spool.clone()),
            ));
            registry = Some(r);
            Some(sending)
        }
        _ => None,
    };
    let layer = layer.finish().await?;
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        source = layer.source,
        "desktop image generated"
    );
    if op.nothing_new(&layer.change) {
        return Ok(Made::Unchanged);
    }
    if let (Some(newest), EMPTY_LAYER) = (&last, layer.change.as_str()) {
        return Ok(Made::Newest {
            image: newest.image.clone(),
        });
    }
    op.step(Step::LoginRegistry);
    let registry = match registry {
        Some(r) => r,
        None => login(config, known).await?,
    };
    registry.authenticate(&target).await?;

    let layer = match keep_base {
        Some(first) => {
            info!(
                layers,
                max = config.max_layers,
                base_layers = first,
                "layer limit reached: merging the user's layers into one above the base"
            );
            // user layers the node lacks are read from the image's repository
            // the chain's layers are in the snapshot repository
            let from = match &last {
                Some(_) => target.clone(),
                None => container
                    .image
                    .parse::<oci_client::Reference>()
                    .ok()
                    .filter(|r| r.registry() == target.registry())
                    .unwrap_or_else(|| target.clone()),
            };
            let merged =
                squash::merged(ctrd, (&registry, &from), &base, first, layer, config).await?;
            base = image::below(&base, first);
            merged
        }
        None => layer,
    };

    op.step(Step::PushImage);
    let created = humantime::format_rfc3339_seconds(now).to_string();
    let mut annotations = match &provenance {
        Some(p) => p.annotations(&config.user, &tag, &created),
        None => provenance::unsourced(&config.user, &tag, &created),
    };
    annotations.insert(
        provenance::TRIGGER.to_string(),
        op.answers_as().word().to_string(),
    );
    let (source, diff_id) = (layer.source, layer.change.clone());
    let pushed = registry
        .push(
            ctrd,
            &target,
            container.image.parse().ok().as_ref(),
            &base,
            layer,
            *config.compression,
            &created,
            &annotations,
            sending.map(AbortOnDropHandle::detach),
        )
        .await?;
    let image = format!("{image_ref}@{}", pushed.digest);
    keep_chain(config, identity, record, &image, pushed);
    prune::run(
        &registry,
        &target,
        &config.tag_prefix,
        config.retention(),
        metrics,
    )
    .await;
    Ok(Made::Pushed {
        image,
        source,
        diff_id,
    })
}

/// The chain goes on from the capture just pushed: its record kept with the
/// image it made (`pushed`, tagged `image`); a push without a record (the
/// Diff service's layer, increments off) ends the chain.
fn keep_chain(
    config: &Config,
    identity: Option<&Recorded>,
    record: Option<Record>,
    image: &str,
    pushed: image::Base,
) {
    let (Some(identity), Some(record)) = (identity, record) else {
        chain::forget(config);
        return;
    };
    let last = chain::Last {
        image: image.to_string(),
        digest: pushed.digest,
        manifest: pushed.manifest,
        config: pushed.config,
    };
    if let Err(e) = chain::save(config, identity, &last, &record) {
        warn!(error = %format!("{e:#}"), "the record of this capture cannot be kept: the next snapshot's layer is a full one");
        chain::forget(config);
    }
}

/// A client for the snapshot registry with the mounted credentials, knowing
/// what earlier snapshots found in the repository.
async fn login(config: &Config, known: &KnownBlobs) -> Result<Registry> {
    Ok(Registry::login(
        &config.repository,
        config.registry_protocol,
        config.registry_ca.as_deref(),
        config.registry_credentials.as_deref(),
    )
    .await?
    .remembering(known.clone()))
}

/// The container's changes as a compressed layer: from the overlayfs upper
/// directory when it can be read faithfully, else from the Diff service (and
/// always from the Diff service for a squash, which needs the whole tree).
async fn new_layer(
    config: &Config,
    ctrd: &Ctrd,
    container: &Container,
    scope: commit::Scope,
    upper: Option<Upper>,
    last: Option<Record>,
) -> Result<(Layer, Option<Record>)> {
    if let (commit::Scope::Changes, Some(upper)) = (scope, upper) {
        let freeze = match (config.pause, config.pre_copy) {
            (false, _) => commit::Freeze::Never,
            (true, false) => commit::Freeze::Throughout,
            (true, true) => commit::Freeze::PreCopy,
        };
        let increment = last.is_some();
        let reading = commit::Reading {
            ctrd,
            container,
            compression: config.compression(),
            work_dir: &config.work_dir,
            max_bytes: config.max_change_bytes,
        };
        let read = if config.incremental {
            commit::from_upper_recorded(&reading, upper, freeze, last).await
        } else {
            commit::from_upper(&reading, upper, freeze)
                .await
                .map(|layer| (layer, None))
        };
        match read {
            Ok(read) => return Ok(read),
            Err(e) if e.downcast_ref::<Unsupported>().is_some() => {
                if increment {
                    return Err(NotAnIncrement(format!("{e:#}")).into());
                }
                warn!(reason = %format!("{e:#}"), "the upper directory cannot be used; the layer comes from the Diff service")
            }
            Err(e) => return Err(e),
        }
    }
    // The Diff service writes the change uncompressed into containerd's content
    // store, on the node's disk: the limit applies to it before it starts.
    let diff = commit::diff(ctrd, container, scope, config.max_change_bytes).await?;
    let layer = commit::compress_stored(
        ctrd,
        &diff.digest,
        config.compression(),
        &config.work_dir,
        config.max_change_bytes,
    )
    .await?;
    Ok((Layer::Ready(layer), None))
}

/// The container's upper directory, if this sidecar can read it faithfully.
/// Snapshotters whose active snapshot is an overlay mount with a plain
/// upper directory: containerd's own, and the stargz snapshotter (its lower
/// layers are FUSE mounts, read lazily; the upper directory lies under its
/// root, `/var/lib/containerd-stargz-grpc`).
const OVERLAY_SNAPSHOTTERS: [&str; 2] = ["overlayfs", "stargz"];

async fn upper_of(ctrd: &Ctrd, container: &Container) -> Result<Upper, Unsupported> {
    if !OVERLAY_SNAPSHOTTERS.contains(&container.snapshotter.as_str()) {
        return Err(Unsupported(format!(
            "the snapshotter is {}, not one of {OVERLAY_SNAPSHOTTERS:?}",
            container.snapshotter
        )));
    }
    let mounts = commit::mounts(ctrd, container)
        .await
        .map_err(|e| Unsupported(format!("{e:#}")))?;
    let upper = upper::upperdir(&mounts)
        .ok_or_else(|| Unsupported("the root filesystem is not an overlay mount".to_string()))?;
    upper.check(&Capabilities::read())?;
    Ok(upper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_empty_layer_is_a_tar_end_alone() {
        let tar = tar::Builder::new(Vec::new()).into_inner().unwrap();
        assert_eq!(format!("sha256:{:x}", Sha256::digest(&tar)), EMPTY_LAYER);
    }

    #[test]
    fn what_counts_as_unchanged() {
        for (diff_id, last, want) in [
            (EMPTY_LAYER, None, true),
            (EMPTY_LAYER, Some("sha256:a"), true),
            ("sha256:a", Some("sha256:a"), true),
            ("sha256:a", Some("sha256:b"), false),
            ("sha256:a", None, false),
        ] {
            assert_eq!(unchanged(diff_id, last), want, "{diff_id} after {last:?}");
        }
    }
}
