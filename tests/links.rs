//! Links between brokers (issue 13, item 1; src/link/), against two real broker processes on
//! loopback: both directions round-trip with receipts and keep a publisher's order; a link whose
//! connection the chaos proxy drops 100 times under load loses and repeats nothing receipted;
//! the link's state shows in `/api/links` and the metrics; a bad `[[link]]` stops the start.

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chaos_proxy::{ChaosProxy, Schedule};
use common::{admin_request, promtool_check, Broker};
use mbws::mbws::{AckMode, DeliveryMode, Message};
use mbws_client::Client;

const WAIT: Duration = Duration::from_secs(10);

/// A configuration file holding `text`, in a directory of its own (removed by the caller's
/// `Drop` of the returned guard).
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = common::temp_dir("links-config");
        let path = dir.join("broker.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn link_section(name: &str, url: &str, direction: &str, addresses: &str, extra: &str) -> String {
    format!(
        "[[link]]\nname = \"{name}\"\nurl = \"{url}\"\ndirection = \"{direction}\"\naddresses = {addresses}\n\
         timeout-ms = 5000\n{extra}\n"
    )
}

/// Starts a broker with this configuration file and waits (bounded) until its link `name` is up.
fn broker_with_link(config: &ConfigFile, extra: &[&str], name: &str) -> Broker {
    let mut args = vec!["--shards", "2", "--config", config.arg()];
    args.extend_from_slice(extra);
    let broker = Broker::start(&args);
    broker.wait_for_log(&format!("link {name}: up"), WAIT).unwrap_or_else(|| {
        panic!("link {name} did not come up: {:#?}", broker.log_lines());
    });
    broker
}

fn consume(client: &mut Client, count: usize, within: Duration) -> Vec<Message> {
    let deadline = Instant::now() + within;
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {} of {count} messages arrived within {within:?}", messages.len());
        if let Some(message) = client.next_message(left.min(Duration::from_secs(1))).unwrap() {
            client.ack(message.delivery_seq, false).unwrap();
            messages.push(message);
        }
    }
    client.flush().unwrap();
    messages
}

fn send_all(client: &mut Client, address: &str, count: u64) {
    let mut last = 0;
    for index in 0..count {
        last = client.send(address, format!("m{index}")).unwrap();
    }
    client.wait_receipt(last).unwrap();
}

fn bodies(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|message| String::from_utf8_lossy(&message.body).into_owned()).collect()
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a [u8]> {
    message.properties.headers.iter().find(|(key, _)| key.as_ref() == name.as_bytes()).map(|(_, value)| value.as_ref())
}

/// The link `name` as `/api/links` shows it.
fn link_json(broker: &Broker, name: &str) -> serde_json::Value {
    let (status, body) = admin_request(broker.admin_addr(), "GET", "/api/links", "");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    answer["links"].as_array().unwrap().iter().find(|link| link["name"] == name).cloned().expect("the link is listed")
}

/// Waits (bounded) until `/api/links` shows `forwarded` at `count` for link `name`.
fn wait_forwarded(broker: &Broker, name: &str, count: u64) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let link = link_json(broker, name);
        if link["forwarded"].as_u64() == Some(count) || Instant::now() >= deadline {
            return link;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_out_link_forwards_there_in_order_renamed_and_shows_in_the_admin_api() {
    let there = Broker::start(&["--shards", "2"]);
    let config =
        ConfigFile::new(&link_section("to-b", &there.url(), "out", "[\"orders\"]", "target-prefix = \"site-a.\""));
    let here = broker_with_link(&config, &[], "to-b");
    let mut consumer = there.client();
    consumer.subscribe(1, "site-a.orders", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();

    let mut publisher = here.client();
    send_all(&mut publisher, "orders", 500);
    let messages = consume(&mut consumer, 500, WAIT);
    let expected: Vec<String> = (0..500).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies(&messages), expected, "every message once, in the publisher's order");
    assert_eq!(header(&messages[0], "x-mbws-link-hops"), Some(&b"1"[..]), "the hop count travels with it");
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "nothing more");

    let link = wait_forwarded(&here, "to-b", 500);
    assert_eq!(link["state"], "up", "{link}");
    assert_eq!(link["direction"], "out");
    assert_eq!(link["forwarded"], 500, "{link}");
    assert_eq!(link["in_flight"], 0, "{link}");
    let (status, metrics) = admin_request(here.admin_addr(), "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(metrics.contains("mbws_link_up{link=\"to-b\",direction=\"out\"} 1"), "{metrics}");
    assert!(metrics.contains("mbws_link_forwarded_messages_total{link=\"to-b\",direction=\"out\"} 500"), "{metrics}");
    promtool_check(&metrics);
    // Settled here: nothing waits at the local address any more.
    let (_, address) = admin_request(here.admin_addr(), "GET", "/api/addresses/orders", "");
    let address: serde_json::Value = serde_json::from_str(&address).unwrap();
    assert_eq!(address["depth"], 0, "{address}");
}

#[test]
fn an_in_link_brings_messages_here_and_settles_there_after_the_local_fsync() {
    let there = Broker::start(&["--shards", "2"]);
    let config =
        ConfigFile::new(&link_section("from-b", &there.url(), "in", "[\"jobs\"]", "[link.rename]\njobs = \"b-jobs\""));
    let data_dir = common::temp_dir("links-in");
    let mut here =
        Broker::start_in(&data_dir, &["--shards", "2", "--durable-address", "b-jobs", "--config", config.arg()]);
    here.wait_for_log("link from-b: up", WAIT).expect("the link comes up");
    let mut publisher = there.client();
    send_all(&mut publisher, "jobs", 300);

    // Settled there only once here holds them (durable here: after the fsync).
    let link = wait_forwarded(&here, "from-b", 300);
    assert_eq!((link["forwarded"].as_u64(), link["direction"].as_str()), (Some(300), Some("in")), "{link}");
    let (_, address) = admin_request(there.admin_addr(), "GET", "/api/addresses/jobs", "");
    let address: serde_json::Value = serde_json::from_str(&address).unwrap();
    assert_eq!((address["depth"].as_u64(), address["unacked"].as_u64()), (Some(0), Some(0)), "{address}");

    // Durable here: what the link settled there survives a crash of this broker.
    here.kill();
    let restarted = Broker::start_in(&data_dir, &["--shards", "2", "--durable-address", "b-jobs"]);
    let mut consumer = restarted.client();
    consumer.subscribe(1, "b-jobs", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let messages = consume(&mut consumer, 300, WAIT);
    let expected: Vec<String> = (0..300).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies(&messages), expected, "every message once, in order, after a crash of the receiving broker");
    assert!(messages.iter().all(|message| message.durable), "durable as the address is");
    drop(restarted);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn a_link_dropped_100_times_under_load_loses_nothing_receipted_and_repeats_nothing() {
    let there = Broker::start(&["--shards", "2"]);
    let seed = std::env::var("MBWS_CHAOS_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or(0x11AC);
    let proxy = ChaosProxy::start(
        there.addr,
        Schedule { seed, gap_ms: (10, 30), cut_percent: 80, stall_ms: (5, 50), max_cuts: 100 },
    );
    let config = ConfigFile::new(&link_section("chaos", &proxy.url(), "out", "[\"load\"]", ""));
    let here = broker_with_link(&config, &[], "chaos");
    let mut consumer = there.client();
    consumer.subscribe(1, "load", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();

    // The publisher sends here until the proxy has cut the link 100 times and it has sent at
    // least 3000 messages; every one is receipted here before it stops.
    let mut publisher = here.client();
    let cuts = proxy.cut_counter();
    let mut sender = Some(std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut sent = 0u64;
        while sent < 3000 || cuts.load(std::sync::atomic::Ordering::Relaxed) < 100 {
            assert!(
                Instant::now() < deadline,
                "the proxy cut {} times in 90 s",
                cuts.load(std::sync::atomic::Ordering::Relaxed)
            );
            let seq = publisher.send("load", format!("m{sent}")).unwrap();
            sent += 1;
            if sent % 50 == 0 {
                publisher.wait_receipt(seq).unwrap();
                std::thread::sleep(Duration::from_millis(1)); // Spread the load over the cuts.
            }
        }
        publisher.wait_receipt(sent).unwrap();
        sent
    }));

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen = HashSet::new();
    let mut last_index: Option<u64> = None;
    let mut sent = None;
    loop {
        if sender.as_ref().is_some_and(|thread| thread.is_finished()) {
            sent = Some(sender.take().unwrap().join().unwrap());
        }
        match sent {
            Some(total) if seen.len() as u64 == total => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{} messages arrived, {sent:?} sent; log: {:#?}",
            seen.len(),
            here.log_lines()
        );
        let Some(message) = consumer.next_message(Duration::from_millis(200)).unwrap() else { continue };
        consumer.ack(message.delivery_seq, false).unwrap();
        let body = String::from_utf8(message.body.to_vec()).unwrap();
        let index: u64 = body[1..].parse().unwrap();
        assert!(seen.insert(index), "message {index} arrived twice");
        assert!(last_index.is_none_or(|last| index > last), "message {index} after {last_index:?}: the order changed");
        last_index = Some(index);
    }
    let total = sent.unwrap();
    assert!((0..total).all(|index| seen.contains(&index)), "every receipted message arrived");
    assert!(consumer.next_message(Duration::from_millis(500)).unwrap().is_none(), "and nothing more");
    assert!(proxy.cuts() >= 100, "the proxy cut the link {} times", proxy.cuts());
    let link = wait_forwarded(&here, "chaos", total);
    assert_eq!(link["forwarded"].as_u64(), Some(total), "{link}");
    assert!(link["resumes"].as_u64().unwrap() > 0, "the link resumed its session: {link}");
    assert!(here.wait_for_log("link chaos: resumed", WAIT).is_some(), "a resume is logged");
}

#[test]
fn a_bad_link_is_refused_at_start_with_the_link_the_key_and_what_to_do() {
    for (section, says) in [
        (
            link_section("bad", "ws://127.0.0.1:9/", "sideways", "[\"x\"]", ""),
            "[[link]] \"bad\": direction: \"sideways\" is not valid: give \"out\"",
        ),
        (link_section("bad", "http://127.0.0.1:9/", "out", "[\"x\"]", ""), "[[link]] \"bad\": url:"),
        (
            link_section("bad", "ws://127.0.0.1:9/", "out", "[\"x\"]", "max-in-flight = 0"),
            "max-in-flight: 0 is out of range: give 1 to 65535",
        ),
        (
            link_section("there", "ws://127.0.0.1:9/", "out", "[\"x\"]", "")
                + &link_section("back", "ws://127.0.0.1:9/", "in", "[\"x\"]", ""),
            "a loop; remove the address from one of the two links",
        ),
    ] {
        let config = ConfigFile::new(&section);
        let dir = common::temp_dir("links-bad");
        match Broker::try_start_in(&dir, &["--config", config.arg()]) {
            Ok(_) => panic!("started with {section}"),
            Err((status, log)) => {
                assert_eq!(status.code(), Some(2), "{log:?}");
                assert!(log.iter().any(|line| line.contains(says) && line.contains(config.arg())), "{says}: {log:#?}");
            }
        }
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing written by a refused start");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn after_the_far_broker_restarts_the_link_opens_new_sessions_and_loses_nothing_durable() {
    let there_dir = common::temp_dir("links-there");
    // A session there waits 1 s for a resume: the link gives up resuming after that.
    let there_flags = ["--shards", "1", "--durable-address", "orders", "--session-expiry-ms", "1000"];
    let mut there = Broker::start_in(&there_dir, &there_flags);
    let there_addr = there.addr.to_string();
    let config = ConfigFile::new(&link_section("to-b", &there.url(), "out", "[\"orders\"]", "reconnect-max-ms = 200"));
    let here = broker_with_link(&config, &["--durable-address", "orders"], "to-b");
    let mut publisher = here.client();
    send_all(&mut publisher, "orders", 100);
    wait_forwarded(&here, "to-b", 100);

    // A crash there: its sessions are gone; what it receipted was fsynced.
    there.kill();
    for index in 100..200 {
        publisher.send("orders", format!("m{index}")).unwrap();
    }
    publisher.wait_receipt(200).unwrap(); // Receipted here (durable here) while there is down.
    here.wait_for_log("link to-b: down", WAIT).expect("the link goes down");
    let there = Broker::start_in(&there_dir, &[&there_flags[..], &["--listen", &there_addr]].concat());
    let deadline = Instant::now() + WAIT;
    while here.log_lines().iter().filter(|line| line.contains("link to-b: up")).count() < 2 {
        assert!(Instant::now() < deadline, "the link did not come up again: {:#?}", here.log_lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut consumer = there.client();
    consumer.subscribe(1, "orders", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let messages = consume(&mut consumer, 200, WAIT);
    let expected: Vec<String> = (0..200).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies(&messages), expected, "what was receipted before and during the outage, once, in order");
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "nothing more");
    let link = wait_forwarded(&here, "to-b", 200);
    assert!(link["restarts"].as_u64().unwrap() >= 1, "{link}");
    drop(there);
    let _ = std::fs::remove_dir_all(&there_dir);
}
