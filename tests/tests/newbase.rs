//! `--on-new-base`: a login whose pod asks for another base image than the
//! one its user's newest snapshot sits on. The real webhook binary against
//! the real registry, in both layouts: `rebase` writes the user's layers on
//! the new base (config and manifest only), `keep` restores the snapshot on
//! its old base, `fresh` starts from the new base; a rebase that cannot be
//! made keeps the snapshot, with a warning, a log line and a metric.

use harness::{
    admission::{self, apply, as_pod, desktop_pod, image_of, review, warnings},
    registry::{layer, Registry},
    webhook::Webhook,
};
use serde_json::{json, Value};

const REPO: &str = "abcdesktopio/oc.user.test";
const STATUS: &str = "snapshot.abcdesktop.io/status";

struct World {
    registry: Registry,
    webhook: Webhook,
    per_user: bool,
    /// Layers of the base images `:4.1` and `:4.2`, and of the user's snapshot.
    old_base: Vec<(Vec<u8>, String)>,
    new_base: Vec<(Vec<u8>, String)>,
    user_layers: Vec<(Vec<u8>, String)>,
}

impl World {
    /// A registry holding the bases `REPO:4.1` (one layer) and `REPO:4.2`
    /// (two), alice's snapshot on 4.1, and a webhook with `flags`.
    async fn new(per_user: bool, flags: &[&str]) -> Self {
        let registry = Registry::start().await;
        let mut all = vec!["--on-new-base"];
        all.extend(flags);
        if per_user {
            all.extend(["--layout", "per-user"]);
        }
        let webhook = Webhook::for_registry(&registry, &all).await;
        let old_base = vec![layer("etc/base", "4.1")];
        let new_base = vec![layer("etc/base", "4.2"), layer("etc/extra", "4.2")];
        let user_layers = vec![
            layer("root/.bashrc", "alice 1"),
            layer("root/notes", "alice 2"),
        ];
        registry.push_image(REPO, "4.1", &old_base, json!({})).await;
        registry.push_image(REPO, "4.2", &new_base, json!({})).await;
        Self {
            registry,
            webhook,
            per_user,
            old_base,
            new_base,
            user_layers,
        }
    }

    fn base(&self, tag: &str) -> String {
        format!("{}/{REPO}:{tag}", self.registry.host)
    }

    /// alice's repository in this layout, and her tag prefix under `base_tag`.
    fn repo(&self) -> String {
        if self.per_user {
            format!("alice/{REPO}")
        } else {
            REPO.to_string()
        }
    }

    fn tag(&self, base_tag: &str, n: u64) -> String {
        if self.per_user {
            format!("{base_tag}-{n}")
        } else {
            format!("alice-{n}")
        }
    }

    /// alice's snapshot on 4.1, with provenance (or without: a legacy one).
    async fn snapshot_on_old_base(&self, provenance: bool) -> String {
        let tag = self.tag("4.1", 100);
        let annotations = if provenance {
            json!({
                "org.opencontainers.image.base.name": self.base("4.1"),
                "io.abcdesktop.snapshot.first-user-layer": "1",
                "io.abcdesktop.snapshot.user": "alice",
                "io.abcdesktop.snapshot.tag": tag,
            })
        } else {
            json!({})
        };
        let mut layers = self.old_base.clone();
        layers.extend(self.user_layers.iter().cloned());
        self.registry
            .push_image(&self.repo(), &tag, &layers, annotations)
            .await;
        tag
    }

    /// alice logs in with the graphical image `image`: the answer and the pod.
    async fn login(&self, image: &str, dry_run: bool) -> (Value, Value) {
        let pod = desktop_pod("alice", image);
        let answer = self.webhook.admit(&review(&pod, "CREATE", dry_run)).await;
        assert_eq!(
            admission::response(&answer)["allowed"],
            json!(true),
            "{answer}\n{}",
            self.webhook.log()
        );
        let patched = apply(&pod, &answer);
        (answer, patched)
    }

    async fn new_base_metric(&self, action: &str) -> f64 {
        self.webhook
            .metric(&format!(
                "snapshot_webhook_new_base_total{{action=\"{action}\"}}"
            ))
            .await
    }
}

fn graphical(pod: &Value) -> String {
    image_of(&as_pod(pod), "x-graphical").expect("a graphical image")
}

fn status(pod: &Value) -> String {
    pod["metadata"]["annotations"][STATUS]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn digests(layers: &[(Vec<u8>, String)]) -> Vec<String> {
    layers
        .iter()
        .map(|(b, _)| harness::oci::sha256(b))
        .collect()
}

#[tokio::test]
async fn rebase_moves_the_user_layers_onto_the_new_base_in_both_layouts() {
    for per_user in [false, true] {
        let w = World::new(per_user, &["rebase"]).await;
        let old = w.snapshot_on_old_base(true).await;
        let (answer, pod) = w.login(&w.base("4.2"), false).await;
        let image = graphical(&pod);
        let prefix = format!(
            "{}/{}:{}-",
            w.registry.host,
            w.repo(),
            w.tag("4.2", 0).trim_end_matches("-0")
        );
        assert!(
            image.starts_with(&prefix) && !image.ends_with(&old),
            "per_user={per_user}: {image}\n{}",
            w.webhook.log()
        );
        assert!(
            status(&pod).starts_with(&format!("rebased {old} from {}", w.base("4.1"))),
            "{}",
            status(&pod)
        );
        assert!(warnings(&answer).is_empty(), "{:?}", warnings(&answer));
        let new_tag = image.rsplit(':').next().unwrap().to_string();

        let (manifest, config) = w.registry.manifest_and_config(&w.repo(), &new_tag).await;
        let layers: Vec<String> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        let mut want = digests(&w.new_base);
        want.extend(digests(&w.user_layers));
        assert_eq!(
            layers, want,
            "the new base's layers, then the user's, byte for byte"
        );
        let diff_ids: Vec<&str> = w
            .new_base
            .iter()
            .chain(&w.user_layers)
            .map(|l| l.1.as_str())
            .collect();
        assert_eq!(config["rootfs"]["diff_ids"], json!(diff_ids));
        assert_eq!(
            config["config"]["Env"],
            json!(["PATH=/bin", format!("IMAGE={REPO}:4.2")]),
            "the new base's config"
        );
        assert_eq!(config["history"].as_array().unwrap().len(), 4);
        let a = &manifest["annotations"];
        assert_eq!(
            a["org.opencontainers.image.base.name"],
            json!(w.base("4.2"))
        );
        assert_eq!(a["io.abcdesktop.snapshot.first-user-layer"], "2");
        assert_eq!(a["io.abcdesktop.snapshot.user"], "alice");
        assert_eq!(a["io.abcdesktop.snapshot.tag"], json!(new_tag));
        assert!(a["org.opencontainers.image.base.digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
        // the old snapshot stays, for a pin
        let tags = w.registry.tags(&w.repo()).await;
        assert!(tags.contains(&old) && tags.contains(&new_tag), "{tags:?}");
        assert_eq!(w.new_base_metric("rebased").await, 1.0);

        // the next login restores the rebased snapshot as it is
        let (_, pod) = w.login(&w.base("4.2"), false).await;
        assert_eq!(graphical(&pod), image);
        assert!(status(&pod).starts_with("restored "), "{}", status(&pod));
        assert_eq!(
            w.registry.tags(&w.repo()).await.len(),
            tags.len(),
            "no second rebase"
        );
        assert_eq!(w.new_base_metric("rebased").await, 1.0);
    }
}

#[tokio::test]
async fn keep_and_fresh_in_both_layouts() {
    for per_user in [false, true] {
        for policy in ["keep", "fresh"] {
            let w = World::new(per_user, &[policy]).await;
            let old = w.snapshot_on_old_base(true).await;
            let before = w.registry.tags(&w.repo()).await;
            let (answer, pod) = w.login(&w.base("4.2"), false).await;
            assert!(warnings(&answer).is_empty(), "{:?}", warnings(&answer));
            match policy {
                "keep" => {
                    assert_eq!(
                        graphical(&pod),
                        format!("{}/{}:{old}", w.registry.host, w.repo())
                    );
                    let want = format!("on its base {}", w.base("4.1"));
                    assert!(status(&pod).contains(&want), "{}", status(&pod));
                    assert_eq!(w.new_base_metric("kept").await, 1.0);
                }
                _ => {
                    assert_eq!(
                        graphical(&pod),
                        w.base("4.2"),
                        "a fresh desktop on the new base"
                    );
                    assert!(
                        status(&pod).starts_with(&format!(
                            "fresh desktop on a new base image: snapshot {old}"
                        )),
                        "{}",
                        status(&pod)
                    );
                    assert_eq!(w.new_base_metric("fresh").await, 1.0);
                }
            }
            assert_eq!(
                w.registry.tags(&w.repo()).await,
                before,
                "{policy}: nothing written"
            );
            // on the same base, every policy restores as always
            let (_, pod) = w.login(&w.base("4.1"), false).await;
            assert_eq!(
                graphical(&pod),
                format!("{}/{}:{old}", w.registry.host, w.repo()),
                "{policy} per_user={per_user}"
            );
            assert!(status(&pod).starts_with("restored "), "{}", status(&pod));
        }
    }
}

#[tokio::test]
async fn a_rebase_that_cannot_be_made_keeps_the_snapshot_with_a_warning() {
    let w = World::new(false, &["rebase"]).await;
    let old = w.snapshot_on_old_base(true).await;
    let restored_old = format!("{}/{}:{old}", w.registry.host, w.repo());
    let before = w.registry.tags(&w.repo()).await;
    let cases = [
        // a dry run writes nothing
        (w.base("4.2"), true, "dry run"),
        // the new base is not in the snapshot registry: nothing to mount from
        (
            format!("docker.io/{REPO}:4.2"),
            false,
            "not in the snapshot registry",
        ),
        // the new base does not exist
        (w.base("9.9"), false, "does not exist"),
    ];
    for (n, (image, dry_run, why)) in cases.iter().enumerate() {
        let (answer, pod) = w.login(image, *dry_run).await;
        assert_eq!(graphical(&pod), restored_old, "{why}");
        assert!(
            status(&pod).ends_with("not rebased"),
            "{why}: {}",
            status(&pod)
        );
        assert!(
            warnings(&answer)
                .iter()
                .any(|w| w.contains("could not be moved onto the pod's image")),
            "{why}: {:?}",
            warnings(&answer)
        );
        assert!(
            w.webhook.log().contains(why),
            "{why}: the log says why:\n{}",
            w.webhook.log()
        );
        assert_eq!(w.new_base_metric("not_rebased").await, (n + 1) as f64);
    }
    assert_eq!(w.registry.tags(&w.repo()).await, before, "no tag written");
}

#[tokio::test]
async fn a_snapshot_without_provenance_is_kept_on_its_base_tag_in_the_per_user_layout() {
    let w = World::new(true, &["rebase"]).await;
    let old = w.snapshot_on_old_base(false).await;
    let (answer, pod) = w.login(&w.base("4.2"), false).await;
    // before --on-new-base, this user got a fresh desktop: the snapshot was under another base tag
    assert_eq!(
        graphical(&pod),
        format!("{}/{}:{old}", w.registry.host, w.repo())
    );
    assert!(
        status(&pod).contains(&format!("on its base {}", w.base("4.1"))),
        "{}",
        status(&pod)
    );
    assert_eq!(warnings(&answer).len(), 1, "{:?}", warnings(&answer));
    assert!(w
        .webhook
        .log()
        .contains("made before provenance annotations"));
    // the sidecar pushes the next snapshots under the pod's base tag
    let sidecar = as_pod(&pod)
        .spec
        .unwrap()
        .containers
        .into_iter()
        .find(|c| c.name == "t-snapshot")
        .unwrap();
    let prefix = sidecar
        .env
        .unwrap()
        .into_iter()
        .find(|e| e.name == "SNAPSHOT_TAG_PREFIX")
        .unwrap()
        .value;
    assert_eq!(prefix.as_deref(), Some("4.2"));
}
