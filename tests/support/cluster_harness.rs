//! What the cluster's tests share (tests/cluster.rs, tests/cluster_faults.rs): a real etcd started on a
//! loopback (or any local) address and stopped by PID, broker nodes of the cluster `test`, and
//! the probes that ask a node whether it serves an address.
//!
//! A node "serves" an address when a SEND on a session opened as a cluster link (the upgrade
//! header `X-MBWS-Cluster-Link`, whose SENDs a node never forwards) is receipted there; a node
//! that does not own the address refuses such a SEND with the non-fatal ERROR 4421 naming the
//! owner.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::common::admin_request;
use bytes::Bytes;
use mbws::mbws::{self as frames, AckMode, Binding, DeliveryMode, Subprotocol};
use mbws_client::{Client, ClientError, ClientOptions};

use crate::common::{self, Broker};

/// The lease of the test clusters: short, so failover is quick to observe.
pub const LEASE_MS: u64 = 2000;

/// The upgrade header by which a node's forwarders and relays open their sessions as cluster
/// links: a node never forwards a SEND that came over one.
pub const LINK_HEADER: &str = "X-MBWS-Cluster-Link";

/// One test at a time: each runs etcd and three brokers on a small, busy machine.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A free TCP port on `ip` (bound and released: the caller binds it soon after).
pub fn free_port_on(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// A single-member etcd in a temp dir, stopped (SIGKILL, by PID) when dropped.
pub struct Etcd {
    child: Child,
    pub client_addr: SocketAddr,
    dir: PathBuf,
}

impl Etcd {
    /// On loopback.
    pub fn start() -> Etcd {
        Etcd::start_on("127.0.0.1".parse().unwrap())
    }

    /// Listening for clients and its peer on `ip` (a local address: loopback, or a veth's).
    pub fn start_on(ip: IpAddr) -> Etcd {
        let dir = common::temp_dir("etcd");
        let (client, peer) = (free_port_on(ip), free_port_on(ip));
        let client_url = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
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
            let _ = child.wait();
            panic!("etcd did not become ready within 20 s");
        }
        Etcd { child, client_addr: SocketAddr::new(ip, client), dir }
    }

    pub fn url(&self) -> String {
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

/// The flags of node `name` of cluster `test` at `etcd_url`, then `extra`.
pub fn node_flags<'a>(name: &'a str, etcd_url: &'a str, lease: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--cluster",
        "test",
        "--etcd",
        etcd_url,
        "--node-name",
        name,
        "--cluster-lease-ms",
        lease,
        "--shards",
        "2",
        "--log-level",
        "info",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// Waits (bounded) until `broker`, node `name`, has registered at etcd.
pub fn wait_registered(broker: &Broker, name: &str) {
    let registered = format!("node \"{name}\" registered");
    assert!(
        broker.wait_for_log(&registered, Duration::from_secs(15)).is_some(),
        "{name} did not register: {:#?}",
        broker.log_lines()
    );
}

/// A broker node of cluster `test` reaching etcd at `etcd_url`, registered when this returns;
/// its data in `data_dir` when given (so a restart finds its durable log).
pub fn node_in(data_dir: Option<&std::path::Path>, name: &str, etcd_url: &str, extra: &[&str]) -> Broker {
    let lease = LEASE_MS.to_string();
    let flags = node_flags(name, etcd_url, &lease, extra);
    let broker = match data_dir {
        Some(dir) => Broker::start_in(dir, &flags),
        None => Broker::start(&flags),
    };
    wait_registered(&broker, name);
    broker
}

pub fn node(name: &str, etcd_url: &str, extra: &[&str]) -> Broker {
    node_in(None, name, etcd_url, extra)
}

pub fn client_options() -> ClientOptions {
    ClientOptions {
        subprotocol: Subprotocol::Reliable,
        binding: Binding::Binary,
        timeout: Duration::from_secs(8),
        ..Default::default()
    }
}

pub fn client(url: &str) -> Client {
    Client::connect(url, client_options()).unwrap_or_else(|error| panic!("connect to the node {url}: {error}"))
}

/// A SEND of `body` to `address`.
pub fn send_frame(address: &str, body: &[u8]) -> frames::Send {
    frames::Send {
        address: Bytes::copy_from_slice(address.as_bytes()),
        body: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

/// `options` for a session that says it is a cluster link (as a node's forwarders do): its
/// SENDs are never forwarded.
pub fn as_cluster_link(options: ClientOptions) -> ClientOptions {
    ClientOptions { headers: vec![(LINK_HEADER.into(), "1".into())], ..options }
}

/// What a node did with one SEND to `address` on a cluster link's session (so not forwarded):
/// receipted (`Ok`: the node owns the address), or the ERROR's code and reason.
pub fn probe_with(options: ClientOptions, url: &str, address: &str) -> Result<(), (u16, String)> {
    let mut client = Client::connect(url, as_cluster_link(options))
        .unwrap_or_else(|error| panic!("connect to the node {url}: {error}"));
    let seq = client.send_message(send_frame(address, b"probe")).unwrap();
    match client.wait_receipt(seq) {
        Ok(()) => Ok(()),
        Err(ClientError::Broker(error)) => Err((error.code, String::from_utf8_lossy(&error.reason).into_owned())),
        Err(other) => panic!("SEND to {address} at {url}: {other}"),
    }
}

pub fn probe(url: &str, address: &str) -> Result<(), (u16, String)> {
    probe_with(client_options(), url, address)
}

/// The owner node named in a 4421 reason (`... owned by cluster node "b" (...`).
pub fn named_owner(reason: &str) -> Option<String> {
    let rest = reason.split("owned by cluster node \"").nth(1)?;
    Some(rest.split('"').next()?.to_string())
}

/// `GET path` on an admin API, its JSON body.
pub fn admin_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (_, body) = admin_request(admin, "GET", path, "");
    serde_json::from_str(&body).unwrap_or_else(|error| panic!("not JSON ({error}): {body}"))
}

/// How many subscriptions `address` has on the node of admin API `admin` (its `consumers`;
/// 0 when the address does not exist there: an address with no messages and no subscribers
/// is gone).
pub fn consumers_at(admin: SocketAddr, address: &str) -> u64 {
    let info = admin_get(admin, &format!("/api/addresses/{address}"));
    if info["error"].as_str().is_some_and(|error| error.starts_with("no address")) {
        return 0;
    }
    info["consumers"].as_u64().unwrap_or_else(|| panic!("no consumers count for {address}: {info}"))
}

/// address -> owner, as node `admin` sees the cluster.
pub fn placements(admin: SocketAddr) -> BTreeMap<String, String> {
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
pub fn the_one_owner(nodes: &[(&str, String)], address: &str) -> Result<String, String> {
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

/// Places `prefix-0`, `prefix-1`... through `via` (each placement goes to the least loaded live
/// node, so they spread) until one is placed on `owner`, as node `admin` sees it; `options`
/// are the probe's credentials.
pub fn address_owned_by(options: &ClientOptions, via: &str, admin: SocketAddr, owner: &str, prefix: &str) -> String {
    for index in 0..30 {
        let address = format!("{prefix}-{index}");
        let _ = probe_with(options.clone(), via, &address);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(placed) = placements(admin).get(&address) {
                if placed == owner {
                    return address;
                }
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{address} does not appear in the placement");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("none of 30 addresses {prefix}-N was placed on {owner}");
}

/// A client-ack anycast consumer of `address` on `url` (credit 1,000), reconnecting and
/// retrying for up to 10 s while the node does not serve the address yet (a node that just
/// returned, before its placements are back).
pub fn consumer_once_served(url: &str, address: &str) -> Client {
    let mut consumer = client(url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = consumer.subscribe(1, address, DeliveryMode::Anycast, AckMode::Client, 1000) {
        assert!(Instant::now() < deadline, "{address} not served by its returned owner: {error}");
        consumer = client(url);
        std::thread::sleep(Duration::from_millis(50));
    }
    consumer
}
