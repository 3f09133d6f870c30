//! [`DurableLog`]: the sans-IO core of a shard's log.
//!
//! It owns what the shard knows about its log and never touches a file: appends are encoded
//! into in-memory batches ([`CommitBatch`]), the IO shell writes and syncs them, and reports
//! back with [`DurableLog::batch_committed`], which advances the durable [`Lsn`] and says which
//! segment files may now be deleted.
//!
//! Invariants (the first two asserted, the others kept by construction and tested):
//! - at most one batch is in flight, and batches come back in the order they were taken, so
//!   "durable up to Lsn n" means every record with Lsn <= n is on disk;
//! - a batch never spans two segments, and a segment never grows past `segment_bytes` unless
//!   a single record is larger than that (it then sits alone in its segment);
//! - the first records of every segment are LAST_IDS records naming the highest message id of
//!   every address the log knows, then (format version 2) an ID_RESERVATION record with the
//!   highest id reservation so far, so the newest segment alone is enough to keep ids from
//!   repeating after older segments are deleted. A segment is *established* once the record
//!   that follows its LAST_IDS records is durable (then all of them are); since version 2 that
//!   record is the ID_RESERVATION that ends them;
//! - records go only into a segment of the current format version: a version 1 segment found
//!   at start-up is read, and the first append starts a new segment;
//! - a segment is deleted only when (1) it is older than the newest established segment (so
//!   never the active one, and never before the ids it carries are durable elsewhere),
//!   (2) every MESSAGE record in it has a durable SETTLED record, and (3) every older segment
//!   whose messages it settles was deleted before this commit (see
//!   `SegmentState::settles_into`): deleting a SETTLED record while the message it settles
//!   is still on disk would bring that message back at the next start.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::record::{self, MessageFields, Record, SegmentHeader, FORMAT_VERSION, SEGMENT_HEADER_BYTES};
use super::{segment_path, LogConfig, StoreError};
use crate::ids::ShardId;
use crate::mbws::Properties;

/// Log sequence number: the position of a record in the order this process appended it,
/// 1, 2, 3... (0 = nothing yet). Not stored on disk; it only matches appends to commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Number of a segment file (its file name), 1, 2, 3... in the order the segments were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u64);

/// Largest LAST_IDS record written at a segment start; more addresses take more records.
const MAX_LAST_IDS_RECORD_BYTES: usize = 1024 * 1024;

/// Buffers kept for reuse by later batches (each up to `max_batch_bytes`).
const SPARE_BUFFERS: usize = 2;

/// Per-segment accounting.
#[derive(Debug, Default, Clone)]
pub(crate) struct SegmentState {
    /// MESSAGE records in this segment without a durable SETTLED record.
    pub live_messages: u64,
    /// Older segments holding messages that SETTLED records in this segment settle. This
    /// segment may be deleted only after all of them are.
    pub settles_into: BTreeSet<SegmentId>,
}

/// What the log knows about one address.
#[derive(Debug, Default, Clone)]
pub(crate) struct AddressLog {
    /// Highest message id ever recorded for the address, settled or not.
    pub last_message_id: u64,
    /// Unsettled messages (durable or still pending) and the segment holding each.
    pub live: HashMap<u64, SegmentId>,
}

/// The segment new records go to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActiveSegment {
    pub id: SegmentId,
    /// Its format version; records are appended only to a segment of [`FORMAT_VERSION`].
    pub version: u16,
    pub salt: u64,
    /// File size once every pending record is written.
    pub end: u64,
}

/// What recovery hands the core (and what a fresh, file-less log starts from).
#[derive(Debug, Default)]
pub(crate) struct LogState {
    pub segments: BTreeMap<SegmentId, SegmentState>,
    pub addresses: HashMap<Bytes, AddressLog>,
    pub active: Option<ActiveSegment>,
    /// The highest ID_RESERVATION recorded (0 for none): message ids of the shard up to it
    /// may have been handed out.
    pub reserved_message_ids: u64,
    /// Recovery: the active segment holds the highest reservation and every address's last id
    /// (as each segment the log starts does), so older segments may be deleted. When it does
    /// not (a log this build did not write, or one whose leading records were skipped as
    /// corrupt), they stay until a new segment carries both.
    pub active_carries_last_ids: bool,
}

impl LogState {
    /// Every address that has had a message, with the highest message id it was given.
    pub fn last_message_ids(&self) -> impl Iterator<Item = (Bytes, u64)> + '_ {
        self.addresses
            .iter()
            .filter(|(_, entry)| entry.last_message_id > 0)
            .map(|(address, entry)| (address.clone(), entry.last_message_id))
    }

    /// Every message id of the shard at or below this may have been handed out: the highest
    /// id reservation or logged id.
    pub fn message_id_high_water(&self) -> u64 {
        let logged = self.addresses.values().map(|entry| entry.last_message_id).max().unwrap_or(0);
        logged.max(self.reserved_message_ids)
    }
}

/// A batch of records being filled, or taken and in flight.
#[derive(Debug)]
struct PendingBatch {
    segment: SegmentId,
    file_offset: u64,
    bytes: Vec<u8>,
    /// Header of a segment that does not exist yet: the batch creates it.
    new_segment_header: Option<[u8; SEGMENT_HEADER_BYTES]>,
    first_lsn: Lsn,
    last_lsn: Lsn,
    records: u32,
}

/// Records to write at one place of one segment file, then sync. Produced by
/// [`DurableLog::take_batch`], handed back to [`DurableLog::batch_committed`] once it is on
/// disk.
///
/// The contract for whoever writes it (the shell in `commit.rs` does exactly this):
/// 1. if [`new_segment_header`](Self::new_segment_header) is `Some`, create the file (it must
///    not exist), write the header at offset 0, `fdatasync` the file and `fsync` the
///    directory, so that a segment holding records always has a durable header and entry;
/// 2. write [`bytes`](Self::bytes) at [`file_offset`](Self::file_offset), then `fdatasync`;
/// 3. call `batch_committed`; delete the files it lists and `fsync` the directory, before the
///    next `batch_committed`.
#[derive(Debug)]
pub struct CommitBatch {
    pub(super) segment: SegmentId,
    pub(super) path: PathBuf,
    pub(super) file_offset: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) new_segment_header: Option<[u8; SEGMENT_HEADER_BYTES]>,
    pub(super) first_lsn: Lsn,
    pub(super) last_lsn: Lsn,
    pub(super) records: u32,
    byte_count: usize,
}

impl CommitBatch {
    pub fn segment(&self) -> SegmentId {
        self.segment
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn new_segment_header(&self) -> Option<&[u8; SEGMENT_HEADER_BYTES]> {
        self.new_segment_header.as_ref()
    }
    pub fn first_lsn(&self) -> Lsn {
        self.first_lsn
    }
    pub fn last_lsn(&self) -> Lsn {
        self.last_lsn
    }
    pub fn records(&self) -> u32 {
        self.records
    }
}

/// What a commit changed.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Every record with this Lsn or lower is durable.
    pub durable_lsn: Lsn,
    /// Segment files that are no longer needed: delete them, then `fsync` the directory.
    pub delete_segments: Vec<PathBuf>,
}

/// Counters since the log was opened.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LogStats {
    pub batches: u64,
    pub records: u64,
    /// Record bytes written (segment headers excluded).
    pub bytes: u64,
    /// `fdatasync`/`fsync` calls the commit contract requires: one per batch, two more per
    /// new segment (file and directory), one per round of deletions (directory).
    pub fsyncs: u64,
    /// The most records one batch carried.
    pub largest_batch_records: u32,
    pub segments_created: u64,
    pub segments_deleted: u64,
}

impl LogStats {
    /// Average records made durable per batch (each batch is one `fdatasync`).
    pub fn records_per_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.records as f64 / self.batches as f64
        }
    }
}

/// A SETTLED record whose accounting waits for it to become durable.
#[derive(Debug)]
struct PendingSettle {
    lsn: Lsn,
    message_segment: SegmentId,
    settled_in: SegmentId,
}

/// The durable log of one shard (see the module docs). Single-threaded: the shard that owns
/// the addresses owns their log.
#[derive(Debug)]
pub struct DurableLog {
    config: LogConfig,
    shard: ShardId,
    shard_dir: PathBuf,
    state: LogState,
    pending: VecDeque<PendingBatch>,
    pending_bytes: usize,
    in_flight: Option<Lsn>,
    settles: VecDeque<PendingSettle>,
    next_lsn: u64,
    durable_lsn: Lsn,
    /// Newest *established* segment: its LAST_IDS records and the record after them are
    /// durable. Older segments are complete on disk and may be deleted; the established one
    /// alone carries every address's last id.
    established_segment: Option<SegmentId>,
    /// The segment being established and the Lsn of its first record after LAST_IDS.
    establishing: Option<(SegmentId, Lsn)>,
    /// Set when something happened that may make a segment deletable.
    deletion_check_needed: bool,
    spare_buffers: Vec<Vec<u8>>,
    salt_seed: u64,
    stats: LogStats,
    failure: Option<String>,
    /// The open `LOCK` file (flock held) of a log opened from disk.
    _lock: Option<std::fs::File>,
}

impl DurableLog {
    /// A log with no files behind it yet: the first append creates segment 1. `open` builds
    /// the log from what it recovered instead; this is for tests of the core.
    pub fn new(config: LogConfig, shard: ShardId) -> Result<DurableLog, StoreError> {
        config.validate()?;
        Ok(DurableLog::from_state(config, shard, LogState::default(), None))
    }

    pub(crate) fn from_state(
        config: LogConfig,
        shard: ShardId,
        state: LogState,
        lock: Option<std::fs::File>,
    ) -> DurableLog {
        let shard_dir = super::shard_dir(&config.dir, shard);
        // Recovery hands over an established active segment (it removes one that is not),
        // unless the segment lacks the last ids and reservation the deleted ones would take along.
        let established_segment = state.active.filter(|_| state.active_carries_last_ids).map(|active| active.id);
        DurableLog {
            config,
            shard,
            shard_dir,
            state,
            pending: VecDeque::new(),
            pending_bytes: 0,
            in_flight: None,
            settles: VecDeque::new(),
            next_lsn: 1,
            durable_lsn: Lsn(0),
            established_segment,
            establishing: None,
            deletion_check_needed: true,
            spare_buffers: Vec::new(),
            salt_seed: RandomState::new().hash_one(shard.0),
            stats: LogStats::default(),
            failure: None,
            _lock: lock,
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The directory holding this shard's segments.
    pub fn shard_dir(&self) -> &Path {
        &self.shard_dir
    }

    /// Records a durable message (buffered; durable once the returned Lsn is committed).
    /// Refuses a message the record format cannot hold (a field over 65,535 bytes or a record
    /// over [`MAX_RECORD_BYTES`](super::MAX_RECORD_BYTES)), with an error naming the field.
    pub fn append_message(
        &mut self,
        address: &[u8],
        message_id: u64,
        expires_at_unix_ms: u64,
        properties: &Properties,
        body: &[u8],
    ) -> Result<Lsn, StoreError> {
        let record = Record::Message(MessageFields {
            address,
            message_id,
            expires_at_unix_ms,
            content_type: &properties.content_type,
            correlation_id: &properties.correlation_id,
            reply_to: &properties.reply_to,
            headers: properties.headers.iter().map(|(name, value)| (&name[..], &value[..])).collect(),
            body,
        });
        record::check_fits(&record).map_err(|too_large| StoreError::RecordTooLarge {
            address: String::from_utf8_lossy(address).into_owned(),
            field: too_large.field,
            bytes: too_large.bytes,
            max_bytes: too_large.max_bytes,
        })?;
        let (lsn, segment) = self.push_record(&record);
        if !self.state.addresses.contains_key(address) {
            self.state.addresses.insert(Bytes::copy_from_slice(address), AddressLog::default());
        }
        let entry = self.state.addresses.get_mut(address).expect("inserted above");
        entry.last_message_id = entry.last_message_id.max(message_id);
        let replaced = entry.live.insert(message_id, segment);
        self.segment_mut(segment).live_messages += 1;
        if let Some(older) = replaced {
            // The same id logged twice without a settle in between: the newer record wins.
            debug_assert!(false, "message id {message_id} appended twice");
            self.segment_mut(older).live_messages -= 1;
        }
        Ok(lsn)
    }

    /// Records that a message is done with (acknowledged, rejected, expired, dead-lettered).
    /// Returns `None`, writing nothing, when the log holds no unsettled record of that message
    /// (it was not durable, or is already settled): call it for every settled message.
    /// Nobody needs to wait for this record: losing it in a crash only redelivers the message.
    pub fn append_settled(&mut self, address: &[u8], message_id: u64) -> Option<Lsn> {
        let message_segment = self.state.addresses.get_mut(address)?.live.remove(&message_id)?;
        let (lsn, settled_in) = self.push_record(&Record::Settled { address, message_id });
        self.settles.push_back(PendingSettle { lsn, message_segment, settled_in });
        Some(lsn)
    }

    /// Records that message ids of this shard up to `reserved_up_to` may be handed out (see
    /// `broker::address` for when to call it). Once the returned Lsn is durable, a restart
    /// continues ids above it. Returns `None`, writing nothing, when an equal or higher
    /// reservation is already recorded.
    pub fn append_id_reservation(&mut self, reserved_up_to: u64) -> Option<Lsn> {
        if reserved_up_to <= self.state.reserved_message_ids {
            return None;
        }
        // Set first, so that a segment this record starts carries it in its own start.
        self.state.reserved_message_ids = reserved_up_to;
        let (lsn, _) = self.push_record(&Record::IdReservation { reserved_up_to });
        Some(lsn)
    }

    /// Every message id of this shard at or below this may have been handed out (recovered
    /// plus appended since): the highest id reservation or logged id.
    pub fn message_id_high_water(&self) -> u64 {
        self.state.message_id_high_water()
    }

    /// Highest message id ever logged for `address` (settled or not; 0 for none). The address
    /// table continues from it when it recreates an address it had dropped while idle.
    pub fn last_message_id(&self, address: &[u8]) -> u64 {
        self.state.addresses.get(address).map_or(0, |entry| entry.last_message_id)
    }

    /// True when records wait to be taken by [`take_batch`](Self::take_batch).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Record bytes waiting to be taken.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// True while a taken batch has not come back through `batch_committed`.
    pub fn has_batch_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Every record with this Lsn or lower is durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable_lsn
    }

    /// Lsn of the newest record appended (durable or not).
    pub fn last_appended_lsn(&self) -> Lsn {
        Lsn(self.next_lsn - 1)
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// Number of segment files the log holds (or is about to create).
    pub fn segment_count(&self) -> usize {
        self.state.segments.len()
    }

    /// Why the log stopped committing, if it did (a failed write or sync: see `commit.rs`).
    /// Once set, nothing appended is ever committed: refuse durable publishes and restart.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub(crate) fn set_failure(&mut self, reason: String) {
        self.failure.get_or_insert(reason);
    }

    /// Takes the oldest batch of buffered records: at most `max_batch_bytes` of them (a single
    /// larger record goes alone), all in one segment. `None` when nothing is buffered or a
    /// batch is already in flight (one at a time keeps commits in order).
    pub fn take_batch(&mut self) -> Option<CommitBatch> {
        if self.in_flight.is_some() || self.failure.is_some() {
            return None;
        }
        let batch = self.pending.pop_front()?;
        debug_assert!(batch.records > 0, "a batch without records was queued");
        self.pending_bytes -= batch.bytes.len();
        self.in_flight = Some(batch.last_lsn);
        Some(CommitBatch {
            segment: batch.segment,
            path: segment_path(&self.shard_dir, batch.segment),
            file_offset: batch.file_offset,
            byte_count: batch.bytes.len(),
            bytes: batch.bytes,
            new_segment_header: batch.new_segment_header,
            first_lsn: batch.first_lsn,
            last_lsn: batch.last_lsn,
            records: batch.records,
        })
    }

    /// The shell wrote and synced `batch`: everything up to its last Lsn is durable. Applies
    /// the settles it made durable and returns the segment files that may now be deleted.
    pub fn batch_committed(&mut self, mut batch: CommitBatch) -> CommitOutcome {
        assert_eq!(
            self.in_flight,
            Some(batch.last_lsn),
            "batch_committed with a batch that is not the one in flight (batches must come back in order)"
        );
        assert_eq!(batch.first_lsn.0, self.durable_lsn.0 + 1, "a batch was skipped");
        self.in_flight = None;
        self.durable_lsn = batch.last_lsn;
        self.stats.batches += 1;
        self.stats.records += u64::from(batch.records);
        self.stats.bytes += batch.byte_count as u64;
        self.stats.fsyncs += 1;
        self.stats.largest_batch_records = self.stats.largest_batch_records.max(batch.records);
        if batch.new_segment_header.is_some() {
            self.stats.fsyncs += 2;
        }
        if let Some((segment, first_record)) = self.establishing {
            if batch.last_lsn >= first_record {
                self.established_segment = Some(segment);
                self.establishing = None;
                self.deletion_check_needed = true;
            }
        }
        while self.settles.front().is_some_and(|settle| settle.lsn <= batch.last_lsn) {
            let settle = self.settles.pop_front().expect("front exists");
            let message_segment = self.segment_mut(settle.message_segment);
            message_segment.live_messages -= 1;
            if message_segment.live_messages == 0 {
                self.deletion_check_needed = true;
            }
            if settle.settled_in != settle.message_segment {
                self.segment_mut(settle.settled_in).settles_into.insert(settle.message_segment);
            }
        }
        let delete_segments = self.collect_deletable();
        if !delete_segments.is_empty() {
            self.stats.fsyncs += 1;
        }
        let mut buffer = std::mem::take(&mut batch.bytes);
        if self.spare_buffers.len() < SPARE_BUFFERS && buffer.capacity() <= 2 * self.config.max_batch_bytes {
            buffer.clear();
            self.spare_buffers.push(buffer);
        }
        CommitOutcome { durable_lsn: self.durable_lsn, delete_segments }
    }

    /// Segments deletable now (see the module invariants), removed from the accounting.
    /// Deletions one of them enables are found at the next commit, after the shell has made
    /// these durable.
    fn collect_deletable(&mut self) -> Vec<PathBuf> {
        let Some(established) = self.established_segment else { return Vec::new() };
        if !self.deletion_check_needed {
            return Vec::new();
        }
        self.deletion_check_needed = false;
        let deletable = deletable_segments(&self.state.segments, established);
        if deletable.is_empty() {
            return Vec::new();
        }
        for id in &deletable {
            self.state.segments.remove(id);
        }
        // A segment that settles into the ones just deleted may go at the next commit.
        self.deletion_check_needed = true;
        self.stats.segments_deleted += deletable.len() as u64;
        deletable.into_iter().map(|id| segment_path(&self.shard_dir, id)).collect()
    }

    fn segment_mut(&mut self, id: SegmentId) -> &mut SegmentState {
        self.state.segments.get_mut(&id).expect("accounting refers to a segment the log does not hold")
    }

    /// Encodes `record` at the end of the active segment (rolling first when it would not
    /// fit), into the last pending batch when that has room.
    fn push_record(&mut self, record: &Record<'_>) -> (Lsn, SegmentId) {
        let length = record::encoded_len(record) as u64;
        let must_roll = match self.state.active {
            None => true,
            Some(active) if active.version != FORMAT_VERSION => true,
            Some(active) => active.end > SEGMENT_HEADER_BYTES as u64 && active.end + length > self.config.segment_bytes,
        };
        if must_roll {
            self.start_segment();
        }
        self.encode_into_pending(record, length)
    }

    /// Makes a new segment the active one: its header goes with its first batch, followed
    /// by LAST_IDS records for every known address and the ID_RESERVATION that ends them.
    fn start_segment(&mut self) {
        let id = SegmentId(match (self.state.active, self.state.segments.last_key_value()) {
            (Some(active), _) => active.id.0 + 1,
            (None, Some((last, _))) => last.0 + 1,
            (None, None) => 1,
        });
        let salt = splitmix64(self.salt_seed ^ id.0);
        let header = SegmentHeader { version: FORMAT_VERSION, shard: self.shard.0, segment: id.0, salt }.encode();
        self.state.segments.insert(id, SegmentState::default());
        self.state.active = Some(ActiveSegment { id, version: FORMAT_VERSION, salt, end: SEGMENT_HEADER_BYTES as u64 });
        let bytes = self.spare_buffers.pop().unwrap_or_default();
        self.pending.push_back(PendingBatch {
            segment: id,
            file_offset: SEGMENT_HEADER_BYTES as u64,
            bytes,
            new_segment_header: Some(header),
            first_lsn: Lsn(self.next_lsn),
            last_lsn: Lsn(0),
            records: 0,
        });
        self.stats.segments_created += 1;

        let mut known: Vec<(Bytes, u64)> = self.state.last_message_ids().collect();
        known.sort(); // deterministic segment contents
        let mut chunk: Vec<(&[u8], u64)> = Vec::new();
        let mut chunk_bytes = 0;
        for (address, last_id) in &known {
            let entry_bytes = 8 + 2 + address.len();
            if !chunk.is_empty() && chunk_bytes + entry_bytes > MAX_LAST_IDS_RECORD_BYTES {
                let record = Record::LastIds(std::mem::take(&mut chunk));
                let length = record::encoded_len(&record) as u64;
                self.encode_into_pending(&record, length);
                chunk_bytes = 0;
            }
            chunk.push((address, *last_id));
            chunk_bytes += entry_bytes;
        }
        if !chunk.is_empty() {
            let record = Record::LastIds(chunk);
            let length = record::encoded_len(&record) as u64;
            self.encode_into_pending(&record, length);
        }
        let end_of_last_ids = Record::IdReservation { reserved_up_to: self.state.reserved_message_ids };
        let length = record::encoded_len(&end_of_last_ids) as u64;
        let (lsn, _) = self.encode_into_pending(&end_of_last_ids, length);
        self.establishing = Some((id, lsn));
    }

    fn encode_into_pending(&mut self, record: &Record<'_>, length: u64) -> (Lsn, SegmentId) {
        let active = self.state.active.as_mut().expect("an active segment exists before encoding");
        let offset = active.end;
        let fits_last = self.pending.back().is_some_and(|batch| {
            batch.segment == active.id
                && (batch.records == 0 || batch.bytes.len() + length as usize <= self.config.max_batch_bytes)
        });
        if !fits_last {
            let bytes = self.spare_buffers.pop().unwrap_or_default();
            self.pending.push_back(PendingBatch {
                segment: active.id,
                file_offset: offset,
                bytes,
                new_segment_header: None,
                first_lsn: Lsn(self.next_lsn),
                last_lsn: Lsn(0),
                records: 0,
            });
        }
        let batch = self.pending.back_mut().expect("a pending batch exists");
        // Each record's checksum covers its file offset: a record encoded for another offset than
        // the one it is written at would read back as damage. One compare per durable record.
        assert_eq!(batch.file_offset + batch.bytes.len() as u64, offset, "pending batch is not contiguous");
        record::encode(&mut batch.bytes, record, active.salt, offset);
        active.end += length;
        self.pending_bytes += length as usize;
        let lsn = Lsn(self.next_lsn);
        self.next_lsn += 1;
        batch.last_lsn = lsn;
        batch.records += 1;
        (lsn, active.id)
    }
}

/// Segments older than the established one that may be deleted now: every message in them is
/// settled, and every older segment they settle into is already gone. Judged against the
/// segments as they are before any of the returned ones is removed, so that a segment is
/// deleted only after the deletions it depends on are durable.
pub(crate) fn deletable_segments(
    segments: &BTreeMap<SegmentId, SegmentState>,
    established: SegmentId,
) -> Vec<SegmentId> {
    segments
        .range(..established)
        .filter(|(_, state)| {
            state.live_messages == 0 && state.settles_into.iter().all(|older| !segments.contains_key(older))
        })
        .map(|(id, _)| *id)
        .collect()
}

/// A bijective 64-bit mixer (SplitMix64's finaliser): distinct segment numbers get unrelated
/// salts from one random seed.
fn splitmix64(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}
