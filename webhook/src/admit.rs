//! One admission, top to bottom: request -> plan -> lookup -> resolution -> patch.

use crate::{
    decision::{self, Found, Outcome, Plan, Resolution, Rules, Want},
    lookup::{ErrorKind, Lookup, LookupError},
    metrics::Metrics,
    patch,
    sidecar::SidecarSpec,
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
}

/// Time kept at the end of the budget for the patch and the answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(20);

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
        let found = self.ask_within_budget(&action, arrived).await;
        let resolution = decision::resolve(&action, found);
        self.metrics.admission(resolution.outcome);
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
        with_warning(response, resolution.warning)
    }

    /// The registry's answer, unless the admission's budget (from `arrived`)
    /// runs out first: then the fail-open answer, and a lookup that has not
    /// started yet is never started.
    async fn ask_within_budget(&self, action: &decision::Action, arrived: Instant) -> Found {
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
        match tokio::time::timeout_at(deadline.into(), self.ask_registry(action)).await {
            Ok(found) => found,
            Err(_) => spent(),
        }
    }

    async fn ask_registry(&self, action: &decision::Action) -> Found {
        let Ok(target) = &action.target else {
            return Found::NotAsked;
        };
        let tag = match &action.want {
            Want::Fresh | Want::AlreadyDone => return Found::NotAsked,
            Want::Pinned(pin) => pin.clone(),
            Want::Newest => match self.lookup.newest(target).await {
                Ok(Some(s)) if self.pin_digest => s.tag,
                other => return Found::from_newest(other),
            },
        };
        match self.lookup.digest(target, &tag).await {
            Ok(Some(d)) => Found::Snapshot {
                tag,
                digest: self.pin_digest.then_some(d),
            },
            Ok(None) => Found::Nothing,
            Err(e) => Found::Failed(e),
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
            Outcome::RegistryError | Outcome::Unmappable => warn!(
                uid = fields.0, namespace = fields.1, pod = fields.2, generated_name = generated.is_some(), user = %action.user, target = %target,
                outcome = r.outcome.as_str(), reason = r.detail.as_deref().unwrap_or(""), elapsed_ms,
                dry_run = request.dry_run, "desktop admitted without restore"
            ),
            _ => info!(
                uid = fields.0, namespace = fields.1, pod = fields.2, generated_name = generated.is_some(), user = %action.user, target = %target,
                outcome = r.outcome.as_str(), image = r.image.as_deref().unwrap_or(""), elapsed_ms,
                dry_run = request.dry_run, "desktop admitted"
            ),
        }
    }
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

fn with_warning(mut response: AdmissionResponse, warning: Option<String>) -> AdmissionResponse {
    if let Some(w) = warning {
        response.warnings.get_or_insert_with(Vec::new).push(w);
    }
    response
}
