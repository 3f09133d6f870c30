//! The cluster's control plane (issue 13 item 2, docs/CLUSTER.md) against a real etcd (Debian's
//! `etcd-server`, started here on loopback ports in a temp dir and stopped by PID) and three
//! real broker processes: placement agreement and spread, failover after kill -9, and fencing
//! of a node cut from etcd (through the fault-injecting proxy of the resume tests).
//!
//! A node "serves" an address when a SEND on a session opened as a cluster link (the upgrade
//! header `X-MBWS-Cluster-Link`, whose SENDs a node never forwards again) is receipted there; a
//! node that does not own the address refuses such a SEND with the non-fatal ERROR 4421 naming
//! the owner. A client's ordinary SEND to any node is forwarded to the owner (the forwarding tests), and a SUBSCRIBE to
//! any node is relayed to the owner (the relaying tests). The tests run one at a time (each
//! starts four processes on a small, busy machine).

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

#[path = "support/cluster_harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::ChaosProxy;
use common::Broker;
use harness::{
    admin_get, admin_request, client, client_options, consumer_once_served, consumers_at, named_owner, node, node_in,
    placements, probe, serial, the_one_owner, Etcd, LEASE_MS,
};
use mbws::mbws::{self as frames, AckMode, Binding, DeliveryMode};
use mbws_client::{Client, ClientError, ClientOptions};

/// Nodes a, b and c with `ledger-*` durable, each on a data directory of its own that outlives
/// its process (so a restarted node finds its durable log); the directories go with this.
struct DurableNodes {
    etcd_url: String,
    dirs: Vec<PathBuf>,
}

impl DurableNodes {
    const NAMES: [&'static str; 3] = ["a", "b", "c"];

    fn new(etcd: &Etcd) -> DurableNodes {
        DurableNodes { etcd_url: etcd.url(), dirs: (0..3).map(|_| common::temp_dir("cluster-node")).collect() }
    }

    /// Starts (or restarts) node `index` on its data directory.
    fn start(&self, index: usize) -> Broker {
        node_in(Some(&self.dirs[index]), Self::NAMES[index], &self.etcd_url, &["--durable-address", "ledger-*"])
    }

    fn start_all(&self) -> [Broker; 3] {
        [self.start(0), self.start(1), self.start(2)]
    }
}

impl Drop for DurableNodes {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn client_in(url: &str, binding: Binding) -> Client {
    Client::connect(url, ClientOptions { binding, ..client_options() }).expect("connect to the node")
}

#[test]
fn concurrent_first_use_on_every_node_agrees_on_one_owner_and_spreads_the_addresses() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let addresses: Vec<String> = (0..30).map(|index| format!("orders-{index}")).collect();
    // Every address's first SEND goes to all three nodes at once.
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, Vec<(String, Result<(), (u16, String)>)>>::new()));
    std::thread::scope(|scope| {
        for (broker, name) in nodes.iter().zip(["a", "b", "c"]) {
            let (url, addresses, outcomes) = (broker.url(), &addresses, outcomes.clone());
            scope.spawn(move || {
                for address in addresses {
                    let outcome = probe(&url, address);
                    outcomes.lock().unwrap().entry(address.clone()).or_default().push((name.to_string(), outcome));
                }
            });
        }
    });
    let mut owned: BTreeMap<String, usize> = BTreeMap::new();
    for (address, answers) in outcomes.lock().unwrap().iter() {
        let served: Vec<&String> =
            answers.iter().filter(|(_, outcome)| outcome.is_ok()).map(|(name, _)| name).collect();
        assert_eq!(served.len(), 1, "{address}: exactly one node receipts its first SENDs: {answers:?}");
        for (_, outcome) in answers {
            if let Err((code, reason)) = outcome {
                assert_eq!(*code, 4421, "{address}: {reason}");
                assert_eq!(
                    named_owner(reason).as_deref(),
                    Some(served[0].as_str()),
                    "the refusal names the owner: {reason}"
                );
            }
        }
        *owned.entry(served[0].clone()).or_default() += 1;
    }
    eprintln!("placement of 30 addresses first used on three nodes at once: {owned:?}");
    for name in ["a", "b", "c"] {
        assert!(owned.get(name).copied().unwrap_or(0) >= 5, "placement is spread by load: {owned:?}");
    }
    // Every node's view (GET /api/cluster) converges on the same placement.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views: Vec<_> = nodes.iter().map(|broker| placements(broker.admin_addr())).collect();
        if views.iter().all(|view| *view == views[0]) && views[0].len() == addresses.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the nodes' views differ: {views:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = admin_get(nodes[0].admin_addr(), "/api/cluster");
    assert_eq!(status["state"], "serving");
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3, "{status}");
}

#[test]
fn a_killed_node_loses_its_non_durable_addresses_to_live_nodes_and_keeps_its_durable_ones() {
    let _serial = serial();
    let etcd = Etcd::start();
    let trio = DurableNodes::new(&etcd);
    let mut nodes = trio.start_all();
    // Place everything through node a: its first SEND there places it somewhere.
    let plain: Vec<String> = (0..12).map(|index| format!("jobs-{index}")).collect();
    let ledgers: Vec<String> = (0..6).map(|index| format!("ledger-{index}")).collect();
    for address in plain.iter().chain(&ledgers) {
        let _ = probe(&nodes[0].url(), address);
    }
    // a's view (its control plane's, published after the shards were told) holds all 18
    // placements, bounded: read once, it could miss the last one under load.
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let view = placements(nodes[0].admin_addr());
        if plain.iter().chain(&ledgers).all(|address| view.contains_key(address)) {
            break view;
        }
        assert!(Instant::now() < deadline, "a's view lacks placements after 10 s: {view:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The victim: the owner of ledger-0 (a durable address), never a.
    let victim_name = view["ledger-0"].clone();
    let victim_name =
        if victim_name == "a" { view.values().find(|owner| *owner != "a").unwrap().clone() } else { victim_name };
    let victim = ["a", "b", "c"].iter().position(|name| *name == victim_name).unwrap();
    let lost: Vec<&String> = plain.iter().filter(|address| view[*address] == victim_name).collect();
    let kept: Vec<&String> = ledgers.iter().filter(|address| view[*address] == victim_name).collect();
    assert!(!lost.is_empty(), "the victim {victim_name} owns non-durable addresses: {view:?}");
    let survivors: Vec<(&str, String)> =
        (0..3).filter(|index| *index != victim).map(|index| (["a", "b", "c"][index], nodes[index].url())).collect();

    let killed_at = Instant::now();
    nodes[victim].kill();
    // Each lost address is served again by exactly one survivor, within the lease and a bound.
    let bound = Duration::from_millis(LEASE_MS) + Duration::from_secs(6);
    for address in &lost {
        loop {
            match the_one_owner(&survivors, address) {
                Ok(_) => break,
                Err(problem) => {
                    assert!(killed_at.elapsed() < bound, "not re-placed within {bound:?}: {problem}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    let failover = killed_at.elapsed();
    eprintln!(
        "failover: {} non-durable addresses of the killed node served again by the survivors {} ms after kill -9 \
         (lease {LEASE_MS} ms)",
        lost.len(),
        failover.as_millis()
    );
    // Durable addresses keep their owner: the survivors refuse, naming it.
    for address in &kept {
        for (name, url) in &survivors {
            let refused = probe(url, address).expect_err("a durable address of the dead node is not taken over");
            assert_eq!(refused.0, 4421, "{name}: {refused:?}");
            assert_eq!(named_owner(&refused.1).as_deref(), Some(victim_name.as_str()), "{refused:?}");
        }
    }
    // The node comes back on its data directory: its durable addresses are served there again.
    nodes[victim] = trio.start(victim);
    for address in &kept {
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe(&nodes[victim].url(), address).is_err() {
            assert!(Instant::now() < deadline, "{address} not served by its returned owner");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_node_cut_from_etcd_fences_itself_within_the_lease_and_after_healing_no_address_is_owned_twice() {
    let _serial = serial();
    let etcd = Etcd::start();
    let proxy = ChaosProxy::quiet(etcd.client_addr);
    let through_proxy = format!("http://{}", proxy.addr);
    let nodes = [node("a", &through_proxy, &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let named: Vec<(&str, String)> =
        ["a", "b", "c"].iter().zip(&nodes).map(|(name, node)| (*name, node.url())).collect();
    let addresses: Vec<String> = (0..12).map(|index| format!("events-{index}")).collect();
    for address in &addresses {
        let _ = probe(&nodes[1].url(), address);
    }
    // b learns each placement from etcd's watch as well as from its own transaction: wait
    // (bounded) until its view has all twelve.
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let view = placements(nodes[1].admin_addr());
        if addresses.iter().all(|address| view.contains_key(address)) {
            break view;
        }
        assert!(Instant::now() < deadline, "b's view lacks some of {addresses:?} 10 s after placing them: {view:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let owned_by_a: Vec<&String> = addresses.iter().filter(|address| view[*address] == "a").collect();
    assert!(!owned_by_a.is_empty(), "a owns some addresses: {view:?}");
    // A consumer on a, at one of a's addresses.
    let mut consumer = client(&nodes[0].url());
    consumer.subscribe(1, owned_by_a[0], DeliveryMode::Anycast, AckMode::Client, 10).unwrap();

    let cut_at = Instant::now();
    proxy.set_partitioned(true);
    let fenced = nodes[0].wait_for_log("node \"a\" fenced", Duration::from_millis(LEASE_MS) + Duration::from_secs(3));
    let fenced_after = cut_at.elapsed();
    assert!(fenced.is_some(), "a was not fenced: {:#?}", nodes[0].log_lines());
    eprintln!(
        "fencing: node a stopped serving {} ms after it was cut from etcd (lease {LEASE_MS} ms)",
        fenced_after.as_millis()
    );
    assert!(fenced_after <= Duration::from_millis(LEASE_MS + 1000), "fenced after {fenced_after:?}");
    // Its consumer's subscription ends with 4421; SENDs there are refused with 4421.
    match consumer.next_message(Duration::from_secs(5)) {
        Err(ClientError::Broker(error)) => {
            assert_eq!((error.code, error.subscription_id), (4421, 1), "{error:?}");
            let reason = String::from_utf8_lossy(&error.reason);
            assert!(reason.contains("fenced"), "{reason}");
        }
        other => panic!("the subscription at a fenced node ends with 4421, not {other:?}"),
    }
    let refused = probe(&nodes[0].url(), owned_by_a[0]).expect_err("a fenced node serves nothing");
    assert_eq!(refused.0, 4421, "{refused:?}");
    // Meanwhile the others take a's addresses once its lease expired.
    for address in &owned_by_a {
        let deadline = Instant::now() + Duration::from_millis(LEASE_MS) + Duration::from_secs(6);
        while the_one_owner(&named[1..], address).is_err() {
            assert!(Instant::now() < deadline, "{address} was not re-placed on b or c");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("partition: a's addresses served by b or c {} ms after the cut", cut_at.elapsed().as_millis());

    // Healing: a registers again and the cluster converges, every address served exactly once.
    proxy.set_partitioned(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes[0].log_lines().iter().filter(|line| line.contains("node \"a\" registered")).count() < 2 {
        assert!(Instant::now() < deadline, "a did not register again: {:#?}", nodes[0].log_lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    for address in &addresses {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match the_one_owner(&named, address) {
                Ok(_) => break,
                Err(problem) => {
                    assert!(Instant::now() < deadline, "after healing: {problem}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    // New addresses are placed on a again too (it is live and least loaded).
    let status = admin_get(nodes[0].admin_addr(), "/api/cluster");
    assert_eq!(status["state"], "serving", "{status}");
}

/// The first of `prefix-0`, `prefix-1`... that node `owner` serves, placing them one by one
/// through `via` (each placement goes to the least loaded live node).
fn address_owned_by(via: &Broker, admin: SocketAddr, owner: &str, prefix: &str) -> String {
    harness::address_owned_by(&client_options(), &via.url(), admin, owner, prefix)
}

/// Reads MESSAGEs from `consumer` until `count` came (bounded), acknowledging each.
fn take_messages(consumer: &mut Client, count: usize, ack: bool) -> Vec<frames::Message> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} messages came", messages.len());
        if let Some(message) = consumer.next_message(Duration::from_millis(500)).unwrap() {
            if ack {
                consumer.ack(message.delivery_seq, false).unwrap();
            }
            messages.push(message);
        }
    }
    // Nothing more comes: every message is delivered once.
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "a message came twice");
    messages
}

/// Checks that `messages` hold exactly `per_publisher` bodies `NAME-i` of each publisher
/// name, each publisher's in order, each once, and none with a header the publisher did not
/// send (forwarding marks the owner's session, not the message).
fn assert_each_publisher_in_order_once(messages: &[frames::Message], publishers: &[&str], per_publisher: usize) {
    for publisher in publishers {
        let bodies: Vec<String> = messages
            .iter()
            .map(|message| String::from_utf8_lossy(&message.body).into_owned())
            .filter(|body| body.starts_with(&format!("{publisher}-")))
            .collect();
        let expected: Vec<String> = (0..per_publisher).map(|index| format!("{publisher}-{index}")).collect();
        assert_eq!(bodies, expected, "publisher {publisher}: every receipted SEND once, in order");
    }
    assert_eq!(messages.len(), publishers.len() * per_publisher);
    for message in messages {
        assert_eq!(message.properties, frames::Properties::default(), "the publishers sent no properties");
    }
}

#[test]
fn sends_on_two_other_nodes_are_forwarded_to_the_owner_receipted_end_to_end_and_delivered_once_in_order() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let anycast = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "work");
    let multicast = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "news");
    // Consumers on the owner b, in both bindings (relayed consumers: the relaying tests below).
    let mut worker = client_in(&nodes[1].url(), Binding::Text);
    worker.subscribe(1, &anycast, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut listeners = [client_in(&nodes[1].url(), Binding::Binary), client_in(&nodes[1].url(), Binding::Text)];
    for listener in &mut listeners {
        listener.subscribe(1, &multicast, DeliveryMode::Multicast, AckMode::Auto, 1000).unwrap();
    }
    // Publishers on a (binary) and c (text), each interleaving both addresses.
    const PER_PUBLISHER: usize = 400;
    std::thread::scope(|scope| {
        for (name, url, binding) in [("a", nodes[0].url(), Binding::Binary), ("c", nodes[2].url(), Binding::Text)] {
            let (anycast, multicast) = (&anycast, &multicast);
            scope.spawn(move || {
                let mut publisher = client_in(&url, binding);
                let mut last = 0;
                for index in 0..PER_PUBLISHER {
                    publisher.send(anycast, format!("{name}-{index}")).unwrap();
                    last = publisher.send(multicast, format!("{name}-{index}")).unwrap();
                }
                // Every SEND receipted: no ERROR came for any of them.
                publisher.wait_receipt(last).unwrap_or_else(|error| panic!("publisher on {name}: {error}"));
            });
        }
    });
    let work = take_messages(&mut worker, 2 * PER_PUBLISHER, true);
    assert_each_publisher_in_order_once(&work, &["a", "c"], PER_PUBLISHER);
    for listener in &mut listeners {
        let news = take_messages(listener, 2 * PER_PUBLISHER, false);
        assert_each_publisher_in_order_once(&news, &["a", "c"], PER_PUBLISHER);
    }
}

#[test]
fn a_forwarded_durable_send_survives_the_owners_kill_9_and_sends_to_a_dead_owner_are_refused_within_a_bound() {
    let _serial = serial();
    let etcd = Etcd::start();
    let trio = DurableNodes::new(&etcd);
    let mut nodes = trio.start_all();
    let ledger = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "ledger");
    // 200 SENDs through a, receipted: b has taken them (a durable address: after its fsync).
    let mut publisher = client(&nodes[0].url());
    let mut last = 0;
    for index in 0..200 {
        last = publisher.send(&ledger, format!("a-{index}")).unwrap();
    }
    publisher.wait_receipt(last).unwrap();
    nodes[1].kill();
    // The owner is dead (and a durable address keeps its owner): a SEND through a is refused
    // with 4503 naming b, within the forwarder's bound, not held.
    let sent_at = Instant::now();
    let seq = publisher.send(&ledger, "while b is down").unwrap();
    match publisher.wait_receipt(seq) {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!((error.code, error.fatal), (4503, false), "{reason}");
            assert!(reason.contains("cluster node \"b\""), "{reason}");
        }
        other => panic!("a SEND forwarded to a dead owner is refused with 4503, not {other:?}"),
    }
    let refused_after = sent_at.elapsed();
    eprintln!(
        "forwarding: a SEND to an address of a killed owner refused with 4503 after {} ms",
        refused_after.as_millis()
    );
    assert!(refused_after < Duration::from_secs(8), "refused after {refused_after:?}");
    // b returns on its data directory: every receipted message is there, once, in order.
    nodes[1] = trio.start(1);
    let mut consumer = consumer_once_served(&nodes[1].url(), &ledger);
    let messages = take_messages(&mut consumer, 200, true);
    assert_each_publisher_in_order_once(&messages, &["a"], 200);
    drop(nodes);
}

/// Messages per second of one publisher to one consumer at an address owned by b, through
/// `publisher_url`, the consumer on b: the SENDs pipelined (the client's window), the clock from
/// the first SEND to the last MESSAGE.
fn one_to_one_rate(publisher_url: &str, owner: &Broker, address: &str, count: usize) -> f64 {
    let mut consumer = client(&owner.url());
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Auto, 1000).unwrap();
    let mut publisher = client(publisher_url);
    let body = Bytes::from(vec![b'x'; 64]);
    let started = Instant::now();
    let received = std::thread::scope(|scope| {
        let receiving = scope.spawn(move || {
            let mut received = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while received < count && Instant::now() < deadline {
                if consumer.next_message(Duration::from_millis(500)).unwrap().is_some() {
                    received += 1;
                }
            }
            // Closed, not dropped: a detached session's subscription would take the next run's
            // messages.
            consumer.close().unwrap();
            received
        });
        let mut last = 0;
        for _ in 0..count {
            last = publisher.send(address, body.clone()).unwrap();
        }
        publisher.wait_receipt(last).unwrap();
        receiving.join().unwrap()
    });
    assert_eq!(received, count);
    count as f64 / started.elapsed().as_secs_f64()
}

/// The cost of forwarding (docs/CLUSTER.md, "Forwarding"): 1 -> 1 with the publisher on a and
/// the owner and consumer on b, against all on b, in the same run. Not part of the suite (it
/// measures; it asserts only that every message came): `cargo test --test cluster -- --ignored
/// --nocapture forwarding_rate`.
#[test]
#[ignore]
fn forwarding_rate_one_to_one_against_one_node() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "rate");
    const COUNT: usize = 50_000;
    // Warm-up: the forwarder's session is open.
    one_to_one_rate(&nodes[0].url(), &nodes[1], &address, 1000);
    let mut rows = Vec::new();
    for round in 0..2 {
        let local = one_to_one_rate(&nodes[1].url(), &nodes[1], &address, COUNT);
        let forwarded = one_to_one_rate(&nodes[0].url(), &nodes[1], &address, COUNT);
        rows.push((round, local, forwarded));
    }
    for (round, local, forwarded) in rows {
        eprintln!(
            "forwarding rate, round {round}: {COUNT} messages of 64 bytes, 1 -> 1: all on b {local:.0} msg/s; \
             publisher on a, owner and consumer on b {forwarded:.0} msg/s ({:.2} of local)",
            forwarded / local
        );
    }
}

/// The bodies of `messages`, in the order they came.
fn bodies(messages: &[frames::Message]) -> Vec<String> {
    messages.iter().map(|message| String::from_utf8_lossy(&message.body).into_owned()).collect()
}

/// Sends `count` bodies `NAME-i` to `address` through `url` and waits for the RECEIPT of the
/// last (no ERROR for any: every SEND receipted end to end).
fn publish_receipted(url: &str, binding: Binding, name: &str, address: &str, count: usize) {
    let mut publisher = client_in(url, binding);
    let mut last = 0;
    for index in 0..count {
        last = publisher.send(address, format!("{name}-{index}")).unwrap();
    }
    publisher.wait_receipt(last).unwrap_or_else(|error| panic!("publisher {name}: {error}"));
}

#[test]
fn a_consumer_on_a_third_node_gets_what_a_publisher_on_another_sends_relayed_end_to_end_in_both_bindings() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let anycast = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "work");
    let multicast = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "news");
    // Consumers on c, which does not own the addresses: their subscriptions are relayed to b.
    let mut workers = [client_in(&nodes[2].url(), Binding::Text), client_in(&nodes[2].url(), Binding::Binary)];
    for (worker, address) in workers.iter_mut().zip([&anycast, &anycast]) {
        worker.subscribe(1, address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    }
    let mut listeners = [client_in(&nodes[2].url(), Binding::Binary), client_in(&nodes[2].url(), Binding::Text)];
    for (listener, ack_mode) in listeners.iter_mut().zip([AckMode::Auto, AckMode::Client]) {
        listener.subscribe(7, &multicast, DeliveryMode::Multicast, ack_mode, 1000).unwrap();
    }
    // Publishers on a, in both bindings, each interleaving both addresses.
    const PER_PUBLISHER: usize = 300;
    std::thread::scope(|scope| {
        for (name, binding) in [("bin", Binding::Binary), ("txt", Binding::Text)] {
            let (url, anycast, multicast) = (nodes[0].url(), &anycast, &multicast);
            scope.spawn(move || {
                let mut publisher = client_in(&url, binding);
                let mut last = 0;
                for index in 0..PER_PUBLISHER {
                    publisher.send(anycast, format!("{name}-{index}")).unwrap();
                    last = publisher.send(multicast, format!("{name}-{index}")).unwrap();
                }
                publisher.wait_receipt(last).unwrap_or_else(|error| panic!("publisher {name}: {error}"));
            });
        }
    });
    // Anycast: the two relayed workers share the messages, each once, each publisher's in
    // order at each worker, and all of them together.
    let mut work = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while work.len() < 2 * PER_PUBLISHER {
        assert!(Instant::now() < deadline, "only {} of {} relayed messages came", work.len(), 2 * PER_PUBLISHER);
        for (index, worker) in workers.iter_mut().enumerate() {
            while let Some(message) = worker.next_message(Duration::from_millis(20)).unwrap() {
                worker.ack(message.delivery_seq, false).unwrap();
                assert!(message.subscription_id == 1 && !message.redelivered, "{message:?}");
                work.push((index, message));
            }
        }
    }
    for worker in &mut workers {
        assert!(worker.next_message(Duration::from_millis(300)).unwrap().is_none(), "a message came twice");
    }
    for index in 0..2 {
        let mine: Vec<frames::Message> =
            work.iter().filter(|(worker, _)| *worker == index).map(|(_, message)| message.clone()).collect();
        for publisher in ["bin", "txt"] {
            let sequence: Vec<usize> = bodies(&mine)
                .iter()
                .filter_map(|body| body.strip_prefix(&format!("{publisher}-")).map(|n| n.parse().unwrap()))
                .collect();
            assert!(sequence.windows(2).all(|pair| pair[0] < pair[1]), "worker {index}, {publisher}: {sequence:?}");
        }
    }
    let all: Vec<frames::Message> = work.into_iter().map(|(_, message)| message).collect();
    let mut sorted = bodies(&all);
    sorted.sort();
    let mut expected: Vec<String> =
        ["bin", "txt"].iter().flat_map(|name| (0..PER_PUBLISHER).map(move |index| format!("{name}-{index}"))).collect();
    expected.sort();
    assert_eq!(sorted, expected, "every receipted anycast SEND delivered exactly once");
    // Multicast: each relayed listener gets every message once, in each publisher's order.
    for (listener, ack) in listeners.iter_mut().zip([false, true]) {
        let news = take_messages(listener, 2 * PER_PUBLISHER, ack);
        assert!(news.iter().all(|message| message.subscription_id == 7));
        assert_each_publisher_in_order_once(&news, &["bin", "txt"], PER_PUBLISHER);
    }
}

#[test]
fn a_relayed_consumer_holds_no_more_unacknowledged_messages_than_its_credit() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "credit");
    publish_receipted(&nodes[0].url(), Binding::Binary, "m", &address, 50);
    // Credit 5 on c: 5 messages come, no more, though 45 more wait at b.
    let mut relayed = client(&nodes[2].url());
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 5).unwrap();
    let held = take_messages(&mut relayed, 5, false);
    assert!(relayed.next_message(Duration::from_millis(700)).unwrap().is_none(), "more than the credit came");
    // Two acknowledged: two more come, no more.
    relayed.ack(held[0].delivery_seq, false).unwrap();
    relayed.ack(held[1].delivery_seq, false).unwrap();
    let more = take_messages(&mut relayed, 2, false);
    assert_eq!(
        bodies(&held).into_iter().chain(bodies(&more)).collect::<Vec<_>>(),
        (0..7).map(|i| format!("m-{i}")).collect::<Vec<_>>()
    );
    // FLOW is relayed too: credit 8 lets 3 more come (5 unacknowledged + 3).
    relayed.write_frame(&frames::Frame::Flow(frames::Flow { subscription_id: 1, credit: 8 })).unwrap();
    let flowed = take_messages(&mut relayed, 3, false);
    assert_eq!(bodies(&flowed), ["m-7", "m-8", "m-9"]);
    // The owner kept the rest: a consumer on b gets the 40 others, not one held by the relay.
    let mut on_owner = client(&nodes[1].url());
    on_owner.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let rest = take_messages(&mut on_owner, 40, true);
    assert_eq!(bodies(&rest), (10..50).map(|i| format!("m-{i}")).collect::<Vec<_>>());
}

#[test]
fn what_a_relayed_consumer_had_not_acknowledged_goes_to_another_consumer_when_it_leaves() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "jobs");
    publish_receipted(&nodes[0].url(), Binding::Text, "j", &address, 20);
    // On c, credit 10: ten come, none acknowledged; then the consumer's session ends.
    let mut leaving = client(&nodes[2].url());
    leaving.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let taken = take_messages(&mut leaving, 10, false);
    assert_eq!(bodies(&taken), (0..10).map(|i| format!("j-{i}")).collect::<Vec<_>>());
    leaving.close().unwrap();
    // A consumer on a (relayed too) gets all twenty: the ten back from the one that left
    // (redelivered), and the ten that waited.
    let mut staying = client_in(&nodes[0].url(), Binding::Text);
    staying.subscribe(3, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    let messages = take_messages(&mut staying, 20, true);
    let mut got = bodies(&messages);
    got.sort_by_key(|body| body[2..].parse::<usize>().unwrap());
    assert_eq!(got, (0..20).map(|i| format!("j-{i}")).collect::<Vec<_>>(), "every message once more, none lost");
    let redelivered: Vec<String> = messages
        .iter()
        .filter(|message| message.redelivered)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(redelivered.len(), 10, "the ten unacknowledged ones come back marked redelivered: {redelivered:?}");
}

#[test]
fn a_relayed_subscription_ends_with_a_non_fatal_4503_naming_the_owner_when_the_owner_dies() {
    let _serial = serial();
    let etcd = Etcd::start();
    let mut nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "feed");
    let mut relayed = client(&nodes[2].url());
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    nodes[1].kill();
    let killed_at = Instant::now();
    match relayed.next_message(Duration::from_secs(10)) {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!((error.code, error.fatal, error.subscription_id), (4503, false, 1), "{reason}");
            assert!(reason.contains("cluster node \"b\""), "{reason}");
        }
        other => panic!("a relayed subscription to a dead owner ends with 4503, not {other:?}"),
    }
    eprintln!(
        "relaying: a subscription relayed to a killed owner ended with 4503 after {} ms",
        killed_at.elapsed().as_millis()
    );
    // The session goes on: it can subscribe again (the address is re-placed on a live node).
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(error) = relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10) {
        assert!(Instant::now() < deadline, "{address} not served again: {error}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_fenced_node_ends_its_relayed_subscriptions_with_4421_and_unsubscribes_them_at_the_owner() {
    let _serial = serial();
    let etcd = Etcd::start();
    // a reaches etcd through the proxy (cut below); its peers directly, so its relay to b stays up.
    let proxy = ChaosProxy::quiet(etcd.client_addr);
    let through_proxy = format!("http://{}", proxy.addr);
    let nodes = [node("a", &through_proxy, &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    // Placed through c (a probe receipted by b would wait at the address).
    let address = address_owned_by(&nodes[2], nodes[2].admin_addr(), "b", "relayed");
    let mut relayed = client(&nodes[0].url());
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    publish_receipted(&nodes[1].url(), Binding::Binary, "before", &address, 3);
    assert_eq!(bodies(&take_messages(&mut relayed, 3, true)), ["before-0", "before-1", "before-2"]);
    assert_eq!(consumers_at(nodes[1].admin_addr(), &address), 1, "the relay's subscription at b");

    let cut_at = Instant::now();
    proxy.set_partitioned(true);
    let ended = relayed.next_message(Duration::from_millis(LEASE_MS) + Duration::from_secs(5));
    let ended_after = cut_at.elapsed();
    match ended {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!((error.code, error.fatal, error.subscription_id), (4421, false, 1), "{reason}");
            assert!(reason.contains("fenced") && reason.contains(&format!("\"{address}\"")), "{reason}");
        }
        other => panic!("a relayed subscription on a fenced node ends with 4421, not {other:?}"),
    }
    assert!(
        nodes[0].log_lines().iter().any(|line| line.contains("node \"a\" fenced")),
        "a was fenced: {:#?}",
        nodes[0].log_lines()
    );
    eprintln!(
        "fencing: a subscription relayed from node a ended {} ms after a was cut from etcd (lease {LEASE_MS} ms)",
        ended_after.as_millis()
    );
    assert!(ended_after <= Duration::from_millis(LEASE_MS + 1500), "ended after {ended_after:?}");
    // The relay unsubscribed it at b: b delivers nothing more through the fenced node, and a
    // consumer on b gets every message sent now.
    let deadline = Instant::now() + Duration::from_secs(5);
    while consumers_at(nodes[1].admin_addr(), &address) != 0 {
        assert!(Instant::now() < deadline, "the relay's subscription is still open at b 5 s after the fencing");
        std::thread::sleep(Duration::from_millis(20));
    }
    publish_receipted(&nodes[1].url(), Binding::Binary, "after", &address, 5);
    let mut on_owner = client(&nodes[1].url());
    on_owner.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    assert_eq!(
        bodies(&take_messages(&mut on_owner, 5, true)),
        (0..5).map(|i| format!("after-{i}")).collect::<Vec<_>>()
    );
    // While fenced, a SUBSCRIBE there is refused with 4421.
    let refused = relayed.subscribe(2, &address, DeliveryMode::Anycast, AckMode::Client, 10).expect_err("fenced");
    assert!(matches!(&refused, ClientError::Broker(error) if error.code == 4421), "{refused}");
}

/// A relayed consumer's NACK that the relay wrote just before its connection to the owner
/// dropped is not lost with it: the relay's client writes it again once the session is
/// resumed, before its ACKs (the cumulative ACK the relay wrote after the NACK covers the
/// NACKed delivery, and on its own would acknowledge it: the message would be gone). So the
/// message comes back, redelivered, within the bound, not after the owner's ack timeout (60 s
/// here) nor never. The owner is reached through a proxy that drops the NACK's bytes, then
/// cuts the connection.
#[test]
fn a_relayed_nack_lost_with_the_relays_connection_is_written_again_after_the_resume_and_the_message_comes_back() {
    let _serial = serial();
    let etcd = Etcd::start();
    let b_addr = SocketAddr::from(([127, 0, 0, 1], harness::free_port_on(std::net::Ipv4Addr::LOCALHOST.into())));
    let proxy = ChaosProxy::quiet(b_addr);
    let (b_listen, b_advertise) = (b_addr.to_string(), proxy.url());
    let b_flags = ["--listen", &b_listen, "--advertise-url", &b_advertise, "--ack-timeout-ms", "60000"];
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &b_flags)];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "nacked");
    let mut consumer = client(&nodes[0].url());
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    publish_receipted(&nodes[1].url(), Binding::Binary, "job", &address, 1);
    let first = take_messages(&mut consumer, 1, false).remove(0);
    assert!(!first.redelivered);

    // The relay's NACK (and the cumulative ACK written after it: 16 bytes each) are dropped on
    // the way to b; then the connection is cut, and the relay's client resumes the session.
    proxy.set_blackholed(true);
    consumer.nack(first.delivery_seq, true).unwrap();
    consumer.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.dropped() < 32 {
        assert!(Instant::now() < deadline, "the relay's NACK did not reach the proxy: {} bytes", proxy.dropped());
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.set_blackholed(false);
    let cut_at = Instant::now();
    proxy.set_partitioned(true);
    proxy.set_partitioned(false);

    let again = consumer.next_message(Duration::from_secs(10)).unwrap();
    let again = again.unwrap_or_else(|| {
        panic!("the NACKed message did not come back within 10 s of the cut: {:#?}", nodes[0].log_lines())
    });
    eprintln!("relay: a NACK lost with the connection took effect {} ms after the cut", cut_at.elapsed().as_millis());
    assert_eq!((again.body.as_ref(), again.redelivered), (first.body.as_ref(), true));
    consumer.ack(again.delivery_seq, false).unwrap();
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "delivered once more only");
}

#[test]
fn an_operators_move_ends_a_relayed_subscription_with_4421_naming_the_new_owner_and_a_new_one_gets_new_messages() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "moving");
    let mut relayed = client(&nodes[2].url());
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    publish_receipted(&nodes[0].url(), Binding::Binary, "before", &address, 2);
    assert_eq!(bodies(&take_messages(&mut relayed, 2, true)), ["before-0", "before-1"]);

    let (status, body) =
        admin_request(nodes[0].admin_addr(), "PUT", &format!("/api/cluster/addresses/{address}"), r#"{"owner":"a"}"#);
    assert_eq!(status, 200, "moving {address} to a: {body}");
    match relayed.next_message(Duration::from_secs(10)) {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!((error.code, error.fatal, error.subscription_id), (4421, false, 1), "{reason}");
            assert_eq!(named_owner(&reason).as_deref(), Some("a"), "{reason}");
        }
        other => panic!("a relayed subscription whose address moved ends with 4421, not {other:?}"),
    }
    // The session goes on: it subscribes again (relayed to a now; until c's view has the move,
    // b refuses the relayed SUBSCRIBE with 4421 naming a) and gets what is sent from now on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100) {
        assert!(Instant::now() < deadline, "{address} could not be subscribed again after the move: {error}");
        std::thread::sleep(Duration::from_millis(50));
    }
    publish_receipted(&nodes[1].url(), Binding::Text, "after", &address, 5);
    assert_eq!(bodies(&take_messages(&mut relayed, 5, true)), (0..5).map(|i| format!("after-{i}")).collect::<Vec<_>>());
    assert_eq!(consumers_at(nodes[0].admin_addr(), &address), 1, "the relay's subscription is at a, the new owner");
}

/// A relayed subscription ends as soon as the consumer's node sees its address placed on
/// another node, even when the old owner cannot say so itself: here it is stopped (SIGSTOP),
/// so its connections stay open and silent, as in a partition or a hang; a dead node's address
/// re-placed reaches the consumer's node the same way (a new placement in etcd). Until session
/// 11 the subscription stayed with the old owner's relay until that relay missed a PING's
/// answer (1 s of silence plus 2 s): 4503, 2 to 3 s after the stop, whatever the placement
/// said. Now: non-fatal 4421 naming the new owner, well within the lease the test sets (the
/// figure it prints is what it took); subscribing again, the consumer gets every message sent
/// afterwards, through any node, once and in order.
#[test]
fn a_relayed_subscription_ends_with_4421_as_soon_as_its_address_moves_away_from_an_owner_that_cannot_say_so() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "stalled");
    let mut relayed = client(&nodes[2].url());
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    publish_receipted(&nodes[0].url(), Binding::Binary, "before", &address, 2);
    assert_eq!(bodies(&take_messages(&mut relayed, 2, true)), ["before-0", "before-1"]);

    // b stops answering; the operator moves the address to a. (Dropped before the nodes: b
    // continues, then stops by PID.)
    let _stopped = Stopped::new(nodes[1].pid());
    let moved_at = Instant::now();
    let (status, body) =
        admin_request(nodes[0].admin_addr(), "PUT", &format!("/api/cluster/addresses/{address}"), r#"{"owner":"a"}"#);
    assert_eq!(status, 200, "moving {address} to a: {body}");
    let ended = relayed.next_message(Duration::from_secs(10));
    let ended_after = moved_at.elapsed();
    match ended {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!(
                (error.code, error.fatal, error.subscription_id),
                (4421, false, 1),
                "the move, not the silent owner's PING bound (4503), ends it: {reason}"
            );
            assert_eq!(named_owner(&reason).as_deref(), Some("a"), "{reason}");
        }
        other => panic!("a relayed subscription whose address moved ends with 4421, not {other:?}"),
    }
    eprintln!(
        "relaying: a subscription relayed to a stopped owner ended with 4421 {} ms after the move was asked",
        ended_after.as_millis()
    );
    assert!(
        ended_after < Duration::from_millis(LEASE_MS),
        "ended {ended_after:?} after the move was asked: the placement reaches c through etcd's watch, within \
         the lease ({LEASE_MS} ms) on the busiest machine"
    );

    // Subscribing again reaches a at once (c's view has the move: that is what ended it), and
    // every message sent from now on comes, through a and through c, once and in order.
    relayed.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    publish_receipted(&nodes[0].url(), Binding::Binary, "on-a", &address, 10);
    publish_receipted(&nodes[2].url(), Binding::Text, "on-c", &address, 10);
    assert_each_publisher_in_order_once(&take_messages(&mut relayed, 20, true), &["on-a", "on-c"], 10);
    assert_eq!(consumers_at(nodes[0].admin_addr(), &address), 1, "the relay's subscription is at a, the new owner");
}

/// Sends SIGSTOP to a process now and SIGCONT when dropped.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        // SAFETY: kill(2) with a valid signal on a child this test started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

#[test]
fn a_relayed_subscription_whose_commands_overflow_the_relays_queue_ends_with_a_non_fatal_4429() {
    use mbws::cluster::relay::RELAY_QUEUE_BOUND;
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "flood");
    // b stopped: c's relay to b waits in its connection's handshake (up to 2 s), taking nothing
    // from its queue meanwhile. (Dropped before the nodes: b continues, then stops by PID.)
    let _stopped = Stopped::new(nodes[1].pid());
    let mut consumer = client(&nodes[2].url());
    let subscribe = frames::Subscribe {
        subscription_id: 1,
        address: Bytes::from(address.clone()),
        mode: DeliveryMode::Anycast,
        ack_mode: AckMode::Client,
        credit: 10,
    };
    consumer.write_frame(&frames::Frame::Subscribe(subscribe)).unwrap();
    // FLOWs for the relayed subscription, each a command for the relay, until one finds its
    // queue full: twice the bound at most (the relay may take one queue's worth before it
    // blocks), read between batches so the session's answers never pile up.
    let started = Instant::now();
    let mut sent = 0;
    let ended = loop {
        assert!(sent <= 2 * RELAY_QUEUE_BOUND + 4096, "{sent} FLOWs did not overflow the relay's queue");
        for _ in 0..1024 {
            let flow = frames::Flow { subscription_id: 1, credit: 1 + (sent % 10) as u32 };
            consumer.write_frame(&frames::Frame::Flow(flow)).unwrap();
            sent += 1;
        }
        match consumer.next_message(Duration::from_millis(1)) {
            Ok(None) => continue,
            Err(ClientError::Broker(error)) => break error,
            other => panic!("while flooding the relay: {other:?}"),
        }
    };
    let reason = String::from_utf8_lossy(&ended.reason).into_owned();
    assert_eq!((ended.code, ended.fatal, ended.subscription_id), (4429, false, 1), "{reason}");
    assert!(
        reason.contains(&format!("{RELAY_QUEUE_BOUND} commands already wait for the relay to cluster node \"b\"")),
        "{reason}"
    );
    eprintln!("relay queue: {sent} FLOWs sent, 4429 after {} ms", started.elapsed().as_millis());
}

/// The forwarder writes the stored message's bytes as they came and the relay keeps the
/// owner's MESSAGE bytes: what a consumer on another node than the publisher's gets, at the
/// owner or relayed through a third node, is what the publisher sent, field for field, in
/// either binding, with no header of the cluster's; and max-frame-bytes means the same on every
/// node (a message at the limit crosses both hops, one byte more is refused where it is sent).
#[test]
fn a_consumer_on_another_node_in_either_binding_gets_exactly_the_publishers_properties_and_body_and_max_frame_bytes_is_the_same_on_every_node(
) {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "fields");
    // At the owner b, and relayed through c (a multicast feed), in both bindings.
    let mut consumers = [
        client_in(&nodes[1].url(), Binding::Text),
        client_in(&nodes[1].url(), Binding::Binary),
        client_in(&nodes[2].url(), Binding::Text),
        client_in(&nodes[2].url(), Binding::Binary),
    ];
    for consumer in &mut consumers {
        consumer.subscribe(3, &address, DeliveryMode::Multicast, AckMode::Client, 100).unwrap();
    }
    let mut publisher = client_in(&nodes[0].url(), Binding::Binary);
    let max_frame_bytes = publisher.opened().limits.max_frame_bytes as usize;
    let properties = frames::Properties {
        content_type: Bytes::from_static(b"application/json"),
        correlation_id: Bytes::from_static(b"corr-42"),
        reply_to: Bytes::from_static(b"replies"),
        headers: vec![
            (Bytes::from_static(b"x-first"), Bytes::from_static(b"one")),
            (Bytes::from_static(b"x-second"), Bytes::from("two, with a longer value ".repeat(20))),
        ],
    };
    // The largest body whose MESSAGE fits max-frame-bytes in both bindings, on the publisher's node.
    let plain = frames::Properties::default();
    let at_limit = max_frame_bytes - frames::largest_message_bytes(address.as_bytes(), &plain, 0);
    let sends = [
        (properties.clone(), Bytes::from("{\"text\": \"h\u{e9}llo \u{1F600}\"}\n".repeat(3))),
        (plain.clone(), Bytes::new()),
        (plain.clone(), Bytes::from(vec![b'z'; at_limit])),
    ];
    let mut last = 0;
    for (properties, body) in &sends {
        let send = frames::Send {
            address: Bytes::copy_from_slice(address.as_bytes()),
            properties: properties.clone(),
            body: body.clone(),
            ..Default::default()
        };
        last = publisher.send_message(send).unwrap();
    }
    publisher.wait_receipt(last).unwrap();
    for (index, consumer) in consumers.iter_mut().enumerate() {
        let messages = take_messages(consumer, sends.len(), true);
        for (message, (properties, body)) in messages.iter().zip(&sends) {
            assert_eq!(message.address, address.as_bytes(), "consumer {index}");
            assert_eq!(
                &message.properties, properties,
                "consumer {index}: the publisher's properties exactly, no header of the cluster's"
            );
            assert_eq!(message.body.len(), body.len(), "consumer {index}");
            assert!(message.body == body, "consumer {index}: the publisher's body");
        }
    }
    // One byte more is over max-frame-bytes on every node: a refuses it itself (4413).
    let over = frames::Send {
        address: Bytes::copy_from_slice(address.as_bytes()),
        body: Bytes::from(vec![b'z'; at_limit + 1]),
        ..Default::default()
    };
    let seq = publisher.send_message(over).unwrap();
    match publisher.wait_receipt(seq) {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!(error.code, 4413, "{reason}");
            assert!(reason.contains(&format!("over max-frame-bytes {max_frame_bytes}")), "{reason}");
            assert!(!reason.contains("cluster node"), "refused by the publisher's node, not the owner: {reason}");
        }
        other => panic!("a SEND one byte over max-frame-bytes was not refused with 4413: {other:?}"),
    }
}

/// Polls the owner's admin API until `address` has `count` consumers there (bounded: 10 s).
fn wait_for_consumers_at(owner: &Broker, address: &str, count: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = consumers_at(owner.admin_addr(), address);
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} consumers of {address} at the owner, not {count}, after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unsubscribe(client: &mut Client, subscription_id: u32) {
    client.write_frame(&frames::Frame::Unsubscribe(frames::Unsubscribe { subscription_id })).unwrap();
    client.flush().unwrap();
}

#[test]
fn multicast_subscribers_on_one_node_share_one_relayed_subscription_each_gets_every_message_in_order() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [node("a", &etcd.url(), &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "shared");
    // Three listeners on c and two on a, in both bindings and ack modes; one on b, the owner.
    let mut listeners = Vec::new();
    for (node, binding, ack_mode) in [
        (2, Binding::Binary, AckMode::Auto),
        (2, Binding::Text, AckMode::Client),
        (2, Binding::Binary, AckMode::Client),
        (0, Binding::Text, AckMode::Auto),
        (0, Binding::Binary, AckMode::Client),
        (1, Binding::Binary, AckMode::Auto),
    ] {
        let mut listener = client_in(&nodes[node].url(), binding);
        listener.subscribe(3, &address, DeliveryMode::Multicast, ack_mode, 1000).unwrap();
        listeners.push((listener, ack_mode == AckMode::Client));
    }
    // At the owner: its own listener and one relayed subscription per other node.
    assert_eq!(consumers_at(nodes[1].admin_addr(), &address), 3, "one relayed subscription per node");
    // Publishers on a and c.
    const PER_PUBLISHER: usize = 400;
    std::thread::scope(|scope| {
        for (name, url) in [("pa", nodes[0].url()), ("pc", nodes[2].url())] {
            let address = &address;
            scope.spawn(move || publish_receipted(&url, Binding::Binary, name, address, PER_PUBLISHER));
        }
    });
    for (listener, ack) in &mut listeners {
        let news = take_messages(listener, 2 * PER_PUBLISHER, *ack);
        assert!(news.iter().all(|message| message.subscription_id == 3));
        assert_each_publisher_in_order_once(&news, &["pa", "pc"], PER_PUBLISHER);
    }
    // c's listeners leave one by one: c's relayed subscription stays while one is left and is
    // unsubscribed at the owner with the last. (A dropped connection would keep its session,
    // and so its subscription, for the resume window.)
    unsubscribe(&mut listeners[0].0, 3);
    unsubscribe(&mut listeners[1].0, 3);
    listeners.remove(1);
    publish_receipted(&nodes[0].url(), Binding::Binary, "later", &address, 3);
    assert_eq!(bodies(&take_messages(&mut listeners[1].0, 3, true)), ["later-0", "later-1", "later-2"]);
    assert_eq!(consumers_at(nodes[1].admin_addr(), &address), 3, "c's relayed subscription serves its last listener");
    unsubscribe(&mut listeners[1].0, 3);
    wait_for_consumers_at(&nodes[1], &address, 2, "after c's last listener left");
    // a's listeners still get what is sent; c's get nothing more.
    publish_receipted(&nodes[2].url(), Binding::Text, "last", &address, 2);
    let on_a = bodies(&take_messages(&mut listeners[2].0, 5, false));
    assert_eq!(on_a, ["later-0", "later-1", "later-2", "last-0", "last-1"]);
    assert!(listeners[0].0.next_message(Duration::from_millis(300)).unwrap().is_none(), "an unsubscribed listener");
}

#[test]
fn a_slow_multicast_subscriber_fed_by_a_relayed_subscription_ends_with_4429_without_stalling_the_others() {
    let _serial = serial();
    let etcd = Etcd::start();
    let nodes = [
        node("a", &etcd.url(), &[]),
        node("b", &etcd.url(), &[]),
        node("c", &etcd.url(), &["--max-queued-messages", "10000"]),
    ];
    let address = address_owned_by(&nodes[0], nodes[0].admin_addr(), "b", "slowfed");
    // On c: one that never acknowledges (credit 10; past 10,000 more in its backlog it is
    // ended), and two that read everything. The feed's credit comes back to the owner as soon
    // as c has fanned its messages out (a slow subscriber holds back only itself), so what
    // bounds a subscriber's backlog is its own pace against the publisher's.
    let mut slow = client(&nodes[2].url());
    slow.subscribe(1, &address, DeliveryMode::Multicast, AckMode::Client, 10).unwrap();
    let mut fast = [client(&nodes[2].url()), client(&nodes[2].url())];
    for listener in &mut fast {
        listener.subscribe(2, &address, DeliveryMode::Multicast, AckMode::Auto, 1000).unwrap();
    }
    const COUNT: usize = 14_000;
    // The publisher keeps within LAG messages of the fast ones (a debug build's client reads
    // slower than the brokers deliver, the more so on a loaded machine), so their backlogs stay
    // far below the 10,000 that ends a subscriber, while the slow one's grows past it.
    const LAG: usize = 2_000;
    let received = [AtomicUsize::new(0), AtomicUsize::new(0)];
    // The fast ones get everything, in order, while the slow one holds its 10.
    std::thread::scope(|scope| {
        let (address, received) = (&address, &received);
        let publisher_url = nodes[0].url();
        scope.spawn(move || {
            let mut publisher = client_in(&publisher_url, Binding::Binary);
            let mut last = 0;
            for index in 0..COUNT {
                if index % 500 == 0 {
                    publisher.flush().unwrap();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while received.iter().any(|count| count.load(Ordering::Relaxed) + LAG < index) {
                        assert!(Instant::now() < deadline, "the fast subscribers fell {LAG} behind for 30 s");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                last = publisher.send(address, format!("m-{index}")).unwrap();
            }
            publisher.wait_receipt(last).unwrap();
        });
        for (listener, count) in fast.iter_mut().zip(received) {
            scope.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut all = Vec::with_capacity(COUNT);
                while all.len() < COUNT {
                    assert!(Instant::now() < deadline, "only {} of {COUNT} messages came", all.len());
                    if let Some(message) = listener.next_message(Duration::from_millis(500)).unwrap() {
                        all.push(message);
                        count.store(all.len(), Ordering::Relaxed);
                    }
                }
                assert_eq!(bodies(&all), (0..COUNT).map(|i| format!("m-{i}")).collect::<Vec<_>>());
            });
        }
    });
    let mut held = 0;
    let ended = loop {
        match slow.next_message(Duration::from_secs(5)) {
            Ok(Some(_)) => held += 1,
            Err(ClientError::Broker(error)) => break error,
            other => panic!("the slow subscriber ends with 4429, not {other:?} (after {held} messages)"),
        }
    };
    let reason = String::from_utf8_lossy(&ended.reason).into_owned();
    assert_eq!((ended.code, ended.fatal, ended.subscription_id), (4429, false, 1), "{reason}");
    assert_eq!(held, 10, "the slow subscriber got its credit's worth");
    // c's relayed subscription still serves the fast ones.
    assert_eq!(consumers_at(nodes[1].admin_addr(), &address), 1);
}

#[test]
fn a_fenced_node_ends_every_local_subscriber_of_a_shared_relayed_subscription_with_4421() {
    let _serial = serial();
    let etcd = Etcd::start();
    let proxy = ChaosProxy::quiet(etcd.client_addr);
    let through_proxy = format!("http://{}", proxy.addr);
    let nodes = [node("a", &through_proxy, &[]), node("b", &etcd.url(), &[]), node("c", &etcd.url(), &[])];
    let address = address_owned_by(&nodes[2], nodes[2].admin_addr(), "b", "fencedfeed");
    let mut listeners = [client(&nodes[0].url()), client(&nodes[0].url()), client(&nodes[0].url())];
    for (id, listener) in listeners.iter_mut().enumerate() {
        listener.subscribe(id as u32 + 1, &address, DeliveryMode::Multicast, AckMode::Auto, 100).unwrap();
    }
    assert_eq!(consumers_at(nodes[1].admin_addr(), &address), 1, "a's one relayed subscription at b");
    publish_receipted(&nodes[1].url(), Binding::Binary, "before", &address, 2);
    for listener in &mut listeners {
        assert_eq!(bodies(&take_messages(listener, 2, false)), ["before-0", "before-1"]);
    }
    proxy.set_partitioned(true);
    for (id, listener) in listeners.iter_mut().enumerate() {
        match listener.next_message(Duration::from_millis(LEASE_MS) + Duration::from_secs(5)) {
            Err(ClientError::Broker(error)) => {
                let reason = String::from_utf8_lossy(&error.reason).into_owned();
                assert_eq!((error.code, error.fatal, error.subscription_id), (4421, false, id as u32 + 1), "{reason}");
                assert!(reason.contains("fenced") && reason.contains(&format!("\"{address}\"")), "{reason}");
            }
            other => panic!("listener {id} on a fenced node ends with 4421, not {other:?}"),
        }
    }
    wait_for_consumers_at(&nodes[1], &address, 0, "after a was fenced");
}
