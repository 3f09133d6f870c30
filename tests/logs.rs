//! The broker's log against the real binary (issue 11, item 4): one event per line, the JSON
//! format (checked by an independent parser), connection and session events at info with the
//! peer and the reason, no line per message at info, and the periodic summary with figures
//! that move by exactly the messages sent.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use mbws::mbws::{AckMode, DeliveryMode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);
const MESSAGES: usize = 200;

/// Waits (bounded) for a log line for which `matches` holds.
fn wait_for_line(broker: &Broker, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = broker.log_lines().into_iter().find(|line| matches(line)) {
            return Some(line);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `MESSAGES` messages from a fresh client to one that consumes them all; returns the
/// publisher's and the consumer's local addresses (as the broker sees their peers).
fn traffic(broker: &Broker, address: &str) -> (String, String) {
    let mut consumer = broker.client();
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Auto, 1000).unwrap();
    let mut publisher = broker.client();
    let (publisher_addr, consumer_addr) =
        (publisher.local_addr().unwrap().to_string(), consumer.local_addr().unwrap().to_string());
    let mut last = 0;
    for index in 0..MESSAGES {
        last = publisher.send(address, format!("m{index}")).unwrap();
    }
    publisher.wait_receipt(last).unwrap();
    for index in 0..MESSAGES {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {index} arrives"));
        assert_eq!(message.body, Bytes::from(format!("m{index}")));
    }
    publisher.close().unwrap();
    drop(consumer); // Gone without a close: the session waits for a resume.
    (publisher_addr, consumer_addr)
}

#[test]
fn json_lines_carry_connection_events_and_the_summary_and_no_line_per_message() {
    let broker = Broker::start(&[
        "--shards",
        "2",
        "--log-format",
        "json",
        "--log-level",
        "info",
        "--summary-interval-secs",
        "1",
    ]);
    let (publisher, consumer) = traffic(&broker, "json-logs");
    // The first summary after the traffic counts every message exactly once, on both sides.
    let summary = wait_for_line(&broker, WAIT, |line| {
        line.contains("\"msg\":\"summary\"") && line.contains(&format!("\"delivered_total\":{MESSAGES}"))
    })
    .expect("a summary with every message delivered");
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["received_total"], MESSAGES, "{summary}");
    assert_eq!(summary["queued_messages"], 0, "{summary}");
    assert!(summary["received_per_sec"].is_number() && summary["sessions"].is_number(), "{summary}");
    wait_for_line(&broker, WAIT, |line| line.contains("session kept for resume") && line.contains(&consumer))
        .expect("the consumer's lost connection is logged");

    let lines = broker.log_lines();
    let events: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not one JSON object ({error}): {line}")))
        .collect();
    for event in &events {
        for key in ["ts", "level", "target", "msg"] {
            assert!(event[key].is_string(), "{key} in {event}");
        }
        assert!(["error", "warn", "info"].contains(&event["level"].as_str().unwrap()), "{event}");
        if event["target"] == "shard" {
            assert!(event["shard"].as_u64().is_some_and(|shard| shard < 2), "{event}");
        }
    }
    let find = |msg: &str, peer: &str| {
        events
            .iter()
            .find(|event| event["msg"] == msg && event["peer"] == peer)
            .unwrap_or_else(|| panic!("no {msg:?} event for {peer} in {lines:#?}"))
    };
    assert_eq!(find("connection opened", &publisher)["protocol"], "MBWS.huawei.com");
    find("connection opened", &consumer);
    let closed = find("connection closed", &publisher);
    assert!(closed["reason"].as_str().unwrap().starts_with("closed by the broker (1000"), "{closed}");
    let lost = find("connection closed, session kept for resume", &consumer);
    assert_eq!(lost["reason"], "connection lost (no close frame)", "{lost}");
    // 200 messages, and yet only start-up, connection and summary lines.
    let other = events
        .iter()
        .filter(|event| event["msg"] != "summary" && !event["msg"].as_str().unwrap().starts_with("connection "))
        .count();
    assert!(other <= 6, "lines other than start-up, connections and summaries at info: {lines:#?}");
}

#[test]
fn the_text_summary_is_one_line_of_key_values() {
    let broker = Broker::start(&["--shards", "1", "--log-level", "info", "--summary-interval-secs", "1"]);
    traffic(&broker, "text-logs");
    let needle = format!("delivered_total={MESSAGES}");
    let line = wait_for_line(&broker, WAIT, |line| line.contains(" INFO  summary ") && line.contains(&needle))
        .expect("a text summary with every message delivered");
    for field in ["received_per_sec=", "delivered_per_sec=", "sessions=", "queued_messages=0", "queued_bytes=0"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(line.contains(&format!("received_total={MESSAGES}")), "{line}");
}
