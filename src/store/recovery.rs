//! Start-up: [`open`] prepares the shard's log directory and rebuilds the log's state from
//! its segments.
//!
//! Two sans-IO pieces do the thinking, so both are testable on byte slices:
//! - `scan_segment` splits one segment's bytes into valid records, damaged regions that a
//!   valid record follows (corruption), and damage with nothing valid after it (a tail);
//! - `RecoveryFold` replays the records in log order into the unsettled messages, the last id
//!   per address and the per-segment accounting of [`DurableLog`].
//!
//! The IO around them (std::fs, synchronous: this runs once per shard before its event loop
//! starts) decides per file: a tail of the newest segment is truncated (a write that a crash
//! cut short, never acknowledged); damage anywhere else stops `open` in
//! [`RecoveryMode::Strict`], or in [`RecoveryMode::SkipCorrupt`] is skipped and the segment is
//! rewritten without it, the original kept beside it. A record that failed its checksum is
//! never returned. Finally, segments that are fully settled are deleted, as the running log
//! would have.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::log::{deletable_segments, ActiveSegment, AddressLog, DurableLog, LogState, SegmentId, SegmentState};
use super::record::{
    self, kind, HeaderError, Record, SegmentHeader, MAX_RECORD_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use super::{
    parse_segment_file_name, segment_path, shard_dir, LogConfig, RecoveredMessage, Recovery, RecoveryMode, StoreError,
};
use crate::ids::ShardId;
use crate::mbws::Properties;

/// Name of the lock file in a shard's log directory.
const LOCK_FILE: &str = "LOCK";
/// Name of the file written and removed at start-up to prove the directory is writable.
const WRITE_PROBE_FILE: &str = ".write-probe";
/// Suffix of a repaired segment being written (removed at start-up if a crash left one).
const REWRITE_SUFFIX: &str = ".rewrite";

/// Opens shard `shard`'s log in `<config.dir>/shard-<shard>/`: creates the directory, proves
/// it writable, takes its lock, recovers (see the module docs), and returns the log ready for
/// appends with what it recovered. Synchronous: call it before the shard's event loop starts.
pub fn open(config: LogConfig, shard: ShardId) -> Result<(DurableLog, Recovery), StoreError> {
    config.validate()?;
    let dir = shard_dir(&config.dir, shard);
    let lock = prepare_directory(&config.dir, &dir)?;
    let (state, recovery) = recover_files(&config, shard, &dir)?;
    Ok((DurableLog::from_state(config, shard, state, Some(lock)), recovery))
}

/// Creates `dir`, takes its lock and writes a test file, with an error naming the path and
/// the remedy for each way that can fail.
fn prepare_directory(data_dir: &Path, dir: &Path) -> Result<fs::File, StoreError> {
    let unusable = |path: &Path, action: &'static str| {
        let path = path.to_path_buf();
        move |source: io::Error| StoreError::Unusable { path, action, source }
    };
    fs::create_dir_all(dir).map_err(unusable(dir, "creating the directory"))?;
    // The new directory entries must survive a crash like the files in them.
    sync_directory(data_dir).map_err(unusable(data_dir, "syncing the directory"))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(unusable(&lock_path, "creating the lock file"))?;
    // SAFETY: flock only reads its arguments; `lock` owns the descriptor for the whole call.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let error = io::Error::last_os_error();
        return Err(if error.kind() == io::ErrorKind::WouldBlock {
            StoreError::Locked { path: dir.to_path_buf() }
        } else {
            StoreError::Unusable { path: lock_path, action: "locking the lock file", source: error }
        });
    }
    let probe = dir.join(WRITE_PROBE_FILE);
    let write_probe = || -> io::Result<()> {
        let mut file = fs::File::create(&probe)?;
        file.write_all(b"mbws")?;
        file.sync_all()?;
        fs::remove_file(&probe)
    };
    write_probe().map_err(unusable(&probe, "writing a test file"))?;
    sync_directory(dir).map_err(unusable(dir, "syncing the directory"))?;
    Ok(lock)
}

fn sync_directory(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// A run of bytes that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    pub offset: u64,
    pub bytes: u64,
    /// Why the first record there failed.
    pub reason: String,
}

/// What one segment's bytes hold.
#[derive(Debug)]
pub(crate) struct SegmentScan<'a> {
    pub header: Result<SegmentHeader, HeaderError>,
    /// Valid records with their offsets, in file order.
    pub records: Vec<(u64, Record<'a>)>,
    /// Damaged regions that a valid record follows.
    pub corrupt: Vec<Damage>,
    /// Damage at the end of the file with no valid record after it.
    pub tail: Option<Damage>,
}

/// Splits a segment into records and damage (sans-IO). After damage, every following byte
/// offset is tried until one holds a valid record (length, kind and salted checksum all
/// agree), so one flipped byte costs one record, not the rest of the segment.
pub(crate) fn scan_segment(bytes: &[u8]) -> SegmentScan<'_> {
    let mut scan =
        SegmentScan { header: SegmentHeader::decode(bytes), records: Vec::new(), corrupt: Vec::new(), tail: None };
    let Ok(header) = scan.header else { return scan };
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        match record::decode(&bytes[offset..], header.salt, offset as u64) {
            Ok((record, length)) => {
                scan.records.push((offset as u64, record));
                offset += length;
            }
            Err(error) => {
                let damage = |end: usize| Damage {
                    offset: offset as u64,
                    bytes: (end - offset) as u64,
                    reason: error.to_string(),
                };
                match next_valid_record(bytes, offset + 1, header.salt) {
                    Some(next) => {
                        scan.corrupt.push(damage(next));
                        offset = next;
                    }
                    None => {
                        scan.tail = Some(damage(bytes.len()));
                        break;
                    }
                }
            }
        }
    }
    scan
}

/// The first offset at or after `from` where a valid record starts.
fn next_valid_record(bytes: &[u8], from: usize, salt: u64) -> Option<usize> {
    let last_start = bytes.len().checked_sub(RECORD_HEADER_BYTES + 1)?;
    (from..=last_start).find(|&offset| {
        // Cheap filters before the checksum: a plausible length that fits, a known kind.
        let length = u32::from_be_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        let plausible = (1..=MAX_RECORD_BYTES).contains(&length)
            && offset + RECORD_HEADER_BYTES + length <= bytes.len()
            && matches!(
                bytes[offset + RECORD_HEADER_BYTES],
                kind::MESSAGE | kind::SETTLED | kind::LAST_IDS | kind::ID_RESERVATION
            );
        plausible && record::decode(&bytes[offset..], salt, offset as u64).is_ok()
    })
}

/// Replays records in log order into the state the running log needs (sans-IO).
#[derive(Default)]
pub(crate) struct RecoveryFold {
    pub state: LogState,
    /// Unsettled messages in log order; `None` where a later SETTLED record removed one.
    messages: Vec<Option<RecoveredMessage>>,
    slots: HashMap<(Bytes, u64), usize>,
    pub report: Vec<String>,
}

impl RecoveryFold {
    pub fn begin_segment(&mut self, segment: SegmentId) {
        self.state.segments.entry(segment).or_default();
    }

    /// The interned copy of `address` (one allocation per address, shared by its messages).
    fn address(&mut self, address: &[u8]) -> Bytes {
        match self.state.addresses.get_key_value(address) {
            Some((key, _)) => key.clone(),
            None => {
                let key = Bytes::copy_from_slice(address);
                self.state.addresses.insert(key.clone(), AddressLog::default());
                key
            }
        }
    }

    pub fn apply(&mut self, segment: SegmentId, record: &Record<'_>) {
        match record {
            Record::Message(message) => {
                let address = self.address(message.address);
                let entry = self.state.addresses.get_mut(&address).expect("interned");
                entry.last_message_id = entry.last_message_id.max(message.message_id);
                let replaced = entry.live.insert(message.message_id, segment);
                let own = |bytes: &[u8]| Bytes::copy_from_slice(bytes);
                let recovered = RecoveredMessage {
                    address: address.clone(),
                    message_id: message.message_id,
                    expires_at_unix_ms: message.expires_at_unix_ms,
                    properties: Properties {
                        content_type: own(message.content_type),
                        correlation_id: own(message.correlation_id),
                        reply_to: own(message.reply_to),
                        headers: message.headers.iter().map(|(name, value)| (own(name), own(value))).collect(),
                    },
                    body: own(message.body),
                };
                if let Some(older) = replaced {
                    self.report.push(format!(
                        "address \"{}\": message id {} was logged twice without being settled; the later \
                         record is kept",
                        String::from_utf8_lossy(&address),
                        message.message_id
                    ));
                    self.segment_mut(older).live_messages -= 1;
                    if let Some(slot) = self.slots.remove(&(address.clone(), message.message_id)) {
                        self.messages[slot] = None;
                    }
                }
                self.segment_mut(segment).live_messages += 1;
                self.slots.insert((address, message.message_id), self.messages.len());
                self.messages.push(Some(recovered));
            }
            Record::Settled { address, message_id } => {
                let address = self.address(address);
                let entry = self.state.addresses.get_mut(&address).expect("interned");
                entry.last_message_id = entry.last_message_id.max(*message_id);
                // No live message: it was in a segment already deleted, or settled twice.
                if let Some(message_segment) = entry.live.remove(message_id) {
                    self.segment_mut(message_segment).live_messages -= 1;
                    if message_segment != segment {
                        self.segment_mut(segment).settles_into.insert(message_segment);
                    }
                    if let Some(slot) = self.slots.remove(&(address, *message_id)) {
                        self.messages[slot] = None;
                    }
                }
            }
            Record::LastIds(entries) => {
                for (address, last_id) in entries {
                    let address = self.address(address);
                    let entry = self.state.addresses.get_mut(&address).expect("interned");
                    entry.last_message_id = entry.last_message_id.max(*last_id);
                }
            }
            Record::IdReservation { reserved_up_to } => {
                self.state.reserved_message_ids = self.state.reserved_message_ids.max(*reserved_up_to);
            }
        }
    }

    fn segment_mut(&mut self, segment: SegmentId) -> &mut SegmentState {
        self.state.segments.get_mut(&segment).expect("begin_segment was called for every segment")
    }

    /// The unsettled messages in log order, and the last id per address.
    pub fn finish_messages(&mut self) -> (Vec<RecoveredMessage>, HashMap<Bytes, u64>) {
        let messages = std::mem::take(&mut self.messages).into_iter().flatten().collect();
        self.slots = HashMap::new();
        let last_ids = self.state.last_message_ids().collect();
        (messages, last_ids)
    }
}

/// Reads, checks, repairs and replays every segment of the log in `dir`.
fn recover_files(config: &LogConfig, shard: ShardId, dir: &Path) -> Result<(LogState, Recovery), StoreError> {
    let mut recovery = Recovery::default();
    let segments = list_segments(dir, &mut recovery)?;
    let mut fold = RecoveryFold::default();
    let mut kept: Vec<KeptSegment> = Vec::new();
    for (index, &id) in segments.iter().enumerate() {
        let is_newest = index + 1 == segments.len();
        let path = segment_path(dir, id);
        let bytes =
            fs::read(&path).map_err(|source| StoreError::Io { path: path.clone(), action: "reading", source })?;
        let scan = scan_segment(&bytes);
        let header = match scan.header {
            Ok(header) => header,
            Err(HeaderError::Incomplete { .. }) | Err(HeaderError::BadChecksum) | Err(HeaderError::BadMagic)
                if is_newest && bytes.len() <= SEGMENT_HEADER_BYTES =>
            {
                // The shell syncs a new segment's header before any record goes in, so a file
                // this short was being created when the broker stopped and holds nothing.
                remove_file_durably(&path, dir)?;
                recovery.truncated_bytes += bytes.len() as u64;
                recovery.report.push(format!(
                    "{}: removed a segment that was being created when the broker stopped ({} bytes of an \
                     incomplete header, no records)",
                    path.display(),
                    bytes.len()
                ));
                continue;
            }
            Err(error) => {
                let detail =
                    format!("the segment header is unusable ({error}), so none of its records can be verified");
                if config.recovery == RecoveryMode::Strict {
                    return Err(StoreError::Corrupt { path, offset: 0, detail });
                }
                let kept = keep_aside(&path, dir)?;
                recovery.skipped_corrupt_bytes += bytes.len() as u64;
                recovery.report.push(format!(
                    "CORRUPT DATA SKIPPED: {}: {detail}; the whole segment ({} bytes) was moved to {} and every \
                     message in it is LOST",
                    path.display(),
                    bytes.len(),
                    kept.display()
                ));
                continue;
            }
        };
        if header.shard != shard.0 || header.segment != id.0 {
            return Err(StoreError::ForeignSegment {
                path,
                detail: format!(
                    "its header says it is segment {} of shard {}'s log, but this is shard {}'s log and the file \
                     name says segment {}",
                    header.segment, header.shard, shard.0, id.0
                ),
            });
        }
        let tail_is_damage = scan.tail.is_some() && !is_newest;
        let mut length = bytes.len() as u64;
        let repaired = !scan.corrupt.is_empty() || tail_is_damage;
        if repaired {
            let first = scan.corrupt.first().or(scan.tail.as_ref()).expect("some damage");
            if config.recovery == RecoveryMode::Strict {
                let also = scan.corrupt.len() + usize::from(scan.tail.is_some()) - 1;
                let detail = if also > 0 {
                    format!("{} ({also} more damaged region(s) further on)", first.reason)
                } else {
                    first.reason.clone()
                };
                return Err(StoreError::Corrupt { path, offset: first.offset, detail });
            }
            for damage in scan.corrupt.iter().chain(&scan.tail) {
                recovery.skipped_corrupt_bytes += damage.bytes;
                recovery.report.push(format!(
                    "CORRUPT DATA SKIPPED: {}: {} bytes at offset {} ({}); any message recorded there is LOST, \
                     any settle recorded there is undone (that message will be delivered again)",
                    path.display(),
                    damage.bytes,
                    damage.offset,
                    damage.reason
                ));
            }
            let kept;
            (length, kept) = rewrite_segment(&path, dir, header, &scan.records)?;
            recovery.report.push(format!(
                "{}: rewritten with its {} valid records; the damaged original is kept as {}",
                path.display(),
                scan.records.len(),
                kept.display()
            ));
        } else if let Some(tail) = &scan.tail {
            truncate_file(&path, tail.offset)?;
            length = tail.offset;
            recovery.truncated_bytes += tail.bytes;
            recovery.report.push(format!(
                "{}: dropped {} bytes at offset {}, the end of the log ({}): a write that a crash cut short, \
                 never acknowledged",
                path.display(),
                tail.bytes,
                tail.offset,
                tail.reason
            ));
        }
        fold.begin_segment(id);
        for (_, record) in &scan.records {
            fold.apply(id, record);
        }
        let established = scan.records.iter().any(|(_, record)| !matches!(record, Record::LastIds(_)));
        let last_ids = SegmentLastIds::of(&scan.records);
        kept.push(KeptSegment {
            id,
            version: header.version,
            salt: header.salt,
            length,
            established,
            repaired,
            last_ids,
        });
    }

    // A newest segment holding nothing but (some of) its LAST_IDS records was started just
    // before the broker stopped. It was never established, so no older segment was deleted on
    // its account: they hold everything it could. Continuing in it would make it the holder
    // of the last ids although some of its LAST_IDS records may be missing; it goes instead.
    // (Unless the segments before it do not hold those ids after all: a log this build did not
    // write. Then it stays, and `active_carries_last_ids` below keeps the older ones too.)
    if let [.., previous, newest] = kept.as_slice() {
        if !newest.established && !newest.repaired && previous.last_ids.carry(&fold.state) {
            let path = segment_path(dir, newest.id);
            remove_file_durably(&path, dir)?;
            fold.state.segments.remove(&newest.id);
            recovery.report.push(format!(
                "{}: removed a segment started just before the broker stopped; it held only a copy of the \
                 last message ids ({} bytes), so nothing was lost",
                path.display(),
                newest.length
            ));
            kept.pop();
        }
    }

    if let Some(KeptSegment { id, version, salt, length: end, last_ids, .. }) = kept.last() {
        let (id, version, salt, end) = (*id, *version, *salt, *end);
        fold.state.active = Some(ActiveSegment { id, version, salt, end });
        fold.state.active_carries_last_ids = last_ids.carry(&fold.state);
        if !fold.state.active_carries_last_ids {
            recovery.report.push(format!(
                "{}: the newest segment does not repeat the highest message ids of the older segments, so \
                 no older segment is deleted until a new segment does",
                segment_path(dir, id).display()
            ));
        }
        // The newest segment stays (new records go there); older settled ones go now, as the
        // running log would have deleted them. One directory sync per round, so a segment is
        // removed only after the removals it depends on are durable.
        while fold.state.active_carries_last_ids {
            let deletable = deletable_segments(&fold.state.segments, id);
            if deletable.is_empty() {
                break;
            }
            for segment in deletable {
                let path = segment_path(dir, segment);
                fs::remove_file(&path).map_err(|source| StoreError::Io {
                    path,
                    action: "deleting the fully settled segment",
                    source,
                })?;
                fold.state.segments.remove(&segment);
            }
            sync_directory(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                action: "syncing the directory",
                source,
            })?;
        }
    }
    let (messages, last_message_id) = fold.finish_messages();
    recovery.messages = messages;
    recovery.last_message_id = last_message_id;
    recovery.message_id_high_water = fold.state.message_id_high_water();
    recovery.report.append(&mut fold.report);
    Ok((fold.state, recovery))
}

/// A segment that recovery kept.
struct KeptSegment {
    id: SegmentId,
    /// Format version (a segment of an older version is read, never appended to).
    version: u16,
    salt: u64,
    /// File length after any truncation or repair.
    length: u64,
    /// Holds a record after its LAST_IDS records (so all of those are there).
    established: bool,
    /// Rewritten without damaged records.
    repaired: bool,
    last_ids: SegmentLastIds,
}

/// The message ids one segment's own records vouch for: what must not be forgotten when the
/// segments before it are deleted.
#[derive(Default)]
struct SegmentLastIds {
    /// Highest ID_RESERVATION or logged message id in the segment.
    high_water: u64,
    /// Highest id per address, from its LAST_IDS and MESSAGE records.
    per_address: HashMap<Bytes, u64>,
}

impl SegmentLastIds {
    fn of(records: &[(u64, Record<'_>)]) -> SegmentLastIds {
        let mut ids = SegmentLastIds::default();
        let note = |ids: &mut SegmentLastIds, address: &[u8], id: u64| {
            ids.high_water = ids.high_water.max(id);
            let last = ids.per_address.entry(Bytes::copy_from_slice(address)).or_default();
            *last = (*last).max(id);
        };
        for (_, record) in records {
            match record {
                Record::Message(message) => note(&mut ids, message.address, message.message_id),
                Record::LastIds(entries) => entries.iter().for_each(|(address, id)| note(&mut ids, address, *id)),
                Record::IdReservation { reserved_up_to } => ids.high_water = ids.high_water.max(*reserved_up_to),
                Record::Settled { .. } => {}
            }
        }
        ids
    }

    /// Whether the segment repeats the log's highest reservation and every address's last id.
    fn carry(&self, state: &LogState) -> bool {
        self.high_water >= state.message_id_high_water()
            && state
                .last_message_ids()
                .all(|(address, last)| self.per_address.get(&address).is_some_and(|&own| own >= last))
    }
}

/// The segment numbers in `dir`, oldest first. Removes what an interrupted repair left.
fn list_segments(dir: &Path, recovery: &mut Recovery) -> Result<Vec<SegmentId>, StoreError> {
    let io_error = |action: &'static str| {
        let path = dir.to_path_buf();
        move |source| StoreError::Io { path, action, source }
    };
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("listing"))? {
        let entry = entry.map_err(io_error("listing"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(segment) = parse_segment_file_name(name) {
            segments.push(segment);
        } else if name.ends_with(REWRITE_SUFFIX) {
            // The original is intact (the rewrite replaces it only once complete).
            remove_file_durably(&entry.path(), dir)?;
            recovery
                .report
                .push(format!("{}: removed an unfinished repaired copy of a segment", entry.path().display()));
        }
    }
    segments.sort();
    Ok(segments)
}

fn truncate_file(path: &Path, length: u64) -> Result<(), StoreError> {
    let truncate = || -> io::Result<()> {
        let file = fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(length)?;
        file.sync_all()
    };
    truncate().map_err(|source| StoreError::Io { path: path.to_path_buf(), action: "truncating", source })
}

fn remove_file_durably(path: &Path, dir: &Path) -> Result<(), StoreError> {
    fs::remove_file(path).map_err(|source| StoreError::Io { path: path.to_path_buf(), action: "removing", source })?;
    sync_directory(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        action: "syncing the directory",
        source,
    })
}

/// `<path>.corrupt-<unix ms>`: where a damaged original is kept.
fn aside_path(path: &Path) -> PathBuf {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis());
    let mut name = path.file_name().expect("segment paths have a file name").to_os_string();
    name.push(format!(".corrupt-{millis}"));
    path.with_file_name(name)
}

/// Moves a segment out of the log (renamed, not deleted).
fn keep_aside(path: &Path, dir: &Path) -> Result<PathBuf, StoreError> {
    let kept = aside_path(path);
    fs::rename(path, &kept).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        action: "moving aside",
        source,
    })?;
    sync_directory(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        action: "syncing the directory",
        source,
    })?;
    Ok(kept)
}

/// Replaces a damaged segment with one holding only its valid records, crash-safely: the
/// copy is written and synced under a temporary name, the original is hard-linked aside, and
/// the copy is renamed over the original (atomic). Returns the new length and the kept path.
fn rewrite_segment(
    path: &Path,
    dir: &Path,
    header: SegmentHeader,
    records: &[(u64, Record<'_>)],
) -> Result<(u64, PathBuf), StoreError> {
    let mut bytes = header.encode().to_vec();
    for (_, record) in records {
        let offset = bytes.len() as u64;
        record::encode(&mut bytes, record, header.salt, offset);
    }
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(REWRITE_SUFFIX);
    let temporary = PathBuf::from(temporary);
    let kept = aside_path(path);
    let io_error = |path: &Path, action: &'static str| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, action, source }
    };
    let mut file = fs::File::create(&temporary).map_err(io_error(&temporary, "creating"))?;
    file.write_all(&bytes).map_err(io_error(&temporary, "writing"))?;
    file.sync_all().map_err(io_error(&temporary, "syncing"))?;
    fs::hard_link(path, &kept).map_err(io_error(&kept, "keeping the damaged original as"))?;
    fs::rename(&temporary, path).map_err(io_error(path, "replacing with its repaired copy"))?;
    sync_directory(dir).map_err(io_error(dir, "syncing the directory"))?;
    Ok((bytes.len() as u64, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::MessageFields;

    fn settled(address: &'static [u8], message_id: u64) -> Record<'static> {
        Record::Settled { address, message_id }
    }

    fn message<'a>(address: &'a [u8], message_id: u64, body: &'a [u8]) -> Record<'a> {
        Record::Message(MessageFields {
            address,
            message_id,
            expires_at_unix_ms: 0,
            content_type: b"",
            correlation_id: b"",
            reply_to: b"",
            headers: Default::default(),
            body,
        })
    }

    fn segment(records: &[Record<'_>]) -> Vec<u8> {
        let header = SegmentHeader { version: record::FORMAT_VERSION, shard: 0, segment: 1, salt: 99 };
        let mut bytes = header.encode().to_vec();
        for record in records {
            let offset = bytes.len() as u64;
            record::encode(&mut bytes, record, header.salt, offset);
        }
        bytes
    }

    #[test]
    fn scan_finds_records_then_a_tail() {
        let mut bytes = segment(&[message(b"a", 1, b"x"), settled(b"a", 1)]);
        let full = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0, 9, 1]);
        let scan = scan_segment(&bytes);
        assert_eq!(scan.records.len(), 2);
        assert!(scan.corrupt.is_empty());
        assert_eq!(scan.tail.as_ref().map(|tail| (tail.offset, tail.bytes)), Some((full as u64, 5)));
    }

    #[test]
    fn scan_resynchronises_after_a_flipped_byte() {
        let records = [message(b"a", 1, b"one"), message(b"a", 2, b"two"), message(b"a", 3, b"three")];
        let mut bytes = segment(&records);
        let second = SEGMENT_HEADER_BYTES + record::encoded_len(&records[0]);
        bytes[second + 12] ^= 0x40;
        let scan = scan_segment(&bytes);
        let ids: Vec<u64> = scan
            .records
            .iter()
            .map(|(_, record)| match record {
                Record::Message(message) => message.message_id,
                _ => 0,
            })
            .collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].offset, second as u64);
        assert_eq!(scan.corrupt[0].bytes, record::encoded_len(&records[1]) as u64);
        assert!(scan.tail.is_none());
    }

    #[test]
    fn a_record_embedded_in_a_torn_body_is_not_taken_for_a_valid_one() {
        // A body that carries a complete encoded record (with the right salt, but encoded for
        // offset 0) must not make the torn tail around it look like mid-log corruption.
        let mut inner = Vec::new();
        record::encode(&mut inner, &settled(b"a", 7), 99, 0);
        let mut bytes = segment(&[message(b"a", 1, b"x"), message(b"a", 2, &inner)]);
        bytes.truncate(bytes.len() - 1);
        let scan = scan_segment(&bytes);
        assert_eq!(scan.records.len(), 1);
        assert!(scan.corrupt.is_empty());
        assert!(scan.tail.is_some());
    }

    #[test]
    fn fold_keeps_unsettled_messages_in_order_and_tracks_cross_segment_settles() {
        let mut fold = RecoveryFold::default();
        fold.begin_segment(SegmentId(1));
        fold.apply(SegmentId(1), &message(b"a", 1, b"m1"));
        fold.apply(SegmentId(1), &message(b"b", 1, b"b1"));
        fold.apply(SegmentId(1), &message(b"a", 2, b"m2"));
        fold.begin_segment(SegmentId(2));
        fold.apply(SegmentId(2), &settled(b"a", 1));
        fold.apply(SegmentId(2), &Record::LastIds(vec![(b"c", 40)]));
        let (messages, last_ids) = fold.finish_messages();
        let bodies: Vec<&[u8]> = messages.iter().map(|message| &message.body[..]).collect();
        assert_eq!(bodies, vec![&b"b1"[..], &b"m2"[..]]);
        assert_eq!(last_ids.get(&b"a"[..]), Some(&2));
        assert_eq!(last_ids.get(&b"c"[..]), Some(&40));
        assert_eq!(fold.state.segments[&SegmentId(1)].live_messages, 2);
        assert!(fold.state.segments[&SegmentId(2)].settles_into.contains(&SegmentId(1)));
    }
}
