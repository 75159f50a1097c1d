//! What to do with an admission request: pure code, no I/O.
//!
//! request -> [`plan`] -> (lookup, done elsewhere) -> [`resolve`] -> patch.

pub use crate::outcome::Outcome;
use crate::{
    newbase::BaseChange,
    policy::Layout,
    registry::LookupError,
    tag::{self, Snapshot},
    target::{self, NoTarget, Target},
};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::Operation;
use std::time::Duration;

/// `"false"` here starts a fresh desktop (no restore); the sidecar is still injected.
pub const ANNOTATION_RESTORE: &str = "snapshot.abcdesktop.io/restore";
/// A tag of the same user to restore instead of the newest (rollback).
pub const ANNOTATION_PIN: &str = "snapshot.abcdesktop.io/pin";
/// `"true"` or `"false"`: snapshot this desktop when its pod is deleted, or
/// not; wins over `--snapshot-on-logoff`.
pub const ANNOTATION_ON_LOGOFF: &str = "snapshot.abcdesktop.io/on-logoff";
/// A duration (`30m`, `1h`): snapshot this desktop on a schedule, every this
/// long; `0` turns it off. Wins over `--snapshot-every`.
pub const ANNOTATION_EVERY: &str = "snapshot.abcdesktop.io/every";
/// Written by the webhook: what it did. Its presence makes a re-admission a no-op.
pub const ANNOTATION_STATUS: &str = "snapshot.abcdesktop.io/status";

/// The part of the configuration the decision needs.
#[derive(Debug, Clone)]
pub struct Rules {
    pub selector: Vec<(String, String)>,
    pub user_label: String,
    pub graphical_container: String,
    pub registry: String,
    pub layout: Layout,
    /// Snapshot desktops at logoff unless their pod says otherwise.
    pub on_logoff: bool,
    /// Snapshot desktops on a schedule, every this long (`None`: off),
    /// unless their pod says otherwise.
    pub every: Option<Duration>,
}

impl Rules {
    /// Parses a `key=value,key=value` selector.
    pub fn parse_selector(s: &str) -> Result<Vec<(String, String)>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("selector part {p:?} is not key=value"))
            })
            .collect()
    }
}

/// What the request asks of us before any registry lookup.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Not a desktop pod creation: allowed untouched.
    Ignore(&'static str),
    /// Refused, with the reason the requester sees.
    Deny(String),
    /// A desktop pod: restore (or not) and inject the sidecar.
    Act(Action),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub user: String,
    /// Index of the graphical container in `spec.containers`.
    pub container: usize,
    pub original_image: String,
    pub target: Result<Target, NoTarget>,
    pub want: Want,
    /// Snapshot this desktop when its pod is deleted.
    pub on_logoff: bool,
    /// Snapshot this desktop every this long.
    pub every: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    /// The newest snapshot: needs a lookup.
    Newest,
    /// This exact tag: needs an existence check.
    Pinned(String),
    /// Opted out: a fresh desktop.
    Fresh,
    /// Already admitted by us (status annotation present): change nothing.
    AlreadyDone,
}

/// Decides from the request alone.
pub fn plan(rules: &Rules, operation: &Operation, kind: &str, pod: Option<&Pod>) -> Plan {
    if *operation != Operation::Create {
        return Plan::Ignore("not a CREATE");
    }
    if kind != "Pod" {
        return Plan::Ignore("not a Pod");
    }
    let Some(pod) = pod else {
        return Plan::Ignore("no pod in the request");
    };
    let labels = pod.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if !rules
        .selector
        .iter()
        .all(|(k, v)| label(k) == Some(v.as_str()))
    {
        return Plan::Ignore("not a desktop pod (selector does not match)");
    }
    let Some(user) = label(&rules.user_label) else {
        return Plan::Ignore("desktop pod without a user label");
    };
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let Some((index, graphical)) = containers
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == rules.graphical_container)
    else {
        return Plan::Ignore("desktop pod without a graphical container");
    };
    let Some(image) = graphical.image.as_deref().filter(|i| !i.is_empty()) else {
        return Plan::Ignore("graphical container without an image");
    };
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(|v| v.trim());
    let target = target::derive(image, &rules.registry, rules.layout, user);

    let want = if annotation(ANNOTATION_STATUS).is_some() {
        Want::AlreadyDone
    } else if let Some(pin) = annotation(ANNOTATION_PIN).filter(|p| !p.is_empty()) {
        // A pin is checked against the user, whatever the registry says.
        match &target {
            Ok(t) if t.owns(pin) => Want::Pinned(pin.to_string()),
            Ok(t) => {
                return Plan::Deny(format!(
                    "annotation {ANNOTATION_PIN}={pin:?} is not a snapshot of user {user:?} (their tags are {}-<timestamp>)",
                    t.tag_prefix
                ))
            }
            Err(e) => return Plan::Deny(format!("annotation {ANNOTATION_PIN}={pin:?} cannot be honoured: {e}")),
        }
    } else if annotation(ANNOTATION_RESTORE).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        Want::Fresh
    } else {
        Want::Newest
    };
    let on_logoff = match annotation(ANNOTATION_ON_LOGOFF) {
        None => rules.on_logoff,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Plan::Deny(format!(
                "annotation {ANNOTATION_ON_LOGOFF}={v:?} must be \"true\" or \"false\""
            ))
        }
    };
    let every = match schedule(annotation(ANNOTATION_EVERY), rules.every) {
        Ok(every) => every,
        Err(why) => return Plan::Deny(why),
    };
    Plan::Act(Action {
        user: user.to_string(),
        container: index,
        original_image: image.to_string(),
        target,
        want,
        on_logoff,
        every,
    })
}

/// The schedule of a desktop: its pod's [`ANNOTATION_EVERY`] when it has one
/// (`0` is off), else the flag's; an annotation that is no duration is the
/// reason to refuse the pod.
pub fn schedule(
    annotation: Option<&str>,
    flag: Option<Duration>,
) -> Result<Option<Duration>, String> {
    let Some(v) = annotation else {
        return Ok(flag.filter(|d| !d.is_zero()));
    };
    humantime::parse_duration(v)
        .map(|d| Some(d).filter(|d| !d.is_zero()))
        .map_err(|e| {
            format!("annotation {ANNOTATION_EVERY}={v:?} must be a duration such as \"30m\" or \"0\" (off): {e}")
        })
}

/// What the registry said, for the wanted snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// No lookup was needed.
    NotAsked,
    /// The newest snapshot (or the pinned tag) and, when asked for, its
    /// digest; with what was done about a new base image, if anything.
    Snapshot {
        tag: String,
        digest: Option<String>,
        change: Option<BaseChange>,
    },
    /// The user has no snapshot (or the pinned tag does not exist).
    Nothing,
    Failed(LookupError),
}

impl Found {
    pub fn from_newest(r: Result<Option<Snapshot>, LookupError>) -> Self {
        match r {
            Ok(Some(s)) => Found::Snapshot {
                tag: s.tag,
                digest: None,
                change: None,
            },
            Ok(None) => Found::Nothing,
            Err(e) => Found::Failed(e),
        }
    }
}

/// The decision after the lookup: what the patch must do.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub outcome: Outcome,
    /// New image of the graphical container, when restoring.
    pub image: Option<String>,
    /// Value of the status annotation to write (None: leave it).
    pub status: Option<String>,
    /// The sidecar to inject, for this target.
    pub sidecar: Option<Target>,
    /// With the sidecar: snapshot the desktop when the pod is deleted.
    pub on_logoff: bool,
    /// With the sidecar: snapshot the desktop every this long.
    pub every: Option<Duration>,
    /// Shown to the requester (kubectl prints admission warnings), each short:
    /// kube-apiserver truncates one past 256 characters.
    pub warnings: Vec<String>,
    /// Set when the request must be refused.
    pub deny: Option<String>,
    /// Everything known about a failure, for the log (warnings stay short).
    pub detail: Option<String>,
    /// What was done about a new base image.
    pub base_change: Option<BaseChange>,
}

/// Combines the plan and the registry's answer.
pub fn resolve(action: &Action, found: Found) -> Resolution {
    let target = match &action.target {
        Ok(t) => t.clone(),
        Err(e) => {
            return Resolution {
                outcome: Outcome::Unmappable,
                image: None,
                status: (action.want != Want::AlreadyDone).then(|| format!("not restored: {e}")),
                sidecar: None,
                on_logoff: false,
                every: None,
                warnings: vec![format!(
                    "desktop-snapshot: no snapshot for this desktop: {e}"
                )],
                deny: None,
                detail: Some(e.to_string()),
                base_change: None,
            }
        }
    };
    let base = Resolution {
        outcome: Outcome::NoSnapshot,
        image: None,
        status: None,
        sidecar: Some(target.clone()),
        on_logoff: action.on_logoff,
        every: action.every,
        warnings: Vec::new(),
        deny: None,
        detail: None,
        base_change: None,
    };
    match (&action.want, found) {
        (Want::AlreadyDone, _) => Resolution { outcome: Outcome::AlreadyDone, ..base },
        (Want::Fresh, _) => Resolution {
            outcome: Outcome::OptedOut,
            status: Some(format!("fresh desktop ({ANNOTATION_RESTORE}=false)")),
            ..base
        },
        (Want::Pinned(pin), Found::Nothing) => Resolution {
            outcome: Outcome::Denied,
            deny: Some(format!("pinned snapshot {} does not exist", target.image(pin))),
            ..base
        },
        (_, Found::Snapshot { tag, change: Some(BaseChange::Fresh { from, snapshot }), .. }) => Resolution {
            outcome: Outcome::FreshBase,
            status: Some(format!(
                "fresh desktop on a new base image: snapshot {tag} (on {from}) kept for {ANNOTATION_PIN}"
            )),
            base_change: Some(BaseChange::Fresh { from, snapshot }),
            ..base
        },
        (want, Found::Snapshot { tag, digest, change }) => {
            let image = match digest {
                Some(d) => format!("{}@{d}", target.image(&tag)),
                None => target.image(&tag),
            };
            let pinned = matches!(want, Want::Pinned(_));
            let (outcome, status, warning) = match &change {
                _ if pinned => (Outcome::Pinned, format!("pinned {image}"), None),
                // (a fresh start was answered above)
                None | Some(BaseChange::Fresh { .. }) => {
                    (Outcome::Restored, format!("restored {image}"), None)
                }
                Some(BaseChange::Rebased { from, snapshot }) => (
                    Outcome::Rebased,
                    format!("rebased {snapshot} from {from} onto the pod's image: restored {image}"),
                    None,
                ),
                Some(BaseChange::Kept { from }) => (
                    Outcome::Restored,
                    format!("restored {image} on its base {from}"),
                    None,
                ),
                Some(BaseChange::NotRebased { from, .. }) => (
                    Outcome::Restored,
                    format!("restored {image} on its base {from}: not rebased"),
                    Some(format!(
                        "desktop-snapshot: the snapshot stays on its base image {from}: it could not be moved onto the pod's image"
                    )),
                ),
            };
            let detail = match &change {
                Some(BaseChange::NotRebased { why, .. }) => Some(why.clone()),
                _ => None,
            };
            Resolution {
                outcome,
                status: Some(status),
                image: Some(image),
                warnings: warning.into_iter().collect(),
                detail,
                base_change: change,
                ..base
            }
        }
        (_, Found::Nothing) => Resolution { status: Some("no snapshot yet".to_string()), ..base },
        (_, Found::Failed(e)) => Resolution {
            outcome: Outcome::RegistryError,
            status: Some(format!("not restored: {}", e.kind.words())),
            // kube-apiserver truncates warnings past 256 characters: the details go to the log.
            warnings: vec![format!(
                "desktop-snapshot: snapshot lookup failed ({}); the desktop starts from its original image",
                e.kind.words()
            )],
            detail: Some(e.to_string()),
            ..base
        },
        (_, Found::NotAsked) => Resolution {
            outcome: Outcome::RegistryError,
            status: Some("not restored: no lookup was made".to_string()),
            ..base
        },
    }
}

/// What the Kubernetes API says about an object a desktop needs in its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    Present,
    Missing,
    /// The API could not say (unreachable, refusing, too slow): why, in a few words.
    Unknown(String),
}

/// One object of the pod's namespace that a restore or a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub name: String,
    pub presence: Presence,
}

/// What the pod's namespace holds of what its desktop needs (`--namespace-check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InNamespace {
    pub namespace: String,
    /// The registry secret: the kubelet pulls a restored snapshot with it,
    /// the sidecar pushes with it.
    pub secret: Needed,
    /// The registry's CA configMap, which the sidecar trusts to push
    /// (`--sidecar-registry-ca-configmap`, when set).
    pub ca: Option<Needed>,
}

/// The resolution once the pod's namespace is known: a snapshot the kubelet
/// could not pull (no registry secret) is not restored, and what the sidecar
/// lacks to push is said. A pod not acted on (denied, unmappable, admitted
/// before) is left as it was.
pub fn given_namespace(mut r: Resolution, ns: &InNamespace) -> Resolution {
    if r.sidecar.is_none() || r.deny.is_some() || r.outcome == Outcome::AlreadyDone {
        return r;
    }
    let namespace = &ns.namespace;
    let secret = &ns.secret.name;
    match &ns.secret.presence {
        Presence::Present => {}
        Presence::Missing => {
            let missing = format!("the registry secret {secret} is missing in namespace {namespace}");
            match r.image.take() {
                Some(image) => {
                    r.outcome = Outcome::NoPullSecret;
                    r.status = Some(format!("not restored: {missing}"));
                    // what was said about the snapshot no longer holds: it is not restored
                    r.warnings = vec![format!(
                        "desktop-snapshot: not restored and no snapshots: {missing}"
                    )];
                    let before = r.detail.take().map(|d| format!(" ({d})")).unwrap_or_default();
                    r.detail = Some(format!(
                        "{missing}: the kubelet could not pull {image}{before}"
                    ));
                }
                None => r
                    .warnings
                    .push(format!("desktop-snapshot: no snapshots: {missing}")),
            }
        }
        Presence::Unknown(why) => r.warnings.push(format!(
            "desktop-snapshot: could not check the registry secret {secret} in namespace {namespace} ({why}); without it restores and snapshots fail"
        )),
    }
    if let Some(ca) = &ns.ca {
        let name = &ca.name;
        match &ca.presence {
            Presence::Present => {}
            Presence::Missing => r.warnings.push(format!(
                "desktop-snapshot: no snapshots: the registry CA configMap {name} is missing in namespace {namespace}"
            )),
            Presence::Unknown(why) => r.warnings.push(format!(
                "desktop-snapshot: could not check the registry CA configMap {name} in namespace {namespace} ({why}); without it snapshots fail"
            )),
        }
    }
    r
}

/// The snapshot tag `tag` as a [`Snapshot`], for a pinned tag that exists.
pub fn pinned_snapshot(target: &Target, pin: &str) -> Option<Snapshot> {
    tag::owned_by(pin, &target.tag_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ErrorKind;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            selector: Rules::parse_selector("type=x11server").unwrap(),
            user_label: "access_userid".into(),
            graphical_container: "x-graphical".into(),
            registry: "reg.example:5000".into(),
            layout: Layout::Shared,
            on_logoff: false,
            every: None,
        }
    }

    fn pod(labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "1000-1", "labels": labels, "annotations": annotations},
            "spec": {"containers": [
                {"name": "c-printer", "image": "abcdesktopio/oc.cupsd:4.1"},
                {"name": "x-graphical", "image": "abcdesktopio/oc.user:4.1"}
            ]}
        }))
        .unwrap()
    }

    fn desktop(annotations: serde_json::Value) -> Pod {
        pod(
            json!({"type": "x11server", "access_userid": "alice"}),
            annotations,
        )
    }

    #[test]
    fn snapshot_at_logoff_from_the_flag_and_the_annotation() {
        for (flag, annotation, want) in [
            (false, None, Some(false)),
            (true, None, Some(true)),
            (false, Some("true"), Some(true)),
            (true, Some("false"), Some(false)),
            (true, Some(" TRUE "), Some(true)),
            (true, Some("yes"), None),
        ] {
            let r = Rules {
                on_logoff: flag,
                ..rules()
            };
            let pod = desktop(match annotation {
                Some(v) => json!({ ANNOTATION_ON_LOGOFF: v }),
                None => json!({}),
            });
            let got = match plan(&r, &Operation::Create, "Pod", Some(&pod)) {
                Plan::Act(a) => Some(a.on_logoff),
                Plan::Deny(why) => {
                    assert!(why.contains(ANNOTATION_ON_LOGOFF), "{why}");
                    None
                }
                Plan::Ignore(why) => panic!("ignored: {why}"),
            };
            assert_eq!(got, want, "flag {flag}, annotation {annotation:?}");
        }
    }

    #[test]
    fn snapshots_on_a_schedule_from_the_flag_and_the_annotation() {
        let m = |n: u64| Some(Duration::from_secs(60 * n));
        // (flag, annotation, schedule; None: refused)
        for (flag, annotation, want) in [
            (None, None, Some(None)),
            (Some(Duration::ZERO), None, Some(None)),
            (m(30), None, Some(m(30))),
            (None, Some("15m"), Some(m(15))),
            (m(30), Some(" 1h "), Some(m(60))),
            (m(30), Some("1h 30m"), Some(m(90))),
            (m(30), Some("0"), Some(None)),
            (m(30), Some("0s"), Some(None)),
            (None, Some("30"), None),
            (m(30), Some("often"), None),
            (m(30), Some("-5m"), None),
            (m(30), Some(""), None),
        ] {
            let r = Rules {
                every: flag,
                ..rules()
            };
            let pod = desktop(match annotation {
                Some(v) => json!({ ANNOTATION_EVERY: v }),
                None => json!({}),
            });
            let got = match plan(&r, &Operation::Create, "Pod", Some(&pod)) {
                Plan::Act(a) => {
                    // carried into the resolution, which the patch reads
                    assert_eq!(resolve(&a, Found::Nothing).every, a.every);
                    Some(a.every)
                }
                Plan::Deny(why) => {
                    assert!(why.contains(ANNOTATION_EVERY), "{why}");
                    None
                }
                Plan::Ignore(why) => panic!("ignored: {why}"),
            };
            assert_eq!(got, want, "flag {flag:?}, annotation {annotation:?}");
        }
    }

    #[test]
    fn plan_table() {
        let r = rules();
        let create = Operation::Create;
        let cases: Vec<(&str, Operation, &str, Option<Pod>, &str)> = vec![
            (
                "update",
                Operation::Update,
                "Pod",
                Some(desktop(json!({}))),
                "ignore",
            ),
            ("delete", Operation::Delete, "Pod", None, "ignore"),
            ("other kind", create.clone(), "Deployment", None, "ignore"),
            (
                "no label",
                create.clone(),
                "Pod",
                Some(pod(json!({"access_userid": "alice"}), json!({}))),
                "ignore",
            ),
            (
                "wrong label",
                create.clone(),
                "Pod",
                Some(pod(
                    json!({"type": "x11", "access_userid": "alice"}),
                    json!({}),
                )),
                "ignore",
            ),
            (
                "no user",
                create.clone(),
                "Pod",
                Some(pod(json!({"type": "x11server"}), json!({}))),
                "ignore",
            ),
            (
                "newest",
                create.clone(),
                "Pod",
                Some(desktop(json!({}))),
                "newest",
            ),
            (
                "opt-out",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_RESTORE: "false"}))),
                "fresh",
            ),
            (
                "restore true",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_RESTORE: "true"}))),
                "newest",
            ),
            (
                "pin own",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_PIN: "alice-12"}))),
                "pinned",
            ),
            (
                "pin other",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_PIN: "bob-12"}))),
                "deny",
            ),
            (
                "pin look-alike",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_PIN: "alice-1-12"}))),
                "deny",
            ),
            (
                "pin not a snapshot",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_PIN: "latest"}))),
                "deny",
            ),
            (
                "already",
                create.clone(),
                "Pod",
                Some(desktop(json!({ANNOTATION_STATUS: "restored x"}))),
                "already",
            ),
        ];
        for (name, op, kind, pod, want) in cases {
            let got = match plan(&r, &op, kind, pod.as_ref()) {
                Plan::Ignore(_) => "ignore",
                Plan::Deny(_) => "deny",
                Plan::Act(a) => {
                    assert_eq!(a.container, 1, "{name}");
                    match a.want {
                        Want::Newest => "newest",
                        Want::Pinned(_) => "pinned",
                        Want::Fresh => "fresh",
                        Want::AlreadyDone => "already",
                    }
                }
            };
            assert_eq!(got, want, "{name}");
        }
    }

    fn action(want: Want) -> Action {
        match plan(
            &rules(),
            &Operation::Create,
            "Pod",
            Some(&desktop(json!({}))),
        ) {
            Plan::Act(a) => Action { want, ..a },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resolve_table() {
        let err = LookupError::new(ErrorKind::Timeout, "no answer within 1s");
        let snap = |t: &str| Found::Snapshot {
            tag: t.into(),
            digest: None,
            change: None,
        };
        let cases: Vec<(Want, Found, Outcome, Option<&str>, bool)> = vec![
            (
                Want::Newest,
                snap("alice-5"),
                Outcome::Restored,
                Some("reg.example:5000/abcdesktopio/oc.user:alice-5"),
                false,
            ),
            (
                Want::Newest,
                Found::Snapshot {
                    tag: "alice-5".into(),
                    digest: Some("sha256:ab".into()),
                    change: None,
                },
                Outcome::Restored,
                Some("reg.example:5000/abcdesktopio/oc.user:alice-5@sha256:ab"),
                false,
            ),
            (
                Want::Newest,
                Found::Nothing,
                Outcome::NoSnapshot,
                None,
                false,
            ),
            (
                Want::Newest,
                Found::Failed(err.clone()),
                Outcome::RegistryError,
                None,
                false,
            ),
            (
                Want::Pinned("alice-3".into()),
                snap("alice-3"),
                Outcome::Pinned,
                Some("reg.example:5000/abcdesktopio/oc.user:alice-3"),
                false,
            ),
            (
                Want::Pinned("alice-3".into()),
                Found::Nothing,
                Outcome::Denied,
                None,
                true,
            ),
            (
                Want::Pinned("alice-3".into()),
                Found::Failed(err),
                Outcome::RegistryError,
                None,
                false,
            ),
            (Want::Fresh, Found::NotAsked, Outcome::OptedOut, None, false),
            (
                Want::AlreadyDone,
                Found::NotAsked,
                Outcome::AlreadyDone,
                None,
                false,
            ),
        ];
        for (want, found, outcome, image, denied) in cases {
            let r = resolve(&action(want.clone()), found.clone());
            assert_eq!(r.outcome, outcome, "{want:?} {found:?}");
            assert_eq!(r.image.as_deref(), image, "{want:?} {found:?}");
            assert_eq!(r.deny.is_some(), denied, "{want:?} {found:?}");
            assert!(
                r.sidecar.is_some(),
                "the sidecar is always injected for a mappable user"
            );
            assert_eq!(
                !r.warnings.is_empty(),
                outcome == Outcome::RegistryError,
                "{want:?}"
            );
            assert_eq!(
                r.status.is_none(),
                outcome == Outcome::AlreadyDone || denied,
                "{want:?}"
            );
        }
    }

    #[test]
    fn a_new_base_is_said_in_the_status_and_a_failed_rebase_warns() {
        let from = "reg.example:5000/abcdesktopio/oc.user:4.1".to_string();
        let with = |tag: &str, change: BaseChange| Found::Snapshot {
            tag: tag.into(),
            digest: None,
            change: Some(change),
        };
        // (found, outcome, restored tag, status contains, warns)
        let cases = [
            (
                with(
                    "alice-9",
                    BaseChange::Rebased {
                        from: from.clone(),
                        snapshot: "alice-5".into(),
                    },
                ),
                Outcome::Rebased,
                Some("alice-9"),
                "rebased alice-5 from",
                false,
            ),
            (
                with("alice-5", BaseChange::Kept { from: from.clone() }),
                Outcome::Restored,
                Some("alice-5"),
                "on its base reg.example:5000/abcdesktopio/oc.user:4.1",
                false,
            ),
            (
                with(
                    "alice-5",
                    BaseChange::NotRebased {
                        from: from.clone(),
                        why: "registry unauthorized".into(),
                    },
                ),
                Outcome::Restored,
                Some("alice-5"),
                "not rebased",
                true,
            ),
            (
                with(
                    "alice-5",
                    BaseChange::Fresh {
                        from: from.clone(),
                        snapshot: "alice-5".into(),
                    },
                ),
                Outcome::FreshBase,
                None,
                "fresh desktop on a new base image: snapshot alice-5",
                false,
            ),
        ];
        for (found, outcome, tag, status, warns) in cases {
            let r = resolve(&action(Want::Newest), found.clone());
            assert_eq!(r.outcome, outcome, "{found:?}");
            assert_eq!(
                r.image,
                tag.map(|t| format!("reg.example:5000/abcdesktopio/oc.user:{t}")),
                "{found:?}"
            );
            assert!(
                r.status.as_deref().unwrap_or("").contains(status),
                "{:?}",
                r.status
            );
            assert_eq!(!r.warnings.is_empty(), warns, "{found:?}");
            assert_eq!(r.detail.is_some(), warns, "the reason goes to the log");
            assert!(r.base_change.is_some() && r.sidecar.is_some());
        }
    }

    #[test]
    fn unmappable_user_gets_no_sidecar() {
        let p = pod(
            json!({"type": "x11server", "access_userid": "x".repeat(300)}),
            json!({}),
        );
        let Plan::Act(a) = plan(&rules(), &Operation::Create, "Pod", Some(&p)) else {
            panic!()
        };
        let r = resolve(&a, Found::NotAsked);
        assert_eq!(r.outcome, Outcome::Unmappable);
        assert!(r.sidecar.is_none() && r.image.is_none() && !r.warnings.is_empty());
    }

    #[test]
    fn what_the_namespace_lacks() {
        use Presence::{Missing, Present};
        let unknown = || Presence::Unknown("the API answered 403 Forbidden".into());
        let snap = || Found::Snapshot {
            tag: "alice-5".into(),
            digest: None,
            change: None,
        };
        let not_rebased = || Found::Snapshot {
            tag: "alice-5".into(),
            digest: None,
            change: Some(BaseChange::NotRebased {
                from: "reg.example:5000/abcdesktopio/oc.user:4.0".into(),
                why: "unauthorized".into(),
            }),
        };
        let failed = || Found::Failed(LookupError::new(ErrorKind::Timeout, "no answer"));
        let unmappable = || {
            let p = pod(
                json!({"type": "x11server", "access_userid": "x".repeat(300)}),
                json!({}),
            );
            match plan(&rules(), &Operation::Create, "Pod", Some(&p)) {
                Plan::Act(a) => a,
                other => panic!("{other:?}"),
            }
        };
        let restored = "reg.example:5000/abcdesktopio/oc.user:alice-5";
        let no_secret = "the registry secret reg-secret is missing in namespace desktops";
        // (what, action, found, secret, CA configMap, outcome, image restored,
        //  status contains, the warnings contain, in order)
        type Case = (
            &'static str,
            Action,
            Found,
            Presence,
            Option<Presence>,
            Outcome,
            bool,
            &'static str,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("all there", action(Want::Newest), snap(), Present, Some(Present), Outcome::Restored, true, "restored", vec![]),
            ("no CA configured", action(Want::Newest), snap(), Present, None, Outcome::Restored, true, "restored", vec![]),
            ("no secret: not restored", action(Want::Newest), snap(), Missing, None, Outcome::NoPullSecret, false,
             "not restored: the registry secret reg-secret is missing", vec!["not restored and no snapshots: the registry secret reg-secret is missing in namespace desktops"]),
            ("no secret, pinned", action(Want::Pinned("alice-5".into())), snap(), Missing, None, Outcome::NoPullSecret, false,
             "not restored", vec!["not restored and no snapshots"]),
            ("no secret: what was said of the snapshot goes", action(Want::Newest), not_rebased(), Missing, None, Outcome::NoPullSecret, false,
             "not restored", vec!["not restored and no snapshots"]),
            ("no secret, no snapshot yet", action(Want::Newest), Found::Nothing, Missing, None, Outcome::NoSnapshot, false,
             "no snapshot yet", vec!["no snapshots: the registry secret reg-secret"]),
            ("no secret, fresh", action(Want::Fresh), Found::NotAsked, Missing, None, Outcome::OptedOut, false,
             "fresh desktop", vec!["no snapshots"]),
            ("no secret, lookup failed", action(Want::Newest), failed(), Missing, None, Outcome::RegistryError, false,
             "not restored: ", vec!["snapshot lookup failed", "no snapshots"]),
            ("API refusing: restored anyway", action(Want::Newest), snap(), unknown(), None, Outcome::Restored, true,
             "restored", vec!["could not check the registry secret reg-secret in namespace desktops (the API answered 403 Forbidden)"]),
            ("no CA configMap: restored, no snapshots", action(Want::Newest), snap(), Present, Some(Missing), Outcome::Restored, true,
             "restored", vec!["no snapshots: the registry CA configMap reg-ca is missing in namespace desktops"]),
            ("CA configMap unknown", action(Want::Newest), snap(), Present, Some(unknown()), Outcome::Restored, true,
             "restored", vec!["could not check the registry CA configMap reg-ca"]),
            ("neither", action(Want::Newest), snap(), Missing, Some(Missing), Outcome::NoPullSecret, false,
             "not restored", vec![no_secret, "CA configMap reg-ca is missing"]),
            ("admitted before: left alone", action(Want::AlreadyDone), Found::NotAsked, Missing, Some(Missing), Outcome::AlreadyDone, false,
             "", vec![]),
            ("pin refused: left alone", action(Want::Pinned("alice-5".into())), Found::Nothing, Missing, None, Outcome::Denied, false,
             "", vec![]),
            ("unmappable: left alone", unmappable(), Found::NotAsked, Missing, None, Outcome::Unmappable, false,
             "not restored: the user id", vec!["no snapshot for this desktop"]),
        ];
        for (what, action, found, secret, ca, outcome, image, status, warnings) in cases {
            let ns = InNamespace {
                namespace: "desktops".into(),
                secret: Needed {
                    name: "reg-secret".into(),
                    presence: secret,
                },
                ca: ca.map(|presence| Needed {
                    name: "reg-ca".into(),
                    presence,
                }),
            };
            let before = resolve(&action, found);
            let r = given_namespace(before.clone(), &ns);
            assert_eq!(r.outcome, outcome, "{what}");
            assert_eq!(r.image.as_deref(), image.then_some(restored), "{what}");
            assert!(
                r.status.as_deref().unwrap_or("").contains(status),
                "{what}: {:?}",
                r.status
            );
            assert_eq!(r.warnings.len(), warnings.len(), "{what}: {:?}", r.warnings);
            for (got, want) in r.warnings.iter().zip(&warnings) {
                assert!(got.contains(want), "{what}: {got:?} lacks {want:?}");
                assert!(
                    got.len() <= 256,
                    "{what}: kube-apiserver would truncate {got:?}"
                );
            }
            // the sidecar stays: it snapshots once the objects are there
            assert_eq!(r.sidecar, before.sidecar, "{what}");
            assert_eq!(r.deny, before.deny, "{what}");
            if outcome == Outcome::NoPullSecret {
                assert!(
                    r.detail.as_deref().is_some_and(|d| d.contains(restored)),
                    "{what}: {:?}",
                    r.detail
                );
            }
        }
    }
}
