//! The cluster's control plane (issue 13 item 2, docs/CLUSTER.md) against a real etcd (Debian's
//! `etcd-server`, started here on loopback ports in a temp dir and stopped by PID) and three
//! real broker processes: placement agreement and spread, failover after kill -9, and fencing
//! of a node cut from etcd (through the fault-injecting proxy of the resume tests).
//!
//! A node "serves" an address when a SEND to it through that node is receipted; a node that
//! does not gets the non-fatal ERROR 4421 naming the owner. The tests run one at a time (each
//! starts four processes on a small, busy machine).

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos_proxy::ChaosProxy;
use common::Broker;
use mbws::mbws::{AckMode, Binding, DeliveryMode, Subprotocol};
use mbws_client::{Client, ClientError, ClientOptions};

/// The lease of the test clusters: short, so failover is quick to observe.
const LEASE_MS: u64 = 2000;

/// One test at a time: each runs etcd and three brokers.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A single-member etcd on loopback, in a temp dir, stopped (SIGKILL, by PID) when dropped.
struct Etcd {
    child: Child,
    client_addr: SocketAddr,
    dir: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = common::temp_dir("etcd");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcd (Debian's etcd-server; .ci/run installs it)");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready to serve client requests") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("etcd did not become ready within 20 s");
        }
        Etcd { child, client_addr: format!("127.0.0.1:{client}").parse().unwrap(), dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.client_addr)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A broker node of cluster `test` reaching etcd at `etcd_url`, registered when this returns.
fn node(name: &str, etcd_url: &str, extra: &[&str]) -> Broker {
    node_in(None, name, etcd_url, extra)
}

/// [`node`], keeping its data in `data_dir` when given (so a restart finds its durable log).
fn node_in(data_dir: Option<&Path>, name: &str, etcd_url: &str, extra: &[&str]) -> Broker {
    let lease = LEASE_MS.to_string();
    let mut flags = vec![
        "--cluster",
        "test",
        "--etcd",
        etcd_url,
        "--node-name",
        name,
        "--cluster-lease-ms",
        &lease,
        "--shards",
        "2",
        "--log-level",
        "info",
    ];
    flags.extend_from_slice(extra);
    let broker = match data_dir {
        Some(dir) => Broker::start_in(dir, &flags),
        None => Broker::start(&flags),
    };
    let registered = format!("node \"{name}\" registered");
    assert!(
        broker.wait_for_log(&registered, Duration::from_secs(15)).is_some(),
        "{name} did not register: {:#?}",
        broker.log_lines()
    );
    broker
}

fn client(url: &str) -> Client {
    let options = ClientOptions {
        subprotocol: Subprotocol::Reliable,
        binding: Binding::Binary,
        timeout: Duration::from_secs(8),
        ..Default::default()
    };
    Client::connect(url, options).expect("connect to the node")
}

/// What a node did with one SEND to `address`: receipted (`Ok`), or the ERROR's code and reason.
fn probe(url: &str, address: &str) -> Result<(), (u16, String)> {
    let mut client = client(url);
    let seq = client.send(address, &b"probe"[..]).unwrap();
    match client.wait_receipt(seq) {
        Ok(()) => Ok(()),
        Err(ClientError::Broker(error)) => Err((error.code, String::from_utf8_lossy(&error.reason).into_owned())),
        Err(other) => panic!("SEND to {address} at {url}: {other}"),
    }
}

/// The owner node named in a 4421 reason (`... owned by cluster node "b" (...`).
fn named_owner(reason: &str) -> Option<String> {
    let rest = reason.split("owned by cluster node \"").nth(1)?;
    Some(rest.split('"').next()?.to_string())
}

/// `GET path` on an admin API, its JSON body.
fn admin_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|error| panic!("not JSON ({error}): {body}"))
}

/// address -> owner, as node `admin` sees the cluster.
fn placements(admin: SocketAddr) -> BTreeMap<String, String> {
    let status = admin_get(admin, "/api/cluster");
    status["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| (entry["name"].as_str().unwrap().to_string(), entry["owner"].as_str().unwrap().to_string()))
        .collect()
}

/// Which of `nodes` (name, url) serves `address` now: each is probed; exactly one must
/// receipt and the others must refuse with 4421 naming it. Returns its name.
fn the_one_owner(nodes: &[(&str, String)], address: &str) -> Result<String, String> {
    let mut serving = Vec::new();
    let mut named = Vec::new();
    for (name, url) in nodes {
        match probe(url, address) {
            Ok(()) => serving.push(name.to_string()),
            Err((4421, reason)) => named.push(named_owner(&reason)),
            Err((code, reason)) => return Err(format!("{name} answered {code}: {reason}")),
        }
    }
    if serving.len() != 1 {
        return Err(format!("address {address} is served by {serving:?} (exactly one expected)"));
    }
    if named.iter().any(|owner| owner.as_deref() != Some(serving[0].as_str())) {
        return Err(format!("address {address} is served by {} but the others name {named:?}", serving[0]));
    }
    Ok(serving.remove(0))
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
    let durable = ["--durable-address", "ledger-*"];
    let dirs: Vec<PathBuf> = (0..3).map(|_| common::temp_dir("cluster-node")).collect();
    let start = |index: usize| node_in(Some(&dirs[index]), ["a", "b", "c"][index], &etcd.url(), &durable);
    let mut nodes = [start(0), start(1), start(2)];
    // Place everything through node a: its first SEND there places it somewhere.
    let plain: Vec<String> = (0..12).map(|index| format!("jobs-{index}")).collect();
    let ledgers: Vec<String> = (0..6).map(|index| format!("ledger-{index}")).collect();
    for address in plain.iter().chain(&ledgers) {
        let _ = probe(&nodes[0].url(), address);
    }
    let view = placements(nodes[0].admin_addr());
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
    nodes[victim] = start(victim);
    for address in &kept {
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe(&nodes[victim].url(), address).is_err() {
            assert!(Instant::now() < deadline, "{address} not served by its returned owner");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
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
    let view = placements(nodes[1].admin_addr());
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
