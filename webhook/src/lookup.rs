//! The newest snapshot of a target, asked of the registry within a deadline,
//! with concurrent lookups for the same target sharing one request.
//!
//! Freshness rule: every admission is answered from a registry request that
//! was in flight, or started, when the admission arrived; an answer is never
//! reused once its request has completed. So a snapshot whose push finished
//! before the lookup started is always seen while the registry answers, and a
//! user never gets an older snapshot than the one pushed before logging in.
//! The moka caches hold the in-flight lookups (coalescing) and the digests of
//! snapshot tags, which are written once and never moved.
//!
//! At most `max_in_flight` requests are at the registry at once: a lookup
//! waits for its turn within its deadline and, past it, fails open without
//! having sent anything. A registry slower than the deadline is not buried
//! under requests that nobody will wait for (it finishes a request whose
//! client has gone), and recovers once the load drops.

pub use crate::registry::{ErrorKind, LookupError};
use crate::{
    metrics::Metrics,
    registry::{Document, Registry},
    rewrite,
    tag::{self, Snapshot},
    target::Target,
};
use std::{sync::Arc, time::Duration};
use tokio::time::{timeout, Instant};

type Shared<T> = Arc<Result<T, LookupError>>;

pub struct Lookup {
    registry: Arc<Registry>,
    deadline: Duration,
    in_flight: moka::future::Cache<Target, Shared<Option<Vec<String>>>>,
    /// Snapshot manifests by image reference: snapshot tags are written once.
    manifests: moka::future::Cache<String, Document>,
    digests: moka::future::Cache<String, String>,
    metrics: Arc<Metrics>,
    turns: Arc<tokio::sync::Semaphore>,
}

/// How long a request keeps its turn at the registry after its admission
/// has stopped waiting for it (a registry that never answers).
const REGISTRY_ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// Runs `request` in its turn among the requests at the registry. The request
/// is its own task, holding its turn until the registry answers (or
/// [`REGISTRY_ANSWER_LIMIT`]): an admission that stops waiting does not
/// hand its turn to the next while the registry still works on its request.
async fn at_the_registry<T: Send + 'static>(
    turns: Arc<tokio::sync::Semaphore>,
    request: impl std::future::Future<Output = Result<T, LookupError>> + Send + 'static,
) -> Result<T, LookupError> {
    let turn = turns
        .acquire_owned()
        .await
        .map_err(|e| LookupError::new(ErrorKind::Other, e.to_string()))?;
    let task = tokio::spawn(async move {
        let answer = timeout(REGISTRY_ANSWER_LIMIT, request).await;
        drop(turn);
        answer.unwrap_or_else(|_| {
            Err(LookupError::new(
                ErrorKind::Timeout,
                format!(
                    "no answer within {}",
                    humantime::format_duration(REGISTRY_ANSWER_LIMIT)
                ),
            ))
        })
    });
    task.await.unwrap_or_else(|e| {
        Err(LookupError::new(
            ErrorKind::Other,
            format!("lookup task: {e}"),
        ))
    })
}

impl Lookup {
    pub fn new(
        registry: Arc<Registry>,
        deadline: Duration,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            turns: Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1))),
            registry,
            deadline,
            in_flight: moka::future::Cache::builder().max_capacity(100_000).build(),
            manifests: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            digests: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            metrics,
        }
    }

    /// Touches the caches once, so their clocks are set up before the first admission
    /// rather than during it (it takes a noticeable fraction of the deadline).
    pub async fn warm_up(&self) {
        let probe = Target {
            registry: String::new(),
            path: String::new(),
            tag_prefix: String::new(),
        };
        let _ = self.in_flight.get(&probe).await;
        let _ = self.digests.get("").await;
        self.registry.warm_up().await;
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The newest snapshot of `target`, or why the registry could not say;
    /// with `any_prefix`, the newest in its repository whatever its prefix
    /// (the per-user layout: the user's snapshots under any base tag).
    pub async fn newest(
        &self,
        target: &Target,
        any_prefix: bool,
    ) -> Result<Option<Snapshot>, LookupError> {
        let started = Instant::now();
        let result = timeout(self.deadline, self.newest_shared(target)).await;
        self.metrics
            .lookup_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(shared) => match &*shared {
                Ok(list) => {
                    let tags = list.iter().flatten().map(String::as_str);
                    Ok(if any_prefix {
                        tag::newest_any(tags)
                    } else {
                        tag::newest(tags, &target.tag_prefix)
                    })
                }
                Err(e) => Err(e.clone()),
            },
            Err(_) => Err(self.timed_out()),
        };
        if let Err(e) = &result {
            self.metrics.registry_error(e.kind);
        }
        result
    }

    async fn newest_shared(&self, target: &Target) -> Shared<Option<Vec<String>>> {
        let (registry, turns) = (self.registry.clone(), self.turns.clone());
        let t = target.clone();
        let entry = self
            .in_flight
            .entry(target.clone())
            .or_insert_with(async move {
                let path = t.path;
                Arc::new(at_the_registry(turns, async move { registry.tags(&path).await }).await)
            })
            .await;
        if entry.is_fresh() {
            // This caller ran the request: nobody may reuse its answer from now on.
            self.in_flight.invalidate(target).await;
            self.metrics.cache_miss.inc();
        } else {
            self.metrics.cache_coalesced.inc();
        }
        entry.into_value()
    }

    /// The digest of one of `target`'s tags; `None` when the tag does not exist.
    pub async fn digest(&self, target: &Target, tag: &str) -> Result<Option<String>, LookupError> {
        let key = target.image(tag);
        if let Some(d) = self.digests.get(&key).await {
            self.metrics.cache_digest_hit.inc();
            return Ok(Some(d));
        }
        self.metrics.cache_miss.inc();
        let started = Instant::now();
        let (registry, path, tag_owned) =
            (self.registry.clone(), target.path.clone(), tag.to_string());
        let asked = at_the_registry(self.turns.clone(), async move {
            registry.digest(&path, &tag_owned).await
        });
        let result = match timeout(self.deadline, asked).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        };
        self.metrics
            .lookup_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(Some(d)) => self.digests.insert(key, d.clone()).await,
            Ok(None) => {}
            Err(e) => self.metrics.registry_error(e.kind),
        }
        result
    }

    /// The manifest of one of `target`'s tags, within the lookup deadline;
    /// `None` when the tag does not exist.
    pub async fn manifest(
        &self,
        target: &Target,
        tag: &str,
    ) -> Result<Option<Document>, LookupError> {
        let (registry, turns, path, tag_owned) = (
            self.registry.clone(),
            self.turns.clone(),
            target.path.clone(),
            tag.to_string(),
        );
        // concurrent reads of one manifest make one request; a failure is not kept
        let read =
            self.manifests
                .entry(target.image(tag))
                .or_try_insert_with(async move {
                    let asked = at_the_registry(turns, async move {
                        registry.manifest(&path, &tag_owned).await
                    });
                    match asked.await {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => Err(None),
                        Err(e) => Err(Some(e)),
                    }
                });
        let result = match timeout(self.deadline, read).await {
            Ok(Ok(entry)) => {
                if entry.is_fresh() {
                    self.metrics.cache_miss.inc();
                } else {
                    self.metrics.cache_manifest_hit.inc();
                }
                Ok(Some(entry.into_value()))
            }
            Ok(Err(e)) => match &*e {
                None => Ok(None),
                Some(e) => Err(e.clone()),
            },
            Err(_) => Err(self.timed_out()),
        };
        if let Err(e) = &result {
            self.metrics.registry_error(e.kind);
        }
        result
    }

    /// Writes `snapshot` of `target` moved onto `base` as `tag`, in a turn at
    /// the registry; the work goes on to its end (or the registry's answer
    /// limit) if the caller stops waiting: a rebased snapshot written after
    /// its admission was answered is found by the next login.
    pub async fn rebase(&self, job: rewrite::Job) -> Result<rewrite::Written, LookupError> {
        let registry = self.registry.clone();
        at_the_registry(self.turns.clone(), async move {
            rewrite::rebase(&registry, &job).await
        })
        .await
    }

    fn timed_out(&self) -> LookupError {
        LookupError::new(
            ErrorKind::Timeout,
            format!(
                "no answer within {}",
                humantime::format_duration(self.deadline)
            ),
        )
    }
}
