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
mod shared_message;
pub mod sorted_ring;
pub mod text_tails;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::mbws::binary::MessageTail;
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

/// A message as the broker keeps it: its address, properties and body as one
/// [`MessageTail`] (the binary binding's layout, which is also the end of every binary MESSAGE
/// that delivers it), so sharing it (a [`SharedMessage`] clone per delivery) never copies the body, and a
/// binary delivery writes only its own fixed fields before the shared tail.
///
/// What the tail holds: a binary SEND's is a slice of the read buffer it arrived in; a text
/// SEND's, a slice of a chunk its shard's thread encodes text tails into ([`text_tails`]), or
/// an allocation of its own when it is large; a compacted message's, a slice of a
/// [`CompactionArena`] chunk (or its own allocation, large); a recovered or dead-lettered
/// message's, an allocation of its own ([`StoredMessage::from_fields`]).
#[derive(Debug, Clone)]
pub struct StoredMessage {
    tail: MessageTail,
    pub durable: bool,
    /// Milliseconds on the broker's monotonic clock after which the message is dropped
    /// instead of delivered; 0 for never.
    pub expires_at_ms: u64,
    /// True when the body arrived in a text frame (so it is known to be valid UTF-8).
    pub body_is_text: bool,
    /// Sent by another cluster node's forwarder (its session is a cluster link,
    /// [`crate::cluster::view::LINK_HEADER`]): never forwarded again (one hop at most).
    pub from_cluster_link: bool,
}

impl StoredMessage {
    pub fn new(tail: MessageTail, durable: bool, expires_at_ms: u64, body_is_text: bool) -> StoredMessage {
        StoredMessage { tail, durable, expires_at_ms, body_is_text, from_cluster_link: false }
    }

    /// What a delivery of this message keeps alive until it is written: the bytes of its
    /// address, properties and body, all in its one tail (the bound on a subscription's
    /// unwritten auto-ack deliveries counts these).
    pub fn held_bytes(&self) -> usize {
        self.tail.as_bytes().len()
    }

    /// A message made of fields held elsewhere (a recovered record, a dead-lettered copy,
    /// tests): they are encoded into a tail of their own.
    pub fn from_fields(address: &[u8], properties: &Properties, body: &[u8], durable: bool) -> StoredMessage {
        StoredMessage::new(MessageTail::encode(address, properties, body), durable, 0, false)
    }

    pub fn address(&self) -> &[u8] {
        self.tail.address()
    }

    /// The address as a slice of the message's buffer (one reference count): for lookups
    /// only; a name the table keeps is copied (see `new_address`).
    pub fn address_bytes(&self) -> Bytes {
        let bytes = self.tail.as_bytes();
        bytes.slice(1..1 + usize::from(bytes[0]))
    }

    /// The properties as slices of the message (see [`MessageTail::properties`]).
    pub fn properties(&self) -> Properties {
        self.tail.properties()
    }

    pub fn body(&self) -> &[u8] {
        self.tail.body()
    }

    pub fn body_bytes(&self) -> Bytes {
        self.tail.body_bytes()
    }

    pub fn tail(&self) -> &MessageTail {
        &self.tail
    }

    /// Copies the message into `arena`, in one piece. A message that waits long in a queue
    /// is compacted once (`broker::address`'s `compaction`), so that it does not keep the
    /// publisher's whole read buffer (64 KiB by default) alive for as long as it waits;
    /// messages delivered promptly are never copied.
    pub fn compact(&mut self, arena: &mut CompactionArena) {
        arena.with_room(self.tail.as_bytes().len(), |chunk| self.tail.move_into(chunk));
    }
}

/// Where a shard packs the messages that wait in its queues (see [`StoredMessage::compact`]):
/// chunks of `ARENA_CHUNK_BYTES` filled front to back, each field a slice of its chunk, so a
/// compaction is a copy and a reference-count increment instead of allocations. A chunk is
/// freed when the last message in it is gone; queues are consumed roughly in order, so chunks
/// empty roughly in order too, and the memory held stays close to the bytes queued (which
/// `max_queued_bytes` and the memory budget bound) plus one chunk being filled. Each thread
/// keeps one more for the tails of text SENDs ([`text_tails`]).
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
    /// Runs `fill` with an empty buffer that has at least `bytes` of spare capacity, for it to
    /// write a message into and split it off: the chunk being filled (a new one when it has
    /// too little room left), or an allocation of its own for a large message.
    fn with_room<T>(&mut self, bytes: usize, fill: impl FnOnce(&mut BytesMut) -> T) -> T {
        if bytes > MAX_ARENA_MESSAGE_BYTES {
            return fill(&mut BytesMut::with_capacity(bytes));
        }
        if self.chunk.capacity() - self.chunk.len() < bytes {
            self.chunk = BytesMut::with_capacity(ARENA_CHUNK_BYTES);
        }
        let filled = fill(&mut self.chunk);
        debug_assert!(self.chunk.is_empty(), "every copied field was split off");
        filled
    }
}

pub use shared_message::{SharedMessage, SLAB_SLOTS};

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

/// The message ids one ACK covers for one subscription. A cumulative ACK of a consumer that
/// acknowledges in order usually covers consecutive ids (one subscriber of an address takes
/// every id in turn): those travel as a run, so that neither the session nor the owner builds
/// or walks a list of them; anything else (gaps, other subscribers' shares of the ids, single
/// ACKs) is a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckedMessages {
    /// The ids `first .. first + count` (`count` >= 1), every one of them acknowledged.
    Run { first: MessageId, count: u32 },
    /// These ids, in the order their deliveries were acknowledged.
    List(smallvec::SmallVec<[MessageId; 4]>),
}

impl AckedMessages {
    /// How many ids the ACK covers.
    pub fn len(&self) -> usize {
        match self {
            AckedMessages::Run { count, .. } => *count as usize,
            AckedMessages::List(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids, in order.
    pub fn iter(&self) -> impl Iterator<Item = MessageId> + Clone + '_ {
        let (run, list) = match self {
            AckedMessages::Run { first, count } => (first.0..first.0 + u64::from(*count), &[][..]),
            AckedMessages::List(ids) => (0..0, &ids[..]),
        };
        run.map(MessageId).chain(list.iter().copied())
    }
}

impl From<smallvec::SmallVec<[MessageId; 4]>> for AckedMessages {
    fn from(ids: smallvec::SmallVec<[MessageId; 4]>) -> Self {
        AckedMessages::List(ids)
    }
}

/// A list of the ids (what a test or a NACK-free single ACK builds); never a run.
impl FromIterator<MessageId> for AckedMessages {
    fn from_iter<I: IntoIterator<Item = MessageId>>(ids: I) -> Self {
        AckedMessages::List(ids.into_iter().collect())
    }
}

impl IntoIterator for AckedMessages {
    type Item = MessageId;
    type IntoIter = std::iter::Chain<
        std::iter::Map<std::ops::Range<u64>, fn(u64) -> MessageId>,
        smallvec::IntoIter<[MessageId; 4]>,
    >;

    /// The ids, in order.
    fn into_iter(self) -> Self::IntoIter {
        let (run, list) = match self {
            AckedMessages::Run { first, count } => (first.0..first.0 + u64::from(count), smallvec::SmallVec::new()),
            AckedMessages::List(ids) => (0..0, ids),
        };
        run.map(MessageId as fn(u64) -> MessageId).chain(list)
    }
}

/// Commands for the shard that owns an address.
#[derive(Debug)]
pub enum AddressCommand {
    /// Queue or deliver a message; the owner always answers, with [`ConnCommand::PublishDone`]
    /// or (accepted, maybe with the SENDs next to it) [`ConnCommand::PublishesAccepted`].
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
        messages: AckedMessages,
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

/// The deliveries of one [`ConnCommand::Deliver`], oldest first (read as a slice): a list of
/// their own (one inline, more on the heap), or the first `len` of a publish batch's list,
/// which every subscriber that takes them shares: a batch fanned out to many subscribers is
/// one list, not one per subscriber (`AddressTable::publish_batch`'s multicast path).
#[derive(Debug, Clone)]
pub enum Deliveries {
    Own(smallvec::SmallVec<[Delivered; 1]>),
    Shared { batch: Arc<[Delivered]>, len: usize },
}

impl Deliveries {
    pub fn new() -> Deliveries {
        Deliveries::Own(smallvec::SmallVec::new())
    }

    pub fn with_capacity(capacity: usize) -> Deliveries {
        Deliveries::Own(smallvec::SmallVec::with_capacity(capacity))
    }

    pub fn one(delivered: Delivered) -> Deliveries {
        Deliveries::Own(smallvec::smallvec![delivered])
    }

    /// The first `len` of `batch` (at most all of it).
    pub fn shared(batch: Arc<[Delivered]>, len: usize) -> Deliveries {
        assert!(len <= batch.len(), "a share of {len} deliveries of a batch of {}", batch.len());
        Deliveries::Shared { batch, len }
    }

    /// Adds a delivery after the others (a shared list becomes one of its own first: rare).
    #[inline]
    pub fn push(&mut self, delivered: Delivered) {
        match self {
            Deliveries::Own(own) => own.push(delivered),
            Deliveries::Shared { .. } => self.push_after_shared(delivered),
        }
    }

    /// Adds deliveries after the others, as [`Deliveries::push`] does each (into room already
    /// there, when the list was made with capacity for them, without a check per delivery).
    #[inline]
    pub fn extend(&mut self, delivered: impl Iterator<Item = Delivered>) {
        match self {
            Deliveries::Own(own) => own.extend(delivered),
            Deliveries::Shared { .. } => delivered.for_each(|delivered| self.push_after_shared(delivered)),
        }
    }

    #[cold]
    fn push_after_shared(&mut self, delivered: Delivered) {
        let mut own: smallvec::SmallVec<[Delivered; 1]> = self.iter().cloned().collect();
        own.push(delivered);
        *self = Deliveries::Own(own);
    }
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries::new()
    }
}

impl std::ops::Deref for Deliveries {
    type Target = [Delivered];

    #[inline]
    fn deref(&self) -> &[Delivered] {
        match self {
            Deliveries::Own(own) => own,
            Deliveries::Shared { batch, len } => &batch[..*len],
        }
    }
}

impl From<smallvec::SmallVec<[Delivered; 1]>> for Deliveries {
    fn from(own: smallvec::SmallVec<[Delivered; 1]>) -> Deliveries {
        Deliveries::Own(own)
    }
}

impl<'a> IntoIterator for &'a Deliveries {
    type Item = &'a Delivered;
    type IntoIter = std::slice::Iter<'a, Delivered>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Commands for the shard that holds a connection.
#[derive(Debug)]
pub enum ConnCommand {
    PublishDone {
        publisher: ConnId,
        seq: u64,
        outcome: Result<(), Refusal>,
    },
    /// Consecutive SENDs of one publisher, all accepted: seqs `first_seq` to
    /// `first_seq + count - 1`, or (`first_seq` 0) `count` unnumbered MBLWS SENDs. The address
    /// table joins accepted answers that it makes one after another for one publisher
    /// (`address::push_accepted`), so a batch of SENDs is answered with one command: one trip
    /// through the work queue and one session lookup instead of one per SEND.
    PublishesAccepted {
        publisher: ConnId,
        first_seq: u64,
        count: u32,
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
            ConnCommand::PublishDone { publisher, .. } | ConnCommand::PublishesAccepted { publisher, .. } => *publisher,
            ConnCommand::SubscribeDone { consumer, .. }
            | ConnCommand::Deliver { consumer, .. }
            | ConnCommand::SubscriptionEnded { consumer, .. }
            | ConnCommand::DeliveryExpired { consumer, .. } => *consumer,
        }
    }

    /// Joins `added` accepted SENDs of `publisher` from `seq` on (`seq` 0: unnumbered ones) to
    /// this answer when it is a [`ConnCommand::PublishesAccepted`] of the same publisher's
    /// SENDs just before them (the next seq, or more unnumbered ones); false if it is not.
    pub fn join_accepted(&mut self, publisher: ConnId, seq: u64, added: u32) -> bool {
        let ConnCommand::PublishesAccepted { publisher: conn, first_seq, count } = self else { return false };
        let next = match *first_seq {
            0 => seq == 0,
            first => seq == first + u64::from(*count),
        };
        if !next || *conn != publisher {
            return false;
        }
        match count.checked_add(added) {
            Some(joined) => {
                *count = joined;
                true
            }
            None => false,
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
        StoredMessage::from_fields(address.as_bytes(), &properties, body, false)
    }

    /// A run and the list of its ids name the same messages, in the same order, whichever
    /// way they are read (the cluster's relay takes them by value).
    #[test]
    fn an_acked_run_names_the_ids_of_its_list() {
        let run = AckedMessages::Run { first: MessageId(7), count: 3 };
        let list: AckedMessages = [7, 8, 9].into_iter().map(MessageId).collect();
        assert_eq!(run.iter().collect::<Vec<_>>(), list.iter().collect::<Vec<_>>());
        assert_eq!(run.clone().into_iter().collect::<Vec<_>>(), list.clone().into_iter().collect::<Vec<_>>());
        assert_eq!((run.len(), list.len()), (3, 3));
        assert_eq!(list.into_iter().map(|id| id.0).collect::<Vec<_>>(), [7, 8, 9]);
        assert!(AckedMessages::List(Default::default()).is_empty());
    }

    #[test]
    fn compaction_copies_the_message_in_one_piece_next_to_the_previous_one() {
        let mut arena = CompactionArena::default();
        let mut first = message("orders", b"first body");
        let original = first.tail().as_bytes().clone();
        first.compact(&mut arena);
        let mut second = message("orders", b"second");
        second.compact(&mut arena);
        for compacted in [&first, &second] {
            assert_eq!(compacted.address(), b"orders");
            let properties = compacted.properties();
            assert_eq!(properties.content_type, "text/plain");
            assert_eq!(properties.headers[0], (Bytes::from_static(b"x-a"), Bytes::from_static(b"1")));
            assert!(properties.correlation_id.is_empty());
        }
        assert_eq!(first.tail().as_bytes(), &original);
        assert_eq!(first.body(), b"first body");
        assert_ne!(first.tail().as_bytes().as_ptr(), original.as_ptr(), "the copy no longer points at the original");
        // Packed: the second message starts where the first one ends.
        let first_bytes = first.tail().as_bytes();
        assert_eq!(second.tail().as_bytes().as_ptr(), first_bytes.as_ptr().wrapping_add(first_bytes.len()));
    }

    #[test]
    fn large_messages_get_their_own_allocation_and_leave_the_chunk_alone() {
        let mut arena = CompactionArena::default();
        let mut small = message("a", b"small");
        small.compact(&mut arena);
        let mut large = message("a", &vec![7u8; MAX_ARENA_MESSAGE_BYTES + 1]);
        large.compact(&mut arena);
        assert_eq!(large.body().len(), MAX_ARENA_MESSAGE_BYTES + 1);
        assert!(large.body().iter().all(|&byte| byte == 7));
        let mut next = message("a", b"next");
        next.compact(&mut arena);
        let small_bytes = small.tail().as_bytes();
        assert_eq!(next.tail().as_bytes().as_ptr(), small_bytes.as_ptr().wrapping_add(small_bytes.len()));
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
