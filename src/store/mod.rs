//! The per-shard durable message log: what a durable publish is answered after, and what a
//! restarted broker recovers its queues from.
//!
//! # Shape
//!
//! One log per shard, owned by the shard that owns the addresses it records (the address hash
//! is fixed, so an address finds its log again after a restart with the same shard count).
//! - [`log`]: [`DurableLog`], the sans-IO core. Appends encode records into in-memory batches
//!   and return their [`Lsn`]; [`DurableLog::take_batch`] hands the shell the next batch;
//!   [`DurableLog::batch_committed`] marks it durable and says which segments to delete.
//! - [`commit`]: [`GroupCommitter`], the IO shell on the shard's monoio runtime: writes each
//!   batch with io_uring, `fdatasync`s, then reports the durable Lsn through a callback.
//!   Whatever is appended while a sync runs goes into the next batch (group commit).
//! - [`recovery`]: [`open`] reads the segments back at start-up, checks every checksum,
//!   truncates a torn tail, refuses (or, when asked, skips) corruption, and returns the
//!   unsettled messages ([`Recovery`]).
//! - [`record`]: the byte format below; the only code that knows it.
//!
//! # Files
//!
//! `<dir>/shard-<N>/` holds `LOCK` (an `flock` held while the log is open, so two brokers
//! cannot share a log), and segment files `00000000000000000001.log`, `...002.log`, numbered
//! in creation order. New records go to the newest segment; when the next record would take
//! it past `segment_bytes` a new one starts. A segment is deleted once it is not the newest,
//! every MESSAGE in it is settled, and the segments it settles into are gone (see [`log`]).
//! Recovery may leave `NNN.log.corrupt-<unix ms>` files (the original of a repaired segment)
//! for an operator to inspect and delete; they are never read.
//!
//! # Byte layout (all integers big-endian, unaligned)
//!
//! ```text
//! segment header, 32 bytes at offset 0
//!   0  magic            8  "MBWS-LOG"
//!   8  format version   u16  2 (1 is still read; see "Format versions")
//!  10  shard            u16  the shard that owns the log
//!  12  segment number   u64  equal to the file name
//!  20  salt             u64  random per segment, mixed into every record checksum
//!  28  header checksum  u32  CRC32C of bytes 0..28
//!
//! record, at any offset >= 32, records back to back
//!   0  length           u32  bytes after the checksum (kind + payload), 1..=MAX_RECORD_BYTES
//!   4  checksum         u32  CRC32C of: salt u64, the record's file offset u64,
//!                            then the record's bytes except this field (length, kind, payload)
//!   8  kind             u8
//!   9  payload          length - 1 bytes
//!
//! str16 = u16 length + bytes
//!
//! kind 1 MESSAGE    message id u64, expires at u64 (wall clock, Unix ms; 0 = never),
//!                   address str16, content type str16, correlation id str16, reply-to str16,
//!                   header count u16, count x (name str16, value str16),
//!                   body (every remaining byte)
//! kind 2 SETTLED    message id u64, address str16
//!                   (acknowledged, rejected, expired or dead-lettered: done with)
//! kind 3 LAST_IDS   count u32, count x (last message id u64, address str16)
//!                   (written first in every new segment: the highest id of every address)
//! kind 4 ID_RESERVATION  reserved up to u64   (since version 2)
//!                   (message ids of the shard up to this may be handed out; also written
//!                   right after the LAST_IDS records of every segment, with the highest
//!                   reservation so far, which marks the end of those records)
//! ```
//!
//! # Message ids across restarts
//!
//! Ids are one counter per shard, and consumers may deduplicate by (address, id), so an id
//! must never be shown twice, also after a crash that lost records that were not synced, and
//! also for in-memory messages, which the log never records. The address table therefore
//! shows (delivers) only ids covered by a *durable* ID_RESERVATION: it reserves ids in blocks
//! (`broker::address::ID_RESERVATION_BLOCK`, 2^20) and appends the next reservation when half
//! of the current block is used, so the reservation is synced long before its ids are needed
//! and costs one 17-byte record per half block. A message whose id is past the durable
//! reservation (the first ones after a start, or when half a block goes by within one sync)
//! waits for it exactly like a durable message waits for its own record. After a restart,
//! [`Recovery::message_id_high_water`] (the highest reservation or logged id) is where ids
//! continue; a crash skips at most one block of ids. Every segment start carries the highest
//! reservation on, so deleting old segments never forgets it. (A per-start epoch in the high
//! bits of the id would cost no record at all, but it needs a fixed split of the 64 bits
//! between restarts and messages per start, and either can run out.)
//!
//! # Format versions
//!
//! Version 2 added ID_RESERVATION. A version 1 segment (written before) is read as it is and
//! never appended to: the first record after the start opens a version 2 segment, and the
//! version 1 one is deleted once its messages are settled, as usual. A segment of a version
//! newer than this build reads is refused at start-up, naming the version and what to do.
//!
//! Why the checksum covers more than the record: the length field, so a damaged length is
//! caught by the checksum rather than by luck; the offset and the per-segment salt, so that a
//! record is valid only where it was written. When recovery resynchronises after damage by
//! trying every following byte offset, bytes that merely *look* like a record (a message body
//! that contains an encoded record, or data left from another segment) cannot pass: without the
//! salt a publisher cannot forge a record, and a torn tail whose body happens to embed one is
//! still recognised as a torn tail rather than as mid-log corruption.
//!
//! Redelivery counts are not logged (no DELIVERY_COUNT kind): after a restart every recovered
//! message may have been delivered before, and is delivered again marked redelivered.
//!
//! # Durability contract
//!
//! A record is durable when [`DurableLog::durable_lsn`] reaches its Lsn: its bytes were written
//! and `fdatasync`ed, and the segment file's header and directory entry were synced before any
//! record went into it. Recovery returns every durable MESSAGE without a durable SETTLED
//! record. Damage to the last record(s) of the newest segment is indistinguishable from a
//! write cut short by a crash, and is truncated with a report line; damage anywhere else is
//! refused (or skipped, in [`RecoveryMode::SkipCorrupt`]), never silently dropped.

pub mod commit;
pub mod log;
pub mod record;
pub mod recovery;

// These tests do file IO, flock and io_uring (monoio), which Miri cannot run; the sans-IO unit
// tests of `record` and `recovery` run under Miri (scripts/miri.sh).
#[cfg(all(test, not(miri)))]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

pub use commit::{CommitStats, GroupCommitter, LatencyHistogram, LATENCY_BUCKETS_SECONDS};
pub use log::{CommitBatch, CommitOutcome, DurableLog, LogStats, Lsn, SegmentId};
pub use record::MAX_RECORD_BYTES;
pub use recovery::open;

use crate::ids::ShardId;
use crate::mbws::Properties;

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest allowed `segment_bytes` (small segments are for tests).
pub const MIN_SEGMENT_BYTES: u64 = 1024;
/// Largest allowed `segment_bytes`: recovery reads one whole segment into memory at a time.
pub const MAX_SEGMENT_BYTES: u64 = 1024 * 1024 * 1024;
/// Default bound on one batch (one write and one `fdatasync`): 1 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Largest allowed `max_batch_bytes`: 64 MiB.
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Largest allowed `max_batch_delay`: a durable publish waits at most this long for company.
pub const MAX_BATCH_DELAY: Duration = Duration::from_secs(1);

/// What recovery does with damaged records that valid records follow (damage that cannot be
/// a torn write, so it may have hit acknowledged data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open, naming the file, the offset and the ways forward.
    #[default]
    Strict,
    /// Skip the damaged bytes, keep every valid record, repair the file (the original is kept
    /// beside it as `.corrupt-<unix ms>`), and say so loudly in the report.
    SkipCorrupt,
}

/// Where and how a shard's log is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The data directory; shard N keeps its log in `<dir>/shard-N/`.
    pub dir: PathBuf,
    /// A segment rolls when the next record would take it past this size (bytes).
    pub segment_bytes: u64,
    /// Most record bytes written by one batch (one write, one `fdatasync`); a single larger
    /// record goes alone.
    pub max_batch_bytes: usize,
    /// Group-commit window: how long the committer waits for more records once one is
    /// pending, unless `max_batch_bytes` fill first. Zero commits as soon as the previous
    /// sync returns (records appended during a sync still share the next one).
    pub max_batch_delay: Duration,
    pub recovery: RecoveryMode,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, 1 MiB batches, no batch delay, strict recovery.
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_batch_delay: Duration::ZERO,
            recovery: RecoveryMode::Strict,
        }
    }

    pub fn validate(&self) -> Result<(), StoreError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(StoreError::InvalidConfig(format!(
                "log segment_bytes {} is out of range: use {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        if !(1..=MAX_BATCH_BYTES).contains(&self.max_batch_bytes) {
            return Err(StoreError::InvalidConfig(format!(
                "log max_batch_bytes {} is out of range: use 1..={MAX_BATCH_BYTES}",
                self.max_batch_bytes
            )));
        }
        if self.max_batch_delay > MAX_BATCH_DELAY {
            return Err(StoreError::InvalidConfig(format!(
                "log max_batch_delay {:?} is too long: durable publishes would wait that long for an \
                 answer; use at most {MAX_BATCH_DELAY:?}",
                self.max_batch_delay
            )));
        }
        Ok(())
    }
}

/// A message that was durable and not settled when the log was last closed (or crashed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub address: Bytes,
    pub message_id: u64,
    /// Wall clock, Unix milliseconds; 0 = never.
    pub expires_at_unix_ms: u64,
    pub properties: Properties,
    pub body: Bytes,
}

/// What [`open`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Unsettled messages, in log order (so per address in publish order). Each owns compact
    /// allocations of its own (no segment buffer is kept alive).
    pub messages: Vec<RecoveredMessage>,
    /// Highest message id ever logged per address, settled or not.
    pub last_message_id: HashMap<Bytes, u64>,
    /// Every message id of the shard at or below this may have been handed out before the
    /// restart (logged, or covered by an ID_RESERVATION): new ids continue above it.
    pub message_id_high_water: u64,
    /// Bytes cut from the end of the log: a write a crash interrupted.
    pub truncated_bytes: u64,
    /// Bytes of damaged records skipped in [`RecoveryMode::SkipCorrupt`].
    pub skipped_corrupt_bytes: u64,
    /// One line per thing recovery changed or dropped: which file, which offset, how much.
    /// Empty after a clean shutdown.
    pub report: Vec<String>,
}

/// Everything that can go wrong, each saying what happened, where, and what to do.
#[derive(Debug)]
pub enum StoreError {
    InvalidConfig(String),
    /// The data directory cannot be created or written.
    Unusable {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// Another process holds the log's lock.
    Locked {
        path: PathBuf,
    },
    /// Reading, writing or syncing a log file failed.
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// Damaged records that valid records follow (refused in [`RecoveryMode::Strict`]).
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    /// A segment file whose header names another shard or segment number.
    ForeignSegment {
        path: PathBuf,
        detail: String,
    },
    /// A message too large for the record format.
    RecordTooLarge {
        address: String,
        field: &'static str,
        bytes: usize,
        max_bytes: usize,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::InvalidConfig(reason) => write!(f, "{reason}"),
            StoreError::Unusable { path, action, source } => write!(
                f,
                "cannot use {} for the message log: {action} failed: {source}. Point the data directory \
                 (--data-dir) at a directory this user can create and write to (on a local filesystem with free space)",
                path.display()
            ),
            StoreError::Locked { path } => write!(
                f,
                "the message log in {} is in use by another process (its LOCK file is locked): is another \
                 broker running with the same data directory? Stop it, or give this broker a data \
                 directory of its own",
                path.display()
            ),
            StoreError::Io { path, action, source } => {
                write!(f, "message log: {action} {} failed: {source}", path.display())
            }
            StoreError::Corrupt { path, offset, detail } => {
                let file = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
                let dir = path.parent().map(|dir| dir.display().to_string()).unwrap_or_default();
                write!(
                    f,
                    "message log segment {} is damaged at byte offset {offset}: {detail}. Valid records \
                     follow the damage, so it is not a write cut short by a crash: records that may have \
                     been acknowledged are affected. To start anyway, either (1) move {file} out of {dir} \
                     (every message in that segment is lost), or (2) restart with the log recovery mode \
                     set to skip-corrupt (--log-recovery skip-corrupt), which skips only the damaged bytes, keeps every valid record, \
                     and keeps the original file beside the repaired one as {file}.corrupt-<unix ms>",
                    path.display()
                )
            }
            StoreError::ForeignSegment { path, detail } => write!(
                f,
                "{} does not belong in this log: {detail}. It was moved or renamed: put it back where \
                 it came from, or move it out of {}",
                path.display(),
                path.parent().map(|dir| dir.display().to_string()).unwrap_or_default()
            ),
            StoreError::RecordTooLarge { address, field, bytes, max_bytes } => write!(
                f,
                "durable message for address \"{address}\": its {field} is {bytes} bytes, over the \
                 durable log's limit of {max_bytes} for one record; send it without durable (or start \
                 the broker with a lower --max-message-bytes, so such messages are refused at once)"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unusable { source, .. } | StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// `<dir>/shard-<N>`.
pub fn shard_dir(dir: &Path, shard: ShardId) -> PathBuf {
    dir.join(format!("shard-{}", shard.0))
}

/// `<shard dir>/<20-digit segment number>.log`.
pub fn segment_path(shard_dir: &Path, segment: SegmentId) -> PathBuf {
    shard_dir.join(segment_file_name(segment))
}

fn segment_file_name(segment: SegmentId) -> String {
    format!("{:020}.log", segment.0)
}

/// The segment number of a file named like [`segment_path`], if it is one.
fn parse_segment_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(SegmentId)
}
