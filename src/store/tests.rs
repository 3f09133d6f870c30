//! Tests of the whole log: the core without files, then real files through the real commit
//! shell on a monoio io_uring runtime, then recovery from torn and damaged files.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::ids::ShardId;
use crate::mbws::Properties;

/// The log's [`open`](super::open), retried while it is `Locked` (bounded): a test that drops a
/// log and opens it again can find the lock still held for a moment by a process another test
/// started (between its fork and its exec the child shares the lock's open file description).
/// Only the test of the lock itself calls `super::open` directly.
fn open(config: LogConfig, shard: ShardId) -> Result<(DurableLog, Recovery), StoreError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match super::open(config.clone(), shard) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            result => return result,
        }
    }
}

/// A directory under the system temp dir, unique per test run, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "mbws-store-{name}-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SHARD: ShardId = ShardId(0);

fn config(dir: &TempDir) -> LogConfig {
    LogConfig::new(dir.path())
}

fn small_segments(dir: &TempDir) -> LogConfig {
    LogConfig { segment_bytes: 1024, ..config(dir) }
}

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().expect("io_uring runtime")
}

fn properties(index: u64) -> Properties {
    Properties {
        content_type: Bytes::from_static(b"text/plain"),
        correlation_id: Bytes::from(format!("corr-{index}")),
        reply_to: if index % 2 == 0 { Bytes::new() } else { Bytes::from_static(b"replies") },
        headers: vec![(Bytes::from_static(b"x-index"), Bytes::from(index.to_string()))],
    }
}

fn body(address: &str, id: u64) -> Vec<u8> {
    format!("{address}/{id}: {}", "payload ".repeat((id % 5) as usize)).into_bytes()
}

fn append(log: &mut DurableLog, address: &str, id: u64) -> Lsn {
    let expires = if id % 3 == 0 { 0 } else { 1_900_000_000_000 + id };
    log.append_message(address.as_bytes(), id, expires, &properties(id), &body(address, id)).unwrap()
}

fn expected(address: &str, id: u64) -> RecoveredMessage {
    RecoveredMessage {
        address: Bytes::copy_from_slice(address.as_bytes()),
        message_id: id,
        expires_at_unix_ms: if id % 3 == 0 { 0 } else { 1_900_000_000_000 + id },
        properties: properties(id),
        body: Bytes::from(body(address, id)),
    }
}

fn ids(recovery: &Recovery) -> Vec<(String, u64)> {
    recovery
        .messages
        .iter()
        .map(|message| (String::from_utf8_lossy(&message.address).into_owned(), message.message_id))
        .collect()
}

/// Commits everything pending through the real shell (a GroupCommitter on io_uring).
fn commit_everything(log: DurableLog) -> (DurableLog, Vec<Lsn>) {
    let log = Rc::new(RefCell::new(log));
    let committer = GroupCommitter::new(log.clone());
    let committed = RefCell::new(Vec::new());
    committer.stop(); // returns once nothing is pending
    runtime().block_on(committer.run(|lsn| committed.borrow_mut().push(lsn))).expect("commit");
    drop(committer);
    let log = Rc::try_unwrap(log).expect("no other owner").into_inner();
    assert_eq!(log.durable_lsn(), log.last_appended_lsn());
    (log, committed.into_inner())
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let shard_dir = shard_dir(dir, SHARD);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&shard_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    files
}

// ---- the core, without files ----

/// Plays the shell without touching files: takes every batch and reports it committed.
fn fake_commit(log: &mut DurableLog) -> Vec<SegmentId> {
    let mut deleted = Vec::new();
    while let Some(batch) = log.take_batch() {
        let outcome = log.batch_committed(batch);
        for path in outcome.delete_segments {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            deleted.push(parse_segment_file_name(&name).unwrap());
        }
    }
    deleted
}

#[test]
fn batches_respect_max_batch_bytes_and_segment_boundaries() {
    let dir = TempDir::new("batches");
    let mut log = DurableLog::new(LogConfig { max_batch_bytes: 300, ..small_segments(&dir) }, SHARD).unwrap();
    for id in 1..=40 {
        append(&mut log, "a", id);
    }
    assert!(log.has_pending());
    let pending = log.pending_bytes();
    let mut records = 0;
    let mut bytes = 0;
    let mut previous: Option<(SegmentId, u64)> = None;
    while let Some(batch) = log.take_batch() {
        assert!(log.take_batch().is_none(), "a second batch while one is in flight");
        assert!(batch.bytes().len() <= 300 || batch.records() == 1, "batch over max_batch_bytes");
        assert!(batch.file_offset() + batch.bytes().len() as u64 <= 1024, "segment over segment_bytes");
        if let Some((segment, end)) = previous {
            if segment == batch.segment() {
                assert_eq!(batch.file_offset(), end, "batches of a segment are contiguous");
                assert!(batch.new_segment_header().is_none());
            } else {
                assert!(batch.new_segment_header().is_some(), "the first batch of a segment creates it");
            }
        }
        previous = Some((batch.segment(), batch.file_offset() + batch.bytes().len() as u64));
        records += batch.records() as u64;
        bytes += batch.bytes().len();
        log.batch_committed(batch);
    }
    assert_eq!(bytes, pending);
    assert!(!log.has_pending());
    assert_eq!(log.pending_bytes(), 0);
    // 40 messages plus the LAST_IDS record that opens every segment after the first, and the
    // ID_RESERVATION that ends the LAST_IDS records of every segment.
    let segments = log.stats().segments_created;
    assert_eq!(records, 40 + (segments - 1) + segments);
    assert!(log.stats().segments_created > 3);
}

#[test]
fn a_segment_that_settles_older_messages_outlives_them() {
    let dir = TempDir::new("deletion-order");
    let mut log = DurableLog::new(small_segments(&dir), SHARD).unwrap();
    let big = vec![b'x'; 600];
    let none = Properties::default();
    // Segment 1: messages 1 and 2. Segment 2: the settle of 1, and message 3.
    log.append_message(b"a", 1, 0, &none, &big[..300]).unwrap();
    log.append_message(b"a", 2, 0, &none, &big[..300]).unwrap();
    log.append_message(b"a", 3, 0, &none, &big).unwrap();
    log.append_settled(b"a", 1).unwrap();
    // Segment 3: message 4, then the settle of 3.
    log.append_message(b"a", 4, 0, &none, &big).unwrap();
    log.append_settled(b"a", 3).unwrap();
    assert!(fake_commit(&mut log).is_empty(), "segment 1 holds message 2, segment 2 settles into segment 1");
    // Nothing is written for a message the log does not hold.
    assert_eq!(log.append_settled(b"a", 3), None);
    assert_eq!(log.append_settled(b"nobody", 1), None);
    log.append_settled(b"a", 2).unwrap();
    assert_eq!(fake_commit(&mut log), vec![SegmentId(1)]);
    // Segment 2 may go only once the deletion of segment 1 is durable: at the next commit.
    log.append_message(b"a", 5, 0, &none, b"small").unwrap();
    assert_eq!(fake_commit(&mut log), vec![SegmentId(2)]);
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.stats().segments_deleted, 2);
}

#[test]
fn old_segments_stay_until_the_next_segment_is_established() {
    let dir = TempDir::new("established");
    // One record per batch, so the LAST_IDS record and the message after it commit apart.
    let mut log = DurableLog::new(LogConfig { max_batch_bytes: 1, ..small_segments(&dir) }, SHARD).unwrap();
    let body = vec![b'x'; 600];
    let none = Properties::default();
    log.append_message(b"a", 1, 0, &none, &body).unwrap();
    log.append_settled(b"a", 1).unwrap();
    // Rolls: LAST_IDS, the ID_RESERVATION that ends them, then message 2.
    log.append_message(b"a", 2, 0, &none, &body).unwrap();
    let mut outcomes = Vec::new();
    while let Some(batch) = log.take_batch() {
        let opens_segment_two = batch.segment() == SegmentId(2) && batch.new_segment_header().is_some();
        let outcome = log.batch_committed(batch);
        outcomes.push((opens_segment_two, outcome.delete_segments.len()));
    }
    // Batches: segment 1's ID_RESERVATION, message 1, settle 1, LAST_IDS (opens segment 2),
    // its ID_RESERVATION (segment 2 is established: segment 1 goes), message 2.
    assert_eq!(outcomes, vec![(false, 0), (false, 0), (false, 0), (true, 0), (false, 1), (false, 0)]);
}

#[test]
fn an_oversized_message_is_refused_with_the_field_named() {
    let dir = TempDir::new("too-large");
    let mut log = DurableLog::new(config(&dir), SHARD).unwrap();
    let long = Properties { content_type: Bytes::from(vec![b'c'; 70_000]), ..Properties::default() };
    let error = log.append_message(b"orders", 1, 0, &long, b"body").unwrap_err();
    let text = error.to_string();
    assert!(text.contains("orders") && text.contains("content type") && text.contains("70000"), "{text}");
    assert!(!log.has_pending(), "a refused message leaves nothing behind");
}

#[test]
fn invalid_configuration_is_refused_with_the_bound_named() {
    let dir = TempDir::new("config");
    let error = DurableLog::new(LogConfig { segment_bytes: 10, ..config(&dir) }, SHARD).unwrap_err();
    assert!(error.to_string().contains("segment_bytes"), "{error}");
    let error = open(LogConfig { max_batch_delay: Duration::from_secs(5), ..config(&dir) }, SHARD).unwrap_err();
    assert!(error.to_string().contains("max_batch_delay"), "{error}");
}

// ---- files, through the real shell ----

#[test]
fn reopen_returns_exactly_the_unsettled_messages() {
    let dir = TempDir::new("reopen");
    let (mut log, recovery) = open(config(&dir), SHARD).unwrap();
    assert!(recovery.messages.is_empty() && recovery.report.is_empty());
    for id in 1..=6 {
        append(&mut log, "orders", id);
        append(&mut log, "events", id);
    }
    for id in [1, 2, 5] {
        log.append_settled(b"orders", id).unwrap();
    }
    log.append_settled(b"events", 6).unwrap();
    let (log, committed) = commit_everything(log);
    assert_eq!(committed.last(), Some(&log.last_appended_lsn()));
    drop(log);

    let (mut log, recovery) = open(config(&dir), SHARD).unwrap();
    assert!(recovery.report.is_empty(), "{:?}", recovery.report);
    assert_eq!(recovery.truncated_bytes, 0);
    let mut want = Vec::new();
    for id in 1..=6 {
        if ![1, 2, 5].contains(&id) {
            want.push(expected("orders", id));
        }
        if id != 6 {
            want.push(expected("events", id));
        }
    }
    assert_eq!(recovery.messages, want, "bodies, properties, order");
    assert_eq!(recovery.last_message_id.get(&b"orders"[..]), Some(&6));
    assert_eq!(recovery.last_message_id.get(&b"events"[..]), Some(&6));
    assert_eq!(log.last_message_id(b"orders"), 6);

    // The reopened log continues: settle a recovered message, add one, reopen again.
    log.append_settled(b"orders", 3).unwrap();
    append(&mut log, "orders", 7);
    let (log, _) = commit_everything(log);
    drop(log);
    let (_, recovery) = open(config(&dir), SHARD).unwrap();
    let orders: Vec<u64> =
        ids(&recovery).into_iter().filter(|(address, _)| address == "orders").map(|(_, id)| id).collect();
    assert_eq!(orders, vec![4, 6, 7]);
}

#[test]
fn segments_roll_and_fully_settled_ones_are_deleted_and_ids_survive() {
    let dir = TempDir::new("roll");
    let (mut log, _) = open(small_segments(&dir), SHARD).unwrap();
    for id in 1..=60 {
        append(&mut log, "a", id);
    }
    append(&mut log, "b", 1);
    let (mut log, _) = commit_everything(log);
    let files = segment_files(dir.path());
    assert!(files.len() >= 6, "expected several 1 KiB segments, got {files:?}");
    for file in &files {
        let length = std::fs::metadata(file).unwrap().len();
        assert!(length <= 1024, "{} is {length} bytes, over segment_bytes", file.display());
    }
    // Settle every message of "a": all segments but the newest go ("b"/1 is in the newest).
    for id in 1..=60 {
        log.append_settled(b"a", id).unwrap();
    }
    let (mut log, _) = commit_everything(log);
    // One more commit so that deletions unlocked by the last ones happen too.
    log.append_settled(b"b", 1).unwrap();
    let (log, _) = commit_everything(log);
    let remaining = segment_files(dir.path());
    assert!(remaining.len() <= 2, "fully settled segments were kept: {remaining:?}");
    assert!(log.stats().segments_deleted >= files.len() as u64 - 1);
    drop(log);

    let (mut log, recovery) = open(small_segments(&dir), SHARD).unwrap();
    assert!(recovery.messages.is_empty());
    assert!(recovery.report.is_empty(), "{:?}", recovery.report);
    // The segments that used ids 1..=60 are gone; the ids are not.
    assert_eq!(recovery.last_message_id.get(&b"a"[..]), Some(&60));
    assert_eq!(recovery.last_message_id.get(&b"b"[..]), Some(&1));
    // Traffic on another address rolls on until no record about "a" is left but the LAST_IDS
    // records that open each segment: they alone keep its ids from starting over.
    for id in 1..=30 {
        append(&mut log, "c", id);
        log.append_settled(b"c", id).unwrap();
        if id % 10 == 0 {
            log = commit_everything(log).0;
        }
    }
    assert_eq!(records_about(dir.path(), b"a"), 0, "the test needs every MESSAGE and SETTLED of \"a\" deleted");
    drop(log);
    let (_, recovery) = open(small_segments(&dir), SHARD).unwrap();
    assert_eq!(recovery.last_message_id.get(&b"a"[..]), Some(&60));
    assert_eq!(recovery.last_message_id.get(&b"c"[..]), Some(&30));
}

/// MESSAGE and SETTLED records about `address` left in the log's segment files.
fn records_about(dir: &Path, address: &[u8]) -> usize {
    let mut count = 0;
    for file in segment_files(dir) {
        let bytes = std::fs::read(&file).unwrap();
        for (_, record) in recovery::scan_segment(&bytes).records {
            count += usize::from(match record {
                record::Record::Message(message) => message.address == address,
                record::Record::Settled { address: settled, .. } => settled == address,
                record::Record::LastIds(_) | record::Record::IdReservation { .. } => false,
            });
        }
    }
    count
}

#[test]
fn group_commit_puts_records_appended_during_a_sync_into_one_batch() {
    let dir = TempDir::new("group-commit");
    let (log, _) = open(config(&dir), SHARD).unwrap();
    let log = Rc::new(RefCell::new(log));
    let committer = Rc::new(GroupCommitter::new(log.clone()));
    let committed = Rc::new(RefCell::new(Vec::<Lsn>::new()));
    runtime().block_on(async {
        let commit_task = monoio::spawn({
            let committer = committer.clone();
            let committed = committed.clone();
            async move { committer.run(move |lsn| committed.borrow_mut().push(lsn)).await }
        });
        // After `notify`, the committer is queued; `let_queued_tasks_run` returns once it has
        // been polled: it has taken the batch and submitted its write, and it cannot run again
        // (to finish the commit) before this task does.
        let append_task = monoio::spawn({
            let (log, committer) = (log.clone(), committer.clone());
            async move {
                let mut id = 0;
                let mut next = || {
                    id += 1;
                    append(&mut log.borrow_mut(), "a", id);
                };
                for _ in 0..10 {
                    next();
                    committer.notify();
                    let_queued_tasks_run().await;
                    assert!(log.borrow().has_batch_in_flight(), "the committer took the batch");
                    // The write and fdatasync of that batch are in flight: these 25 wait together.
                    for _ in 0..25 {
                        next();
                    }
                    committer.notify();
                    let_queued_tasks_run().await;
                    for _ in 0..5 {
                        next();
                    }
                    committer.notify();
                }
                committer.stop();
            }
        });
        append_task.await;
        commit_task.await.expect("commit loop");
    });
    let committed = committed.borrow();
    let stats = log.borrow().stats();
    assert!(committed.windows(2).all(|pair| pair[0] < pair[1]), "durable Lsns go up: {committed:?}");
    assert_eq!(committed.last(), Some(&log.borrow().last_appended_lsn()), "everything became durable");
    assert_eq!(stats.records, 310 + 1, "310 messages and the ID_RESERVATION that opens the segment");
    assert!(stats.largest_batch_records >= 25, "{stats:?}");
    assert!(stats.records_per_batch() > 1.5, "{stats:?}");
    assert_eq!(stats.batches as usize, committed.len());
    drop(committer);
    drop(Rc::try_unwrap(log).expect("no other owner")); // releases the log's lock
    let (_, recovery) = open(config(&dir), SHARD).unwrap();
    assert_eq!(recovery.messages.len(), 310);
}

#[test]
fn the_batch_window_gathers_records_until_it_closes() {
    let dir = TempDir::new("window");
    // The longest window the log allows (1 s), far longer than the appends take on a loaded
    // machine (a 30 ms one closed between two appends when the thread was descheduled that
    // long): what is tested is that records within the window are gathered, and that the stop
    // cuts the window short.
    let config = LogConfig { max_batch_delay: MAX_BATCH_DELAY, ..config(&dir) };
    let (log, _) = open(config, SHARD).unwrap();
    let log = Rc::new(RefCell::new(log));
    let committer = Rc::new(GroupCommitter::new(log.clone()));
    let started = Instant::now();
    runtime().block_on(async {
        let task = monoio::spawn({
            let committer = committer.clone();
            async move { committer.run(|_| {}).await }
        });
        for id in 1..=5 {
            append(&mut log.borrow_mut(), "a", id);
            committer.notify();
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        committer.stop();
        task.await.expect("commit loop");
    });
    // Five appends 2 ms apart, well inside one 1 s window: one batch. The stop cuts the window
    // short: this takes less than the window.
    assert_eq!(log.borrow().stats().batches, 1, "{:?}", log.borrow().stats());
    assert!(started.elapsed() < MAX_BATCH_DELAY, "the stop did not cut the window short");
}

/// Returns after every task already queued has been polled once: a new task (queued behind
/// them) wakes this one. (Waking oneself is not enough: monoio re-runs a self-woken task
/// before the others.)
async fn let_queued_tasks_run() {
    let baton = Rc::new(commit::Signal::default());
    monoio::spawn({
        let baton = baton.clone();
        async move { baton.raise() }
    });
    baton.wait().await;
}

// ---- start-up checks ----

#[test]
fn an_unusable_data_dir_is_a_clear_error() {
    let dir = TempDir::new("unusable");
    let file = dir.path().join("a-regular-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let error = open(LogConfig::new(file.join("data")), SHARD).unwrap_err();
    assert!(matches!(error, StoreError::Unusable { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains(&file.join("data").join("shard-0").display().to_string()), "{text}");
    assert!(text.contains("creating the directory") && text.contains("data directory"), "{text}");
}

#[test]
fn a_log_in_use_by_another_opener_is_refused() {
    let dir = TempDir::new("locked");
    let (_log, _) = open(config(&dir), SHARD).unwrap();
    let error = super::open(config(&dir), SHARD).unwrap_err();
    assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
    assert!(error.to_string().contains("another broker"), "{error}");
}

#[test]
fn a_segment_of_another_shard_is_refused() {
    let dir = TempDir::new("foreign");
    let (mut log, _) = open(config(&dir), ShardId(1)).unwrap();
    append(&mut log, "a", 1);
    drop(commit_everything(log));
    std::fs::create_dir_all(shard_dir(dir.path(), SHARD)).unwrap();
    std::fs::rename(
        segment_path(&shard_dir(dir.path(), ShardId(1)), SegmentId(1)),
        segment_path(&shard_dir(dir.path(), SHARD), SegmentId(1)),
    )
    .unwrap();
    let error = open(config(&dir), SHARD).unwrap_err();
    assert!(matches!(error, StoreError::ForeignSegment { .. }), "{error:?}");
    assert!(error.to_string().contains("shard 1"), "{error}");
}

// ---- recovery from torn and damaged files ----

/// Writes `count` messages to "a" (more if needed, so that the newest segment holds two
/// messages: cutting its only message would also remove the segment, see
/// `a_new_segment_holding_only_last_ids_is_removed_at_start_up`). Returns the newest segment,
/// the offset where its last record starts, and how many messages were written.
fn log_with_messages(config: &LogConfig, count: u64) -> (PathBuf, u64, u64) {
    let (mut log, _) = open(config.clone(), SHARD).unwrap();
    let mut written = 0;
    loop {
        while written < count {
            written += 1;
            append(&mut log, "a", written);
        }
        log = commit_everything(log).0;
        let newest = segment_files(&config.dir).pop().unwrap();
        let bytes = std::fs::read(&newest).unwrap();
        let records = recovery::scan_segment(&bytes).records;
        let messages = records.iter().filter(|(_, record)| matches!(record, record::Record::Message(_))).count();
        if messages >= 2 {
            return (newest, records.last().unwrap().0, written);
        }
        written += 1;
        append(&mut log, "a", written);
    }
}

#[test]
fn a_torn_tail_is_truncated_at_every_offset_of_the_last_record() {
    let dir = TempDir::new("torn");
    let config = small_segments(&dir);
    let (newest, last_start, written) = log_with_messages(&config, 12);
    let pristine: Vec<(PathBuf, Vec<u8>)> =
        segment_files(dir.path()).into_iter().map(|path| (path.clone(), std::fs::read(&path).unwrap())).collect();
    let full_length = std::fs::metadata(&newest).unwrap().len();
    let survivors: Vec<(String, u64)> = (1..written).map(|id| ("a".to_string(), id)).collect();
    for cut in last_start..full_length {
        for (path, bytes) in &pristine {
            std::fs::write(path, bytes).unwrap();
        }
        let file = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
        file.set_len(cut).unwrap();
        drop(file);

        let (log, recovery) = open(config.clone(), SHARD).unwrap();
        assert_eq!(ids(&recovery), survivors, "cut at {cut}");
        let dropped = cut - last_start;
        assert_eq!(recovery.truncated_bytes, dropped, "cut at {cut}");
        if dropped == 0 {
            assert!(recovery.report.is_empty(), "cut at a record boundary: {:?}", recovery.report);
        } else {
            assert_eq!(recovery.report.len(), 1, "{:?}", recovery.report);
            let line = &recovery.report[0];
            assert!(line.contains(&newest.display().to_string()), "{line}");
            assert!(line.contains(&format!("dropped {dropped} bytes at offset {last_start}")), "{line}");
        }
        assert_eq!(std::fs::metadata(&newest).unwrap().len(), last_start);
        drop(log);

        let (_, again) = open(config.clone(), SHARD).unwrap();
        assert!(again.report.is_empty(), "second open after a cut at {cut}: {:?}", again.report);
        assert_eq!(again.truncated_bytes, 0);
        assert_eq!(ids(&again), survivors);
    }
}

#[test]
fn a_log_keeps_working_after_its_tail_was_truncated() {
    let dir = TempDir::new("torn-continue");
    let config = small_segments(&dir);
    let (newest, last_start, written) = log_with_messages(&config, 5);
    let file = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
    file.set_len(last_start + 3).unwrap();
    drop(file);
    let (mut log, recovery) = open(config.clone(), SHARD).unwrap();
    assert_eq!(recovery.truncated_bytes, 3);
    append(&mut log, "a", written);
    append(&mut log, "a", written + 1);
    drop(commit_everything(log));
    let (_, recovery) = open(config, SHARD).unwrap();
    assert!(recovery.report.is_empty(), "{:?}", recovery.report);
    assert_eq!(ids(&recovery).len() as u64, written + 1);
}

#[test]
fn a_segment_being_created_at_the_crash_is_removed() {
    let dir = TempDir::new("torn-header");
    let config = small_segments(&dir);
    let (newest, _, written) = log_with_messages(&config, 3);
    let name = newest.file_name().unwrap().to_str().unwrap();
    let next = segment_path(newest.parent().unwrap(), SegmentId(parse_segment_file_name(name).unwrap().0 + 1));
    std::fs::write(&next, b"MBW").unwrap();
    let (log, recovery) = open(config.clone(), SHARD).unwrap();
    assert_eq!(ids(&recovery).len() as u64, written);
    assert_eq!(recovery.report.len(), 1, "{:?}", recovery.report);
    assert!(recovery.report[0].contains(&next.display().to_string()));
    assert!(!next.exists());
    drop(log);
    let (_, again) = open(config, SHARD).unwrap();
    assert!(again.report.is_empty());
}

#[test]
fn a_new_segment_holding_only_last_ids_is_removed_at_start_up() {
    let dir = TempDir::new("unestablished");
    let config = LogConfig { max_batch_bytes: 1, ..small_segments(&dir) };
    let (mut log, _) = open(config.clone(), SHARD).unwrap();
    let body = vec![b'x'; 600];
    let none = Properties::default();
    log.append_message(b"a", 1, 0, &none, &body).unwrap();
    log.append_message(b"b", 7, 0, &none, b"small").unwrap();
    log.append_settled(b"a", 1).unwrap();
    log.append_settled(b"b", 7).unwrap();
    let (mut log, _) = commit_everything(log);
    let first = segment_path(&shard_dir(dir.path(), SHARD), SegmentId(1));
    let first_bytes = std::fs::read(&first).unwrap();
    log.append_message(b"a", 2, 0, &none, &body).unwrap();
    drop(commit_everything(log));
    assert!(!first.exists(), "segment 1 was fully settled and is deleted once segment 2 is established");
    // A crash between the LAST_IDS record of segment 2 and the ID_RESERVATION that ends them:
    // segment 1 would still be there, and segment 2 would end after its LAST_IDS record.
    std::fs::write(&first, &first_bytes).unwrap();
    let second = segment_path(&shard_dir(dir.path(), SHARD), SegmentId(2));
    let offsets = record_offsets(&second);
    let reservation_at = offsets[offsets.len() - 2];
    std::fs::OpenOptions::new().write(true).open(&second).unwrap().set_len(reservation_at).unwrap();

    let (log, recovery) = open(config.clone(), SHARD).unwrap();
    assert!(!second.exists(), "the unestablished segment goes");
    assert!(first.exists(), "the segment holding the ids stays");
    assert_eq!(recovery.report.len(), 1, "{:?}", recovery.report);
    assert!(
        recovery.report[0].contains(&second.display().to_string()) && recovery.report[0].contains("nothing was lost")
    );
    assert!(recovery.messages.is_empty());
    assert_eq!(recovery.last_message_id.get(&b"a"[..]), Some(&1));
    assert_eq!(recovery.last_message_id.get(&b"b"[..]), Some(&7));
    drop(log);
    let (_, again) = open(config, SHARD).unwrap();
    assert!(again.report.is_empty(), "{:?}", again.report);
    assert_eq!(again.last_message_id.get(&b"b"[..]), Some(&7));
}

/// Flips one byte inside the record that starts at `record_start`.
fn flip_byte(path: &Path, record_start: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[record_start as usize + 20] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

/// Offsets of the records in a segment file.
fn record_offsets(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let offsets = recovery::scan_segment(&bytes).records.iter().map(|(offset, _)| *offset).collect();
    offsets
}

#[test]
fn a_flipped_byte_mid_log_is_refused_in_strict_mode_and_skipped_in_skip_corrupt_mode() {
    let dir = TempDir::new("flipped");
    let config = config(&dir);
    log_with_messages(&config, 9);
    let segment = segment_files(dir.path()).pop().unwrap();
    let offsets = record_offsets(&segment);
    assert_eq!(offsets.len(), 1 + 9, "the ID_RESERVATION that opens the segment, then 9 messages");
    let damaged = offsets[5]; // message 5
    flip_byte(&segment, damaged);

    let error = open(config.clone(), SHARD).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { offset, .. } if offset == damaged), "{error:?}");
    let text = error.to_string();
    assert!(text.contains(&segment.display().to_string()), "{text}");
    assert!(text.contains(&format!("offset {damaged}")), "{text}");
    assert!(text.contains("move") && text.contains("skip-corrupt"), "{text}");

    let skip = LogConfig { recovery: RecoveryMode::SkipCorrupt, ..config.clone() };
    let (log, recovery) = open(skip, SHARD).unwrap();
    let recovered: Vec<u64> = ids(&recovery).into_iter().map(|(_, id)| id).collect();
    assert_eq!(recovered, vec![1, 2, 3, 4, 6, 7, 8, 9], "every other record, never the damaged one");
    for (message, id) in recovery.messages.iter().zip(recovered) {
        assert_eq!(message, &expected("a", id));
    }
    assert_eq!(recovery.skipped_corrupt_bytes, offsets[6] - offsets[5]);
    assert!(recovery
        .report
        .iter()
        .any(|line| line.contains("CORRUPT DATA SKIPPED") && line.contains(&format!("offset {damaged}"))));
    drop(log);

    // The segment was repaired (original kept aside): strict mode opens it again.
    let kept: Vec<_> = std::fs::read_dir(segment.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let (_, again) = open(config, SHARD).unwrap();
    assert!(again.report.is_empty(), "{:?}", again.report);
    assert_eq!(again.messages.len(), 8);
}

#[test]
fn a_settle_lost_to_corruption_brings_its_message_back_and_says_so() {
    let dir = TempDir::new("flipped-settle");
    let skip = LogConfig { recovery: RecoveryMode::SkipCorrupt, ..config(&dir) };
    let (mut log, _) = open(skip.clone(), SHARD).unwrap();
    append(&mut log, "a", 1);
    append(&mut log, "a", 2);
    log.append_settled(b"a", 1).unwrap();
    append(&mut log, "a", 3);
    drop(commit_everything(log));
    let segment = segment_files(dir.path()).pop().unwrap();
    let offsets = record_offsets(&segment);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[offsets[3] as usize + 10] ^= 1; // inside the SETTLED record (after the ID_RESERVATION)
    std::fs::write(&segment, bytes).unwrap();
    let (_, recovery) = open(skip, SHARD).unwrap();
    assert_eq!(ids(&recovery).into_iter().map(|(_, id)| id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(recovery.report.iter().any(|line| line.contains("delivered again")));
}

#[test]
fn damage_at_the_end_of_an_older_segment_is_corruption_not_a_torn_tail() {
    let dir = TempDir::new("older-tail");
    let config = small_segments(&dir);
    log_with_messages(&config, 20);
    let files = segment_files(dir.path());
    assert!(files.len() >= 2);
    let older = &files[0];
    let length = std::fs::metadata(older).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(older).unwrap().set_len(length - 2).unwrap();
    let error = open(config, SHARD).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { ref path, .. } if path == older), "{error:?}");
}

// ---- measurement ----

/// Durable appends per second with fdatasync on this machine. Run with:
/// `cargo test --release --lib store::tests::measure_durable_appends -- --ignored --nocapture`
#[test]
#[ignore = "measurement, not a test: run it explicitly in release mode"]
fn measure_durable_appends() {
    let run_for = Duration::from_millis(1500);
    println!("body_bytes in_flight_window appends_per_s records_per_fsync fsyncs_per_s mean_batch_bytes");
    for body_bytes in [64usize, 1024] {
        for window in [1u64, 16, 256, 4096] {
            let dir = TempDir::new("measure");
            let (log, _) = open(config(&dir), SHARD).unwrap();
            let log = Rc::new(RefCell::new(log));
            let committer = Rc::new(GroupCommitter::new(log.clone()));
            let durable = Rc::new(Cell::new(Lsn(0)));
            let advanced = Rc::new(commit::Signal::default());
            let body = vec![b'm'; body_bytes];
            let properties = Properties::default();
            let started = Instant::now();
            runtime().block_on(async {
                let task = monoio::spawn({
                    let (committer, durable, advanced) = (committer.clone(), durable.clone(), advanced.clone());
                    async move {
                        committer
                            .run(move |lsn| {
                                durable.set(lsn);
                                advanced.raise();
                            })
                            .await
                    }
                });
                // Publishers with `window` durable publishes outstanding in total.
                let mut id = 0;
                while started.elapsed() < run_for {
                    while id - durable.get().0 < window {
                        id += 1;
                        log.borrow_mut().append_message(b"bench", id, 0, &properties, &body).unwrap();
                    }
                    committer.notify();
                    advanced.wait().await;
                }
                committer.stop();
                task.await.unwrap();
            });
            let elapsed = started.elapsed().as_secs_f64();
            let stats = log.borrow().stats();
            println!(
                "{body_bytes} {window} {:.0} {:.1} {:.0} {:.0}",
                stats.records as f64 / elapsed,
                stats.records_per_batch(),
                stats.batches as f64 / elapsed,
                stats.bytes as f64 / stats.batches.max(1) as f64
            );
        }
    }
}

// ---- message id reservations (issue 8 item 14) ----

#[test]
fn an_id_reservation_outlives_the_segment_it_was_written_in() {
    let dir = TempDir::new("reservation");
    let (mut log, recovery) = open(small_segments(&dir), SHARD).unwrap();
    assert_eq!(recovery.message_id_high_water, 0);
    let first = log.append_id_reservation(1000).expect("a higher reservation is written");
    assert_eq!(log.append_id_reservation(1000), None, "an equal one is not");
    assert_eq!(log.append_id_reservation(10), None, "nor a lower one");
    assert_eq!(log.message_id_high_water(), 1000);
    let (log, committed) = commit_everything(log);
    assert!(committed.last().is_some_and(|lsn| *lsn >= first));
    drop(log);
    let (mut log, recovery) = open(small_segments(&dir), SHARD).unwrap();
    assert_eq!(recovery.message_id_high_water, 1000);
    assert!(recovery.last_message_id.is_empty(), "a reservation names no address");
    // Settled traffic rolls the log on until segment 1, which held the reservation, is gone:
    // every segment start carries the reservation on.
    for id in 1..=40 {
        append(&mut log, "c", id);
        log.append_settled(b"c", id).unwrap();
        if id % 10 == 0 {
            log = commit_everything(log).0;
        }
    }
    let first_segment = segment_path(&shard_dir(dir.path(), SHARD), SegmentId(1));
    assert!(!first_segment.exists(), "the test needs the segment of the reservation deleted");
    drop(log);
    let (_, recovery) = open(small_segments(&dir), SHARD).unwrap();
    assert_eq!(recovery.message_id_high_water, 1000, "the reservation survived its segment");
}

#[test]
fn the_high_water_is_the_highest_of_reservations_and_logged_ids() {
    let dir = TempDir::new("high-water");
    let (mut log, _) = open(config(&dir), SHARD).unwrap();
    log.append_id_reservation(50).unwrap();
    append(&mut log, "a", 70);
    assert_eq!(log.message_id_high_water(), 70);
    drop(commit_everything(log));
    let (_, recovery) = open(config(&dir), SHARD).unwrap();
    assert_eq!(recovery.message_id_high_water, 70);
}

#[test]
fn a_reservation_lost_with_an_unsynced_tail_was_never_relied_on() {
    // The reservation is appended but the "crash" comes before its batch is written: the
    // restarted log knows only what was durable. (The address table shows no id above the
    // durable reservation, so nothing it showed is reused.)
    let dir = TempDir::new("unsynced-reservation");
    let (mut log, _) = open(config(&dir), SHARD).unwrap();
    log.append_id_reservation(100).unwrap();
    drop(commit_everything(log));
    let (mut log, _) = open(config(&dir), SHARD).unwrap();
    log.append_id_reservation(200).unwrap();
    assert!(log.has_pending());
    drop(log); // never committed
    let (_, recovery) = open(config(&dir), SHARD).unwrap();
    assert_eq!(recovery.message_id_high_water, 100);
}

/// Writes a format version 1 segment (what mbws wrote before ID_RESERVATION existed) by hand.
fn write_version_1_segment(dir: &TempDir, records: &[record::Record<'_>]) -> PathBuf {
    let shard_dir = shard_dir(dir.path(), SHARD);
    std::fs::create_dir_all(&shard_dir).unwrap();
    let header = record::SegmentHeader { version: 1, shard: SHARD.0, segment: 1, salt: 77 };
    let mut bytes = header.encode().to_vec();
    for record in records {
        let offset = bytes.len() as u64;
        record::encode(&mut bytes, record, header.salt, offset);
    }
    let path = segment_path(&shard_dir, SegmentId(1));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_version_1_log_is_read_and_continued_in_a_new_segment() {
    let dir = TempDir::new("version-1");
    let message = |id: u64, body: &'static [u8]| {
        record::Record::Message(record::MessageFields {
            address: b"old",
            message_id: id,
            expires_at_unix_ms: 0,
            content_type: b"",
            correlation_id: b"",
            reply_to: b"",
            headers: Default::default(),
            body,
        })
    };
    let old = write_version_1_segment(&dir, &[message(1, b"one"), message(2, b"two")]);
    let old_bytes = std::fs::read(&old).unwrap();
    let (mut log, recovery) = open(config(&dir), SHARD).unwrap();
    assert!(recovery.report.is_empty(), "{:?}", recovery.report);
    let bodies: Vec<&[u8]> = recovery.messages.iter().map(|message| &message.body[..]).collect();
    assert_eq!(bodies, [&b"one"[..], &b"two"[..]]);
    assert_eq!(recovery.message_id_high_water, 2);
    // New records (an ID_RESERVATION is new in version 2) go to a new segment.
    log.append_id_reservation(2 + 1024).unwrap();
    log.append_settled(b"old", 1).unwrap();
    drop(commit_everything(log));
    assert_eq!(std::fs::read(&old).unwrap(), old_bytes, "nothing is appended to a version 1 segment");
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2);
    let header = record::SegmentHeader::decode(&std::fs::read(&files[1]).unwrap()).unwrap();
    assert_eq!(header.version, record::FORMAT_VERSION);
    let (_, recovery) = open(config(&dir), SHARD).unwrap();
    assert_eq!(ids(&recovery), [("old".to_string(), 2)]);
    assert_eq!(recovery.message_id_high_water, 2 + 1024);
}

/// Found by the `log_recovery` fuzz target (its input is kept in tests/fuzz-regressions/): when
/// the newest segment does not repeat the highest ID_RESERVATION and last ids (its leading
/// records were lost, or another writer made it), deleting the settled older segment that holds
/// them would let the next start hand out ids that consumers may already have seen.
#[test]
fn older_segments_stay_while_the_newest_lacks_their_last_ids() {
    let dir = TempDir::new("lacks-last-ids");
    let shard = shard_dir(dir.path(), SHARD);
    std::fs::create_dir_all(&shard).unwrap();
    let write_segment = |number: u64, records: &[record::Record<'_>]| {
        let header = record::SegmentHeader { version: record::FORMAT_VERSION, shard: 0, segment: number, salt: number };
        let mut bytes = header.encode().to_vec();
        for one in records {
            let offset = bytes.len() as u64;
            record::encode(&mut bytes, one, number, offset);
        }
        std::fs::write(segment_path(&shard, SegmentId(number)), bytes).unwrap();
    };
    let reserved = 1 << 20;
    // Segment 1: no live message, and the only holder of the reservation. Segment 2: one live message.
    write_segment(1, &[record::Record::LastIds(vec![]), record::Record::IdReservation { reserved_up_to: reserved }]);
    let message = record::MessageFields {
        address: b"a",
        message_id: 42,
        expires_at_unix_ms: 0,
        content_type: b"",
        correlation_id: b"",
        reply_to: b"",
        headers: Default::default(),
        body: b"x",
    };
    write_segment(2, &[record::Record::Message(message)]);
    for start in ["first", "second"] {
        let (_, recovery) = open(config(&dir), SHARD).unwrap();
        assert_eq!(recovery.message_id_high_water, reserved, "{start} start");
        assert_eq!(ids(&recovery), [("a".to_owned(), 42)], "{start} start");
        assert!(segment_path(&shard, SegmentId(1)).exists(), "{start} start deleted the reservation's segment");
    }
}
