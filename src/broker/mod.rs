//! Broker state machines: what happens to messages, independent of sockets and threads.
//!
//! - [`address`]: the [`AddressTable`](address::AddressTable) a shard owns: queues,
//!   subscribers, credit, acknowledgement and redelivery for the addresses hashed to it.
//! - `crate::conn::session`: the other side, the per-connection MBWS session.
//!
//! The two talk only through the commands below, which the shard runtime carries (over a
//! crossbeam channel when the address and the connection live on different shards, or through
//! the shard's local work queue when they share one). Both sides are plain structs driven by
//! method calls that push their effects into `Vec`s: no IO, no clock (time comes in as
//! `now_ms`), so every rule is testable without a socket.

pub mod address;

use std::sync::Arc;

use bytes::Bytes;

use crate::mbws::{AckMode, DeliveryMode, ErrorCode, Properties};

/// Index of a shard thread, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// A connection slot on its shard; the generation makes a reused slot a different id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

/// A connection anywhere in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: ShardId,
    pub conn: ConnId,
}

/// The client's name for one of its subscriptions (unique within its session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u32);

/// Identifier of a message within its address, assigned by the owner shard: 1, 2, 3...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

/// The shard that owns `address`: a fixed hash (FNV-1a, 64-bit), never randomly seeded, so an
/// address lands on the same shard in every process with the same shard count (the durable log
/// relies on it).
pub fn owner_of(address: &[u8], shard_count: usize) -> ShardId {
    debug_assert!(shard_count > 0 && shard_count <= u16::MAX as usize);
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for &byte in address {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    ShardId((hash % shard_count as u64) as u16)
}

/// A message as the broker keeps it: every field is a slice of the publisher's WebSocket
/// payload, so sharing it (an `Arc` clone per delivery) never copies the body.
#[derive(Debug)]
pub struct StoredMessage {
    pub address: Bytes,
    pub durable: bool,
    /// Milliseconds on the broker's monotonic clock after which the message is dropped
    /// instead of delivered; 0 for never.
    pub expires_at_ms: u64,
    pub properties: Properties,
    pub body: Bytes,
    /// True when the body arrived in a text frame (so it is known to be valid UTF-8).
    pub body_is_text: bool,
}

impl StoredMessage {
    /// A copy whose fields own compact allocations of their own. A message that has to wait in
    /// a queue is compacted once, so that it does not keep the publisher's whole read buffer
    /// (64 KiB or more) alive for as long as it waits; messages delivered as they arrive are
    /// never copied.
    pub fn compacted(&self) -> StoredMessage {
        let own = |bytes: &Bytes| Bytes::copy_from_slice(bytes);
        StoredMessage {
            address: own(&self.address),
            durable: self.durable,
            expires_at_ms: self.expires_at_ms,
            properties: Properties {
                content_type: own(&self.properties.content_type),
                correlation_id: own(&self.properties.correlation_id),
                reply_to: own(&self.properties.reply_to),
                headers: self.properties.headers.iter().map(|(name, value)| (own(name), own(value))).collect(),
            },
            body: own(&self.body),
            body_is_text: self.body_is_text,
        }
    }
}

pub type SharedMessage = Arc<StoredMessage>;

/// Why the broker refused a command: an MBWS error code and a reason a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Refusal {
        Refusal { code, reason: reason.into() }
    }
}

/// Commands for the shard that owns an address.
#[derive(Debug)]
pub enum AddressCommand {
    /// Queue or deliver a message; the owner always answers [`ConnCommand::PublishDone`].
    Publish {
        publisher: ConnRef,
        seq: u64,
        message: SharedMessage,
    },
    Subscribe {
        consumer: ConnRef,
        subscription: SubscriptionId,
        address: Bytes,
        mode: DeliveryMode,
        ack_mode: AckMode,
        credit: u32,
    },
    Unsubscribe {
        consumer: ConnRef,
        subscription: SubscriptionId,
    },
    /// The consumer acknowledged these deliveries (client ack mode).
    Ack {
        consumer: ConnRef,
        subscription: SubscriptionId,
        messages: smallvec::SmallVec<[MessageId; 4]>,
    },
    /// The consumer refused a delivery: back to the queue (`requeue`) or dropped.
    Nack {
        consumer: ConnRef,
        subscription: SubscriptionId,
        message: MessageId,
        requeue: bool,
    },
    /// FLOW: the subscription's new credit (most unacknowledged deliveries).
    SetCredit {
        consumer: ConnRef,
        subscription: SubscriptionId,
        credit: u32,
    },
    /// Auto-ack deliveries that have been written to the consumer's socket.
    ReturnCredit {
        consumer: ConnRef,
        subscription: SubscriptionId,
        count: u32,
    },
    /// The connection is gone: drop its subscriptions here, requeue what it had not acknowledged.
    ConsumerGone {
        consumer: ConnRef,
    },
}

/// Commands for the shard that holds a connection.
#[derive(Debug)]
pub enum ConnCommand {
    PublishDone {
        publisher: ConnId,
        seq: u64,
        outcome: Result<(), Refusal>,
    },
    SubscribeDone {
        consumer: ConnId,
        subscription: SubscriptionId,
        outcome: Result<(), Refusal>,
    },
    Deliver {
        consumer: ConnId,
        subscription: SubscriptionId,
        message_id: MessageId,
        message: SharedMessage,
        redelivered: bool,
    },
    /// The owner ended a subscription on its own (e.g. a slow multicast consumer).
    SubscriptionEnded {
        consumer: ConnId,
        subscription: SubscriptionId,
        refusal: Refusal,
    },
    /// The ack timeout took a delivery back: the consumer forgets it (a late ACK changes nothing).
    DeliveryExpired {
        consumer: ConnId,
        subscription: SubscriptionId,
        message_id: MessageId,
    },
}

impl ConnCommand {
    pub fn conn(&self) -> ConnId {
        match self {
            ConnCommand::PublishDone { publisher, .. } => *publisher,
            ConnCommand::SubscribeDone { consumer, .. }
            | ConnCommand::Deliver { consumer, .. }
            | ConnCommand::SubscriptionEnded { consumer, .. }
            | ConnCommand::DeliveryExpired { consumer, .. } => *consumer,
        }
    }
}

/// Anything one shard asks of another (or of itself).
#[derive(Debug)]
pub enum Command {
    Address(AddressCommand),
    Conn(ConnCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_stable_and_spread() {
        // Fixed values: a change of hash would move durable addresses between shards.
        assert_eq!(owner_of(b"orders", 1), ShardId(0));
        let first = owner_of(b"orders", 4);
        assert_eq!(first, owner_of(b"orders", 4));
        let mut seen = [0usize; 4];
        for index in 0..1000 {
            seen[owner_of(format!("address-{index}").as_bytes(), 4).0 as usize] += 1;
        }
        assert!(seen.iter().all(|&count| count > 150), "poor spread over shards: {seen:?}");
    }
}
