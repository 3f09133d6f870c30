//! The cluster's figures for `GET /metrics` (the `mbws_cluster_*` families, docs/OPERATIONS.md):
//! plain atomics, written where the work happens and read only by a scrape.
//!
//! - [`NodeView`]: this node's view of the cluster, set by the control-plane thread each time
//!   round its loop (live nodes, fenced or not, the lease's last renewal, addresses owned here).
//! - [`OwnerCounters`]: per owner node, what this node forwarded to it and relayed from it. One
//!   set per node name, shared by every [`NodeRef`](super::view::NodeRef) of that name (the
//!   control plane makes the `NodeRef`s, and takes the registry's lock only then); the
//!   forwarders, the relays and the placement views add to it through the `NodeRef` they hold,
//!   so the message path takes no lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

/// What this node did for the addresses of one owner node (counters since start).
#[derive(Debug, Default)]
pub struct OwnerCounters {
    /// SENDs forwarded to the owner and receipted by it.
    pub sends_forwarded: AtomicU64,
    /// SENDs for the owner's addresses answered with an error here: the owner's own refusal,
    /// the owner unreachable (4503), the forwarder's queue full (4429).
    pub sends_refused: AtomicU64,
    /// Relayed subscriptions opened to the owner, and those ended since; the difference is the
    /// gauge of those open.
    pub relays_opened: AtomicU64,
    pub relays_closed: AtomicU64,
    /// MESSAGEs of relayed subscriptions brought from the owner to consumers here.
    pub deliveries_relayed: AtomicU64,
}

impl OwnerCounters {
    pub fn forwarded(&self, count: u64) {
        self.sends_forwarded.fetch_add(count, Relaxed);
    }

    pub fn refused(&self, count: u64) {
        self.sends_refused.fetch_add(count, Relaxed);
    }

    pub fn relay_opened(&self) {
        self.relays_opened.fetch_add(1, Relaxed);
    }

    pub fn relays_closed(&self, count: u64) {
        self.relays_closed.fetch_add(count, Relaxed);
    }

    pub fn relayed(&self, count: u64) {
        self.deliveries_relayed.fetch_add(count, Relaxed);
    }

    /// Relayed subscriptions open now (opened minus closed; never below 0 while a close is
    /// counted just before its open is seen).
    pub fn relays_open(&self) -> u64 {
        let closed = self.relays_closed.load(Relaxed);
        self.relays_opened.load(Relaxed).saturating_sub(closed)
    }
}

/// The counters of every owner node this process has known, by name. One entry per node name
/// ever placed on: bounded by the cluster's membership over the process's life.
fn registry() -> &'static Mutex<BTreeMap<String, Arc<OwnerCounters>>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<String, Arc<OwnerCounters>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The counters of owner node `name` (made on first use).
pub fn owner_counters(name: &str) -> Arc<OwnerCounters> {
    let mut registry = registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.entry(name.to_string()).or_default().clone()
}

/// Every owner node's counters, by name.
pub fn owners() -> Vec<(String, Arc<OwnerCounters>)> {
    let registry = registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.iter().map(|(name, counters)| (name.clone(), counters.clone())).collect()
}

/// This node's view of the cluster, as the control plane last saw it.
#[derive(Debug, Default)]
pub struct NodeView {
    /// Set once the control plane runs (a scrape of a node that is not in a cluster shows no
    /// `mbws_cluster_*` family).
    pub started: AtomicBool,
    /// Nodes registered in etcd (this one included once registered).
    pub live_nodes: AtomicU64,
    /// Fenced: the lease could not be renewed in time; nothing is served until it joins again.
    pub fenced: AtomicBool,
    /// Serving: registered, placement loaded, shards told (false while joining and fenced).
    pub serving: AtomicBool,
    /// When the last renewal etcd answered was sent ([`crate::clock::now_ms`]); `u64::MAX`
    /// without a lease.
    pub lease_renewed_at_ms: AtomicU64,
    pub lease_ttl_ms: AtomicU64,
    /// Addresses placed on this node, and on any node.
    pub addresses_owned: AtomicU64,
    pub addresses_placed: AtomicU64,
}

/// The one node view of this process.
pub fn node_view() -> &'static NodeView {
    static VIEW: OnceLock<NodeView> = OnceLock::new();
    VIEW.get_or_init(|| NodeView { lease_renewed_at_ms: AtomicU64::new(u64::MAX), ..NodeView::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_of_the_same_name_share_their_counters() {
        let first = owner_counters("metrics-test-node");
        first.forwarded(3);
        first.relay_opened();
        first.relay_opened();
        owner_counters("metrics-test-node").relays_closed(1);
        let listed = owners().into_iter().find(|(name, _)| name == "metrics-test-node").unwrap().1;
        assert_eq!(listed.sends_forwarded.load(Relaxed), 3);
        assert_eq!(listed.relays_open(), 1);
    }
}
