//! What the admin API sees of the addresses (`GET /api/addresses`, `/metrics`): one
//! [`AddressInfo`] per address, read between two rounds of work, never on the message path;
//! and what it does to them ([`AddressTable::purge`]). An address exists here while it holds
//! something (a queued message, a subscriber, a held answer); an idle one is dropped, as
//! everywhere in the table.

use bytes::Bytes;

use super::multicast::lag;
use super::{Address, AddressTable, Outgoing};

/// One address of this shard at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressInfo {
    pub name: Bytes,
    /// Every message is durable (`--durable-address`); a SEND may ask for durability too.
    pub durable: bool,
    /// Messages waiting in the anycast queue, and their body bytes.
    pub queued_messages: usize,
    pub queued_bytes: usize,
    pub anycast_consumers: usize,
    pub multicast_consumers: usize,
    /// Client-ack deliveries not acknowledged yet (every subscriber).
    pub unacked: usize,
    /// Messages waiting for credit in multicast subscribers' backlogs.
    pub multicast_backlog: usize,
    /// Messages accepted into the address, and deliveries made from it, since it was created
    /// (an idle undeclared address is dropped, and its counts start again).
    pub messages_in: u64,
    pub messages_out: u64,
    /// The settings of a declared address.
    pub declared: Option<super::AddressSettings>,
}

impl AddressInfo {
    /// Messages the address holds: queued, unacknowledged, in multicast backlogs (what lists
    /// and metrics rank addresses by).
    pub fn held(&self) -> usize {
        self.queued_messages + self.unacked + self.multicast_backlog
    }

    /// Adds `other`'s figures to these (to sum the addresses not listed one by one).
    pub fn add(&mut self, other: &AddressInfo) {
        self.durable |= other.durable;
        self.queued_messages += other.queued_messages;
        self.queued_bytes += other.queued_bytes;
        self.anycast_consumers += other.anycast_consumers;
        self.multicast_consumers += other.multicast_consumers;
        self.unacked += other.unacked;
        self.multicast_backlog += other.multicast_backlog;
        self.messages_in += other.messages_in;
        self.messages_out += other.messages_out;
    }
}

impl AddressTable {
    /// The addresses this shard owns now.
    pub fn address_count(&self) -> usize {
        self.addresses.len()
    }

    /// Address `name`, if this shard holds it (looked up with `get`, as the other paths do: see
    /// [`AddressTable::purge`]).
    pub fn address_info(&self, name: &[u8]) -> Option<AddressInfo> {
        self.addresses.get(name).map(|state| self.info(&Bytes::copy_from_slice(name), state))
    }

    /// The subscriptions at address `name` on this shard, anycast then multicast (a cluster
    /// ends them when the address stops being served here: `crate::cluster::view`).
    pub fn subscriptions_of(&self, name: &[u8]) -> Vec<(crate::broker::ConnRef, crate::broker::SubscriptionId)> {
        let Some(state) = self.addresses.get(name) else { return Vec::new() };
        state
            .anycast
            .iter()
            .chain(&state.multicast)
            .map(|subscriber| (subscriber.consumer, subscriber.subscription))
            .collect()
    }

    /// Every address of this shard, in no particular order (a walk of the table).
    pub fn address_infos(&self) -> impl Iterator<Item = AddressInfo> + '_ {
        self.addresses.iter().map(|(name, state)| self.info(name, state))
    }

    fn info(&self, name: &Bytes, state: &Address) -> AddressInfo {
        let subscribers = state.anycast.iter().chain(&state.multicast);
        AddressInfo {
            name: name.clone(),
            durable: self.is_durable_address(name) || state.declared.as_ref().is_some_and(|settings| settings.durable),
            queued_messages: state.queue.len(),
            queued_bytes: state.queued_bytes,
            anycast_consumers: state.anycast.len(),
            multicast_consumers: state.multicast.len(),
            unacked: subscribers.map(|subscriber| subscriber.unacked.len()).sum(),
            multicast_backlog: state.multicast.iter().map(|subscriber| lag(&state.multicast_log, subscriber)).sum(),
            messages_in: state.messages_in,
            messages_out: state.delivered_by_departed
                + state.anycast.iter().chain(&state.multicast).map(|subscriber| subscriber.delivered).sum::<u64>(),
            declared: state.declared.as_deref().copied(),
        }
    }
}

impl AddressTable {
    /// Drops every message waiting in `address`'s anycast queue (`POST
    /// /api/addresses/{name}/purge`) and returns how many; `None` if this shard holds no such
    /// address. A durable message is settled in the log, so it does not come back after a
    /// restart. Not purged: deliveries in flight (they are the consumers'), multicast
    /// backlogs, and messages still waiting for the log to make them durable (their publishers
    /// have no answer yet), with those queued behind them. Publishes whose answers were held
    /// back by the full queue are answered (`out`).
    pub fn purge(&mut self, address: &[u8], out: &mut Vec<Outgoing>) -> Option<usize> {
        // Taken out and put back with the table's `remove` and `entry`, which other paths use
        // already: a new kind of lookup on the table (`get_key_value`, `insert`) made the
        // compiler stop inlining its `get_mut` into the publish path (docs/PERFORMANCE.md,
        // "The admin API"). This path is rare and may pay for the move.
        let mut state = self.addresses.remove(address)?;
        let name = Bytes::copy_from_slice(address);
        let held_from = state.held_from(self.durable_lsn);
        let queue = std::mem::take(&mut state.queue);
        let (kept, purged): (Vec<_>, Vec<_>) =
            queue.into_iter().partition(|queued| held_from.is_some_and(|held| queued.id >= held));
        state.queue = kept.into();
        let before = state.queued_bytes;
        state.queued_bytes = state.queue.iter().map(|queued| queued.message.body().len()).sum();
        self.queued_bytes = self
            .queued_bytes
            .checked_sub(before - state.queued_bytes)
            .expect("the shard's queued bytes include every address's");
        let low_watermark = state.max_queued_messages(self.limits.max_queued_messages) / 4;
        Self::release_held_answers(&mut state, low_watermark, out);
        for queued in &purged {
            self.settle(&name, &queued.message, queued.id);
        }
        if !state.is_idle() {
            *self.addresses.entry(name).or_default() = state;
        }
        Some(purged.len())
    }
}
