//! One admission, top to bottom: request -> plan -> lookup (and, when the
//! pod asks for a new base image, keep, rebase or fresh) -> resolution -> patch.

use crate::{
    decision::{self, Found, InNamespace, Outcome, Plan, Resolution, Rules, Want},
    lookup::{ErrorKind, Lookup, LookupError},
    metrics::Metrics,
    namespace::{Namespaces, Object},
    newbase::{self, BaseChange},
    patch,
    policy::{Layout, OnNewBase},
    rewrite,
    sidecar::SidecarSpec,
    tag::{self, provenance::Provenance},
    target::Target,
};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    admission::{AdmissionRequest, AdmissionResponse},
    DynamicObject,
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tracing::{info, warn};

/// Everything an admission needs, shared by all requests.
pub struct Admitter {
    pub rules: Rules,
    pub sidecar: SidecarSpec,
    pub lookup: Lookup,
    pub metrics: Arc<Metrics>,
    pub pin_digest: bool,
    /// A whole admission's time, from the request's arrival.
    pub budget: Duration,
    /// What a login does when its pod asks for another base than its snapshot's.
    pub on_new_base: OnNewBase,
    /// Asks the API what the pod's namespace holds (`None`: `--namespace-check=false`).
    pub namespaces: Option<Namespaces>,
}

/// Time kept at the end of the budget for the patch and the answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(20);
/// Time a rebase leaves of the budget, for restoring the snapshot as it is
/// when the rebase does not finish (a digest lookup, with `--pin-digest`).
const KEEP_MARGIN: Duration = Duration::from_millis(250);

impl Admitter {
    /// Answers `request`, which reached the webhook at `arrived`.
    pub async fn admit(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        arrived: Instant,
    ) -> AdmissionResponse {
        let started = arrived;
        let response = AdmissionResponse::from(request);
        let pod = match pod_of(request) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.admission(Outcome::Invalid);
                warn!(uid = %request.uid, error = %e, "the request's object is not a valid Pod");
                return response.deny(format!(
                    "desktop-snapshot: the object is not a valid Pod: {e}"
                ));
            }
        };
        let plan = decision::plan(
            &self.rules,
            &request.operation,
            &request.kind.kind,
            pod.as_ref(),
        );
        let action = match plan {
            Plan::Ignore(why) => {
                self.metrics.admission(Outcome::Ignored);
                tracing::debug!(uid = %request.uid, why, "ignored");
                return response;
            }
            Plan::Deny(why) => {
                self.metrics.admission(Outcome::Denied);
                info!(uid = %request.uid, namespace = ?request.namespace, reason = %why, "denied");
                return response.deny(why);
            }
            Plan::Act(action) => action,
        };
        // the registry and the API are asked at once, within the same budget
        let (found, namespace) = tokio::join!(
            self.ask_within_budget(&action, arrived, request.dry_run),
            self.ask_namespace(&action, request.namespace.as_deref(), arrived),
        );
        let resolution = decision::resolve(&action, found);
        let resolution = match &namespace {
            Some(ns) => {
                self.metrics
                    .namespace_check(Object::RegistrySecret.as_str(), &ns.secret.presence);
                if let Some(ca) = &ns.ca {
                    self.metrics
                        .namespace_check(Object::RegistryCa.as_str(), &ca.presence);
                }
                decision::given_namespace(resolution, ns)
            }
            None => resolution,
        };
        self.metrics.admission(resolution.outcome);
        if let Some(change) = &resolution.base_change {
            self.metrics.new_base(change);
        }
        self.log(request, &action, &resolution, started);
        if let Some(why) = &resolution.deny {
            return response.deny(why);
        }
        let Some(pod) = pod else { return response };
        let response = match patch::build(&pod, &action, &resolution, &self.sidecar) {
            Ok(p) if p.0.is_empty() => response,
            Ok(p) => match response.clone().with_patch(p) {
                Ok(r) => r,
                Err(e) => {
                    warn!(uid = %request.uid, error = %e, "cannot serialise the patch; admitting unchanged");
                    response
                }
            },
            Err(e) => {
                warn!(uid = %request.uid, error = %e, "cannot build the patch; admitting unchanged");
                response
            }
        };
        with_warnings(response, resolution.warnings)
    }

    /// What the pod's namespace holds, as known when the budget (from
    /// `arrived`) runs out; `None` when not asked (the check is off, or the
    /// desktop gets no sidecar, or was admitted before).
    async fn ask_namespace(
        &self,
        action: &decision::Action,
        namespace: Option<&str>,
        arrived: Instant,
    ) -> Option<InNamespace> {
        let namespaces = self.namespaces.as_ref()?;
        let namespace = namespace.filter(|n| !n.is_empty())?;
        if action.target.is_err() || action.want == Want::AlreadyDone {
            return None;
        }
        let deadline = arrived + self.budget.saturating_sub(ANSWER_MARGIN);
        Some(namespaces.holds(namespace, deadline.into()).await)
    }

    /// The registry's answer, unless the admission's budget (from `arrived`)
    /// runs out first: then the fail-open answer, and a lookup that has not
    /// started yet is never started.
    async fn ask_within_budget(
        &self,
        action: &decision::Action,
        arrived: Instant,
        dry_run: bool,
    ) -> Found {
        let deadline = arrived + self.budget.saturating_sub(ANSWER_MARGIN);
        let spent = || {
            self.metrics.registry_error(ErrorKind::Budget);
            Found::Failed(LookupError::new(
                ErrorKind::Budget,
                format!(
                    "the admission budget ({}) was spent",
                    humantime::format_duration(self.budget)
                ),
            ))
        };
        if Instant::now() >= deadline {
            return spent();
        }
        match tokio::time::timeout_at(
            deadline.into(),
            self.ask_registry(action, deadline, dry_run),
        )
        .await
        {
            Ok(found) => found,
            Err(_) => spent(),
        }
    }

    async fn ask_registry(
        &self,
        action: &decision::Action,
        deadline: Instant,
        dry_run: bool,
    ) -> Found {
        let Ok(target) = &action.target else {
            return Found::NotAsked;
        };
        let (tag, change, known_digest) = match &action.want {
            Want::Fresh | Want::AlreadyDone => return Found::NotAsked,
            Want::Pinned(pin) => (pin.clone(), None, None),
            Want::Newest => {
                let per_user = self.rules.layout == Layout::PerUser;
                let newest = match self.lookup.newest(target, per_user).await {
                    Ok(Some(s)) => s.tag,
                    other => return Found::from_newest(other),
                };
                let (tag, change, digest) = self
                    .on_new_base(action, target, newest, deadline, dry_run)
                    .await;
                if !self.pin_digest || matches!(change, Some(BaseChange::Fresh { .. })) {
                    return Found::Snapshot {
                        tag,
                        digest: None,
                        change,
                    };
                }
                (tag, change, digest)
            }
        };
        if let Some(d) = known_digest {
            return Found::Snapshot {
                tag,
                digest: Some(d),
                change,
            };
        }
        match self.lookup.digest(target, &tag).await {
            Ok(Some(d)) => Found::Snapshot {
                tag,
                digest: self.pin_digest.then_some(d),
                change,
            },
            Ok(None) => Found::Nothing,
            Err(e) => Found::Failed(e),
        }
    }

    /// The snapshot to restore when the newest is `newest`: itself, unless
    /// it sits on another base than the pod asks for; then `--on-new-base`
    /// says (keep it, rebase it, or start fresh), and a rebase that cannot
    /// be made keeps it. Returns the tag, what was done, and the digest of a
    /// rebased snapshot.
    async fn on_new_base(
        &self,
        action: &decision::Action,
        target: &Target,
        newest: String,
        deadline: Instant,
        dry_run: bool,
    ) -> (String, Option<BaseChange>, Option<String>) {
        let per_user = self.rules.layout == Layout::PerUser;
        let pod_image = action.original_image.as_str();
        // (snapshot tags are written once: a manifest read is cached for every later login)
        let (provenance, manifest) = match self.lookup.manifest(target, &newest).await {
            Ok(Some(m)) => (provenance_of(&m), Some(m)),
            Ok(None) => (None, None),
            Err(e) if self.on_new_base == OnNewBase::Rebase => {
                let from = newbase::moved_from(pod_image, target, &newest, None, per_user);
                let change = from.map(|from| BaseChange::NotRebased {
                    from,
                    why: format!("reading the snapshot's manifest: {e}"),
                });
                return (newest, change, None);
            }
            // keep and fresh go by what the tag says
            Err(_) => (None, None),
        };
        let Some(from) =
            newbase::moved_from(pod_image, target, &newest, provenance.as_ref(), per_user)
        else {
            return (newest, None, None);
        };
        let not_rebased = |why: String| BaseChange::NotRebased {
            from: from.clone(),
            why,
        };
        match self.on_new_base {
            OnNewBase::Keep => (newest, Some(BaseChange::Kept { from }), None),
            OnNewBase::Fresh => (
                newest.clone(),
                Some(BaseChange::Fresh {
                    from,
                    snapshot: newest,
                }),
                None,
            ),
            OnNewBase::Rebase => {
                let (Some(provenance), Some(manifest)) = (provenance, manifest) else {
                    let why = "the snapshot does not say where its user layers start (made before provenance annotations)";
                    return (newest, Some(not_rebased(why.into())), None);
                };
                if dry_run {
                    let why = "a dry run writes nothing: a real request would rebase";
                    return (newest, Some(not_rebased(why.into())), None);
                }
                let now = std::time::SystemTime::now();
                let job = rewrite::Job {
                    target: target.clone(),
                    snapshot_manifest: manifest,
                    first_user_layer: provenance.first_user_layer,
                    onto: pod_image.to_string(),
                    tag: tag::snapshot_tag(&target.tag_prefix, now),
                    created: humantime::format_rfc3339_seconds(now).to_string(),
                };
                let limit = deadline.checked_sub(KEEP_MARGIN).unwrap_or(deadline);
                match tokio::time::timeout_at(limit.into(), self.lookup.rebase(job)).await {
                    Ok(Ok(written)) => (
                        written.tag,
                        Some(BaseChange::Rebased {
                            from,
                            snapshot: newest,
                        }),
                        Some(written.digest),
                    ),
                    Ok(Err(e)) => (newest, Some(not_rebased(e.to_string())), None),
                    Err(_) => {
                        let why = "the rebase did not finish within the admission budget (it goes on: the next login restores it)";
                        (newest, Some(not_rebased(why.into())), None)
                    }
                }
            }
        }
    }

    fn log(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        action: &decision::Action,
        r: &Resolution,
        started: Instant,
    ) {
        let target = action
            .target
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|e| e.to_string());
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        // a generateName pod has no name yet at admission: it is logged by its generateName
        let generated = request
            .object
            .as_ref()
            .and_then(|o| o.metadata.generate_name.as_deref())
            .filter(|_| request.name.is_empty());
        let fields = (
            request.uid.as_str(),
            request.namespace.as_deref().unwrap_or(""),
            generated.unwrap_or(request.name.as_str()),
        );
        match r.outcome {
            Outcome::RegistryError | Outcome::Unmappable | Outcome::NoPullSecret => warn!(
                uid = fields.0, namespace = fields.1, pod = fields.2, generated_name = generated.is_some(), user = %action.user, target = %target,
                outcome = r.outcome.as_str(), reason = r.detail.as_deref().unwrap_or(""), warnings = ?r.warnings, elapsed_ms,
                dry_run = request.dry_run, "desktop admitted without restore"
            ),
            _ if r.detail.is_some() || !r.warnings.is_empty() => warn!(
                uid = fields.0, namespace = fields.1, pod = fields.2, generated_name = generated.is_some(), user = %action.user, target = %target,
                outcome = r.outcome.as_str(), image = r.image.as_deref().unwrap_or(""), elapsed_ms,
                new_base = r.base_change.as_ref().map(BaseChange::as_str).unwrap_or(""),
                reason = r.detail.as_deref().unwrap_or(""), warnings = ?r.warnings,
                dry_run = request.dry_run, "desktop admitted"
            ),
            _ => info!(
                uid = fields.0, namespace = fields.1, pod = fields.2, generated_name = generated.is_some(), user = %action.user, target = %target,
                outcome = r.outcome.as_str(), image = r.image.as_deref().unwrap_or(""), elapsed_ms,
                new_base = r.base_change.as_ref().map(BaseChange::as_str).unwrap_or(""),
                dry_run = request.dry_run, "desktop admitted"
            ),
        }
    }
}

/// The provenance a snapshot's manifest carries, if any.
fn provenance_of(manifest: &crate::registry::Document) -> Option<Provenance> {
    let m: serde_json::Value = serde_json::from_slice(&manifest.body).ok()?;
    let annotations = serde_json::from_value(m.get("annotations")?.clone()).ok()?;
    Provenance::read(&annotations)
}

fn pod_of(request: &AdmissionRequest<DynamicObject>) -> Result<Option<Pod>, serde_json::Error> {
    if request.kind.kind != "Pod" {
        return Ok(None);
    }
    request
        .object
        .as_ref()
        .map(|o| serde_json::to_value(o).and_then(serde_json::from_value))
        .transpose()
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response
            .warnings
            .get_or_insert_with(Vec::new)
            .extend(warnings);
    }
    response
}
