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
pub mod sorted_ring;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::mbws::{AckMode, DeliveryMode, ErrorCode, Properties};

pub use crate::ids::ShardId;

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
    if shard_count == 1 {
        return ShardId(0);
    }
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
#[derive(Debug, Clone)]
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
    /// What a delivery of this message keeps alive until it is written: the bytes of every
    /// field (the bound on a subscription's unwritten auto-ack deliveries counts these).
    pub fn held_bytes(&self) -> usize {
        self.address.len() + self.field_bytes_but_address()
    }

    /// Bytes of every field but the address together (what [`StoredMessage::compact`] copies
    /// besides the address).
    fn field_bytes_but_address(&self) -> usize {
        let properties = &self.properties;
        properties.content_type.len()
            + properties.correlation_id.len()
            + properties.reply_to.len()
            + properties.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
            + self.body.len()
    }

    /// Moves every field into `arena`. A message that has to wait in a queue is compacted
    /// once, so that it does not keep the publisher's whole read buffer (16 KiB or more) alive
    /// for as long as it waits; messages delivered as they arrive are never copied.
    pub fn compact(&mut self, arena: &mut CompactionArena) {
        self.move_fields(arena, true);
    }

    /// [`StoredMessage::compact`], with the address replaced by `address`: the same name,
    /// already a compact copy that a queue's messages can share (the address table's own
    /// key), so only the other fields are copied.
    pub fn compact_sharing_address(&mut self, arena: &mut CompactionArena, address: &Bytes) {
        debug_assert_eq!(self.address, *address);
        self.address = address.clone();
        self.move_fields(arena, false);
    }

    /// Moves every field (the address too if `with_address`) into `arena`.
    fn move_fields(&mut self, arena: &mut CompactionArena, with_address: bool) {
        let address_bytes = if with_address { self.address.len() } else { 0 };
        let mut chunk = arena.room_for(address_bytes + self.field_bytes_but_address());
        // Inlined, so an empty field costs one test: they are the common case.
        #[inline(always)]
        fn move_field(chunk: &mut BytesMut, field: &mut Bytes) {
            // Empty fields stay static: nothing to copy, no reference to count.
            if !field.is_empty() {
                chunk.extend_from_slice(field);
                *field = chunk.split().freeze();
            }
        }
        if with_address {
            move_field(&mut chunk, &mut self.address);
        }
        move_field(&mut chunk, &mut self.properties.content_type);
        move_field(&mut chunk, &mut self.properties.correlation_id);
        move_field(&mut chunk, &mut self.properties.reply_to);
        for (name, value) in self.properties.headers.iter_mut() {
            move_field(&mut chunk, name);
            move_field(&mut chunk, value);
        }
        move_field(&mut chunk, &mut self.body);
        arena.give_back(chunk);
    }
}

/// Where a shard packs the messages that wait in its queues (see [`StoredMessage::compact`]):
/// chunks of `ARENA_CHUNK_BYTES` filled front to back, each field a slice of its chunk, so a
/// compaction is a copy and a reference-count increment instead of allocations. A chunk is
/// freed when the last message in it is gone; queues are consumed roughly in order, so chunks
/// empty roughly in order too, and the memory held stays close to the bytes queued (which
/// `max_queued_bytes` and the memory budget bound) plus one chunk being filled.
#[derive(Debug, Default)]
pub struct CompactionArena {
    /// The chunk being filled: its spare capacity is where the next message goes.
    chunk: BytesMut,
}

/// Size of an arena chunk.
const ARENA_CHUNK_BYTES: usize = 64 * 1024;
/// Messages larger than this get an allocation of their own (exactly their size) instead of
/// a place in a chunk.
const MAX_ARENA_MESSAGE_BYTES: usize = ARENA_CHUNK_BYTES / 8;

impl CompactionArena {
    /// A buffer with at least `bytes` of spare capacity, to be handed back with
    /// [`CompactionArena::give_back`] once the message is copied.
    fn room_for(&mut self, bytes: usize) -> BytesMut {
        if bytes > MAX_ARENA_MESSAGE_BYTES {
            return BytesMut::with_capacity(bytes);
        }
        if self.chunk.capacity() - self.chunk.len() < bytes {
            self.chunk = BytesMut::with_capacity(ARENA_CHUNK_BYTES);
        }
        std::mem::take(&mut self.chunk)
    }

    fn give_back(&mut self, chunk: BytesMut) {
        debug_assert!(chunk.is_empty(), "every copied field was split off");
        if chunk.capacity() > 0 && chunk.capacity() >= self.chunk.capacity() {
            self.chunk = chunk;
        }
    }
}

pub type SharedMessage = Arc<StoredMessage>;

/// The hash map of the broker's per-message paths: foldhash instead of std's SipHash (several
/// times cheaper for short keys), still seeded per process, since keys such as address names
/// come from clients.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

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
    /// Auto-ack deliveries that have been written to the consumer's socket: how many, and
    /// their [`StoredMessage::held_bytes`].
    ReturnCredit {
        consumer: ConnRef,
        subscription: SubscriptionId,
        count: u32,
        bytes: u64,
    },
    /// The connection is gone: drop its subscriptions here, requeue what it had not acknowledged.
    ConsumerGone {
        consumer: ConnRef,
    },
}

/// One message handed to one subscription.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub message_id: MessageId,
    pub message: SharedMessage,
    pub redelivered: bool,
}

/// The deliveries of one [`ConnCommand::Deliver`], oldest first; one inline, more on the heap.
pub type Deliveries = smallvec::SmallVec<[Delivered; 1]>;

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
    /// Deliveries for one subscription, in the order the consumer must see them: usually one,
    /// several when a batch of publishes to a multicast address reached the subscriber at once
    /// (one command, one trip through the work queue and one session lookup for all of them).
    Deliver {
        consumer: ConnId,
        subscription: SubscriptionId,
        deliveries: Deliveries,
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

    fn message(address: &str, body: &[u8]) -> StoredMessage {
        let mut properties = Properties { content_type: Bytes::from_static(b"text/plain"), ..Properties::default() };
        properties.headers.push((Bytes::from_static(b"x-a"), Bytes::from_static(b"1")));
        StoredMessage {
            address: Bytes::copy_from_slice(address.as_bytes()),
            durable: false,
            expires_at_ms: 0,
            properties,
            body: Bytes::copy_from_slice(body),
            body_is_text: false,
        }
    }

    #[test]
    fn compaction_copies_every_field_next_to_the_previous_message() {
        let mut arena = CompactionArena::default();
        let mut first = message("orders", b"first body");
        let original_body = first.body.clone();
        first.compact(&mut arena);
        let mut second = message("orders", b"second");
        second.compact(&mut arena);
        for compacted in [&first, &second] {
            assert_eq!(compacted.address, "orders");
            assert_eq!(compacted.properties.content_type, "text/plain");
            assert_eq!(compacted.properties.headers[0], (Bytes::from_static(b"x-a"), Bytes::from_static(b"1")));
            assert!(compacted.properties.correlation_id.is_empty());
        }
        assert_eq!(first.body, original_body);
        assert_ne!(first.body.as_ptr(), original_body.as_ptr(), "the copy no longer points at the original");
        // Packed: the second message starts where the first one's body ends.
        assert_eq!(second.address.as_ptr(), first.body.as_ptr().wrapping_add(first.body.len()));
    }

    #[test]
    fn compaction_sharing_the_address_copies_only_the_other_fields() {
        let mut arena = CompactionArena::default();
        let key = Bytes::copy_from_slice(b"orders");
        let mut first = message("orders", b"first body");
        first.compact_sharing_address(&mut arena, &key);
        let mut second = message("orders", b"second");
        second.compact_sharing_address(&mut arena, &key);
        for compacted in [&first, &second] {
            assert_eq!(compacted.address.as_ptr(), key.as_ptr(), "the address is the shared key");
            assert_eq!(compacted.properties.content_type, "text/plain");
            assert_eq!(compacted.properties.headers[0], (Bytes::from_static(b"x-a"), Bytes::from_static(b"1")));
        }
        assert_eq!((first.body.as_ref(), second.body.as_ref()), (&b"first body"[..], &b"second"[..]));
        // Packed without the address: the second message's first field follows the first's body.
        assert_eq!(second.properties.content_type.as_ptr(), first.body.as_ptr().wrapping_add(first.body.len()));
    }

    #[test]
    fn large_messages_get_their_own_allocation_and_leave_the_chunk_alone() {
        let mut arena = CompactionArena::default();
        let mut small = message("a", b"small");
        small.compact(&mut arena);
        let mut large = message("a", &vec![7u8; MAX_ARENA_MESSAGE_BYTES + 1]);
        large.compact(&mut arena);
        assert_eq!(large.body.len(), MAX_ARENA_MESSAGE_BYTES + 1);
        assert!(large.body.iter().all(|&byte| byte == 7));
        let mut next = message("a", b"next");
        next.compact(&mut arena);
        assert_eq!(next.address.as_ptr(), small.body.as_ptr().wrapping_add(small.body.len()));
    }

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
