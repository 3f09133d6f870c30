//! What the admin API sees of the addresses (`GET /api/addresses`, `/metrics`): one
//! [`AddressInfo`] per address, read between two rounds of work, never on the message path.
//! An address exists here while it holds something (a queued message, a subscriber, a held
//! answer); an idle one is dropped, as everywhere in the table.

use bytes::Bytes;

use super::{Address, AddressTable};

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
}

impl AddressTable {
    /// The addresses this shard owns now.
    pub fn address_count(&self) -> usize {
        self.addresses.len()
    }

    /// Address `name`, if this shard holds it.
    pub fn address_info(&self, name: &[u8]) -> Option<AddressInfo> {
        self.addresses.get_key_value(name).map(|(name, state)| self.info(name, state))
    }

    /// Every address of this shard, in no particular order (a walk of the table).
    pub fn address_infos(&self) -> impl Iterator<Item = AddressInfo> + '_ {
        self.addresses.iter().map(|(name, state)| self.info(name, state))
    }

    fn info(&self, name: &Bytes, state: &Address) -> AddressInfo {
        let subscribers = state.anycast.iter().chain(&state.multicast);
        AddressInfo {
            name: name.clone(),
            durable: self.is_durable_address(name),
            queued_messages: state.queue.len(),
            queued_bytes: state.queued_bytes,
            anycast_consumers: state.anycast.len(),
            multicast_consumers: state.multicast.len(),
            unacked: subscribers.map(|subscriber| subscriber.unacked.len()).sum(),
            multicast_backlog: state.multicast.iter().map(|subscriber| subscriber.backlog.len()).sum(),
        }
    }
}
