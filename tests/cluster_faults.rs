//! The cluster under faults and with security on (issue 13; docs/CLUSTER.md), against a real
//! etcd and real broker processes started here and stopped by PID:
//! - forwarding between nodes that require authentication (`--cluster-login`,
//!   `cluster-passcode`), and between `wss://` nodes signed by a private CA
//!   (`--cluster-ca-file`); a node without them gets 4503 naming the owner and why;
//! - kill -9 of a node while publishers and consumers on every node keep the cluster busy: the
//!   survivors serve its non-durable addresses again within a bound (the time is printed), the
//!   other addresses see no error at all, and no receipted message of its durable address is
//!   lost once it returns;
//! - a node partitioned from etcd and its peers by taking down the veth pair that joins its
//!   network namespace to the others (created and removed by the test; skipped, saying so,
//!   when not root or without `ip netns`): it fences itself, the others take its addresses, and
//!   after healing every address is served by exactly one node.
//!
//! The tests run one at a time (each starts four processes on a small, busy machine).

mod common;
#[path = "support/cluster_harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Broker;
use harness::{
    address_owned_by, as_cluster_link, client, client_options, consumer_once_served, node, node_flags, node_in,
    placements, probe, serial, the_one_owner, wait_registered, Etcd, LEASE_MS,
};
use mbws::mbws::{AckMode, DeliveryMode};
use mbws_client::{Client, ClientError, ClientOptions};

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Sends `count` SENDs `NAME-i` to `address` through `publisher`, each receipted (or panics).
fn send_receipted(publisher: &mut Client, address: &str, name: &str, count: usize) {
    let mut last = 0;
    for index in 0..count {
        last = publisher.send(address, format!("{name}-{index}")).unwrap();
    }
    publisher.wait_receipt(last).unwrap_or_else(|error| panic!("publisher {name}: {error}"));
}

/// Reads MESSAGEs until `count` came (bounded), acknowledging each; then nothing more comes.
fn take_bodies(consumer: &mut Client, count: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bodies.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} messages came", bodies.len());
        if let Some(message) = consumer.next_message(Duration::from_millis(500)).unwrap() {
            consumer.ack(message.delivery_seq, false).unwrap();
            bodies.push(String::from_utf8_lossy(&message.body).into_owned());
        }
    }
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "a message came twice");
    bodies
}

/// [`take_bodies`] without the probes (`harness::probe` sends "probe" to an address's owner, where
/// it waits for a consumer): `count` other bodies, then none more.
fn bodies_except_probes(consumer: &mut Client, count: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let wait = if bodies.len() < count { Duration::from_millis(500) } else { Duration::from_millis(300) };
        match consumer.next_message(wait).unwrap() {
            Some(message) => {
                consumer.ack(message.delivery_seq, false).unwrap();
                if message.body.as_ref() != b"probe" {
                    bodies.push(String::from_utf8_lossy(&message.body).into_owned());
                }
            }
            None if bodies.len() >= count => return bodies,
            None => {}
        }
        assert!(Instant::now() < deadline, "only {} of {count} messages came: {bodies:?}", bodies.len());
    }
}

/// The 4503 refusal a SEND through `publisher` to `address` gets: its reason.
fn refused_with_4503(publisher: &mut Client, address: &str) -> String {
    let seq = publisher.send(address, "refused").unwrap();
    match publisher.wait_receipt(seq) {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert_eq!((error.code, error.fatal), (4503, false), "{reason}");
            reason
        }
        other => panic!("expected 4503, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Credentials and a private CA.

const PEER_SECRET: &str = "peer-secret-7f3e91";
const ALICE_PASSWORD: &str = "alice-password";

/// A configuration file requiring authentication: user `alice` (send and consume `orders-*`)
/// and user `peer`, the nodes' own (send everything); with `cluster-passcode` when `with_peer`.
fn auth_config(dir: &Path, with_peer: bool) -> PathBuf {
    let alice = mbws_client::hash_password(ALICE_PASSWORD).unwrap();
    let peer = mbws_client::hash_password(PEER_SECRET).unwrap();
    let passcode = if with_peer { format!("cluster-passcode = \"{PEER_SECRET}\"\n") } else { String::new() };
    let text = format!(
        "{passcode}[auth]\n\
         [[auth.user]]\nname = \"alice\"\npassword-hash = \"{alice}\"\nsend = [\"orders-*\"]\nconsume = [\"orders-*\"]\n\n\
         [[auth.user]]\nname = \"peer\"\npassword-hash = \"{peer}\"\nsend = [\"*\"]\n"
    );
    let file = dir.join(if with_peer { "with-peer.toml" } else { "without-peer.toml" });
    std::fs::write(&file, text).unwrap();
    file
}

fn alice() -> ClientOptions {
    ClientOptions { login: "alice".into(), passcode: ALICE_PASSWORD.into(), ..client_options() }
}

#[test]
fn nodes_that_require_authentication_forward_with_the_cluster_credentials_and_never_log_them() {
    let _serial = serial();
    let etcd = Etcd::start();
    let dir = TempDir(common::temp_dir("cluster-auth"));
    let (with_peer, without_peer) = (auth_config(&dir.0, true), auth_config(&dir.0, false));
    let (with_peer, without_peer) = (with_peer.to_str().unwrap(), without_peer.to_str().unwrap());
    // a and b log in to each other as "peer" (the passcode from the file); c has no credentials.
    let nodes = [
        node("a", &etcd.url(), &["--config", with_peer, "--cluster-login", "peer"]),
        node("b", &etcd.url(), &["--config", with_peer, "--cluster-login", "peer"]),
        node("c", &etcd.url(), &["--config", without_peer]),
    ];
    let address = address_owned_by(&alice(), &nodes[0].url(), nodes[0].admin_addr(), "b", "orders");
    let mut consumer = Client::connect(&nodes[1].url(), alice()).unwrap();
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    // alice sends through a: forwarded to b with a's credentials, receipted end to end.
    let mut publisher = Client::connect(&nodes[0].url(), alice()).unwrap();
    send_receipted(&mut publisher, &address, "a", 100);
    let expected: Vec<String> = (0..100).map(|index| format!("a-{index}")).collect();
    assert_eq!(take_bodies(&mut consumer, 100), expected);
    // Through c, which has no credentials, b refuses the forwarder's session: 4503 saying so.
    let mut publisher = Client::connect(&nodes[2].url(), alice()).unwrap();
    let reason = refused_with_4503(&mut publisher, &address);
    assert!(reason.contains("cluster node \"b\"") && reason.contains("--cluster-login"), "{reason}");
    // The secret is in no log line of any node.
    for (name, broker) in NAMES.iter().zip(&nodes) {
        let lines = broker.log_lines();
        assert!(!lines.iter().any(|line| line.contains(PEER_SECRET)), "{name} logged the cluster secret: {lines:#?}");
    }
}

/// The SEND's non-fatal ERROR code and reason, or panics if it was receipted.
fn refusal_of(client: &mut Client, address: &str, body: &str) -> (u16, String) {
    let seq = client.send(address, body.to_string()).unwrap();
    match client.wait_receipt(seq) {
        Err(ClientError::Broker(error)) => {
            assert!(!error.fatal, "{error:?}");
            (error.code, String::from_utf8_lossy(&error.reason).into_owned())
        }
        other => panic!("a SEND to {address} was not refused: {other:?}"),
    }
}

/// The upgrade header by which a node's forwarders say "cluster link" is a claim any client can
/// make, and it buys nothing: the client keeps its own permissions (4403 outside them, on every
/// node), and its SENDs to an address another node owns are refused with 4421 naming the owner
/// instead of forwarded (one hop at most); at the owner its SENDs are taken like any client's.
#[test]
fn a_client_claiming_to_be_a_cluster_link_keeps_its_own_permissions_and_loses_forwarding() {
    let _serial = serial();
    let etcd = Etcd::start();
    let dir = TempDir(common::temp_dir("cluster-claim"));
    let config = auth_config(&dir.0, true);
    let config = config.to_str().unwrap();
    let nodes = [
        node("a", &etcd.url(), &["--config", config, "--cluster-login", "peer"]),
        node("b", &etcd.url(), &["--config", config, "--cluster-login", "peer"]),
    ];
    let address = address_owned_by(&alice(), &nodes[0].url(), nodes[0].admin_addr(), "b", "orders");
    let mut consumer = Client::connect(&nodes[1].url(), alice()).unwrap();
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    let mut claiming = Client::connect(&nodes[0].url(), as_cluster_link(alice())).unwrap();
    let (code, reason) = refusal_of(&mut claiming, &address, "through a");
    assert_eq!(code, 4421, "not forwarded: {reason}");
    assert!(reason.contains("owned by cluster node \"b\""), "{reason}");
    let mut at_owner = Client::connect(&nodes[1].url(), as_cluster_link(alice())).unwrap();
    for client in [&mut claiming, &mut at_owner] {
        let (code, reason) = refusal_of(client, "payroll", "not alice's");
        assert_eq!(code, 4403, "alice's own permissions: {reason}");
    }
    send_receipted(&mut at_owner, &address, "b", 1);
    assert_eq!(take_bodies(&mut consumer, 1), ["b-0"], "only what the owner took");
}

#[test]
fn wss_nodes_signed_by_a_private_ca_forward_to_each_other_with_the_cluster_ca_file() {
    let _serial = serial();
    let etcd = Etcd::start();
    let dir = TempDir(common::temp_dir("cluster-tls"));
    // One certificate for 127.0.0.1, not in the system's trust store: the nodes' private CA.
    let pair = common::certs::make_certificate(&dir.0, "node");
    let mut with_ca: Vec<&str> = pair.flags().to_vec();
    with_ca.extend(["--cluster-ca-file", pair.cert_str()]);
    let nodes =
        [node("a", &etcd.url(), &with_ca), node("b", &etcd.url(), &with_ca), node("c", &etcd.url(), &pair.flags())];
    let urls: Vec<String> = nodes.iter().map(|broker| format!("wss://{}/", broker.addr)).collect();
    let options = ClientOptions { ca_file: Some(pair.cert.clone()), ..client_options() };
    let address = address_owned_by(&options, &urls[0], nodes[0].admin_addr(), "b", "secure");
    let mut consumer = Client::connect(&urls[1], options.clone()).unwrap();
    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut publisher = Client::connect(&urls[0], options.clone()).unwrap();
    send_receipted(&mut publisher, &address, "a", 100);
    let expected: Vec<String> = (0..100).map(|index| format!("a-{index}")).collect();
    assert_eq!(take_bodies(&mut consumer, 100), expected);
    // c trusts only the system's CAs: it cannot reach b, and says why.
    let mut publisher = Client::connect(&urls[2], options).unwrap();
    let reason = refused_with_4503(&mut publisher, &address);
    assert!(reason.contains("cluster node \"b\""), "{reason}");
}

// ------------------------------------------------------------------------------------------------
// kill -9 under load.

/// What the publishers saw, per address.
#[derive(Default, Debug)]
struct AddressLog {
    receipted: u64,
    /// Refusals, by code.
    refused: BTreeMap<u16, u64>,
    /// The first RECEIPT that came after the kill.
    first_receipt_after_kill: Option<Instant>,
}

/// The shared state of the load: per-address logs, the kill's time once it happened.
struct Load {
    stop: AtomicBool,
    killed_at: Mutex<Option<Instant>>,
    by_address: Mutex<BTreeMap<String, AddressLog>>,
    delivered: Mutex<BTreeMap<String, u64>>,
}

impl Load {
    fn record(&self, address: &str, outcome: Result<(), u16>) {
        let now = Instant::now();
        let killed_at = *self.killed_at.lock().unwrap();
        let mut logs = self.by_address.lock().unwrap();
        let log = logs.entry(address.to_string()).or_default();
        match outcome {
            Ok(()) => {
                log.receipted += 1;
                if killed_at.is_some_and(|killed| now > killed) && log.first_receipt_after_kill.is_none() {
                    log.first_receipt_after_kill = Some(now);
                }
            }
            Err(code) => *log.refused.entry(code).or_default() += 1,
        }
    }
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A temporary directory, removed when dropped (after the processes using it, declared later).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends to `addresses` in turn through `url`, one SEND at a time (each waits for its answer),
/// until told to stop or the node goes away.
fn publish_in_turn(load: &Load, url: &str, name: &str, addresses: &[String]) {
    let mut publisher = client(url);
    let mut index = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        for address in addresses {
            index += 1;
            let Ok(seq) = publisher.send(address, format!("{name}-{index}")) else { return };
            match publisher.wait_receipt(seq) {
                Ok(()) => load.record(address, Ok(())),
                Err(ClientError::Broker(error)) if !error.fatal => load.record(address, Err(error.code)),
                Err(_) => return, // Its node was killed.
            }
        }
    }
}

/// Consumes `address` at `url` until told to stop or the node goes away, counting deliveries.
fn consume_until_stopped(load: &Load, url: &str, address: &str) {
    let mut consumer = client(url);
    consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Auto, 1000).unwrap();
    while !load.stop.load(Ordering::Relaxed) {
        match consumer.next_message(Duration::from_millis(200)) {
            Ok(Some(_)) => *load.delivered.lock().unwrap().entry(address.to_string()).or_default() += 1,
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Subscribes to `address` at whichever of `urls` accepts (the others refuse with 4421 until
/// it is re-placed), then waits for one MESSAGE: when it came. Bounded by `deadline`.
fn served_again(urls: &[String], address: &str, deadline: Instant) -> Result<Instant, String> {
    let mut last_refusal = String::new();
    while Instant::now() < deadline {
        for url in urls {
            let mut consumer = client(url);
            match consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Auto, 100) {
                Ok(()) => loop {
                    if let Some(_message) = consumer.next_message(Duration::from_millis(200)).unwrap() {
                        let served = Instant::now();
                        // Closed, not dropped: a detached session's subscription would compete.
                        let _ = consumer.close();
                        return Ok(served);
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("{address}: subscribed at {url} but no message came"));
                    }
                },
                Err(error) => last_refusal = error.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{address}: no survivor accepted a subscription; last refusal: {last_refusal}"))
}

#[test]
fn under_load_a_kill_9_moves_the_non_durable_addresses_within_a_bound_and_loses_no_receipted_durable_message() {
    let _serial = serial();
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir(common::temp_dir("cluster-node"))).collect();
    let start =
        |index: usize| node_in(Some(&dirs[index].0), NAMES[index], &etcd.url(), &["--durable-address", "ledger-*"]);
    let mut nodes = [start(0), start(1), start(2)];
    let urls: Vec<String> = nodes.iter().map(Broker::url).collect();
    // Twelve non-durable addresses spread over the three nodes, and a durable one on b, the victim.
    let load_addresses: Vec<String> = (0..12).map(|index| format!("load-{index}")).collect();
    for address in &load_addresses {
        let _ = probe(&urls[0], address);
    }
    let ledger = address_owned_by(&client_options(), &urls[0], nodes[0].admin_addr(), "b", "ledger");
    let view = placements(nodes[0].admin_addr());
    let lost: Vec<String> = load_addresses.iter().filter(|address| view[*address] == "b").cloned().collect();
    let kept: Vec<String> = load_addresses.iter().filter(|address| view[*address] != "b").cloned().collect();
    assert!(!lost.is_empty() && !kept.is_empty(), "the addresses are spread: {view:?}");

    let load = Load {
        stop: AtomicBool::new(false),
        killed_at: Mutex::new(None),
        by_address: Mutex::new(BTreeMap::new()),
        delivered: Mutex::new(BTreeMap::new()),
    };
    // The durable publisher's receipted bodies, in order.
    let durable_receipted = Mutex::new(Vec::<String>::new());
    let durable_receipted_before_kill = Mutex::new(0usize);
    let survivors = vec![urls[0].clone(), urls[2].clone()];
    let (failover, load_rate) = std::thread::scope(|scope| {
        let load = &load;
        // However this closure ends (a failed assertion too), the load threads stop, so the
        // scope can end.
        let _stop = StopOnDrop(&load.stop);
        // A publisher on every node over every non-durable address; consumers at the owners.
        for (name, url) in NAMES.iter().zip(&urls) {
            let addresses = &load_addresses;
            scope.spawn(move || publish_in_turn(load, url, name, addresses));
        }
        for address in &load_addresses {
            let owner = NAMES.iter().position(|name| *name == view[address]).unwrap();
            let url = &urls[owner];
            scope.spawn(move || consume_until_stopped(load, url, address));
        }
        // A durable publisher through a to b's ledger (forwarded), its receipts recorded.
        let (ledger, durable_receipted, url) = (&ledger, &durable_receipted, &urls[0]);
        scope.spawn(move || {
            let mut publisher = client(url);
            let mut index = 0;
            while !load.stop.load(Ordering::Relaxed) {
                index += 1;
                let body = format!("ledger-{index}");
                let seq = publisher.send(ledger, body.clone()).unwrap();
                match publisher.wait_receipt(seq) {
                    Ok(()) => durable_receipted.lock().unwrap().push(body),
                    Err(ClientError::Broker(error)) if !error.fatal => {
                        assert_eq!(error.code, 4503, "{error:?}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(error) => panic!("the durable publisher on a: {error}"),
                }
            }
        });
        // The load runs: every address receipted and delivered, the ledger receipted.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let delivered = load.delivered.lock().unwrap().len();
            if delivered == load_addresses.len() && durable_receipted.lock().unwrap().len() >= 50 {
                break;
            }
            assert!(Instant::now() < deadline, "the load did not get going: {} addresses delivered", delivered);
            std::thread::sleep(Duration::from_millis(20));
        }
        let receipted_before: u64 = load.by_address.lock().unwrap().values().map(|log| log.receipted).sum();
        let load_started = Instant::now();
        std::thread::sleep(Duration::from_millis(500)); // Load, measured below; not a synchronisation.
        *durable_receipted_before_kill.lock().unwrap() = durable_receipted.lock().unwrap().len();
        *load.killed_at.lock().unwrap() = Some(Instant::now());
        nodes[1].kill();
        let killed_at = load.killed_at.lock().unwrap().unwrap();
        let bound = Duration::from_millis(LEASE_MS) + Duration::from_secs(6);
        let mut served_at = Vec::new();
        for address in &lost {
            served_at.push(
                served_again(&survivors, address, killed_at + bound).unwrap_or_else(|problem| panic!("{problem}")),
            );
        }
        // And the survivors' publishers get RECEIPTs for them again.
        for address in &lost {
            let deadline = killed_at + bound;
            loop {
                let receipt = load.by_address.lock().unwrap().get(address).and_then(|log| log.first_receipt_after_kill);
                if let Some(receipt) = receipt {
                    served_at.push(receipt);
                    break;
                }
                assert!(Instant::now() < deadline, "{address}: no RECEIPT through a survivor within {bound:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let failover = served_at.iter().max().unwrap().duration_since(killed_at);
        let receipted_after: u64 = load.by_address.lock().unwrap().values().map(|log| log.receipted).sum();
        let rate = (receipted_after - receipted_before) as f64 / load_started.elapsed().as_secs_f64();
        load.stop.store(true, Ordering::Relaxed);
        (failover, rate)
    });
    eprintln!(
        "kill -9 under load ({load_rate:.0} receipted SENDs/s over 3 publishers, 12 consumers, 1 durable publisher): \
         the {} non-durable addresses of the killed node served again by the survivors (RECEIPTs and deliveries) \
         {} ms after the kill (lease {LEASE_MS} ms)",
        lost.len(),
        failover.as_millis()
    );
    assert!(failover <= Duration::from_millis(LEASE_MS) + Duration::from_secs(6), "failover took {failover:?}");
    // The other addresses never saw a refusal.
    let logs = load.by_address.lock().unwrap();
    for address in &kept {
        assert!(
            logs[address].refused.is_empty(),
            "{address} (not on the killed node) was refused: {:?}",
            logs[address]
        );
        assert!(logs[address].receipted > 0);
    }
    // b returns on its data directory: every receipted ledger message is there, once, in order.
    let receipted = durable_receipted.into_inner().unwrap();
    assert!(*durable_receipted_before_kill.lock().unwrap() >= 50);
    nodes[1] = start(1);
    let mut consumer = consumer_once_served(&nodes[1].url(), &ledger);
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(message) = consumer.next_message(Duration::from_millis(1000)).unwrap() {
        consumer.ack(message.delivery_seq, false).unwrap();
        bodies.push(String::from_utf8_lossy(&message.body).into_owned());
        assert!(Instant::now() < deadline, "the ledger keeps delivering: {} messages", bodies.len());
    }
    // Receipted ones once each and in order; a refused (4503) one may or may not be there.
    let receipted_set: std::collections::HashSet<&String> = receipted.iter().collect();
    let found: Vec<&String> = bodies.iter().filter(|body| receipted_set.contains(body)).collect();
    assert_eq!(found, receipted.iter().collect::<Vec<_>>(), "every receipted durable message once, in order");
    eprintln!(
        "durable: {} receipted ledger messages (up to the kill and after b returned), all there once and in order; \
         {} more that were refused with 4503 came too",
        receipted.len(),
        bodies.len() - found.len()
    );
    drop(nodes);
}

// ------------------------------------------------------------------------------------------------
// A partition with a network namespace and a veth pair.

/// A network namespace joined to this one by a veth pair with a /30 on it; both removed on drop
/// (deleting the host's end deletes the pair).
struct Netns {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = common::output_within(Command::new("ip").args(args), Duration::from_secs(10));
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

impl Netns {
    /// Why the partition test cannot run here, if it cannot.
    fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root: creating a network namespace and a veth pair needs root (CI runs as root)".into());
        }
        match Command::new("ip").args(["netns", "list"]).output() {
            Ok(output) if output.status.success() => None,
            Ok(output) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
            Err(error) => Some(format!("cannot run `ip` (apt-get install iproute2): {error}")),
        }
    }

    /// Names unique to this process: `mbws-part-PID`, `mbpPIDh`/`mbpPIDn` (at most 15 bytes),
    /// 10.211.X.Y/30 from the PID.
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let base = ((pid & 0x3f) * 4) as u8;
        let netns = Netns {
            name: format!("mbws-part-{pid}"),
            host_if: format!("mbp{}h", pid % 10_000_000),
            host_ip: Ipv4Addr::new(10, 211, (pid >> 6) as u8, base + 1),
            ns_ip: Ipv4Addr::new(10, 211, (pid >> 6) as u8, base + 2),
        };
        let ns_if = format!("mbp{}n", pid % 10_000_000);
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &netns.name])?;
        ip(&["link", "add", &netns.host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &netns.name])?;
        ip(&["addr", "add", &format!("{}/30", netns.host_ip), "dev", &netns.host_if])?;
        ip(&["link", "set", &netns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &netns.name, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        inside(&["addr", "add", &format!("{}/30", netns.ns_ip), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Takes the link down (both ends lose their carrier: a partition) or up again.
    fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).unwrap();
    }

    /// Runs `work` on a thread inside the namespace (its sockets are the namespace's).
    fn run_inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    self.enter_this_thread();
                    work()
                })
                .join()
                .unwrap()
        })
    }

    fn enter_this_thread(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on a valid namespace file descriptor changes only this thread's network
        // namespace (CLONE_NEWNET); the descriptor outlives the call.
        let result = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(result, 0, "setns into {}: {}", self.name, std::io::Error::last_os_error());
    }

    /// A broker node started inside the namespace (`ip netns exec`), listening on its address,
    /// with its data in `dir`.
    fn start_node(&self, name: &str, etcd_url: &str, dir: &Path) -> Broker {
        let lease = LEASE_MS.to_string();
        let listen = format!("{}:0", self.ns_ip);
        let flags = node_flags(
            name,
            etcd_url,
            &lease,
            &["--listen", &listen, "--admin-listen", "off", "--allow-anonymous-remote"],
        );
        let inner = Broker::command(dir, &flags);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(inner.get_program()).args(inner.get_args());
        command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        command.stderr(std::process::Stdio::piped());
        let broker =
            Broker::try_spawn(command).unwrap_or_else(|(status, log)| panic!("{name} exited ({status}): {log:#?}"));
        wait_registered(&broker, name);
        broker
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_node_partitioned_by_a_downed_veth_fences_itself_and_after_healing_no_address_is_owned_twice() {
    if let Some(reason) = Netns::unavailable() {
        eprintln!("SKIPPED a_node_partitioned_by_a_downed_veth...: {reason}");
        return;
    }
    let _serial = serial();
    let netns = Netns::create().unwrap_or_else(|error| panic!("cannot set up the namespace: {error}"));
    // etcd, b and c on the host's end of the veth; a inside the namespace.
    let etcd = Etcd::start_on(IpAddr::V4(netns.host_ip));
    let on_host = format!("{}:0", netns.host_ip);
    let extra = ["--listen", on_host.as_str(), "--allow-anonymous-remote"];
    let a_dir = TempDir(common::temp_dir("cluster-netns-node"));
    let a = netns.start_node("a", &etcd.url(), &a_dir.0);
    let (b, c) = (node("b", &etcd.url(), &extra), node("c", &etcd.url(), &extra));
    let named: Vec<(&str, String)> = vec![("a", a.url()), ("b", b.url()), ("c", c.url())];
    let addresses: Vec<String> = (0..12).map(|index| format!("part-{index}")).collect();
    for address in &addresses {
        let _ = probe(&b.url(), address);
    }
    let view = placements(b.admin_addr());
    let owned_by_a: Vec<String> = addresses.iter().filter(|address| view[*address] == "a").cloned().collect();
    assert!(owned_by_a.len() >= 2, "a owns some addresses (placed by load: 4 of 12): {view:?}");

    // On the host: a consumer on c of another of a's addresses, relayed to a, which delivers
    // through the relay before the cut.
    let relayed_address = owned_by_a[1].clone();
    let mut relayed = client(&c.url());
    relayed.subscribe(1, &relayed_address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    send_receipted(&mut client(&b.url()), &relayed_address, "before", 1);
    assert_eq!(bodies_except_probes(&mut relayed, 1), ["before-0"]);

    // Inside the namespace: a consumer at a, at one of a's addresses, until its subscription ends.
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    let (cut_at, fenced_after, consumer_end, (mut relayed, relayed_end, relayed_ended_at)) =
        std::thread::scope(|scope| {
            let (netns_ref, a_url, address) = (&netns, a.url(), owned_by_a[0].clone());
            let consumer = scope.spawn(move || {
                netns_ref.enter_this_thread();
                let mut consumer = client(&a_url);
                consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
                subscribed_tx.send(()).unwrap();
                let deadline = Instant::now() + Duration::from_millis(LEASE_MS) + Duration::from_secs(5);
                loop {
                    match consumer.next_message(Duration::from_millis(500)) {
                        Ok(None) if Instant::now() < deadline => {}
                        other => return other.map(|message| message.is_some()),
                    }
                }
            });
            subscribed_rx.recv_timeout(Duration::from_secs(10)).expect("the consumer at a subscribed");
            // The relayed consumer on c, until its subscription ends (or a message comes).
            let relayed_consumer = scope.spawn(move || {
                let deadline = Instant::now() + Duration::from_millis(LEASE_MS) + Duration::from_secs(10);
                loop {
                    match relayed.next_message(Duration::from_millis(500)) {
                        Ok(None) if Instant::now() < deadline => {}
                        other => {
                            let other = other.map(|message| message.map(|message| message.body));
                            return (relayed, other, Instant::now());
                        }
                    }
                }
            });
            let cut_at = Instant::now();
            netns.set_link(false);
            let fenced = a.wait_for_log("node \"a\" fenced", Duration::from_millis(LEASE_MS) + Duration::from_secs(3));
            let fenced_after = cut_at.elapsed();
            assert!(fenced.is_some(), "a was not fenced: {:#?}", a.log_lines());
            (cut_at, fenced_after, consumer.join().unwrap(), relayed_consumer.join().unwrap())
        });
    eprintln!(
        "partition (veth down): node a fenced itself {} ms after the cut (lease {LEASE_MS} ms)",
        fenced_after.as_millis()
    );
    assert!(fenced_after <= Duration::from_millis(LEASE_MS + 1000), "fenced after {fenced_after:?}");
    match consumer_end {
        Err(ClientError::Broker(error)) => {
            assert_eq!((error.code, error.subscription_id), (4421, 1), "{error:?}");
            assert!(String::from_utf8_lossy(&error.reason).contains("fenced"), "{error:?}");
        }
        other => panic!("the subscription at the fenced node ends with 4421, not {other:?}"),
    }
    // The subscription relayed from c to a ends with a non-fatal error: 4503 (the relay hears
    // nothing from a: no answer to its PING) or 4421 (re-placed), whichever comes first.
    match &relayed_end {
        Err(ClientError::Broker(error)) => {
            let reason = String::from_utf8_lossy(&error.reason);
            assert!(!error.fatal && error.subscription_id == 1, "{error:?}");
            assert!((error.code == 4503 && reason.contains("cluster node \"a\"")) || error.code == 4421, "{error:?}");
            eprintln!(
                "partition: the subscription relayed from c to a ended with {} {} ms after the cut ({reason})",
                error.code,
                relayed_ended_at.duration_since(cut_at).as_millis()
            );
        }
        other => panic!("a subscription relayed to the partitioned node ends with 4503 or 4421, not {other:?}"),
    }
    // Inside the namespace, a refuses what it owned: it cannot prove it still owns it.
    let a_url = a.url();
    let refused = netns.run_inside(|| probe(&a_url, &owned_by_a[0]));
    assert_eq!(refused.as_ref().map_err(|(code, _)| *code), Err(4421), "{refused:?}");
    // b and c take a's addresses once its lease expired; never while a still served them.
    for address in &owned_by_a {
        let deadline = Instant::now() + Duration::from_millis(LEASE_MS) + Duration::from_secs(6);
        while the_one_owner(&named[1..], address).is_err() {
            assert!(Instant::now() < deadline, "{address} was not re-placed on b or c");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "partition: a's {} addresses served by b or c {} ms after the cut",
        owned_by_a.len(),
        cut_at.elapsed().as_millis()
    );
    // The relayed consumer subscribes again on c (the relay to a may refuse it with 4503 for
    // its backoff, at most 2 s): it gets what is sent from then on, from the new owner.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = relayed.subscribe(2, &relayed_address, DeliveryMode::Anycast, AckMode::Client, 10) {
        assert!(Instant::now() < deadline, "c's consumer could not subscribe again: {error}");
        std::thread::sleep(Duration::from_millis(100));
    }
    send_receipted(&mut client(&b.url()), &relayed_address, "moved", 1);
    assert_eq!(bodies_except_probes(&mut relayed, 1), ["moved-0"]);

    // Healing: a registers again and every address is served by exactly one node.
    let healed_at = Instant::now();
    netns.set_link(true);
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.log_lines().iter().filter(|line| line.contains("node \"a\" registered")).count() < 2 {
        assert!(Instant::now() < deadline, "a did not register again: {:#?}", a.log_lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    for address in &addresses {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(problem) = the_one_owner(&named, address) {
            assert!(Instant::now() < deadline, "after healing: {problem}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(placements(b.admin_addr()), placements(c.admin_addr()), "b and c agree on the placement");
    // Sent through the healed a, the relayed consumer's address reaches its new owner and the
    // consumer on c once: a serves it no more.
    send_receipted(&mut client(&a.url()), &relayed_address, "healed", 1);
    assert_eq!(bodies_except_probes(&mut relayed, 1), ["healed-0"]);
    eprintln!(
        "partition healed: a registered again and all {} addresses were served by exactly one node {} ms after the link came up",
        addresses.len(),
        healed_at.elapsed().as_millis()
    );
    // Processes first (their sockets are on the veth), then the namespace and the pair.
    drop((a, b, c, etcd));
    drop(netns);
}
