//! One snapshot, top to bottom: click -> find -> pause/read the changes/resume
//! -> push.

use crate::{
    commit::{self, Lease},
    config::{Config, LayerSource},
    ctrd::Ctrd,
    find::{self, Identity},
    image,
    layer::NewLayer,
    metrics::Metrics,
    prune,
    push::Registry,
    session::{Sessions, Step},
    tag,
    upper::{self, Capabilities, Unsupported, Upper},
};
use anyhow::{Context, Result};
use containerd_client::services::v1::Container;
use snapshot_tags::retention::Policy;
use std::time::{Instant, SystemTime};
use tracing::{error, info, warn};

/// Runs operation `id` to its end: `done` or `error`, never stuck.
pub async fn run(config: &Config, sessions: &Sessions, metrics: &Metrics, id: &str) {
    let started = Instant::now();
    let result = commit_and_push(config, sessions, metrics, id).await;
    metrics.finished(
        result.as_ref().map(|(_, source)| *source),
        started.elapsed().as_secs_f64(),
    );
    match result {
        Ok((image, source)) => {
            info!(session = id, image = %image, source, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot done");
            sessions.done(id, image);
        }
        Err(e) => {
            let why = format!("{e:#}");
            error!(session = id, error = %why, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot failed");
            sessions.fail(id, why);
        }
    }
}

async fn commit_and_push(
    config: &Config,
    sessions: &Sessions,
    metrics: &Metrics,
    id: &str,
) -> Result<(String, &'static str)> {
    let step = |s: Step| {
        info!(session = id, step = s.words(), "step");
        sessions.step(id, s);
    };
    step(Step::SearchDesktop);
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

    step(Step::GenerateImage);
    let lease = Lease::create(&ctrd, config.lease_expiry).await?;
    let result = generate_and_push(
        config,
        &ctrd.with_lease(&lease.id),
        &container,
        &step,
        metrics,
    )
    .await;
    lease.release().await;
    result
}

async fn generate_and_push(
    config: &Config,
    ctrd: &Ctrd,
    container: &Container,
    step: &(dyn Fn(Step) + Sync),
    metrics: &Metrics,
) -> Result<(String, &'static str)> {
    let started = Instant::now();
    let mut base = image::base(ctrd, &container.image).await?;
    let scope = if image::layer_count(&base) + 1 > config.max_layers as usize {
        info!(
            layers = image::layer_count(&base),
            max = config.max_layers,
            "layer limit reached: squashing the desktop into one layer"
        );
        base = image::squashed(&base);
        commit::Scope::Everything
    } else {
        commit::Scope::Changes
    };
    let layer = new_layer(config, ctrd, container, scope).await?;
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        source = layer.source,
        "desktop image generated"
    );

    step(Step::LoginRegistry);
    let now = SystemTime::now();
    let tag = tag::snapshot_tag(&config.tag_prefix, now);
    let image_ref = format!("{}:{tag}", config.repository);
    let target: oci_client::Reference = image_ref
        .parse()
        .with_context(|| format!("{image_ref} is not an image reference"))?;
    let registry = Registry::login(
        &config.repository,
        config.registry_protocol,
        config.registry_ca.as_deref(),
        config.registry_credentials.as_deref(),
    )
    .await?;
    registry.authenticate(&target).await?;

    step(Step::PushImage);
    let created = humantime::format_rfc3339_seconds(now).to_string();
    let source = layer.source;
    let digest = registry
        .push(
            ctrd,
            &target,
            container.image.parse().ok().as_ref(),
            &base,
            layer,
            config.compression,
            &created,
        )
        .await?;
    let policy = Policy {
        keep: config.keep,
        min_age: config.keep_min_age,
    };
    prune::run(&registry, &target, &config.tag_prefix, policy, metrics).await;
    Ok((format!("{image_ref}@{digest}"), source))
}

/// The container's changes as a compressed layer: from the overlayfs upper
/// directory when it can be read faithfully, else from the Diff service (and
/// always from the Diff service for a squash, which needs the whole tree).
async fn new_layer(
    config: &Config,
    ctrd: &Ctrd,
    container: &Container,
    scope: commit::Scope,
) -> Result<NewLayer> {
    if scope == commit::Scope::Changes && config.layer_source == LayerSource::Auto {
        match upper_of(ctrd, container).await {
            Ok(upper) => {
                match commit::from_upper(
                    ctrd,
                    container,
                    upper,
                    config.pause,
                    config.compression(),
                    &config.work_dir,
                    config.max_change_bytes,
                )
                .await
                {
                    Ok(layer) => return Ok(layer),
                    Err(e) if e.downcast_ref::<Unsupported>().is_some() => {
                        warn!(reason = %format!("{e:#}"), "the upper directory cannot be used; the layer comes from the Diff service")
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(why) => {
                info!(reason = %why, "the layer comes from the Diff service")
            }
        }
    }
    // The Diff service writes the change uncompressed into containerd's content
    // store, on the node's disk: the limit applies to it before it starts.
    let diff = commit::diff(ctrd, container, scope, config.max_change_bytes).await?;
    commit::compress_stored(
        ctrd,
        &diff.digest,
        config.compression(),
        &config.work_dir,
        config.max_change_bytes,
    )
    .await
}

/// The container's upper directory, if this sidecar can read it faithfully.
async fn upper_of(ctrd: &Ctrd, container: &Container) -> Result<Upper, Unsupported> {
    if container.snapshotter != "overlayfs" {
        return Err(Unsupported(format!(
            "the snapshotter is {}, not overlayfs",
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
