//! Addresses an operator declared (`PUT /api/addresses/{name}`), each with settings of its own
//! that replace the broker-wide limits for it, and their deletion (`DELETE
//! /api/addresses/{name}`). A declared address stays in the table while idle (it is not dropped
//! like an address that merely held something); its [`AddressSettings`] live in its `Address`,
//! so the message path reads them where it reads the address anyway (no second lookup).
//!
//! Settings: `routing` (anycast: today's routing rule; multicast: a message goes to the anycast
//! queue only while the address has an anycast subscriber, so with nobody subscribed it is
//! accepted and dropped, as on a publish/subscribe topic), `durable` (every message logged, as
//! `--durable-address`), `max_queued_messages` and `max_queued_bytes` (the address's bounds),
//! `max_deliveries` (its dead-letter policy).
//!
//! Deletion drops what waits in the queue (a durable message is settled in the log, so it does
//! not come back after a restart) and forgets the declaration; with `force`, it also ends every
//! subscription to it (non-fatal ERROR 4405 invalid-state naming the subscription: it is
//! not live any more) and drops their
//! unacknowledged deliveries (an ACK for one later changes nothing). Publishes whose answers
//! were held back are answered, as by a purge.

use bytes::Bytes;

use super::{Address, AddressTable, Outgoing, Queued};
use crate::broker::{ConnCommand, Refusal};
use crate::mbws::ErrorCode;

/// Where a published message goes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    #[default]
    Anycast,
    Multicast,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Anycast => "anycast",
            Routing::Multicast => "multicast",
        }
    }

    pub fn parse(text: &str) -> Option<Routing> {
        match text {
            "anycast" => Some(Routing::Anycast),
            "multicast" => Some(Routing::Multicast),
            _ => None,
        }
    }
}

/// The settings of a declared address (every one given; the admin API fills in the broker's
/// defaults for those a request leaves out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSettings {
    pub routing: Routing,
    pub durable: bool,
    pub max_queued_messages: u32,
    pub max_queued_bytes: usize,
    /// 0: no limit (as `--max-deliveries`).
    pub max_deliveries: u32,
}

/// What came of [`AddressTable::delete_address`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// No such address on this shard.
    NotFound,
    /// Refused: it has this many subscribers (and `force` was not given).
    HasConsumers(usize),
    /// Gone, with the queued messages dropped and the subscriptions ended.
    Deleted { messages: usize, consumers_ended: usize },
}

impl Address {
    /// The most messages that may wait in the queue (and in one multicast backlog).
    pub(super) fn max_queued_messages(&self, default: u32) -> usize {
        self.declared.as_ref().map_or(default, |settings| settings.max_queued_messages) as usize
    }

    pub(super) fn max_queued_bytes(&self, default: usize) -> usize {
        self.declared.as_ref().map_or(default, |settings| settings.max_queued_bytes)
    }

    /// A message goes to the anycast queue (the routing rule, docs/PROTOCOL.md "Addresses",
    /// and a declared multicast routing: see the module docs).
    pub(super) fn routes_to_anycast_queue(&self) -> bool {
        self.routes_to_anycast_queue_without(0)
    }

    /// Whether a message goes to the anycast queue once `ending` of the multicast subscribers
    /// are gone (a publish that ends slow subscribers is routed as the address stands after).
    pub(super) fn routes_to_anycast_queue_without(&self, ending: usize) -> bool {
        !self.anycast.is_empty()
            || (self.multicast.len() <= ending
                && !self.declared.as_ref().is_some_and(|settings| settings.routing == Routing::Multicast))
    }
}

impl AddressTable {
    /// Declares address `name` with `settings` (or changes the settings of a declared one);
    /// true if it was not declared before. New bounds apply to the next publish; messages
    /// already queued stay.
    pub fn declare_address(&mut self, name: &[u8], settings: AddressSettings) -> bool {
        let name = Bytes::copy_from_slice(name);
        let durable_before = self.declared_settings(&name).is_some_and(|before| before.durable);
        if settings.durable && !durable_before {
            self.durable_addresses.push(name.clone());
        } else if !settings.durable && durable_before {
            self.durable_addresses.retain(|pattern| *pattern != name);
        }
        // `entry` as `new_address` does: see `purge` on new kinds of lookup in this table.
        let state = self.addresses.entry(name).or_default();
        state.declared.replace(Box::new(settings)).is_none()
    }

    /// The settings of `name` if it is declared.
    pub fn declared_settings(&self, name: &[u8]) -> Option<AddressSettings> {
        self.addresses.get(name).and_then(|state| state.declared.as_deref().copied())
    }

    /// Every declared address of this shard with its settings.
    pub fn declared_addresses(&self) -> Vec<(Bytes, AddressSettings)> {
        let declared = self.addresses.iter();
        declared.filter_map(|(name, state)| Some((name.clone(), *state.declared.as_deref()?))).collect()
    }

    /// Deletes address `name` (see the module docs).
    pub fn delete_address(&mut self, name: &[u8], force: bool, out: &mut Vec<Outgoing>) -> Deleted {
        let Some(mut state) = self.addresses.remove(name) else { return Deleted::NotFound };
        let name = Bytes::copy_from_slice(name);
        let consumers = state.anycast.len() + state.multicast.len();
        if consumers > 0 && !force {
            *self.addresses.entry(name).or_default() = state;
            return Deleted::HasConsumers(consumers);
        }
        let mut dropped: Vec<Queued> = Vec::new();
        for subscriber in std::mem::take(&mut state.anycast).into_iter().chain(std::mem::take(&mut state.multicast)) {
            self.subscriptions.remove(&subscriber.key());
            if let Some(list) = self.by_consumer.get_mut(&subscriber.consumer) {
                list.retain(|id| *id != subscriber.subscription);
            }
            let refusal = Refusal::new(
                ErrorCode::InvalidState,
                format!(
                    "subscription {} ended: address \"{}\" was deleted by an operator (admin API); its messages \
                     are gone; subscribe again to consume what is sent to it from now on",
                    subscriber.subscription.0,
                    String::from_utf8_lossy(&name)
                ),
            );
            out.push((
                subscriber.consumer.shard,
                ConnCommand::SubscriptionEnded {
                    consumer: subscriber.consumer.conn,
                    subscription: subscriber.subscription,
                    refusal,
                },
            ));
            dropped.extend(subscriber.unacked.into_oldest_first());
        }
        let messages = state.queue.len();
        self.queued_bytes = self
            .queued_bytes
            .checked_sub(state.queued_bytes)
            .expect("the shard's queued bytes include every address's");
        dropped.extend(std::mem::take(&mut state.queue));
        for queued in &dropped {
            self.settle(&name, &queued.message, queued.id);
        }
        state.held_answers.release_all(out);
        if state.declared.as_ref().is_some_and(|settings| settings.durable) {
            self.durable_addresses.retain(|pattern| *pattern != name);
        }
        Deleted::Deleted { messages, consumers_ended: consumers }
    }
}
