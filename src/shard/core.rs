//! The sans-IO core of a shard: everything the shard decides, with no socket, task or clock.
//!
//! [`ShardCore`] owns the shard's [`AddressTable`], its connection slots (each a plain
//! [`ConnState`]: session, write queue, lifecycle), its local work queue, one outbox per other
//! shard, the list of connections touched during the current round of work, and whether the
//! ack timer is armed. It is a plain struct: the IO shell (`super::Shard`) holds it in one
//! `RefCell` and borrows it once per event. Time comes in as `now_ms` (milliseconds on the
//! broker's monotonic clock); nothing in here reads a clock.
//!
//! Events in:
//! - a connection's own: [`ShardCore::open_session`] (its first message; the session's random
//!   token is an input), [`ShardCore::resume_session`] (the token and `last-received-seq`
//!   checks, the re-attachment, the stale socket to supersede), [`ShardCore::bytes_read`],
//!   [`ShardCore::write_completed`], [`ShardCore::reader_finished`] (detach or end),
//!   [`ShardCore::expire_session`];
//! - an envelope of commands from another shard ([`ShardCore::accept_envelope`]);
//! - a durable log commit finished, or failed ([`ShardCore::durable_committed`],
//!   [`ShardCore::durable_failed`]);
//! - the time is `now_ms` and deadlines may have passed ([`ShardCore::on_deadline`]: ack
//!   deadlines, [`ShardCore::expire_acks`], and the expiry of sessions' credentials, a JWT's
//!   `exp`, [`ShardCore::expire_credentials`]).
//! - the broker's lifecycle: a graceful stop begins ([`ShardCore::stop_input`]: connections
//!   stop processing input, so [`ShardCore::inflight_send_count`] falls to 0 as the SENDs taken
//!   are answered); a SIGHUP reload brings new limits for sessions opened from then on
//!   ([`ShardCore::set_runtime_limits`]).
//!
//! Each event only queues work (except that the commands a read produced for this shard's own
//! addresses run at once when nothing waits in the work queue: the order the round would run
//! them in, without the trip through the queue); [`ShardCore::run_work`] then runs the round: the work queue is
//! drained (publishes to one address that sit next to each other reach the address table as
//! one batch), every connection touched is flushed once (the most recently listed first, so
//! deliveries are written before the receipts of the SENDs that caused them), and the
//! [`Effects`] say what the shell
//! must do: post these command batches (one per destination shard), let the log's commit task
//! run, wake the shard's timer (which then asks [`ShardCore::poll_deadline`] when to call
//! [`ShardCore::on_deadline`]).
//!
//! A connection's own events (bytes read, a batch written, the reader finished, the expiry)
//! are methods of its [`ConnState`], reached with [`ShardCore::conn_mut`]; the shell's tasks
//! hold `(ConnId, Attachment)`, never the state. The tasks' wakers stay in the shell: a round
//! tells it which to wake through [`ConnWakers`] (a fake in tests). A slot is freed when its
//! session has ended *and* its writer is done ([`ShardCore::set_writer_running`],
//! [`ShardCore::free_if_done`]): an ended connection's writer still writes its close frame.
//! Commands for an ended connection are dropped, as for a freed one.
//!
//! Invariants: a command for this shard goes on the work queue, never into its own outbox (an
//! outbox to itself would run the command a round late and out of order, asserted at the end of
//! each round); a connection is listed for its flush at most once per round; nothing is left in
//! the work queue or the dirty list when `run_work` returns; a freed slot's generation moves
//! on, so no id of its old connection finds the next one.
//!
//! The simulator (`crate::sim`, test builds) drives these same methods with simulated
//! clients, network and time; see docs/ARCHITECTURE.md, "The simulator".
//!
//! # Next steps
//!
//! 1. **One timer per shard.** The ack timer, the session expiries (one task per detached
//!    session today, `shard::connection::expire_later`) and the heartbeat read timeouts become deadlines
//!    the core reports (`Effects::wake_at_ms`, the earliest of them); the shell keeps one
//!    timer and calls `core.on_timer(now_ms)`.
//! 2. **The durable log commit as core events.** The log itself is sans-IO and the simulator
//!    already writes it to a simulated disk (and crashes it) by its commit contract
//!    (`store::CommitBatch`), as `store::GroupCommitter` does; the core could own that loop
//!    (`Effects::log_batch`, `core.log_synced(lsn)`) so the two writers share one decision.

mod inspect;

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::broker::address::{AddressLimits, AddressTable, Outgoing, Publication, MAX_PUBLISH_BATCH};
use crate::broker::{AddressCommand, Command, ConnCommand, ConnId, ConnRef, ShardId};
use crate::config::Config;
use crate::conn::lifecycle::{Attachment, State as LifecycleState};
use crate::conn::outbound::CreditReturns;
use crate::conn::session::{parse_session_id, Effects as SessionEffects, Session, SessionConfig};
use crate::conn::state::{ConnState, Expiry, ReadStep, Wake, WriteOutcome, Written};
use crate::mbws::{self, Binding, ErrorCode, Subprotocol};
use crate::store::{DurableLog, Lsn, Recovery};
use crate::ws::message::Decoder;
pub use inspect::{AdminCommand, AdminOutcome, SessionCount, SessionInfo, ShardSnapshot, SnapshotRequest};

/// A resume the core accepted ([`ShardCore::resume_session`]).
#[derive(Debug)]
pub struct Resumed {
    pub me: ConnRef,
    /// The new attachment: the shell starts its tasks.
    pub attachment: Attachment,
    /// The socket of an older connection of the session that had not noticed it is dead: the
    /// shell supersedes it (its writer says why it ends).
    pub stale_socket: Option<RawFd>,
}

/// Why a resume was refused ([`ShardCore::resume_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// No such session here: expired, ended, never made, or the token does not match.
    UnknownSession,
    /// The OPEN's `last-received-seq` is above every `delivery-seq` the session gave out.
    BeyondLastDelivery { last_delivery_seq: u64 },
}

impl ResumeRefusal {
    /// The fatal ERROR's code and reason for the refusal of `open`.
    pub fn error(&self, open: &mbws::Open) -> (ErrorCode, String) {
        match *self {
            ResumeRefusal::UnknownSession => {
                (ErrorCode::UnknownSession, crate::conn::session::unknown_session_reason(&open.session_id))
            }
            ResumeRefusal::BeyondLastDelivery { last_delivery_seq } => (
                ErrorCode::Conflict,
                format!(
                    "OPEN: last-received-seq {} is beyond the last delivery-seq {last_delivery_seq} of this session; \
                     resume with the highest delivery-seq received",
                    open.last_received_seq
                ),
            ),
        }
    }
}

/// What became of a connection whose reader finished ([`ShardCore::reader_finished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderFinished {
    /// The session is resumable: kept, detached, until `expires_at_ms`.
    Detached { expires_at_ms: u64 },
    /// The session ended.
    Ended,
}

/// Whether two addresses are the same bytes, as `==` says: one of 4 to 16 bytes (the usual
/// name) is compared as two overlapping words, without the call to `bcmp` that `==` makes
/// (the batch gathering compares every publish's address with its batch's).
#[inline(always)]
fn same_address(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if len != b.len() {
        return false;
    }
    match len {
        4..=7 => {
            let word =
                |bytes: &[u8], at: usize| u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            word(a, 0) == word(b, 0) && word(a, len - 4) == word(b, len - 4)
        }
        8..=16 => {
            let word = |bytes: &[u8], at: usize| {
                u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8..=16 bytes hold a word at 0 and at len - 8"))
            };
            word(a, 0) == word(b, 0) && word(a, len - 8) == word(b, len - 8)
        }
        _ => a == b,
    }
}

/// The live state in `conns` of connection `id` (a field-level borrow, so the core's scratch
/// lists stay usable beside it).
fn slot_state(conns: &mut [ConnSlot], id: ConnId) -> Option<&mut ConnState> {
    let slot = conns.get_mut(id.index as usize)?;
    if slot.generation != id.generation {
        return None;
    }
    slot.state.as_mut()
}

/// How the core wakes a connection's tasks (the shell keeps their wakers).
pub trait ConnWakers {
    /// Wakes the tasks of connection `id` that `wake` names.
    fn wake(&mut self, id: ConnId, wake: Wake);
}

/// A connection slot: its state while the connection (or its detached session) lives.
struct ConnSlot {
    generation: u32,
    state: Option<ConnState>,
    /// The writer task of the current attachment has not finished: an ended connection's slot
    /// stays until it has written what is queued (the close frame last).
    writer_running: bool,
}

/// Everything a shard knows (see the module doc).
pub struct ShardCore {
    id: ShardId,
    /// What every session of this shard shares (limits, expiry, heartbeat bounds).
    session_config: Arc<SessionConfig>,
    /// The bound of a connection's write queue (`--max-outbound-bytes`).
    max_outbound_bytes: usize,
    addresses: AddressTable,
    /// This shard's connections, by `ConnId::index`; a slot's generation moves on when it is
    /// freed, so ids of the old connection find nothing.
    conns: Vec<ConnSlot>,
    free_conns: Vec<u32>,
    queues: Queues,
    /// Connections whose session or write queue changed during this round of work.
    dirty: Vec<ConnId>,
    /// The generation listed in `dirty` per connection slot index, so a connection is listed
    /// once per round however many commands it gets (a reused slot's new generation is not
    /// mistaken for the old one).
    dirty_generation: Vec<Option<u32>>,
    /// The ack timer knows of a deadline (or is about to look): no need to wake it.
    ack_timer_armed: bool,
    /// A deadline was added while the timer was not armed: the shell must wake it.
    wake_ack_timer: bool,
    /// When the shard's timer will next call [`ShardCore::on_deadline`] (what
    /// [`ShardCore::poll_deadline`] last answered): an earlier credential deadline wakes it.
    timer_wake_at_ms: Option<u64>,
    /// Sessions whose credentials expire (a JWT's `exp`): (deadline ms, slot index,
    /// generation), one entry per such session, removed when its slot is freed.
    credential_deadlines: BTreeSet<(u64, u32, u32)>,
    /// The durable log, shared with the address table that appends to it and with the shell's
    /// commit task that writes it (its `RefCell` is the log's, as today).
    durable_log: Option<Rc<RefCell<DurableLog>>>,
    /// Plain counters of the messages that went through, read by [`ShardCore::report`].
    counters: Counters,
    /// The broker is stopping: connections process no more input ([`ShardCore::stop_input`]).
    input_stopped: bool,
    /// In a cluster (`--cluster`): which node serves each address of this shard, consulted
    /// before a SEND or SUBSCRIBE reaches the address table ([`crate::cluster::view`]).
    placement: Option<Box<crate::cluster::view::PlacementView>>,
    // Scratch lists reused from round to round (their capacity stays).
    answers: Vec<Outgoing>,
    address_commands: Vec<(ShardId, AddressCommand)>,
    publications: Vec<Publication>,
}

/// Messages through this shard since it started: plain integers of the shard's own thread,
/// added to once per batch (a publish batch, a delivery command), never shared; other threads
/// read them through a [`ShardReport`].
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    /// SENDs that reached this shard as their address's owner (accepted or refused).
    messages_received: u64,
    /// MESSAGE deliveries handed to this shard's connections (redeliveries included).
    messages_delivered: u64,
    /// Body bytes of those messages.
    bytes_received: u64,
    bytes_delivered: u64,
    /// Deliveries of messages delivered before (taken back unacknowledged), and messages moved
    /// to a dead-letter address by this shard's addresses.
    messages_redelivered: u64,
    messages_dead_lettered: u64,
    /// Refusals handed to this shard's connections, by error code (in `ErrorCode::ALL` order).
    refusals: [u64; mbws::ErrorCode::ALL.len()],
}

/// What a shard tells whoever asks how it is doing (the periodic summary; later the metrics):
/// its counters and its gauges at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardReport {
    pub shard: ShardId,
    /// Counters since the shard started (see [`ShardCore`]'s `Counters`).
    pub messages_received: u64,
    pub messages_delivered: u64,
    /// Connections and detached sessions (kept for resume) in this shard's slots.
    pub sessions: usize,
    /// Messages and body bytes waiting in this shard's address queues.
    pub queued_messages: usize,
    pub queued_bytes: usize,
}

/// Where commands go: this shard's work queue, or the outbox of the shard they are for.
struct Queues {
    id: ShardId,
    work: VecDeque<Command>,
    /// One per shard, indexed by shard; this shard's own stays empty.
    outboxes: Vec<Vec<Command>>,
}

impl Queues {
    fn submit(&mut self, shard: ShardId, command: Command) {
        if shard == self.id {
            self.work.push_back(command);
        } else {
            self.outboxes[usize::from(shard.0)].push(command);
        }
    }

    fn submit_address_commands(&mut self, commands: &mut Vec<(ShardId, AddressCommand)>) {
        for (shard, command) in commands.drain(..) {
            self.submit(shard, Command::Address(command));
        }
    }

    /// Moves the publishes at the front of the work queue that go to the same address as
    /// `publications[0]` into `publications`, up to `MAX_PUBLISH_BATCH` in all.
    fn take_publishes_to_same_address(&mut self, publications: &mut Vec<Publication>) {
        while publications.len() < MAX_PUBLISH_BATCH {
            let same_address = matches!(
                self.work.front(),
                Some(Command::Address(AddressCommand::Publish { message, .. }))
                    if message.address() == publications[0].message.address()
            );
            if !same_address {
                break;
            }
            let Some(Command::Address(AddressCommand::Publish { publisher, seq, message })) = self.work.pop_front()
            else {
                unreachable!("the front was just checked to be a publish");
            };
            publications.push(Publication { publisher, seq, message });
        }
    }
}

/// What the shell must do after a round of work ([`ShardCore::run_work`]).
pub struct Effects<'a> {
    /// Command batches for other shards, at most one per destination: post every one (they
    /// are taken from the outboxes as the iterator runs).
    pub posts: Posts<'a>,
    /// The durable log holds records not yet written: let its commit task run.
    pub log_has_pending: bool,
    /// Deliveries with an ack deadline were made while the ack timer was idle: wake it.
    pub wake_ack_timer: bool,
}

/// The non-empty outboxes of a round, each taken as one batch for its shard.
pub struct Posts<'a> {
    outboxes: std::iter::Enumerate<std::slice::IterMut<'a, Vec<Command>>>,
}

impl Iterator for Posts<'_> {
    type Item = (ShardId, Vec<Command>);

    fn next(&mut self) -> Option<(ShardId, Vec<Command>)> {
        self.outboxes.find(|(_, outbox)| !outbox.is_empty()).map(|(index, outbox)| {
            // The next batch for this shard starts with room for twice as many commands as
            // this one had, or half the room this one had, whichever is more (up to a bound):
            // a new empty outbox grew by doubling, each step a reallocation and a copy of every
            // command in it, on every round, and rounds of a few commands (a consumer's ACK)
            // come between rounds of hundreds (a publisher's read), so room decays slowly.
            let room = (2 * outbox.len()).max(outbox.capacity() / 2).min(MAX_OUTBOX_ROOM_CARRIED);
            (ShardId(index as u16), std::mem::replace(outbox, Vec::with_capacity(room)))
        })
    }
}

/// The most commands of room a posted outbox leaves for the next batch to the same shard:
/// what a busy round needs, without keeping a burst's allocation while the shard sends that
/// destination little.
const MAX_OUTBOX_ROOM_CARRIED: usize = 1024;

/// The address table of shard `id`, with the declared addresses it owns.
fn declared_table(id: ShardId, shard_count: usize, config: &Config) -> AddressTable {
    let mut table = AddressTable::new(id, AddressLimits::from_config(config, shard_count));
    for (name, settings) in &config.declared_addresses {
        if crate::broker::owner_of(name, shard_count) == id {
            table.declare_address(name, *settings);
        }
    }
    table
}

impl ShardCore {
    /// Shard `id` of a broker with `shard_count` shards and `config`.
    pub fn new(id: ShardId, shard_count: usize, config: &Config) -> ShardCore {
        assert!(usize::from(id.0) < shard_count, "shard {} of {shard_count}", id.0);
        ShardCore {
            id,
            session_config: Arc::new(SessionConfig::from_config(config, shard_count)),
            max_outbound_bytes: config.max_outbound_bytes,
            addresses: declared_table(id, shard_count, config),
            conns: Vec::new(),
            free_conns: Vec::new(),
            queues: Queues { id, work: VecDeque::new(), outboxes: (0..shard_count).map(|_| Vec::new()).collect() },
            dirty: Vec::new(),
            dirty_generation: Vec::new(),
            ack_timer_armed: false,
            wake_ack_timer: false,
            timer_wake_at_ms: None,
            credential_deadlines: BTreeSet::new(),
            durable_log: None,
            counters: Counters::default(),
            input_stopped: false,
            placement: config.cluster.is_some().then(|| Box::new(crate::cluster::view::PlacementView::new(id))),
            answers: Vec::new(),
            address_commands: Vec::new(),
            publications: Vec::new(),
        }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn session_config(&self) -> &Arc<SessionConfig> {
        &self.session_config
    }

    /// A new connection's first WebSocket message (`binding`, `payload`) after its upgrade to
    /// `subprotocol`: a new session is registered, attached to `socket`, and given the message
    /// (an OPEN, or a fatal error that closes it). `token` is the session's random token
    /// ([`crate::conn::session::random_token`]); `access` what its credentials allow
    /// ([`crate::auth`]). The shell starts the connection's tasks next.
    #[allow(clippy::too_many_arguments)]
    pub fn open_session(
        &mut self,
        subprotocol: Subprotocol,
        socket: RawFd,
        binding: Binding,
        payload: Bytes,
        token: u64,
        now_ms: u64,
        access: crate::auth::Access,
    ) -> (ConnRef, Attachment) {
        let session_config = self.session_config.clone();
        let max_outbound_bytes = self.max_outbound_bytes;
        let me = self.register_conn(|me| {
            ConnState::new(Session::new(me, subprotocol, session_config, token, access), max_outbound_bytes)
        });
        let state = self.conn_mut(me.conn).expect("a connection just registered");
        let attachment = state.attach(socket);
        let mut commands = Vec::new();
        let ConnState { session, outbound, .. } = &mut *state;
        if let Err(end) =
            session.on_message(binding, payload, now_ms, &mut SessionEffects { outbound, commands: &mut commands })
        {
            state.begin_close(end.close_code, &end.reason);
        }
        debug_assert!(commands.is_empty(), "the first frame routes nothing");
        if let Some(at_ms) = state.session.credentials_expire_at_ms().filter(|_| state.session.is_open()) {
            self.add_credential_deadline(at_ms, me.conn);
        }
        (me, attachment)
    }

    /// Session `id`'s credentials expire at `at_ms`: the timer ends it then, and is woken if
    /// it would sleep past it.
    fn add_credential_deadline(&mut self, at_ms: u64, id: ConnId) {
        self.credential_deadlines.insert((at_ms, id.index, id.generation));
        self.wake_timer_by(at_ms);
    }

    /// Wakes the shard's timer if it would sleep past `at_ms` (a new deadline earlier than the
    /// one [`ShardCore::poll_deadline`] last answered).
    fn wake_timer_by(&mut self, at_ms: u64) {
        if self.timer_wake_at_ms.is_none_or(|wake_at_ms| at_ms < wake_at_ms) {
            self.timer_wake_at_ms = Some(at_ms);
            self.wake_ack_timer = true;
        }
    }

    /// A connection's first frame is `open`, naming a session of this shard to resume over
    /// `socket` (docs/PROTOCOL.md section 11): the session id's token and the client's
    /// `last-received-seq` are checked, then the session is re-attached and its resume frames
    /// queued. A refusal leaves the session as it was; the shell answers it and closes.
    pub fn resume_session(
        &mut self,
        open: &mbws::Open,
        binding: Binding,
        socket: RawFd,
    ) -> Result<Resumed, ResumeRefusal> {
        let (home, conn, token) = parse_session_id(&open.session_id).ok_or(ResumeRefusal::UnknownSession)?;
        if home != self.id {
            return Err(ResumeRefusal::UnknownSession);
        }
        let state = slot_state(&mut self.conns, conn).ok_or(ResumeRefusal::UnknownSession)?;
        let ended = state.lifecycle().state() == LifecycleState::Ended;
        if ended || !state.session.token_matches(token) || !state.session.is_resumable() {
            return Err(ResumeRefusal::UnknownSession);
        }
        let last_delivery_seq = state.session.last_delivery_seq();
        if open.last_received_seq > last_delivery_seq {
            // The client claims deliveries that were never made: a client bug, or another
            // session's number. The session stays as it was, for a correct resume.
            return Err(ResumeRefusal::BeyondLastDelivery { last_delivery_seq });
        }
        let (attachment, stale_socket) = state.resume(socket, binding, open, &mut self.address_commands);
        self.queues.submit_address_commands(&mut self.address_commands);
        self.mark_dirty(conn);
        Ok(Resumed { me: ConnRef { shard: self.id, conn }, attachment, stale_socket })
    }

    /// Bytes were read into `buf` on connection `id` (its attachment `attachment`): every
    /// complete message is handled ([`ConnState::bytes_read`]); the commands go on the queues
    /// and the connection is listed for this round's flush. A connection that is gone reads
    /// no more ([`ReadStep::Closing`]). The shell runs the round next.
    pub fn bytes_read(
        &mut self,
        id: ConnId,
        attachment: Attachment,
        decoder: &mut Decoder,
        buf: &mut BytesMut,
        now_ms: u64,
    ) -> ReadStep {
        let Some(state) = slot_state(&mut self.conns, id) else { return ReadStep::Closing };
        let step = state.bytes_read(attachment, decoder, buf, now_ms, &mut self.address_commands);
        self.mark_dirty(id);
        self.run_or_submit_address_commands(now_ms);
        step
    }

    /// Hands the address commands a connection's input produced to their owners. While this
    /// shard's work queue is empty (and no placement view has to admit them first), the
    /// commands for this shard run at once, in their order, exactly as the next round would
    /// run them from the front of its queue: the same batches of consecutive publishes to one
    /// address, the same answers queued behind them, the same durable records appended before
    /// the round's end lets the log commit (one group commit, as before). Only the trip
    /// through the work queue is saved. Otherwise they are queued behind what waits there.
    fn run_or_submit_address_commands(&mut self, now_ms: u64) {
        if !self.queues.work.is_empty() || self.placement.is_some() {
            self.queues.submit_address_commands(&mut self.address_commands);
            return;
        }
        let mut commands = std::mem::take(&mut self.address_commands);
        let mut commands_iter = commands.drain(..);
        while let Some((shard, command)) = commands_iter.next() {
            if shard != self.id {
                self.queues.submit(shard, Command::Address(command));
                continue;
            }
            match command {
                AddressCommand::Publish { publisher, seq, message } => {
                    // The publishes right behind it for this shard and the same address join its
                    // batch: counted where they lie, against this one's address (read once), then
                    // each moved once, from the list into the batch.
                    let address = message.address();
                    let joining = (commands_iter.as_slice().iter())
                        .take(MAX_PUBLISH_BATCH - 1)
                        .take_while(|(next_shard, next)| {
                            *next_shard == self.id
                                && matches!(next, AddressCommand::Publish { message, .. } if same_address(message.address(), address))
                        })
                        .count();
                    debug_assert!(self.publications.is_empty(), "publish_batch leaves the batch empty");
                    self.publications.push(Publication { publisher, seq, message });
                    self.publications.extend(commands_iter.by_ref().take(joining).map(|(_, command)| {
                        let AddressCommand::Publish { publisher, seq, message } = command else {
                            unreachable!("the commands joining a batch were just checked to be publishes");
                        };
                        Publication { publisher, seq, message }
                    }));
                    self.publish_gathered(now_ms);
                }
                command => {
                    self.addresses.handle(command, now_ms, &mut self.answers);
                    self.route_address_output();
                }
            }
        }
        drop(commands_iter);
        // The list goes back for its capacity.
        self.address_commands = commands;
    }

    /// Publishes the gathered batch of publications (one address) and routes what it caused.
    fn publish_gathered(&mut self, now_ms: u64) {
        self.counters.messages_received += self.publications.len() as u64;
        self.counters.bytes_received +=
            self.publications.iter().map(|publication| publication.message.body().len() as u64).sum::<u64>();
        self.addresses.publish_batch(&mut self.publications, now_ms, &mut self.answers);
        self.route_address_output();
    }

    /// The writer of connection `id` wrote a batch (or failed to, or ran out of time): its
    /// auto-ack `credits` go back to their owners ([`ConnState::write_completed`]). `None`
    /// when the connection is gone (a newer attachment ended it).
    pub fn write_completed(
        &mut self,
        id: ConnId,
        attachment: Attachment,
        outcome: WriteOutcome,
        credits: CreditReturns,
    ) -> Option<Written> {
        let state = slot_state(&mut self.conns, id)?;
        let written = state.write_completed(attachment, outcome, credits, &mut self.address_commands);
        self.queues.submit_address_commands(&mut self.address_commands);
        Some(written)
    }

    /// The reader of connection `id` finished (EOF, error, or the close is done): a resumable
    /// session is detached until its expiry, any other ends (its slot is freed once its writer
    /// is done). `None` when a newer attachment superseded this one. Wake both tasks.
    pub fn reader_finished(&mut self, id: ConnId, attachment: Attachment, now_ms: u64) -> Option<ReaderFinished> {
        let expiry_ms = u64::from(self.session_config.session_expiry_ms);
        let state = slot_state(&mut self.conns, id)?;
        let detached = state.reader_finished(attachment, now_ms, expiry_ms, &mut self.address_commands)?;
        self.queues.submit_address_commands(&mut self.address_commands);
        if detached {
            Some(ReaderFinished::Detached { expires_at_ms: now_ms + expiry_ms })
        } else {
            self.free_if_done(id);
            Some(ReaderFinished::Ended)
        }
    }

    /// The expiry of connection `id`'s detached session (attachment `attachment`) is due at
    /// `now_ms`: the session ends unless it was resumed ([`ConnState::expire`]). `None` when
    /// the slot is gone.
    pub fn expire_session(&mut self, id: ConnId, attachment: Attachment, now_ms: u64) -> Option<Expiry> {
        let state = slot_state(&mut self.conns, id)?;
        let expiry = state.expire(attachment, now_ms, &mut self.address_commands);
        if expiry == Expiry::Expired {
            self.queues.submit_address_commands(&mut self.address_commands);
            self.free_if_done(id);
        }
        Some(expiry)
    }

    /// Registers a new connection; `make` builds its state once its id is known.
    pub fn register_conn(&mut self, make: impl FnOnce(ConnRef) -> ConnState) -> ConnRef {
        let index = match self.free_conns.pop() {
            Some(index) => index,
            None => {
                self.conns.push(ConnSlot { generation: 0, state: None, writer_running: false });
                (self.conns.len() - 1) as u32
            }
        };
        let slot = &mut self.conns[index as usize];
        let me = ConnRef { shard: self.id, conn: ConnId { index, generation: slot.generation } };
        let mut state = make(me);
        if self.input_stopped {
            state.stop_input();
        }
        slot.state = Some(state);
        slot.writer_running = false;
        me
    }

    /// The broker is stopping (the first step of a graceful stop): every connection, and any
    /// registered from now on, stops processing input, so that the SENDs already taken can be
    /// answered ([`ShardCore::inflight_send_count`] falls to 0) before the closes. Commands
    /// from other shards, receipts and durable commits go on as usual.
    pub fn stop_input(&mut self) {
        self.input_stopped = true;
        for state in self.conns.iter_mut().filter_map(|slot| slot.state.as_mut()) {
            state.stop_input();
        }
    }

    /// SENDs taken from this shard's attached connections and not answered yet (RECEIPT or
    /// refusal): what a stopping shard waits for.
    pub fn inflight_send_count(&self) -> usize {
        self.conns
            .iter()
            .filter_map(|slot| slot.state.as_ref())
            .filter(|state| state.lifecycle().socket().is_some())
            .map(|state| state.session.inflight_send_count())
            .sum()
    }

    /// New limits (a SIGHUP reload) for the sessions opened from now on; open sessions keep
    /// theirs, which their OPENED announced.
    pub fn set_runtime_limits(&mut self, limits: crate::config::RuntimeLimits) {
        let mut session_config = (*self.session_config).clone();
        session_config.limits.max_inflight_sends = limits.max_inflight_sends;
        session_config.limits.max_subscriptions = limits.max_subscriptions;
        session_config.limits.max_credit = limits.max_credit;
        self.session_config = Arc::new(session_config);
        self.max_outbound_bytes = limits.max_outbound_bytes;
        self.addresses.set_max_unwritten_bytes(limits.max_outbound_bytes);
        self.addresses.set_max_light_lead(crate::broker::address::light_lead(limits.max_inflight_sends));
    }

    /// The state of connection `id`, while its slot holds it (an ended connection's until its
    /// writer is done).
    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut ConnState> {
        slot_state(&mut self.conns, id)
    }

    pub fn conn(&self, id: ConnId) -> Option<&ConnState> {
        let slot = self.conns.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.state.as_ref()
    }

    /// The writer task of connection `id` starts (true) or has finished (false). A finished
    /// writer of an ended connection frees its slot.
    pub fn set_writer_running(&mut self, id: ConnId, running: bool) {
        if let Some(slot) = self.conns.get_mut(id.index as usize).filter(|slot| slot.generation == id.generation) {
            slot.writer_running = running;
        }
        self.free_if_done(id);
    }

    /// Frees the slot of connection `id` once its session ended and its writer is done;
    /// commands still addressed to it are dropped on arrival.
    pub fn free_if_done(&mut self, id: ConnId) {
        let Some(slot) = self.conns.get_mut(id.index as usize) else { return };
        let ended = slot.state.as_ref().is_some_and(|state| state.lifecycle().state() == LifecycleState::Ended);
        if slot.generation == id.generation && ended && !slot.writer_running {
            if let Some(at_ms) = slot.state.as_ref().and_then(|state| state.session.credentials_expire_at_ms()) {
                self.credential_deadlines.remove(&(at_ms, id.index, id.generation));
            }
            slot.state = None;
            // A listing for a flush under the old generation finds no connection.
            slot.generation = slot.generation.wrapping_add(1);
            self.free_conns.push(id.index);
        }
    }

    /// Connections with a socket attached: what a stopping shard waits for (its close
    /// frames). Detached sessions, kept for resume, have nothing to write.
    pub fn attached_conn_count(&self) -> usize {
        self.conns
            .iter()
            .filter_map(|slot| slot.state.as_ref())
            .filter(|state| state.lifecycle().socket().is_some())
            .count()
    }

    /// Connections with a socket attached whose writer has not finished: at a stop, those
    /// whose close frame is not written yet.
    pub fn writing_conn_count(&self) -> usize {
        self.conns
            .iter()
            .filter(|slot| slot.writer_running)
            .filter_map(|slot| slot.state.as_ref())
            .filter(|state| state.lifecycle().socket().is_some())
            .count()
    }

    /// Every live connection's id (to close them all; an ended one is closing already).
    pub fn conn_ids(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, slot)| {
                slot.state.as_ref().is_some_and(|state| state.lifecycle().state() != LifecycleState::Ended)
            })
            .map(|(index, slot)| ConnId { index: index as u32, generation: slot.generation })
            .collect()
    }

    /// The shard's counters and gauges now. Walks the address table (to count queued
    /// messages): for a periodic report, not for every message.
    pub fn report(&self) -> ShardReport {
        ShardReport {
            shard: self.id,
            messages_received: self.counters.messages_received,
            messages_delivered: self.counters.messages_delivered,
            sessions: self.conns.len() - self.free_conns.len(),
            queued_messages: self.addresses.queued_messages(),
            queued_bytes: self.addresses.queued_bytes(),
        }
    }

    /// The shard's addresses (for statistics and tests).
    pub fn addresses(&self) -> &AddressTable {
        &self.addresses
    }

    /// Attaches the shard's durable log: recovered messages go back to their queues, and
    /// message ids continue above `message_id_floor` and every id the log handed out.
    pub fn attach_durable_log(
        &mut self,
        log: Rc<RefCell<DurableLog>>,
        durable_addresses: Vec<Bytes>,
        recovery: Recovery,
        message_id_floor: u64,
        now_ms: u64,
        now_unix_ms: u64,
    ) {
        self.addresses.set_durable_log(log.clone(), durable_addresses);
        self.addresses.restore(recovery, now_ms, now_unix_ms);
        self.addresses.continue_ids_above(message_id_floor);
        self.durable_log = Some(log);
    }

    /// An envelope of commands from another shard: they run in the next round, in order.
    pub fn accept_envelope(&mut self, commands: Vec<Command>) {
        self.queues.work.extend(commands);
    }

    /// The control plane's word on placement ([`crate::cluster::view::PlacementView::apply`]):
    /// commands it releases run next, before the rest of the work queue, in their order.
    pub fn cluster_update(&mut self, update: crate::cluster::view::ClusterUpdate, now_ms: u64) {
        let Some(view) = self.placement.as_deref_mut() else { return };
        let mut released = Vec::new();
        view.apply(update, &mut self.addresses, now_ms, &mut self.answers, &mut released);
        for command in released.into_iter().rev() {
            self.queues.work.push_front(Command::Address(command));
        }
        self.route_address_output();
    }

    /// Moves the SENDs the placement view decided to forward to other nodes into `into` (in a
    /// cluster; the shell hands them to its forwarders, [`crate::cluster::forward`]).
    pub fn take_forwards(&mut self, into: &mut Vec<crate::cluster::view::Forward>) {
        if let Some(view) = self.placement.as_deref_mut() {
            view.take_forwards(into);
        }
    }

    /// This shard's placement view, in a cluster.
    pub fn placement(&self) -> Option<&crate::cluster::view::PlacementView> {
        self.placement.as_deref()
    }

    /// A round of work has something to do: commands queued, connections to flush, or
    /// batches for other shards.
    pub fn has_work(&self) -> bool {
        !self.queues.work.is_empty()
            || !self.dirty.is_empty()
            || self.queues.outboxes.iter().any(|outbox| !outbox.is_empty())
    }

    /// Lists a connection for its flush at the end of this round of work (once, however many
    /// commands it got).
    fn mark_dirty(&mut self, id: ConnId) {
        let index = id.index as usize;
        if index >= self.dirty_generation.len() {
            self.dirty_generation.resize(index + 1, None);
        }
        if self.dirty_generation[index] != Some(id.generation) {
            self.dirty_generation[index] = Some(id.generation);
            self.dirty.push(id);
        }
    }

    /// The durable log made every record up to `lsn` durable: the publishes waiting for it are
    /// answered and their messages delivered.
    pub fn durable_committed(&mut self, lsn: Lsn, now_ms: u64) {
        self.addresses.durable_committed(lsn, now_ms, &mut self.answers);
        self.route_address_output();
    }

    /// The durable log failed for good: durable publishes are refused from now on.
    pub fn durable_failed(&mut self, reason: &str) {
        self.addresses.durable_failed(reason, &mut self.answers);
        self.route_address_output();
    }

    /// When the ack timer should next call [`ShardCore::expire_acks`]: the earliest ack
    /// deadline on this shard. `None` disarms the timer until a round of work reports
    /// [`Effects::wake_ack_timer`]. Deadlines only grow, so no later delivery can need an
    /// earlier wake-up than the one returned.
    pub fn poll_ack_deadline(&mut self) -> Option<u64> {
        let next = self.addresses.next_ack_deadline();
        self.ack_timer_armed = next.is_some();
        next
    }

    /// When the shard's timer should next call [`ShardCore::on_deadline`]: the earliest ack
    /// deadline, credential expiry or compaction tick. `None` disarms it until a round of work
    /// reports [`Effects::wake_ack_timer`] (a new ack deadline, or a credential deadline or
    /// compaction tick earlier than the one returned).
    pub fn poll_deadline(&mut self) -> Option<u64> {
        let ack = self.poll_ack_deadline();
        let credentials = self.credential_deadlines.first().map(|&(at_ms, _, _)| at_ms);
        let compaction = self.addresses.compaction_deadline();
        let next = [ack, credentials, compaction].into_iter().flatten().min();
        self.timer_wake_at_ms = next;
        next
    }

    /// The shard's timer fired at `now_ms`: ack deadlines and credential expiries that passed,
    /// and the compaction of queued messages that waited (`AddressTable::compact_waiting`).
    pub fn on_deadline(&mut self, now_ms: u64) {
        self.expire_acks(now_ms);
        self.expire_credentials(now_ms);
        self.addresses.compact_waiting(now_ms);
    }

    /// Ends every session whose credentials expired at or before `now_ms`
    /// ([`ConnState::credentials_expired`]: fatal 4401, no resume); the round of work that
    /// follows flushes and wakes them.
    pub fn expire_credentials(&mut self, now_ms: u64) {
        while let Some(&(at_ms, index, generation)) = self.credential_deadlines.first() {
            if at_ms > now_ms {
                break;
            }
            self.credential_deadlines.pop_first();
            let id = ConnId { index, generation };
            if crate::planted::planted(crate::planted::Bug::CredentialsOutliveExpiry) {
                continue;
            }
            let Some(state) = slot_state(&mut self.conns, id) else { continue };
            if state.credentials_expired(&mut self.address_commands) {
                // A detached session ended: its releases go to the addresses' owners.
                self.queues.submit_address_commands(&mut self.address_commands);
                self.free_if_done(id);
            } else {
                self.mark_dirty(id);
            }
        }
    }

    /// Takes back every client-ack delivery whose ack deadline is at or before `now_ms`
    /// (the consumer is told, the message redelivered or dead-lettered).
    pub fn expire_acks(&mut self, now_ms: u64) {
        self.addresses.expire_acks(now_ms, &mut self.answers);
        self.route_address_output();
    }

    /// Runs the local work queue dry, flushes every connection touched (cumulative receipts,
    /// writer wake-ups), and returns what the shell must do (see [`Effects`]).
    ///
    /// Consecutive publishes to one address (what one read of a publisher's socket yields) are
    /// handed to the address table together ([`AddressTable::publish_batch`]), so a multicast
    /// subscriber gets them in one command; nothing is reordered, since only commands that
    /// are next to each other in the queue are joined.
    pub fn run_work(&mut self, now_ms: u64, wakers: &mut impl ConnWakers) -> Effects<'_> {
        while let Some(command) = self.queues.work.pop_front() {
            // In a cluster, a SEND or SUBSCRIBE runs only where its address is placed.
            let command = match (command, self.placement.as_deref_mut()) {
                (Command::Address(command), Some(view)) => {
                    match view.admit(command, &mut self.addresses, now_ms, &mut self.answers) {
                        Some(command) => Command::Address(command),
                        None => {
                            self.route_address_output();
                            continue;
                        }
                    }
                }
                (command, _) => command,
            };
            match command {
                Command::Address(AddressCommand::Publish { publisher, seq, message }) => {
                    self.publications.push(Publication { publisher, seq, message });
                    self.queues.take_publishes_to_same_address(&mut self.publications);
                    self.publish_gathered(now_ms);
                }
                Command::Address(command) => {
                    self.addresses.handle(command, now_ms, &mut self.answers);
                    self.route_address_output();
                }
                Command::Conn(command) => {
                    match &command {
                        ConnCommand::Deliver { deliveries, .. } => {
                            self.counters.messages_delivered += deliveries.len() as u64;
                            for delivery in deliveries {
                                self.counters.bytes_delivered += delivery.message.body().len() as u64;
                                self.counters.messages_redelivered += u64::from(delivery.redelivered);
                            }
                        }
                        ConnCommand::PublishDone { outcome: Err(refusal), .. }
                        | ConnCommand::SubscribeDone { outcome: Err(refusal), .. }
                        | ConnCommand::SubscriptionEnded { refusal, .. } => {
                            self.counters.refusals[inspect::refusal_index(refusal.code)] += 1;
                        }
                        _ => {}
                    }
                    let id = command.conn();
                    let address_commands = &mut self.address_commands;
                    // A command for a connection that is gone (or ended) is dropped.
                    let state = self.conns.get_mut(id.index as usize).filter(|slot| slot.generation == id.generation);
                    let state = state.and_then(|slot| slot.state.as_mut());
                    let state = state.filter(|state| state.lifecycle().state() != LifecycleState::Ended);
                    if let Some(ConnState { session, outbound, .. }) = state {
                        session.on_command(command, &mut SessionEffects { outbound, commands: address_commands });
                        self.mark_dirty(id);
                        self.queues.submit_address_commands(&mut self.address_commands);
                    }
                }
            }
        }
        // Newest listed first: the connection whose input started the round (listed by
        // `bytes_read` before its commands ran) is flushed after the connections those
        // commands delivered to. A writer woken earlier writes earlier (monoio runs woken tasks
        // in order, and io_uring runs the writes of one submission in order), so a MESSAGE no
        // longer waits behind its publisher's RECEIPT: on loopback each write carries the
        // receiving side's wake-up too (docs/PERFORMANCE.md, "Session 13").
        for id in self.dirty.drain(..).rev() {
            self.dirty_generation[id.index as usize] = None;
            // Cumulative receipt, then wake whichever task can make progress.
            let slot = &mut self.conns[id.index as usize];
            if let Some(state) = slot.state.as_mut().filter(|_| slot.generation == id.generation) {
                wakers.wake(id, state.flush());
            }
        }
        // Commands for this shard go on the local work queue (`Queues::submit`), never through
        // its own inbox, where they would run a round later and out of order with local work.
        assert!(
            self.queues.outboxes[usize::from(self.id.0)].is_empty(),
            "shard {} posted commands to itself",
            self.id.0
        );
        debug_assert!(self.queues.work.is_empty() && self.dirty.is_empty(), "a round leaves no work behind");
        let log_has_pending = self.durable_log.as_ref().is_some_and(|log| log.borrow().has_pending());
        Effects {
            posts: Posts { outboxes: self.queues.outboxes.iter_mut().enumerate() },
            log_has_pending,
            wake_ack_timer: std::mem::take(&mut self.wake_ack_timer),
        }
    }

    /// Routes what the address table produced: answers to connections, forwards to other
    /// address owners; notes a new ack deadline for the timer.
    fn route_address_output(&mut self) {
        for (shard, command) in self.answers.drain(..) {
            self.queues.submit(shard, Command::Conn(command));
        }
        // The table forwards only dead-lettered messages (to their `DLQ.` address's owner).
        for (shard, command) in self.addresses.take_forwards() {
            self.counters.messages_dead_lettered += 1;
            self.queues.submit(shard, Command::Address(command));
        }
        if self.addresses.take_deadline_added() && !self.ack_timer_armed {
            self.ack_timer_armed = true;
            self.wake_ack_timer = true;
        }
        if let Some(at_ms) = self.addresses.take_compaction_scheduled() {
            self.wake_timer_by(at_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two shard cores in one thread, their connections' states in a fake table (fed the
    //! clients' WebSocket bytes), the envelopes carried between them by the test, and time
    //! passed in by hand: no runtime, no socket, no clock.

    use super::*;
    use crate::broker::{owner_of, ConnRef};
    use crate::config::Config;
    use crate::conn::lifecycle::Attachment;
    use crate::conn::outbound::WriteBatch;
    use crate::conn::state::ReadStep;
    use crate::mbws::{self, AckMode, Binding, CodecLimits, DeliveryMode, Frame, Subprotocol, PROTOCOL_VERSION};

    const SHARDS: usize = 2;

    /// What a connection's reader task keeps (its state is the core's), and how often the
    /// core woke its tasks (once per flush).
    struct FakeConn {
        attachment: Attachment,
        decoder: crate::ws::message::Decoder,
        flushes: usize,
    }

    /// One shard's connection tasks, by slot index, and the order the core woke them in.
    #[derive(Default)]
    struct FakeConns {
        conns: Vec<FakeConn>,
        woken: Vec<ConnId>,
    }

    impl ConnWakers for FakeConns {
        fn wake(&mut self, id: ConnId, _wake: Wake) {
            self.conns[id.index as usize].flushes += 1;
            self.woken.push(id);
        }
    }

    fn config(ack_timeout_ms: u64) -> Config {
        Config { shards: SHARDS, ack_timeout_ms, ..Default::default() }
    }

    /// Shard `index` of a `SHARDS`-shard broker.
    struct TestShard {
        core: ShardCore,
        conns: FakeConns,
    }

    struct Broker {
        shards: Vec<TestShard>,
    }

    impl Broker {
        fn new(ack_timeout_ms: u64) -> Broker {
            let config = config(ack_timeout_ms);
            let shards = (0..SHARDS)
                .map(|index| TestShard {
                    core: ShardCore::new(ShardId(index as u16), SHARDS, &config),
                    conns: FakeConns::default(),
                })
                .collect();
            Broker { shards }
        }

        /// Opens a new session on `shard`; returns its id.
        fn open(&mut self, shard: usize, now_ms: u64) -> ConnRef {
            let TestShard { core, conns } = &mut self.shards[shard];
            let open = Frame::Open(mbws::Open { version: PROTOCOL_VERSION, ..Default::default() });
            let payload = mbws::encode(Binding::Binary, &open);
            // The socket number is never used.
            let (me, attachment) = core.open_session(
                Subprotocol::Reliable,
                3,
                Binding::Binary,
                payload.freeze(),
                7,
                now_ms,
                crate::auth::Access::unrestricted(),
            );
            let decoder = crate::ws::message::Decoder::new(crate::ws::Role::Server, 1 << 20, 1 << 20);
            let fake = FakeConn { attachment, decoder, flushes: 0 };
            match conns.conns.get_mut(me.conn.index as usize) {
                Some(reused) => *reused = fake,
                None => conns.conns.push(fake),
            }
            assert!(matches!(self.written(me)[..], [Frame::Opened(_)]));
            me
        }

        /// A frame from the client of `conn`, read by its shard as WebSocket bytes: what the
        /// reader task does.
        fn frame(&mut self, conn: ConnRef, frame: Frame, now_ms: u64) {
            let shard = &mut self.shards[usize::from(conn.shard.0)];
            let fake = &mut shard.conns.conns[conn.conn.index as usize];
            let payload = mbws::encode(Binding::Binary, &frame);
            let mut bytes =
                crate::ws::frame::encode_frame(true, crate::ws::OpCode::Binary, &payload, Some([1, 2, 3, 4]));
            let step = shard.core.bytes_read(conn.conn, fake.attachment, &mut fake.decoder, &mut bytes, now_ms);
            assert_eq!(step, ReadStep::NeedMore, "the session goes on");
            assert!(bytes.is_empty());
        }

        /// Frames from the client of `conn` that its shard reads at once (one read of their
        /// WebSocket bytes together).
        fn frames_in_one_read(&mut self, conn: ConnRef, frames: &[Frame], now_ms: u64) {
            let shard = &mut self.shards[usize::from(conn.shard.0)];
            let fake = &mut shard.conns.conns[conn.conn.index as usize];
            let mut bytes = bytes::BytesMut::new();
            for frame in frames {
                let payload = mbws::encode(Binding::Binary, frame);
                let mask = Some([1, 2, 3, 4]);
                bytes.extend_from_slice(&crate::ws::frame::encode_frame(
                    true,
                    crate::ws::OpCode::Binary,
                    &payload,
                    mask,
                ));
            }
            let step = shard.core.bytes_read(conn.conn, fake.attachment, &mut fake.decoder, &mut bytes, now_ms);
            assert_eq!(step, ReadStep::NeedMore, "the session goes on");
            assert!(bytes.is_empty());
        }

        /// One round of work on `shard`: its posts, and whether it asked for an ack-timer wake-up.
        fn round(&mut self, shard: usize, now_ms: u64) -> (Vec<(ShardId, Vec<Command>)>, bool) {
            let TestShard { core, conns } = &mut self.shards[shard];
            let effects = core.run_work(now_ms, conns);
            assert!(!effects.log_has_pending, "no durable log in these tests");
            let wake_ack_timer = effects.wake_ack_timer;
            (effects.posts.collect(), wake_ack_timer)
        }

        /// Runs a round of work on every shard, carrying each shard's posts into the others'
        /// work queues, until no shard has anything left to do. Returns the ack-timer wake-ups.
        fn settle(&mut self, now_ms: u64) -> Vec<ShardId> {
            let mut wake_ups = Vec::new();
            loop {
                let mut carried = Vec::new();
                for shard in 0..SHARDS {
                    let (posts, wake_ack_timer) = self.round(shard, now_ms);
                    if wake_ack_timer {
                        wake_ups.push(self.shards[shard].core.id());
                    }
                    carried.extend(posts);
                }
                if carried.is_empty() {
                    return wake_ups;
                }
                for (destination, commands) in carried {
                    self.shards[usize::from(destination.0)].core.accept_envelope(commands);
                }
            }
        }

        /// Every frame queued for `conn`'s client since the last call.
        fn written(&mut self, conn: ConnRef) -> Vec<Frame> {
            let state = self.shards[usize::from(conn.shard.0)].core.conn_mut(conn.conn).expect("an open connection");
            let Some(batch) = state.outbound.take_batch(WriteBatch::default()) else { return Vec::new() };
            let mut bytes = bytes::BytesMut::from(&batch.to_vec()[..]);
            let mut decoder = crate::ws::message::Decoder::new(crate::ws::Role::Client, 1 << 20, 1 << 20);
            let mut frames = Vec::new();
            while let Some(event) = decoder.next_event(&mut bytes).expect("valid WebSocket frames") {
                if let crate::ws::message::WsEvent::Binary(payload) = event {
                    frames.push(mbws::decode(Binding::Binary, payload, &CodecLimits::default()).expect("MBWS"));
                }
            }
            frames
        }
    }

    /// Opens a session on shard 0 of `broker` whose credentials expire at `expire_at_ms`.
    fn open_expiring(broker: &mut Broker, subprotocol: Subprotocol, expire_at_ms: u64) -> (ConnRef, Attachment) {
        let open = Frame::Open(mbws::Open { version: PROTOCOL_VERSION, ..Default::default() });
        let payload = mbws::encode(Binding::Binary, &open).freeze();
        let access = crate::auth::Access::Granted(
            std::sync::Arc::new(crate::auth::Permissions::everything()),
            Some(expire_at_ms),
        );
        let core = &mut broker.shards[0].core;
        let (me, attachment) = core.open_session(subprotocol, 3, Binding::Binary, payload, 7, 0, access);
        let new_fake = || FakeConn {
            attachment,
            decoder: crate::ws::message::Decoder::new(crate::ws::Role::Server, 1 << 20, 1 << 20),
            flushes: 0,
        };
        broker.shards[0].conns.conns.resize_with(me.conn.index as usize + 1, new_fake);
        assert!(matches!(broker.written(me)[..], [Frame::Opened(_)]));
        (me, attachment)
    }

    /// A session whose credentials (a JWT) expire is ended by the shard's timer at that
    /// moment, with fatal 4401 and close 4401, and not kept for a resume; the timer is woken
    /// for a deadline earlier than the one it sleeps until.
    #[test]
    fn expiring_credentials_end_the_session_at_their_deadline() {
        let mut broker = Broker::new(0);
        let (late, _) = open_expiring(&mut broker, Subprotocol::Reliable, 9_000);
        assert_eq!(broker.settle(0), vec![ShardId(0)], "the timer is woken for the first deadline");
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(9_000));
        let (early, _) = open_expiring(&mut broker, Subprotocol::Reliable, 2_000);
        assert_eq!(broker.settle(0), vec![ShardId(0)], "an earlier deadline wakes the sleeping timer");
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(2_000));
        broker.shards[0].core.on_deadline(1_999);
        broker.settle(1_999);
        assert!(broker.written(early).is_empty(), "not a millisecond early");

        broker.shards[0].core.on_deadline(2_000);
        broker.settle(2_000);
        let frames = broker.written(early);
        let [Frame::Error(error)] = &frames[..] else { panic!("one ERROR: {frames:?}") };
        assert_eq!((error.code, error.fatal), (ErrorCode::Unauthenticated.as_u16(), true));
        assert!(String::from_utf8_lossy(&error.reason).contains("token expired"));
        let state = broker.shards[0].core.conn(early.conn).unwrap();
        assert!(matches!(state.lifecycle().state(), LifecycleState::Closing { .. }));
        assert_eq!(state.close_reason().map(|close| close.code), Some(4401));
        assert!(!state.session.is_resumable(), "expired credentials end the session for good");
        assert!(broker.written(late).is_empty(), "the other session goes on");
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(9_000));
    }

    /// A session whose slot is freed before its credentials expire leaves no deadline behind
    /// (the set is bounded by the live sessions, however long their tokens last).
    #[test]
    fn a_freed_session_leaves_no_credential_deadline() {
        let mut broker = Broker::new(0);
        let (me, attachment) = open_expiring(&mut broker, Subprotocol::Light, 1_000_000_000);
        broker.settle(0);
        let core = &mut broker.shards[0].core;
        assert_eq!(core.poll_deadline(), Some(1_000_000_000));
        assert_eq!(core.reader_finished(me.conn, attachment, 10), Some(ReaderFinished::Ended));
        core.set_writer_running(me.conn, false);
        assert!(core.conn(me.conn).is_none(), "the slot is free");
        assert_eq!(core.poll_deadline(), None);
    }

    /// A message that waits in a queue is compacted by the shard's timer: the first one queued
    /// wakes the timer for a compaction tick even while it sleeps until a later deadline, and
    /// the timer rests again once nothing waits uncompacted.
    #[test]
    fn a_waiting_message_wakes_the_timer_for_its_compaction_tick() {
        use crate::broker::address::COMPACTION_TICK_MS as TICK;
        let mut broker = Broker::new(0);
        let (_, _) = open_expiring(&mut broker, Subprotocol::Reliable, 9_000);
        broker.settle(0);
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(9_000));
        let publisher = broker.open(0, 100);
        broker.frame(publisher, send(1, &address_owned_by(0), b"nobody consumes it yet"), 100);
        assert_eq!(broker.settle(100), vec![ShardId(0)], "the first message queued wakes the sleeping timer");
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(100 + TICK));
        broker.shards[0].core.on_deadline(100 + TICK);
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(100 + 2 * TICK), "it has not waited a whole tick yet");
        broker.shards[0].core.on_deadline(100 + 2 * TICK);
        assert_eq!(broker.shards[0].core.poll_deadline(), Some(9_000), "compacted: only the credentials are left");
    }

    /// An address that shard `owner` owns.
    fn address_owned_by(owner: usize) -> Bytes {
        (0..)
            .map(|index| Bytes::from(format!("orders-{index}")))
            .find(|name| owner_of(name, SHARDS) == ShardId(owner as u16))
            .expect("some name hashes to every shard")
    }

    fn subscribe(address: &Bytes) -> Frame {
        subscribe_with(1, address, DeliveryMode::Anycast, AckMode::Client, 10)
    }

    fn subscribe_with(id: u32, address: &Bytes, mode: DeliveryMode, ack_mode: AckMode, credit: u32) -> Frame {
        Frame::Subscribe(mbws::Subscribe { subscription_id: id, address: address.clone(), mode, ack_mode, credit })
    }

    fn send(seq: u64, address: &Bytes, body: &'static [u8]) -> Frame {
        Frame::Send(mbws::Send { seq, address: address.clone(), body: Bytes::from_static(body), ..Default::default() })
    }

    /// A publisher and a consumer on shard 0, the address on shard 1: SUBSCRIBE, SEND and ACK
    /// each cross to shard 1 and their answers come back, all in envelopes the test carries.
    #[test]
    fn a_publish_crosses_to_the_owner_and_comes_back_as_delivery_and_receipt() {
        let mut broker = Broker::new(30_000);
        let address = address_owned_by(1);
        let publisher = broker.open(0, 0);
        let consumer = broker.open(0, 0);

        broker.frame(consumer, subscribe(&address), 0);
        assert_eq!(broker.settle(0), Vec::<ShardId>::new());
        assert!(matches!(broker.written(consumer)[..], [Frame::Subscribed(_)]));

        broker.frame(publisher, send(1, &address, b"hello"), 5);
        // Before any envelope is carried, shard 0 only posts the publish to shard 1.
        let (posts, _) = broker.round(0, 5);
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].0, ShardId(1));
        assert!(matches!(posts[0].1[..], [Command::Address(AddressCommand::Publish { seq: 1, .. })]));
        broker.shards[1].core.accept_envelope(posts.into_iter().next().unwrap().1);
        // The owner delivers with an ack deadline: its timer must be woken.
        assert_eq!(broker.settle(5), vec![ShardId(1)]);
        assert_eq!(broker.shards[1].core.poll_ack_deadline(), Some(5 + 30_000));

        let delivered = broker.written(consumer);
        let [Frame::Message(message)] = &delivered[..] else { panic!("one MESSAGE: {delivered:?}") };
        assert_eq!((message.delivery_seq, message.body.as_ref(), message.redelivered), (1, &b"hello"[..], false));
        assert_eq!(broker.written(publisher), vec![Frame::Receipt(mbws::Receipt { seq: 1 })]);

        broker.frame(consumer, Frame::Ack(mbws::Ack { delivery_seq: 1, cumulative: false }), 6);
        broker.settle(6);
        assert_eq!(broker.shards[1].core.poll_ack_deadline(), None, "the ACK reached the owner");
        assert!(broker.written(consumer).is_empty());
        // Nothing is left anywhere, and the same events give the same result at any later time.
        broker.shards[1].core.expire_acks(1_000_000);
        broker.settle(1_000_000);
        assert!(broker.written(consumer).is_empty());
    }

    /// An unacknowledged delivery is taken back exactly when `now_ms` reaches its deadline,
    /// and redelivered to the consumer on the other shard.
    #[test]
    fn an_ack_timeout_redelivers_when_time_passes_the_deadline() {
        let mut broker = Broker::new(1_000);
        let address = address_owned_by(1);
        let publisher = broker.open(0, 0);
        let consumer = broker.open(0, 0);
        broker.frame(consumer, subscribe(&address), 0);
        broker.frame(publisher, send(1, &address, b"once"), 0);
        broker.settle(100);
        assert!(matches!(broker.written(consumer)[..], [Frame::Subscribed(_), Frame::Message(_)]));
        let deadline = broker.shards[1].core.poll_ack_deadline().expect("a deadline");
        assert_eq!(deadline, 1_100);

        // One millisecond early: nothing happens.
        broker.shards[1].core.expire_acks(deadline - 1);
        broker.settle(deadline - 1);
        assert!(broker.written(consumer).is_empty());

        broker.shards[1].core.expire_acks(deadline);
        let wake_ups = broker.settle(deadline);
        let redelivered = broker.written(consumer);
        let [Frame::Message(message)] = &redelivered[..] else { panic!("one MESSAGE: {redelivered:?}") };
        assert_eq!((message.delivery_seq, message.body.as_ref(), message.redelivered), (2, &b"once"[..], true));
        // The redelivery has its own deadline; the timer was armed, so no extra wake-up.
        assert!(wake_ups.is_empty());
        assert_eq!(broker.shards[1].core.poll_ack_deadline(), Some(deadline + 1_000));
    }

    /// Many commands for one connection in a round flush it once; a publish batch to one
    /// address reaches the owner as one envelope.
    #[test]
    fn a_round_flushes_each_connection_once_and_posts_once_per_shard() {
        let mut broker = Broker::new(0);
        let address = address_owned_by(1);
        let publisher = broker.open(0, 0);
        for seq in 1..=3 {
            broker.frame(publisher, send(seq, &address, b"x"), 0);
        }
        let flushes_before = broker.shards[0].conns.conns[0].flushes;
        let (posts, _) = broker.round(0, 0);
        assert_eq!(posts.len(), 1, "one envelope for shard 1");
        assert_eq!(posts[0].1.len(), 3);
        assert_eq!(broker.shards[0].conns.conns[0].flushes, flushes_before + 1);
        for (_, commands) in posts {
            broker.shards[1].core.accept_envelope(commands);
        }
        broker.settle(0);
        assert_eq!(broker.written(publisher), vec![Frame::Receipt(mbws::Receipt { seq: 3 })], "one cumulative RECEIPT");
    }

    /// A SEND to an address of the publisher's own shard: the round wakes the consumer's
    /// tasks before the publisher's, so the MESSAGE is written before the RECEIPT (a
    /// delivery's latency does not include writing the receipt).
    #[test]
    fn a_round_wakes_the_consumer_before_the_publisher() {
        let mut broker = Broker::new(30_000);
        let address = address_owned_by(0);
        let consumer = broker.open(0, 0);
        broker.frame(consumer, subscribe(&address), 0);
        broker.settle(0);
        broker.written(consumer);
        let publisher = broker.open(0, 0);
        broker.settle(0);
        broker.shards[0].conns.woken.clear();

        broker.frame(publisher, send(1, &address, b"first"), 0);
        broker.round(0, 0);
        assert_eq!(broker.shards[0].conns.woken, vec![consumer.conn, publisher.conn]);
        assert!(matches!(&broker.written(consumer)[..], [Frame::Message(_)]));
        assert_eq!(broker.written(publisher), vec![Frame::Receipt(mbws::Receipt { seq: 1 })]);
    }

    /// The bodies of the MESSAGEs among `frames`, in order.
    fn bodies(frames: &[Frame]) -> Vec<Bytes> {
        frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::Message(message) => Some(message.body.clone()),
                _ => None,
            })
            .collect()
    }

    /// A SUBSCRIBE between two SENDs to one address in one read runs between them: a
    /// multicast subscription gets what is published after it, not what came before, though
    /// the read's commands run at once, SENDs gathered into publish batches.
    #[test]
    fn a_command_between_publishes_in_one_read_keeps_its_place() {
        let mut broker = Broker::new(0);
        let address = address_owned_by(0);
        let conn = broker.open(0, 0);
        let subscribe = subscribe_with(1, &address, DeliveryMode::Multicast, AckMode::Auto, 10);
        let frames = [send(1, &address, b"before"), subscribe, send(2, &address, b"after"), send(3, &address, b"last")];
        broker.frames_in_one_read(conn, &frames, 0);
        broker.settle(0);
        let written = broker.written(conn);
        assert!(written.contains(&Frame::Subscribed(mbws::Subscribed { subscription_id: 1 })), "{written:?}");
        assert_eq!(bodies(&written), vec![Bytes::from_static(b"after"), Bytes::from_static(b"last")]);
        assert_eq!(written.last(), Some(&Frame::Receipt(mbws::Receipt { seq: 3 })), "{written:?}");
    }

    /// SENDs to two addresses interleaved in one read are published in the order they came:
    /// a consumer of both gets them in that order, and the publisher one RECEIPT for all.
    #[test]
    fn publishes_to_two_addresses_interleaved_in_one_read_keep_their_order() {
        let mut broker = Broker::new(0);
        let first = address_owned_by(0);
        let second = (0..)
            .map(|index| Bytes::from(format!("invoices-{index}")))
            .find(|name| owner_of(name, SHARDS) == ShardId(0))
            .expect("some name hashes to shard 0");
        let consumer = broker.open(0, 0);
        let publisher = broker.open(0, 0);
        for (id, address) in [(1, &first), (2, &second)] {
            let subscribe = subscribe_with(id, address, DeliveryMode::Anycast, AckMode::Auto, 10);
            broker.frame(consumer, subscribe, 0);
        }
        broker.settle(0);
        assert_eq!(broker.written(consumer).len(), 2, "two SUBSCRIBEDs");
        let frames = [
            send(1, &first, b"1"),
            send(2, &first, b"2"),
            send(3, &second, b"3"),
            send(4, &first, b"4"),
            send(5, &second, b"5"),
            send(6, &second, b"6"),
        ];
        broker.frames_in_one_read(publisher, &frames, 0);
        broker.settle(0);
        let expected: Vec<Bytes> = [b"1", b"2", b"3", b"4", b"5", b"6"].map(|body| Bytes::from_static(body)).to_vec();
        assert_eq!(bodies(&broker.written(consumer)), expected);
        assert_eq!(broker.written(publisher), vec![Frame::Receipt(mbws::Receipt { seq: 6 })]);
    }

    /// More SENDs to one address in one read than a publish batch holds are all published, in
    /// order, in batches of at most `MAX_PUBLISH_BATCH`.
    #[test]
    fn a_read_of_more_sends_than_a_batch_holds_publishes_them_all_in_order() {
        let mut broker = Broker::new(0);
        let address = address_owned_by(0);
        let consumer = broker.open(0, 0);
        let publisher = broker.open(0, 0);
        let subscribe = subscribe_with(1, &address, DeliveryMode::Anycast, AckMode::Auto, 1_000);
        broker.frame(consumer, subscribe, 0);
        broker.settle(0);
        broker.written(consumer);
        let count = MAX_PUBLISH_BATCH as u64 + 10;
        let frames: Vec<Frame> = (1..=count)
            .map(|seq| {
                let body = Bytes::from(seq.to_string());
                Frame::Send(mbws::Send { seq, address: address.clone(), body, ..Default::default() })
            })
            .collect();
        broker.frames_in_one_read(publisher, &frames, 0);
        broker.settle(0);
        let expected: Vec<Bytes> = (1..=count).map(|seq| Bytes::from(seq.to_string())).collect();
        assert_eq!(bodies(&broker.written(consumer)), expected);
        assert_eq!(broker.written(publisher), vec![Frame::Receipt(mbws::Receipt { seq: count })]);
    }

    /// An ended connection keeps its slot while its writer writes the close frame; then the
    /// slot is freed, and its next connection has another generation (old ids find nothing).
    #[test]
    fn a_slot_is_freed_once_its_session_ended_and_its_writer_is_done() {
        let mut broker = Broker::new(0);
        let conn = broker.open(0, 0);
        let attachment = broker.shards[0].conns.conns[0].attachment;
        let core = &mut broker.shards[0].core;
        core.set_writer_running(conn.conn, true);
        let mut commands = Vec::new();
        let state = core.conn_mut(conn.conn).expect("open");
        assert_eq!(state.reader_finished(attachment, 0, 1_000, &mut commands), Some(true), "detached");
        core.free_if_done(conn.conn);
        assert!(core.conn(conn.conn).is_some(), "a detached session keeps its slot");
        let state = core.conn_mut(conn.conn).expect("detached");
        assert_eq!(state.expire(attachment, 1_000, &mut commands), crate::conn::state::Expiry::Expired);
        core.free_if_done(conn.conn);
        assert!(core.conn(conn.conn).is_some(), "its writer is still writing");
        assert!(core.conn_ids().is_empty(), "an ended connection is not closed again at shutdown");
        core.set_writer_running(conn.conn, false);
        assert!(core.conn(conn.conn).is_none(), "freed once the writer is done");

        let next = broker.open(0, 5);
        assert_eq!(next.conn.index, conn.conn.index, "the slot is reused");
        assert_ne!(next.conn.generation, conn.conn.generation);
        let core = &mut broker.shards[0].core;
        assert!(core.conn(conn.conn).is_none(), "the old id finds nothing");
        core.set_writer_running(conn.conn, true);
        core.free_if_done(conn.conn);
        assert!(core.conn(next.conn).is_some(), "the old id frees nothing either");
    }

    #[test]
    fn same_address_agrees_with_equality_at_every_length_and_difference() {
        // Publishes join a batch only to the same address: a false "same" would publish a
        // message to another address's queue, a false "different" only splits a batch.
        for len in 0..=24 {
            let a: Vec<u8> = (0..len).map(|i| b'a' + i as u8).collect();
            assert!(same_address(&a, &a.clone()), "{len} bytes against a copy");
            for position in 0..len {
                let mut b = a.clone();
                b[position] ^= 0x20;
                assert!(!same_address(&a, &b), "{len} bytes differing at {position}");
            }
            let longer = [a.as_slice(), b"x"].concat();
            assert!(!same_address(&a, &longer) && !same_address(&longer, &a), "{len} bytes against a prefix");
        }
    }
}
