//! Relaying subscriptions between cluster nodes: the IO side of
//! [`Forward::Subscribe`](super::view::Forward::Subscribe) and
//! [`Forward::Settle`](super::view::Forward::Settle).
//!
//! A client that SUBSCRIBEs on a node that does not own the address keeps its subscription
//! there: the node's placement view hands the SUBSCRIBE to the shard's shell, which gives it to
//! the **relay** of the owner node (one per shard and owner node, started on first use, a
//! thread `mbws-relay-S-NODE` with one MBWS session on the reliable subprotocol to the owner's
//! advertise URL, opened with `mbws-client`'s blocking client, which resumes it after a lost
//! connection). The relay opens at the owner a **client-ack** subscription with the consumer's
//! mode, address and credit, under an id of its own (numbered from
//! [`RELAYED_SUBSCRIPTION_BIT`], so the owner never relays it again), and:
//!
//! - answers the consumer's SUBSCRIBE with the owner's SUBSCRIBED or ERROR (code and reason);
//! - turns each MESSAGE from the owner into a `ConnCommand::Deliver` for the consumer's
//!   shard, with the owner's message id and the owner's bytes (the MESSAGE's tail, read by
//!   [`Client::next_read_incoming`], becomes the stored message: no copy): the consumer's
//!   session numbers it and writes an ordinary MESSAGE in the consumer's own binding and
//!   subprotocol;
//! - relays the consumer's ACK and NACK as ACK and NACK of the owner's delivery (it keeps, per
//!   relayed subscription, the owner's delivery sequence of each message id the consumer
//!   holds), and FLOW one for one. The owner holds the relay to the consumer's credit, and the
//!   relay acknowledges only what the consumer did: **credit is end to end**, the owner never
//!   has more deliveries out than the consumer granted. What a consumer holds is kept in
//!   delivery order while it settles in that order, the usual case (`Held`), and the
//!   deliveries not yet settled over the whole session in a deque (`Outstanding`): no
//!   hashing and no tree per message;
//! - an auto-ack subscription is acknowledged at the owner when the consumer's shard has
//!   written the delivery to the consumer's socket (its `ReturnCredit`), oldest first; a
//!   delivery lost with the consumer's connection before it was written is not acknowledged,
//!   and the owner requeues it (anycast);
//! - acknowledges **promptly and cumulatively**: after each round of settlements, one
//!   cumulative ACK through the delivery before the oldest still outstanding (over the whole
//!   session); a delivery settled above an older outstanding one (another consumer holds it)
//!   gets a single ACK at once, so no subscription waits on another's for its credit;
//! - UNSUBSCRIBE, and the consumer's end (`ConsumerGone`: disconnect, expiry), UNSUBSCRIBE at
//!   the owner, whose queue gets back what was not acknowledged (anycast).
//!
//! A node's **feed** of a multicast address (its consumer is [`FEED_CONN`]; see
//! [`super::view`]) is relayed the same way, except that its SUBSCRIBED, its MESSAGEs and its
//! end go to the address's shard as [`ClusterUpdate::FeedConfirmed`], [`ClusterUpdate::Fed`]
//! and [`ClusterUpdate::FeedEnded`] (its view fans the messages out and settles them with a
//! `ReturnCredit`, as for an auto-ack subscription).
//!
//! **Failures.** The owner refusing or ending the subscription (a move, its fencing, a slow
//! multicast consumer) ends the consumer's with the owner's ERROR. The view seeing the
//! address placed on another node ends it too ([`Forward::End`](super::view::Forward::End),
//! 4421 naming the new owner), without waiting for the old owner, who may be dead, stopped
//! or partitioned, and so does this node's fencing (4421, "fenced"); the relay decides which
//! word ends it, once, whichever comes first. The
//! owner unreachable (a connection that cannot be made or resumed within [`WAIT_BOUND`] / [`RESUME_WINDOW`](super::forward::RESUME_WINDOW), no
//! SUBSCRIBED or no answer to a PING within [`WAIT_BOUND`]) ends every subscription of the
//! relay with non-fatal **4503** naming the node; SUBSCRIBEs during the backoff that follows
//! are refused at once the same way. The view forgets what the relay ended
//! ([`ClusterUpdate::RelayEnded`]).
//!
//! **Bounds.** A relay's queue holds at most [`RELAY_QUEUE_BOUND`] commands; a SUBSCRIBE
//! beyond is refused with 4429, and a relayed subscription whose ACK, NACK, FLOW or
//! UNSUBSCRIBE finds the queue full is ended with 4429 (and unsubscribed at the owner as soon
//! as the relay gets to it). Deliveries in flight are bounded by the credits. Subscriptions
//! per relay are bounded by the owner's `max_subscriptions` (its refusal reaches the
//! consumer).
//!
//! **Waiting.** The relay's thread waits in poll(2) on its session's socket and its queue's
//! eventfd (`cluster::wait`): a MESSAGE from the owner or a settlement from the consumer wakes
//! it at once, so end-to-end credit comes back within one wake-up. It reads what the socket
//! holds, hands the consumers' shards their deliveries (one `Deliver` per run of MESSAGEs for
//! one subscription, at most [`FRAMES_PER_ROUND`]), writes its ACKs, FLOWs and SUBSCRIBEs in one
//! flush, and waits again. The wait's bound is only for what is due at a time (a PING after
//! [`IDLE_TICK`] of silence, an answer's [`WAIT_BOUND`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use mbws_client::{Client, ClientError, Incoming};

use super::forward::{connect_to_owner, Answers, FIRST_BACKOFF, MAX_BACKOFF, WAIT_BOUND};
use super::view::{ClusterUpdate, NodeRef, FEED_CONN, RELAYED_SUBSCRIPTION_BIT};
use super::wait::QueueWake;
use super::PeerLogin;
use crate::broker::{
    AddressCommand, Command, ConnCommand, ConnRef, Delivered, FastMap, MessageId, Refusal, ShardId, SharedMessage,
    StoredMessage, SubscriptionId,
};
use crate::log;
use crate::logging::Level;
use crate::mbws::binary::MessageWithTail;
use crate::mbws::{self, AckMode, DeliveryMode, ErrorCode, Frame};
use crate::shard::mailbox::{Envelope, PostOffice};

/// Most commands one relay keeps queued (SUBSCRIBEs and what settles relayed subscriptions).
pub const RELAY_QUEUE_BOUND: usize = 16_384;
/// Most a read waits once poll(2) said the socket is readable (it holds data, so the read
/// returns at once; the bound is for a spurious wake-up).
const READ_AFTER_READABLE: Duration = Duration::from_millis(100);
/// Most frames read from the owner in one round, before the queue is looked at again.
pub const FRAMES_PER_ROUND: usize = 512;
/// The longest an idle relay waits before it looks at its session again; also the silence
/// after which a relay with subscriptions PINGs the owner.
pub const IDLE_TICK: Duration = Duration::from_secs(1);
/// Most UNSUBSCRIBEs remembered to be written again after a resumed connection.
const RECENT_UNSUBSCRIBES: usize = 1024;
/// Most times a session may resume within one round before the relay gives it up.
const RESUMES_PER_ROUND: usize = 8;

/// One command for a relay.
enum Job {
    Subscribe {
        ticket: u64,
        command: AddressCommand,
    },
    Settle(AddressCommand),
    /// The view's [`Forward::End`](super::view::Forward::End): the address moved to another
    /// node, or this node is fenced.
    End {
        consumer: ConnRef,
        subscription: SubscriptionId,
        ticket: u64,
        refusal: Refusal,
    },
}

/// What to end because its command found the relay's queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    Subscription(ConnRef, SubscriptionId),
    Consumer(ConnRef),
}

struct RelayHandle {
    jobs: Sender<Job>,
    /// At most one entry per relayed subscription and consumer.
    overflowed: Arc<Mutex<Vec<Overflow>>>,
    /// Written after each push to `jobs` or `overflowed`.
    wake: QueueWake,
}

impl RelayHandle {
    /// Records what a full queue could not take, once, and wakes the relay for it; false if
    /// it was recorded already (then it was handled already, too).
    fn note_overflow(&self, overflow: Overflow) -> bool {
        let mut overflowed = self.overflowed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if overflowed.contains(&overflow) {
            return false;
        }
        overflowed.push(overflow);
        drop(overflowed);
        self.wake.notify();
        true
    }
}

/// The relays of one shard, by owner node (see the module doc).
pub struct Relays {
    shard: ShardId,
    post_office: Arc<PostOffice>,
    /// The credentials and CA file of every relay's session (`--cluster-login`...).
    login: Arc<PeerLogin>,
    by_node: FastMap<Arc<NodeRef>, RelayHandle>,
}

impl Relays {
    pub fn new(shard: ShardId, post_office: Arc<PostOffice>, login: Arc<PeerLogin>) -> Relays {
        Relays { shard, post_office, login, by_node: FastMap::default() }
    }

    /// Queues a relayed SUBSCRIBE on its owner's relay; refuses it (4503 the relay cannot be
    /// started, 4429 its queue is full) and tells the view so.
    pub(super) fn subscribe(
        &mut self,
        owner: Arc<NodeRef>,
        ticket: u64,
        command: AddressCommand,
        answers: &mut Answers,
    ) {
        let AddressCommand::Subscribe { consumer, subscription, .. } = &command else {
            debug_assert!(false, "a relayed SUBSCRIBE that is not a SUBSCRIBE");
            return;
        };
        let (consumer, subscription) = (*consumer, *subscription);
        let refusal = match self.queue(&owner, Job::Subscribe { ticket, command }) {
            Ok(()) => return,
            Err(QueueError::Full) => Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "{RELAY_QUEUE_BOUND} commands already wait for the relay to cluster node \"{}\" ({}); subscribe \
                     again later",
                    owner.name, owner.url
                ),
            ),
            Err(QueueError::Unavailable(reason)) => Refusal::new(ErrorCode::Unavailable, reason),
        };
        ended(&self.post_office, self.shard, consumer, subscription, ticket, false, refusal, answers);
    }

    /// Queues what settles a relayed subscription on its owner's relay. A full queue ends the
    /// subscription with 4429 (the relay unsubscribes it at the owner when it gets to it).
    pub(super) fn settle(&mut self, owner: Arc<NodeRef>, command: AddressCommand, answers: &mut Answers) {
        let overflow = match &command {
            AddressCommand::ConsumerGone { consumer } => Overflow::Consumer(*consumer),
            AddressCommand::Ack { consumer, subscription, .. }
            | AddressCommand::Nack { consumer, subscription, .. }
            | AddressCommand::SetCredit { consumer, subscription, .. }
            | AddressCommand::ReturnCredit { consumer, subscription, .. }
            | AddressCommand::Unsubscribe { consumer, subscription }
            | AddressCommand::Subscribe { consumer, subscription, .. } => {
                Overflow::Subscription(*consumer, *subscription)
            }
            AddressCommand::Publish { .. } => {
                debug_assert!(false, "a SEND to settle");
                return;
            }
        };
        if self.queue(&owner, Job::Settle(command)).is_ok() {
            return;
        }
        // Full, or the relay cannot be started (then it holds nothing to settle anyway).
        let Some(handle) = self.by_node.get(&owner) else { return };
        if !handle.note_overflow(overflow) {
            return;
        }
        if let Overflow::Subscription(consumer, subscription) = overflow {
            let refusal = Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "the relayed subscription was ended: {RELAY_QUEUE_BOUND} commands already wait for the relay to \
                     cluster node \"{}\" ({}); subscribe again",
                    owner.name, owner.url
                ),
            );
            // A feed's ticket is its subscription id's (ticket 0 would name any subscription).
            let ticket = if consumer.conn == FEED_CONN { u64::from(subscription.0) } else { 0 };
            ended(&self.post_office, self.shard, consumer, subscription, ticket, true, refusal, answers);
        }
    }

    /// Asks the relay to end the relayed subscription `ticket` with `refusal` (its address
    /// moved to another node), unless it ended already. A full queue ends it here, as an
    /// overflowing settlement does (the relay unsubscribes it at the owner when it gets to it).
    pub(super) fn end(
        &mut self,
        owner: Arc<NodeRef>,
        consumer: ConnRef,
        subscription: SubscriptionId,
        ticket: u64,
        refusal: Refusal,
        answers: &mut Answers,
    ) {
        let job = Job::End { consumer, subscription, ticket, refusal: refusal.clone() };
        let Err(QueueError::Full) = self.queue(&owner, job) else {
            // Queued; or the relay cannot be started, and then it holds nothing to end.
            return;
        };
        let Some(handle) = self.by_node.get(&owner) else { return };
        if !handle.note_overflow(Overflow::Subscription(consumer, subscription)) {
            // Ended already for the same overflow.
            return;
        }
        ended(&self.post_office, self.shard, consumer, subscription, ticket, true, refusal, answers);
    }

    fn queue(&mut self, owner: &Arc<NodeRef>, mut job: Job) -> Result<(), QueueError> {
        for _ in 0..2 {
            let handle = match self.by_node.get(owner) {
                Some(handle) => handle,
                None => match spawn(self.shard, owner.clone(), self.post_office.clone(), self.login.clone()) {
                    Ok(handle) => self.by_node.entry(owner.clone()).or_insert(handle),
                    Err(error) => {
                        return Err(QueueError::Unavailable(format!(
                            "cannot start the relay to cluster node \"{}\": {error}",
                            owner.name
                        )))
                    }
                },
            };
            match handle.jobs.try_send(job) {
                Ok(()) => {
                    handle.wake.notify();
                    return Ok(());
                }
                Err(TrySendError::Full(_)) => return Err(QueueError::Full),
                // The thread is gone (it never stops on its own): start a new one.
                Err(TrySendError::Disconnected(back)) => {
                    self.by_node.remove(owner);
                    job = back;
                }
            }
        }
        Err(QueueError::Unavailable(format!("the relay to cluster node \"{}\" stopped", owner.name)))
    }
}

enum QueueError {
    Full,
    Unavailable(String),
}

/// Tells the view, then the consumer, that the relayed subscription ended with `refusal` (a
/// SUBSCRIBE's refusal if it was not `confirmed`); a node's feed (its consumer is
/// [`FEED_CONN`]) is the view's alone, which ends the address's local subscribers with it.
#[allow(clippy::too_many_arguments)]
fn ended(
    post_office: &PostOffice,
    shard: ShardId,
    consumer: ConnRef,
    subscription: SubscriptionId,
    ticket: u64,
    confirmed: bool,
    refusal: Refusal,
    answers: &mut Answers,
) {
    if consumer.conn == FEED_CONN {
        post_office.post(shard, Envelope::Cluster(ClusterUpdate::FeedEnded { ticket, refusal }));
        return;
    }
    // Posted at once, so the view forgets it before the consumer can subscribe again.
    post_office.post(shard, Envelope::Cluster(ClusterUpdate::RelayEnded { consumer, subscription, ticket }));
    let command = if confirmed {
        ConnCommand::SubscriptionEnded { consumer: consumer.conn, subscription, refusal }
    } else {
        ConnCommand::SubscribeDone { consumer: consumer.conn, subscription, outcome: Err(refusal) }
    };
    answers.push(consumer.shard, Command::Conn(command));
}

fn spawn(
    shard: ShardId,
    owner: Arc<NodeRef>,
    post_office: Arc<PostOffice>,
    login: Arc<PeerLogin>,
) -> std::io::Result<RelayHandle> {
    let (sender, jobs) = crossbeam_channel::bounded(RELAY_QUEUE_BOUND);
    let overflowed = Arc::new(Mutex::new(Vec::new()));
    let wake = QueueWake::new()?;
    let relay = Relay::new(shard, owner.clone(), jobs, overflowed.clone(), wake.clone(), post_office, login);
    std::thread::Builder::new().name(format!("mbws-relay-{}-{}", shard.0, owner.name)).spawn(move || relay.run())?;
    Ok(RelayHandle { jobs: sender, overflowed, wake })
}

/// One relayed subscription, at the relay.
struct Relayed {
    consumer: ConnRef,
    subscription: SubscriptionId,
    ticket: u64,
    address: Bytes,
    mode: DeliveryMode,
    /// The consumer's ack mode (at the owner, the relay always acknowledges itself).
    ack_mode: AckMode,
    credit: u32,
    /// SUBSCRIBE written to the owner (it is written once the session is open).
    written: bool,
    /// SUBSCRIBED came.
    confirmed: bool,
    /// Client ack: the owner's delivery sequence of each message the consumer holds, by the
    /// message id the consumer acknowledges (at most the credit).
    unsettled: Held,
    /// Auto ack: the owner's delivery sequences not yet written to the consumer, oldest first
    /// (at most the credit).
    unwritten: VecDeque<u64>,
}

/// One relay's thread state.
struct Relay {
    shard: ShardId,
    owner: Arc<NodeRef>,
    login: Arc<PeerLogin>,
    jobs: Receiver<Job>,
    overflowed: Arc<Mutex<Vec<Overflow>>>,
    wake: QueueWake,
    post_office: Arc<PostOffice>,
    client: Option<Client>,
    /// The last wait found the session's socket readable.
    readable: bool,
    /// The last round stopped at [`FRAMES_PER_ROUND`] with frames still read but not handled.
    more_buffered: bool,
    /// The client's resume count when last looked at.
    resumes: u64,
    /// By the relay's subscription id at the owner.
    subscriptions: FastMap<u32, Relayed>,
    by_consumer: FastMap<(ConnRef, SubscriptionId), u32>,
    next_id: u32,
    recent_unsubscribes: VecDeque<u32>,
    /// SUBSCRIBEs written and when, oldest first, until their SUBSCRIBED (or their end) comes:
    /// the oldest must be answered within [`WAIT_BOUND`].
    awaiting_subscribed: VecDeque<(Instant, u32)>,
    last_heard: Instant,
    pinged: bool,
    /// The highest owner delivery sequence received, and the highest acknowledged cumulatively.
    last_delivery_seq: u64,
    acked_through: u64,
    /// The owner's delivery sequences (of this session) the consumers have not settled: at most
    /// the sum of the relayed subscriptions' credits.
    outstanding: Outstanding,
    /// While the owner is unreachable: until when SUBSCRIBEs are refused at once, and why.
    down: Option<(Instant, String)>,
    backoff: Duration,
    answers: Answers,
    /// Messages of this node's feeds read this round, by feed ticket, in order: posted to the
    /// shard (whose view fans them out) with the round's answers, or before any other word
    /// about a feed.
    fed: Vec<(u64, Vec<SharedMessage>)>,
    /// Deliveries relayed this round, added to the owner's counters once at its end.
    relayed_this_round: u64,
}

impl Relay {
    fn new(
        shard: ShardId,
        owner: Arc<NodeRef>,
        jobs: Receiver<Job>,
        overflowed: Arc<Mutex<Vec<Overflow>>>,
        wake: QueueWake,
        post_office: Arc<PostOffice>,
        login: Arc<PeerLogin>,
    ) -> Relay {
        Relay {
            shard,
            owner,
            login,
            jobs,
            overflowed,
            wake,
            post_office,
            client: None,
            readable: false,
            more_buffered: false,
            resumes: 0,
            subscriptions: FastMap::default(),
            by_consumer: FastMap::default(),
            next_id: RELAYED_SUBSCRIPTION_BIT,
            recent_unsubscribes: VecDeque::new(),
            awaiting_subscribed: VecDeque::new(),
            last_heard: Instant::now(),
            pinged: false,
            last_delivery_seq: 0,
            acked_through: 0,
            outstanding: Outstanding::default(),
            down: None,
            backoff: FIRST_BACKOFF,
            answers: Answers::default(),
            fed: Vec::new(),
            relayed_this_round: 0,
        }
    }

    /// Until every sender (the shard's pool) is gone: one round (the queue, the session's
    /// frames, the writes), then a wait for the next thing to do.
    fn run(mut self) {
        loop {
            if !self.take_queued() {
                return;
            }
            if let Err(reason) = self.step() {
                self.fail(reason);
            }
            self.owner.counters.relayed(std::mem::take(&mut self.relayed_this_round));
            self.post_fed();
            self.answers.post(&self.post_office);
            self.wait();
        }
    }

    /// Waits until the session's socket is readable, the queue has a command, or something is
    /// due (a PING, an answer's deadline); not at all when frames already read wait.
    fn wait(&mut self) {
        let timeout = if self.more_buffered {
            Duration::ZERO
        } else if self.subscriptions.is_empty() || self.client.is_none() {
            IDLE_TICK
        } else {
            let mut due = self.last_heard + if self.pinged { IDLE_TICK + WAIT_BOUND } else { IDLE_TICK };
            if let Some((written, _)) = self.awaiting_subscribed.front() {
                due = due.min(*written + WAIT_BOUND);
            }
            due.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
        };
        let (jobs, overflowed) = (&self.jobs, &self.overflowed);
        let has_work =
            || !jobs.is_empty() || !overflowed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty();
        self.readable = self.wake.wait(self.client.as_ref().map(Client::socket_fd), timeout, has_work);
    }

    /// Handles what waits in the queue (one queue's worth at most) and what overflowed it;
    /// false once every sender is gone.
    fn take_queued(&mut self) -> bool {
        for _ in 0..RELAY_QUEUE_BOUND {
            match self.jobs.try_recv() {
                Ok(job) => self.handle(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        let overflowed = std::mem::take(&mut *self.overflowed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for overflow in overflowed {
            match overflow {
                Overflow::Subscription(consumer, subscription) => self.unsubscribe(consumer, subscription),
                Overflow::Consumer(consumer) => self.consumer_gone(consumer),
            }
        }
        true
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Subscribe { ticket, command } => self.subscribe(ticket, command),
            Job::Settle(command) => self.settle(command),
            Job::End { consumer, subscription, ticket, refusal } => {
                self.end_at_views_word(consumer, subscription, ticket, refusal)
            }
        }
    }

    /// The view saw the address of the relayed subscription `ticket` placed on another node,
    /// or this node fenced: ends it with `refusal` (a SUBSCRIBE not answered yet is refused with it) and
    /// unsubscribes it at the owner, unless it ended already (the owner's own ERROR, 4503)
    /// or is a newer one with the same id.
    fn end_at_views_word(&mut self, consumer: ConnRef, subscription: SubscriptionId, ticket: u64, refusal: Refusal) {
        let Some(&id) = self.by_consumer.get(&(consumer, subscription)) else { return };
        let relayed = self.subscriptions.get(&id).expect("by_consumer names live subscriptions");
        if relayed.ticket != ticket {
            return;
        }
        let confirmed = relayed.confirmed;
        self.unsubscribe(consumer, subscription);
        self.end(consumer, subscription, ticket, confirmed, refusal);
    }

    fn subscribe(&mut self, ticket: u64, command: AddressCommand) {
        let AddressCommand::Subscribe { consumer, subscription, address, mode, ack_mode, credit } = command else {
            return;
        };
        if let Some((until, reason)) = &self.down {
            if Instant::now() < *until {
                let refusal = Refusal::new(ErrorCode::Unavailable, reason.clone());
                self.end(consumer, subscription, ticket, false, refusal);
                return;
            }
        }
        // A stale one with the same id (its end had not reached the consumer's view).
        self.unsubscribe(consumer, subscription);
        if self.subscriptions.is_empty() {
            // The owner's silence counts from now: an idle session has nothing to say.
            self.last_heard = Instant::now();
            self.pinged = false;
        }
        let id = self.next_id;
        self.next_id = if self.next_id == u32::MAX { RELAYED_SUBSCRIPTION_BIT } else { self.next_id + 1 };
        self.by_consumer.insert((consumer, subscription), id);
        let relayed = Relayed {
            consumer,
            subscription,
            ticket,
            address,
            mode,
            ack_mode,
            credit,
            written: false,
            confirmed: false,
            unsettled: Held::default(),
            unwritten: VecDeque::new(),
        };
        self.subscriptions.insert(id, relayed);
        self.write_subscribe(id);
    }

    /// Writes the SUBSCRIBE of `id` if the session is open.
    fn write_subscribe(&mut self, id: u32) {
        let (Some(client), Some(relayed)) = (self.client.as_mut(), self.subscriptions.get_mut(&id)) else { return };
        let frame = Frame::Subscribe(mbws::Subscribe {
            subscription_id: id,
            address: relayed.address.clone(),
            mode: relayed.mode,
            ack_mode: AckMode::Client,
            credit: relayed.credit,
        });
        relayed.written = true;
        self.awaiting_subscribed.push_back((Instant::now(), id));
        // A write error shows again at the flush, which resumes or fails the session.
        let _ = client.write_frame(&frame);
    }

    fn settle(&mut self, command: AddressCommand) {
        match command {
            AddressCommand::Ack { consumer, subscription, messages } => {
                let Some(&id) = self.by_consumer.get(&(consumer, subscription)) else { return };
                let relayed = self.subscriptions.get_mut(&id).expect("by_consumer names live subscriptions");
                for message in messages {
                    if let Some(delivery_seq) = relayed.unsettled.remove(message.0) {
                        settled(&mut self.outstanding, self.client.as_mut(), delivery_seq);
                    }
                }
            }
            AddressCommand::Nack { consumer, subscription, message, requeue } => {
                let Some(&id) = self.by_consumer.get(&(consumer, subscription)) else { return };
                let relayed = self.subscriptions.get_mut(&id).expect("by_consumer names live subscriptions");
                if let Some(delivery_seq) = relayed.unsettled.remove(message.0) {
                    // Released at the owner by the NACK, which is written before any ACK through it
                    // (and, after a resume, written again before the ACKs: the client repeats it).
                    self.outstanding.remove(delivery_seq);
                    if let Some(client) = self.client.as_mut() {
                        let _ = client.nack(delivery_seq, requeue);
                    }
                }
            }
            AddressCommand::SetCredit { consumer, subscription, credit } => {
                let Some(&id) = self.by_consumer.get(&(consumer, subscription)) else { return };
                let relayed = self.subscriptions.get_mut(&id).expect("by_consumer names live subscriptions");
                relayed.credit = credit;
                if let (true, Some(client)) = (relayed.written, self.client.as_mut()) {
                    let _ = client.write_frame(&Frame::Flow(mbws::Flow { subscription_id: id, credit }));
                }
            }
            AddressCommand::ReturnCredit { consumer, subscription, count, .. } => {
                let Some(&id) = self.by_consumer.get(&(consumer, subscription)) else { return };
                let relayed = self.subscriptions.get_mut(&id).expect("by_consumer names live subscriptions");
                for _ in 0..count {
                    let Some(delivery_seq) = relayed.unwritten.pop_front() else { break };
                    settled(&mut self.outstanding, self.client.as_mut(), delivery_seq);
                }
            }
            AddressCommand::Unsubscribe { consumer, subscription } => self.unsubscribe(consumer, subscription),
            AddressCommand::ConsumerGone { consumer } => self.consumer_gone(consumer),
            AddressCommand::Subscribe { .. } | AddressCommand::Publish { .. } => {}
        }
    }

    /// Ends the relayed subscription at the owner (which requeues what it had not
    /// acknowledged); the consumer asked for it or is gone, so nothing is said to it.
    fn unsubscribe(&mut self, consumer: ConnRef, subscription: SubscriptionId) {
        let Some(id) = self.by_consumer.remove(&(consumer, subscription)) else { return };
        let relayed = self.subscriptions.remove(&id).expect("by_consumer names live subscriptions");
        self.forget_outstanding(&relayed);
        if !relayed.written {
            return;
        }
        if let Some(client) = self.client.as_mut() {
            let _ = client.write_frame(&Frame::Unsubscribe(mbws::Unsubscribe { subscription_id: id }));
        }
        if self.recent_unsubscribes.len() == RECENT_UNSUBSCRIBES {
            self.recent_unsubscribes.pop_front();
        }
        self.recent_unsubscribes.push_back(id);
    }

    fn consumer_gone(&mut self, consumer: ConnRef) {
        let ids: Vec<SubscriptionId> =
            self.by_consumer.keys().filter(|(entry, _)| *entry == consumer).map(|(_, id)| *id).collect();
        for subscription in ids {
            self.unsubscribe(consumer, subscription);
        }
    }

    /// Connects if needed; acknowledges what the consumers settled and flushes it with the
    /// round's other writes (the owner's credit comes back now, not after the read); reads what
    /// the owner sent; checks the bounds.
    fn step(&mut self) -> Result<(), String> {
        if self.client.is_none() {
            if self.subscriptions.is_empty() {
                return Ok(());
            }
            self.connect()?;
        }
        self.acknowledge_settled();
        self.flush()?;
        if let Err(reason) = self.read_frames() {
            if !self.subscriptions.is_empty() {
                return Err(reason);
            }
            // Nothing is relayed, so nothing is ended; the next SUBSCRIBE opens a new session.
            log!(Level::Info, "relaying to cluster node \"{}\": the idle session ended ({reason}); the next SUBSCRIBE \
                opens a new one", self.owner.name; node = self.owner.name);
            self.client = None;
            return Ok(());
        }
        if !self.subscriptions.is_empty() {
            self.check_bounds()?;
        }
        // What the frames made (an UNSUBSCRIBE after an ERROR, a PING).
        self.flush()
    }

    /// Reads what the socket holds if the wait found it readable, then handles the frames read
    /// (at most [`FRAMES_PER_ROUND`]; `more_buffered` says some wait).
    fn read_frames(&mut self) -> Result<(), String> {
        let client = self.client.as_mut().expect("connected");
        if std::mem::take(&mut self.readable) {
            client.read_available(READ_AFTER_READABLE).map_err(|error| format!("reading: {error}"))?;
        }
        // Until a look finds no frame decoded and waiting.
        self.more_buffered = true;
        let mut heard = false;
        for _ in 0..FRAMES_PER_ROUND {
            let client = self.client.as_mut().expect("connected");
            match client.next_read_incoming() {
                Ok(Some(Incoming::Message(message))) => {
                    heard = true;
                    self.on_message(message);
                }
                Ok(Some(Incoming::Frame(frame))) => {
                    heard = true;
                    self.on_frame(frame)?;
                }
                Ok(None) | Err(ClientError::Interrupted) => {
                    self.more_buffered = false;
                    break;
                }
                Err(error) => return Err(format!("reading: {error}")),
            }
        }
        if heard {
            self.last_heard = Instant::now();
            self.pinged = false;
        }
        Ok(())
    }

    /// A SUBSCRIBE must be answered, and a PING after silence, within [`WAIT_BOUND`].
    fn check_bounds(&mut self) -> Result<(), String> {
        while let Some(&(written, id)) = self.awaiting_subscribed.front() {
            match self.subscriptions.get(&id) {
                Some(relayed) if !relayed.confirmed => {
                    if written.elapsed() > WAIT_BOUND {
                        return Err(format!(
                            "no SUBSCRIBED for \"{}\" within {} ms",
                            String::from_utf8_lossy(&relayed.address),
                            WAIT_BOUND.as_millis()
                        ));
                    }
                    break;
                }
                _ => {
                    self.awaiting_subscribed.pop_front();
                }
            }
        }
        let silent = self.last_heard.elapsed();
        if silent > IDLE_TICK + WAIT_BOUND {
            return Err(format!("no answer to a PING within {} ms", WAIT_BOUND.as_millis()));
        }
        if silent > IDLE_TICK && !self.pinged {
            self.pinged = true;
            let client = self.client.as_mut().expect("connected");
            client.write_frame(&Frame::Ping(mbws::Ping { token: 1 })).map_err(|error| format!("writing: {error}"))?;
        }
        Ok(())
    }

    /// Flushes what this round wrote; after a resume (here or in the read), first writes again
    /// what the lost connection may have lost.
    fn flush(&mut self) -> Result<(), String> {
        for _ in 0..RESUMES_PER_ROUND {
            let Some(client) = self.client.as_mut() else { return Ok(()) };
            let resumes = client.reconnects();
            if resumes != self.resumes {
                self.resumes = resumes;
                self.write_again_after_resume();
            }
            let client = self.client.as_mut().expect("checked above");
            client.flush().map_err(|error| format!("writing: {error}"))?;
            if client.reconnects() == self.resumes {
                return Ok(());
            }
        }
        Err(format!("the session to the owner was resumed {RESUMES_PER_ROUND} times in one round"))
    }

    /// One cumulative ACK through the delivery before the oldest still outstanding, when that
    /// moved: every delivery below it was acknowledged (or NACKed, or unsubscribed and so
    /// requeued at the owner). Those settled above an outstanding one had a single ACK.
    fn acknowledge_settled(&mut self) {
        let through = self.outstanding.oldest().map_or(self.last_delivery_seq, |oldest| oldest - 1);
        if through > self.acked_through {
            self.acked_through = through;
            if let Some(client) = self.client.as_mut() {
                let _ = client.ack(through, true);
            }
        }
    }

    /// Takes the deliveries of a relayed subscription that ended out of the outstanding ones
    /// (the owner requeues them: they must not hold back the cumulative ACK).
    fn forget_outstanding(&mut self, relayed: &Relayed) {
        for delivery_seq in relayed.unsettled.delivery_seqs().chain(relayed.unwritten.iter()) {
            self.outstanding.remove(*delivery_seq);
        }
    }

    /// A resumed connection lost what was written but not read by the owner, except ACKs and
    /// NACKs (the client repeats them, NACKs first): SUBSCRIBE, FLOW, UNSUBSCRIBE are written
    /// again (each is idempotent; an UNSUBSCRIBE of a subscription the owner had ended is
    /// answered with an ERROR the relay ignores).
    fn write_again_after_resume(&mut self) {
        let Some(client) = self.client.as_mut() else { return };
        for (&id, relayed) in &self.subscriptions {
            let frame = if relayed.confirmed {
                Frame::Flow(mbws::Flow { subscription_id: id, credit: relayed.credit })
            } else if relayed.written {
                Frame::Subscribe(mbws::Subscribe {
                    subscription_id: id,
                    address: relayed.address.clone(),
                    mode: relayed.mode,
                    ack_mode: AckMode::Client,
                    credit: relayed.credit,
                })
            } else {
                continue;
            };
            let _ = client.write_frame(&frame);
        }
        for &id in &self.recent_unsubscribes {
            let _ = client.write_frame(&Frame::Unsubscribe(mbws::Unsubscribe { subscription_id: id }));
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            // Only a text-binding session reads MESSAGEs as frames; the relay's is binary.
            Frame::Message(message) => self.on_message(MessageWithTail::from_message(&message)),
            Frame::Subscribed(subscribed) => {
                if let Some(relayed) = self.subscriptions.get_mut(&subscribed.subscription_id) {
                    if !relayed.confirmed {
                        relayed.confirmed = true;
                        let consumer = relayed.consumer;
                        if consumer.conn == FEED_CONN {
                            let confirmed = ClusterUpdate::FeedConfirmed { ticket: relayed.ticket };
                            self.post_office.post(self.shard, Envelope::Cluster(confirmed));
                            return Ok(());
                        }
                        let command = ConnCommand::SubscribeDone {
                            consumer: consumer.conn,
                            subscription: relayed.subscription,
                            outcome: Ok(()),
                        };
                        self.answers.push(consumer.shard, Command::Conn(command));
                    }
                }
            }
            Frame::Error(error) if error.fatal => {
                return Err(format!(
                    "the session was ended with {} {}",
                    error.code,
                    String::from_utf8_lossy(&error.reason)
                ))
            }
            Frame::Error(error) if error.subscription_id != 0 => {
                let Some(relayed) = self.subscriptions.remove(&error.subscription_id) else { return Ok(()) };
                self.by_consumer.remove(&(relayed.consumer, relayed.subscription));
                self.forget_outstanding(&relayed);
                if relayed.confirmed {
                    // An ERROR that did not end it at the owner (a refused FLOW) must not leave
                    // it there; if the owner ended it, this is answered with an ignored ERROR.
                    let unsubscribe = Frame::Unsubscribe(mbws::Unsubscribe { subscription_id: error.subscription_id });
                    if let Some(client) = self.client.as_mut() {
                        let _ = client.write_frame(&unsubscribe);
                    }
                }
                let code = ErrorCode::from_u16(error.code).unwrap_or(ErrorCode::Internal);
                let refusal = Refusal::new(code, String::from_utf8_lossy(&error.reason).into_owned());
                self.end(relayed.consumer, relayed.subscription, relayed.ticket, relayed.confirmed, refusal);
            }
            _ => {}
        }
        Ok(())
    }

    /// A MESSAGE from the owner: recorded for its settlement, delivered to the consumer's shard
    /// (joined to the previous Deliver when it is for the same subscription). The stored
    /// message is the owner's MESSAGE as it was read: its tail (address, properties, body) is
    /// a slice of the read buffer, not a copy.
    fn on_message(&mut self, message: MessageWithTail) {
        self.last_delivery_seq = self.last_delivery_seq.max(message.delivery_seq);
        let Some(relayed) = self.subscriptions.get_mut(&message.subscription_id) else {
            // Unsubscribed meanwhile: the owner requeued it with the rest.
            return;
        };
        match relayed.ack_mode {
            AckMode::Client => {
                // A redelivery after the owner's ack timeout replaces the older delivery.
                let redelivery = message.redelivered;
                if let Some(older) = relayed.unsettled.insert(message.message_id, message.delivery_seq, redelivery) {
                    self.outstanding.remove(older);
                }
            }
            AckMode::Auto => relayed.unwritten.push_back(message.delivery_seq),
        }
        self.relayed_this_round += 1;
        self.outstanding.insert(message.delivery_seq);
        let stored = StoredMessage::new(message.tail, message.durable, 0, false);
        let delivered = Delivered {
            message_id: MessageId(message.message_id),
            message: SharedMessage::new(stored),
            redelivered: message.redelivered,
        };
        let (consumer, subscription) = (relayed.consumer, relayed.subscription);
        if consumer.conn == FEED_CONN {
            // A node's feed: fanned out by the shard's view, settled by it (`unwritten`).
            match self.fed.last_mut() {
                Some((ticket, messages)) if *ticket == relayed.ticket => messages.push(delivered.message),
                _ => self.fed.push((relayed.ticket, vec![delivered.message])),
            }
            return;
        }
        if let Some((_, commands)) = self.answers.by_shard.iter_mut().find(|(shard, _)| *shard == consumer.shard) {
            if let Some(Command::Conn(ConnCommand::Deliver {
                consumer: last_consumer,
                subscription: last,
                deliveries,
            })) = commands.last_mut()
            {
                if *last_consumer == consumer.conn && *last == subscription {
                    deliveries.push(delivered);
                    return;
                }
            }
        }
        let command = ConnCommand::Deliver {
            consumer: consumer.conn,
            subscription,
            deliveries: crate::broker::Deliveries::one(delivered),
        };
        self.answers.push(consumer.shard, Command::Conn(command));
    }

    /// Tells the view, then the consumer, that the relayed subscription ended with `refusal`
    /// (a SUBSCRIBE's refusal if it was not `confirmed`).
    fn end(&mut self, consumer: ConnRef, subscription: SubscriptionId, ticket: u64, confirmed: bool, refusal: Refusal) {
        // What a feed delivered before its end goes first.
        self.post_fed();
        ended(&self.post_office, self.shard, consumer, subscription, ticket, confirmed, refusal, &mut self.answers);
    }

    /// Posts the feeds' messages read so far to the shard, one update per run of one feed.
    fn post_fed(&mut self) {
        for (ticket, messages) in self.fed.drain(..) {
            self.post_office.post(self.shard, Envelope::Cluster(ClusterUpdate::Fed { ticket, messages }));
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let client = connect_to_owner(&self.owner, &self.login)?;
        log!(Level::Info, "relaying subscriptions to cluster node \"{}\" ({}): session open", self.owner.name,
            self.owner.url; node = self.owner.name);
        self.client = Some(client);
        self.resumes = 0;
        self.last_delivery_seq = 0;
        self.acked_through = 0;
        self.outstanding.clear();
        self.awaiting_subscribed.clear();
        self.readable = false;
        self.more_buffered = false;
        self.last_heard = Instant::now();
        self.pinged = false;
        self.recent_unsubscribes.clear();
        self.backoff = FIRST_BACKOFF;
        self.down = None;
        let ids: Vec<u32> = self.subscriptions.keys().copied().collect();
        for id in ids {
            self.write_subscribe(id);
        }
        Ok(())
    }

    /// The owner cannot be reached: every relayed subscription ends with 4503 naming it, and
    /// new SUBSCRIBEs are refused at once until the backoff has passed.
    fn fail(&mut self, reason: String) {
        let reason = format!(
            "cluster node \"{}\" ({}), which owns the address, cannot be reached: {reason}; subscribe again",
            self.owner.name, self.owner.url
        );
        log!(Level::Warn, "relaying to cluster node \"{}\": {reason}; {} subscriptions ended with 4503, next attempt in {} ms",
            self.owner.name, self.subscriptions.len(), self.backoff.as_millis(); node = self.owner.name);
        self.by_consumer.clear();
        for (_, relayed) in std::mem::take(&mut self.subscriptions) {
            let refusal = Refusal::new(ErrorCode::Unavailable, reason.clone());
            self.end(relayed.consumer, relayed.subscription, relayed.ticket, relayed.confirmed, refusal);
        }
        self.client = None;
        self.recent_unsubscribes.clear();
        self.outstanding.clear();
        self.awaiting_subscribed.clear();
        self.down = Some((Instant::now() + self.backoff, reason));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// A delivery a consumer settled (acknowledged, or written for auto-ack) leaves `outstanding`.
/// At or below the oldest still outstanding, the round's cumulative ACK covers it
/// ([`Relay::acknowledge_settled`]); above it, it gets a single ACK now, so that the owner
/// does not count it against its subscription's credit while an older delivery (another
/// subscription's, perhaps) is held.
fn settled(outstanding: &mut Outstanding, client: Option<&mut Client>, delivery_seq: u64) {
    if !outstanding.remove(delivery_seq) {
        return;
    }
    if outstanding.oldest().is_some_and(|oldest| oldest < delivery_seq) {
        if let Some(client) = client {
            // A write error shows again at the flush, which resumes or fails the session.
            let _ = client.ack(delivery_seq, false);
        }
    }
}

/// What a client-ack consumer of a relayed subscription holds: the owner's delivery sequence
/// of each message, by the message id the consumer acknowledges (at most the credit).
///
/// Kept in delivery order while the consumer settles in that order (its cumulative ACKs
/// settle the oldest first): an insert is a push at the back and a settle a look at the front,
/// with no hashing. The first settle of another message, or a redelivery (which replaces the
/// older delivery of its message id), turns it into a map by message id until it is empty.
#[derive(Debug)]
enum Held {
    /// (message id, delivery sequence), oldest first.
    InOrder(VecDeque<(u64, u64)>),
    ById(FastMap<u64, u64>),
}

impl Default for Held {
    fn default() -> Held {
        Held::InOrder(VecDeque::new())
    }
}

impl Held {
    /// Holds `message_id` as `delivery_seq`; returns its older delivery's sequence if it was
    /// held already (only a `redelivery` can be).
    fn insert(&mut self, message_id: u64, delivery_seq: u64, redelivery: bool) -> Option<u64> {
        match self {
            Held::InOrder(in_order) if !redelivery => {
                in_order.push_back((message_id, delivery_seq));
                None
            }
            _ => self.by_id().insert(message_id, delivery_seq),
        }
    }

    /// The delivery sequence `message_id` was held as, no longer held.
    fn remove(&mut self, message_id: u64) -> Option<u64> {
        match self {
            Held::InOrder(in_order) => match in_order.front() {
                Some(&(oldest, delivery_seq)) if oldest == message_id => {
                    in_order.pop_front();
                    Some(delivery_seq)
                }
                None => None,
                Some(_) => self.by_id().remove(&message_id),
            },
            Held::ById(by_id) => {
                let removed = by_id.remove(&message_id);
                if by_id.is_empty() {
                    *self = Held::default();
                }
                removed
            }
        }
    }

    fn delivery_seqs(&self) -> Box<dyn Iterator<Item = &u64> + '_> {
        match self {
            Held::InOrder(in_order) => Box::new(in_order.iter().map(|(_, delivery_seq)| delivery_seq)),
            Held::ById(by_id) => Box::new(by_id.values()),
        }
    }

    /// The map, made from the deque if need be.
    fn by_id(&mut self) -> &mut FastMap<u64, u64> {
        if let Held::InOrder(in_order) = self {
            *self = Held::ById(in_order.drain(..).collect());
        }
        match self {
            Held::ById(by_id) => by_id,
            Held::InOrder(_) => unreachable!("made a map above"),
        }
    }
}

/// Most settled entries [`Outstanding`] keeps behind an unsettled one before it drops them
/// all (beyond twice its unsettled ones).
const OUTSTANDING_SLACK: usize = 64;

/// The owner's delivery sequences of one session that the consumers have not settled, and how
/// old the oldest is. The owner numbers its deliveries in increasing order and the client
/// drops what a resume replays, so they arrive sorted: they are kept in a deque in arrival
/// order, each marked when settled. Settled ones leave from the front, so the front is the
/// oldest unsettled; consumers settle mostly in order, so a settle is mostly the front's (one
/// compare), else a binary search. When settled entries behind an unsettled one are more than
/// the unsettled ones plus [`OUTSTANDING_SLACK`], they are dropped in one pass: the deque holds
/// at most twice the unsettled deliveries (bounded by the credits) plus the slack.
#[derive(Debug, Default)]
struct Outstanding {
    /// (delivery sequence, settled), increasing sequences; the front is not settled.
    entries: VecDeque<(u64, bool)>,
    unsettled: usize,
}

impl Outstanding {
    fn insert(&mut self, delivery_seq: u64) {
        if self.entries.back().is_none_or(|&(last, _)| last < delivery_seq) {
            self.entries.push_back((delivery_seq, false));
            self.unsettled += 1;
            return;
        }
        // Not expected (sequences arrive increasing); kept correct all the same.
        match self.entries.binary_search_by_key(&delivery_seq, |&(seq, _)| seq) {
            Ok(index) if self.entries[index].1 => {
                self.entries[index].1 = false;
                self.unsettled += 1;
            }
            Ok(_) => {}
            Err(index) => {
                self.entries.insert(index, (delivery_seq, false));
                self.unsettled += 1;
            }
        }
    }

    /// Settles `delivery_seq`; false if it was not outstanding.
    fn remove(&mut self, delivery_seq: u64) -> bool {
        let index = match self.entries.front() {
            Some(&(oldest, _)) if oldest == delivery_seq => 0,
            _ => match self.entries.binary_search_by_key(&delivery_seq, |&(seq, _)| seq) {
                Ok(index) if !self.entries[index].1 => index,
                _ => return false,
            },
        };
        self.entries[index].1 = true;
        self.unsettled -= 1;
        while self.entries.front().is_some_and(|&(_, settled)| settled) {
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.unsettled + OUTSTANDING_SLACK {
            self.entries.retain(|&(_, settled)| !settled);
        }
        true
    }

    /// The oldest delivery not settled.
    fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|&(seq, _)| seq)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.unsettled = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The held messages of a client-ack consumer answer as a map by message id, whether it
    /// settles in delivery order (the deque), out of it, or gets redeliveries (the map), and
    /// go back to the deque once empty.
    #[test]
    fn held_messages_answer_as_a_map_by_id_in_and_out_of_delivery_order() {
        let mut held = Held::default();
        let mut model = FastMap::default();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next_id = 0;
        let mut delivery_seq = 0;
        let mut modes = [0, 0];
        for round in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            delivery_seq += 1;
            // Long stretches in order (the first and the last quarter), the middle mixed; all
            // settled at its end, which brings back the deque.
            let mixed = (5_000..15_000).contains(&round);
            if round == 15_000 {
                let mut ids: Vec<(u64, u64)> = model.drain().collect();
                ids.sort_unstable_by_key(|&(_, seq)| seq);
                for (id, seq) in ids {
                    assert_eq!(held.remove(id), Some(seq));
                }
                assert!(matches!(held, Held::InOrder(_)), "empty again: the deque");
            }
            if state % 2 == 0 || model.is_empty() {
                let redelivery = mixed && state % 5 == 1 && !model.is_empty();
                let id = if redelivery {
                    *model.keys().next().unwrap()
                } else {
                    next_id += 1;
                    next_id
                };
                assert_eq!(held.insert(id, delivery_seq, redelivery), model.insert(id, delivery_seq), "insert {id}");
            } else {
                let oldest = *model.iter().min_by_key(|(_, seq)| **seq).unwrap().0;
                let id = if mixed && state % 3 == 0 { *model.keys().next().unwrap() } else { oldest };
                let id = if mixed && state % 11 == 0 { next_id + 1 } else { id };
                assert_eq!(held.remove(id), model.remove(&id), "remove {id}");
            }
            let mut seqs: Vec<u64> = held.delivery_seqs().copied().collect();
            let mut expected: Vec<u64> = model.values().copied().collect();
            seqs.sort_unstable();
            expected.sort_unstable();
            assert_eq!(seqs, expected);
            modes[usize::from(matches!(held, Held::ById(_)))] += 1;
        }
        assert!(modes[0] > 5_000 && modes[1] > 1_000, "both kept: {modes:?}");
    }

    /// The deque answers as the sorted set it replaced, for settles in and out of order, and
    /// stays bounded while one old delivery is held and thousands behind it settle.
    #[test]
    fn outstanding_deliveries_answer_as_a_sorted_set_and_stay_bounded_behind_a_held_one() {
        let mut outstanding = Outstanding::default();
        let mut model = std::collections::BTreeSet::new();
        // A fixed pseudo-random order of settles over increasing arrivals.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_seq = 1;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state % 3 != 0 || model.is_empty() {
                next_seq += 1 + state % 2;
                outstanding.insert(next_seq);
                model.insert(next_seq);
            } else {
                // Mostly the oldest, sometimes any, sometimes one not outstanding.
                let seq = match state % 7 {
                    0 => next_seq + 5,
                    1 | 2 => *model.iter().nth((state >> 8) as usize % model.len()).unwrap(),
                    _ => *model.first().unwrap(),
                };
                assert_eq!(outstanding.remove(seq), model.remove(&seq), "settling {seq}");
            }
            assert_eq!(outstanding.oldest(), model.first().copied());
            assert_eq!(outstanding.unsettled, model.len());
        }

        // One held delivery, then 10,000 settled behind it: the deque does not grow with them.
        outstanding.clear();
        outstanding.insert(1);
        for seq in 2..10_002 {
            outstanding.insert(seq);
            assert!(outstanding.remove(seq));
            assert!(outstanding.entries.len() <= 2 * outstanding.unsettled + OUTSTANDING_SLACK + 1);
        }
        assert_eq!(outstanding.oldest(), Some(1));
        assert!(outstanding.remove(1));
        assert_eq!(outstanding.oldest(), None);
        assert!(outstanding.entries.is_empty());
    }
}
