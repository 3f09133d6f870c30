//! The per-core runtime: one thread per shard, each pinned to a core and running its own
//! monoio event loop on io_uring.
//!
//! A shard owns, and only it touches: the connections it accepted (SO_REUSEPORT spreads them),
//! the addresses hashed to it ([`owner_of`](crate::broker::owner_of)), and its outboxes.
//! Work moves as [`Command`](crate::broker::Command)s: a command for this shard goes on the local work queue (no
//! channel), a command for another shard into that shard's outbox, and outboxes are posted as
//! one batch per destination at the end of each round of work ([`Shard::run_work`]).
//!
//! What the shard decides lives in its sans-IO [`ShardCore`] (`core.rs`): the address table,
//! the work queue, the outboxes, the connections to flush, the ack timer's state. [`Shard`] is
//! the IO shell around it: it reads the clock, runs the monoio tasks (inbox, ack timer,
//! accept, the durable log's commit task), keeps the connection slots, and turns the core's
//! [`Effects`](core::Effects) into posts and wake-ups.
//!
//! Threads share nothing but the read-only [`Config`] and the [`PostOffice`] (channels and
//! eventfds): no locks on the message path.

pub mod admission;
pub mod assets;
pub mod connection;
pub mod core;
mod data_dir;
pub mod mailbox;
mod net;
pub mod rounds;
pub mod tls_inplace;
pub mod transport;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::Receiver;

use self::core::{ConnWakers, ReaderFinished, ResumeRefusal, Resumed, ShardCore};
use crate::broker::{ConnId, ConnRef, ShardId};
use crate::clock::{ms_at, now_ms, now_unix_ms};
use crate::config::Config;
use crate::conn::lifecycle::Attachment;
use crate::conn::outbound::CreditReturns;
use crate::conn::session::{random_token, SessionConfig};
use crate::conn::state::{ConnState, Expiry, ReadStep, Wake, WriteOutcome, Written};
use crate::log;
use crate::logging::Level;
use crate::mbws::{Binding, Open, Subprotocol};
use crate::store::{DurableLog, GroupCommitter, Recovery};
use crate::tls::TlsContext;
use crate::ws::message::Decoder;
use mailbox::{Envelope, PostOffice};
pub use net::bind_reuseport;

/// A one-shot, single-threaded event that any number of tasks can wait for.
///
/// Each waiting task holds one entry of `waiters` while it is pending, and gives it back when
/// it completes or is dropped, so the list is bounded by the tasks waiting at once (the
/// connections in their opening phase, for the shutdown event).
#[derive(Default)]
pub struct LocalEvent {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free_waiters: RefCell<Vec<usize>>,
}

impl LocalEvent {
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<Waker> = self.waiters.borrow_mut().iter_mut().filter_map(Option::take).collect();
        for waker in wakers {
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

    /// Completes once the event has fired (at once if it already has).
    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, entry: None }
    }
}

/// The future of [`LocalEvent::wait`].
pub struct EventWait<'a> {
    event: &'a LocalEvent,
    /// This task's entry in `event.waiters`, while it is registered.
    entry: Option<usize>,
}

impl Future for EventWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.event.has_fired() {
            self.release();
            return Poll::Ready(());
        }
        let mut waiters = self.event.waiters.borrow_mut();
        let entry = match self.entry {
            Some(entry) => entry,
            None => match self.event.free_waiters.borrow_mut().pop() {
                Some(entry) => entry,
                None => {
                    waiters.push(None);
                    waiters.len() - 1
                }
            },
        };
        waiters[entry] = Some(cx.waker().clone());
        drop(waiters);
        self.entry = Some(entry);
        Poll::Pending
    }
}

impl EventWait<'_> {
    fn release(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.event.waiters.borrow_mut()[entry] = None;
            self.event.free_waiters.borrow_mut().push(entry);
        }
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The wakers of one connection's two tasks.
#[derive(Default)]
pub struct TaskWakers {
    pub writer: Option<Waker>,
    pub reader: Option<Waker>,
    /// The writer's, for its whole life (not taken by a wake): a wake that says the connection
    /// is closing ([`Wake::closing`]) reaches a writer in the middle of a write through it.
    pub closing: Option<Waker>,
}

/// The wakers of the shard's connection tasks, indexed like the core's connection slots.
#[derive(Default)]
struct Wakers {
    tasks: Vec<TaskWakers>,
    /// A parked writer was woken since [`Wakers::take_woke_writer`] last looked (or since the
    /// round began: [`Shard::run_work`] clears it).
    woke_writer: bool,
}

impl Wakers {
    /// Whether a parked writer was woken since the last call (and forgets it).
    fn take_woke_writer(&mut self) -> bool {
        std::mem::take(&mut self.woke_writer)
    }
}

impl ConnWakers for Wakers {
    fn wake(&mut self, id: ConnId, wake: Wake) {
        let Some(wakers) = self.tasks.get_mut(id.index as usize) else { return };
        if wake.writer {
            if let Some(waker) = wakers.writer.take() {
                waker.wake();
                self.woke_writer = true;
            }
        }
        if wake.reader {
            if let Some(waker) = wakers.reader.take() {
                waker.wake();
            }
        }
        if wake.closing {
            if let Some(waker) = &wakers.closing {
                waker.wake_by_ref();
            }
        }
    }
}

/// Readers waiting for the writers their round woke to submit first (the read loop's
/// `writes_first`, in `connection`).
///
/// The runtime submits queued operations in the order its tasks pushed them, and a task that
/// wakes itself is run again first (monoio puts it at the front of its queue): a reader can
/// only get behind the writers its round woke by being woken from one of them. Each woken
/// writer, when it runs, releases every reader waiting here (waking it puts it at the back,
/// after the writers woken so far). A reader waits here only when its round woke a parked
/// writer, which has not run yet then, so every wait ends at that writer's next poll. At most
/// one entry per reader task of the shard (a reader waits once per round): bounded by the
/// shard's connections (`max_connections`).
#[derive(Default)]
pub struct DeferredReaders(RefCell<Vec<Waker>>);

impl DeferredReaders {
    /// The reader whose `waker` this is waits for the next writer to run.
    pub fn defer(&self, waker: &Waker) {
        self.0.borrow_mut().push(waker.clone());
    }

    /// A writer runs: the readers waiting for it may go on, after it.
    #[inline]
    pub fn release(&self) {
        let mut readers = self.0.borrow_mut();
        if !readers.is_empty() {
            readers.drain(..).for_each(Waker::wake);
        }
    }
}

/// One shard's IO shell (see the module doc); lives on its thread behind an `Rc`.
pub struct Shard {
    pub id: ShardId,
    pub config: Arc<Config>,
    pub session_config: Arc<SessionConfig>,
    post_office: Arc<PostOffice>,
    /// Everything the shard decides; borrowed once per event, never across an `.await`.
    core: RefCell<ShardCore>,
    /// The wakers of the connections' tasks (the connections themselves are the core's).
    wakers: RefCell<Wakers>,
    pub shutdown: LocalEvent,
    /// Fired by the first step of a stop ([`Envelope::StopInput`]) or by the shutdown itself:
    /// the listener stops.
    stop_accepting: LocalEvent,
    /// When the closes must be done and when the shard must exit (set by the shutdown).
    shutdown_deadlines: Cell<Option<(Instant, Instant)>>,
    /// Upgrades refused, by HTTP status (a handful of statuses: a short list).
    upgrades_refused: RefCell<Vec<(u16, u64)>>,
    /// Connections in their opening phase (upgrade, or upgraded and waiting for OPEN): not in
    /// `slots` yet, but shutdown waits for their close frames too.
    opening_connections: Cell<usize>,
    /// The durable log's commit task (set once at start-up) and its handle, awaited at shutdown.
    committer: RefCell<Option<Rc<GroupCommitter>>>,
    committing: RefCell<Option<monoio::task::JoinHandle<()>>>,
    /// Wakes the ack timer when the core reports deliveries with an ack deadline again.
    ack_deadline_added: LocalEvent,
    /// Envelopes of commands posted to other shards (for the admin API's metrics).
    envelopes_posted: Cell<u64>,
    /// Readers letting the writes their round queued be submitted before their reads.
    pub deferred_readers: DeferredReaders,
    /// When the round of input being handled started (`bytes_read`), until `run_work` ends it.
    round_started: Cell<Option<Instant>>,
    /// How long the rounds of input took ([`rounds`]; for the admin API's metrics).
    rounds: Cell<rounds::RoundHistogram>,
    /// The broker-wide counts of connections and sessions against their limits.
    pub admission: Arc<admission::Admission>,
    /// In a cluster: this shard's forwarders to the other nodes, and the SENDs its core decided
    /// to forward in the last round (`crate::cluster::forward`).
    forwarders: Option<RefCell<(crate::cluster::forward::Forwarders, Vec<crate::cluster::view::Forward>)>>,
}

impl Shard {
    fn new(
        id: ShardId,
        config: Arc<Config>,
        post_office: Arc<PostOffice>,
        admission: Arc<admission::Admission>,
    ) -> Shard {
        let shard_count = post_office.shard_count();
        let core = ShardCore::new(id, shard_count, &config);
        let forwarders = config.cluster.is_some().then(|| {
            let login = Arc::new(crate::cluster::PeerLogin::from_config(&config));
            RefCell::new((crate::cluster::forward::Forwarders::new(id, post_office.clone(), login), Vec::new()))
        });
        Shard {
            id,
            config,
            session_config: core.session_config().clone(),
            post_office,
            core: RefCell::new(core),
            wakers: RefCell::new(Wakers::default()),
            shutdown: LocalEvent::default(),
            stop_accepting: LocalEvent::default(),
            shutdown_deadlines: Cell::new(None),
            upgrades_refused: RefCell::new(Vec::new()),
            opening_connections: Cell::new(0),
            committer: RefCell::new(None),
            committing: RefCell::new(None),
            ack_deadline_added: LocalEvent::default(),
            envelopes_posted: Cell::new(0),
            deferred_readers: DeferredReaders::default(),
            round_started: Cell::new(None),
            rounds: Cell::new(rounds::RoundHistogram::default()),
            admission,
            forwarders,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.post_office.shard_count()
    }

    /// The broker drains (lame duck): new upgrades are refused with 503.
    pub fn is_draining(&self) -> bool {
        self.post_office.is_draining()
    }

    /// Counts an upgrade refused with HTTP `status` (`mbws_upgrades_refused_total`).
    pub fn count_refused_upgrade(&self, status: u16) {
        let mut refused = self.upgrades_refused.borrow_mut();
        match refused.iter_mut().find(|(known, _)| *known == status) {
            Some((_, count)) => *count += 1,
            None => refused.push((status, 1)),
        }
    }

    /// A new connection's first message: registers its session ([`ShardCore::open_session`],
    /// with a random token, the time now and what its credentials allow).
    pub fn open_session(
        &self,
        subprotocol: Subprotocol,
        socket: RawFd,
        binding: Binding,
        payload: Bytes,
        access: crate::auth::Access,
    ) -> (ConnRef, Attachment) {
        let token = random_token();
        let opened =
            self.core.borrow_mut().open_session(subprotocol, socket, binding, payload, token, now_ms(), access);
        let mut wakers = self.wakers.borrow_mut();
        let index = opened.0.conn.index as usize;
        if index >= wakers.tasks.len() {
            wakers.tasks.resize_with(index + 1, TaskWakers::default);
        }
        opened
    }

    /// Resumes a session of this shard ([`ShardCore::resume_session`]); the tasks of its older
    /// connection are woken to notice they are superseded.
    pub fn resume_session(&self, open: &Open, binding: Binding, socket: RawFd) -> Result<Resumed, ResumeRefusal> {
        let resumed = self.core.borrow_mut().resume_session(open, binding, socket)?;
        self.wake(resumed.me.conn, Wake::ALL);
        Ok(resumed)
    }

    /// Bytes were read on connection `id` ([`ShardCore::bytes_read`]); the caller runs the round
    /// ([`Shard::run_work`], which times it from here: [`rounds`]).
    pub fn bytes_read(
        &self,
        id: ConnId,
        attachment: Attachment,
        decoder: &mut Decoder,
        buf: &mut BytesMut,
    ) -> ReadStep {
        let started = Instant::now();
        self.round_started.set(Some(started));
        let step = self.core.borrow_mut().bytes_read(id, attachment, decoder, buf, ms_at(started));
        if step == ReadStep::Closing {
            self.wake(id, Wake::ALL);
        }
        step
    }

    /// The writer of connection `id` finished a write ([`ShardCore::write_completed`]): wakes
    /// the reader if it may go on (both tasks if the write failed), and runs a round if the
    /// write gave credit back.
    pub fn write_completed(
        &self,
        id: ConnId,
        attachment: Attachment,
        outcome: WriteOutcome,
        credits: CreditReturns,
    ) -> Option<Written> {
        let (next, has_work) = {
            let mut core = self.core.borrow_mut();
            let next = core.write_completed(id, attachment, outcome, credits);
            (next, core.has_work())
        };
        let wake = match next {
            Some(Written::Continue { wake_reader }) => Wake { reader: wake_reader, ..Wake::default() },
            Some(Written::Failed) => Wake::ALL,
            Some(Written::CutShort | Written::Superseded) | None => Wake::default(),
        };
        self.wake(id, wake);
        if has_work {
            self.run_work();
        }
        next
    }

    /// The reader of connection `id` finished ([`ShardCore::reader_finished`]); wakes both
    /// tasks. The caller runs the round.
    pub fn reader_finished(&self, id: ConnId, attachment: Attachment) -> Option<ReaderFinished> {
        let finished = self.core.borrow_mut().reader_finished(id, attachment, now_ms());
        self.wake(id, Wake::ALL);
        finished
    }

    /// A detached session's expiry is due ([`ShardCore::expire_session`]); the caller runs
    /// the round.
    pub fn expire_session(&self, id: ConnId, attachment: Attachment) -> Option<Expiry> {
        self.core.borrow_mut().expire_session(id, attachment, now_ms())
    }

    /// Runs `f` on the state of connection `id` (`None` when it is gone), then wakes its tasks
    /// as the returned [`Wake`] says. The core is borrowed for `f` only.
    pub fn with_conn<R>(&self, id: ConnId, f: impl FnOnce(&mut ConnState) -> (R, Wake)) -> Option<R> {
        let (result, wake) = f(self.core.borrow_mut().conn_mut(id)?);
        self.wake(id, wake);
        Some(result)
    }

    /// Connection `id`'s client is at `peer` (for the admin API's list of sessions).
    pub fn note_peer(&self, id: ConnId, peer: SocketAddr) {
        self.with_conn(id, |state| {
            state.peer = Some(peer);
            ((), Wake::default())
        });
    }

    /// Wakes the tasks of connection `id` that `wake` names.
    pub fn wake(&self, id: ConnId, wake: Wake) {
        if wake != Wake::default() {
            self.wakers.borrow_mut().wake(id, wake);
        }
    }

    /// Parks a task of connection `id` until [`Shard::wake`] names it.
    pub fn park(&self, id: ConnId, writer: bool, waker: &Waker) {
        let mut wakers = self.wakers.borrow_mut();
        let wakers = &mut wakers.tasks[id.index as usize];
        let slot = if writer { &mut wakers.writer } else { &mut wakers.reader };
        *slot = Some(waker.clone());
    }

    /// The writer of connection `id` is to be woken when the connection starts closing
    /// ([`Wake::closing`]), even in the middle of a write (`Some`: its waker, kept until it
    /// ends; `None`: it ended).
    pub fn watch_closing(&self, id: ConnId, waker: Option<&Waker>) {
        let mut wakers = self.wakers.borrow_mut();
        wakers.tasks[id.index as usize].closing = waker.cloned();
    }

    /// The writer task of connection `id` starts or ends (an ended connection's slot is freed
    /// once its writer is done).
    pub fn set_writer_running(&self, id: ConnId, running: bool) {
        self.core.borrow_mut().set_writer_running(id, running);
    }

    /// Connections with a socket attached: what a stopping shard waits for (its close
    /// frames). Detached sessions, kept for resume, have nothing to write.
    pub fn attached_connection_count(&self) -> usize {
        self.core.borrow().attached_conn_count()
    }

    /// Counts a connection in its opening phase until the returned guard is dropped.
    pub fn opening(&self) -> OpeningConnection<'_> {
        self.opening_connections.set(self.opening_connections.get() + 1);
        OpeningConnection { shard: self }
    }

    /// Runs `work` unless the shard starts shutting down first; then `None` (and `work` is
    /// dropped).
    pub async fn unless_shutdown<F: Future>(&self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        let mut shutdown = std::pin::pin!(self.shutdown.wait());
        std::future::poll_fn(|cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            work.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// Passes a connection to the shard `home` (see `conn::Adoption`).
    pub fn hand_over(&self, home: ShardId, adoption: Box<connection::Adoption>) {
        assert_ne!(home, self.id, "a resume of this shard's own session is served here, not handed over");
        self.post_office.post(home, Envelope::Adopt(adoption));
    }

    /// Runs a round of work in the core ([`ShardCore::run_work`]) with the time read once (a
    /// round lasts far less than a millisecond), then does what it asks: posts each outbox as
    /// one batch per destination shard, lets the log's commit task run, wakes the ack timer.
    /// A round started by input (`bytes_read`) takes its time from there, and its end is
    /// recorded in [`rounds`] (one clock read either way).
    ///
    /// Returns whether the round woke a parked writer: its write is then still to be
    /// submitted, and a reader about to re-arm its read lets it go first
    /// ([`DeferredReaders`]).
    pub fn run_work(&self) -> bool {
        let started = self.round_started.take();
        let woke_writer = self.run_round(started.map_or_else(now_ms, ms_at));
        if let Some(started) = started {
            let mut rounds = self.rounds.get();
            rounds.record(Instant::now().saturating_duration_since(started).as_nanos() as u64);
            self.rounds.set(rounds);
        }
        woke_writer
    }

    /// [`Shard::run_work`] at `now` (ms, [`crate::clock::now_ms`]).
    fn run_round(&self, now: u64) -> bool {
        let mut core = self.core.borrow_mut();
        let mut wakers = self.wakers.borrow_mut();
        wakers.woke_writer = false;
        let effects = core.run_work(now, &mut *wakers);
        for (shard, commands) in effects.posts {
            self.post_office.post(shard, Envelope::Commands(commands));
            self.envelopes_posted.set(self.envelopes_posted.get() + 1);
        }
        if effects.log_has_pending {
            if let Some(committer) = self.committer.borrow().as_ref() {
                committer.notify();
            }
        }
        if effects.wake_ack_timer {
            self.ack_deadline_added.fire();
        }
        if let Some(forwarders) = &self.forwarders {
            let (forwarders, forwards) = &mut *forwarders.borrow_mut();
            core.take_forwards(forwards);
            if !forwards.is_empty() {
                forwarders.forward(forwards);
            }
        }
        wakers.take_woke_writer()
    }

    /// Attaches the shard's durable log: recovered messages go back to their queues, and a
    /// group-commit task answers durable publishes as their records become durable.
    fn start_durable_log(self: &Rc<Self>, DurableStart { log, recovery, message_id_floor }: DurableStart) {
        for line in &recovery.report {
            log!(Level::Warn, "shard {}: log recovery: {line}", self.id.0);
        }
        if !recovery.messages.is_empty() {
            log!(Level::Info, "shard {}: recovered {} unsettled durable messages", self.id.0, recovery.messages.len());
        }
        let log = Rc::new(RefCell::new(log));
        let durable_addresses =
            self.config.durable_addresses.iter().map(|name| bytes::Bytes::from(name.clone())).collect();
        self.core.borrow_mut().attach_durable_log(
            log.clone(),
            durable_addresses,
            recovery,
            message_id_floor,
            now_ms(),
            now_unix_ms(),
        );
        let committer = Rc::new(GroupCommitter::new(log));
        *self.committer.borrow_mut() = Some(committer.clone());
        let shard = self.clone();
        let committing = monoio::spawn(async move {
            let on_committed = |lsn| {
                shard.core.borrow_mut().durable_committed(lsn, now_ms());
                shard.run_work();
            };
            if let Err(error) = committer.run(on_committed).await {
                log!(
                    Level::Error,
                    "shard {}: the durable log failed: {error}; durable publishes are refused until a restart",
                    shard.id.0
                );
                shard.core.borrow_mut().durable_failed(&error.to_string());
                shard.run_work();
            }
        });
        *self.committing.borrow_mut() = Some(committing);
    }

    /// Writes and syncs what the durable log still holds in memory (acknowledgements become
    /// SETTLED records), then stops its commit task: a clean stop leaves nothing settled to be
    /// redelivered after a restart. Bounded by `timeout` (a stuck disk must not hold the exit).
    async fn stop_durable_log(&self, timeout: Duration) {
        let Some(committer) = self.committer.borrow().clone() else { return };
        let Some(committing) = self.committing.borrow_mut().take() else { return };
        committer.stop();
        if monoio::time::timeout(timeout, committing).await.is_err() {
            log!(
                Level::Warn,
                "shard {}: the durable log did not finish its last commit within {} ms; what it did not write \
                 (acknowledgements) is redelivered after a restart",
                self.id.0,
                timeout.as_millis()
            );
        }
    }

    /// The shard's timer: redelivers client-ack deliveries whose ack timeout passed, and ends
    /// sessions whose credentials expired (a JWT's `exp`). Sleeps until the earliest deadline
    /// the core reports, or, with none pending, until a round of work wakes it; a round that
    /// adds an earlier deadline wakes it from its sleep too.
    async fn ack_timer_loop(self: Rc<Self>) {
        loop {
            let next = self.core.borrow_mut().poll_deadline();
            match next {
                None => {
                    self.ack_deadline_added.wait().await;
                    self.ack_deadline_added.reset();
                }
                Some(deadline) => {
                    let now = now_ms();
                    if deadline > now {
                        let mut sleep = std::pin::pin!(monoio::time::sleep(Duration::from_millis(deadline - now)));
                        let mut woken = std::pin::pin!(self.ack_deadline_added.wait());
                        std::future::poll_fn(|cx| {
                            if sleep.as_mut().poll(cx).is_ready() || woken.as_mut().poll(cx).is_ready() {
                                Poll::Ready(())
                            } else {
                                Poll::Pending
                            }
                        })
                        .await;
                        self.ack_deadline_added.reset();
                    }
                    self.core.borrow_mut().on_deadline(now_ms());
                    self.run_work();
                }
            }
        }
    }

    /// Drains the inbox whenever other shards post to it; sleeps on the eventfd otherwise.
    async fn inbox_loop(self: Rc<Self>, inbox: Receiver<Envelope>) {
        let wake = self.post_office.wake(self.id).clone();
        // We duplicate the eventfd so that the monoio File owns its own descriptor and closing
        // it cannot close the one senders write to.
        // SAFETY: `wake` (an `Arc` held for this whole function) owns the eventfd, so the
        // number is open; dup(2) touches no memory of ours and its result is checked below.
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
                    Envelope::Commands(commands) => self.core.borrow_mut().accept_envelope(commands),
                    Envelope::Adopt(adoption) => {
                        monoio::spawn(connection::adopt(self.clone(), *adoption));
                    }
                    Envelope::StopInput(reply) => self.stop_input(reply),
                    Envelope::Shutdown { close_by, exit_by } => {
                        self.shutdown_deadlines.set(Some((close_by, exit_by)));
                        self.stop_accepting.fire();
                        self.shutdown.fire();
                    }
                    Envelope::Drain { duration } => {
                        monoio::spawn(self.clone().drain(duration));
                    }
                    Envelope::Reload(limits) => self.core.borrow_mut().set_runtime_limits(limits),
                    // The asker may have given up waiting: nothing to do then.
                    Envelope::Report(reply) => drop(reply.send(self.core.borrow().report())),
                    Envelope::Snapshot(request, reply) => drop(reply.send(self.snapshot(&request))),
                    Envelope::Admin(command, reply) => drop(reply.send(self.admin_command(command))),
                    Envelope::Cluster(update) => self.core.borrow_mut().cluster_update(update, now_ms()),
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

    /// The first step of a graceful stop: the listener stops, connections process no more
    /// input ([`ShardCore::stop_input`]), and `reply` hears from this shard once every SEND
    /// already taken is answered (their RECEIPTs and refusals are queued before any close).
    fn stop_input(self: &Rc<Self>, reply: crossbeam_channel::Sender<ShardId>) {
        self.stop_accepting.fire();
        self.core.borrow_mut().stop_input();
        let shard = self.clone();
        monoio::spawn(async move {
            // Answers come from durable commits and other shards' envelopes, each of which
            // runs a round; a short poll keeps this off the message path. The main thread
            // bounds the whole wait by the shutdown grace.
            let answered = shard
                .unless_shutdown(async {
                    while shard.core.borrow().inflight_send_count() > 0 {
                        monoio::time::sleep(STOP_POLL_INTERVAL).await;
                    }
                })
                .await;
            if answered.is_some() {
                let _ = reply.send(shard.id);
            }
        });
    }

    /// Lame duck: closes this shard's connections one by one, evenly over `duration`, each
    /// with a fatal ERROR 4503 (`ConnState::end_for_drain`), so a fleet of clients does not
    /// reconnect elsewhere all at once. New upgrades are refused meanwhile (`is_draining`).
    async fn drain(self: Rc<Self>, duration: Duration) {
        let ids: Vec<ConnId> = {
            let core = self.core.borrow();
            // Connected sessions: a detached one has no connection to close (a resume of it
            // is refused with 503, and it expires).
            let connected = |id: &ConnId| core.conn(*id).is_some_and(|state| state.lifecycle().socket().is_some());
            core.conn_ids().into_iter().filter(connected).collect()
        };
        let count = ids.len() as u32;
        log!(
            Level::Info,
            "shard {}: draining: closing {count} connections over {} ms",
            self.id.0,
            duration.as_millis()
        );
        let started = Instant::now();
        let shard = self.clone();
        let closing = async move {
            for (index, id) in (0u32..).zip(ids) {
                // The middle of the index-th of `count` equal slices of the duration.
                let at = started + duration * (2 * index + 1) / (2 * count);
                monoio::time::sleep(at.saturating_duration_since(Instant::now())).await;
                shard.with_conn(id, |state| {
                    let closing = state.end_for_drain(DRAIN_CLOSE_REASON.to_string());
                    ((), if closing { Wake::ALL } else { Wake::default() })
                });
                shard.run_work();
            }
        };
        self.unless_shutdown(closing).await;
    }

    /// The core's snapshot, with what the shell counts itself.
    fn snapshot(&self, request: &core::SnapshotRequest) -> core::ShardSnapshot {
        let mut snapshot = self.core.borrow().snapshot(request);
        snapshot.envelopes_posted = self.envelopes_posted.get();
        snapshot.upgrades_refused = self.upgrades_refused.borrow().clone();
        snapshot.log_commits = self.committer.borrow().as_ref().map(|committer| committer.stats());
        snapshot.rounds = self.rounds.get();
        snapshot
    }

    /// Does what the admin API asks (the round of work that follows routes what it produced).
    fn admin_command(&self, command: core::AdminCommand) -> core::AdminOutcome {
        match command {
            core::AdminCommand::PurgeAddress(name) => self.core.borrow_mut().purge_address(&name),
            core::AdminCommand::CloseSession(id) => {
                let reason = "session closed by an operator (admin API)".to_string();
                let closing = self.with_conn(id, |state| {
                    let closing = state.end_by_operator(crate::mbws::ErrorCode::Forbidden, reason);
                    (closing, if closing { Wake::ALL } else { Wake::default() })
                });
                match closing {
                    None => core::AdminOutcome::NotFound,
                    Some(true) => core::AdminOutcome::Closing,
                    Some(false) => core::AdminOutcome::NotConnected,
                }
            }
            core::AdminCommand::DeclareAddress(name, settings) => {
                self.core.borrow_mut().declare_address(&name, settings)
            }
            core::AdminCommand::DeleteAddress { name, force } => self.core.borrow_mut().delete_address(&name, force),
            core::AdminCommand::UserChanged { name, permissions } => self.user_changed(&name, permissions),
        }
    }

    /// Applies a change of user `name` to its live sessions on this shard (docs/OPERATIONS.md,
    /// "Users"): new permissions for their next SEND and SUBSCRIBE, or, for a deleted user, a
    /// fatal ERROR 4401 and the close; a deleted user's sessions that wait for a resume keep no
    /// permission at all (every SEND and SUBSCRIBE after a resume is refused 4403).
    fn user_changed(&self, name: &str, permissions: Option<Arc<crate::auth::Permissions>>) -> core::AdminOutcome {
        let (mut updated, mut closed) = (0, 0);
        let ids = self.core.borrow().conn_ids();
        for id in ids {
            self.with_conn(id, |state| {
                if state.user.as_deref() != Some(name) {
                    return ((), Wake::default());
                }
                match &permissions {
                    Some(permissions) => {
                        state.session.set_permissions(permissions.clone());
                        updated += 1;
                        ((), Wake::default())
                    }
                    None => {
                        state.session.set_permissions(Arc::new(crate::auth::Permissions::default()));
                        let reason = format!("user {name:?} was deleted by an operator (admin API or configuration)");
                        if state.end_by_operator(crate::mbws::ErrorCode::Unauthenticated, reason) {
                            closed += 1;
                            ((), Wake::ALL)
                        } else {
                            ((), Wake::default())
                        }
                    }
                }
            });
        }
        core::AdminOutcome::UserSessions { updated, closed }
    }

    /// Connection `id` was opened by user `user`'s password (for the admin API).
    pub fn note_user(&self, id: ConnId, user: Arc<str>) {
        self.with_conn(id, |state| {
            state.user = Some(user);
            ((), Wake::default())
        });
    }

    /// Closes every connection with 1001 (going away).
    fn close_all_connections(&self) {
        let ids = self.core.borrow().conn_ids();
        for id in ids {
            self.with_conn(id, |state| {
                state.begin_close(crate::ws::close_code::GOING_AWAY, "broker shutting down");
                ((), Wake::ALL)
            });
        }
    }
}

/// A connection counted in [`Shard::opening`]; uncounted when dropped.
pub struct OpeningConnection<'a> {
    shard: &'a Shard,
}

impl Drop for OpeningConnection<'_> {
    fn drop(&mut self) {
        let count = &self.shard.opening_connections;
        debug_assert!(count.get() > 0, "every opening connection was counted once");
        count.set(count.get() - 1);
    }
}

/// What `start` returns: the shard threads and how to stop them.
pub struct Running {
    pub local_addr: SocketAddr,
    pub io_driver: &'static str,
    /// The TLS settings when the broker serves `wss://` (reloaded on SIGHUP).
    pub tls: Option<Arc<TlsContext>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    post_office: Arc<PostOffice>,
    /// A drain was started on the shards (once).
    drain_started: std::sync::atomic::AtomicBool,
}

impl Running {
    /// Asks every shard for its [`ShardReport`](core::ShardReport) (see [`Inspector::report`]).
    pub fn report(&self, timeout: Duration) -> Vec<core::ShardReport> {
        self.inspector().report(timeout)
    }

    /// A handle another thread (the admin API's) uses to ask the shards how they are doing.
    pub fn inspector(&self) -> Inspector {
        Inspector { post_office: self.post_office.clone() }
    }

    /// The first step of a graceful stop ([`Envelope::StopInput`]): every shard stops
    /// accepting and processing input; the receiver hears from each once its SENDs in flight
    /// are answered.
    pub fn stop_input(&self) -> Receiver<ShardId> {
        let shards = self.post_office.shard_count();
        let (reply, answers) = crossbeam_channel::bounded(shards);
        for index in 0..shards {
            self.post_office.post(ShardId(index as u16), Envelope::StopInput(reply.clone()));
        }
        answers
    }

    /// Asks every shard to close its connections (1001) by `close_by` and to exit, its
    /// durable log synced, by `exit_by` ([`Envelope::Shutdown`]); does not wait.
    pub fn begin_shutdown(&self, close_by: Instant, exit_by: Instant) {
        for index in 0..self.post_office.shard_count() {
            self.post_office.post(ShardId(index as u16), Envelope::Shutdown { close_by, exit_by });
        }
    }

    pub fn shard_count(&self) -> usize {
        self.post_office.shard_count()
    }

    /// The shards' inboxes, for the cluster's control-plane thread (`crate::cluster`), which
    /// posts placement and fencing to them.
    pub fn post_office(&self) -> Arc<PostOffice> {
        self.post_office.clone()
    }

    /// Shard threads still running.
    pub fn running_shards(&self) -> usize {
        self.threads.iter().filter(|thread| !thread.is_finished()).count()
    }

    /// Waits for every shard thread to exit.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    /// Stops every shard at once (a failed start): closes without waiting for SENDs in flight.
    pub fn shutdown(self) {
        let now = Instant::now();
        self.begin_shutdown(now + Duration::from_millis(500), now + SHUTDOWN_LOG_COMMIT_TIMEOUT);
        self.join();
    }

    /// Starts a drain on every shard ([`Envelope::Drain`]): new upgrades are refused at once,
    /// connections closed over `duration`. False if a drain had started already.
    pub fn drain(&self, duration: Duration) -> bool {
        self.post_office.set_draining();
        if self.drain_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        for index in 0..self.post_office.shard_count() {
            self.post_office.post(ShardId(index as u16), Envelope::Drain { duration });
        }
        true
    }

    /// New limits for the sessions opened from now on, on every shard ([`Envelope::Reload`]).
    pub fn reload_limits(&self, limits: crate::config::RuntimeLimits) {
        for index in 0..self.post_office.shard_count() {
            self.post_office.post(ShardId(index as u16), Envelope::Reload(limits));
        }
    }
}

/// Asks the shards questions through their inboxes: each answers between two rounds of work
/// (its inbox task), so asking costs the message path one envelope per shard.
#[derive(Clone)]
pub struct Inspector {
    post_office: Arc<PostOffice>,
}

impl Inspector {
    pub fn shard_count(&self) -> usize {
        self.post_office.shard_count()
    }

    /// The broker drains (lame duck): /readyz answers 503.
    pub fn is_draining(&self) -> bool {
        self.post_office.is_draining()
    }

    /// Starts a drain (`POST /api/drain`): new upgrades are refused from now on, and the main
    /// thread, woken by SIGUSR2 as if an operator had sent it, closes the connections over
    /// `--drain-duration-ms` and then stops the broker. False if the broker drains already.
    pub fn start_drain(&self) -> bool {
        if !self.post_office.set_draining() {
            return false;
        }
        let me = std::process::id() as libc::pid_t;
        // SAFETY: kill(2) with this process's own id and a valid signal number; SIGUSR2 is
        // blocked in every thread and taken by the main thread's sigwait.
        unsafe { libc::kill(me, libc::SIGUSR2) };
        true
    }

    /// Every shard's [`ShardReport`](core::ShardReport), by shard, waiting up to `timeout`
    /// for the answers; a shard that has not answered by then is left out.
    pub fn report(&self, timeout: Duration) -> Vec<core::ShardReport> {
        let mut reports = self.ask_every_shard(Envelope::Report, timeout);
        reports.sort_by_key(|report| report.shard.0);
        reports
    }

    /// Every shard's [`ShardSnapshot`](core::ShardSnapshot) for `request`, by shard; as
    /// [`Inspector::report`], a shard that has not answered within `timeout` is left out.
    pub fn snapshot(&self, request: &core::SnapshotRequest, timeout: Duration) -> Vec<core::ShardSnapshot> {
        let mut snapshots = self.ask_every_shard(|reply| Envelope::Snapshot(Box::new(request.clone()), reply), timeout);
        snapshots.sort_by_key(|snapshot| snapshot.report.shard.0);
        snapshots
    }

    /// Asks shard `shard` to do `command`; `None` if it did not answer within `timeout`.
    pub fn command(
        &self,
        shard: ShardId,
        command: core::AdminCommand,
        timeout: Duration,
    ) -> Option<core::AdminOutcome> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.post_office.post(shard, Envelope::Admin(command, reply));
        answer.recv_timeout(timeout).ok()
    }

    /// Posts `question(reply)` to every shard and gathers the answers that come within `timeout`.
    fn ask_every_shard<T>(
        &self,
        question: impl Fn(crossbeam_channel::Sender<T>) -> Envelope,
        timeout: Duration,
    ) -> Vec<T> {
        let shards = self.post_office.shard_count();
        let (reply, answers) = crossbeam_channel::bounded(shards);
        for index in 0..shards {
            self.post_office.post(ShardId(index as u16), question(reply.clone()));
        }
        drop(reply);
        let deadline = Instant::now() + timeout;
        let mut gathered = Vec::with_capacity(shards);
        while gathered.len() < shards {
            match answers.recv_deadline(deadline) {
                Ok(answer) => gathered.push(answer),
                Err(_) => break,
            }
        }
        gathered
    }
}

/// Binds the listeners and starts `config.shards` shard threads.
///
/// Order matters: the listeners are bound first, so a start that cannot run (the port is in
/// use) leaves the data directory as it found it; then the data directory is checked and every
/// shard's log opened and recovered before any shard accepts, so a broken or unwritable data
/// directory stops the start with a clear message.
///
/// With `tls`, every shard serves `wss://` only (the TLS handshake comes before the upgrade).
pub fn start(config: Config, tls: Option<Arc<TlsContext>>) -> io::Result<Running> {
    if !monoio::utils::detect_uring() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring is not available (kernel older than 5.6, or disabled by \
             /proc/sys/kernel/io_uring_disabled or a seccomp policy); mbws-broker needs io_uring",
        ));
    }
    let config = Arc::new(config);
    let listeners = net::bind_all(config.listen, config.shards)?;
    let local_addr = listeners[0].local_addr()?;
    let (logs, message_id_floor) = data_dir::open_logs(&config)?;
    let (post_office, receivers) = PostOffice::new(config.shards)?;
    let admission = admission::Admission::new(&config);
    let cores = net::allowed_cpus();
    let mut threads = Vec::with_capacity(config.shards);
    for (index, ((listener, inbox), (log, recovery))) in listeners.into_iter().zip(receivers).zip(logs).enumerate() {
        let config = config.clone();
        let post_office = post_office.clone();
        let admission = admission.clone();
        let core = if config.pin_threads && !cores.is_empty() { Some(cores[index % cores.len()]) } else { None };
        let durable = DurableStart { log, recovery, message_id_floor };
        let tls = tls.as_ref().map(|tls| tls.server_config());
        let thread = std::thread::Builder::new().name(format!("mbws-shard-{index}")).spawn(move || {
            run_shard(ShardId(index as u16), config, post_office, admission, listener, inbox, core, durable, tls)
        })?;
        threads.push(thread);
    }
    Ok(Running {
        local_addr,
        io_driver: "io_uring",
        tls,
        threads,
        post_office,
        drain_started: std::sync::atomic::AtomicBool::new(false),
    })
}

/// A shard's opened log, what it recovered, and the id its message ids continue above.
struct DurableStart {
    log: DurableLog,
    recovery: Recovery,
    message_id_floor: u64,
}

#[allow(clippy::too_many_arguments)]
fn run_shard(
    id: ShardId,
    config: Arc<Config>,
    post_office: Arc<PostOffice>,
    admission: Arc<admission::Admission>,
    listener: std::net::TcpListener,
    inbox: Receiver<Envelope>,
    core: Option<usize>,
    durable: DurableStart,
    tls: Option<Arc<rustls::ServerConfig>>,
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
    let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    runtime.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                log!(Level::Error, "shard {}: cannot use the listener: {error}", id.0);
                std::process::exit(1);
            }
        };
        let shard = Rc::new(Shard::new(id, config, post_office, admission));
        shard.start_durable_log(durable);
        monoio::spawn(shard.clone().inbox_loop(inbox));
        // Ack deadlines (--ack-timeout-ms) and expiring credentials (JWT) both need it.
        monoio::spawn(shard.clone().ack_timer_loop());
        if let Some(period) = profiler_wake_period() {
            monoio::spawn(profiler_wake_loop(period));
        }
        let accepting = monoio::spawn(accept_loop(shard.clone(), listener, tls));
        shard.stop_accepting.wait().await;
        stop_listening(id, listener_fd);
        drop(accepting);
        shard.shutdown.wait().await;
        let now = Instant::now();
        let (close_by, exit_by) = shard.shutdown_deadlines.get().unwrap_or((now, now + SHUTDOWN_LOG_COMMIT_TIMEOUT));
        // SENDs still unanswered here are abandoned: their clients get the close without a
        // RECEIPT, which tells them the SEND was not taken (docs/OPERATIONS.md, "Stop").
        let unanswered = shard.core.borrow().inflight_send_count();
        // Sessions get close 1001 here; connections still opening see the event and send their
        // own close 1001 (or, before the upgrade, just close).
        shard.close_all_connections();
        // Writers get until `close_by` to write the close frames (a peer that reads nothing may
        // hold one back)...
        while (shard.core.borrow().writing_conn_count() > 0 || shard.opening_connections.get() > 0)
            && Instant::now() < close_by
        {
            monoio::time::sleep(STOP_POLL_INTERVAL).await;
        }
        let unclosed = shard.core.borrow().writing_conn_count() + shard.opening_connections.get();
        // ...then the peers briefly get to answer them (a peer that does not is not waited for).
        let echoes_by = close_by.min(Instant::now() + CLOSE_ECHO_WAIT);
        while shard.attached_connection_count() > 0 && Instant::now() < echoes_by {
            monoio::time::sleep(STOP_POLL_INTERVAL).await;
        }
        if unanswered > 0 || unclosed > 0 {
            log!(
                Level::Warn,
                "shard {}: the shutdown grace ran out: abandoned {unanswered} unanswered SENDs (their clients got no \
                 RECEIPT) and {unclosed} connections whose close frame could not be written",
                id.0;
                unanswered_sends = unanswered,
                unclosed_connections = unclosed,
            );
        }
        shard.stop_durable_log(exit_by.saturating_duration_since(Instant::now())).await;
        log!(Level::Debug, "shard {}: stopped", id.0);
    });
}

/// Takes the shard's listener out of the kernel's SO_REUSEPORT group at once. Closing it is not
/// enough: the accept that io_uring holds in flight keeps the socket alive (and accepting into
/// the backlog) until the ring is torn down, which the kernel finishes after the process has
/// exited; a broker restarted on the same port would share it with that dead socket meanwhile.
/// `shutdown(2)` stops the socket listening whoever holds it, and fails the pending accept.
fn stop_listening(id: ShardId, listener_fd: std::os::fd::RawFd) {
    // SAFETY: the listener (owned by the accept task, which has not been dropped) keeps
    // `listener_fd` open; shutdown(2) changes the socket's state, not the descriptor's.
    if unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) } != 0 {
        log!(Level::Warn, "shard {}: stopping the listener failed: {}", id.0, io::Error::last_os_error());
    }
}

/// How long a stopping shard waits for its durable log's last commit when stopped without a
/// grace ([`Running::shutdown`]).
const SHUTDOWN_LOG_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping shard waits for its peers to answer its close frames, once written.
const CLOSE_ECHO_WAIT: Duration = Duration::from_millis(500);

/// How often a stopping shard looks whether its SENDs are answered and its connections closed.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The reason of the ERROR 4503 (and close) a drain ends each session with; clients read it as
/// "open a new session, on another broker" (docs/PROTOCOL.md 10.1, docs/OPERATIONS.md).
pub const DRAIN_CLOSE_REASON: &str = "broker draining (lame duck): open a new session on another broker";

/// The environment variable that makes every shard wake at least this often (milliseconds,
/// 1 to 1,000) and then yield its thread: for running the broker
/// under valgrind only. Valgrind runs one thread at a time and treats `io_uring_enter` as a
/// call that cannot block, so a shard waiting for completions keeps every other thread from
/// running; with two or more shards, one that waits for another's post waits forever
/// (`scripts/callgrind-broker.sh --shards N` sets it). Unset, nothing is spawned.
pub const PROFILER_WAKE_ENV: &str = "MBWS_PROFILER_WAKE_MS";
/// The longest period [`PROFILER_WAKE_ENV`] accepts.
const MAX_PROFILER_WAKE_PERIOD_MS: u64 = 1_000;

/// The period [`PROFILER_WAKE_ENV`] asks for, if it is set to a number in range; a value that
/// is not is ignored with a warning, never fatal (it is a profiling aid).
fn profiler_wake_period() -> Option<Duration> {
    let value = std::env::var_os(PROFILER_WAKE_ENV)?;
    parse_profiler_wake_period(&value).unwrap_or_else(|reason| {
        log!(Level::Warn, "{PROFILER_WAKE_ENV}={value:?} ignored: {reason}");
        None
    })
}

/// [`PROFILER_WAKE_ENV`]'s value as a period, or why it is not one.
fn parse_profiler_wake_period(value: &std::ffi::OsStr) -> Result<Option<Duration>, String> {
    match value.to_str().and_then(|text| text.trim().parse::<u64>().ok()) {
        Some(ms @ 1..=MAX_PROFILER_WAKE_PERIOD_MS) => Ok(Some(Duration::from_millis(ms))),
        _ => Err(format!("it takes whole milliseconds from 1 to {MAX_PROFILER_WAKE_PERIOD_MS}")),
    }
}

/// Wakes the shard every `period` and yields its thread ([`PROFILER_WAKE_ENV`]): under
/// valgrind, `sched_yield` hands valgrind's thread lock to the next thread in line.
async fn profiler_wake_loop(period: Duration) {
    loop {
        monoio::time::sleep(period).await;
        // SAFETY: sched_yield takes no arguments and touches no memory of ours.
        unsafe { libc::sched_yield() };
    }
}

/// Accept failures are logged at most once per this interval, with a count of those since.
const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts connections and serves each in its own task: over TLS when `tls` is given.
async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    let mut consecutive_errors = 0u32;
    let mut unreported_failures = 0u64;
    let mut last_report: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                consecutive_errors = 0;
                if shard.stop_accepting.has_fired() {
                    return;
                }
                #[cfg(debug_assertions)]
                debug_panic_on_accept(shard.id);
                match &tls {
                    None => drop(monoio::spawn(connection::serve(shard.clone(), stream, peer))),
                    Some(tls) => drop(monoio::spawn(connection::serve_tls(shard.clone(), stream, peer, tls.clone()))),
                }
            }
            Err(_) if shard.stop_accepting.has_fired() => return,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the listener stays open.
                // Each attempt fails while the condition lasts, so log once per interval.
                consecutive_errors += 1;
                unreported_failures += 1;
                let now = Instant::now();
                if last_report.is_none_or(|at| now.duration_since(at) >= ACCEPT_FAILURE_LOG_INTERVAL) {
                    let hint = match error.raw_os_error() {
                        Some(libc::EMFILE) => format!(
                            "; the open-file limit ({}) is reached: raise it (ulimit -n, LimitNOFILE=)",
                            open_file_limit().map_or_else(|| "unknown".to_string(), |limit| limit.to_string())
                        ),
                        Some(libc::ENFILE) => "; the system-wide open-file limit is reached (fs.file-max)".to_string(),
                        _ => String::new(),
                    };
                    log!(
                        Level::Warn,
                        "shard {}: accept failed: {error} ({unreported_failures} failures since the last report){hint}; \
                         new connections wait in the backlog",
                        shard.id.0
                    );
                    unreported_failures = 0;
                    last_report = Some(now);
                }
                let backoff = Duration::from_millis(10 * u64::from(consecutive_errors.min(100)));
                monoio::time::sleep(backoff).await;
            }
        }
    }
}

/// The process's soft open-file limit (RLIMIT_NOFILE), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the live struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// Debug builds only (tests): `MBWS_DEBUG_PANIC_ON_ACCEPT=<shard>` makes that shard panic on
/// its first accepted connection, to test that a panicking shard stops the whole process.
/// Compiled out of release builds, so no setting can reach it there.
#[cfg(debug_assertions)]
fn debug_panic_on_accept(shard: ShardId) {
    if std::env::var("MBWS_DEBUG_PANIC_ON_ACCEPT").is_ok_and(|value| value == shard.0.to_string()) {
        panic!("MBWS_DEBUG_PANIC_ON_ACCEPT: shard {} panics on purpose", shard.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round reports a writer it woke (the read loop then lets the write go first), once,
    /// and not a reader's wake nor a wake that found no parked writer.
    #[test]
    fn wakers_report_a_woken_writer_once() {
        let noop = Waker::noop();
        let mut wakers = Wakers::default();
        wakers.tasks.resize_with(2, TaskWakers::default);
        let conn = |index| ConnId { index, generation: 0 };
        wakers.tasks[0].reader = Some(noop.clone());
        wakers.wake(conn(0), Wake { reader: true, ..Wake::default() });
        assert!(!wakers.take_woke_writer(), "a reader's wake is no write");
        wakers.wake(conn(1), Wake { writer: true, ..Wake::default() });
        assert!(!wakers.take_woke_writer(), "no writer was parked");
        wakers.tasks[1].writer = Some(noop.clone());
        wakers.wake(conn(1), Wake { writer: true, ..Wake::default() });
        assert!(wakers.take_woke_writer());
        assert!(!wakers.take_woke_writer(), "reported once");
    }

    /// The valgrind wake-up (scripts/callgrind-broker.sh --shards) takes whole milliseconds in
    /// range; anything else is refused with the range, so a typo never leaves a shard spinning.
    #[test]
    fn the_profiler_wake_period_takes_whole_milliseconds_in_range() {
        let parse = |text: &str| parse_profiler_wake_period(std::ffi::OsStr::new(text));
        assert_eq!(parse("1"), Ok(Some(Duration::from_millis(1))));
        assert_eq!(parse(" 250 "), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse("1000"), Ok(Some(Duration::from_millis(MAX_PROFILER_WAKE_PERIOD_MS))));
        for refused in ["0", "1001", "-1", "1.5", "1ms", ""] {
            let reason = parse(refused).expect_err(refused);
            assert!(reason.contains("from 1 to 1000"), "{refused:?}: {reason}");
        }
    }
}
