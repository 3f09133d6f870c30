//! Durable addresses against the real broker: crash (SIGKILL) at random moments, restart,
//! drain; torn and corrupted logs (docs/RELIABILITY.md).

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::Rng;
use common::{temp_dir, Broker};
use mbws::mbws::{AckMode, DeliveryMode, Send};
use mbws_client::{Client, ClientOptions};

fn durable(address: &str, body: String) -> Send {
    Send {
        address: Bytes::copy_from_slice(address.as_bytes()),
        durable: true,
        body: Bytes::from(body),
        ..Default::default()
    }
}

/// Consumes everything on `address` until it stays quiet, acknowledging it all; returns the bodies.
fn drain(broker: &Broker, address: &str) -> Vec<String> {
    drain_expecting(broker, address, 0)
}

/// Like [`drain`], for a caller that knows how many messages there are at least: the first
/// `expected` are waited for as long as a loaded machine may take (quiet there is not the end),
/// then anything more until the address stays quiet.
fn drain_expecting(broker: &Broker, address: &str, expected: usize) -> Vec<String> {
    let mut consumer = broker.client();
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut bodies = Vec::new();
    let mut last = 0;
    let quiet = |received: usize| {
        if received < expected {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(700)
        }
    };
    while let Some(message) = consumer.next_message(quiet(bodies.len())).unwrap() {
        bodies.push(String::from_utf8(message.body.to_vec()).expect("bodies are never corrupted"));
        last = message.delivery_seq;
        if bodies.len() % 250 == 0 {
            consumer.ack(last, true).unwrap(); // Keep credit flowing.
        }
    }
    if last > 0 {
        consumer.ack(last, true).unwrap();
    }
    consumer.close().unwrap();
    // Acknowledgements are logged by the next group commit (within milliseconds).
    std::thread::sleep(Duration::from_millis(300));
    bodies
}

fn publish_durable(broker: &Broker, address: &str, count: u64) {
    let mut publisher = broker.client();
    let mut last = 0;
    for index in 0..count {
        last = publisher.send_message(durable(address, format!("m{index}"))).unwrap();
    }
    publisher.wait_receipt(last).unwrap();
}

#[test]
fn receipted_durable_messages_survive_sigkill_exactly_once() {
    const CRASHES: u64 = 5;
    let seed: u64 = std::env::var("MBWS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xc4a5_4001);
    eprintln!("crash schedule seed {seed} (set MBWS_CRASH_SEED to replay)");
    let mut rng = Rng::new(seed);
    let dir = temp_dir("crash");
    let mut broker = Broker::start_in(&dir, &["--shards", "2"]);
    let mut total_receipted = 0;
    for round in 0..CRASHES {
        // A publisher sends until the broker dies under it, counting receipts.
        let receipted = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let url = broker.url();
        let publisher = {
            let (receipted, sent) = (receipted.clone(), sent.clone());
            std::thread::spawn(move || {
                let options = ClientOptions { timeout: Duration::from_secs(5), ..Default::default() };
                let Ok(mut client) = Client::connect(&url, options) else { return };
                for index in 0..1_000_000u64 {
                    let Ok(seq) = client.send_message(durable("ledger", format!("r{round}-{index}"))) else { return };
                    sent.store(index + 1, Ordering::SeqCst);
                    if index % 20 == 19 {
                        if client.wait_receipt(seq).is_err() {
                            return;
                        }
                        receipted.store(seq, Ordering::SeqCst);
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.between(150, 600)));
        broker.kill();
        publisher.join().unwrap();
        let receipted = receipted.load(Ordering::SeqCst);
        let sent = sent.load(Ordering::SeqCst);
        total_receipted += receipted;
        assert!(receipted > 0, "round {round}: nothing was receipted before the crash");

        broker = Broker::start_in(&dir, &["--shards", "2"]);
        let bodies = drain(&broker, "ledger");
        let mut seen: HashMap<String, usize> = HashMap::new();
        for body in &bodies {
            *seen.entry(body.clone()).or_default() += 1;
        }
        for index in 0..receipted {
            let body = format!("r{round}-{index}");
            assert_eq!(seen.get(&body), Some(&1), "round {round}: receipted {body} must be there exactly once");
        }
        for body in seen.keys() {
            let (body_round, index) = body[1..].split_once('-').expect("a body we sent");
            let (body_round, index): (u64, u64) = (body_round.parse().unwrap(), index.parse().unwrap());
            assert_eq!(body_round, round, "a message acknowledged in an earlier round came back: {body}");
            assert!(index < sent, "invented message {body} (only {sent} were sent)");
        }
        assert!(seen.values().all(|&count| count == 1), "round {round}: duplicates after restart");
        eprintln!("round {round}: sent {sent}, receipted {receipted}, recovered {}", bodies.len());
    }
    // A clean restart after everything was acknowledged brings nothing back.
    broker.kill();
    let broker = Broker::start_in(&dir, &["--shards", "2"]);
    assert!(drain(&broker, "ledger").is_empty(), "acknowledged messages stay acknowledged");
    eprintln!("{CRASHES} crashes survived, {total_receipted} receipted messages checked");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// The segment files of every shard, largest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .flat_map(|shard| std::fs::read_dir(shard).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    files.sort_by_key(|path| std::cmp::Reverse(std::fs::metadata(path).unwrap().len()));
    files
}

#[test]
fn a_torn_last_record_is_truncated_and_everything_before_it_is_served() {
    let mut rng = Rng::new(0x7042);
    for attempt in 0..3 {
        let dir = temp_dir("torn");
        let mut broker = Broker::start_in(&dir, &["--shards", "1"]);
        publish_durable(&broker, "torn", 20);
        broker.kill();
        let segment = segments(&dir).remove(0);
        let length = std::fs::metadata(&segment).unwrap().len();
        // Cut somewhere inside the last record ("m19" and its header: the last ~60 bytes).
        let cut = length - rng.between(1, 40);
        std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(cut).unwrap();

        let broker = Broker::start_in(&dir, &["--shards", "1"]);
        let report = broker.wait_for_log("log recovery", Duration::from_secs(2));
        assert!(report.is_some_and(|line| line.contains("bytes")), "attempt {attempt}: the truncation is reported");
        let bodies = drain(&broker, "torn");
        let expected: Vec<String> = (0..19).map(|index| format!("m{index}")).collect();
        assert_eq!(bodies, expected, "attempt {attempt}: everything before the torn record, in order");
        drop(broker);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The offset of the last byte of the first MESSAGE record in `segment` whose body is `body`,
/// by the documented layout (src/store/mod.rs: a 32-byte segment header, then records back to
/// back: length u32, checksum u32, then `length` bytes of kind and payload, the body last).
fn last_byte_of_message(segment: &[u8], body: &[u8]) -> usize {
    const SEGMENT_HEADER_BYTES: usize = 32;
    const RECORD_HEADER_BYTES: usize = 8;
    const MESSAGE: u8 = 1;
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset + RECORD_HEADER_BYTES < segment.len() {
        let length = u32::from_be_bytes(segment[offset..offset + 4].try_into().unwrap()) as usize;
        let end = offset + RECORD_HEADER_BYTES + length;
        assert!(length > 0 && end <= segment.len(), "a record at offset {offset} runs past the segment");
        if segment[offset + RECORD_HEADER_BYTES] == MESSAGE && segment[..end].ends_with(body) {
            return end - 1;
        }
        offset = end;
    }
    panic!("no MESSAGE record with the body {:?} in the segment", String::from_utf8_lossy(body));
}

#[test]
fn a_flipped_byte_in_the_middle_refuses_to_start_or_is_skipped_when_asked() {
    let dir = temp_dir("corrupt");
    let mut broker = Broker::start_in(&dir, &["--shards", "1"]);
    publish_durable(&broker, "fragile", 10);
    broker.kill();
    let segment = segments(&dir).remove(0);
    let mut bytes = std::fs::read(&segment).unwrap();
    // The last byte of m4's record (its body), found by walking the records: a search for the
    // bytes "m4" could also match inside a checksum or the segment's random salt.
    let position = last_byte_of_message(&bytes, b"m4");
    bytes[position] ^= 0x01; // "m4" becomes "m5": a valid-looking body with a wrong checksum.
    std::fs::write(&segment, &bytes).unwrap();

    let started = Instant::now();
    let (status, log) = match Broker::try_start_in(&dir, &["--shards", "1"]) {
        Ok(_) => panic!("the broker must refuse a log damaged in the middle"),
        Err(refused) => refused,
    };
    assert!(!status.success());
    let text = log.join("\n");
    assert!(text.contains("damaged at byte offset"), "names the offset: {text}");
    assert!(text.contains(segment.file_name().unwrap().to_str().unwrap()), "names the file: {text}");
    assert!(text.contains("skip-corrupt"), "says how to proceed: {text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let broker = Broker::start_in(&dir, &["--shards", "1", "--log-recovery", "skip-corrupt"]);
    let bodies = drain_expecting(&broker, "fragile", 9);
    let expected: Vec<String> = (0..10).filter(|&index| index != 4).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies, expected, "every valid record, never the corrupted one");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unwritable_data_dir_is_a_clear_start_up_error() {
    let dir = temp_dir("unwritable");
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let (status, log) = match Broker::try_start_in(&file.join("data"), &["--shards", "1"]) {
        Ok(_) => panic!("a data dir under a regular file cannot work"),
        Err(refused) => refused,
    };
    assert!(!status.success());
    let text = log.join("\n");
    assert!(text.contains("data") && text.contains("directory"), "names the path and what to do: {text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_data_dir_written_with_another_shard_count_is_refused() {
    let dir = temp_dir("shards");
    let mut broker = Broker::start_in(&dir, &["--shards", "2"]);
    publish_durable(&broker, "kept", 3);
    broker.kill();
    let (status, log) = match Broker::try_start_in(&dir, &["--shards", "1"]) {
        Ok(_) => panic!("a log written by 2 shards cannot be served by 1"),
        Err(refused) => refused,
    };
    assert!(!status.success());
    assert!(log.join("\n").contains("--shards 2"), "says which count to use: {log:?}");
    let broker = Broker::start_in(&dir, &["--shards", "2"]);
    assert_eq!(drain_expecting(&broker, "kept", 3), vec!["m0", "m1", "m2"]);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

fn subscribed_consumer(broker: &Broker, address: &str) -> Client {
    let mut consumer = broker.client();
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    consumer
}

/// Issue 8 item 14, as reported: with a wide group-commit window, a consumer of a durable
/// address got "A" (message id 1) before its record was synced; after a SIGKILL the restarted
/// broker gave "B" the same id 1, so a consumer deduplicating by (address, id) dropped "B".
/// Now a durable message is delivered only once it is synced, and ids never repeat.
#[test]
fn a_durable_message_is_delivered_only_once_synced_and_its_id_is_never_reused_after_a_crash() {
    let dir = temp_dir("unsynced");
    let flags = ["--shards", "1", "--durable-address", "dur.*", "--log-batch-delay-us", "1000000"];
    let mut broker = Broker::start_in(&dir, &flags);
    let mut consumer = subscribed_consumer(&broker, "dur.x");
    let mut publisher = broker.client();
    publisher.send("dur.x", "A").unwrap();
    publisher.flush().unwrap();
    // The group commit is a second away: nothing may reach the consumer before it.
    let mut seen_ids = Vec::new();
    let early = consumer.next_message(Duration::from_millis(500)).unwrap();
    if let Some(message) = &early {
        seen_ids.push(message.message_id);
    }
    assert!(early.is_none(), "a consumer got {early:?} before its record was synced (a crash can take it back)");
    broker.kill();

    let broker = Broker::start_in(&dir, &flags);
    let mut consumer = subscribed_consumer(&broker, "dur.x");
    let mut publisher = broker.client();
    let seq = publisher.send("dur.x", "B").unwrap();
    publisher.wait_receipt(seq).unwrap();
    let message = consumer.next_message(Duration::from_secs(5)).unwrap().expect("B is delivered once synced");
    assert_eq!(&message.body[..], b"B", "A was never receipted nor synced: it is gone");
    assert!(!message.redelivered);
    assert!(!seen_ids.contains(&message.message_id), "B reuses message id {} that A had", message.message_id);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// One address, durable and non-durable messages mixed (durable per SEND): after a SIGKILL,
/// new messages get ids that no consumer saw before the crash, above all of them.
#[test]
fn message_ids_of_mixed_durable_and_in_memory_messages_stay_unique_across_a_crash() {
    let dir = temp_dir("mixed-ids");
    let flags = ["--shards", "1"];
    let mut broker = Broker::start_in(&dir, &flags);
    let mut consumer = subscribed_consumer(&broker, "mixed");
    let mut publisher = broker.client();
    let mut last = publisher.send_message(durable("mixed", "d1".to_string())).unwrap();
    for index in 1..=3 {
        last = publisher.send("mixed", format!("n{index}")).unwrap();
    }
    publisher.wait_receipt(last).unwrap();
    let mut seen: HashMap<u64, String> = HashMap::new();
    for _ in 0..4 {
        let message = consumer.next_message(Duration::from_secs(5)).unwrap().expect("all four are delivered");
        let body = String::from_utf8(message.body.to_vec()).unwrap();
        assert!(seen.insert(message.message_id, body).is_none(), "ids are unique before the crash");
    }
    broker.kill();

    let broker = Broker::start_in(&dir, &flags);
    let mut consumer = subscribed_consumer(&broker, "mixed");
    let recovered = consumer.next_message(Duration::from_secs(5)).unwrap().expect("the durable message is back");
    assert_eq!(&recovered.body[..], b"d1");
    assert!(recovered.redelivered);
    assert_eq!(seen.get(&recovered.message_id).map(String::as_str), Some("d1"), "a recovered message keeps its id");
    let mut publisher = broker.client();
    let mut last = publisher.send("mixed", "n4").unwrap();
    last = last.max(publisher.send_message(durable("mixed", "d2".to_string())).unwrap());
    publisher.wait_receipt(last).unwrap();
    let highest_seen = seen.keys().copied().max().unwrap();
    for _ in 0..2 {
        let message = consumer.next_message(Duration::from_secs(5)).unwrap().expect("new messages are delivered");
        let body = String::from_utf8(message.body.to_vec()).unwrap();
        assert!(
            message.message_id > highest_seen,
            "{body} got message id {}, which does not follow the ids seen before the crash: {seen:?}",
            message.message_id
        );
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// Measurement, not a test (docs/PERFORMANCE.md, "Durable delivery"): send-to-deliver latency
/// of messages sent one at a time to a durable address, and to an in-memory one for
/// comparison, through the real broker and client (loopback, one shard).
/// `cargo test --release --test durability measure_send_to_deliver_latency -- --ignored --nocapture`
#[test]
#[ignore = "measurement, not a test: run it explicitly in release mode"]
fn measure_send_to_deliver_latency() {
    const MESSAGES: usize = 3000;
    let broker = Broker::start(&["--shards", "1", "--durable-address", "dur.*"]);
    for (address, durable) in [("mem.x", false), ("dur.x", true)] {
        let mut consumer = subscribed_consumer(&broker, address);
        let mut publisher = broker.client();
        let mut latencies_us = Vec::with_capacity(MESSAGES);
        for index in 0..MESSAGES + 200 {
            let sent = Instant::now();
            publisher.send(address, format!("m{index}")).unwrap();
            publisher.flush().unwrap();
            let message = consumer.next_message(Duration::from_secs(5)).unwrap().expect("delivered");
            let latency = sent.elapsed();
            consumer.ack(message.delivery_seq, false).unwrap();
            if index >= 200 {
                latencies_us.push(latency.as_secs_f64() * 1e6); // after 200 of warm-up
            }
        }
        latencies_us.sort_by(f64::total_cmp);
        let at = |quantile: f64| latencies_us[((latencies_us.len() as f64 * quantile) as usize).min(MESSAGES - 1)];
        eprintln!(
            "{address} (durable: {durable}): {MESSAGES} messages one at a time, send-to-deliver p50 {:.0} us, \
             p90 {:.0} us, p99 {:.0} us",
            at(0.50),
            at(0.90),
            at(0.99)
        );
    }
}
