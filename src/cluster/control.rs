//! The control-plane thread: everything this node says to and hears from etcd.
//!
//! One thread, one current-thread tokio runtime, one loop (`ControlPlane::run`) that waits
//! for the first of: a shard's placement request, an operator's move, a watch event, the
//! lease's renewal tick, the fencing check. Every etcd call is bounded by `op_timeout` (an
//! eighth of the lease, at most 1 s), so the fencing check is never more than that late.
//!
//! Lease and fencing: the node's key `nodes/<node>` is attached to a lease of `lease` TTL,
//! renewed every quarter of it. A renewal counts from the moment it was *sent*: etcd expires
//! the lease no earlier than TTL after it received the last renewal, so a node that has heard
//! no renewal answer for three quarters of the TTL since its last good one stops serving (the
//! shards are told [`ClusterUpdate::Fenced`]) before any other node can see its lease gone and
//! take its addresses. A fenced node grants itself a new lease, registers again, reloads the
//! whole placement and only then serves again (`Unfenced`, then every placement).
//!
//! Placement: `addresses/<name>` is written once by a transaction that succeeds only if the key
//! does not exist (create-revision 0), so concurrent first uses on different nodes agree on the
//! one that won. The owner is the live node owning fewest addresses, ties by name. When a
//! node's key disappears (its lease expired), every node tries to re-place each of its
//! non-durable addresses with a transaction that compares the key's mod-revision: exactly one
//! succeeds; durable addresses keep their owner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::view::{ClusterUpdate, NodeRef, Owner, PlacementRequest};
use super::ClusterSettings;
use crate::broker::{owner_of, ShardId};
use crate::log;
use crate::logging::Level;
use crate::shard::mailbox::{Envelope, PostOffice};

/// `nodes/<node>`'s value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub url: String,
    pub shards: usize,
}

/// `addresses/<name>`'s value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub owner: String,
    pub durable: bool,
}

/// A placement as this node knows it, with the etcd revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placed {
    record: PlacementRecord,
    mod_revision: i64,
}

/// The live node owning fewest of `placements`, ties by name (so every node with the same
/// view picks the same one); `None` without live nodes.
pub fn least_loaded<'a>(
    nodes: impl Iterator<Item = &'a String>,
    owners: impl Iterator<Item = &'a String>,
) -> Option<String> {
    let mut load: BTreeMap<&String, usize> = nodes.map(|node| (node, 0)).collect();
    for owner in owners {
        if let Some(count) = load.get_mut(owner) {
            *count += 1;
        }
    }
    load.into_iter().min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0))).map(|(node, _)| node.clone())
}

/// What the admin API asks the control plane.
enum AdminRequest {
    Move { address: Bytes, owner: String, reply: std::sync::mpsc::SyncSender<Result<String, String>> },
}

/// The admin API's handle on the control plane.
pub struct ClusterHandle {
    cluster: String,
    node: String,
    status: Arc<Mutex<serde_json::Value>>,
    admin: UnboundedSender<AdminRequest>,
}

/// Most placements `GET /api/cluster` lists (the count is always given).
pub const MAX_LISTED_PLACEMENTS: usize = 10_000;

impl ClusterHandle {
    /// The cluster's name and this node's.
    pub fn names(&self) -> (&str, &str) {
        (&self.cluster, &self.node)
    }

    /// `GET /api/cluster`: the cluster as this node sees it (JSON).
    pub fn status(&self) -> serde_json::Value {
        self.status.lock().map(|status| status.clone()).unwrap_or_default()
    }

    /// `PUT /api/cluster/addresses/NAME`: moves `address` to node `owner`; waits up to
    /// `timeout` for etcd. `Ok` says what was done.
    pub fn move_address(&self, address: &[u8], owner: &str, timeout: Duration) -> Result<String, String> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let request = AdminRequest::Move { address: Bytes::copy_from_slice(address), owner: owner.to_string(), reply };
        self.admin.send(request).map_err(|_| "the cluster control plane is not running".to_string())?;
        answer
            .recv_timeout(timeout)
            .map_err(|_| format!("etcd did not answer within {} ms; try again", timeout.as_millis()))?
    }
}

/// Starts the control-plane thread.
pub fn spawn(settings: ClusterSettings, post_office: Arc<PostOffice>) -> std::io::Result<ClusterHandle> {
    let (requests, request_inbox) = tokio::sync::mpsc::unbounded_channel();
    let (admin, admin_inbox) = tokio::sync::mpsc::unbounded_channel();
    let status = Arc::new(Mutex::new(serde_json::Value::Null));
    for shard in 0..post_office.shard_count() {
        post_office.post(ShardId(shard as u16), Envelope::Cluster(ClusterUpdate::Attach(requests.clone())));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (cluster, node) = (settings.cluster.clone(), settings.node.clone());
    let mut plane = ControlPlane::new(settings, post_office, status.clone());
    std::thread::Builder::new()
        .name("mbws-cluster".into())
        .spawn(move || runtime.block_on(plane.run(request_inbox, admin_inbox)))?;
    Ok(ClusterHandle { cluster, node, status, admin })
}

/// The lease this node holds.
struct Lease {
    id: i64,
    ttl: Duration,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When the last renewal etcd answered was sent (or the lease granted).
    renewed_sent_at: Instant,
}

/// The control plane's state (see the module doc).
struct ControlPlane {
    settings: ClusterSettings,
    post_office: Arc<PostOffice>,
    status: Arc<Mutex<serde_json::Value>>,
    client: Option<Client>,
    lease: Option<Lease>,
    /// The lease this node held before it was fenced: revoked when it joins again, so that
    /// its old registration goes at once (the other nodes then re-place what it owned).
    previous_lease: Option<i64>,
    watch: Option<WatchStream>,
    /// Serving: registered, loaded, shards told. False while starting and while fenced.
    serving: bool,
    /// The shards were told `Fenced` (and not `Unfenced` since).
    fenced: bool,
    nodes: BTreeMap<String, NodeRecord>,
    placements: BTreeMap<Bytes, Placed>,
    /// Requests not answerable yet (not serving), with their deadlines.
    waiting: Vec<(PlacementRequest, Instant)>,
    op_timeout: Duration,
    prefix: String,
}

/// How long a placement request may wait for the control plane to be able to answer it.
fn placement_timeout(lease: Duration) -> Duration {
    lease.max(Duration::from_secs(2))
}

impl ControlPlane {
    fn new(settings: ClusterSettings, post_office: Arc<PostOffice>, status: Arc<Mutex<serde_json::Value>>) -> Self {
        let op_timeout = (settings.lease / 8).min(Duration::from_secs(1)).max(Duration::from_millis(100));
        let prefix = format!("/mbws/{}/", settings.cluster);
        ControlPlane {
            settings,
            post_office,
            status,
            client: None,
            lease: None,
            previous_lease: None,
            watch: None,
            serving: false,
            fenced: false,
            nodes: BTreeMap::new(),
            placements: BTreeMap::new(),
            waiting: Vec::new(),
            op_timeout,
            prefix,
        }
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    fn address_key(&self, address: &[u8]) -> Vec<u8> {
        let mut key = format!("{}addresses/", self.prefix).into_bytes();
        key.extend_from_slice(address);
        key
    }

    /// Runs `call` against etcd within `op_timeout`.
    async fn bounded<T>(
        op_timeout: Duration,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(op_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer from etcd within {} ms", op_timeout.as_millis())),
        }
    }

    async fn run(
        &mut self,
        mut requests: UnboundedReceiver<PlacementRequest>,
        mut admin: UnboundedReceiver<AdminRequest>,
    ) {
        log!(
            Level::Info,
            "cluster \"{}\": node \"{}\" ({}) joining through etcd {}; lease {} ms",
            self.settings.cluster,
            self.settings.node,
            self.settings.url,
            self.settings.endpoints.join(","),
            self.settings.lease.as_millis()
        );
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_join_attempt = Instant::now();
        let mut next_renewal = Instant::now();
        loop {
            self.publish_status();
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    self.place(request).await;
                }
                request = admin.recv() => {
                    let Some(AdminRequest::Move { address, owner, reply }) = request else { return };
                    let outcome = self.move_address(address, owner).await;
                    let _ = reply.try_send(outcome);
                }
                message = next_watch_message(&mut self.watch) => {
                    match message {
                        Ok(Some(response)) => self.on_watch(response).await,
                        Ok(None) | Err(_) => {
                            log!(Level::Warn, "cluster: the etcd watch ended ({}); reloading the cluster's state",
                                message.err().map_or_else(|| "stream closed".to_string(), |error| error.to_string()));
                            self.watch = None;
                            self.reload().await;
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.check_fence(now);
                    self.expire_waiting(now);
                    if !self.serving && now >= next_join_attempt {
                        next_join_attempt = now + Duration::from_millis(500);
                        if let Err(problem) = self.join().await {
                            log!(Level::Warn, "cluster: cannot join yet: {problem}; trying again in 500 ms");
                        }
                    } else if self.serving && self.watch.is_none() && now >= next_join_attempt {
                        next_join_attempt = now + Duration::from_millis(500);
                        self.reload().await;
                    } else if self.serving && now >= next_renewal {
                        next_renewal = now + self.lease.as_ref().map_or(Duration::from_secs(1), |lease| lease.ttl / 4);
                        self.renew().await;
                        self.check_fence(Instant::now());
                    }
                }
            }
        }
    }

    /// Connects (once), grants a lease, registers this node, loads the state, starts the
    /// watch, and tells the shards: serving from now on.
    async fn join(&mut self) -> Result<(), String> {
        if self.client.is_none() {
            let options = ConnectOptions::new()
                .with_connect_timeout(self.op_timeout)
                .with_keep_alive(self.op_timeout, self.op_timeout);
            let client =
                Self::bounded(self.op_timeout, Client::connect(&self.settings.endpoints, Some(options))).await?;
            self.client = Some(client);
        }
        let mut client = self.client.clone().expect("connected above");
        if let Some(previous) = self.previous_lease {
            // "Not found" (it expired already) is as good as revoked.
            match Self::bounded(self.op_timeout, client.lease_revoke(previous)).await {
                Ok(_) => {}
                Err(problem) if problem.contains("not found") => {}
                Err(problem) => return Err(format!("cannot revoke the lease held before fencing: {problem}")),
            }
            self.previous_lease = None;
        }
        let ttl_secs = self.settings.lease.as_millis().div_ceil(1000).max(1) as i64;
        let sent_at = Instant::now();
        let granted = Self::bounded(self.op_timeout, client.lease_grant(ttl_secs, None)).await?;
        let lease_id = granted.id();
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        let key = self.node_key(&self.settings.node);
        let record = NodeRecord { url: self.settings.url.clone(), shards: self.settings.shards };
        let value = serde_json::to_vec(&record).expect("a node record serializes");
        // Create-if-absent: a node of the same name that is still alive keeps its name.
        let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease_id)),
        )]);
        let registered = Self::bounded(self.op_timeout, client.txn(txn)).await?;
        if !registered.succeeded() {
            let _ = Self::bounded(self.op_timeout, client.lease_revoke(lease_id)).await;
            return Err(format!(
                "node name \"{}\" is registered by a live node (its lease has not expired); another process uses \
                 --node-name \"{}\", or this node's previous run is not yet expired (within {} ms)",
                self.settings.node,
                self.settings.node,
                self.settings.lease.as_millis()
            ));
        }
        self.lease = Some(Lease { id: lease_id, ttl, keeper: None, renewed_sent_at: sent_at });
        if let Err(problem) = self.load_and_watch().await {
            // Not serving without the state: the registration goes, to be made again.
            self.lease = None;
            let _ = Self::bounded(self.op_timeout, client.lease_revoke(lease_id)).await;
            return Err(problem);
        }
        self.serving = true;
        if self.fenced {
            self.fenced = false;
            self.tell_every_shard(|| ClusterUpdate::Unfenced);
        }
        log!(
            Level::Info,
            "cluster \"{}\": node \"{}\" registered (lease {lease_id:x}, ttl {} s); {} live nodes: {}; {} addresses placed",
            self.settings.cluster,
            self.settings.node,
            ttl.as_secs(),
            self.nodes.len(),
            self.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
            self.placements.len()
        );
        // Every placement, to the shard of its address; then what waited.
        let addresses: Vec<Bytes> = self.placements.keys().cloned().collect();
        for address in addresses {
            self.tell_shard_placed(&address);
        }
        for (request, _) in std::mem::take(&mut self.waiting) {
            self.place(request).await;
        }
        self.replace_orphans().await;
        Ok(())
    }

    /// Reads every node and placement, then watches the prefix from the next revision.
    async fn load_and_watch(&mut self) -> Result<(), String> {
        let mut client = self.client.clone().ok_or("not connected to etcd")?;
        let all =
            Self::bounded(self.op_timeout, client.get(self.prefix.clone(), Some(GetOptions::new().with_prefix())))
                .await?;
        let revision = all.header().map_or(0, |header| header.revision());
        self.nodes.clear();
        self.placements.clear();
        let nodes_prefix = format!("{}nodes/", self.prefix).into_bytes();
        let addresses_prefix = format!("{}addresses/", self.prefix).into_bytes();
        for kv in all.kvs() {
            if let Some(node) = kv.key().strip_prefix(nodes_prefix.as_slice()) {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                    self.nodes.insert(String::from_utf8_lossy(node).into_owned(), record);
                }
            } else if let Some(address) = kv.key().strip_prefix(addresses_prefix.as_slice()) {
                if let Ok(record) = serde_json::from_slice::<PlacementRecord>(kv.value()) {
                    self.placements
                        .insert(Bytes::copy_from_slice(address), Placed { record, mod_revision: kv.mod_revision() });
                }
            }
        }
        let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(revision + 1);
        let stream = Self::bounded(self.op_timeout, client.watch(self.prefix.clone(), Some(options))).await?;
        self.watch = Some(stream);
        Ok(())
    }

    /// Reads the whole state again and watches from there (the watch was lost): every
    /// placement is told to its shard again, orphans re-placed.
    async fn reload(&mut self) {
        if !self.serving {
            return;
        }
        if let Err(problem) = self.load_and_watch().await {
            log!(Level::Warn, "cluster: reload failed: {problem}; trying again in 500 ms");
            return;
        }
        let addresses: Vec<Bytes> = self.placements.keys().cloned().collect();
        for address in addresses {
            self.tell_shard_placed(&address);
        }
        self.replace_orphans().await;
    }

    /// Sends a keep-alive and waits (bounded) for its answer.
    async fn renew(&mut self) {
        let Some(client) = self.client.clone() else { return };
        let op_timeout = self.op_timeout;
        let Some(lease) = self.lease.as_mut() else { return };
        if lease.keeper.is_none() {
            let mut client = client;
            match Self::bounded(op_timeout, client.lease_keep_alive(lease.id)).await {
                Ok(keeper) => lease.keeper = Some(keeper),
                Err(problem) => {
                    log!(Level::Warn, "cluster: cannot renew the lease: {problem}");
                    return;
                }
            }
        }
        let Some((keeper, stream)) = lease.keeper.as_mut() else { return };
        let sent_at = Instant::now();
        let answer = tokio::time::timeout(op_timeout, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(response))) if response.ttl() > 0 => lease.renewed_sent_at = sent_at,
            Ok(Ok(Some(_))) => {
                log!(Level::Warn, "cluster: etcd says the lease {:x} has expired", lease.id);
                lease.renewed_sent_at = Instant::now() - lease.ttl;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                let why = match answer {
                    Err(_) => format!("no answer within {} ms", op_timeout.as_millis()),
                    Ok(Err(error)) => error.to_string(),
                    _ => "the keep-alive stream closed".into(),
                };
                log!(Level::Warn, "cluster: lease renewal failed: {why}");
                lease.keeper = None;
            }
        }
    }

    /// Fences this node if its lease may be about to expire (see the module doc).
    fn check_fence(&mut self, now: Instant) {
        let Some(lease) = &self.lease else { return };
        if !self.serving {
            return;
        }
        let silent = now.saturating_duration_since(lease.renewed_sent_at);
        if silent < lease.ttl * 3 / 4 {
            return;
        }
        let reason = format!(
            "its lease at etcd was not renewed for {} ms (ttl {} ms)",
            silent.as_millis(),
            lease.ttl.as_millis()
        );
        log!(
            Level::Warn,
            "cluster \"{}\": node \"{}\" fenced: {reason}; it stops serving its addresses (SENDs and SUBSCRIBEs get \
             4421, subscriptions end) until it registers again",
            self.settings.cluster,
            self.settings.node
        );
        self.serving = false;
        self.fenced = true;
        self.previous_lease = self.lease.take().map(|lease| lease.id);
        self.watch = None;
        self.tell_every_shard(|| ClusterUpdate::Fenced { reason: reason.clone() });
    }

    /// Requests past their deadline are refused (their commands get 4421 with the reason).
    fn expire_waiting(&mut self, now: Instant) {
        let (expired, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(_, at)| *at <= now);
        self.waiting = kept;
        for (request, _) in expired {
            let reason = format!(
                "node \"{}\" is not registered in the cluster (etcd unreachable at {}) after {} ms",
                self.settings.node,
                self.settings.endpoints.join(","),
                placement_timeout(self.settings.lease).as_millis()
            );
            self.post(request.shard, ClusterUpdate::Unplaced { address: request.address, reason });
        }
    }

    /// Answers a shard's request: the known placement, or a new one by transaction.
    async fn place(&mut self, request: PlacementRequest) {
        if self.placements.contains_key(&request.address) {
            self.tell_shard_placed(&request.address);
            return;
        }
        if !self.serving {
            self.waiting.push((request, Instant::now() + placement_timeout(self.settings.lease)));
            return;
        }
        let Some(owner) = least_loaded(self.nodes.keys(), self.placements.values().map(|placed| &placed.record.owner))
        else {
            self.waiting.push((request, Instant::now() + placement_timeout(self.settings.lease)));
            return;
        };
        let record = PlacementRecord { owner, durable: self.settings.is_durable(&request.address) };
        let key = self.address_key(&request.address);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), serde_json::to_vec(&record).expect("serializes"), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.client.clone().expect("serving means connected");
        match Self::bounded(self.op_timeout, client.txn(txn)).await {
            Ok(response) => {
                let placed = if response.succeeded() {
                    let revision = response.header().map_or(0, |header| header.revision());
                    log!(
                        Level::Info,
                        "cluster: placed address \"{}\" on node \"{}\" (least loaded of {} live nodes)",
                        String::from_utf8_lossy(&request.address),
                        record.owner,
                        self.nodes.len()
                    );
                    Some(Placed { record, mod_revision: revision })
                } else {
                    // Another node placed it first: its choice holds.
                    response.op_responses().into_iter().find_map(|op| match op {
                        TxnOpResponse::Get(get) => get.kvs().first().and_then(|kv| {
                            let record = serde_json::from_slice::<PlacementRecord>(kv.value()).ok()?;
                            Some(Placed { record, mod_revision: kv.mod_revision() })
                        }),
                        _ => None,
                    })
                };
                match placed {
                    Some(placed) => {
                        self.learn(request.address.clone(), placed);
                    }
                    None => self.post(
                        request.shard,
                        ClusterUpdate::Unplaced {
                            address: request.address,
                            reason: "etcd answered the placement without a record".into(),
                        },
                    ),
                }
            }
            Err(problem) => {
                log!(
                    Level::Warn,
                    "cluster: placing \"{}\" failed: {problem}",
                    String::from_utf8_lossy(&request.address)
                );
                self.waiting.push((request, Instant::now() + placement_timeout(self.settings.lease)));
            }
        }
    }

    /// Records a placement if it is newer than the one known, and tells its shard.
    fn learn(&mut self, address: Bytes, placed: Placed) {
        let newer = self.placements.get(&address).is_none_or(|known| known.mod_revision < placed.mod_revision);
        if newer {
            self.placements.insert(address.clone(), placed);
        }
        self.tell_shard_placed(&address);
    }

    async fn on_watch(&mut self, response: etcd_client::WatchResponse) {
        if response.canceled() {
            self.watch = None;
            return;
        }
        let nodes_prefix = format!("{}nodes/", self.prefix).into_bytes();
        let addresses_prefix = format!("{}addresses/", self.prefix).into_bytes();
        let mut lost_nodes = Vec::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if let Some(node) = kv.key().strip_prefix(nodes_prefix.as_slice()) {
                let node = String::from_utf8_lossy(node).into_owned();
                match event.event_type() {
                    EventType::Put => {
                        if let Ok(record) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                            if self.nodes.insert(node.clone(), record.clone()).is_none() {
                                log!(
                                    Level::Info,
                                    "cluster: node \"{node}\" joined ({}); {} live nodes",
                                    record.url,
                                    self.nodes.len()
                                );
                                // Its durable addresses are served again: shards learn its URL.
                                self.tell_placements_of(&node);
                            }
                        }
                    }
                    EventType::Delete => {
                        if self.nodes.remove(&node).is_some() {
                            log!(
                                Level::Warn,
                                "cluster: node \"{node}\" left (its lease expired or it stopped); {} live nodes",
                                self.nodes.len()
                            );
                            lost_nodes.push(node);
                        }
                    }
                }
            } else if let Some(address) = kv.key().strip_prefix(addresses_prefix.as_slice()) {
                let address = Bytes::copy_from_slice(address);
                match event.event_type() {
                    EventType::Put => {
                        if let Ok(record) = serde_json::from_slice::<PlacementRecord>(kv.value()) {
                            self.learn(address, Placed { record, mod_revision: kv.mod_revision() });
                        }
                    }
                    EventType::Delete => {
                        self.placements.remove(&address);
                    }
                }
            }
        }
        if !lost_nodes.is_empty() {
            self.replace_orphans().await;
        }
    }

    /// Re-places every non-durable address whose owner is not a live node (one transaction
    /// per address, comparing its mod-revision: exactly one node's succeeds).
    async fn replace_orphans(&mut self) {
        if !self.serving {
            return;
        }
        let orphans: Vec<(Bytes, Placed)> = self
            .placements
            .iter()
            .filter(|(_, placed)| !placed.record.durable && !self.nodes.contains_key(&placed.record.owner))
            .map(|(address, placed)| (address.clone(), placed.clone()))
            .collect();
        for (address, old) in orphans {
            let Some(owner) =
                least_loaded(self.nodes.keys(), self.placements.values().map(|placed| &placed.record.owner))
            else {
                return;
            };
            let record = PlacementRecord { owner, durable: false };
            let key = self.address_key(&address);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, old.mod_revision)])
                .and_then([TxnOp::put(key.clone(), serde_json::to_vec(&record).expect("serializes"), None)]);
            let Some(mut client) = self.client.clone() else { return };
            match Self::bounded(self.op_timeout, client.txn(txn)).await {
                Ok(response) if response.succeeded() => {
                    let revision = response.header().map_or(0, |header| header.revision());
                    log!(
                        Level::Info,
                        "cluster: re-placed address \"{}\" from lost node \"{}\" on node \"{}\"",
                        String::from_utf8_lossy(&address),
                        old.record.owner,
                        record.owner
                    );
                    self.learn(address, Placed { record, mod_revision: revision });
                }
                // Another node re-placed it first: the watch brings its choice.
                Ok(_) => {}
                Err(problem) => {
                    log!(Level::Warn, "cluster: re-placing \"{}\" failed: {problem}", String::from_utf8_lossy(&address))
                }
            }
        }
    }

    /// An operator's move (admin API): `owner` must be a live node.
    async fn move_address(&mut self, address: Bytes, owner: String) -> Result<String, String> {
        if !self.serving {
            return Err(format!(
                "node \"{}\" is not serving (fenced or not registered); ask another node",
                self.settings.node
            ));
        }
        if !self.nodes.contains_key(&owner) {
            let live = self.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(format!("no live node \"{owner}\" in the cluster; live nodes: {live}"));
        }
        let record = PlacementRecord { owner: owner.clone(), durable: self.settings.is_durable(&address) };
        let key = self.address_key(&address);
        let mut client = self.client.clone().ok_or("not connected to etcd")?;
        let put =
            Self::bounded(self.op_timeout, client.put(key, serde_json::to_vec(&record).expect("serializes"), None))
                .await?;
        let revision = put.header().map_or(0, |header| header.revision());
        log!(
            Level::Info,
            "cluster: address \"{}\" moved to node \"{owner}\" by an operator",
            String::from_utf8_lossy(&address)
        );
        self.learn(address.clone(), Placed { record, mod_revision: revision });
        Ok(format!("address \"{}\" is owned by node \"{owner}\"", String::from_utf8_lossy(&address)))
    }

    fn owner_for_shards(&self, owner: &str) -> Owner {
        if owner == self.settings.node {
            return Owner::Local;
        }
        let url = self.nodes.get(owner).map_or_else(|| "not live now".to_string(), |node| node.url.clone());
        Owner::Remote(Arc::new(NodeRef::new(owner.to_string(), url)))
    }

    fn tell_shard_placed(&self, address: &Bytes) {
        if self.fenced {
            return;
        }
        let Some(placed) = self.placements.get(address) else { return };
        let owner = self.owner_for_shards(&placed.record.owner);
        let shard = owner_of(address, self.settings.shards);
        self.post(shard, ClusterUpdate::Placed { address: address.clone(), owner });
    }

    fn tell_placements_of(&self, node: &str) {
        for (address, placed) in &self.placements {
            if placed.record.owner == node {
                self.tell_shard_placed(address);
            }
        }
    }

    fn post(&self, shard: ShardId, update: ClusterUpdate) {
        self.post_office.post(shard, Envelope::Cluster(update));
    }

    fn tell_every_shard(&self, update: impl Fn() -> ClusterUpdate) {
        for shard in 0..self.post_office.shard_count() {
            self.post(ShardId(shard as u16), update());
        }
    }

    /// What `GET /api/cluster` shows.
    /// The node's view for `GET /metrics` ([`super::metrics::NodeView`]); `owned`: the addresses
    /// placed on this node.
    fn publish_metrics(&self, owned: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let view = super::metrics::node_view();
        view.live_nodes.store(self.nodes.len() as u64, Relaxed);
        view.fenced.store(self.fenced, Relaxed);
        view.serving.store(self.serving, Relaxed);
        let (renewed_at, ttl) = match &self.lease {
            Some(lease) => {
                let age = lease.renewed_sent_at.elapsed().as_millis() as u64;
                (crate::clock::now_ms().saturating_sub(age), lease.ttl.as_millis() as u64)
            }
            None => (u64::MAX, 0),
        };
        view.lease_renewed_at_ms.store(renewed_at, Relaxed);
        view.lease_ttl_ms.store(ttl, Relaxed);
        view.addresses_owned.store(owned as u64, Relaxed);
        view.addresses_placed.store(self.placements.len() as u64, Relaxed);
        view.started.store(true, Relaxed);
    }

    fn publish_status(&self) {
        let state = if self.serving {
            "serving"
        } else if self.fenced {
            "fenced"
        } else {
            "joining"
        };
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for placed in self.placements.values() {
            *load.entry(placed.record.owner.as_str()).or_default() += 1;
        }
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|(name, record)| {
                serde_json::json!({"name": name, "url": record.url, "shards": record.shards,
                    "addresses": load.get(name.as_str()).copied().unwrap_or(0)})
            })
            .collect();
        let addresses: Vec<_> = self
            .placements
            .iter()
            .take(MAX_LISTED_PLACEMENTS)
            .map(|(address, placed)| {
                serde_json::json!({"name": String::from_utf8_lossy(address), "owner": placed.record.owner,
                    "durable": placed.record.durable, "owner_live": self.nodes.contains_key(&placed.record.owner)})
            })
            .collect();
        let lease = self.lease.as_ref().map(|lease| {
            serde_json::json!({"id": format!("{:x}", lease.id), "ttl_ms": lease.ttl.as_millis() as u64,
                "renewed_ms_ago": lease.renewed_sent_at.elapsed().as_millis() as u64})
        });
        self.publish_metrics(load.get(self.settings.node.as_str()).copied().unwrap_or(0));
        let status = serde_json::json!({
            "cluster": self.settings.cluster,
            "node": self.settings.node,
            "url": self.settings.url,
            "state": state,
            "lease": lease,
            "nodes": nodes,
            "address_count": self.placements.len(),
            "addresses": addresses,
        });
        if let Ok(mut shared) = self.status.lock() {
            *shared = status;
        }
    }
}

/// The watch's next message, or never when there is no watch.
async fn next_watch_message(
    watch: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match watch {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_live_node_wins_and_ties_go_by_name() {
        let nodes = ["b".to_string(), "a".to_string(), "c".to_string()];
        let owners = ["a".to_string(), "a".to_string(), "b".to_string(), "gone".to_string()];
        assert_eq!(least_loaded(nodes.iter(), owners.iter()).as_deref(), Some("c"));
        assert_eq!(least_loaded(nodes.iter(), owners[..0].iter()).as_deref(), Some("a"));
        assert_eq!(least_loaded([].iter(), owners.iter()), None);
    }
}
