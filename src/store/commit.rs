//! [`GroupCommitter`]: the IO shell that makes a shard's log durable, on the shard's monoio
//! runtime (io_uring).
//!
//! One task per shard runs [`GroupCommitter::run`]. It sleeps until [`GroupCommitter::notify`]
//! says records are pending, optionally waits up to `max_batch_delay` for more (or until
//! `max_batch_bytes` are pending), then takes one batch from the [`DurableLog`], writes it with
//! `write_all_at`, `fdatasync`s, hands it back with `batch_committed`, deletes the segments
//! that freed, and calls `on_committed(lsn)`. While a write and sync are in flight the shard
//! keeps running and appending: all of that goes into the next batch, which is the group
//! commit.
//!
//! Statistics ([`CommitStats`], for the admin API's metrics): each group commit's write and
//! `fdatasync` are timed (two clock reads per commit, not per message) into fixed-bucket
//! histograms, with the bytes written.
//!
//! Borrowing: the log sits in an `Rc<RefCell<_>>` shared with the shard's synchronous code.
//! The committer borrows it only between awaits, never across one, and calls `on_committed`
//! with no borrow held, so the callback may append to the log.
//!
//! Failure: a failed write or sync is not retried. After a failed `fdatasync` the kernel may
//! have dropped the dirty pages and cleared the error, so a retry could "succeed" without the
//! data ever reaching the disk. `run` records the failure in the log
//! ([`DurableLog::failure`]) and returns the error; nothing appended later is ever committed.
//! The shard must answer pending and new durable publishes with an error and the broker must
//! restart: recovery then reads back exactly what was made durable.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use super::log::{CommitBatch, DurableLog, Lsn, SegmentId};
use super::StoreError;

/// A level-triggered wake-up for one waiting task, single-threaded: `raise` any number of
/// times, the next `wait` returns at once and clears it.
#[derive(Default)]
pub(super) struct Signal {
    raised: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    pub(super) fn raise(&self) {
        self.raised.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    pub(super) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// The commit task of one shard's log. Create it next to the log, spawn `run` on the shard's
/// runtime, call `notify` after appending (once per round of work is enough).
pub struct GroupCommitter {
    log: Rc<RefCell<DurableLog>>,
    signal: Signal,
    stopping: Cell<bool>,
    stats: Cell<CommitStats>,
}

/// Upper bounds (seconds) of the latency histograms' buckets; a last one, +Inf, takes the rest.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Durations counted in the buckets of [`LATENCY_BUCKETS_SECONDS`] (not cumulative: bucket i
/// counts the durations above bound i-1 and at most bound i; the last, those above them all).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BUCKETS_SECONDS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn record(&mut self, seconds: f64) {
        let bucket = LATENCY_BUCKETS_SECONDS.iter().position(|bound| seconds <= *bound);
        self.buckets[bucket.unwrap_or(LATENCY_BUCKETS_SECONDS.len())] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// What the group commits of one log did since the shard started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommitStats {
    /// One write and one `fdatasync` of a batch: how long the `fdatasync` took, and the whole
    /// commit (write, sync, and the deletion of segments it freed).
    pub sync: LatencyHistogram,
    pub commit: LatencyHistogram,
    pub bytes_written: u64,
}

impl GroupCommitter {
    pub fn new(log: Rc<RefCell<DurableLog>>) -> GroupCommitter {
        GroupCommitter { log, signal: Signal::default(), stopping: Cell::new(false), stats: Cell::default() }
    }

    pub fn log(&self) -> &Rc<RefCell<DurableLog>> {
        &self.log
    }

    /// What the group commits did so far.
    pub fn stats(&self) -> CommitStats {
        self.stats.get()
    }

    /// Records were appended: commit them. Cheap (a flag and at most one wake-up); calling it
    /// when nothing is pending is harmless.
    pub fn notify(&self) {
        self.signal.raise();
    }

    /// Asks `run` to return once everything appended so far is durable.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.signal.raise();
    }

    /// Commits batches until [`stop`](Self::stop) (then returns `Ok` with nothing pending) or
    /// until a write or sync fails (then returns the error; see the module docs). Calls
    /// `on_committed` with the new durable Lsn after every batch, in increasing order.
    pub async fn run(&self, mut on_committed: impl FnMut(Lsn)) -> Result<(), StoreError> {
        let result = self.commit_until_stopped(&mut on_committed).await;
        if let Err(error) = &result {
            self.log.borrow_mut().set_failure(error.to_string());
        }
        result
    }

    async fn commit_until_stopped(&self, on_committed: &mut impl FnMut(Lsn)) -> Result<(), StoreError> {
        let shard_dir = self.log.borrow().shard_dir().to_path_buf();
        let directory = open_directory(&shard_dir)?;
        let mut segment: Option<(SegmentId, monoio::fs::File)> = None;
        loop {
            if !self.wait_for_batch().await {
                if let Some((_, file)) = segment.take() {
                    let _ = file.close().await;
                }
                return Ok(());
            }
            let Some(mut batch) = self.log.borrow_mut().take_batch() else { continue };
            let file = match &segment {
                Some((id, file)) if *id == batch.segment => file,
                _ => {
                    if let Some((_, previous)) = segment.take() {
                        let _ = previous.close().await;
                    }
                    let file = open_segment(&batch, &directory, &shard_dir).await?;
                    &segment.insert((batch.segment, file)).1
                }
            };
            let bytes = std::mem::take(&mut batch.bytes);
            let bytes_written = bytes.len() as u64;
            let started = Instant::now();
            let (written, bytes) = file.write_all_at(bytes, batch.file_offset).await;
            batch.bytes = bytes;
            let io_error = |action: &'static str, source| StoreError::Io { path: batch.path.clone(), action, source };
            written.map_err(|source| io_error("writing", source))?;
            let syncing = Instant::now();
            file.sync_data().await.map_err(|source| io_error("syncing (fdatasync)", source))?;
            let synced = Instant::now();

            let outcome = self.log.borrow_mut().batch_committed(batch);
            if !outcome.delete_segments.is_empty() {
                for path in &outcome.delete_segments {
                    // A blocking unlink (this monoio build has no io_uring unlinkat); it runs
                    // once per deleted segment, i.e. once per segment_bytes of traffic.
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(StoreError::Io {
                                path: path.clone(),
                                action: "deleting the fully settled segment",
                                source,
                            })
                        }
                    }
                }
                directory.sync_all().await.map_err(|source| StoreError::Io {
                    path: shard_dir.clone(),
                    action: "syncing the directory",
                    source,
                })?;
            }
            let mut stats = self.stats.get();
            stats.sync.record(synced.duration_since(syncing).as_secs_f64());
            stats.commit.record(started.elapsed().as_secs_f64());
            stats.bytes_written += bytes_written;
            self.stats.set(stats);
            on_committed(outcome.durable_lsn);
        }
    }

    /// Waits until a batch is worth taking: records are pending and either the batch window
    /// has passed or a full batch is ready. False when stopping with nothing pending.
    async fn wait_for_batch(&self) -> bool {
        loop {
            if self.log.borrow().has_pending() {
                break;
            }
            if self.stopping.get() {
                return false;
            }
            self.signal.wait().await;
        }
        let (delay, max_batch_bytes) = {
            let log = self.log.borrow();
            (log.config().max_batch_delay, log.config().max_batch_bytes)
        };
        if delay.is_zero() {
            return true;
        }
        let deadline = Instant::now() + delay;
        while !self.stopping.get() && self.log.borrow().pending_bytes() < max_batch_bytes {
            let now = Instant::now();
            if now >= deadline || monoio::time::timeout(deadline - now, self.signal.wait()).await.is_err() {
                break;
            }
        }
        true
    }
}

/// The shard's log directory as a monoio file, for `fsync` of its entries.
fn open_directory(dir: &Path) -> Result<monoio::fs::File, StoreError> {
    let io_error = |source| StoreError::Io { path: dir.to_path_buf(), action: "opening the directory", source };
    let std_directory = std::fs::File::open(dir).map_err(io_error)?;
    monoio::fs::File::from_std(std_directory).map_err(io_error)
}

/// Opens the batch's segment for writing; a new segment is created (it must not exist) and
/// its header written and synced, with the directory entry, before any record goes in.
async fn open_segment(
    batch: &CommitBatch,
    directory: &monoio::fs::File,
    shard_dir: &Path,
) -> Result<monoio::fs::File, StoreError> {
    let io_error = |action: &'static str, source| StoreError::Io { path: batch.path.clone(), action, source };
    let Some(header) = batch.new_segment_header else {
        return monoio::fs::OpenOptions::new()
            .write(true)
            .open(&batch.path)
            .await
            .map_err(|source| io_error("opening", source));
    };
    let file = monoio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&batch.path)
        .await
        .map_err(|source| io_error("creating", source))?;
    let (written, _) = file.write_all_at(header.to_vec(), 0).await;
    written.map_err(|source| io_error("writing the header of", source))?;
    file.sync_data().await.map_err(|source| io_error("syncing (fdatasync)", source))?;
    directory.sync_all().await.map_err(|source| StoreError::Io {
        path: shard_dir.to_path_buf(),
        action: "syncing the directory",
        source,
    })?;
    Ok(file)
}
