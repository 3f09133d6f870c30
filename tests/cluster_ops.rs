//! What an operator of a cluster sees and relies on (issue 13, docs/CLUSTER.md): the
//! `mbws_cluster_*` metrics scraped over HTTP from real nodes, and dead letters whose `DLQ.`
//! address another node owns. Real etcd and real broker processes, through the harness the
//! other cluster tests share; one test at a time.

mod common;

#[path = "support/cluster_harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use common::Broker;
use harness::{admin_request, client, client_options, node, serial, Etcd};
use mbws::mbws::{self as frames, AckMode, DeliveryMode};
use mbws_client::ClientError;

/// The /metrics page of a node, checked by promtool when it is installed.
fn scrape(node: &Broker) -> String {
    let (status, page) = admin_request(node.admin_addr(), "GET", "/metrics", "");
    assert_eq!(status, 200, "{page}");
    common::promtool_check(&page);
    page
}

/// The value of the sample `series` (`name` or `name{label="value"}`) on `page`.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().unwrap_or_else(|_| panic!("{series}: not a number")))
}

/// Scrapes `node` until `series` has `value` (bounded: 10 s); the last page otherwise.
fn wait_for_sample(node: &Broker, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(node);
        if sample(&page, series) == Some(value) {
            return page;
        }
        assert!(Instant::now() < deadline, "{series} is {:?}, not {value}, after 10 s:\n{page}", sample(&page, series));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first of `prefix-0`, `prefix-1`... that node `owner` serves (placed through `via`).
fn address_owned_by(via: &Broker, owner: &str, prefix: &str) -> String {
    harness::address_owned_by(&client_options(), &via.url(), via.admin_addr(), owner, prefix)
}

#[test]
fn the_metrics_show_each_nodes_view_and_what_it_forwarded_to_and_relayed_from_each_owner() {
    let _serial = serial();
    let etcd = Etcd::start();
    // b queues at most 5 messages per address: the sixth SEND forwarded to it is refused there.
    let nodes = [
        node("a", &etcd.url(), &[]),
        node("b", &etcd.url(), &["--max-queued-messages", "5"]),
        node("c", &etcd.url(), &[]),
    ];
    let address = address_owned_by(&nodes[0], "b", "metered");

    // The node's view: three live nodes, not fenced, serving, a lease renewed within its TTL,
    // and the owned addresses of the three nodes add up to every placement.
    let mut owned = 0.0;
    for node in &nodes {
        let page = wait_for_sample(node, "mbws_cluster_live_nodes", 3.0);
        assert_eq!(sample(&page, "mbws_cluster_fenced"), Some(0.0), "{page}");
        assert_eq!(sample(&page, "mbws_cluster_serving"), Some(1.0), "{page}");
        let age = sample(&page, "mbws_cluster_lease_age_seconds").expect("a lease age");
        assert!((0.0..1.5).contains(&age), "the lease is renewed every 0.5 s; its age is {age} s");
        assert_eq!(sample(&page, "mbws_cluster_lease_ttl_seconds"), Some(2.0), "{page}");
        assert!(page.contains("mbws_cluster_info{cluster=\"test\",node=\""), "{page}");
        owned += sample(&page, "mbws_cluster_owned_addresses").unwrap();
    }
    let placed = sample(&scrape(&nodes[0]), "mbws_cluster_placed_addresses").unwrap();
    assert!(placed >= 1.0 && owned == placed, "owned {owned} of {placed} placed");

    // Eight SENDs on a to b's address: five receipted by b, three refused by b (queue full).
    let mut publisher = client(&nodes[0].url());
    let mut outcomes = Vec::new();
    for index in 0..8 {
        let seq = publisher.send(&address, format!("m-{index}")).unwrap();
        outcomes.push(match publisher.wait_receipt(seq) {
            Ok(()) => 0,
            Err(ClientError::Broker(error)) => error.code,
            Err(other) => panic!("SEND {index}: {other}"),
        });
    }
    assert_eq!(outcomes, [0, 0, 0, 0, 0, 4429, 4429, 4429]);
    let page = scrape(&nodes[0]);
    assert_eq!(sample(&page, "mbws_cluster_forwarded_messages_total{owner=\"b\"}"), Some(5.0), "{page}");
    assert_eq!(sample(&page, "mbws_cluster_forward_refused_messages_total{owner=\"b\"}"), Some(3.0), "{page}");
    assert_eq!(sample(&page, "mbws_cluster_relayed_subscriptions{owner=\"b\"}"), Some(0.0), "{page}");
    // Nothing went through c (its series for b may not exist yet: it appears with c's first
    // placement on b).
    let page = scrape(&nodes[2]);
    let through_c = sample(&page, "mbws_cluster_forwarded_messages_total{owner=\"b\"}").unwrap_or(0.0);
    assert_eq!(through_c, 0.0, "{page}");

    // A consumer on c: its subscription is relayed to b, and the five come through it.
    let mut consumer = client(&nodes[2].url());
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let mut taken = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while taken < 5 {
        assert!(Instant::now() < deadline, "only {taken} of 5 relayed messages came");
        if let Some(message) = consumer.next_message(Duration::from_millis(200)).unwrap() {
            consumer.ack(message.delivery_seq, false).unwrap();
            taken += 1;
        }
    }
    let page = wait_for_sample(&nodes[2], "mbws_cluster_relayed_subscriptions{owner=\"b\"}", 1.0);
    assert_eq!(sample(&page, "mbws_cluster_relayed_deliveries_total{owner=\"b\"}"), Some(5.0), "{page}");
    assert_eq!(sample(&page, "mbws_cluster_relayed_subscriptions_total{owner=\"b\"}"), Some(1.0), "{page}");
    // UNSUBSCRIBE: the relayed subscription is no longer open.
    consumer.write_frame(&frames::Frame::Unsubscribe(frames::Unsubscribe { subscription_id: 1 })).unwrap();
    consumer.flush().unwrap();
    wait_for_sample(&nodes[2], "mbws_cluster_relayed_subscriptions{owner=\"b\"}", 0.0);
}

#[test]
fn a_message_dead_lettered_at_its_owner_reaches_its_dead_letter_address_on_another_node() {
    let _serial = serial();
    let etcd = Etcd::start();
    let flags = ["--max-deliveries", "2"];
    let nodes = [node("a", &etcd.url(), &flags), node("b", &etcd.url(), &flags), node("c", &etcd.url(), &flags)];
    let address = address_owned_by(&nodes[0], "b", "orders");
    let dead_letters = format!("DLQ.{address}");
    let (status, body) = admin_request(
        nodes[0].admin_addr(),
        "PUT",
        &format!("/api/cluster/addresses/{dead_letters}"),
        r#"{"owner":"c"}"#,
    );
    assert_eq!(status, 200, "placing {dead_letters} on c: {body}");
    // Every node agrees that c owns the dead-letter address before anything is dead-lettered.
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while harness::placements(node.admin_addr()).get(&dead_letters).map(String::as_str) != Some("c") {
            assert!(Instant::now() < deadline, "{dead_letters} is not placed on c in every node's view");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut dlq_consumer = client(&nodes[2].url());
    dlq_consumer.subscribe(9, &dead_letters, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();

    // A message sent on a (forwarded to b) is refused twice by a consumer on b: its second
    // NACK exceeds --max-deliveries 2, and b dead-letters it to DLQ.<address>, owned by c.
    let mut publisher = client(&nodes[0].url());
    let seq = publisher.send(&address, "poison").unwrap();
    publisher.wait_receipt(seq).unwrap();
    let mut consumer = client(&nodes[1].url());
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    for delivery in 1..=2 {
        let message = consumer
            .next_message(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("delivery {delivery} of the message did not come"));
        assert_eq!((message.body.as_ref(), message.redelivered), (&b"poison"[..], delivery == 2));
        consumer
            .write_frame(&frames::Frame::Nack(frames::Nack { delivery_seq: message.delivery_seq, requeue: true }))
            .unwrap();
        consumer.flush().unwrap();
    }
    assert!(consumer.next_message(Duration::from_millis(500)).unwrap().is_none(), "a third delivery came");

    // The consumer of the dead-letter address on c gets it once, saying where it came from.
    let dead = dlq_consumer
        .next_message(Duration::from_secs(10))
        .unwrap()
        .expect("the dead-lettered message reaches DLQ.<address> on c");
    dlq_consumer.ack(dead.delivery_seq, false).unwrap();
    assert_eq!(dead.body.as_ref(), b"poison");
    assert_eq!(dead.address.as_ref(), dead_letters.as_bytes());
    let header = |name: &str| {
        dead.properties
            .headers
            .iter()
            .find(|(key, _)| key.as_ref() == name.as_bytes())
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    };
    assert_eq!(header("x-original-address").as_deref(), Some(address.as_str()));
    assert!(
        header("x-dead-letter-reason").is_some_and(|reason| reason.contains("max_deliveries")),
        "{:?}",
        dead.properties
    );
    assert!(dlq_consumer.next_message(Duration::from_millis(500)).unwrap().is_none(), "dead-lettered twice");
    // b forwarded it: one SEND to c, receipted.
    let page = scrape(&nodes[1]);
    assert_eq!(sample(&page, "mbws_cluster_forwarded_messages_total{owner=\"c\"}"), Some(1.0), "{page}");
}
