//! One simulated run: the shard cores, the IO shell's duties as events in virtual time, the
//! network between the cores and the clients, and the ledger of what the clients saw.
//!
//! The shell's duties mirror `conn/mod.rs` and `shard/mod.rs` step for step (the names of
//! the handlers say which task they stand for): a connection's reader reads only while the
//! core lets it ([`ConnState::reader_may_continue`]) and parks otherwise; its writer takes one
//! batch at a time and parks when there is none; both are woken only by the wakes the core
//! reports. So a wake-up the core forgets shows up here as a connection that never drains.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::client::{Client, Out};
use super::rng::Rng;
use crate::broker::{Command, ConnId, ConnRef, ShardId};
use crate::config::Config;
use crate::conn::lifecycle::{Attachment, State as LifecycleState};
use crate::conn::outbound::{CreditReturns, Outbound, WriteBatch};
use crate::conn::state::{superseded_farewell, Expiry, NextWrite, ReadStep, Wake, WriteOutcome, Written};
use crate::mbws::{self, AckMode, Binding, DeliveryMode, ErrorFrame, Frame, Subprotocol};
use crate::shard::core::{ConnWakers, ReaderFinished, ShardCore};
use crate::store::{CommitBatch, DurableLog};
use crate::ws::message::{close_payload, Decoder, WsEvent};
use crate::ws::{OpCode, Role};

/// A message's identity: which publisher, its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgKey {
    pub publisher: u32,
    pub message: u32,
}

impl MsgKey {
    /// The body a publisher sends: the key, and the publisher's session and SEND seq (for
    /// the order check).
    pub fn body(&self, session: u32, seq: u64) -> Bytes {
        Bytes::from(format!("p{}.m{}.e{session}.s{seq}", self.publisher, self.message))
    }

    /// The key, session and seq of a body made by [`MsgKey::body`].
    pub fn parse(body: &[u8]) -> Option<(MsgKey, u32, u64)> {
        let text = std::str::from_utf8(body).ok()?;
        let mut parts = text.split('.');
        let publisher = parts.next()?.strip_prefix('p')?.parse().ok()?;
        let message = parts.next()?.strip_prefix('m')?.parse().ok()?;
        let session = parts.next()?.strip_prefix('e')?.parse().ok()?;
        let seq = parts.next()?.strip_prefix('s')?.parse().ok()?;
        Some((MsgKey { publisher, message }, session, seq))
    }
}

#[derive(Debug, Default)]
struct MsgState {
    address: Bytes,
    receipted: bool,
    refused: bool,
    /// Resent on a new session after the old one was lost: may be published twice.
    may_duplicate: bool,
    first_deliveries: u32,
    deliveries: u32,
}

/// What the clients saw, and the invariants over it (see the module doc of `sim`).
#[derive(Default)]
pub struct Ledger {
    messages: BTreeMap<MsgKey, MsgState>,
    /// The last SEND seq of a first delivery per (consumer, its session, address, publisher,
    /// publisher's session).
    order: BTreeMap<(usize, u32, Bytes, u32, u32), u64>,
    pub violations: Vec<String>,
    /// Print every event (`MBWS_SIM_TRACE=1`, for a replay).
    pub trace: bool,
    pub delivered: u64,
    pub redelivered: u64,
    /// A client's live connection superseded by the resume of one it had given up.
    pub supersede_races: u64,
    pub crashes: u64,
    /// Multicast subscriptions the broker ended for falling behind (4429), then renewed.
    pub subscriptions_ended: u64,
    /// Which message each (address, message id) named: an id is never shown for two messages.
    ids: BTreeMap<(Bytes, u64), MsgKey>,
    /// (consumer, session, message) of every first delivery to a multicast subscriber.
    multicast_firsts: std::collections::BTreeSet<(usize, u32, MsgKey)>,
    pub receipted: u64,
    pub refused: u64,
    /// Sessions ended by fatal 4401 when their credentials expired, as their clients saw it.
    pub credentials_expired: u64,
    /// Credential deadlines the world saw pass with the session no longer open.
    pub credential_deadlines_kept: u64,
}

impl Ledger {
    pub fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    pub fn receipted(&mut self, key: MsgKey, address: &Bytes) {
        let state = self.messages.entry(key).or_default();
        if !state.receipted {
            self.receipted += 1;
        }
        state.receipted = true;
        state.address = address.clone();
    }

    pub fn refused(&mut self, key: MsgKey) {
        self.refused += 1;
        self.messages.entry(key).or_default().refused = true;
    }

    pub fn may_duplicate(&mut self, key: MsgKey) {
        self.messages.entry(key).or_default().may_duplicate = true;
    }

    pub fn delivered(
        &mut self,
        (consumer, session): (usize, u32),
        key: MsgKey,
        (publisher_session, seq): (u32, u64),
        (address, message_id): (&Bytes, u64),
        redelivered: bool,
        multicast: bool,
    ) {
        self.delivered += 1;
        let named = *self.ids.entry((address.clone(), message_id)).or_insert(key);
        if named != key {
            self.violations.push(format!(
                "message id {message_id} on {:?} named {named:?} and then {key:?}: an id shown twice",
                String::from_utf8_lossy(address)
            ));
        }
        let state = self.messages.entry(key).or_default();
        state.deliveries += 1;
        if redelivered {
            self.redelivered += 1;
            return;
        }
        state.first_deliveries += 1;
        if state.may_duplicate {
            return;
        }
        // Anycast: one first delivery in all; multicast: one per subscriber session.
        let first_here = if multicast {
            self.multicast_firsts.insert((consumer, session, key))
        } else {
            state.first_deliveries == 1
        };
        if !first_here {
            self.violations.push(format!(
                "{key:?} delivered for the first time (redelivered false) {} times: published twice",
                state.first_deliveries
            ));
        }
        let last =
            self.order.entry((consumer, session, address.clone(), key.publisher, publisher_session)).or_default();
        if seq <= *last {
            self.violations.push(format!(
                "consumer {consumer} session {session}: {key:?} (seq {seq}) after seq {} of the same publisher session \
                 on {:?}: per-publisher order broken",
                *last,
                String::from_utf8_lossy(address)
            ));
        }
        *last = seq;
    }

    /// End of run: every receipted message reached a consumer.
    fn check_nothing_lost(&mut self) {
        let lost: Vec<MsgKey> = self
            .messages
            .iter()
            // Anycast client-ack addresses only: auto ack is at most once, and a multicast
            // message published while no subscriber is there goes nowhere.
            .filter(|(_, state)| state.address.starts_with(b"queue-"))
            .filter(|(_, state)| state.receipted && !state.refused && state.deliveries == 0)
            .map(|(key, _)| *key)
            .collect();
        if let Some(first) = lost.first() {
            self.violations.push(format!("{} receipted messages never delivered, first {first:?}", lost.len()));
        }
    }
}

/// The shape of a run, drawn from its seed (so seeds explore different shapes).
#[derive(Clone, Debug)]
pub struct Options {
    pub shards: usize,
    pub publishers: usize,
    pub consumers: usize,
    pub addresses: usize,
    /// Multicast subscribers of `topic-0` (client or auto ack), and auto-ack anycast consumers
    /// of `auto-0`; publishers send there too when there are any.
    pub multicast_consumers: usize,
    pub auto_ack_consumers: usize,
    pub messages_per_publisher: u32,
    pub window: usize,
    pub credit: u32,
    /// Per mille of deliveries a consumer acknowledges late.
    pub late_ack_per_mille: u32,
    /// Per mille of steps that cut a random connection.
    pub cut_per_mille: u32,
    /// Per mille of steps where a client abandons its connection silently.
    pub abandon_per_mille: u32,
    /// Largest one-way network delay.
    pub max_latency_ms: u64,
    pub ack_timeout_ms: u64,
    pub session_expiry_ms: u32,
    pub max_outbound_bytes: usize,
    /// Small queues refuse SENDs (ERROR 4429); a small in-flight bound pauses publishers' reads.
    pub max_queued_messages: u32,
    pub max_inflight_sends: u32,
    /// Per mille of settlements that are a NACK with requeue instead of an ACK.
    pub nack_per_mille: u32,
    /// Every address is durable (its messages go through the durable log on a simulated disk).
    pub durable: bool,
    /// Times at which the whole broker crashes and restarts from its logs (durable runs only).
    pub crash_at_ms: Vec<u64>,
}

impl Options {
    pub fn draw(rng: &mut Rng) -> Options {
        Options {
            shards: rng.range(1, 3) as usize,
            publishers: rng.range(1, 4) as usize,
            consumers: rng.range(1, 4) as usize,
            addresses: rng.range(1, 3) as usize,
            multicast_consumers: [0, 0, 1, 2][rng.index(4)],
            auto_ack_consumers: [0, 0, 1][rng.index(3)],
            messages_per_publisher: rng.range(20, 120) as u32,
            window: rng.range(1, 16) as usize,
            credit: rng.range(1, 20) as u32,
            late_ack_per_mille: [0, 20, 100][rng.index(3)],
            cut_per_mille: [0, 2, 10, 30][rng.index(4)],
            abandon_per_mille: [0, 2, 10][rng.index(3)],
            max_latency_ms: [0, 2, 20][rng.index(3)],
            ack_timeout_ms: [0, 200, 1_000, 5_000][rng.index(4)],
            session_expiry_ms: [300, 2_000, 30_000][rng.index(3)],
            max_outbound_bytes: [512, 64 * 1024][rng.index(2)],
            max_queued_messages: [8, 100_000][rng.index(2)],
            max_inflight_sends: [2, 1_000][rng.index(2)],
            nack_per_mille: [0, 0, 50][rng.index(3)],
            durable: false,
            crash_at_ms: Vec::new(),
        }
        .with_durability(rng)
    }

    fn with_durability(mut self, rng: &mut Rng) -> Options {
        self.durable = rng.chance(400);
        if self.durable {
            let crashes = [0, 1, 1, 2, 3][rng.index(5)];
            // Mostly while the publishers are busy (their messages take a second or two), and
            // sometimes later, when only settlements are being logged.
            self.crash_at_ms = (0..crashes)
                .map(|_| if rng.chance(800) { rng.range(20, 2_000) } else { rng.range(2_000, FAULTS_UNTIL_MS - 1_000) })
                .collect();
            self.crash_at_ms.sort_unstable();
        }
        self
    }
}

/// What the run ended with.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    pub steps: u64,
    pub virtual_ms: u64,
    pub ledger_summary: String,
    /// The first invariant broken, if any.
    pub violation: Option<String>,
    /// Sessions whose clients saw them ended by fatal 4401 for expired credentials.
    pub credentials_expired: u64,
    /// Credential deadlines checked as they passed (the session was no longer open).
    pub credential_deadlines_kept: u64,
}

type SocketId = usize;

#[derive(Debug)]
enum Event {
    ClientWake(usize),
    /// Bytes from the client reach the broker's side of the socket.
    ToServer(SocketId),
    /// Bytes from the broker reach the client.
    ToClient(SocketId),
    /// The connection's reader task runs (`conn::read_loop`).
    Read(SocketId),
    /// The reader finished (after the closing handshake's grace, or at EOF).
    ReaderEnd(SocketId),
    /// The writer task runs (`conn::write_loop`).
    Write(SocketId),
    /// A batch write finished.
    WriteDone(SocketId),
    /// The close grace of a write stuck on an abandoned socket ran out (`conn::write_loop`).
    WriteGrace(SocketId),
    Envelope {
        to: usize,
        commands: Vec<Command>,
    },
    /// The shard's timer runs; stale unless `round` is the shard's current timer round (a
    /// wake-up while it sleeps starts a new round, as the shell's timer wakes from its sleep).
    AckTimer {
        shard: usize,
        round: u64,
    },
    Expire {
        shard: usize,
        conn: ConnId,
        attachment: Attachment,
    },
    /// A resume handed to the session's home shard arrives there.
    Adopt {
        home: usize,
        socket: SocketId,
        open: mbws::Open,
        binding: Binding,
    },
    /// A random fault may strike.
    Chaos,
    /// The shard's log commit task takes a batch and writes it.
    LogWrite(usize),
    /// The write's `fdatasync` returns.
    LogSynced(usize),
    /// The whole broker crashes (every shard, as a panic or SIGKILL does) and restarts.
    Crash,
    /// A graceful stop looks whether every SEND taken has been answered.
    StopCheck,
}

impl Event {
    /// Events of the broker's side, which a crash takes with it.
    fn is_broker_side(&self) -> bool {
        !matches!(self, Event::ClientWake(_) | Event::ToServer(_) | Event::ToClient(_) | Event::Chaos | Event::Crash)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    /// Waiting for bytes.
    Waiting,
    Scheduled,
    /// Parked until the core wakes it (a paused reader does not see EOF either).
    Paused,
    /// Closing: the reader ends at its `ReaderEnd`.
    Closing,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    NotStarted,
    Scheduled,
    Parked,
    Busy,
    Done,
}

/// One TCP connection: both directions of the network, and the broker's side of it.
struct Socket {
    client: usize,
    /// The shard serving it (the home shard after a hand-over).
    shard: usize,
    /// Bytes in flight to the broker, by arrival time.
    to_server: Vec<(u64, Bytes)>,
    to_client: Vec<(u64, Option<Bytes>)>,
    last_to_server: u64,
    last_to_client: u64,
    /// The network dropped it: no more bytes either way.
    cut: bool,
    /// The client went away (or the network cut it): the broker's read sees EOF once its
    /// inbox is empty.
    client_gone: bool,
    /// The broker shut the socket down: the client sees EOF after the bytes before it.
    server_shut: bool,
    /// The client no longer reads this socket.
    abandoned: bool,
    // The broker's side.
    subprotocol: Subprotocol,
    conn: Option<(ConnRef, Attachment)>,
    opened: bool,
    inbox: BytesMut,
    buf: BytesMut,
    decoder: Decoder,
    reader: ReaderState,
    writer: WriterState,
    /// The batch being written: its credits, and how the write went.
    writing: Option<(CreditReturns, WriteOutcome)>,
    close_taken: bool,
    write_failed: bool,
    /// The write in flight waits for room that the client, which abandoned the socket without
    /// reading it, never makes: it ends by failing (a cut) or by the close grace.
    stuck: bool,
    /// When the close grace cuts this writer's writes short (`conn::write_loop`'s deadline),
    /// once it saw the connection start closing.
    write_deadline: Option<u64>,
    /// The binding of the session when this socket's tasks started (the superseded farewell's).
    binding: Binding,
}

/// The wakes a round of work reports, collected for the world to apply.
#[derive(Default)]
struct Wakes(Vec<(ConnId, Wake)>);

impl ConnWakers for Wakes {
    fn wake(&mut self, id: ConnId, wake: Wake) {
        self.0.push((id, wake));
    }
}

pub struct World {
    pub options: Options,
    rng: Rng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// Events by the id in `queue` (a heap of plain keys keeps the order total).
    events: Vec<Option<Event>>,
    next_event: u64,
    cores: Vec<ShardCore>,
    /// Time the last envelope from shard a to shard b arrives (envelopes keep their order
    /// per pair).
    pair_last: Vec<Vec<u64>>,
    ack_timer_idle: Vec<bool>,
    /// Per shard, the round of its timer's live event (older ones are stale).
    ack_timer_round: Vec<u64>,
    sockets: Vec<Socket>,
    /// The socket attached to each connection slot (the newest attachment).
    attached: BTreeMap<(usize, u32, u32), SocketId>,
    clients: Vec<Client>,
    /// Every address the publishers send to.
    addresses: Vec<Bytes>,
    /// The client's current socket.
    client_socket: Vec<Option<SocketId>>,
    pub ledger: Ledger,
    pub steps: u64,
    /// Faults stop here; the run then settles.
    faults_until_ms: u64,
    settling: bool,
    /// Each crash is a graceful stop first ([`World::with_graceful_stops`]): input stops, the
    /// SENDs taken must all be answered within [`STOP_ANSWER_BOUND_MS`], then the broker exits
    /// (as a crash: what was synced survives).
    graceful_stops: bool,
    /// When the graceful stop under way began, and the SENDs its owners had received plus
    /// those in flight then: the most they may have received by its end (input stopped).
    stopping_since: Option<(u64, u64)>,
    config: Config,
    /// The durable logs' directory (durable runs), removed when the world is dropped.
    _data_dir: Option<DataDir>,
    /// Each shard's log (durable runs), shared with its core as in the shell.
    logs: Vec<Rc<RefCell<DurableLog>>>,
    disk: Disk,
    /// How many times the broker (re)started.
    incarnation: u32,
    /// A crash waits for the next log write, to strike while it is in flight.
    crash_at_next_write: bool,
    /// Draws for expiring credentials, a stream of their own (so that the other draws of a
    /// seed are those they were before credentials could expire).
    credentials_rng: Rng,
    /// Sessions opened with expiring credentials: (deadline, shard, slot index, generation,
    /// client), checked as virtual time passes each deadline.
    credential_deadlines: std::collections::BTreeSet<(u64, usize, u32, u32, usize)>,
}

/// Faults (cuts, abandons, crashes) stop at this virtual time; the run then settles.
const FAULTS_UNTIL_MS: u64 = 20_000;

/// A wall clock for the logs' expiry times: the virtual clock plus a fixed offset.
const UNIX_OFFSET_MS: u64 = 1_700_000_000_000;

/// A directory of its own for one run's durable logs, removed when the run ends.
struct DataDir(std::path::PathBuf);

impl DataDir {
    fn new(seed: u64) -> DataDir {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mbws-sim-{}-{seed}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory for the simulated disk");
        DataDir(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The simulated disk under the durable logs: the files are real (in the run's [`DataDir`]),
/// and this remembers how much of each is durable. A write lands in the file at once (the
/// page cache); `fdatasync` makes it durable; a crash cuts every file back to its durable
/// length, keeping none, all or a torn part of the write that was not synced yet.
#[derive(Default)]
struct Disk {
    durable_len: BTreeMap<std::path::PathBuf, u64>,
    /// Per shard: the batch written and not yet synced.
    in_flight: BTreeMap<usize, CommitBatch>,
    /// Per shard: a commit is scheduled or in flight.
    busy: BTreeMap<usize, bool>,
}

const CLOSE_GRACE_MS: u64 = 2_000;

/// A graceful stop answers the SENDs taken within this (the broker's default grace gives
/// them half of 10 s); and looks every so often.
const STOP_ANSWER_BOUND_MS: u64 = 5_000;
const STOP_CHECK_INTERVAL_MS: u64 = 5;

/// Every file under `dir` with its length.
fn files_with_lengths(dir: &std::path::Path) -> BTreeMap<std::path::PathBuf, u64> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => dirs.push(path),
                Ok(meta) => {
                    files.insert(path, meta.len());
                }
                Err(_) => {}
            }
        }
    }
    files
}

/// The key of a connection slot in [`World::attached`].
fn slot_key(shard: usize, conn: ConnId) -> (usize, u32, u32) {
    (shard, conn.index, conn.generation)
}

impl World {
    /// A run of `seed`, with expiring credentials (see [`World::with_expiring_credentials`])
    /// unless `MBWS_SIM_CREDENTIALS=0` (to compare a seed's run without them: their draws
    /// come from a stream of their own, so everything else in the run stays the same).
    pub fn new(seed: u64) -> World {
        World::build(seed, std::env::var_os("MBWS_SIM_CREDENTIALS").is_none_or(|value| value != "0"))
    }

    /// A run of `seed` in which (in 40% of the seeds) about half the clients open their
    /// sessions with credentials that expire during the run. Two seeds found broker bugs this
    /// way: seed 98 (a detached session whose credentials expired held its deliveries until
    /// its session expiry; now it ends at once) and seed 774 (a connection closed by its
    /// credentials' expiry waited forever for a peer that had vanished, holding its
    /// deliveries; now the reader ends a close grace after the close frame is written).
    pub fn with_expiring_credentials(seed: u64) -> World {
        World::build(seed, true)
    }

    fn build(seed: u64, expiring_credentials: bool) -> World {
        let mut rng = Rng::new(seed);
        let options = Options::draw(&mut rng);
        let data_dir = options.durable.then(|| DataDir::new(seed));
        let config = Config {
            shards: options.shards,
            ack_timeout_ms: options.ack_timeout_ms,
            session_expiry_ms: options.session_expiry_ms,
            max_outbound_bytes: options.max_outbound_bytes,
            max_queued_messages: options.max_queued_messages,
            max_inflight_sends: options.max_inflight_sends,
            durable_addresses: if options.durable { vec!["queue-*".to_string()] } else { Vec::new() },
            data_dir: data_dir.as_ref().map_or_else(Default::default, |dir| dir.0.clone()),
            // Small segments, so that rolling over and deleting settled ones happens too.
            log_segment_bytes: 64 * 1024,
            ..Default::default()
        };
        let queues: Vec<Bytes> = (0..options.addresses).map(|index| Bytes::from(format!("queue-{index}"))).collect();
        let mut addresses = queues.clone();
        if options.multicast_consumers > 0 {
            addresses.push(Bytes::from_static(b"topic-0"));
        }
        if options.auto_ack_consumers > 0 {
            addresses.push(Bytes::from_static(b"auto-0"));
        }
        let mut clients = Vec::new();
        for _ in 0..options.publishers {
            let id = clients.len();
            clients.push(Client::publisher(
                id,
                options.messages_per_publisher,
                options.window,
                addresses.clone(),
                &mut rng,
            ));
        }
        let mut subscriptions: Vec<(Bytes, DeliveryMode, AckMode)> = (0..options.consumers.max(options.addresses))
            .map(|index| (queues[index % queues.len()].clone(), DeliveryMode::Anycast, AckMode::Client))
            .collect();
        for _ in 0..options.multicast_consumers {
            let ack_mode = if rng.chance(500) { AckMode::Auto } else { AckMode::Client };
            subscriptions.push((Bytes::from_static(b"topic-0"), DeliveryMode::Multicast, ack_mode));
        }
        for _ in 0..options.auto_ack_consumers {
            subscriptions.push((Bytes::from_static(b"auto-0"), DeliveryMode::Anycast, AckMode::Auto));
        }
        for subscription in subscriptions {
            let id = clients.len();
            let mut consumer = Client::consumer(id, subscription, options.credit, options.late_ack_per_mille, &mut rng);
            consumer.nack_per_mille = options.nack_per_mille;
            consumer.ack_timeout_ms = options.ack_timeout_ms;
            clients.push(consumer);
        }
        // Some runs give some clients credentials that expire (a JWT's `exp`) a few seconds
        // after each session opens: the broker must end such a session with fatal 4401 at the
        // deadline, and the others must not notice.
        let mut credentials_rng = Rng::new(seed ^ 0x6372_6564_656e_7469);
        if expiring_credentials && credentials_rng.chance(400) {
            for client in &mut clients {
                if credentials_rng.chance(500) {
                    client.credential_lifetime_ms = Some(credentials_rng.range(200, 8_000));
                }
            }
        }
        let client_count = clients.len();
        let mut world = World {
            credentials_rng,
            credential_deadlines: std::collections::BTreeSet::new(),
            pair_last: vec![vec![0; options.shards]; options.shards],
            ack_timer_idle: vec![true; options.shards],
            ack_timer_round: vec![0; options.shards],
            disk: Disk::default(),
            logs: Vec::new(),
            config,
            _data_dir: data_dir,
            incarnation: 0,
            crash_at_next_write: false,
            options,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            next_event: 0,
            cores: Vec::new(),
            sockets: Vec::new(),
            attached: BTreeMap::new(),
            clients,
            addresses: addresses.clone(),
            client_socket: vec![None; client_count],
            ledger: Ledger::default(),
            steps: 0,
            faults_until_ms: 0,
            settling: false,
            graceful_stops: false,
            stopping_since: None,
        };
        let trace = std::env::var_os("MBWS_SIM_TRACE").is_some();
        world.ledger.trace = trace;
        for client in &mut world.clients {
            client.trace = trace;
        }
        for client in 0..client_count {
            let at = world.rng.range(0, 50);
            world.schedule(at, Event::ClientWake(client));
        }
        world.faults_until_ms = FAULTS_UNTIL_MS;
        world.boot();
        world.schedule(1, Event::Chaos);
        for at in world.options.crash_at_ms.clone() {
            world.schedule(at, Event::Crash);
        }
        world
    }

    /// Like [`World::new`], but every crash is preceded by a graceful stop (what SIGTERM does:
    /// `ShardCore::stop_input`, then the SENDs taken are answered before the exit). The
    /// seed's options and draws are those of `new` until the first stop.
    pub fn with_graceful_stops(seed: u64) -> World {
        let mut world = World::new(seed);
        world.graceful_stops = true;
        world
    }

    /// Whether this run's options crash the broker (durable runs with crash times).
    pub fn crashes(&self) -> bool {
        !self.options.crash_at_ms.is_empty()
    }

    fn schedule(&mut self, at: u64, event: Event) {
        let at = at.max(self.now);
        let id = self.events.len();
        self.events.push(Some(event));
        self.queue.push(Reverse((at, self.next_event, id)));
        self.next_event += 1;
    }

    /// Runs until every client is done and everything settled, an invariant breaks, or the
    /// step or time bound is reached.
    pub fn run(mut self, max_steps: u64) -> Report {
        let time_limit = 600_000;
        while let Some(Reverse((at, _, id))) = self.queue.pop() {
            self.now = at;
            // A crash takes the broker's pending events with it.
            let Some(event) = self.events[id].take() else { continue };
            self.steps += 1;
            if self.ledger.trace && !matches!(event, Event::Chaos | Event::Envelope { .. }) {
                eprintln!("{at:>7} {event:?}");
            }
            self.handle(event);
            self.check_credential_deadlines();
            if !self.ledger.violations.is_empty() || self.steps >= max_steps || self.now > time_limit {
                break;
            }
            if self.now >= self.faults_until_ms && !self.settling {
                self.start_settling();
            }
            if self.settling && self.steps % 64 == 0 && self.is_settled() {
                break;
            }
        }
        if self.ledger.violations.is_empty() {
            self.check_end();
        }
        let violation = self.ledger.violations.first().cloned();
        let ledger = &self.ledger;
        Report {
            ledger_summary: format!(
                "{} receipted, {} refused, {} delivered ({} redelivered), {} supersede races, {} crashes",
                ledger.receipted,
                ledger.refused,
                ledger.delivered,
                ledger.redelivered,
                ledger.supersede_races,
                ledger.crashes
            ) + &format!(
                ", {} sessions ended at their credentials' expiry",
                ledger.credentials_expired
            ),
            credentials_expired: ledger.credentials_expired,
            credential_deadlines_kept: ledger.credential_deadlines_kept,
            options: self.options,
            steps: self.steps,
            virtual_ms: self.now,
            violation,
        }
    }

    fn start_settling(&mut self) {
        self.settling = true;
        for client in &mut self.clients {
            client.settling = true;
        }
        for client in 0..self.clients.len() {
            let at = self.now + 1;
            self.schedule(at, Event::ClientWake(client));
        }
    }

    /// Every publisher is done, every consumer connected, and no address holds a message.
    fn is_settled(&self) -> bool {
        self.clients.iter().all(|client| client.is_done() && client.is_connected())
            && self.held_per_shard().iter().all(|&held| held == (0, 0))
    }

    /// Messages queued and deliveries unacknowledged per shard, over the addresses that have
    /// anycast consumers (a multicast-only address keeps what was sent before its first
    /// subscriber came, for an anycast consumer that never comes: PROTOCOL.md 7.3).
    fn held_per_shard(&self) -> Vec<(usize, usize)> {
        self.cores
            .iter()
            .map(|core| {
                self.addresses.iter().filter(|address| !address.starts_with(b"topic-")).fold((0, 0), |held, address| {
                    let stats = core.addresses().stats(address);
                    (held.0 + stats.queued, held.1 + stats.unacked)
                })
            })
            .collect()
    }

    fn check_end(&mut self) {
        if !self.is_settled() {
            let stuck: Vec<usize> = self
                .clients
                .iter()
                .filter(|client| !client.is_done() || !client.is_connected())
                .map(|c| c.id)
                .collect();
            let held = self.held_per_shard();
            self.ledger.violation(format!(
                "did not settle by {} ms: clients not done or not connected {stuck:?}; (queued, unacked) per \
                 shard {held:?}",
                self.now
            ));
            return;
        }
        self.ledger.check_nothing_lost();
        // No writer is parked with bytes to write (a forgotten wake-up leaves them there).
        for (&(shard, index, generation), &socket) in &self.attached {
            let conn = ConnId { index, generation };
            let Some(state) = self.cores[shard].conn(conn) else { continue };
            let socket = &self.sockets[socket];
            let parked = socket.writer == WriterState::Parked;
            if matches!(state.lifecycle().state(), LifecycleState::Running { .. })
                && parked
                && !state.outbound.is_empty()
            {
                self.ledger.violation(format!(
                    "shard {shard} conn {conn:?}: {} bytes queued but never written (writer {:?})",
                    state.outbound.queued_bytes(),
                    socket.writer
                ));
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ClientWake(client) => {
                let mut out = Vec::new();
                self.clients[client].wake(self.now, &mut self.rng, &mut out);
                self.client_out(client, out);
            }
            Event::ToServer(socket) => self.arrive_at_server(socket),
            Event::ToClient(socket) => self.arrive_at_client(socket),
            Event::Read(socket) => self.read(socket),
            Event::ReaderEnd(socket) => self.reader_end(socket),
            Event::Write(socket) => self.write(socket),
            Event::WriteDone(socket) => self.write_done(socket),
            Event::WriteGrace(socket) => self.write_grace(socket),
            Event::Envelope { to, commands } => {
                self.cores[to].accept_envelope(commands);
                self.run_work(to);
            }
            Event::AckTimer { shard, round } if round == self.ack_timer_round[shard] => self.ack_timer(shard),
            Event::AckTimer { .. } => {}
            Event::Expire { shard, conn, attachment } => self.expire(shard, conn, attachment),
            Event::Adopt { home, socket, open, binding } => {
                self.sockets[socket].shard = home;
                self.resume(socket, open, binding);
            }
            Event::Chaos => self.chaos(),
            Event::LogWrite(shard) => self.log_write(shard),
            Event::LogSynced(shard) => self.log_synced(shard),
            Event::Crash if self.graceful_stops => self.begin_graceful_stop(),
            Event::StopCheck => self.stop_check(),
            Event::Crash => {
                // Half the crashes strike while a log write is in flight (between the write and
                // its fdatasync returning), the moment that tests what was promised durable.
                if !self.disk.in_flight.is_empty() || self.rng.chance(500) {
                    self.crash();
                } else {
                    self.crash_at_next_write = true;
                }
            }
        }
    }

    /// Starts the broker: fresh shard cores and, in durable runs, each shard's log opened and
    /// recovered from the disk (what `shard::start` and `data_dir::open_logs` do).
    fn boot(&mut self) {
        let shards = self.options.shards;
        self.cores = (0..shards).map(|index| ShardCore::new(ShardId(index as u16), shards, &self.config)).collect();
        self.logs.clear();
        if !self.options.durable {
            return;
        }
        let durable_addresses: Vec<Bytes> =
            self.config.durable_addresses.iter().map(|name| Bytes::from(name.clone())).collect();
        for shard in 0..shards {
            let (log, recovery) = crate::store::open(self.config.log_config(), ShardId(shard as u16))
                .unwrap_or_else(|error| panic!("shard {shard}: the log does not recover: {error}"));
            let log = Rc::new(RefCell::new(log));
            let now = self.now;
            self.cores[shard].attach_durable_log(
                log.clone(),
                durable_addresses.clone(),
                recovery,
                0,
                now,
                now + UNIX_OFFSET_MS,
            );
            self.logs.push(log);
        }
        // What recovery wrote (a repaired tail, a new directory) is on the disk now.
        self.disk.durable_len = files_with_lengths(&self.config.data_dir);
        for shard in 0..shards {
            self.run_work(shard);
        }
    }

    /// `GroupCommitter::commit_until_stopped`, first half: take a batch, create its segment
    /// (header synced with the directory), write the records.
    fn log_write(&mut self, shard: usize) {
        let batch = self.logs[shard].borrow_mut().take_batch();
        let Some(batch) = batch else {
            self.disk.busy.insert(shard, false);
            return;
        };
        let path = batch.path().to_path_buf();
        let file = match batch.new_segment_header() {
            Some(header) => {
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).open(&path).expect("a new segment");
                file.write_all(header).expect("a segment header");
                self.disk.durable_len.insert(path.clone(), header.len() as u64);
                file
            }
            None => std::fs::OpenOptions::new().write(true).open(&path).expect("the current segment"),
        };
        file.write_all_at(batch.bytes(), batch.file_offset()).expect("a log write");
        self.disk.in_flight.insert(shard, batch);
        let delay = self.rng.range(0, 8);
        self.schedule(self.now + delay, Event::LogSynced(shard));
        if std::mem::take(&mut self.crash_at_next_write) {
            let at = self.now + self.rng.range(0, delay);
            self.schedule(at, Event::Crash);
        }
    }

    /// The second half: the sync returned; the batch is durable, settled segments go, and the
    /// core answers what waited for it.
    fn log_synced(&mut self, shard: usize) {
        let batch = self.disk.in_flight.remove(&shard).expect("a batch in flight");
        let end = batch.file_offset() + batch.bytes().len() as u64;
        self.disk.durable_len.insert(batch.path().to_path_buf(), end);
        let outcome = self.logs[shard].borrow_mut().batch_committed(batch);
        for path in &outcome.delete_segments {
            let _ = std::fs::remove_file(path);
            self.disk.durable_len.remove(path);
        }
        self.cores[shard].durable_committed(outcome.durable_lsn, self.now);
        self.run_work(shard);
        if self.logs[shard].borrow().has_pending() {
            let delay = self.rng.range(0, 3);
            self.schedule(self.now + delay, Event::LogWrite(shard));
        } else {
            self.disk.busy.insert(shard, false);
        }
    }

    /// A graceful stop begins (SIGTERM): every shard stops taking input; the SENDs it had
    /// taken must be answered (receipted or refused) before the exit.
    fn begin_graceful_stop(&mut self) {
        if self.settling || self.stopping_since.is_some() {
            return;
        }
        let received = self.sends_received();
        let inflight: usize = self
            .cores
            .iter()
            .map(|core| {
                // Detached sessions' SENDs too: their owners still answer them.
                let ids = core.conn_ids();
                ids.iter()
                    .filter_map(|id| core.conn(*id))
                    .map(|state| state.session.inflight_send_count())
                    .sum::<usize>()
            })
            .sum();
        self.stopping_since = Some((self.now, received + inflight as u64));
        for shard in 0..self.cores.len() {
            self.cores[shard].stop_input();
            self.run_work(shard);
        }
        self.schedule(self.now + STOP_CHECK_INTERVAL_MS, Event::StopCheck);
    }

    /// Every SEND taken is answered: the broker exits (and restarts, as after a crash, which
    /// keeps only what was synced). Not within the bound: a violation.
    fn stop_check(&mut self) {
        let Some((since, most_received)) = self.stopping_since else { return };
        let received = self.sends_received();
        if received > most_received {
            self.ledger.violation(format!(
                "{} SENDs were taken after the graceful stop at {since} ms stopped input",
                received - most_received
            ));
            return;
        }
        let inflight: usize = self.cores.iter().map(ShardCore::inflight_send_count).sum();
        if inflight == 0 {
            self.stopping_since = None;
            self.crash();
        } else if self.now - since > STOP_ANSWER_BOUND_MS {
            self.ledger.violation(format!(
                "{inflight} SENDs taken before the graceful stop at {since} ms are still unanswered {} ms later",
                self.now - since
            ));
        } else {
            self.schedule(self.now + STOP_CHECK_INTERVAL_MS, Event::StopCheck);
        }
    }

    /// SENDs received by their addresses' owners, over every shard, since the last boot.
    fn sends_received(&self) -> u64 {
        self.cores.iter().map(|core| core.report().messages_received).sum()
    }

    /// The whole broker dies and restarts: every connection drops, every session and
    /// in-memory message is gone, each log file keeps what was synced and maybe some (or a
    /// torn part) of the write in flight; the logs are recovered.
    fn crash(&mut self) {
        if self.settling {
            return;
        }
        self.incarnation += 1;
        self.ledger.crashes += 1;
        for event in self.events.iter_mut() {
            if event.as_ref().is_some_and(Event::is_broker_side) {
                *event = None;
            }
        }
        for socket in 0..self.sockets.len() {
            self.cut(socket);
            let s = &mut self.sockets[socket];
            s.reader = ReaderState::Done;
            s.writer = WriterState::Done;
            s.conn = None;
            s.server_shut = true;
        }
        self.attached.clear();
        // The sessions are gone with the process; slots of the new cores are other sessions.
        self.credential_deadlines.clear();
        self.cores.clear();
        // Closes the files and releases the logs' locks, as the process's death does.
        self.logs.clear();
        for (_, batch) in std::mem::take(&mut self.disk.in_flight) {
            let path = batch.path().to_path_buf();
            let durable = self.disk.durable_len.get(&path).copied().unwrap_or(0);
            let written = batch.file_offset() + batch.bytes().len() as u64;
            let survives = match self.rng.index(3) {
                0 => durable,
                1 => written,
                _ => self.rng.range(durable, written),
            };
            let file = std::fs::OpenOptions::new().write(true).open(&path).expect("a segment");
            file.set_len(survives).expect("cutting a segment back");
        }
        for (path, len) in &self.disk.durable_len {
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
                if file.metadata().is_ok_and(|meta| meta.len() > *len) && !path.ends_with("LOCK") {
                    // Written but never synced (no batch in flight cut it already): lost.
                    let _ = file.set_len(*len);
                }
            }
        }
        self.disk.busy.clear();
        self.ack_timer_idle = vec![true; self.options.shards];
        self.pair_last = vec![vec![self.now; self.options.shards]; self.options.shards];
        self.boot();
    }

    // The network.

    fn latency(&mut self) -> u64 {
        let max = self.options.max_latency_ms;
        self.rng.range(0, max)
    }

    /// The client of `socket` writes `bytes` (dropped if the network cut it).
    fn client_writes(&mut self, socket: SocketId, bytes: Bytes) {
        let latency = self.latency();
        let s = &mut self.sockets[socket];
        if s.cut || s.abandoned {
            return;
        }
        let at = (self.now + latency).max(s.last_to_server);
        s.last_to_server = at;
        // Sometimes split, so the broker sees partial frames.
        if bytes.len() > 1 && self.rng.chance(100) {
            let split = 1 + self.rng.index(bytes.len() - 1);
            s.to_server.push((at, bytes.slice(..split)));
            s.to_server.push((at, bytes.slice(split..)));
        } else {
            s.to_server.push((at, bytes));
        }
        self.schedule(at, Event::ToServer(socket));
    }

    fn server_writes(&mut self, socket: SocketId, bytes: Option<Bytes>) {
        let latency = self.latency();
        let s = &mut self.sockets[socket];
        if s.cut {
            return;
        }
        let at = (self.now + latency).max(s.last_to_client);
        s.last_to_client = at;
        s.to_client.push((at, bytes));
        self.schedule(at, Event::ToClient(socket));
    }

    fn arrive_at_server(&mut self, socket: SocketId) {
        let now = self.now;
        let s = &mut self.sockets[socket];
        let arrived = s.to_server.iter().take_while(|(at, _)| *at <= now).count();
        for (_, bytes) in s.to_server.drain(..arrived) {
            s.inbox.extend_from_slice(&bytes);
        }
        self.reader_has_input(socket);
    }

    /// Input (bytes or EOF) for a reader waiting for it.
    fn reader_has_input(&mut self, socket: SocketId) {
        if self.sockets[socket].reader == ReaderState::Waiting {
            self.sockets[socket].reader = ReaderState::Scheduled;
            self.schedule(self.now, Event::Read(socket));
        }
    }

    fn arrive_at_client(&mut self, socket: SocketId) {
        let now = self.now;
        let s = &mut self.sockets[socket];
        let arrived = s.to_client.iter().take_while(|(at, _)| *at <= now).count();
        let chunks: Vec<Option<Bytes>> = s.to_client.drain(..arrived).map(|(_, bytes)| bytes).collect();
        let client = s.client;
        if s.abandoned || self.client_socket[client] != Some(socket) {
            return;
        }
        for chunk in chunks {
            if self.client_socket[client] != Some(socket) {
                return;
            }
            let mut out = Vec::new();
            match chunk {
                Some(bytes) => {
                    self.clients[client].bytes(self.now, &bytes, &mut self.rng, &mut self.ledger, &mut out);
                }
                None => {
                    // EOF: the broker shut the socket down.
                    self.client_socket[client] = None;
                    self.clients[client].lost(self.now, &mut self.rng, &mut out);
                }
            }
            self.client_out(client, out);
        }
    }

    fn client_out(&mut self, client: usize, out: Vec<Out>) {
        for out in out {
            match out {
                Out::Write(bytes) => {
                    if let Some(socket) = self.client_socket[client] {
                        self.client_writes(socket, bytes);
                    }
                }
                Out::Connect => self.connect(client),
                Out::WakeAt(at) => self.schedule(at, Event::ClientWake(client)),
                Out::Abandon => self.abandon(client),
            }
        }
    }

    /// A client connects to a random shard (SO_REUSEPORT) and upgrades (the upgrade itself is
    /// the handshake parser's, tested elsewhere): the broker waits for the first message.
    fn connect(&mut self, client: usize) {
        if self.client_socket[client].is_some() {
            return;
        }
        let shard = self.rng.index(self.options.shards);
        let socket = self.sockets.len();
        self.sockets.push(Socket {
            client,
            shard,
            to_server: Vec::new(),
            to_client: Vec::new(),
            last_to_server: self.now,
            last_to_client: self.now,
            cut: false,
            client_gone: false,
            server_shut: false,
            abandoned: false,
            subprotocol: Subprotocol::Reliable,
            conn: None,
            opened: false,
            inbox: BytesMut::new(),
            buf: BytesMut::new(),
            decoder: Decoder::new(Role::Server, 1 << 20, 1 << 24),
            reader: ReaderState::Waiting,
            writer: WriterState::NotStarted,
            writing: None,
            close_taken: false,
            write_failed: false,
            stuck: false,
            write_deadline: None,
            binding: Binding::Binary,
        });
        self.client_socket[client] = Some(socket);
        let mut out = Vec::new();
        self.clients[client].connected(&mut out);
        self.client_out(client, out);
    }

    /// The client drops its connection without a word (the broker may not notice).
    fn abandon(&mut self, client: usize) {
        if let Some(socket) = self.client_socket[client].take() {
            self.sockets[socket].abandoned = true;
        }
    }

    /// The network cuts `socket`: nothing more goes through; the broker's reader sees EOF
    /// (once it reads), its writes fail; the client notices a little later.
    fn cut(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.cut {
            return;
        }
        s.cut = true;
        s.client_gone = true;
        s.to_server.clear();
        s.to_client.clear();
        if s.stuck {
            // The socket fails under the write.
            s.stuck = false;
            if let Some((_, outcome)) = s.writing.as_mut() {
                *outcome = WriteOutcome::Failed;
            }
            self.schedule(self.now, Event::WriteDone(socket));
        }
        let s = &mut self.sockets[socket];
        let client = s.client;
        self.reader_has_input(socket);
        if self.client_socket[client] == Some(socket) {
            self.client_socket[client] = None;
            let mut out = Vec::new();
            self.clients[client].lost(self.now, &mut self.rng, &mut out);
            self.client_out(client, out);
        }
    }

    fn chaos(&mut self) {
        if self.settling {
            return;
        }
        let live: Vec<SocketId> = (0..self.sockets.len())
            .filter(|&socket| !self.sockets[socket].cut && !self.sockets[socket].abandoned)
            .collect();
        if !live.is_empty() {
            if self.rng.chance(self.options.cut_per_mille * 10) {
                let socket = live[self.rng.index(live.len())];
                self.cut(socket);
            } else if self.rng.chance(self.options.abandon_per_mille * 10) {
                let socket = live[self.rng.index(live.len())];
                let client = self.sockets[socket].client;
                if self.client_socket[client] == Some(socket) {
                    self.abandon(client);
                    let mut out = Vec::new();
                    self.clients[client].lost(self.now, &mut self.rng, &mut out);
                    self.client_out(client, out);
                }
            }
        }
        let next = self.now + self.rng.range(1, 20);
        self.schedule(next, Event::Chaos);
    }

    // The shell's duties.

    /// A round of work on `shard`, and what it asks for: envelopes to other shards (in order
    /// per pair), the ack timer, the wakes.
    fn run_work(&mut self, shard: usize) {
        let mut wakes = Wakes::default();
        let effects = self.cores[shard].run_work(self.now, &mut wakes);
        let wake_ack_timer = effects.wake_ack_timer;
        let log_has_pending = effects.log_has_pending;
        let posts: Vec<(ShardId, Vec<Command>)> = effects.posts.collect();
        for (to, commands) in posts {
            let to = usize::from(to.0);
            let delay = self.rng.range(0, 2);
            let at = (self.now + delay).max(self.pair_last[shard][to]);
            self.pair_last[shard][to] = at;
            self.schedule(at, Event::Envelope { to, commands });
        }
        if log_has_pending && !self.disk.busy.get(&shard).copied().unwrap_or(false) {
            // `GroupCommitter::notify`: the commit task wakes (after its batch window).
            self.disk.busy.insert(shard, true);
            let delay = self.rng.range(0, 3);
            self.schedule(self.now + delay, Event::LogWrite(shard));
        }
        if wake_ack_timer {
            // Idle, or asleep until a later deadline: the shell's timer wakes either way
            // (`ack_deadline_added`) and looks again at once.
            self.ack_timer_idle[shard] = false;
            self.ack_timer_round[shard] += 1;
            let round = self.ack_timer_round[shard];
            self.schedule(self.now, Event::AckTimer { shard, round });
        }
        for (conn, wake) in wakes.0 {
            self.wake(shard, conn, wake);
        }
    }

    /// Wakes the tasks of the socket attached to `conn` that `wake` names.
    fn wake(&mut self, shard: usize, conn: ConnId, wake: Wake) {
        if let Some(&socket) = self.attached.get(&slot_key(shard, conn)) {
            self.wake_socket(socket, wake);
        }
    }

    fn wake_socket(&mut self, socket: SocketId, wake: Wake) {
        let s = &mut self.sockets[socket];
        if wake.writer && s.writer == WriterState::Parked {
            s.writer = WriterState::Scheduled;
            self.schedule(self.now, Event::Write(socket));
        }
        let s = &mut self.sockets[socket];
        if wake.reader && s.reader == ReaderState::Paused {
            s.reader = ReaderState::Scheduled;
            self.schedule(self.now, Event::Read(socket));
        }
        // `conn::until_closing`: a write in flight when closing begins gets the close grace.
        let s = &mut self.sockets[socket];
        if wake.closing && s.writer == WriterState::Busy && s.write_deadline.is_none() {
            let at = self.now + CLOSE_GRACE_MS;
            s.write_deadline = Some(at);
            if s.stuck {
                self.schedule(at, Event::WriteGrace(socket));
            }
        }
    }

    /// `shard::Shard::ack_timer_loop`.
    fn ack_timer(&mut self, shard: usize) {
        match self.cores[shard].poll_deadline() {
            None => self.ack_timer_idle[shard] = true,
            Some(deadline) if deadline > self.now => {
                let round = self.ack_timer_round[shard];
                self.schedule(deadline, Event::AckTimer { shard, round });
            }
            Some(_) => {
                self.cores[shard].on_deadline(self.now);
                self.run_work(shard);
                let round = self.ack_timer_round[shard];
                self.schedule(self.now, Event::AckTimer { shard, round });
            }
        }
    }

    /// `conn::read_loop` (and `first_message` before the session exists).
    fn read(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.reader != ReaderState::Scheduled {
            return;
        }
        let inbox = std::mem::take(&mut s.inbox);
        s.buf.extend_from_slice(&inbox);
        let Some((me, attachment)) = s.conn else {
            return self.read_first_message(socket);
        };
        let shard = usize::from(me.shard.0);
        let may_continue = self.cores[shard].conn(me.conn).is_none_or(|state| state.reader_may_continue());
        if !may_continue {
            self.sockets[socket].reader = ReaderState::Paused;
            return;
        }
        let s = &mut self.sockets[socket];
        let step = self.cores[shard].bytes_read(me.conn, attachment, &mut s.decoder, &mut s.buf, self.now);
        if step == ReadStep::Closing {
            self.wake_socket(socket, Wake::ALL);
        }
        self.run_work(shard);
        let s = &mut self.sockets[socket];
        match step {
            ReadStep::Closing => {
                s.reader = ReaderState::Closing;
                // The peer's close or EOF, within the close grace.
                let current =
                    self.cores[shard].conn(me.conn).is_some_and(|state| state.lifecycle().is_current(attachment));
                let wait = if current && !s.client_gone { self.rng.range(0, 50).min(CLOSE_GRACE_MS) } else { 0 };
                self.schedule(self.now + wait, Event::ReaderEnd(socket));
            }
            ReadStep::Paused => {
                // `continue`: wait until the core lets it go on.
                s.reader = ReaderState::Scheduled;
                self.schedule(self.now, Event::Read(socket));
            }
            ReadStep::NeedMore => {
                if !s.inbox.is_empty() {
                    s.reader = ReaderState::Scheduled;
                    self.schedule(self.now, Event::Read(socket));
                } else if s.client_gone {
                    // EOF.
                    s.reader = ReaderState::Closing;
                    self.schedule(self.now, Event::ReaderEnd(socket));
                } else {
                    s.reader = ReaderState::Waiting;
                }
            }
        }
    }

    /// Before a session: decode the first data message; it opens a session, or resumes one
    /// (here, or on its home shard after a hand-over).
    fn read_first_message(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        let event = match s.decoder.next_event(&mut s.buf) {
            Ok(event) => event,
            Err(error) => {
                self.ledger.violation(format!("socket {socket}: the client's first frame is broken: {error:?}"));
                return;
            }
        };
        let (binding, payload) = match event {
            Some(WsEvent::Binary(payload)) => (Binding::Binary, payload),
            Some(WsEvent::Text(payload)) => (Binding::Text, payload),
            Some(other) => {
                self.ledger.violation(format!("socket {socket}: a first message {other:?}"));
                return;
            }
            None => {
                if s.client_gone {
                    s.reader = ReaderState::Done;
                } else {
                    s.reader = ReaderState::Waiting;
                }
                return;
            }
        };
        let shard = s.shard;
        let codec_limits = self.cores[shard].session_config().codec_limits;
        if let Ok(Frame::Open(open)) = mbws::decode(binding, payload.clone(), &codec_limits) {
            if let Some((home, _, _)) = crate::conn::session::parse_session_id(&open.session_id) {
                let home = usize::from(home.0);
                if home == shard {
                    self.resume(socket, open, binding);
                } else if home < self.options.shards {
                    // Handed over through the post office: a new decoder there, the buffered
                    // bytes go along.
                    let delay = self.rng.range(0, 2);
                    self.sockets[socket].decoder = Decoder::new(Role::Server, 1 << 20, 1 << 24);
                    self.schedule(self.now + delay, Event::Adopt { home, socket, open, binding });
                } else {
                    self.ledger.violation(format!("socket {socket}: a session id of no shard"));
                }
                return;
            }
        }
        let s = &mut self.sockets[socket];
        let token = self.rng.next_u64();
        let client = s.client;
        let subprotocol = s.subprotocol;
        let access = self.credentials_for(client);
        let expires_at_ms = match &access {
            crate::auth::Access::Granted(_, expires_at_ms) => *expires_at_ms,
            crate::auth::Access::Refused(..) => None,
        };
        let (me, attachment) =
            self.cores[shard].open_session(subprotocol, socket as i32, binding, payload, token, self.now, access);
        if self.client_socket[client] == Some(socket) {
            // (An OPEN from a connection the client gave up is a session it never learns of.)
            self.clients[client].credentials_expire_at_ms = expires_at_ms;
        }
        if let Some(at_ms) = expires_at_ms {
            self.credential_deadlines.insert((at_ms, shard, me.conn.index, me.conn.generation, client));
        }
        self.start(socket, me, attachment);
    }

    /// What a new session of `client` may do: everything, until its credentials expire if it
    /// is a client with expiring credentials (not for sessions opened once the faults stopped,
    /// so that the run settles).
    fn credentials_for(&mut self, client: usize) -> crate::auth::Access {
        let lifetime_ms = self.clients[client].credential_lifetime_ms.filter(|_| !self.settling);
        let Some(lifetime_ms) = lifetime_ms else { return crate::auth::Access::unrestricted() };
        let lifetime_ms = self.credentials_rng.range(lifetime_ms / 2, lifetime_ms);
        let everything = std::sync::Arc::new(crate::auth::Permissions::everything());
        crate::auth::Access::Granted(everything, Some(self.now + lifetime_ms))
    }

    /// Checked after every event: a session whose credentials expired before now is no longer
    /// open (the shard's timer ended it at the deadline: fatal 4401 if it was attached, no
    /// resume if it was detached). Events at the deadline's own millisecond may run before the
    /// timer's, so a deadline is checked once time has moved past it.
    fn check_credential_deadlines(&mut self) {
        while let Some(&(at_ms, shard, index, generation, client)) = self.credential_deadlines.first() {
            if at_ms >= self.now {
                return;
            }
            self.credential_deadlines.pop_first();
            let conn = ConnId { index, generation };
            let still_open = self.cores[shard].conn(conn).is_some_and(|state| state.session.is_open());
            if still_open {
                self.ledger.violation(format!(
                    "client {client}: its session (shard {shard} conn {conn:?}) is still open at {} ms, after its \
                     credentials expired at {at_ms} ms",
                    self.now
                ));
            } else {
                self.ledger.credential_deadlines_kept += 1;
            }
        }
    }

    /// `conn::resume`: the core checks and re-attaches, or the socket gets a refusal.
    fn resume(&mut self, socket: SocketId, open: mbws::Open, binding: Binding) {
        let shard = self.sockets[socket].shard;
        match self.cores[shard].resume_session(&open, binding, socket as i32) {
            Ok(resumed) => {
                let old = self.attached.get(&slot_key(shard, resumed.me.conn)).copied();
                self.start(socket, resumed.me, resumed.attachment);
                if let Some(old) = old {
                    // Wake::ALL reaches the old tasks (they notice they are superseded).
                    self.wake_socket(old, Wake::ALL);
                }
                if let Some(stale) = resumed.stale_socket {
                    // `conn::supersede`: its reading side ends now.
                    let stale = stale as usize;
                    self.sockets[stale].client_gone = true;
                    self.reader_has_input(stale);
                }
                self.run_work(shard);
            }
            Err(refusal) => {
                let (code, reason) = refusal.error(&open);
                let mut out = Outbound::new();
                out.push_frame(binding, &Frame::Error(ErrorFrame::fatal(code, 0, 0, &reason)));
                out.push_control(OpCode::Close, &close_payload(code.as_u16(), &reason));
                let bytes = out.take_batch(WriteBatch::default()).map(|batch| Bytes::from(batch.to_vec()));
                self.server_writes(socket, bytes);
                self.server_writes(socket, None);
                let s = &mut self.sockets[socket];
                s.server_shut = true;
                s.reader = ReaderState::Done;
            }
        }
    }

    /// The session runs on `socket`: its writer starts, its reader goes on.
    fn start(&mut self, socket: SocketId, me: ConnRef, attachment: Attachment) {
        let shard = usize::from(me.shard.0);
        self.attached.insert(slot_key(shard, me.conn), socket);
        let binding = self.cores[shard].conn(me.conn).map_or(Binding::Binary, |state| state.session.binding());
        let s = &mut self.sockets[socket];
        s.binding = binding;
        s.conn = Some((me, attachment));
        s.opened = true;
        s.writer = WriterState::Scheduled;
        s.reader = ReaderState::Scheduled;
        self.cores[shard].set_writer_running(me.conn, true);
        self.schedule(self.now, Event::Write(socket));
        self.schedule(self.now, Event::Read(socket));
    }

    /// `conn::run` after the read loop: detach or end the session.
    fn reader_end(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.reader == ReaderState::Done {
            return;
        }
        s.reader = ReaderState::Done;
        let Some((me, attachment)) = s.conn else { return };
        let shard = usize::from(me.shard.0);
        let finished = self.cores[shard].reader_finished(me.conn, attachment, self.now);
        self.wake_socket(socket, Wake::ALL);
        if let Some(ReaderFinished::Detached { expires_at_ms }) = finished {
            self.schedule(expires_at_ms, Event::Expire { shard, conn: me.conn, attachment });
        }
        self.run_work(shard);
    }

    /// `conn::expire_later`.
    fn expire(&mut self, shard: usize, conn: ConnId, attachment: Attachment) {
        match self.cores[shard].expire_session(conn, attachment, self.now) {
            Some(Expiry::NotBefore(at)) => self.schedule(at, Event::Expire { shard, conn, attachment }),
            Some(Expiry::Expired) => self.run_work(shard),
            Some(Expiry::Resumed) | None => {}
        }
    }

    /// `conn::write_loop`: take a batch and write it, or park.
    fn write(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.writer != WriterState::Scheduled {
            return;
        }
        let (me, attachment) = s.conn.expect("a writer runs for a session");
        let shard = usize::from(me.shard.0);
        let (next, stopping) = match self.cores[shard].conn_mut(me.conn) {
            Some(state) => (state.take_write_batch(attachment, WriteBatch::default()), state.lifecycle().is_stopping()),
            None => (NextWrite::Superseded, true),
        };
        match next {
            NextWrite::Wait => s.writer = WriterState::Parked,
            NextWrite::Done => self.end_writer(socket, false),
            NextWrite::Superseded => self.end_writer(socket, true),
            NextWrite::Batch { mut batch, closing } => {
                s.close_taken |= closing;
                if (closing || stopping) && s.write_deadline.is_none() {
                    s.write_deadline = Some(self.now + CLOSE_GRACE_MS);
                }
                let credits = std::mem::take(&mut batch.credits);
                let outcome = if s.cut || s.server_shut { WriteOutcome::Failed } else { WriteOutcome::Written };
                s.writing = Some((credits, outcome));
                s.writer = WriterState::Busy;
                // A client that abandoned its socket reads nothing: its buffers are full, and a
                // write to it waits (for a cut, or for the close grace once closing began).
                if outcome == WriteOutcome::Written && s.abandoned {
                    s.stuck = true;
                    if let Some(at) = s.write_deadline {
                        self.schedule(at.max(self.now), Event::WriteGrace(socket));
                    }
                    return;
                }
                if outcome == WriteOutcome::Written {
                    self.server_writes(socket, Some(Bytes::from(batch.to_vec())));
                }
                let delay = self.rng.range(0, 2);
                self.schedule(self.now + delay, Event::WriteDone(socket));
            }
        }
    }

    /// The close grace of a stuck write ran out: the batch is dropped (`WriteOutcome::CutShort`).
    fn write_grace(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.writer != WriterState::Busy || !s.stuck {
            return;
        }
        s.stuck = false;
        if let Some((_, outcome)) = s.writing.as_mut() {
            *outcome = WriteOutcome::CutShort;
        }
        self.write_done(socket);
    }

    fn write_done(&mut self, socket: SocketId) {
        let s = &mut self.sockets[socket];
        if s.writer != WriterState::Busy {
            return; // The broker crashed meanwhile.
        }
        let (me, attachment) = s.conn.expect("a writer runs for a session");
        let (credits, outcome) = s.writing.take().expect("a write in progress");
        let shard = usize::from(me.shard.0);
        let next = self.cores[shard].write_completed(me.conn, attachment, outcome, credits);
        let wake = match next {
            Some(Written::Continue { wake_reader }) => Wake { reader: wake_reader, ..Wake::default() },
            Some(Written::Failed) => Wake::ALL,
            _ => Wake::default(),
        };
        self.wake_socket(socket, wake);
        if self.cores[shard].has_work() {
            self.run_work(shard);
        }
        match next.unwrap_or(Written::Superseded) {
            Written::Continue { .. } => {
                self.sockets[socket].writer = WriterState::Scheduled;
                self.schedule(self.now, Event::Write(socket));
            }
            Written::Failed => {
                self.sockets[socket].write_failed = true;
                self.end_writer(socket, false);
            }
            Written::CutShort => self.end_writer_cut_short(socket),
            Written::Superseded => self.end_writer(socket, true),
        }
    }

    /// The writer of `socket` is done: the slot, if still this attachment's, no longer has a
    /// running writer. Returns whether the attachment is still the slot's current one.
    fn stop_writer(&mut self, socket: SocketId) -> bool {
        let s = &mut self.sockets[socket];
        s.writer = WriterState::Done;
        let (me, attachment) = s.conn.expect("a writer runs for a session");
        let shard = usize::from(me.shard.0);
        let current = self.cores[shard].conn(me.conn).is_some_and(|state| state.lifecycle().is_current(attachment));
        if current {
            self.cores[shard].set_writer_running(me.conn, false);
        }
        current
    }

    /// `conn::write_loop` when the close grace ran out: nothing more is written, and a reader
    /// still waiting on the silent peer ends now (`conn::end_reading_now`).
    fn end_writer_cut_short(&mut self, socket: SocketId) {
        let current = self.stop_writer(socket);
        self.sockets[socket].server_shut = true;
        self.server_writes(socket, None);
        let s = &mut self.sockets[socket];
        if current && matches!(s.reader, ReaderState::Waiting | ReaderState::Paused) {
            s.client_gone = true;
            self.schedule(self.now, Event::ReaderEnd(socket));
        }
    }

    /// The writer ends: frees the slot of an ended connection; a superseded one says why.
    fn end_writer(&mut self, socket: SocketId, superseded: bool) {
        let current = self.stop_writer(socket);
        let s = &self.sockets[socket];
        if superseded && !s.close_taken && !s.write_failed {
            let bytes = superseded_farewell(s.binding).map(|batch| Bytes::from(batch.to_vec()));
            self.server_writes(socket, bytes);
        }
        self.sockets[socket].server_shut = true;
        self.server_writes(socket, None);
        // `conn::end_reading_after_grace`: a reader still waiting for a silent peer is ended.
        let s = &self.sockets[socket];
        if s.close_taken && current && matches!(s.reader, ReaderState::Waiting | ReaderState::Paused) {
            self.schedule(self.now + CLOSE_GRACE_MS, Event::ReaderEnd(socket));
        }
    }
}
