//! The admin API against the real broker binary over real sockets: every endpoint, metrics that
//! move by exactly the messages sent, the Prometheus text format checked by a strict parser
//! (and by Prometheus's own `promtool check metrics` where it is installed, as `.ci/run` does),
//! the token beyond loopback, and the curl commands of docs/OPERATIONS.md.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{promtool_check, Broker};
use mbws::mbws::{AckMode, DeliveryMode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);
const TOKEN: &str = "test-token-0123456789abcdef";

/// An HTTP answer: status, headers (names lower-cased), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(field, _)| field == name).map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

/// One HTTP/1.1 request to the admin API (bounded in time), read to the end.
fn request(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect_timeout(&admin, WAIT).expect("connect to the admin API");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let authorization = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{authorization}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer, then the close");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect::<Vec<_>>();
    let length: usize = headers.iter().find(|(name, _)| name == "content-length").unwrap().1.parse().unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    Answer { status, headers, body: body.to_string() }
}

fn get(admin: SocketAddr, path: &str) -> Answer {
    request(admin, "GET", path, None)
}

/// The series of a Prometheus text page, checked strictly on the way (see [`parse_metrics`]).
type Series = BTreeMap<String, f64>;

/// A strict reader of the Prometheus text format (0.0.4): every line is a `# HELP`, a
/// `# TYPE` or a sample; names and label names are valid; label values are quoted with only
/// `\\`, `\"` and `\n` escapes; values are numbers; a family's `# TYPE` comes once, before its
/// samples, and its samples are together; counters end in `_total`; no series repeats.
/// Returns every series as `name{label="value",...}` (labels in page order) with its value.
fn parse_metrics(text: &str) -> Series {
    fn is_name(name: &str, colons: bool) -> bool {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
    }
    let mut series = Series::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut current_family: Option<String> = None;
    let mut finished_families: Vec<String> = Vec::new();
    assert!(text.ends_with('\n'), "the page ends with a newline");
    for (number, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", number + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (keyword, name) = (words.next().unwrap(), words.next().expect(&at));
            assert!(is_name(name, true), "{at}: bad metric name");
            match keyword {
                "HELP" => assert!(words.next().is_some_and(|help| !help.is_empty()), "{at}: empty HELP"),
                "TYPE" => {
                    let kind = words.next().expect(&at);
                    assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{at}");
                    assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "{at}: TYPE repeated");
                    if kind == "counter" {
                        assert!(name.ends_with("_total"), "{at}: a counter's name ends in _total");
                    }
                    if let Some(previous) = current_family.replace(name.to_string()) {
                        finished_families.push(previous);
                    }
                }
                _ => panic!("{at}: a comment other than HELP or TYPE"),
            }
            continue;
        }
        assert!(!line.is_empty(), "{at}: empty line");
        let name_end = line.find(['{', ' ']).expect(&at);
        let name = &line[..name_end];
        assert!(is_name(name, true), "{at}: bad metric name");
        // A histogram's samples are its family's name with _bucket, _sum or _count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|family| types.get(*family).is_some_and(|kind| kind == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "{at}: a sample before its TYPE");
        assert_eq!(current_family.as_deref(), Some(family), "{at}: a sample away from its family");
        assert!(!finished_families.iter().any(|finished| finished == family), "{at}: family split");
        if family != name {
            assert_eq!(name.ends_with("_bucket"), line.contains("le=\""), "{at}: le on buckets only");
        }
        let mut rest = &line[name_end..];
        let mut key = name.to_string();
        if let Some(labels) = rest.strip_prefix('{') {
            key.push('{');
            let mut chars = labels.char_indices().peekable();
            let mut first = true;
            loop {
                let (start, c) = chars.next().expect(&at);
                if c == '}' {
                    rest = &labels[start + 1..];
                    break;
                }
                if !first {
                    assert_eq!(c, ',', "{at}: labels are separated by commas");
                    key.push(',');
                }
                first = false;
                let label_start = if c == ',' { chars.next().expect(&at).0 } else { start };
                let equals = labels[label_start..].find('=').expect(&at) + label_start;
                let label = &labels[label_start..equals];
                assert!(is_name(label, false) && !label.starts_with("__"), "{at}: bad label name {label:?}");
                while chars.peek().is_some_and(|(index, _)| *index < equals) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('='), "{at}");
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{at}: a label value is quoted");
                let mut value = String::new();
                loop {
                    match chars.next().expect(&at).1 {
                        '"' => break,
                        '\\' => match chars.next().expect(&at).1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("{at}: bad escape \\{other}"),
                        },
                        '\n' => panic!("{at}: a raw newline in a label value"),
                        other => value.push(other),
                    }
                }
                key.push_str(&format!("{label}={value:?}"));
            }
            key.push('}');
        }
        let value = rest.strip_prefix(' ').expect(&at);
        assert!(!value.contains(' '), "{at}: no timestamps expected");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{at}: the value is not a number"));
        assert!(series.insert(key, value).is_none(), "{at}: series repeated");
    }
    series
}

/// The page at /metrics, checked (see [`parse_metrics`]), and by `promtool` if installed.
fn scrape(admin: SocketAddr, token: Option<&str>) -> Series {
    let answer = request(admin, "GET", "/metrics", token);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    promtool_check(&answer.body);
    parse_metrics(&answer.body)
}

/// The sum of every series of family `name` (over shards and other labels).
fn total(series: &Series, name: &str) -> f64 {
    series.iter().filter(|(key, _)| key.split('{').next() == Some(name)).map(|(_, value)| value).sum()
}

#[test]
fn health_and_readiness_answer_without_a_token() {
    let broker = Broker::start(&["--shards", "2", "--admin-token", TOKEN]);
    let admin = broker.admin_addr();
    let health = get(admin, "/healthz");
    assert_eq!((health.status, health.json()["status"].as_str()), (200, Some("alive")));
    let ready = get(admin, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["shards"], 2);
    // Anything but GET, and an unknown path, are refused with what to do.
    let post = request(admin, "POST", "/healthz", None);
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));
    let unknown = request(admin, "GET", "/nothing", Some(TOKEN));
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("/metrics"), "{}", unknown.body);
}

/// Send N messages with the Rust client and consume them: the received and delivered counters
/// (and their bytes) move by exactly N between two scrapes.
#[test]
fn metrics_counters_move_by_exactly_the_messages_sent() {
    const MESSAGES: usize = 57;
    const BODY: &[u8] = b"twelve bytes";
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let mut consumer = broker.client();
    consumer.subscribe(1, "counted", DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    let before = scrape(admin, None);
    let mut producer = broker.client();
    let mut last = 0;
    for _ in 0..MESSAGES {
        last = producer.send("counted", BODY).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    for _ in 0..MESSAGES {
        let message = consumer.next_message(WAIT).unwrap().expect("every message arrives");
        consumer.ack(message.delivery_seq, false).unwrap();
    }
    consumer.flush().unwrap();
    let after = scrape(admin, None);
    let moved = |name: &str| total(&after, name) - total(&before, name);
    assert_eq!(moved("mbws_messages_received_total"), MESSAGES as f64);
    assert_eq!(moved("mbws_messages_delivered_total"), MESSAGES as f64);
    assert_eq!(moved("mbws_received_bytes_total"), (MESSAGES * BODY.len()) as f64);
    assert_eq!(moved("mbws_delivered_bytes_total"), (MESSAGES * BODY.len()) as f64);
    // Two MBWS binary connections, on whichever shards accepted them.
    assert_eq!(total(&after, "mbws_connections"), 2.0);
    let reliable_binary = after
        .iter()
        .filter(|(key, _)| {
            key.starts_with("mbws_connections{") && key.contains("subprotocol=\"MBWS.huawei.com\",binding=\"binary\"")
        })
        .map(|(_, value)| value)
        .sum::<f64>();
    assert_eq!(reliable_binary, 2.0);
    assert_eq!(after["mbws_shards"], 2.0);
    assert_eq!(after["mbws_shards_reporting"], 2.0);
    assert!(after["process_resident_memory_bytes"] > 0.0);
    assert!(after.contains_key("process_cpu_seconds_total"));
}

/// `mbws_shard_round_duration_seconds` counts the shard's rounds of input, one per read: SENDs
/// each answered before the next is sent are read one by one, so its count moves by at least
/// as many, its sum grows, and its buckets are cumulative up to `+Inf` = the count.
#[test]
fn round_durations_count_every_read() {
    const SENDS: usize = 5;
    const ROUNDS: &str = "mbws_shard_round_duration_seconds";
    let broker = Broker::start(&["--shards", "1"]);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let before = scrape(admin, None);
    for _ in 0..SENDS {
        let seq = producer.send("timed", &b"one read each"[..]).unwrap();
        producer.wait_receipt(seq).unwrap();
    }
    let after = scrape(admin, None);
    let count = |series: &Series| series[&format!("{ROUNDS}_count{{shard=\"0\"}}")];
    assert!(count(&after) - count(&before) >= SENDS as f64, "{} -> {}", count(&before), count(&after));
    let sum = |series: &Series| series[&format!("{ROUNDS}_sum{{shard=\"0\"}}")];
    assert!(sum(&after) > sum(&before), "the rounds took some time");
    // (upper bound, cumulative count), by bound.
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(key, value)| {
            let le = key.strip_prefix(&format!("{ROUNDS}_bucket{{shard=\"0\",le=\""))?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.len(), 13, "12 bounds and +Inf: {buckets:?}");
    assert!(buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1), "cumulative: {buckets:?}");
    assert_eq!(buckets.last().unwrap().1, count(&after), "+Inf holds every round");
}

/// One raw upgrade request `head` (the request line and headers), the answer's status.
fn raw_upgrade(broker: &Broker, head: &str) -> u16 {
    let mut stream = TcpStream::connect_timeout(&broker.addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(format!("{head}\r\n\r\n").as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split(' ').nth(1).and_then(|status| status.parse().ok()).unwrap_or_else(|| panic!("no status: {text:?}"))
}

/// `mbws_upgrades_refused_total{status}` moves by exactly the upgrades refused, by status.
#[test]
fn refused_upgrades_are_counted_by_status() {
    let broker = Broker::start(&["--shards", "2", "--allowed-origin", "https://app.example.com"]);
    let admin = broker.admin_addr();
    let upgrade = |path: &str, version: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\
             Sec-WebSocket-Protocol: MBWS.huawei.com{extra}"
        )
    };
    let by_status = |series: &Series, status: u16| -> f64 {
        let label = format!("status=\"{status}\"");
        series
            .iter()
            .filter(|(key, _)| key.starts_with("mbws_upgrades_refused_total{") && key.contains(&label))
            .map(|(_, value)| value)
            .sum()
    };
    let before = scrape(admin, None);
    let made = [
        (404, upgrade("/elsewhere", "13", "")),
        (404, upgrade("/elsewhere", "13", "")),
        (426, upgrade("/", "8", "")),
        (403, upgrade("/", "13", "\r\nOrigin: https://evil.example")),
        (
            400,
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13"
                .into(),
        ),
    ];
    for (status, head) in &made {
        assert_eq!(raw_upgrade(&broker, head), *status, "{head}");
    }
    // A good upgrade is not counted.
    drop(broker.client());
    let after = scrape(admin, None);
    for status in [400, 403, 404, 426, 503] {
        let expected = made.iter().filter(|(made, _)| *made == status).count() as f64;
        assert_eq!(by_status(&after, status) - by_status(&before, status), expected, "status {status}");
    }
    assert_eq!(total(&after, "mbws_upgrades_refused_total") - total(&before, "mbws_upgrades_refused_total"), 5.0);
}

/// Queue depth and unacknowledged deliveries per address, in /api/addresses, one address's
/// own answer, and the metrics; a refusal is counted by its code.
#[test]
fn addresses_show_their_depth_consumers_and_unacked() {
    let broker = Broker::start(&["--shards", "2", "--max-queued-messages", "6"]);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let mut last = 0;
    for index in 0..5 {
        last = producer.send("orders", format!("order {index}")).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let orders = get(admin, "/api/addresses/orders");
    assert_eq!(orders.status, 200, "{}", orders.body);
    let orders = orders.json();
    assert_eq!(
        (orders["name"].as_str(), orders["depth"].as_u64(), orders["consumers"].as_u64()),
        (Some("orders"), Some(5), Some(0))
    );
    assert_eq!((orders["routing"].as_str(), orders["durable"].as_bool()), (Some("anycast"), Some(false)));

    // A client-ack consumer with credit 2 takes two: three wait, two are unacknowledged.
    let mut consumer = broker.client();
    consumer.subscribe(1, "orders", DeliveryMode::Anycast, AckMode::Client, 2).unwrap();
    for _ in 0..2 {
        consumer.next_message(WAIT).unwrap().expect("a delivery");
    }
    let listed = get(admin, "/api/addresses").json();
    let entry = listed["addresses"].as_array().unwrap().iter().find(|entry| entry["name"] == "orders").cloned();
    let entry = entry.expect("orders is listed");
    assert_eq!(
        (entry["depth"].as_u64(), entry["unacked"].as_u64(), entry["anycast_consumers"].as_u64()),
        (Some(3), Some(2), Some(1))
    );
    let series = scrape(admin, None);
    assert_eq!(series["mbws_address_queued_messages{address=\"orders\"}"], 3.0);
    assert_eq!(series["mbws_address_unacked_messages{address=\"orders\"}"], 2.0);
    assert_eq!(series["mbws_address_consumers{address=\"orders\",mode=\"anycast\"}"], 1.0);

    // A name with a slash, percent-encoded in the path; an unknown one is a 404.
    last = producer.send("eu/orders", "x").unwrap();
    producer.wait_receipt(last).unwrap();
    assert_eq!(get(admin, "/api/addresses/eu%2Forders").json()["depth"], 1);
    assert_eq!(get(admin, "/api/addresses/none").status, 404);

    // Fill `full` to its bound (6): the 7th SEND is refused with 4429, counted by code.
    for index in 0..6 {
        last = producer.send("full", format!("{index}")).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let refused = producer.send("full", "one too many").unwrap();
    assert!(producer.wait_receipt(refused).is_err(), "the 7th SEND is refused");
    let series = scrape(admin, None);
    let refusals: f64 = series
        .iter()
        .filter(|(key, _)| key.starts_with("mbws_refusals_total{") && key.contains("code=\"4429\""))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(refusals, 1.0);
}

/// The durable log's histograms count its fdatasyncs: a durable SEND whose RECEIPT is awaited
/// before the next is sent needs a group commit of its own.
#[test]
fn the_log_histograms_count_the_fsyncs() {
    const SENDS: u64 = 10;
    let broker = Broker::start(&["--shards", "2", "--durable-address", "safe"]);
    let admin = broker.admin_addr();
    let before = scrape(admin, None);
    let mut producer = broker.client();
    for index in 0..SENDS {
        let seq = producer.send("safe", format!("durable {index}")).unwrap();
        producer.wait_receipt(seq).unwrap();
    }
    let after = scrape(admin, None);
    let moved = |name: &str| total(&after, name) - total(&before, name);
    let syncs = moved("mbws_log_sync_duration_seconds_count");
    assert!(
        (SENDS as f64..=SENDS as f64 + 1.0).contains(&syncs),
        "{syncs} fdatasyncs for {SENDS} awaited durable SENDs"
    );
    assert_eq!(moved("mbws_log_commit_duration_seconds_count"), syncs);
    assert!(moved("mbws_log_sync_duration_seconds_sum") > 0.0);
    assert!(moved("mbws_log_written_bytes_total") >= (SENDS * 9) as f64, "at least the bodies were written");
    // Buckets are cumulative and end at +Inf with the count.
    for shard in ["0", "1"] {
        let buckets: Vec<f64> = after
            .iter()
            .filter(|(key, _)| key.starts_with(&format!("mbws_log_sync_duration_seconds_bucket{{shard=\"{shard}\",")))
            .map(|(_, value)| *value)
            .collect();
        assert_eq!(buckets.len(), 15, "14 bounds and +Inf");
        let infinite = after[&format!("mbws_log_sync_duration_seconds_bucket{{shard=\"{shard}\",le=\"+Inf\"}}")];
        assert_eq!(infinite, after[&format!("mbws_log_sync_duration_seconds_count{{shard=\"{shard}\"}}")]);
        assert!(buckets.iter().all(|bucket| *bucket <= infinite));
    }
}

/// A delivery taken back and made again is counted as a redelivery; a message past
/// `--max-deliveries` as dead-lettered.
#[test]
fn redeliveries_and_dead_letters_are_counted() {
    let broker = Broker::start(&["--shards", "2", "--max-deliveries", "2", "--session-expiry-ms", "0"]);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let seq = producer.send("flaky", "m").unwrap();
    producer.wait_receipt(seq).unwrap();
    let before = scrape(admin, None);
    // Two consumers in turn take the message and leave without acknowledging it (their
    // sessions end with their connections: no resume).
    for expected_redelivered in [false, true] {
        let mut consumer = broker.client();
        consumer.subscribe(1, "flaky", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
        let message = consumer.next_message(WAIT).unwrap().expect("the message");
        assert_eq!(message.redelivered, expected_redelivered);
        drop(consumer);
    }
    // The second departure moves it to DLQ.flaky.
    let deadline = std::time::Instant::now() + WAIT;
    while get(admin, "/api/addresses/DLQ.flaky").status != 200 {
        assert!(std::time::Instant::now() < deadline, "the message reached no dead-letter address");
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = scrape(admin, None);
    let moved = |name: &str| total(&after, name) - total(&before, name);
    assert_eq!(moved("mbws_messages_delivered_total"), 2.0);
    assert_eq!(moved("mbws_messages_redelivered_total"), 1.0);
    assert_eq!(moved("mbws_messages_dead_lettered_total"), 1.0);
}

/// Per-address series are bounded: the 100 addresses holding the most have their own, the
/// rest are summed in `address="_other"`.
#[test]
fn address_series_are_bounded_and_the_rest_summed() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let mut last = 0;
    // Address `deep-N` holds 2 messages for N < 100, `shallow-N` 1 for N < 30.
    for index in 0..100 {
        for _ in 0..2 {
            last = producer.send(&format!("deep-{index}"), "x").unwrap();
        }
    }
    for index in 0..30 {
        last = producer.send(&format!("shallow-{index}"), "x").unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let series = scrape(admin, None);
    let queued: Vec<(&String, &f64)> =
        series.iter().filter(|(key, _)| key.starts_with("mbws_address_queued_messages{")).collect();
    assert_eq!(queued.len(), 101, "100 addresses and _other");
    assert!(queued.iter().filter(|(key, _)| key.contains("deep-")).all(|(_, value)| **value == 2.0));
    assert_eq!(series["mbws_address_queued_messages{address=\"_other\"}"], 30.0);
    assert_eq!(total(&series, "mbws_addresses"), 130.0);
    // The API lists with a bound too.
    let listed = get(admin, "/api/addresses?limit=10").json();
    assert_eq!((listed["addresses"].as_array().unwrap().len(), listed["total"].as_u64()), (10, Some(130)));
    assert_eq!(listed["truncated"], true);
    assert_eq!(get(admin, "/api/addresses?limit=0").status, 400);
}

#[test]
fn sessions_show_peer_subprotocol_binding_and_subscriptions() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let mut consumer = broker.client();
    consumer.subscribe(1, "a", DeliveryMode::Anycast, AckMode::Client, 5).unwrap();
    consumer.subscribe(2, "b", DeliveryMode::Multicast, AckMode::Auto, 5).unwrap();
    let peer = consumer.local_addr().unwrap().to_string();
    let listed = get(admin, "/api/sessions").json();
    assert_eq!(listed["total"], 1);
    let session = &listed["sessions"][0];
    assert_eq!(session["peer"].as_str(), Some(peer.as_str()));
    assert_eq!(
        (session["subprotocol"].as_str(), session["binding"].as_str()),
        (Some("MBWS.huawei.com"), Some("binary"))
    );
    assert_eq!((session["subscriptions"].as_u64(), session["attached"].as_bool()), (Some(2), Some(true)));
    let id = session["id"].as_str().unwrap();
    assert_eq!(id.split('.').count(), 3, "shard.index.generation: {id}");
}

/// Beyond loopback the admin API needs a token: without one the broker refuses to start;
/// with one, every endpoint but health and readiness answers 401 without it or with another.
#[test]
fn the_token_is_required_beyond_loopback_and_checked() {
    let dir = common::temp_dir("admin-token");
    let refused = Broker::try_start_in(&dir, &["--admin-listen", "0.0.0.0:0"]);
    let Err((status, log)) = refused else { panic!("a broker with an open admin API and no token started") };
    assert_eq!(status.code(), Some(2));
    assert!(
        log.iter()
            .any(|line| line.contains("--admin-listen 0.0.0.0:0 is beyond loopback") && line.contains("--admin-token")),
        "{log:?}"
    );
    let short = Broker::try_start_in(&dir, &["--admin-listen", "0.0.0.0:0", "--admin-token", "short"]);
    let Err((_, log)) = short else { panic!("a short token was accepted") };
    assert!(log.iter().any(|line| line.contains("at least 16")), "{log:?}");

    let broker = Broker::start_in(&dir, &["--admin-listen", "0.0.0.0:0", "--admin-token", TOKEN]);
    let admin = SocketAddr::from(([127, 0, 0, 1], broker.admin_addr().port()));
    for path in ["/metrics", "/api/addresses", "/api/sessions", "/api/addresses/x"] {
        let missing = request(admin, "GET", path, None);
        assert_eq!(missing.status, 401, "{path} without a token");
        assert_eq!(missing.header("www-authenticate"), Some("Bearer realm=\"mbws-admin\""));
        assert_eq!(request(admin, "GET", path, Some("test-token-0123456789abcdeX")).status, 401, "{path}, wrong token");
    }
    assert_eq!(request(admin, "GET", "/metrics", Some(TOKEN)).status, 200);
    assert_eq!(request(admin, "GET", "/api/sessions", Some(TOKEN)).status, 200);
    assert_eq!(get(admin, "/healthz").status, 200);
    assert_eq!(get(admin, "/readyz").status, 200);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// --print-config shows the admin settings, the token redacted; `off` turns the API off.
#[test]
fn the_token_is_redacted_and_the_api_can_be_turned_off() {
    let output = Command::new(env!("CARGO_BIN_EXE_mbws-broker"))
        .args(["--admin-listen", "0.0.0.0:7448", "--admin-token", TOKEN, "--print-config"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        printed.contains("admin-listen = \"0.0.0.0:7448\"") && printed.contains("admin-token = \"<redacted>\""),
        "{printed}"
    );
    assert!(!printed.contains(TOKEN));
    let broker = Broker::start(&["--admin-listen", "off"]);
    assert!(!broker.log_lines().iter().any(|line| line.contains("admin API at")), "{:?}", broker.log_lines());
}

/// Every `curl` command of docs/OPERATIONS.md runs against a live broker, its admin address
/// put in place of the default one, and succeeds (`--fail`: an HTTP error fails the command).
#[test]
fn every_curl_command_in_operations_md_runs() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md")).unwrap();
    let commands: Vec<&str> = doc.lines().map(str::trim).filter(|line| line.starts_with("curl ")).collect();
    assert!(commands.len() >= 6, "OPERATIONS.md shows the admin endpoints with curl: {commands:?}");
    // One shard, so the first session is 0.0.0, the id the DELETE example closes.
    let broker = Broker::start(&["--shards", "1", "--admin-token", TOKEN]);
    let admin = broker.admin_addr().to_string();
    // What the examples look at: an address `orders` holding a message, and a session.
    let mut producer = broker.client();
    let seq = producer.send("orders", "o-1").unwrap();
    producer.wait_receipt(seq).unwrap();
    for command in commands {
        let command = command.replace("127.0.0.1:7448", &admin);
        let output = Command::new("sh")
            .args(["-c", &format!("timeout 10 {command}")])
            .env("MBWS_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(output.status.success(), "{command}: {output:?}");
        assert!(!output.stdout.is_empty(), "{command} printed nothing");
    }
}

/// The parser above is strict: what Prometheus would refuse, it refuses too (so the checks
/// of the broker's page can fail).
#[test]
fn the_strict_parser_refuses_malformed_pages() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{shard=\"0\",name=\"x\\\"y\"} 1\n";
    assert_eq!(parse_metrics(good)["a_total{shard=\"0\",name=\"x\\\"y\"}"], 1.0);
    let bad = [
        "a 1\n",                                      // no TYPE
        "# TYPE a gauge\na 1\na 2\n",                 // a series twice
        "# TYPE a gauge\na{l=\"\\x\"} 1\n",           // a bad escape
        "# TYPE a gauge\na{l=x} 1\n",                 // an unquoted value
        "# TYPE a gauge\na one\n",                    // not a number
        "# TYPE a counter\na 1\n",                    // a counter without _total
        "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n", // a family split
        "# TYPE a gauge\na 1",                        // no final newline
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",      // TYPE twice
        "# TYPE 1a gauge\n1a 1\n",                    // a bad name
    ];
    for page in bad {
        assert!(std::panic::catch_unwind(|| parse_metrics(page)).is_err(), "accepted: {page:?}");
    }
}

/// `POST /api/addresses/{name}/purge` drops the queue; a purged durable message is settled in
/// the log, so a restart does not bring it back.
#[test]
fn purge_drops_the_queue_and_purged_durable_messages_stay_gone_after_a_restart() {
    let dir = common::temp_dir("admin-purge");
    let flags = ["--shards", "2", "--durable-address", "jobs"];
    let mut broker = Broker::start_in(&dir, &flags);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let mut last = 0;
    for index in 0..4 {
        last = producer.send("jobs", format!("purged {index}")).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let jobs = get(admin, "/api/addresses/jobs").json();
    assert_eq!((jobs["depth"].as_u64(), jobs["durable"].as_bool()), (Some(4), Some(true)));
    assert_eq!(get(admin, "/api/addresses/jobs/purge").status, 405, "purging takes a POST");
    let purged = request(admin, "POST", "/api/addresses/jobs/purge", None);
    assert_eq!(purged.status, 200, "{}", purged.body);
    assert_eq!(purged.json()["purged_messages"], 4);
    assert_eq!(get(admin, "/api/addresses/jobs").status, 404, "an empty address without subscribers is gone");
    assert_eq!(request(admin, "POST", "/api/addresses/jobs/purge", None).status, 404);
    last = producer.send("jobs", "kept").unwrap();
    producer.wait_receipt(last).unwrap();
    drop(producer);
    assert!(broker.terminate().success());

    let broker = Broker::start_in(&dir, &flags);
    let admin = broker.admin_addr();
    assert_eq!(get(admin, "/api/addresses/jobs").json()["depth"], 1, "only the message sent after the purge");
    let mut consumer = broker.client();
    consumer.subscribe(1, "jobs", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let message = consumer.next_message(WAIT).unwrap().expect("the kept message");
    assert_eq!(message.body.as_ref(), b"kept");
    drop(consumer);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// `DELETE /api/sessions/{id}` ends the session: fatal ERROR 4403 and close 4403, and it is
/// not kept for a resume.
#[test]
fn deleting_a_session_closes_it_with_4403() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let mut client = broker.client();
    client.subscribe(1, "a", DeliveryMode::Anycast, AckMode::Client, 5).unwrap();
    let id = get(admin, "/api/sessions").json()["sessions"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(request(admin, "GET", &format!("/api/sessions/{id}"), None).status, 405);
    let deleted = request(admin, "DELETE", &format!("/api/sessions/{id}"), None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["code"], 4403);
    match client.next_frame(WAIT) {
        Ok(mbws::mbws::Frame::Error(error)) => assert_eq!(error.code, 4403, "{error:?}"),
        other => panic!("expected the fatal ERROR 4403, got {other:?}"),
    }
    // The session ends (no resume) once its connection is gone: it leaves the list (a detached
    // session would stay listed), and its id then finds nothing.
    drop(client);
    let deadline = std::time::Instant::now() + WAIT;
    while get(admin, "/api/sessions").json()["total"] != 0 {
        assert!(std::time::Instant::now() < deadline, "the session is still listed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(request(admin, "DELETE", &format!("/api/sessions/{id}"), None).status, 404);
    assert_eq!(request(admin, "DELETE", "/api/sessions/not-an-id", None).status, 404);
}
