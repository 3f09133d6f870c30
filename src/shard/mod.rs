//! The per-core runtime: one thread per shard, each pinned to a core and running its own
//! monoio event loop on io_uring.
//!
//! A shard owns, and only it touches: the connections it accepted (SO_REUSEPORT spreads them),
//! the addresses hashed to it ([`owner_of`](crate::broker::owner_of)), and its outboxes.
//! Work moves as [`Command`]s: a command for this shard goes on the local work queue (no
//! channel), a command for another shard into that shard's outbox, and outboxes are posted as
//! one batch per destination at the end of each round of work ([`Shard::run_work`]).
//!
//! Threads share nothing but the read-only [`Config`] and the [`PostOffice`] (channels and
//! eventfds): no locks on the message path.

pub mod mailbox;
mod net;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::broker::address::{AddressLimits, AddressTable, Publication, MAX_PUBLISH_BATCH};
use crate::broker::{AddressCommand, Command, ConnId, ConnRef, ShardId};
use crate::config::Config;
use crate::conn::session::{Effects, SessionConfig};
use crate::conn::{Connection, ConnectionCell};
use crate::log;
use crate::logging::Level;
use crate::store::{DurableLog, GroupCommitter, Recovery};
use mailbox::{Envelope, PostOffice};
pub use net::bind_reuseport;

/// Milliseconds on a monotonic clock shared by all shards (message expiry is compared across
/// shards, so they must agree on the epoch).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Wall-clock milliseconds since the Unix epoch (for what outlives the process: the log).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

/// A one-shot, single-threaded event a task can wait for.
#[derive(Default)]
pub struct LocalEvent {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalEvent {
    pub fn fire(&self) {
        self.fired.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    pub fn has_fired(&self) -> bool {
        self.fired.get()
    }

    /// Makes the event waitable again.
    pub fn reset(&self) {
        self.fired.set(false);
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.fired.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

struct Slot {
    generation: u32,
    connection: Option<ConnectionCell>,
    /// Listed in `Shard::dirty` (so listed at most once per round of work).
    dirty: bool,
}

/// One shard's state; lives on its thread behind an `Rc`.
pub struct Shard {
    pub id: ShardId,
    pub config: Arc<Config>,
    pub session_config: Arc<SessionConfig>,
    post_office: Arc<PostOffice>,
    addresses: RefCell<AddressTable>,
    slots: RefCell<Vec<Slot>>,
    free_slots: RefCell<Vec<u32>>,
    work: RefCell<VecDeque<Command>>,
    outboxes: RefCell<Vec<Vec<Command>>>,
    /// Connections whose session or write queue changed during this round of work.
    dirty: RefCell<Vec<ConnId>>,
    /// The other half of `dirty`'s double buffer (empty between rounds).
    dirty_spare: std::cell::Cell<Vec<ConnId>>,
    pub shutdown: LocalEvent,
    /// The durable log's commit task (set once at start-up).
    committer: RefCell<Option<Rc<GroupCommitter>>>,
    /// Wakes the ack timer when deliveries with an ack deadline may exist again.
    ack_deadline_added: LocalEvent,
    ack_deadlines_armed: Cell<bool>,
}

impl Shard {
    fn new(id: ShardId, config: Arc<Config>, post_office: Arc<PostOffice>) -> Shard {
        let shard_count = post_office.shard_count();
        let session_config = Arc::new(SessionConfig {
            limits: config.limits(),
            codec_limits: config.codec_limits(),
            max_heartbeat_ms: config.max_heartbeat_ms,
            session_expiry_ms: config.session_expiry_ms,
            shard_count,
            default_credit: 1000,
        });
        let address_limits = AddressLimits {
            max_queued_messages: config.max_queued_messages,
            max_credit: config.max_credit,
            max_deliveries: config.max_deliveries,
            ack_timeout_ms: config.ack_timeout_ms,
            shard_count,
            max_queued_bytes: config.max_queued_bytes,
            memory_budget_bytes: config.memory_budget_bytes / shard_count.max(1),
        };
        Shard {
            id,
            config,
            session_config,
            post_office,
            addresses: RefCell::new(AddressTable::new(id, address_limits)),
            slots: RefCell::new(Vec::new()),
            free_slots: RefCell::new(Vec::new()),
            work: RefCell::new(VecDeque::new()),
            outboxes: RefCell::new((0..shard_count).map(|_| Vec::new()).collect()),
            dirty: RefCell::new(Vec::new()),
            dirty_spare: std::cell::Cell::new(Vec::new()),
            shutdown: LocalEvent::default(),
            committer: RefCell::new(None),
            ack_deadline_added: LocalEvent::default(),
            ack_deadlines_armed: Cell::new(false),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.post_office.shard_count()
    }

    /// Registers a new connection; `make` builds it once its id is known.
    pub fn register(&self, make: impl FnOnce(ConnRef) -> Connection) -> (ConnRef, ConnectionCell) {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free_slots.borrow_mut().pop() {
            Some(index) => index,
            None => {
                slots.push(Slot { generation: 0, connection: None, dirty: false });
                (slots.len() - 1) as u32
            }
        };
        let slot = &mut slots[index as usize];
        let me = ConnRef { shard: self.id, conn: ConnId { index, generation: slot.generation } };
        let cell: ConnectionCell = Rc::new(RefCell::new(make(me)));
        slot.connection = Some(cell.clone());
        (me, cell)
    }

    /// Removes a connection; commands still addressed to it are dropped on arrival.
    pub fn unregister(&self, id: ConnId) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[id.index as usize];
        if slot.generation == id.generation && slot.connection.take().is_some() {
            slot.generation = slot.generation.wrapping_add(1);
            // A listing in `dirty` under the old generation is skipped; the next user starts clean.
            slot.dirty = false;
            self.free_slots.borrow_mut().push(id.index);
        }
    }

    pub fn connection(&self, id: ConnId) -> Option<ConnectionCell> {
        let slots = self.slots.borrow();
        let slot = slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.connection.clone()
    }

    pub fn connection_count(&self) -> usize {
        self.slots.borrow().iter().filter(|slot| slot.connection.is_some()).count()
    }

    /// Queues commands for address owners (this shard or others).
    pub fn submit_address_commands(&self, commands: &mut Vec<(ShardId, AddressCommand)>) {
        for (shard, command) in commands.drain(..) {
            self.submit(shard, Command::Address(command));
        }
    }

    fn submit(&self, shard: ShardId, command: Command) {
        if shard == self.id {
            self.work.borrow_mut().push_back(command);
        } else {
            self.outboxes.borrow_mut()[shard.0 as usize].push(command);
        }
    }

    /// Passes a connection to the shard `home` (see `conn::Adoption`).
    pub fn hand_over(&self, home: ShardId, adoption: Box<crate::conn::Adoption>) {
        self.post_office.post(home, Envelope::Adopt(adoption));
    }

    /// Lists a connection for `flush` at the end of this round of work (once, however many
    /// commands it got).
    pub fn mark_dirty(&self, id: ConnId) {
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.get_mut(id.index as usize) {
            if slot.generation == id.generation && !slot.dirty {
                slot.dirty = true;
                self.dirty.borrow_mut().push(id);
            }
        }
    }

    /// Runs the local work queue dry, lets touched connections flush (cumulative receipts,
    /// writer wake-ups), then posts every outbox as one batch per destination shard.
    ///
    /// Consecutive publishes to one address (what one read of a publisher's socket yields) are
    /// handed to the address table together ([`AddressTable::publish_batch`]), so a multicast
    /// subscriber gets them in one command; nothing is reordered, since only commands that
    /// are next to each other in the queue are joined.
    pub fn run_work(&self) {
        // One reading of the clock per round: a round lasts far less than a millisecond.
        let now = now_ms();
        let mut scratch = Vec::new();
        let mut address_commands = Vec::new();
        let mut publications = Vec::new();
        loop {
            let next = self.work.borrow_mut().pop_front();
            let Some(command) = next else { break };
            match command {
                Command::Address(AddressCommand::Publish { publisher, seq, message }) => {
                    publications.push(Publication { publisher, seq, message });
                    self.take_publishes_to_same_address(&mut publications);
                    let forwards = {
                        let mut addresses = self.addresses.borrow_mut();
                        addresses.publish_batch(&mut publications, now, &mut scratch);
                        (addresses.take_forwards(), addresses.take_deadline_added())
                    };
                    self.route_address_output(&mut scratch, forwards);
                }
                Command::Address(command) => {
                    let forwards = {
                        let mut addresses = self.addresses.borrow_mut();
                        addresses.handle(command, now, &mut scratch);
                        (addresses.take_forwards(), addresses.take_deadline_added())
                    };
                    self.route_address_output(&mut scratch, forwards);
                }
                Command::Conn(command) => {
                    let id = command.conn();
                    let Some(cell) = self.connection(id) else { continue };
                    {
                        let mut connection = cell.borrow_mut();
                        let Connection { session, outbound, .. } = &mut *connection;
                        let mut fx = Effects { outbound, commands: &mut address_commands };
                        session.on_command(command, &mut fx);
                    }
                    self.mark_dirty(id);
                    self.submit_address_commands(&mut address_commands);
                }
            }
        }
        self.flush_dirty();
        self.flush_outboxes();
        if let Some(committer) = self.committer.borrow().as_ref() {
            if committer.log().borrow().has_pending() {
                committer.notify();
            }
        }
    }

    /// Moves the publishes at the front of the work queue that go to the same address as
    /// `publications[0]` into `publications`, up to `MAX_PUBLISH_BATCH` in all.
    fn take_publishes_to_same_address(&self, publications: &mut Vec<Publication>) {
        let mut work = self.work.borrow_mut();
        while publications.len() < MAX_PUBLISH_BATCH {
            let same_address = matches!(
                work.front(),
                Some(Command::Address(AddressCommand::Publish { message, .. }))
                    if message.address == publications[0].message.address
            );
            if !same_address {
                break;
            }
            let Some(Command::Address(AddressCommand::Publish { publisher, seq, message })) = work.pop_front() else {
                unreachable!("the front was just checked to be a publish");
            };
            publications.push(Publication { publisher, seq, message });
        }
    }

    /// Attaches the shard's durable log: recovered messages go back to their queues, and a
    /// group-commit task answers durable publishes as their records become durable.
    fn start_durable_log(self: &Rc<Self>, log: DurableLog, recovery: Recovery) {
        for line in &recovery.report {
            log!(Level::Warn, "shard {}: log recovery: {line}", self.id.0);
        }
        if !recovery.messages.is_empty() {
            log!(Level::Info, "shard {}: recovered {} unsettled durable messages", self.id.0, recovery.messages.len());
        }
        let log = Rc::new(RefCell::new(log));
        let durable_addresses =
            self.config.durable_addresses.iter().map(|name| bytes::Bytes::from(name.clone())).collect();
        {
            let mut addresses = self.addresses.borrow_mut();
            addresses.set_durable_log(log.clone(), durable_addresses);
            addresses.restore(recovery, now_ms(), now_unix_ms());
        }
        let committer = Rc::new(GroupCommitter::new(log));
        *self.committer.borrow_mut() = Some(committer.clone());
        let shard = self.clone();
        monoio::spawn(async move {
            let on_committed = |lsn| {
                let mut answers = Vec::new();
                let forwards = {
                    let mut addresses = shard.addresses.borrow_mut();
                    addresses.durable_committed(lsn, now_ms(), &mut answers);
                    (addresses.take_forwards(), addresses.take_deadline_added())
                };
                shard.route_address_output(&mut answers, forwards);
                shard.run_work();
            };
            if let Err(error) = committer.run(on_committed).await {
                log!(
                    Level::Error,
                    "shard {}: the durable log failed: {error}; durable publishes are refused until a restart",
                    shard.id.0
                );
                let mut answers = Vec::new();
                shard.addresses.borrow_mut().durable_failed(&error.to_string(), &mut answers);
                shard.route_address_output(&mut answers, (Vec::new(), false));
                shard.run_work();
            }
        });
    }

    fn route_address_output(
        &self,
        answers: &mut Vec<(ShardId, crate::broker::ConnCommand)>,
        (forwards, deadline_added): (Vec<(ShardId, AddressCommand)>, bool),
    ) {
        for (shard, command) in answers.drain(..) {
            self.submit(shard, Command::Conn(command));
        }
        for (shard, command) in forwards {
            self.submit(shard, Command::Address(command));
        }
        if deadline_added && !self.ack_deadlines_armed.get() {
            self.ack_deadlines_armed.set(true);
            self.ack_deadline_added.fire();
        }
    }

    /// Redelivers client-ack deliveries whose ack timeout passed. Sleeps until the earliest
    /// deadline (deadlines only grow, so no later delivery can need an earlier wake-up), or,
    /// with none pending, until the next round of address work arms it again.
    async fn ack_timer_loop(self: Rc<Self>) {
        loop {
            let next = self.addresses.borrow().next_ack_deadline();
            match next {
                None => {
                    self.ack_deadlines_armed.set(false);
                    self.ack_deadline_added.wait().await;
                    self.ack_deadline_added.reset();
                }
                Some(deadline) => {
                    let now = now_ms();
                    if deadline > now {
                        monoio::time::sleep(Duration::from_millis(deadline - now)).await;
                    }
                    let mut answers = Vec::new();
                    let forwards = {
                        let mut addresses = self.addresses.borrow_mut();
                        addresses.expire_acks(now_ms(), &mut answers);
                        (addresses.take_forwards(), addresses.take_deadline_added())
                    };
                    self.route_address_output(&mut answers, forwards);
                    self.run_work();
                }
            }
        }
    }

    fn flush_dirty(&self) {
        // Swapped with a spare list (not taken) so that neither list loses its capacity.
        let mut dirty = self.dirty_spare.take();
        std::mem::swap(&mut dirty, &mut *self.dirty.borrow_mut());
        for &id in &dirty {
            let cell = {
                let mut slots = self.slots.borrow_mut();
                match slots.get_mut(id.index as usize) {
                    Some(slot) if slot.generation == id.generation => {
                        slot.dirty = false;
                        slot.connection.clone()
                    }
                    _ => None,
                }
            };
            if let Some(cell) = cell {
                cell.borrow_mut().flush();
            }
        }
        dirty.clear();
        self.dirty_spare.replace(dirty);
    }

    fn flush_outboxes(&self) {
        let mut outboxes = self.outboxes.borrow_mut();
        for (index, outbox) in outboxes.iter_mut().enumerate() {
            if !outbox.is_empty() {
                let batch = std::mem::take(outbox);
                self.post_office.post(ShardId(index as u16), Envelope::Commands(batch));
            }
        }
    }

    /// Drains the inbox whenever other shards post to it; sleeps on the eventfd otherwise.
    async fn inbox_loop(self: Rc<Self>, inbox: Receiver<Envelope>) {
        let wake = self.post_office.wake(self.id).clone();
        // SAFETY (of from_raw_fd below): we duplicate the eventfd so that the monoio File owns
        // its own descriptor and closing it cannot close the one senders write to.
        let duplicate = unsafe { libc::dup(wake.eventfd()) };
        assert!(duplicate >= 0, "dup(eventfd) failed: {}", io::Error::last_os_error());
        // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
        let std_file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(duplicate) };
        let eventfd = monoio::fs::File::from_std(std_file).expect("eventfd registers with the runtime");
        let mut counter = vec![0u8; 8];
        loop {
            let mut received = false;
            while let Ok(envelope) = inbox.try_recv() {
                received = true;
                match envelope {
                    Envelope::Commands(commands) => self.work.borrow_mut().extend(commands),
                    Envelope::Adopt(adoption) => {
                        monoio::spawn(crate::conn::adopt(self.clone(), *adoption));
                    }
                    Envelope::Shutdown => self.shutdown.fire(),
                }
            }
            if received {
                self.run_work();
                continue;
            }
            wake.prepare_to_sleep();
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if !inbox.is_empty() {
                wake.awake();
                continue;
            }
            let (result, buffer) = eventfd.read_at(counter, 0).await;
            counter = buffer;
            wake.awake();
            if let Err(error) = result {
                log!(Level::Error, "shard {}: reading the wake-up eventfd failed: {error}", self.id.0);
                return;
            }
        }
    }

    /// Closes every connection with 1001 (going away).
    fn close_all_connections(&self) {
        let cells: Vec<ConnectionCell> =
            self.slots.borrow().iter().filter_map(|slot| slot.connection.clone()).collect();
        for cell in cells {
            cell.borrow_mut().begin_close(crate::ws::close_code::GOING_AWAY, "broker shutting down");
        }
    }
}

/// What `start` returns: the shard threads and how to stop them.
pub struct Running {
    pub local_addr: SocketAddr,
    pub io_driver: &'static str,
    threads: Vec<std::thread::JoinHandle<()>>,
    post_office: Arc<PostOffice>,
}

impl Running {
    /// Asks every shard to close its connections (1001) and exit, then waits for them.
    pub fn shutdown(self) {
        for index in 0..self.post_office.shard_count() {
            self.post_office.post(ShardId(index as u16), Envelope::Shutdown);
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Binds the listeners and starts `config.shards` shard threads.
pub fn start(config: Config) -> io::Result<Running> {
    if !monoio::utils::detect_uring() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring is not available (kernel older than 5.6, or disabled by \
             /proc/sys/kernel/io_uring_disabled or a seccomp policy); mbws-broker needs io_uring",
        ));
    }
    let config = Arc::new(config);
    // Every shard's log is opened and recovered before anything listens, so a broken or
    // unwritable data directory stops the start with a clear message.
    check_shard_count(&config)?;
    let mut logs = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let opened = crate::store::open(config.log_config(), ShardId(index as u16))
            .map_err(|error| io::Error::other(error.to_string()))?;
        logs.push(opened);
    }
    let listeners = net::bind_all(config.listen, config.shards)?;
    let local_addr = listeners[0].local_addr()?;
    let (post_office, receivers) = PostOffice::new(config.shards)?;
    let cores = net::allowed_cpus();
    let mut threads = Vec::with_capacity(config.shards);
    for (index, ((listener, inbox), (log, recovery))) in listeners.into_iter().zip(receivers).zip(logs).enumerate() {
        let config = config.clone();
        let post_office = post_office.clone();
        let core = if config.pin_threads && !cores.is_empty() { Some(cores[index % cores.len()]) } else { None };
        let thread = std::thread::Builder::new().name(format!("mbws-shard-{index}")).spawn(move || {
            run_shard(ShardId(index as u16), config, post_office, listener, inbox, core, log, recovery)
        })?;
        threads.push(thread);
    }
    Ok(Running { local_addr, io_driver: "io_uring", threads, post_office })
}

/// Addresses are owned by `hash % shards`, so a log written with one shard count cannot be
/// read with another (its messages would sit on shards that no longer own their addresses).
/// The count is recorded in `<data_dir>/SHARDS` the first time and checked on every start.
fn check_shard_count(config: &Config) -> io::Result<()> {
    let path = config.data_dir.join("SHARDS");
    match std::fs::read_to_string(&path) {
        Ok(recorded) => match recorded.trim().parse::<usize>() {
            Ok(count) if count == config.shards => Ok(()),
            Ok(count) => Err(io::Error::other(format!(
                "the data directory {} was written by a broker with --shards {count}; start with --shards {count}, \
                 or give this broker another --data-dir (a durable address must stay on the shard that logged it)",
                config.data_dir.display()
            ))),
            Err(_) => Err(io::Error::other(format!(
                "{} does not hold a shard count; restore it or remove it if the data directory is new",
                path.display()
            ))),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(&config.data_dir)
            .and_then(|()| std::fs::write(&path, format!("{}\n", config.shards)))
            .map_err(|error| {
                io::Error::other(format!(
                    "cannot use {} as the data directory: {error}; point --data-dir at a directory this user \
                         can create and write to",
                    config.data_dir.display()
                ))
            }),
        Err(error) => Err(io::Error::other(format!("cannot read {}: {error}", path.display()))),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_shard(
    id: ShardId,
    config: Arc<Config>,
    post_office: Arc<PostOffice>,
    listener: std::net::TcpListener,
    inbox: Receiver<Envelope>,
    core: Option<usize>,
    log: DurableLog,
    recovery: Recovery,
) {
    if let Some(core) = core {
        if let Err(error) = net::pin_to_cpu(core) {
            log!(Level::Warn, "shard {}: could not pin to CPU {core}: {error}; running unpinned", id.0);
        }
    }
    let mut runtime =
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).enable_timer().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                log!(Level::Error, "shard {}: cannot start an io_uring event loop: {error}", id.0);
                std::process::exit(1);
            }
        };
    runtime.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                log!(Level::Error, "shard {}: cannot use the listener: {error}", id.0);
                std::process::exit(1);
            }
        };
        let shard = Rc::new(Shard::new(id, config, post_office));
        shard.start_durable_log(log, recovery);
        monoio::spawn(shard.clone().inbox_loop(inbox));
        if shard.config.ack_timeout_ms > 0 {
            monoio::spawn(shard.clone().ack_timer_loop());
        }
        let accepting = monoio::spawn(accept_loop(shard.clone(), listener));
        shard.shutdown.wait().await;
        drop(accepting);
        shard.close_all_connections();
        // Give writers a moment to deliver the close frames.
        let deadline = Instant::now() + Duration::from_millis(500);
        while shard.connection_count() > 0 && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        log!(Level::Debug, "shard {}: stopped", id.0);
    });
}

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener) {
    let mut consecutive_errors = 0u32;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                consecutive_errors = 0;
                if shard.shutdown.has_fired() {
                    return;
                }
                monoio::spawn(crate::conn::serve(shard.clone(), stream, peer));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the listener stays open.
                consecutive_errors += 1;
                log!(Level::Warn, "shard {}: accept failed: {error}", shard.id.0);
                let backoff = Duration::from_millis(10 * u64::from(consecutive_errors.min(100)));
                monoio::time::sleep(backoff).await;
            }
        }
    }
}
