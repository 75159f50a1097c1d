//! One snapshot, top to bottom: click -> find -> pause/diff/resume -> push.

use crate::{
    commit::{self, Lease},
    config::Config,
    ctrd::Ctrd,
    find::{self, Identity},
    image,
    metrics::Metrics,
    push::Registry,
    session::{Sessions, Step},
    tag,
};
use anyhow::{Context, Result};
use std::time::{Instant, SystemTime};
use tracing::{error, info};

/// Runs operation `id` to its end: `done` or `error`, never stuck.
pub async fn run(config: &Config, sessions: &Sessions, metrics: &Metrics, id: &str) {
    let started = Instant::now();
    let result = commit_and_push(config, sessions, id).await;
    metrics.finished(result.is_ok(), started.elapsed().as_secs_f64());
    match result {
        Ok(image) => {
            info!(session = id, image = %image, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot done");
            sessions.done(id, image);
        }
        Err(e) => {
            let why = format!("{e:#}");
            error!(session = id, error = %why, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot failed");
            sessions.fail(id, why);
        }
    }
}

async fn commit_and_push(config: &Config, sessions: &Sessions, id: &str) -> Result<String> {
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
    let result = generate_and_push(config, &ctrd.with_lease(&lease.id), &container, &step).await;
    lease.release().await;
    result
}

async fn generate_and_push(
    config: &Config,
    ctrd: &Ctrd,
    container: &containerd_client::services::v1::Container,
    step: &(dyn Fn(Step) + Sync),
) -> Result<String> {
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
    let layer = commit::diff(ctrd, container, config.pause, scope).await?;
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
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
    let digest = registry
        .push(
            ctrd,
            &target,
            container.image.parse().ok().as_ref(),
            &base,
            &layer.digest,
            (config.compression, config.compression_threads),
            &created,
        )
        .await?;
    Ok(format!("{image_ref}@{digest}"))
}
