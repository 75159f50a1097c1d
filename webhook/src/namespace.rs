//! What a desktop's namespace holds of what a restore and a snapshot need (the
//! registry secret, the registry's CA configMap), from the Kubernetes API: a
//! `get` of that one name as metadata only (`PartialObjectMetadata`, never the
//! secret's data), cached per namespace. A thin adapter: the answer is a
//! [`Presence`], and [`crate::decision::given_namespace`] decides.

use crate::decision::{InNamespace, Needed, Presence};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use moka::{future::Cache, Expiry};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Longest wait for one API read (besides the admission's own deadline), so
/// that reads outliving their admission end, and an API that does not answer
/// (a policy dropping the packets) holds admissions up only that long before
/// its `Unknown` is cached like a missing object.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What the namespace check needs from the configuration.
pub struct Settings {
    /// The API server, reached without credentials; `None`: in-cluster, else kubeconfig.
    pub api_url: Option<String>,
    pub secret_name: String,
    pub ca_configmap: Option<String>,
    /// How long a `Present` answer is kept.
    pub present_ttl: Duration,
    /// How long a `Missing` or `Unknown` answer is kept.
    pub missing_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Object {
    RegistrySecret,
    RegistryCa,
}

impl Object {
    /// Metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Object::RegistrySecret => "registry_secret",
            Object::RegistryCa => "registry_ca",
        }
    }
}

/// Asks the API, through a per-namespace cache.
#[derive(Clone)]
pub struct Namespaces {
    client: kube::Client,
    secret_name: String,
    ca_configmap: Option<String>,
    cache: Cache<(Object, String), Presence>,
}

/// Keeps a present object for `present`, anything else for `missing`.
struct Ttl {
    present: Duration,
    missing: Duration,
}

impl Expiry<(Object, String), Presence> for Ttl {
    fn expire_after_create(
        &self,
        _key: &(Object, String),
        value: &Presence,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Presence::Present => self.present,
            Presence::Missing | Presence::Unknown(_) => self.missing,
        })
    }
}

impl Namespaces {
    pub async fn new(settings: Settings) -> Result<Self> {
        let mut config = match &settings.api_url {
            Some(url) => kube::Config::new(
                url.parse()
                    .with_context(|| format!("--kube-api-url {url:?} is not a URL"))?,
            ),
            None => kube::Config::infer().await.context(
                "no in-cluster service account and no kubeconfig to reach the Kubernetes API \
                 (set --kube-api-url, or --namespace-check=false)",
            )?,
        };
        config.connect_timeout = Some(READ_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.write_timeout = Some(READ_TIMEOUT);
        // the read timeout counts from the request, not from when its pooled
        // connection went idle
        config.reset_reader_on_write = true;
        let client = kube::Client::try_from(config).context("a Kubernetes API client")?;
        let cache = Cache::builder()
            .max_capacity(10_000)
            .expire_after(Ttl {
                present: settings.present_ttl,
                missing: settings.missing_ttl,
            })
            .build();
        Ok(Self {
            client,
            secret_name: settings.secret_name,
            ca_configmap: settings.ca_configmap,
            cache,
        })
    }

    /// What `namespace` holds, as known by `deadline`: an object the API has
    /// not answered for by then is `Unknown` (its read goes on and fills the
    /// cache for the next admission). Both reads run at once.
    pub async fn holds(&self, namespace: &str, deadline: tokio::time::Instant) -> InNamespace {
        let secret = self.presence(Object::RegistrySecret, namespace, deadline);
        let ca = async {
            match &self.ca_configmap {
                Some(name) => Some(Needed {
                    name: name.clone(),
                    presence: self.presence(Object::RegistryCa, namespace, deadline).await,
                }),
                None => None,
            }
        };
        let (secret, ca) = tokio::join!(secret, ca);
        InNamespace {
            namespace: namespace.to_string(),
            secret: Needed {
                name: self.secret_name.clone(),
                presence: secret,
            },
            ca,
        }
    }

    async fn presence(
        &self,
        object: Object,
        namespace: &str,
        deadline: tokio::time::Instant,
    ) -> Presence {
        let key = (object, namespace.to_string());
        if let Some(known) = self.cache.get(&key).await {
            return known;
        }
        // spawned: a read the admission stops waiting for still lands in the
        // cache; concurrent admissions of one namespace share one read
        let this = self.clone();
        let read = tokio::spawn(async move {
            let namespace = key.1.clone();
            this.cache
                .get_with(key, this.read(object, &namespace))
                .await
        });
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(presence)) => presence,
            Ok(Err(e)) => Presence::Unknown(format!("the read failed: {e}")),
            Err(_) => Presence::Unknown("no answer within the admission budget".into()),
        }
    }

    /// One `get` of the object's metadata.
    async fn read(&self, object: Object, namespace: &str) -> Presence {
        let name = match object {
            Object::RegistrySecret => self.secret_name.as_str(),
            Object::RegistryCa => self.ca_configmap.as_deref().unwrap_or_default(),
        };
        let got = async {
            match object {
                Object::RegistrySecret => Api::<Secret>::namespaced(self.client.clone(), namespace)
                    .get_metadata_opt(name)
                    .await
                    .map(|m| m.is_some()),
                Object::RegistryCa => Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
                    .get_metadata_opt(name)
                    .await
                    .map(|m| m.is_some()),
            }
        };
        let presence = match tokio::time::timeout(READ_TIMEOUT, got).await {
            Ok(Ok(true)) => Presence::Present,
            Ok(Ok(false)) => Presence::Missing,
            Ok(Err(e)) => {
                let why = match &e {
                    kube::Error::Api(status) => {
                        format!("the API answered {} {}", status.code, status.reason)
                    }
                    _ => "the API is unreachable".to_string(),
                };
                warn!(object = object.as_str(), namespace, name, error = %e, "cannot ask the Kubernetes API");
                Presence::Unknown(why)
            }
            Err(_) => {
                warn!(object = object.as_str(), namespace, name, timeout = ?READ_TIMEOUT, "the Kubernetes API did not answer");
                Presence::Unknown("the API did not answer".into())
            }
        };
        if presence == Presence::Missing {
            info!(
                object = object.as_str(),
                namespace, name, "missing in the namespace"
            );
        }
        presence
    }
}
