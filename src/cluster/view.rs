//! A shard's view of the cluster's placement: which node serves each address hashed to this
//! shard, fed by the control-plane thread through the shard's inbox, read on the message path
//! without ever waiting for etcd.
//!
//! [`PlacementView::admit`] sees each SEND and SUBSCRIBE before the address table does:
//! - [`Owner::Local`]: the command runs here, as in a single broker;
//! - [`Owner::Remote`]: a SEND is handed on as a [`Forward::Send`] (taken by the shard's IO
//!   shell, which gives it to the forwarder of that node, [`crate::cluster::forward`]; the
//!   client's answer comes back later as the owner's), a SUBSCRIBE as a [`Forward::Subscribe`]
//!   (to the relay of that node, [`crate::cluster::relay`]), and the view then remembers the
//!   relayed subscription by consumer and subscription id, so that its ACK, NACK, FLOW,
//!   written auto-ack deliveries and UNSUBSCRIBE, and its consumer's end, go the same way as
//!   [`Forward::Settle`]; a SEND that was forwarded already (it came over a cluster link:
//!   a session whose upgrade carried [`LINK_HEADER`]) and a
//!   SUBSCRIBE a relay made (its id has [`RELAYED_SUBSCRIPTION_BIT`]) are refused with
//!   non-fatal 4421 naming the owner node and its URL (one hop at most). When the address
//!   of a relayed subscription is placed on another node (a move, a dead node's address
//!   re-placed), the view asks its relay to end it at once with 4421 naming the new owner
//!   ([`Forward::End`]): the old owner may be unable to say so itself;
//!   A *multicast* SUBSCRIBE is not relayed on its own: the address's **feed**, one relayed
//!   subscription per node (opened by the first local subscriber, credit [`FEED_CREDIT`],
//!   settled by this node once fanned out), feeds the address's local fan-out in this shard's
//!   address table, where every local multicast subscriber is an ordinary subscription with its
//!   own credit, backlog bound (4429) and binding. SUBSCRIBEs wait for the feed's SUBSCRIBED
//!   (at most [`MAX_WAITING_COMMANDS`] per address), then join the table; the last local one
//!   leaving unsubscribes the feed at the owner; whatever ends the feed (the owner's ERROR,
//!   4503, the relay's 4429, fencing, a move) ends every local subscriber of it. The relay
//!   knows a feed by its consumer, [`FEED_CONN`] (docs/CLUSTER.md, "Multicast: one relayed
//!   subscription per node");
//! - not placed yet: the command waits here, and the first one asks the control plane to place
//!   the address ([`PlacementRequest`]). Bounded in count ([`MAX_WAITING_COMMANDS`] per
//!   shard; beyond: 4429) and in time (the control plane answers every request, with a
//!   placement or a [`ClusterUpdate::Unplaced`] refusal, within its placement timeout);
//! - fenced (this node could not renew its lease in time): refused with 4421; the subscriptions
//!   it served end with that 4421, its relayed ones too: the view asks their relays to end them
//!   ([`Forward::End`], as for a move), and each relay unsubscribes them at their owner.
//!
//! Sans-IO: updates come in as [`ClusterUpdate`]s, refusals go out as the address table's
//! answers ([`Outgoing`]), released commands go back to the caller's work queue in order.
//! Other address commands (ACK, FLOW, UNSUBSCRIBE...) are never held: they concern a
//! subscription that was admitted (here, or relayed).
//!
//! Invariant: an address is either placed (in `owners`) or has waiting commands, never both;
//! the waiting count is the sum of the waiting lists and never exceeds the bound. A relayed
//! subscription is remembered from its SUBSCRIBE until its UNSUBSCRIBE, its consumer's end,
//! a new SUBSCRIBE with its id, or the relay's word that it ended
//! ([`ClusterUpdate::RelayEnded`]): at most the consumer's `max_subscriptions` per consumer.

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::address::{AddressTable, Outgoing};
use crate::broker::{
    AddressCommand, ConnCommand, ConnId, ConnRef, FastMap, Refusal, ShardId, SharedMessage, SubscriptionId,
};
use crate::mbws::{AckMode, DeliveryMode, ErrorCode};

/// Most SENDs and SUBSCRIBEs one shard keeps waiting for their addresses' placement; beyond,
/// they are refused with 4429 (the control plane is slow or etcd unreachable).
pub const MAX_WAITING_COMMANDS: usize = 4096;

/// The header field of the upgrade request by which a cluster node's forwarders and relays
/// say their session is a cluster link (any value; they send `1`). A SEND on such a session
/// is marked as forwarded already
/// ([`StoredMessage::from_cluster_link`](crate::broker::StoredMessage::from_cluster_link)): a node that does not own its address
/// refuses it (4421) instead of forwarding it again, so a SEND crosses at most one hop even
/// while two nodes' placements disagree for a moment. The message itself is not touched:
/// consumers get what the publisher sent. Claiming to be a link grants nothing (a client that
/// does only loses forwarding; its credentials still decide what it may do; docs/SECURITY.md).
pub const LINK_HEADER: &str = "X-MBWS-Cluster-Link";

/// The subscription ids a relay uses at the owner have this bit set (it numbers them from
/// 2^31); a node never relays such a SUBSCRIBE again but refuses it with 4421, so a
/// subscription crosses at most one hop even while two nodes' placements disagree. A client's
/// own SUBSCRIBE with such an id to an address of another node is refused the same way.
pub const RELAYED_SUBSCRIPTION_BIT: u32 = 1 << 31;

/// The connection a node's *feed* stands for: the one relayed subscription that feeds a multicast
/// address owned by another node to every local subscriber of it (see [`PlacementView`]'s
/// "Multicast"). Its subscription id is its ticket's low 32 bits. No session has this id.
pub const FEED_CONN: ConnId = ConnId { index: u32::MAX, generation: u32::MAX };

/// A feed's credit at the owner: the relayed messages the node has not fanned out yet (in the
/// relay, and in the shard's inbox) are at most this many.
pub const FEED_CREDIT: u32 = 8192;

/// A command for an address another node owns, handed from the shard's core to its IO shell
/// ([`PlacementView::take_forwards`]).
#[derive(Debug)]
pub enum Forward {
    /// A SEND, for the owner's forwarder; the owner's answer goes back to `publisher` as its
    /// `PublishDone`.
    Send { owner: Arc<NodeRef>, publisher: ConnRef, seq: u64, message: SharedMessage },
    /// An [`AddressCommand::Subscribe`], for the owner's relay, which answers the consumer's
    /// `SubscribeDone` and then delivers. `ticket` names this relayed subscription in
    /// [`ClusterUpdate::RelayEnded`].
    Subscribe { owner: Arc<NodeRef>, ticket: u64, command: AddressCommand },
    /// What concerns relayed subscriptions: an `Ack`, `Nack`, `SetCredit`, `ReturnCredit`
    /// (auto-ack deliveries written) or `Unsubscribe` of one, or a `ConsumerGone`.
    Settle { owner: Arc<NodeRef>, command: AddressCommand },
    /// The relayed subscription `ticket` of `consumer` must end with `refusal` (its address was
    /// placed on another node, or this node is fenced): its relay, which alone decides when a relayed subscription
    /// ends, ends it once (unless it ended already), tells the consumer and the view
    /// ([`ClusterUpdate::RelayEnded`]), and unsubscribes it at `owner`.
    End { owner: Arc<NodeRef>, consumer: ConnRef, subscription: SubscriptionId, ticket: u64, refusal: Refusal },
}

/// A node of the cluster as the shards name it in refusals. Equal and hashed by name and URL.
#[derive(Debug, Clone)]
pub struct NodeRef {
    pub name: String,
    /// The `ws://` URL its clients and peers connect to (`--advertise-url`).
    pub url: String,
    /// What this node forwarded to and relayed from that one (`mbws_cluster_*` metrics), shared
    /// by every `NodeRef` of the name.
    pub counters: Arc<super::metrics::OwnerCounters>,
}

impl NodeRef {
    pub fn new(name: String, url: String) -> NodeRef {
        let counters = super::metrics::owner_counters(&name);
        NodeRef { name, url, counters }
    }
}

impl PartialEq for NodeRef {
    fn eq(&self, other: &NodeRef) -> bool {
        self.name == other.name && self.url == other.url
    }
}

impl Eq for NodeRef {}

impl std::hash::Hash for NodeRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.url.hash(state);
    }
}

/// Who serves an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    Remote(Arc<NodeRef>),
}

/// What a shard asks the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRequest {
    pub address: Bytes,
    /// The shard to answer (the one `owner_of(address)` names).
    pub shard: ShardId,
}

/// Where the control plane's requests go (an unbounded tokio channel, sendable from any
/// thread without a runtime; what is in it is bounded by [`MAX_WAITING_COMMANDS`] per shard,
/// one request per waiting address).
pub type RequestSender = tokio::sync::mpsc::UnboundedSender<PlacementRequest>;

/// What the control plane tells a shard.
#[derive(Debug)]
pub enum ClusterUpdate {
    /// The control plane's request channel: requests made before it came are sent now.
    Attach(RequestSender),
    /// `address` is placed on `owner` (first placement, a move, or a re-placement).
    Placed { address: Bytes, owner: Owner },
    /// `address` could not be placed in time: its waiting commands are refused with `reason`.
    Unplaced { address: Bytes, reason: String },
    /// This node cannot prove it owns anything (its lease was not renewed in time): refuse,
    /// end local and relayed subscriptions, forget every placement until
    /// [`ClusterUpdate::Unfenced`].
    Fenced { reason: String },
    /// The node holds a lease again; placements follow as [`ClusterUpdate::Placed`].
    Unfenced,
    /// The owner confirmed the feed `ticket` (its SUBSCRIBED): the local SUBSCRIBEs that wait
    /// for it join the address's local fan-out.
    FeedConfirmed { ticket: u64 },
    /// Messages of the feed `ticket`, in the owner's order: fanned out to the address's local
    /// multicast subscribers, then settled at the owner (their credit goes back to the feed).
    Fed { ticket: u64, messages: Vec<SharedMessage> },
    /// The feed `ticket` was refused or ended by its owner, or its relay ended it (owner
    /// unreachable: 4503; its queue full: 4429): every local subscriber of the address ends
    /// with `refusal` (the relay has forgotten the feed already).
    FeedEnded { ticket: u64, refusal: Refusal },
    /// The relay ended the relayed subscription `ticket` (0: whichever has this id) on its own
    /// (refused or ended by the owner, owner unreachable, its queue full) and told its
    /// consumer: forget it.
    RelayEnded { consumer: ConnRef, subscription: SubscriptionId, ticket: u64 },
}

/// Counters of what the view decided, for the admin API and the logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ViewCounters {
    pub refused_remote: u64,
    /// SENDs handed on to their owner's forwarder.
    pub forwarded: u64,
    /// SUBSCRIBEs handed on to their owner's relay.
    pub relayed: u64,
    pub refused_fenced: u64,
    pub waited: u64,
    pub subscriptions_ended: u64,
}

/// One shard's placement view (see the module doc).
#[derive(Debug)]
pub struct PlacementView {
    owners: FastMap<Bytes, Owner>,
    waiting: FastMap<Bytes, Vec<AddressCommand>>,
    waiting_count: usize,
    requests: Option<RequestSender>,
    /// Addresses asked for before the request channel was attached.
    unsent: Vec<Bytes>,
    fenced: Option<String>,
    shard: ShardId,
    /// SENDs and relayed subscriptions' commands to forward, until the shell takes them.
    forwards: Vec<Forward>,
    /// The relayed subscriptions, by consumer.
    relayed: FastMap<ConnRef, Vec<RelayedEntry>>,
    /// The feeds of multicast addresses another node owns, by address.
    feeds: FastMap<Bytes, Feed>,
    /// The address of each feed, by its ticket's low 32 bits (its subscription id at the relay).
    feed_addresses: FastMap<u32, Bytes>,
    /// The local subscriptions to fed addresses (joined, or waiting for their feed), by
    /// consumer: so that their UNSUBSCRIBE and their consumer's end can close the feed when
    /// the last one leaves. At most the consumer's `max_subscriptions` each; an entry may
    /// outlive its subscription (ended by the table as slow, or by its feed's end) until the
    /// consumer unsubscribes or goes.
    fed_subscriptions: FastMap<ConnRef, Vec<(SubscriptionId, Bytes)>>,
    next_ticket: u64,
    pub counters: ViewCounters,
}

/// A node's one relayed subscription to a multicast address another node owns, which feeds
/// the address's local fan-out (see the module doc).
#[derive(Debug)]
struct Feed {
    owner: Arc<NodeRef>,
    ticket: u64,
    /// The owner's SUBSCRIBED came: local SUBSCRIBEs join the table at once.
    confirmed: bool,
    /// Local SUBSCRIBEs waiting for the owner's SUBSCRIBED, in order (at most
    /// [`MAX_WAITING_COMMANDS`]).
    waiting: Vec<AddressCommand>,
}

/// A relayed subscription, as the view remembers it.
#[derive(Debug)]
struct RelayedEntry {
    subscription: SubscriptionId,
    owner: Arc<NodeRef>,
    /// Names it in [`ClusterUpdate::RelayEnded`].
    ticket: u64,
    /// For the refusal that ends it when this node is fenced.
    address: Bytes,
    /// Its relay was asked to end it (its address moved, or this node is fenced): remembered
    /// until the relay's word.
    ending: bool,
}

/// The address a command must be placed for: SEND and SUBSCRIBE only.
fn gated_address(command: &AddressCommand) -> Option<&[u8]> {
    match command {
        AddressCommand::Publish { message, .. } => Some(message.address()),
        AddressCommand::Subscribe { address, .. } => Some(address),
        _ => None,
    }
}

/// Answers a gated command with `refusal` (a SEND's PublishDone, a SUBSCRIBE's SubscribeDone).
fn refuse(command: AddressCommand, refusal: Refusal, out: &mut Vec<Outgoing>) {
    match command {
        AddressCommand::Publish { publisher, seq, .. } => out.push((
            publisher.shard,
            ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Err(refusal) },
        )),
        AddressCommand::Subscribe { consumer, subscription, .. } => out.push((
            consumer.shard,
            ConnCommand::SubscribeDone { consumer: consumer.conn, subscription, outcome: Err(refusal) },
        )),
        other => unreachable!("only SEND and SUBSCRIBE are gated, not {other:?}"),
    }
}

/// Whether a node forwarded `message` here already (it came over a cluster link, [`LINK_HEADER`]).
fn was_forwarded(message: &SharedMessage) -> bool {
    message.from_cluster_link
}

fn name(address: &[u8]) -> String {
    String::from_utf8_lossy(address).into_owned()
}

/// The 4421 that ends a subscription relayed (or fed) from another node when its address is
/// placed on `owner` now (a move, or the re-placement of a dead node's address).
fn moved_refusal(address: &[u8], owner: &Owner) -> Refusal {
    match owner {
        Owner::Remote(node) => remote_refusal(address, node),
        Owner::Local => Refusal::new(
            ErrorCode::Misdirected,
            format!("address \"{}\" moved to this cluster node: subscribe again", name(address)),
        ),
    }
}

/// The 4421 refusal of an address another node owns.
pub fn remote_refusal(address: &[u8], owner: &NodeRef) -> Refusal {
    Refusal::new(
        ErrorCode::Misdirected,
        format!(
            "address \"{}\" is owned by cluster node \"{}\" ({}): connect there, or subscribe again \
             (a SEND or a SUBSCRIBE crosses one hop between nodes at most; docs/CLUSTER.md)",
            name(address),
            owner.name,
            owner.url
        ),
    )
}

fn fenced_refusal(address: &[u8], reason: &str) -> Refusal {
    Refusal::new(
        ErrorCode::Misdirected,
        format!(
            "address \"{}\" is not served: this cluster node is fenced ({reason}) and cannot prove it owns the \
             address; connect to another node of the cluster",
            name(address)
        ),
    )
}

impl PlacementView {
    pub fn new(shard: ShardId) -> PlacementView {
        PlacementView {
            owners: FastMap::default(),
            waiting: FastMap::default(),
            waiting_count: 0,
            requests: None,
            unsent: Vec::new(),
            fenced: None,
            shard,
            forwards: Vec::new(),
            relayed: FastMap::default(),
            feeds: FastMap::default(),
            feed_addresses: FastMap::default(),
            fed_subscriptions: FastMap::default(),
            next_ticket: 0,
            counters: ViewCounters::default(),
        }
    }

    /// Who serves `address`, if placed (`None`: not placed yet, or fenced).
    pub fn owner_of(&self, address: &[u8]) -> Option<&Owner> {
        if self.fenced.is_some() {
            return None;
        }
        self.owners.get(address)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_some()
    }

    /// Commands waiting for a placement on this shard.
    pub fn waiting_count(&self) -> usize {
        self.waiting_count
    }

    /// `Some(command)` if it runs here now; otherwise it was refused (into `out`) or is kept
    /// until its address is placed.
    /// `table` is the shard's address table, for the local fan-out of fed multicast addresses
    /// (a local subscriber's leave may close its address's feed).
    pub fn admit(
        &mut self,
        command: AddressCommand,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Option<AddressCommand> {
        let command = if self.relayed.is_empty() { command } else { self.settle_relayed(command)? };
        let command =
            if self.fed_subscriptions.is_empty() { command } else { self.leave_fed(command, table, now_ms, out)? };
        let Some(address) = gated_address(&command) else { return Some(command) };
        if let Some(reason) = &self.fenced {
            self.counters.refused_fenced += 1;
            let refusal = fenced_refusal(address, reason);
            refuse(command, refusal, out);
            return None;
        }
        match self.owners.get(address) {
            Some(Owner::Local) => Some(command),
            Some(Owner::Remote(owner)) => {
                let owner = owner.clone();
                self.for_remote_owner(command, &owner, table, now_ms, out)
            }
            None => {
                if self.waiting_count >= MAX_WAITING_COMMANDS {
                    let refusal = Refusal::new(
                        ErrorCode::Overloaded,
                        format!(
                            "address \"{}\" is not placed in the cluster yet and {MAX_WAITING_COMMANDS} SENDs and \
                             SUBSCRIBEs already wait for placements on this shard (etcd slow or unreachable); \
                             try again later",
                            name(address)
                        ),
                    );
                    refuse(command, refusal, out);
                    return None;
                }
                let address = Bytes::copy_from_slice(address);
                self.waiting_count += 1;
                self.counters.waited += 1;
                let list = self.waiting.entry(address.clone()).or_default();
                list.push(command);
                if list.len() == 1 {
                    self.ask(address);
                }
                None
            }
        }
    }

    /// A SEND or SUBSCRIBE for an address `owner` serves: a SEND not forwarded yet is kept
    /// for the shell as a [`Forward`]; a multicast SUBSCRIBE joins the address's feed (`Some`:
    /// it runs in the table now); the rest is refused with 4421 naming the owner.
    fn for_remote_owner(
        &mut self,
        command: AddressCommand,
        owner: &Arc<NodeRef>,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Option<AddressCommand> {
        match command {
            AddressCommand::Publish { publisher, seq, message } if !was_forwarded(&message) => {
                self.counters.forwarded += 1;
                self.forwards.push(Forward::Send { owner: owner.clone(), publisher, seq, message });
            }
            AddressCommand::Subscribe { subscription, mode: DeliveryMode::Multicast, .. }
                if subscription.0 & RELAYED_SUBSCRIPTION_BIT == 0 =>
            {
                return self.join_feed(command, owner, table, now_ms, out);
            }
            AddressCommand::Subscribe { consumer, subscription, ref address, .. }
                if subscription.0 & RELAYED_SUBSCRIPTION_BIT == 0 =>
            {
                self.counters.relayed += 1;
                self.next_ticket += 1;
                let ticket = self.next_ticket;
                owner.counters.relay_opened();
                let entry = RelayedEntry {
                    subscription,
                    owner: owner.clone(),
                    ticket,
                    address: address.clone(),
                    ending: false,
                };
                self.relayed.entry(consumer).or_default().push(entry);
                self.forwards.push(Forward::Subscribe { owner: owner.clone(), ticket, command });
            }
            command => {
                self.counters.refused_remote += 1;
                let refusal = remote_refusal(gated_address(&command).unwrap_or_default(), owner);
                refuse(command, refusal, out);
            }
        }
        None
    }

    /// A command that concerns a relayed subscription becomes a [`Forward::Settle`] (`None`);
    /// a `ConsumerGone` is also passed on to the table (`Some`), for the consumer's local
    /// subscriptions; a SUBSCRIBE reusing a relayed subscription's id makes the view forget
    /// the old one (its end had not reached the view yet). The rest passes unchanged.
    fn settle_relayed(&mut self, command: AddressCommand) -> Option<AddressCommand> {
        let (consumer, subscription) = match &command {
            AddressCommand::Ack { consumer, subscription, .. }
            | AddressCommand::Nack { consumer, subscription, .. }
            | AddressCommand::SetCredit { consumer, subscription, .. }
            | AddressCommand::ReturnCredit { consumer, subscription, .. }
            | AddressCommand::Unsubscribe { consumer, subscription }
            | AddressCommand::Subscribe { consumer, subscription, .. } => (*consumer, *subscription),
            AddressCommand::ConsumerGone { consumer } => {
                let Some(entries) = self.relayed.remove(consumer) else { return Some(command) };
                let mut owners: Vec<Arc<NodeRef>> = Vec::new();
                for RelayedEntry { owner, .. } in entries {
                    owner.counters.relays_closed(1);
                    if !owners.contains(&owner) {
                        owners.push(owner);
                    }
                }
                for owner in owners {
                    let command = AddressCommand::ConsumerGone { consumer: *consumer };
                    self.forwards.push(Forward::Settle { owner, command });
                }
                return Some(command);
            }
            AddressCommand::Publish { .. } => return Some(command),
        };
        let Some(entries) = self.relayed.get_mut(&consumer) else { return Some(command) };
        let Some(index) = entries.iter().position(|entry| entry.subscription == subscription) else {
            return Some(command);
        };
        let owner = entries[index].owner.clone();
        if matches!(command, AddressCommand::Subscribe { .. } | AddressCommand::Unsubscribe { .. }) {
            entries.swap_remove(index).owner.counters.relays_closed(1);
            if entries.is_empty() {
                self.relayed.remove(&consumer);
            }
            if matches!(command, AddressCommand::Subscribe { .. }) {
                return Some(command);
            }
        }
        self.forwards.push(Forward::Settle { owner, command });
        None
    }

    /// Relayed subscriptions remembered on this shard.
    pub fn relayed_count(&self) -> usize {
        self.relayed.values().map(Vec::len).sum()
    }

    /// Moves the commands to forward (see [`Forward`]) into `into`, in the order they came.
    pub fn take_forwards(&mut self, into: &mut Vec<Forward>) {
        into.append(&mut self.forwards);
    }

    fn ask(&mut self, address: Bytes) {
        match &self.requests {
            Some(requests) => {
                // A closed channel (the control plane is gone): the address stays unplaced and
                // its commands wait for `Unplaced`, which then never comes; the control plane
                // only stops with the process.
                let _ = requests.send(PlacementRequest { address, shard: self.shard });
            }
            None => self.unsent.push(address),
        }
    }

    /// Applies what the control plane says. Commands released to run here are appended to
    /// `released` in their order; refusals and subscription ends go to `out`.
    pub fn apply(
        &mut self,
        update: ClusterUpdate,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
        released: &mut Vec<AddressCommand>,
    ) {
        match update {
            ClusterUpdate::Attach(requests) => {
                for address in self.unsent.drain(..) {
                    let _ = requests.send(PlacementRequest { address, shard: self.shard });
                }
                self.requests = Some(requests);
            }
            ClusterUpdate::Placed { address, owner } => {
                if self.fenced.is_some() {
                    // Placements are re-sent in full after `Unfenced`.
                    return;
                }
                if let Owner::Remote(node) = &owner {
                    if self.owners.get(&address) == Some(&Owner::Local) {
                        let refusal = remote_refusal(&address, node);
                        self.end_subscriptions(&address, &refusal, table, now_ms, out);
                    }
                }
                if let Some(feed) = self.feeds.get(&address) {
                    if owner != Owner::Remote(feed.owner.clone()) {
                        let refusal = moved_refusal(&address, &owner);
                        self.end_feed(&address, &refusal, true, table, now_ms, out);
                    }
                }
                // Every relayed subscription names the owner its address has here (by node
                // name), so only a change of owner can leave one relayed to a node that no
                // longer owns it (a `Placed` is also re-sent unchanged: a reload, a node back).
                let moved_away = match (self.owners.get(&address), &owner) {
                    (Some(Owner::Remote(before)), Owner::Remote(now)) => before.name != now.name,
                    (Some(Owner::Remote(_)), Owner::Local) => true,
                    _ => false,
                };
                if moved_away {
                    self.end_relayed_elsewhere(&address, &owner);
                }
                self.owners.insert(address.clone(), owner.clone());
                for command in self.waiting.remove(&address).unwrap_or_default() {
                    self.waiting_count -= 1;
                    match &owner {
                        Owner::Local => released.push(command),
                        Owner::Remote(node) => {
                            if let Some(command) = self.for_remote_owner(command, node, table, now_ms, out) {
                                released.push(command);
                            }
                        }
                    }
                }
            }
            ClusterUpdate::Unplaced { address, reason } => {
                for command in self.waiting.remove(&address).unwrap_or_default() {
                    self.waiting_count -= 1;
                    let refusal = Refusal::new(
                        ErrorCode::Misdirected,
                        format!("address \"{}\" could not be placed in the cluster: {reason}", name(&address)),
                    );
                    refuse(command, refusal, out);
                }
            }
            ClusterUpdate::Fenced { reason } => {
                let local: Vec<Bytes> = self
                    .owners
                    .iter()
                    .filter(|(_, owner)| **owner == Owner::Local)
                    .map(|(address, _)| address.clone())
                    .collect();
                for address in local {
                    let refusal = fenced_refusal(&address, &reason);
                    self.end_subscriptions(&address, &refusal, table, now_ms, out);
                }
                self.end_relayed(&reason);
                let fed: Vec<Bytes> = self.feeds.keys().cloned().collect();
                for address in fed {
                    let refusal = fenced_refusal(&address, &reason);
                    self.end_feed(&address, &refusal, true, table, now_ms, out);
                }
                for (address, commands) in std::mem::take(&mut self.waiting) {
                    for command in commands {
                        self.counters.refused_fenced += 1;
                        refuse(command, fenced_refusal(&address, &reason), out);
                    }
                }
                self.waiting_count = 0;
                self.owners.clear();
                self.fenced = Some(reason);
            }
            ClusterUpdate::Unfenced => self.fenced = None,
            ClusterUpdate::FeedConfirmed { ticket } => self.feed_confirmed(ticket, table, now_ms, out),
            ClusterUpdate::Fed { ticket, messages } => self.fan_out(ticket, messages, table, now_ms, out),
            ClusterUpdate::FeedEnded { ticket, refusal } => {
                if let Some(address) = self.feed_addresses.get(&(ticket as u32)).cloned() {
                    self.end_feed(&address, &refusal, false, table, now_ms, out);
                }
            }
            ClusterUpdate::RelayEnded { consumer, subscription, ticket } => {
                if let Some(entries) = self.relayed.get_mut(&consumer) {
                    entries.retain(|entry| {
                        let ended = entry.subscription == subscription && (ticket == 0 || entry.ticket == ticket);
                        if ended {
                            entry.owner.counters.relays_closed(1);
                        }
                        !ended
                    });
                    if entries.is_empty() {
                        self.relayed.remove(&consumer);
                    }
                }
            }
        }
        debug_assert_eq!(self.waiting_count, self.waiting.values().map(Vec::len).sum::<usize>());
    }

    /// `address` moved from the node its relayed subscriptions name to `owner` (an operator's
    /// move, or a dead node's address re-placed): each of them must end, so that its
    /// consumer subscribes again, to the new owner, at once: the old owner may not be there to
    /// end it (dead, stopped or partitioned: its relay would end it with 4503 only after a
    /// PING's silence, [`super::relay::IDLE_TICK`] plus [`super::forward::WAIT_BOUND`]).
    fn end_relayed_elsewhere(&mut self, address: &[u8], owner: &Owner) {
        let refusal = moved_refusal(address, owner);
        self.ask_relays_to_end(|entry| entry.address.as_ref() == address, |_| refusal.clone());
    }

    /// Fencing: every relayed subscription ends with the fenced refusal, and its relay
    /// unsubscribes it at its owner (which gets back what the consumer had not acknowledged),
    /// so a fenced node delivers nothing more from the owners either. The consumer's session
    /// may subscribe again, and is refused while fenced.
    fn end_relayed(&mut self, reason: &str) {
        self.ask_relays_to_end(|_| true, |address| fenced_refusal(address, reason));
    }

    /// Asks the relays to end the relayed subscriptions `which` selects, each with its
    /// `refusal` ([`Forward::End`]), rather than ending them here: a relay may be ending the
    /// same subscription at the same moment (its owner's own 4421, or 4503), so it alone
    /// decides, the consumer hears of the end once, and a later SUBSCRIBE with the same id
    /// cannot be ended by a stale word. The view forgets each entry on its relay's
    /// [`ClusterUpdate::RelayEnded`], as for any end the relay decides; until then it is
    /// marked `ending` and never asked twice.
    fn ask_relays_to_end(&mut self, which: impl Fn(&RelayedEntry) -> bool, refusal: impl Fn(&[u8]) -> Refusal) {
        for (consumer, entries) in &mut self.relayed {
            for entry in entries {
                if entry.ending || !which(entry) {
                    continue;
                }
                entry.ending = true;
                self.counters.subscriptions_ended += 1;
                self.forwards.push(Forward::End {
                    owner: entry.owner.clone(),
                    consumer: *consumer,
                    subscription: entry.subscription,
                    ticket: entry.ticket,
                    refusal: refusal(&entry.address),
                });
            }
        }
    }

    /// The consumer a feed stands for at its relay, and its subscription id there.
    fn feed_key(&self, ticket: u64) -> (ConnRef, SubscriptionId) {
        (ConnRef { shard: self.shard, conn: FEED_CONN }, SubscriptionId(ticket as u32))
    }

    /// A local multicast SUBSCRIBE to an address `owner` serves: it runs in the table now
    /// (`Some`) if the address's feed is confirmed, or waits for the feed's SUBSCRIBED; the
    /// first one opens the feed (one relayed subscription for the node).
    fn join_feed(
        &mut self,
        command: AddressCommand,
        owner: &Arc<NodeRef>,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Option<AddressCommand> {
        let AddressCommand::Subscribe { consumer, subscription, address, .. } = &command else {
            unreachable!("only a SUBSCRIBE joins a feed")
        };
        let (consumer, subscription, address) = (*consumer, *subscription, address.clone());
        if self.feeds.get(&address).is_some_and(|feed| feed.owner != *owner) {
            // Its placement changed without a `Placed` here (never expected): start afresh.
            self.end_feed(&address, &remote_refusal(&address, owner), true, table, now_ms, out);
        }
        let entries = self.fed_subscriptions.entry(consumer).or_default();
        if !entries.iter().any(|(id, fed)| *id == subscription && *fed == address) {
            entries.push((subscription, address.clone()));
        }
        if let Some(feed) = self.feeds.get_mut(&address) {
            if feed.confirmed {
                return Some(command);
            }
            if feed.waiting.len() >= MAX_WAITING_COMMANDS {
                let refusal = Refusal::new(
                    ErrorCode::Overloaded,
                    format!(
                        "{MAX_WAITING_COMMANDS} SUBSCRIBEs to \"{}\" already wait for cluster node \"{}\" to confirm \
                         this node's relayed subscription; subscribe again later",
                        name(&address),
                        owner.name
                    ),
                );
                self.forget_fed(consumer, subscription);
                refuse(command, refusal, out);
                return None;
            }
            feed.waiting.push(command);
            return None;
        }
        self.counters.relayed += 1;
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        owner.counters.relay_opened();
        let (feed_consumer, feed_subscription) = self.feed_key(ticket);
        let feed_subscribe = AddressCommand::Subscribe {
            consumer: feed_consumer,
            subscription: feed_subscription,
            address: address.clone(),
            mode: DeliveryMode::Multicast,
            // Settled by this node once fanned out (`fan_out`), not by any one subscriber.
            ack_mode: AckMode::Auto,
            credit: FEED_CREDIT,
        };
        self.forwards.push(Forward::Subscribe { owner: owner.clone(), ticket, command: feed_subscribe });
        self.feed_addresses.insert(ticket as u32, address.clone());
        self.feeds.insert(address, Feed { owner: owner.clone(), ticket, confirmed: false, waiting: vec![command] });
        None
    }

    /// The UNSUBSCRIBE of a local subscription to a fed address, or the end of a consumer
    /// with such subscriptions: run in the table here (`None`), then the feeds left without
    /// a local subscriber are closed. A SUBSCRIBE reusing such an id forgets the old entry.
    fn leave_fed(
        &mut self,
        command: AddressCommand,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Option<AddressCommand> {
        let left: Vec<(SubscriptionId, Bytes)> = match &command {
            AddressCommand::Unsubscribe { consumer, subscription } => match self.forget_fed(*consumer, *subscription) {
                Some(address) => vec![(*subscription, address)],
                None => return Some(command),
            },
            AddressCommand::Subscribe { consumer, subscription, .. } => {
                self.forget_fed(*consumer, *subscription);
                return Some(command);
            }
            AddressCommand::ConsumerGone { consumer } => match self.fed_subscriptions.remove(consumer) {
                Some(entries) => entries,
                None => return Some(command),
            },
            _ => return Some(command),
        };
        let consumer = match &command {
            AddressCommand::Unsubscribe { consumer, .. } | AddressCommand::ConsumerGone { consumer } => *consumer,
            _ => unreachable!("matched above"),
        };
        table.handle(command, now_ms, out);
        for (subscription, address) in left {
            if let Some(feed) = self.feeds.get_mut(&address) {
                // One that still waited for the feed leaves the wait.
                feed.waiting.retain(|waiting| {
                    !matches!(waiting, AddressCommand::Subscribe { consumer: c, subscription: s, .. }
                        if *c == consumer && *s == subscription)
                });
            }
            self.close_if_unused(&address, table);
        }
        None
    }

    /// Forgets the fed subscription `(consumer, subscription)`; its address if it was one.
    fn forget_fed(&mut self, consumer: ConnRef, subscription: SubscriptionId) -> Option<Bytes> {
        let entries = self.fed_subscriptions.get_mut(&consumer)?;
        let index = entries.iter().position(|(id, _)| *id == subscription)?;
        let (_, address) = entries.swap_remove(index);
        if entries.is_empty() {
            self.fed_subscriptions.remove(&consumer);
        }
        Some(address)
    }

    /// Closes the feed of `address` (unsubscribes it at its owner) once no local subscriber
    /// holds or waits for it.
    fn close_if_unused(&mut self, address: &[u8], table: &AddressTable) {
        let Some(feed) = self.feeds.get(address) else { return };
        if !feed.waiting.is_empty() || table.multicast_subscriber_count(address) > 0 {
            return;
        }
        let feed = self.feeds.remove(address).expect("looked up above");
        self.feed_addresses.remove(&(feed.ticket as u32));
        feed.owner.counters.relays_closed(1);
        let (consumer, subscription) = self.feed_key(feed.ticket);
        self.forwards.push(Forward::Settle {
            owner: feed.owner,
            command: AddressCommand::Unsubscribe { consumer, subscription },
        });
    }

    /// The owner confirmed the feed `ticket`: the local SUBSCRIBEs that waited for it join the
    /// table (answered there), in their order.
    fn feed_confirmed(&mut self, ticket: u64, table: &mut AddressTable, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(address) = self.feed_addresses.get(&(ticket as u32)).cloned() else { return };
        let Some(feed) = self.feeds.get_mut(&address) else { return };
        feed.confirmed = true;
        for command in std::mem::take(&mut feed.waiting) {
            table.handle(command, now_ms, out);
        }
        // Every one refused (the table's bounds): nothing is fed.
        self.close_if_unused(&address, table);
    }

    /// Messages of the feed `ticket`: fanned out to the address's local multicast subscribers
    /// as one run (one delivery command per subscriber), then settled at the owner, whose credit for the feed comes back now: a
    /// slow subscriber holds back only itself (its backlog bound ends it with 4429), never the
    /// feed. Messages of a feed closed meanwhile are dropped.
    fn fan_out(
        &mut self,
        ticket: u64,
        messages: Vec<SharedMessage>,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(address) = self.feed_addresses.get(&(ticket as u32)).cloned() else { return };
        let Some(feed) = self.feeds.get(&address) else { return };
        let owner = feed.owner.clone();
        let count = messages.len() as u32;
        table.fan_out_relayed(messages, now_ms, out);
        let (consumer, subscription) = self.feed_key(ticket);
        let command = AddressCommand::ReturnCredit { consumer, subscription, count, bytes: 0 };
        self.forwards.push(Forward::Settle { owner, command });
        // The last subscriber may have been ended as slow.
        self.close_if_unused(&address, table);
    }

    /// Ends the feed of `address` and every local subscriber of it (those joined, and those
    /// waiting for the feed) with `refusal`; `unsubscribe`: the relay still holds the feed, so
    /// it is unsubscribed at the owner.
    fn end_feed(
        &mut self,
        address: &Bytes,
        refusal: &Refusal,
        unsubscribe: bool,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(feed) = self.feeds.remove(address) else { return };
        self.feed_addresses.remove(&(feed.ticket as u32));
        feed.owner.counters.relays_closed(1);
        if unsubscribe {
            let (consumer, subscription) = self.feed_key(feed.ticket);
            self.forwards.push(Forward::Settle {
                owner: feed.owner.clone(),
                command: AddressCommand::Unsubscribe { consumer, subscription },
            });
        }
        for command in feed.waiting {
            self.counters.subscriptions_ended += 1;
            refuse(command, refusal.clone(), out);
        }
        self.end_subscriptions(address, refusal, table, now_ms, out);
        self.fed_subscriptions.retain(|_, entries| {
            entries.retain(|(_, fed)| fed != address);
            !entries.is_empty()
        });
    }

    /// Ends every subscription at `address` on this shard with `refusal` (what it had not
    /// acknowledged goes back to the queue, as for an UNSUBSCRIBE).
    fn end_subscriptions(
        &mut self,
        address: &[u8],
        refusal: &Refusal,
        table: &mut AddressTable,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        for (consumer, subscription) in table.subscriptions_of(address) {
            table.handle(AddressCommand::Unsubscribe { consumer, subscription }, now_ms, out);
            self.counters.subscriptions_ended += 1;
            out.push((
                consumer.shard,
                ConnCommand::SubscriptionEnded { consumer: consumer.conn, subscription, refusal: refusal.clone() },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::address::AddressLimits;
    use crate::broker::{ConnId, ConnRef, StoredMessage, SubscriptionId};
    use crate::mbws::{AckMode, DeliveryMode, Properties};

    fn conn(index: u32) -> ConnRef {
        ConnRef { shard: ShardId(0), conn: ConnId { index, generation: 1 } }
    }

    fn publish(address: &'static str, seq: u64) -> AddressCommand {
        let message = StoredMessage::from_fields(address.as_bytes(), &Properties::default(), b"x", false);
        AddressCommand::Publish { publisher: conn(1), seq, message: SharedMessage::new(message) }
    }

    fn subscribe(address: &'static str, id: u32) -> AddressCommand {
        subscribe_with_id(address, id)
    }

    fn subscribe_with_id(address: &'static str, id: u32) -> AddressCommand {
        AddressCommand::Subscribe {
            consumer: conn(2),
            subscription: SubscriptionId(id),
            address: Bytes::from_static(address.as_bytes()),
            mode: DeliveryMode::Anycast,
            ack_mode: AckMode::Auto,
            credit: 10,
        }
    }

    fn remote() -> Owner {
        Owner::Remote(Arc::new(NodeRef::new("b".into(), "ws://127.0.0.1:9/".into())))
    }

    fn refusal_codes(out: &[Outgoing]) -> Vec<(u64, ErrorCode)> {
        out.iter()
            .filter_map(|(_, command)| match command {
                ConnCommand::PublishDone { seq, outcome: Err(refusal), .. } => Some((*seq, refusal.code)),
                ConnCommand::SubscribeDone { subscription, outcome: Err(refusal), .. } => {
                    Some((u64::from(subscription.0), refusal.code))
                }
                ConnCommand::SubscriptionEnded { subscription, refusal, .. } => {
                    Some((u64::from(subscription.0), refusal.code))
                }
                _ => None,
            })
            .collect()
    }

    struct Fixture {
        view: PlacementView,
        table: AddressTable,
        requests: tokio::sync::mpsc::UnboundedReceiver<PlacementRequest>,
        out: Vec<Outgoing>,
        released: Vec<AddressCommand>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let (sender, requests) = tokio::sync::mpsc::unbounded_channel();
            let mut fixture = Fixture {
                view: PlacementView::new(ShardId(0)),
                table: AddressTable::new(ShardId(0), AddressLimits::default()),
                requests,
                out: Vec::new(),
                released: Vec::new(),
            };
            fixture.apply(ClusterUpdate::Attach(sender));
            fixture
        }

        fn admit(&mut self, command: AddressCommand) -> Option<AddressCommand> {
            self.view.admit(command, &mut self.table, 0, &mut self.out)
        }

        fn apply(&mut self, update: ClusterUpdate) {
            self.view.apply(update, &mut self.table, 0, &mut self.out, &mut self.released);
        }
    }

    #[test]
    fn commands_wait_for_the_first_placement_ask_once_and_run_in_order_when_local() {
        let mut f = Fixture::new();
        assert!(f.admit(publish("a", 1)).is_none());
        assert!(f.admit(publish("a", 2)).is_none());
        assert!(f.admit(subscribe("a", 7)).is_none());
        assert_eq!(f.view.waiting_count(), 3);
        assert_eq!(f.requests.try_recv().unwrap().address, "a");
        assert!(f.requests.try_recv().is_err(), "one request per address");
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: Owner::Local });
        let seqs: Vec<_> = f
            .released
            .iter()
            .map(|command| match command {
                AddressCommand::Publish { seq, .. } => *seq,
                AddressCommand::Subscribe { subscription, .. } => u64::from(subscription.0) * 100,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, [1, 2, 700]);
        assert_eq!(f.view.waiting_count(), 0);
        assert!(f.admit(publish("a", 3)).is_some(), "placed here: runs at once");
        assert!(f.out.is_empty());
    }

    #[test]
    fn a_send_owned_elsewhere_is_forwarded_once_and_a_subscribe_relayed_once() {
        let mut f = Fixture::new();
        f.admit(publish("a", 1));
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: remote() });
        assert!(f.admit(publish("a", 2)).is_none());
        assert!(f.admit(subscribe("a", 3)).is_none());
        // A SEND a node forwarded already is not forwarded again, nor a SUBSCRIBE a relay made.
        let mut message = StoredMessage::from_fields(b"a", &Properties::default(), b"x", false);
        message.from_cluster_link = true;
        let hopped = AddressCommand::Publish { publisher: conn(1), seq: 4, message: SharedMessage::new(message) };
        assert!(f.admit(hopped).is_none());
        assert!(f.admit(subscribe_with_id("a", RELAYED_SUBSCRIPTION_BIT | 5)).is_none());
        assert_eq!(
            refusal_codes(&f.out),
            [(4, ErrorCode::Misdirected), (u64::from(RELAYED_SUBSCRIPTION_BIT | 5), ErrorCode::Misdirected)]
        );
        let ConnCommand::PublishDone { outcome: Err(refusal), .. } = &f.out[0].1 else { panic!() };
        assert!(refusal.reason.contains("node \"b\" (ws://127.0.0.1:9/)"), "{}", refusal.reason);
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        let kinds: Vec<_> = forwards
            .iter()
            .map(|forward| match forward {
                Forward::Send { seq, owner, .. } => format!("send {seq} to {}", owner.name),
                Forward::Subscribe { command: AddressCommand::Subscribe { subscription, .. }, owner, .. } => {
                    format!("subscribe {} to {}", subscription.0, owner.name)
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["send 1 to b", "send 2 to b", "subscribe 3 to b"], "in order");
        assert_eq!((f.view.counters.forwarded, f.view.counters.relayed), (2, 1));
    }

    #[test]
    fn a_relayed_subscriptions_settlements_go_to_its_relay_until_it_ends() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: remote() });
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"here"), owner: Owner::Local });
        assert!(f.admit(subscribe("a", 1)).is_none());
        // The same consumer's local subscription 2 is the table's.
        let local = f.admit(subscribe("here", 2)).unwrap();
        f.table.handle(local, 0, &mut f.out);
        let ack = |id: u32| AddressCommand::Ack {
            consumer: conn(2),
            subscription: SubscriptionId(id),
            messages: smallvec::smallvec![crate::broker::MessageId(7)].into(),
        };
        assert!(f.admit(ack(1)).is_none(), "relayed: settled at the owner");
        assert!(f.admit(ack(2)).is_some(), "local: the table's");
        let credit = AddressCommand::SetCredit { consumer: conn(2), subscription: SubscriptionId(1), credit: 3 };
        assert!(f.admit(credit).is_none());
        // The consumer goes: the relay is told, and the table too (for subscription 2).
        assert!(f.admit(AddressCommand::ConsumerGone { consumer: conn(2) }).is_some());
        assert_eq!(f.view.relayed_count(), 0);
        assert!(f.admit(ack(1)).is_some(), "forgotten once the consumer is gone");
        // A relayed subscription the relay ended is forgotten too (by its ticket).
        f.admit(subscribe("a", 4));
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        let settled: Vec<_> = forwards
            .iter()
            .filter_map(|forward| match forward {
                Forward::Settle { command, .. } => Some(format!("{command:?}").split(' ').next().unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(settled, ["Ack", "SetCredit", "ConsumerGone"]);
        let Some(Forward::Subscribe { ticket, .. }) = forwards.last() else { panic!("{forwards:?}") };
        f.apply(ClusterUpdate::RelayEnded { consumer: conn(2), subscription: SubscriptionId(4), ticket: *ticket + 1 });
        assert_eq!(f.view.relayed_count(), 1, "another ticket: a newer subscription with the same id");
        f.apply(ClusterUpdate::RelayEnded { consumer: conn(2), subscription: SubscriptionId(4), ticket: *ticket });
        assert_eq!(f.view.relayed_count(), 0);
    }

    #[test]
    fn waiting_is_bounded_and_unplaced_refuses_what_waited() {
        let mut f = Fixture::new();
        for seq in 0..MAX_WAITING_COMMANDS as u64 {
            assert!(f.admit(publish("a", seq + 1)).is_none());
        }
        assert!(f.out.is_empty());
        f.admit(publish("b", 99));
        assert_eq!(refusal_codes(&f.out), [(99, ErrorCode::Overloaded)]);
        f.out.clear();
        f.apply(ClusterUpdate::Unplaced { address: Bytes::from_static(b"a"), reason: "etcd unreachable".into() });
        assert_eq!(f.out.len(), MAX_WAITING_COMMANDS);
        assert_eq!(f.view.waiting_count(), 0);
    }

    #[test]
    fn fencing_ends_local_subscriptions_and_refuses_until_unfenced_and_placed_again() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: Owner::Local });
        let subscribe_command = f.admit(subscribe("a", 5)).unwrap();
        f.table.handle(subscribe_command, 0, &mut f.out);
        f.out.clear();
        f.admit(publish("waits", 1));
        f.apply(ClusterUpdate::Fenced { reason: "lease not renewed for 5000 ms".into() });
        assert_eq!(refusal_codes(&f.out), [(5, ErrorCode::Misdirected), (1, ErrorCode::Misdirected)]);
        assert!(f.table.subscriptions_of(b"a").is_empty());
        f.out.clear();
        assert!(f.admit(publish("a", 2)).is_none());
        assert_eq!(refusal_codes(&f.out), [(2, ErrorCode::Misdirected)]);
        f.apply(ClusterUpdate::Unfenced);
        assert!(f.admit(publish("a", 3)).is_none(), "placements are forgotten while fenced");
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: Owner::Local });
        assert_eq!(f.released.len(), 1);
    }

    #[test]
    fn fencing_asks_the_relays_to_end_relayed_subscriptions_and_forgets_them_on_their_word() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: remote() });
        assert!(f.admit(subscribe("a", 1)).is_none());
        assert!(f.admit(subscribe("a", 2)).is_none());
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        let tickets: Vec<u64> = forwards
            .drain(..)
            .map(|forward| match forward {
                Forward::Subscribe { ticket, .. } => ticket,
                other => panic!("a relayed SUBSCRIBE, not {other:?}"),
            })
            .collect();
        f.apply(ClusterUpdate::Fenced { reason: "lease not renewed for 5000 ms".into() });
        // The view ends nothing itself: the relay alone decides, so the consumer hears of the
        // end once even when the owner's own end crosses it.
        assert!(f.out.is_empty(), "{:?}", f.out);
        let mut asked = ends_asked(&mut f);
        asked.sort_unstable();
        assert_eq!(asked.iter().map(|(id, owner, _)| (*id, owner.as_str())).collect::<Vec<_>>(), [(1, "b"), (2, "b")]);
        for (_, _, reason) in &asked {
            assert!(reason.contains("\"a\"") && reason.contains("fenced"), "{reason}");
        }
        assert_eq!(f.view.counters.subscriptions_ended, 2);
        // Fenced once more (a second lease lost before joining again): nobody is asked twice.
        f.apply(ClusterUpdate::Fenced { reason: "lease not renewed for 5000 ms".into() });
        assert!(ends_asked(&mut f).is_empty());
        // The relay's word: forgotten, and what the consumer sends for them is not relayed.
        for (subscription, ticket) in [1, 2].into_iter().zip(tickets) {
            f.apply(ClusterUpdate::RelayEnded {
                consumer: conn(2),
                subscription: SubscriptionId(subscription),
                ticket,
            });
        }
        assert_eq!(f.view.relayed_count(), 0);
        let credit = AddressCommand::SetCredit { consumer: conn(2), subscription: SubscriptionId(1), credit: 3 };
        assert!(f.admit(credit).is_some());
    }

    #[test]
    fn a_move_away_ends_the_subscriptions_here() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: Owner::Local });
        let command = f.admit(subscribe("a", 4)).unwrap();
        f.table.handle(command, 0, &mut f.out);
        f.out.clear();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: remote() });
        assert_eq!(refusal_codes(&f.out), [(4, ErrorCode::Misdirected)]);
        assert_eq!(f.view.counters.subscriptions_ended, 1);
    }

    /// The relayed subscriptions the view asked their relays to end, as (id, old owner, reason).
    fn ends_asked(f: &mut Fixture) -> Vec<(u32, String, String)> {
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        forwards
            .into_iter()
            .filter_map(|forward| match forward {
                Forward::End { owner, subscription, refusal, .. } => {
                    assert_eq!(refusal.code, ErrorCode::Misdirected, "{}", refusal.reason);
                    Some((subscription.0, owner.name.clone(), refusal.reason))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_relayed_subscription_is_ended_by_its_relay_as_soon_as_its_address_is_placed_on_another_node() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: remote() });
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"other"), owner: remote() });
        assert!(f.admit(subscribe("a", 1)).is_none());
        assert!(f.admit(subscribe("other", 2)).is_none());
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        // The same placement again (a reload, the owner back with the same name): nothing ends.
        let b_again = Owner::Remote(Arc::new(NodeRef::new("b".into(), "ws://127.0.0.1:11/".into())));
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: b_again });
        assert!(ends_asked(&mut f).is_empty());
        // Re-placed on c: the relay to b is asked to end it, with 4421 naming c; the other
        // address's subscription stays. The view forgets it on the relay's word.
        let c = Owner::Remote(Arc::new(NodeRef::new("c".into(), "ws://127.0.0.1:10/".into())));
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: c });
        let asked = ends_asked(&mut f);
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!((asked[0].0, asked[0].1.as_str()), (1, "b"));
        assert_eq!(named_node(&asked[0].2), Some("c"), "{}", asked[0].2);
        assert!(f.out.is_empty(), "the relay tells the consumer, once");
        assert_eq!(f.view.relayed_count(), 2, "remembered until the relay's word");
        let d = Owner::Remote(Arc::new(NodeRef::new("d".into(), "ws://127.0.0.1:12/".into())));
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: d });
        assert!(ends_asked(&mut f).is_empty(), "asked once");
        f.apply(ClusterUpdate::RelayEnded { consumer: conn(2), subscription: SubscriptionId(1), ticket: 0 });
        assert_eq!(f.view.relayed_count(), 1);
        // A new SUBSCRIBE goes to d; moved here, that one ends too, told to subscribe again.
        assert!(f.admit(subscribe("a", 1)).is_none());
        f.view.take_forwards(&mut forwards);
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"a"), owner: Owner::Local });
        let asked = ends_asked(&mut f);
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!((asked[0].0, asked[0].1.as_str()), (1, "d"));
        assert!(asked[0].2.contains("moved to this cluster node"), "{}", asked[0].2);
        assert!(f.admit(subscribe("a", 3)).is_some(), "served here now");
    }

    /// The node a 4421's reason names (`... owned by cluster node "c" ...`).
    fn named_node(reason: &str) -> Option<&str> {
        reason.split("cluster node \"").nth(1)?.split('"').next()
    }

    fn multicast_subscribe(consumer: u32, id: u32) -> AddressCommand {
        AddressCommand::Subscribe {
            consumer: conn(consumer),
            subscription: SubscriptionId(id),
            address: Bytes::from_static(b"news"),
            mode: DeliveryMode::Multicast,
            ack_mode: AckMode::Auto,
            credit: 10,
        }
    }

    /// What the view handed the relay, as short words.
    fn forwarded(f: &mut Fixture) -> Vec<String> {
        let mut forwards = Vec::new();
        f.view.take_forwards(&mut forwards);
        forwards
            .iter()
            .map(|forward| match forward {
                Forward::Subscribe { command: AddressCommand::Subscribe { consumer, mode, .. }, .. } => {
                    assert_eq!(consumer.conn, FEED_CONN);
                    format!("subscribe {mode:?}")
                }
                Forward::Settle { command: AddressCommand::ReturnCredit { consumer, count, .. }, .. } => {
                    assert_eq!(consumer.conn, FEED_CONN);
                    format!("settle {count}")
                }
                Forward::Settle { command: AddressCommand::Unsubscribe { consumer, .. }, .. } => {
                    assert_eq!(consumer.conn, FEED_CONN);
                    "unsubscribe".to_string()
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn deliveries_to(out: &[Outgoing], consumer: u32) -> usize {
        out.iter()
            .map(|(_, command)| match command {
                ConnCommand::Deliver { consumer: c, deliveries, .. } if c.index == consumer => deliveries.len(),
                _ => 0,
            })
            .sum()
    }

    fn the_feeds_ticket(f: &Fixture) -> u64 {
        f.view.feeds.values().next().expect("a feed").ticket
    }

    #[test]
    fn local_multicast_subscribers_of_a_remote_address_share_one_feed_until_the_last_leaves() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"news"), owner: remote() });
        // The first opens the feed; both wait for the owner's SUBSCRIBED.
        assert!(f.admit(multicast_subscribe(2, 1)).is_none());
        assert!(f.admit(multicast_subscribe(3, 1)).is_none());
        assert_eq!(forwarded(&mut f), ["subscribe Multicast"], "one relayed subscription for the node");
        assert!(f.out.is_empty(), "no SUBSCRIBED before the owner's");
        let ticket = the_feeds_ticket(&f);
        f.apply(ClusterUpdate::FeedConfirmed { ticket });
        let subscribed = f
            .out
            .iter()
            .filter(|(_, command)| matches!(command, ConnCommand::SubscribeDone { outcome: Ok(()), .. }))
            .count();
        assert_eq!(subscribed, 2);
        assert_eq!(f.table.multicast_subscriber_count(b"news"), 2);
        // A third joins at once.
        let joined = f.admit(multicast_subscribe(4, 1)).expect("joins the confirmed feed");
        f.table.handle(joined, 0, &mut f.out);
        f.out.clear();
        // The feed's messages reach every local subscriber, and are settled at the owner.
        let message = |body: &'static str| {
            SharedMessage::new(StoredMessage::from_fields(b"news", &Properties::default(), body.as_bytes(), false))
        };
        f.apply(ClusterUpdate::Fed { ticket, messages: vec![message("1"), message("2")] });
        assert_eq!([deliveries_to(&f.out, 2), deliveries_to(&f.out, 3), deliveries_to(&f.out, 4)], [2, 2, 2]);
        assert_eq!(forwarded(&mut f), ["settle 2"]);
        // Leaving: the feed stays until the last local subscriber is gone.
        let unsubscribe =
            |consumer| AddressCommand::Unsubscribe { consumer: conn(consumer), subscription: SubscriptionId(1) };
        assert!(f.admit(unsubscribe(2)).is_none());
        assert!(f.admit(AddressCommand::ConsumerGone { consumer: conn(3) }).is_none());
        assert!(forwarded(&mut f).is_empty());
        assert!(f.admit(unsubscribe(4)).is_none());
        assert_eq!(forwarded(&mut f), ["unsubscribe"], "the last leave unsubscribes the feed at the owner");
        assert_eq!(f.table.multicast_subscriber_count(b"news"), 0);
        // A later subscriber opens a new feed; messages of the old one are dropped.
        assert!(f.admit(multicast_subscribe(5, 1)).is_none());
        assert_eq!(forwarded(&mut f), ["subscribe Multicast"]);
        f.out.clear();
        f.apply(ClusterUpdate::Fed { ticket, messages: vec![message("3")] });
        assert!(f.out.is_empty() && forwarded(&mut f).is_empty());
    }

    #[test]
    fn a_run_of_fed_messages_reaches_each_local_subscriber_as_one_delivery_in_order() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"news"), owner: remote() });
        for consumer in [2, 3] {
            assert!(f.admit(multicast_subscribe(consumer, 1)).is_none());
        }
        let ticket = the_feeds_ticket(&f);
        f.apply(ClusterUpdate::FeedConfirmed { ticket });
        forwarded(&mut f);
        f.out.clear();
        // A run of 12 with 10 of credit each (multicast_subscribe): one Deliver of the first
        // 10 per subscriber, in the owner's order; the other 2 wait for credit, as for a
        // local publish. The run is settled at the owner at once, as one.
        let bodies: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
        let messages = bodies
            .iter()
            .map(|body| {
                SharedMessage::new(StoredMessage::from_fields(b"news", &Properties::default(), body.as_bytes(), false))
            })
            .collect();
        f.apply(ClusterUpdate::Fed { ticket, messages });
        for consumer in [2, 3] {
            let delivered: Vec<Vec<String>> = f
                .out
                .iter()
                .filter_map(|(_, command)| match command {
                    ConnCommand::Deliver { consumer: c, deliveries, .. } if c.index == consumer => Some(
                        deliveries.iter().map(|d| String::from_utf8_lossy(d.message.body()).into_owned()).collect(),
                    ),
                    _ => None,
                })
                .collect();
            assert_eq!(delivered, [bodies[..10].to_vec()], "consumer {consumer}: one delivery command of the run");
        }
        assert_eq!(forwarded(&mut f), ["settle 12"]);
        // Credit back: the rest follow, in order.
        f.out.clear();
        let credit =
            AddressCommand::ReturnCredit { consumer: conn(2), subscription: SubscriptionId(1), count: 10, bytes: 0 };
        f.table.handle(credit, 0, &mut f.out);
        let rest: Vec<String> = f
            .out
            .iter()
            .flat_map(|(_, command)| match command {
                ConnCommand::Deliver { deliveries, .. } => deliveries.to_vec(),
                _ => Vec::new(),
            })
            .map(|d| String::from_utf8_lossy(d.message.body()).into_owned())
            .collect();
        assert_eq!(rest, bodies[10..]);
    }

    #[test]
    fn a_feeds_end_fencing_and_a_move_end_every_local_subscriber_of_it() {
        let mut f = Fixture::new();
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"news"), owner: remote() });
        for consumer in [2, 3] {
            f.admit(multicast_subscribe(consumer, 1));
        }
        f.apply(ClusterUpdate::FeedConfirmed { ticket: the_feeds_ticket(&f) });
        let joined = f.admit(multicast_subscribe(4, 1)).expect("joins the confirmed feed");
        f.table.handle(joined, 0, &mut f.out);
        forwarded(&mut f);
        f.out.clear();
        // The owner unreachable: the relay ends the feed (4503), the view every subscriber.
        let refusal = Refusal::new(ErrorCode::Unavailable, "cluster node \"b\" cannot be reached");
        f.apply(ClusterUpdate::FeedEnded { ticket: the_feeds_ticket(&f), refusal });
        assert_eq!(refusal_codes(&f.out), [(1, ErrorCode::Unavailable); 3]);
        assert_eq!(f.table.multicast_subscriber_count(b"news"), 0);
        assert!(forwarded(&mut f).is_empty(), "the relay forgot the feed already");
        // Fencing: a waiting subscriber and a joined one end with 4421; the feed is unsubscribed.
        f.out.clear();
        f.admit(multicast_subscribe(2, 1));
        f.apply(ClusterUpdate::FeedConfirmed { ticket: the_feeds_ticket(&f) });
        let joined = f.admit(multicast_subscribe(3, 1)).expect("joins the confirmed feed");
        f.table.handle(joined, 0, &mut f.out);
        forwarded(&mut f);
        f.out.clear();
        f.apply(ClusterUpdate::Fenced { reason: "lease not renewed".into() });
        assert_eq!(refusal_codes(&f.out), [(1, ErrorCode::Misdirected); 2]);
        assert_eq!(forwarded(&mut f), ["unsubscribe"]);
        // A move to another node ends them with 4421 naming it.
        f.apply(ClusterUpdate::Unfenced);
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"news"), owner: remote() });
        f.admit(multicast_subscribe(2, 1));
        forwarded(&mut f);
        f.out.clear();
        let c = Owner::Remote(Arc::new(NodeRef::new("c".into(), "ws://127.0.0.1:10/".into())));
        f.apply(ClusterUpdate::Placed { address: Bytes::from_static(b"news"), owner: c });
        assert_eq!(refusal_codes(&f.out), [(1, ErrorCode::Misdirected)]);
        let ConnCommand::SubscribeDone { outcome: Err(refusal), .. } = &f.out[0].1 else { panic!("{:?}", f.out) };
        assert!(refusal.reason.contains("node \"c\""), "{}", refusal.reason);
        assert_eq!(forwarded(&mut f), ["unsubscribe"]);
    }

    #[test]
    fn requests_made_before_the_channel_is_attached_are_sent_when_it_is() {
        let mut view = PlacementView::new(ShardId(3));
        let mut out = Vec::new();
        let mut table = AddressTable::new(ShardId(3), AddressLimits::default());
        view.admit(publish("early", 1), &mut table, 0, &mut out);
        let (sender, mut requests) = tokio::sync::mpsc::unbounded_channel();
        view.apply(ClusterUpdate::Attach(sender), &mut table, 0, &mut out, &mut Vec::new());
        assert_eq!(
            requests.try_recv().unwrap(),
            PlacementRequest { address: Bytes::from_static(b"early"), shard: ShardId(3) }
        );
    }
}
