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
use mbws::mbws::{AckMode, Binding, DeliveryMode, Send, Subprotocol};
use mbws_client::{Client, ClientOptions};

fn connect(broker: &Broker) -> Client {
    let options = ClientOptions {
        subprotocol: Subprotocol::Reliable,
        binding: Binding::Binary,
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    Client::connect(&broker.url(), options).unwrap()
}

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
    let mut consumer = connect(broker);
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut bodies = Vec::new();
    let mut last = 0;
    while let Some(message) = consumer.next_message(Duration::from_millis(700)).unwrap() {
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
    let mut publisher = connect(broker);
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

#[test]
fn a_flipped_byte_in_the_middle_refuses_to_start_or_is_skipped_when_asked() {
    let dir = temp_dir("corrupt");
    let mut broker = Broker::start_in(&dir, &["--shards", "1"]);
    publish_durable(&broker, "fragile", 10);
    broker.kill();
    let segment = segments(&dir).remove(0);
    let mut bytes = std::fs::read(&segment).unwrap();
    let position = bytes.windows(2).position(|pair| pair == b"m4").expect("the body of m4 is in the log");
    bytes[position + 1] ^= 0x01; // "m4" becomes "m5": a valid-looking body with a wrong checksum.
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
    let bodies = drain(&broker, "fragile");
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
    assert_eq!(drain(&broker, "kept"), vec!["m0", "m1", "m2"]);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
