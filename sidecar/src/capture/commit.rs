//! The container's changes as one layer: pause the task, read its overlayfs
//! upper directory into a compressed spool (or, as the fallback, diff its
//! snapshot against its parent through the Diff service into containerd's
//! content store, uncompressed), resume. The task is resumed on every path: errors return through
//! the guard, and a panic or a dropped future resumes it from `Drop`.

use super::{
    increment,
    record::{self, Record},
};
use super::{
    precopy,
    upper::{self, Upper},
};
use crate::ctrd::Ctrd;
use crate::{
    image::{
        self,
        new_layer::{Assembling, Codec, Layer, NewLayer, Written},
        spool::{self, SpoolWriter},
    },
    layer::{
        estargz,
        pieces::{Pieces, Unit},
        threaded::Threaded,
        Compression, Encoder, Hashing,
    },
};
use anyhow::{Context, Result};
use containerd_client::{
    services::v1::{
        snapshots::{
            MountsRequest, RemoveSnapshotRequest, StatSnapshotRequest, UsageRequest,
            ViewSnapshotRequest,
        },
        Container, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
        DiffRequest, PauseTaskRequest, ResumeTaskRequest,
    },
    types::{Descriptor, Mount},
};
use futures::TryStreamExt;
use std::{collections::HashMap, io::BufWriter, path::Path, time::Duration};
use tokio_util::io::{StreamReader, SyncIoBridge};
use tracing::{info, warn};

/// The OCI media type of an uncompressed layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A pre-copied layer of at least this many uncompressed bytes is uploaded
/// while it is put together after the resume ([`Assembling::large`]); a
/// smaller one is put together in a few milliseconds.
pub const UPLOADED_WHILE_WRITTEN: u64 = 16 << 20;

/// A containerd lease: everything made under it survives garbage collection
/// until it is deleted (or expires, if the sidecar dies).
pub struct Lease {
    ctrd: Ctrd,
    pub id: String,
}

impl Lease {
    pub async fn create(ctrd: &Ctrd, expiry: Duration) -> Result<Self> {
        let expire = chrono_like_rfc3339(std::time::SystemTime::now() + expiry);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
        let lease = ctrd
            .client
            .leases()
            .create(ctrd.req(CreateLeaseRequest {
                id: String::new(),
                labels,
            }))
            .await
            .context("creating a containerd lease")?
            .into_inner()
            .lease
            .context("containerd returned no lease")?;
        Ok(Self {
            ctrd: ctrd.clone(),
            id: lease.id,
        })
    }

    pub async fn release(self) {
        let r = self
            .ctrd
            .client
            .leases()
            .delete(self.ctrd.req(DeleteLeaseRequest {
                id: self.id.clone(),
                sync: false,
            }))
            .await;
        if let Err(e) = r {
            warn!(lease = %self.id, error = %e, "cannot delete the lease; it expires by itself");
        }
    }
}

fn chrono_like_rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Tasks paused right now, so a shutdown can resume them before the process ends.
static PAUSED: std::sync::Mutex<Vec<(String, Ctrd)>> = std::sync::Mutex::new(Vec::new());

fn paused_set() -> std::sync::MutexGuard<'static, Vec<(String, Ctrd)>> {
    PAUSED.lock().unwrap_or_else(|p| p.into_inner())
}

static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Resumes every task this process paused (on SIGTERM, before exiting); no task
/// is paused after this.
pub async fn resume_all() {
    SHUTTING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
    let tasks: Vec<(String, Ctrd)> = paused_set().drain(..).collect();
    for (id, ctrd) in tasks {
        match resume(&ctrd, &id).await {
            Ok(()) => warn!(container = %id, "resumed the task before shutting down"),
            Err(e) => {
                warn!(container = %id, error = %format!("{e:#}"), "could not resume the task")
            }
        }
    }
}

/// A paused task; resumed by [`Paused::resume`], or by `Drop` on any other path.
/// Each pause's length, to the end of its resume, goes to
/// [`crate::metrics::PAUSED_SECONDS`].
pub struct Paused {
    ctrd: Ctrd,
    container_id: String,
    active: bool,
    since: std::time::Instant,
    /// How long containerd took to pause the task (the freezer waits for
    /// each of its processes to stop).
    pub pausing: Duration,
}

impl Paused {
    pub async fn pause(ctrd: &Ctrd, container_id: &str) -> Result<Self> {
        if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("shutting down");
        }
        // Registered before the pause, so a shutdown racing with it resumes it.
        paused_set().push((container_id.to_string(), ctrd.clone()));
        let mut guard = Self {
            ctrd: ctrd.clone(),
            container_id: container_id.to_string(),
            active: true,
            since: std::time::Instant::now(),
            pausing: Duration::ZERO,
        };
        // the freezer gives up on a task it cannot stop in time (one stuck in
        // a write on a busy disk): tried again a few times
        let mut paused = Ok(());
        for attempt in 0..4u64 {
            paused = ctrd
                .client
                .tasks()
                .pause(ctrd.req(PauseTaskRequest {
                    container_id: container_id.to_string(),
                }))
                .await
                .map(drop);
            match &paused {
                Err(e) if e.message().contains("unable to freeze") && attempt < 3 => {
                    warn!(container = container_id, attempt, error = %e.message(), "the pause failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                }
                _ => break,
            }
        }
        if let Err(e) = paused {
            guard.active = false;
            paused_set().retain(|(id, _)| id != container_id);
            return Err(e).with_context(|| format!("pausing {container_id}"));
        }
        if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
            guard.resume().await?;
            anyhow::bail!("shutting down");
        }
        guard.pausing = guard.since.elapsed();
        Ok(guard)
    }

    pub async fn resume(mut self) -> Result<()> {
        self.active = false;
        paused_set().retain(|(id, _)| id != &self.container_id);
        let resumed = resume(&self.ctrd, &self.container_id).await;
        crate::metrics::PAUSED_SECONDS.observe(self.since.elapsed().as_secs_f64());
        resumed
    }
}

async fn resume(ctrd: &Ctrd, container_id: &str) -> Result<()> {
    let mut last = None;
    for attempt in 0..5u64 {
        match ctrd
            .client
            .tasks()
            .resume(ctrd.req(ResumeTaskRequest {
                container_id: container_id.to_string(),
            }))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                warn!(container = container_id, attempt, error = %e, "resume failed; trying again");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        }
    }
    Err(anyhow::anyhow!(
        "resuming {container_id}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

impl Drop for Paused {
    fn drop(&mut self) {
        if self.active {
            paused_set().retain(|(id, _)| id != &self.container_id);
            let (ctrd, id, since) = (self.ctrd.clone(), self.container_id.clone(), self.since);
            warn!(container = %id, "resuming the task after an interrupted commit");
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = resume(&ctrd, &id).await {
                        warn!(container = %id, error = %format!("{e:#}"), "could not resume the task");
                    }
                    crate::metrics::PAUSED_SECONDS.observe(since.elapsed().as_secs_f64());
                });
            }
        }
    }
}

/// What the new layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The container's changes against its image.
    Changes,
    /// The whole root filesystem (a squash: the image becomes this one layer).
    Everything,
}

/// How containerd mounts `container`'s root filesystem.
pub async fn mounts(ctrd: &Ctrd, container: &Container) -> Result<Vec<Mount>> {
    let key = &container.snapshot_key;
    Ok(ctrd
        .client
        .snapshots()
        .mounts(ctrd.req(MountsRequest {
            snapshotter: container.snapshotter.clone(),
            key: key.clone(),
        }))
        .await
        .with_context(|| format!("mounts of snapshot {key}"))?
        .into_inner()
        .mounts)
}

/// How the desktop is frozen while its upper directory is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Not at all (`--pause false`): the layer is no one instant's.
    Never,
    /// For the whole read and compression.
    Throughout,
    /// Only to read again what changed while the rest was read and
    /// compressed with the desktop running ([`precopy`](super::precopy)).
    PreCopy,
}

/// What every read of a container's layer from its upper directory needs:
/// the container, how its layer is compressed, and where the layer's files
/// go (the work directory, at most `max_bytes`).
pub struct Reading<'a> {
    pub ctrd: &'a Ctrd,
    pub container: &'a Container,
    pub compression: Compression,
    pub work_dir: &'a Path,
    pub max_bytes: u64,
}

/// The layer of the container's changes read from its overlayfs upper
/// directory into a compressed spool, the task paused as `freeze` says; the
/// task runs again before this returns, and the upload reads the spool
/// afterwards (with pre-copy, while the layer is put together).
pub async fn from_upper(r: &Reading<'_>, upper: Upper, freeze: Freeze) -> Result<Layer> {
    Ok(read_upper(r, upper, freeze, false).await?.0)
}

/// [`from_upper`], and with `record` the record of the upper directory as
/// the layer holds it: scanned under the pause (before the read, with the
/// pause off).
async fn read_upper(
    r: &Reading<'_>,
    upper: Upper,
    freeze: Freeze,
    record: bool,
) -> Result<(Layer, Option<Record>)> {
    if freeze == Freeze::PreCopy {
        return pre_copied(r, upper, None, record).await;
    }
    let pause = freeze == Freeze::Throughout;
    let (writer, reader) = spool::create(r.work_dir, r.max_bytes)?;
    let paused = if pause {
        Some(Paused::pause(r.ctrd, &r.container.id).await?)
    } else {
        None
    };
    let compression = r.compression.clone();
    let started = std::time::Instant::now();
    let written = tokio::task::spawn_blocking(move || {
        let recorded = record.then(|| recorded(&upper));
        compress_into(writer, compression, |out| upper::write_layer(&upper, out))
            .map(|layer| (layer, recorded.flatten()))
    })
    .await;
    if let Some(p) = paused {
        p.resume().await?;
    }
    let (layer, recorded) = written.context("the layer writer panicked")??;
    let paused_ms = if pause {
        started.elapsed().as_millis() as u64
    } else {
        0
    };
    info!(diff_id = %layer.diff_id, compressed_bytes = layer.size, paused_ms, "layer read from the upper directory");
    Ok((
        Layer::Ready(NewLayer::new(layer, reader, "upperdir")),
        recorded,
    ))
}

/// The record of the upper directory now ([`scan`]); `None`, logged, when
/// it cannot be taken (the next layer is a full one too).
fn recorded(upper: &Upper) -> Option<Record> {
    scan(&upper.dir, upper.userxattr)
        .map_err(|e| warn!(error = %format!("{e:#}"), "the upper directory cannot be recorded: the next snapshot's layer is a full one too"))
        .ok()
}

/// [`from_upper`] in a chain of snapshots: with `last`, the record of the
/// last pushed capture, only what changed since it (an increment,
/// [`increment`]), read under the pause (unless `freeze` is
/// [`Freeze::Never`]; with [`Freeze::PreCopy`] pre-copied as a full layer
/// is, [`pre_copied`]); without it, the whole change as [`from_upper`]
/// reads it. This capture's record comes back with the layer, taken right
/// before the layer is read (under the pause when there is one): whatever
/// changes after it is seen changed by the next capture, never missed.
pub async fn from_upper_recorded(
    r: &Reading<'_>,
    upper: Upper,
    freeze: Freeze,
    last: Option<Record>,
) -> Result<(Layer, Option<Record>)> {
    let Some(last) = last else {
        // the record of what the layer holds: taken at its cut (under the
        // pause), so that an entry made after an earlier scan and deleted
        // before the next capture still gets its whiteout
        return read_upper(r, upper, freeze, true).await;
    };
    if freeze == Freeze::PreCopy {
        return pre_copied(r, upper, Some(last), true).await;
    }
    let (layer, record) = increment_under_pause(r, upper, freeze, last).await?;
    Ok((Layer::Ready(layer), record))
}

/// The increment over `last` read under the pause (unless `freeze` is
/// [`Freeze::Never`]; with [`Freeze::PreCopy`], the fallback of a first
/// pass past [`precopy::MAX_ENTRIES`], only read there, into a plain file,
/// and compressed after the resume).
async fn increment_under_pause(
    r: &Reading<'_>,
    upper: Upper,
    freeze: Freeze,
    last: Record,
) -> Result<(NewLayer, Option<Record>)> {
    let (writer, reader) = spool::create(r.work_dir, r.max_bytes)?;
    let paused = match freeze {
        Freeze::Never => None,
        Freeze::Throughout | Freeze::PreCopy => Some(Paused::pause(r.ctrd, &r.container.id).await?),
    };
    let started = std::time::Instant::now();
    // with pre-copy, the increment is only read under the pause (into a plain
    // file of the work directory) and compressed after the resume
    let (dir, max_bytes, compression) =
        (r.work_dir.to_path_buf(), r.max_bytes, r.compression.clone());
    let written = tokio::task::spawn_blocking(move || -> Result<_> {
        let now = scan(&upper.dir, upper.userxattr)?;
        let selection = increment::select(&last, &now);
        let counts = (selection.picks().count(), selection.gone().count());
        let layer = if freeze == Freeze::PreCopy {
            let plain = precopy::plain(&dir, max_bytes, |out| {
                upper::write_selected(&upper, Some(&selection), out).map(drop)
            })?;
            Increment::Plain(plain, writer, compression)
        } else {
            Increment::Compressed(compress_into(writer, compression, |out| {
                upper::write_selected(&upper, Some(&selection), out)
            })?)
        };
        Ok((layer, now, counts))
    })
    .await;
    let paused_ms = paused
        .as_ref()
        .map(|_| started.elapsed().as_millis() as u64);
    if let Some(p) = paused {
        p.resume().await?;
    }
    let (layer, now, (picked, whiteouts)) = written.context("the layer writer panicked")??;
    let layer = match layer {
        Increment::Compressed(layer) => layer,
        Increment::Plain(plain, writer, compression) => tokio::task::spawn_blocking(move || {
            compress_into(writer, compression, |mut out| {
                precopy::copy_plain(plain, &mut out)?;
                Ok(out)
            })
        })
        .await
        .context("the layer writer panicked")??,
    };
    info!(
        diff_id = %layer.diff_id,
        compressed_bytes = layer.size,
        entries = now.len(),
        picked,
        whiteouts,
        paused_ms = paused_ms.unwrap_or(0),
        "increment read from the upper directory: what changed since the last snapshot"
    );
    Ok((NewLayer::new(layer, reader, "upperdir"), Some(now)))
}

/// An increment read under the pause: compressed there, or plain (with
/// pre-copy), to be compressed into its spool after the resume.
enum Increment {
    Compressed(Written),
    Plain(std::fs::File, SpoolWriter, Compression),
}

/// The record of the upper directory at `dir` now, entries changed within
/// the clock's last ticks marked racy ([`record::Record::mark_racy`]).
fn scan(dir: &Path, userxattr: bool) -> Result<Record> {
    let since = record::racy_since();
    let mut now = record::scan(dir, userxattr).context("recording the upper directory")?;
    now.mark_racy(since);
    Ok(now)
}

/// [`from_upper`] with pre-copy: the first pass while the desktop runs, the
/// pause for what moved since, the layer put together after the resume.
/// With `last`, the record of the last capture, the layer is the increment
/// over it: the first pass writes what a scan right before it selects, the
/// pause what the selection at the pause holds and the first pass does not
/// hold as it is ([`precopy::under_pause`]); the record at the pause comes
/// back.
async fn pre_copied(
    r: &Reading<'_>,
    upper: Upper,
    last: Option<Record>,
    record: bool,
) -> Result<(Layer, Option<Record>)> {
    let started = std::time::Instant::now();
    let unit = Unit::of(&r.compression);
    let (threads, dir, max_bytes) = (r.compression.threads, r.work_dir.to_path_buf(), r.max_bytes);
    // eStargz: the first pass writes the blob's members, copied after the resume
    let estargz = (r.compression.codec == Codec::Estargz).then(|| r.compression.estargz());
    let (first, upper, last) = tokio::task::spawn_blocking(move || -> Result<_> {
        let selection = match &last {
            Some(last) => Some(increment::select(last, &scan(&upper.dir, upper.userxattr)?)),
            None => None,
        };
        let first = precopy::first_pass(
            &upper,
            selection.as_ref(),
            precopy::Output {
                unit,
                threads,
                work_dir: &dir,
                limit: max_bytes,
                estargz,
            },
        )?;
        Ok((first, upper, last))
    })
    .await
    .context("the layer writer panicked")??;
    let first_ms = started.elapsed().as_millis() as u64;
    let Some(first) = first else {
        info!(
            most = precopy::MAX_ENTRIES,
            "too many entries to pre-copy: the change is read under the pause"
        );
        if let Some(last) = last {
            let (layer, record) =
                Box::pin(increment_under_pause(r, upper, Freeze::PreCopy, last)).await?;
            return Ok((Layer::Ready(layer), record));
        }
        return Box::pin(read_upper(r, upper, Freeze::Throughout, record)).await;
    };

    let paused = Paused::pause(r.ctrd, &r.container.id).await?;
    let frozen = std::time::Instant::now();
    let pausing_ms = paused.pausing.as_millis() as u64;
    let dir = r.work_dir.to_path_buf();
    let increment = last.is_some();
    let under = tokio::task::spawn_blocking(move || {
        let reread = precopy::under_pause(&upper, &first, last.as_ref(), &dir, max_bytes);
        (first, reread)
    })
    .await;
    let paused_ms = frozen.elapsed().as_millis() as u64;
    paused.resume().await?;
    let (first, reread) = under.context("the layer writer panicked")?;
    let mut reread = reread?;

    let (writer, reader) = spool::create(r.work_dir, r.max_bytes)?;
    let read_again = reread.read;
    let (picked, whiteouts) = (reread.picked, reread.whiteouts);
    let recorded = reread.record.take().filter(|_| record);
    let recorded_entries = recorded.as_ref().map_or(0, Record::len);
    let large = first.index.plain_len + reread.index.plain_len >= UPLOADED_WHILE_WRITTEN;
    let compression = r.compression.clone();
    // put together after the resume, on a thread of its own: the upload may
    // read the spool as it grows
    let written = tokio::task::spawn_blocking(move || {
        let (layer, spliced) = assemble_into(writer, &compression, &first, &reread)?;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if increment {
            info!(
                diff_id = %layer.diff_id,
                compressed_bytes = layer.size,
                entries = recorded_entries,
                picked,
                whiteouts,
                read_again,
                estargz_members_copied = spliced.copied,
                estargz_members_remade = spliced.remade,
                estargz_entries_rerouted = spliced.rerouted,
                first_pass_ms = first_ms,
                pausing_ms,
                paused_ms,
                elapsed_ms,
                "increment read from the upper directory: what changed since the last snapshot, what changed meanwhile read again under the pause"
            );
        } else {
            info!(
                diff_id = %layer.diff_id,
                compressed_bytes = layer.size,
                entries = first.seen.len(),
                read_again,
                estargz_members_copied = spliced.copied,
                estargz_members_remade = spliced.remade,
                estargz_entries_rerouted = spliced.rerouted,
                first_pass_ms = first_ms,
                pausing_ms,
                paused_ms,
                elapsed_ms,
                "layer read from the upper directory, what changed meanwhile read again under the pause"
            );
        }
        Ok(layer)
    });
    let layer = Assembling {
        spool: reader,
        source: "upperdir",
        large,
        written,
    };
    Ok((Layer::Assembling(layer), recorded))
}

/// The layer from the first pass's pieces and what the pause read again,
/// into the spool: gzip and zstd groups copied as they are (the diff_id's
/// hash resumed where the first change is); eStargz entries that stand
/// copied from the members the first pass wrote
/// ([`precopy::assemble_estargz`]), and how many.
fn assemble_into(
    writer: SpoolWriter,
    compression: &Compression,
    first: &precopy::FirstPass,
    reread: &precopy::Reread,
) -> Result<(Written, estargz::Spliced)> {
    if first.estargz.is_some() {
        // the spool's sha256 and writes on a thread of their own: the
        // writer's thread is the one the layout waits for
        let spooling = Threaded::new("spool", writer).context("starting the spool's thread")?;
        let (spooling, change, done, spliced) =
            precopy::assemble_estargz(first, reread, compression.estargz(), spooling)?;
        let (size, digest) = spooling
            .finish()
            .context("writing the layer's spool file")?
            .finish();
        return Ok((written_estargz(change, digest, size, &done), spliced));
    }
    let buffered = BufWriter::with_capacity(1 << 20, writer);
    let mut out = Pieces::new(buffered, first.unit, compression.threads, false)
        .context("starting the compressors")?;
    let diff_id =
        precopy::assemble(first, reread, &mut out, true)?.context("the layer's diff_id")?;
    let (buffered, _) = out.finish().context("compressing the layer")?;
    let spool = buffered
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the layer's spool file")?;
    let (size, digest) = spool.finish();
    let written = Written {
        change: diff_id.clone(),
        diff_id,
        digest,
        size,
        annotations: Default::default(),
    };
    Ok((written, estargz::Spliced::default()))
}

/// The uncompressed layer `diff_id` from the content store, compressed into a
/// spool (the task is not paused: the content store does not change).
pub async fn compress_stored(
    ctrd: &Ctrd,
    diff_id: &str,
    compression: Compression,
    work_dir: &Path,
    max_bytes: u64,
) -> Result<NewLayer> {
    let (writer, reader) = spool::create(work_dir, max_bytes)?;
    let mut input = SyncIoBridge::new(StreamReader::new(Box::pin(
        image::read_stream(ctrd, diff_id).map_err(std::io::Error::other),
    )));
    let layer = tokio::task::spawn_blocking(move || {
        compress_into(writer, compression, |mut out| {
            std::io::copy(&mut input, &mut out).context("reading the layer from containerd")?;
            Ok(out)
        })
    })
    .await
    .context("the layer writer panicked")??;
    anyhow::ensure!(
        layer.change == diff_id,
        "the layer read back from containerd is not {diff_id}"
    );
    Ok(NewLayer::new(layer, reader, "diff-service"))
}

/// Where an uncompressed layer is written: hashed (its diff_id), compressed, spooled.
pub(crate) type Sink = Hashing<Encoder<BufWriter<SpoolWriter>>>;

/// Runs `produce` (which writes an uncompressed tar) into the compressor and the
/// spool; the layer's diff_id, compressed digest and size.
pub(crate) fn compress_into(
    writer: SpoolWriter,
    compression: Compression,
    produce: impl FnOnce(Sink) -> Result<Sink>,
) -> Result<Written> {
    let encoder = compression
        .encoder(BufWriter::with_capacity(1 << 20, writer))
        .context("starting the compressor")?;
    let (change, encoder) = produce(Hashing::new(encoder))?.finish();
    let (buffered, estargz) = encoder.finish().context("compressing the layer")?;
    let spool = buffered
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the layer's spool file")?;
    let (size, digest) = spool.finish();
    Ok(match estargz {
        Some(done) => written_estargz(change, digest, size, &done),
        None => Written {
            diff_id: change.clone(),
            change,
            digest,
            size,
            annotations: Default::default(),
        },
    })
}

/// An eStargz layer written (`change`: its plain tar's sha256), logged.
fn written_estargz(change: String, digest: String, size: u64, done: &estargz::Done) -> Written {
    info!(
        toc_digest = %done.toc_digest,
        uncompressed_bytes = done.uncompressed_size,
        prefetched_entries = done.prefetched_entries,
        prefetched_bytes = done.prefetched_bytes,
        prefetched_compressed_bytes = done.landmark_offset,
        "eStargz layer written"
    );
    Written {
        diff_id: done.diff_id.clone(),
        change,
        digest,
        size,
        annotations: done.annotations(),
    }
}

/// How many bytes `container`'s change holds on the node's disk (containerd's
/// usage of its active snapshot: the upper directory).
async fn change_bytes(ctrd: &Ctrd, container: &Container) -> Result<u64> {
    let usage = ctrd
        .client
        .snapshots()
        .usage(ctrd.req(UsageRequest {
            snapshotter: container.snapshotter.clone(),
            key: container.snapshot_key.clone(),
        }))
        .await
        .with_context(|| format!("the size of snapshot {}", container.snapshot_key))?
        .into_inner();
    Ok(usage.size.max(0) as u64)
}

/// The layer of `container`'s changes, or of its whole root filesystem
/// (uncompressed, in the content store under the lease of `ctrd`); its digest is
/// the layer's diff_id. The task is paused first, for the size check and the
/// diff alike: containerd walks the container's tree by path, which a running
/// desktop could swap under it for links to another desktop's files. A change
/// larger than `max_bytes` is refused before anything is written.
pub async fn diff(
    ctrd: &Ctrd,
    container: &Container,
    scope: Scope,
    max_bytes: u64,
) -> Result<Descriptor> {
    let snapshotter = container.snapshotter.clone();
    let key = container.snapshot_key.clone();
    let snapshots = ctrd.client.snapshots();
    let info = snapshots
        .clone()
        .stat(ctrd.req(StatSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: key.clone(),
        }))
        .await
        .with_context(|| format!("reading snapshot {key}"))?
        .into_inner()
        .info
        .context("containerd returned no snapshot info")?;
    let view_key = format!(
        "desktop-snapshot-view-{}",
        ctrd.lease.as_deref().unwrap_or("nolease")
    );
    // Against an empty left side, the Diff service writes the whole tree.
    let left = if scope == Scope::Everything {
        Vec::new()
    } else {
        snapshots
            .clone()
            .view(ctrd.req(ViewSnapshotRequest {
                snapshotter: snapshotter.clone(),
                key: view_key.clone(),
                parent: info.parent.clone(),
                labels: HashMap::new(),
            }))
            .await
            .with_context(|| format!("viewing the parent snapshot {}", info.parent))?
            .into_inner()
            .mounts
    };
    let right = mounts(ctrd, container).await?;

    let paused = Paused::pause(ctrd, &container.id).await?;
    let started = std::time::Instant::now();
    let too_large = match scope {
        Scope::Changes => change_bytes(ctrd, container)
            .await
            .map(|bytes| (bytes > max_bytes).then_some(bytes)),
        Scope::Everything => Ok(None),
    };
    let result = match too_large {
        Ok(None) => Ok(ctrd
            .client
            .diff()
            .diff(ctrd.req(DiffRequest {
                left,
                right,
                media_type: LAYER_TAR.to_string(),
                r#ref: format!("desktop-snapshot-{}", ctrd.lease.as_deref().unwrap_or("")),
                labels: HashMap::new(),
                source_date_epoch: None,
            }))
            .await),
        Ok(Some(bytes)) => {
            Err(
                anyhow::Error::new(crate::image::spool::TooLarge { limit: max_bytes })
                    .context(format!("the change holds {bytes} bytes")),
            )
        }
        Err(e) => Err(e),
    };
    paused.resume().await?;
    let _ = snapshots
        .clone()
        .remove(ctrd.req(RemoveSnapshotRequest {
            snapshotter,
            key: view_key,
        }))
        .await;
    let descriptor = result?
        .context("the Diff service failed")?
        .into_inner()
        .diff
        .context("the Diff service returned no descriptor")?;
    info!(digest = %descriptor.digest, bytes = descriptor.size, scope = ?scope, elapsed_ms = started.elapsed().as_millis() as u64, "diff of the container written");
    Ok(descriptor)
}
