//! Forwarding SENDs between cluster nodes: the IO side of [`Owner::Remote`](super::view::Owner).
//!
//! A shard's placement view hands each SEND for an address another node owns to the shard's
//! shell as a [`Forward`]; the shell gives it to [`Forwarders::forward`], which queues it on the
//! forwarder of that owner node. There is one forwarder per owner node and shard (a pool keyed
//! by node, one pool per shard), each a thread (`mbws-fwd-S-NODE`) holding one MBWS session on
//! the reliable subprotocol to the owner's advertise URL, with `mbws-client`'s blocking client
//! (which resumes the session after a lost connection: it resends what was not receipted, and
//! the owner drops duplicates).
//!
//! **End-to-end receipts.** The forwarder answers the publisher's connection (posted to the
//! publisher's shard) only when the owner's RECEIPT covers the forwarded SEND, or with the
//! owner's own refusal (its code and reason, a `PublishDone`) when the owner sent an ERROR for
//! it. The SENDs one RECEIPT covers are answered in runs: one `PublishesAccepted` per run of a
//! publisher's consecutive SENDs, one command for its session as for a local batch. The owner
//! receipts a durable message after its fsync, so the client's RECEIPT means the same on every
//! node.
//!
//! **Order.** The SENDs of one publisher to one address all pass through the one shard that
//! owns the address's name here, then through one forwarder and one session to the owner, in
//! order: per-publisher order is kept.
//!
//! **The write.** A forwarded SEND is the client's message as it arrived: the stored
//! message's [`MessageTail`](crate::mbws::binary::MessageTail) (the end of the client's binary
//! SEND, byte for byte; a text SEND's fields encoded once on arrival) behind a SEND's 15 fixed
//! bytes. Nothing is decoded or encoded again: the client copies the tail once into its write
//! buffer and masks it there (RFC 6455 requires a client to mask), and keeps the tail, not a
//! copy, for resending after a resume.
//!
//! **Batching and window.** The shard queues the SENDs of one round for one owner as one
//! batch (one channel post and one wake-up, not one per SEND). The forwarder writes every SEND
//! it has (up to the owner's `max-inflight-sends` unreceipted) before it flushes, and reads
//! cumulative RECEIPTs: many SENDs in flight, one write per batch, not one round trip per
//! message.
//!
//! **Waiting.** The thread waits in poll(2) on its session's socket and its queue's eventfd
//! (`cluster::wait`): a SEND queued or a RECEIPT come wakes it at once; the wait's bound is
//! only for what is due at a time (a RECEIPT's [`WAIT_BOUND`], the idle session's look).
//!
//! **Bounds.** Each forwarder's queue holds at most [`QUEUE_BOUND`] SENDs (beyond: 4429 at
//! once). A SEND waits at most about [`WAIT_BOUND`] for its RECEIPT after it was written, and
//! the session resumes within [`RESUME_WINDOW`]; when the owner cannot be reached, everything
//! held is refused with non-fatal 4503 naming the node (retryable: the SEND may or may not
//! have been taken, as for any SEND whose RECEIPT did not come), and SENDs that arrive during
//! the backoff that follows ([`FIRST_BACKOFF`] doubling up to [`MAX_BACKOFF`]) are refused at
//! once the same way. Nothing waits forever.
//!
//! **Credentials.** Each session logs in with the node's [`PeerLogin`] (`--cluster-login`,
//! `--cluster-passcode`) and trusts its `--cluster-ca-file` for `wss://` owners; an owner that
//! refuses the login makes every SEND for it 4503, saying so.
//!
//! **Hops.** The session is opened as a cluster link ([`LINK_HEADER`] in its upgrade), so the
//! owner marks what comes over it as forwarded already: a node that does not own the address
//! refuses such a SEND with 4421 instead of forwarding it again. The SEND itself carries no mark.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use mbws_client::{Client, ClientError, ClientOptions};

use super::view::{Forward, NodeRef, LINK_HEADER};
use super::wait::QueueWake;
use super::PeerLogin;
use crate::broker::{Command, ConnCommand, ConnRef, FastMap, Refusal, ShardId, SharedMessage};
use crate::log;
use crate::logging::Level;
use crate::mbws::{Binding, ErrorCode, Frame, Subprotocol};
use crate::shard::mailbox::{Envelope, PostOffice};

/// Most SENDs one forwarder keeps queued (not yet written to the owner).
pub const QUEUE_BOUND: usize = 8192;
/// How long a written SEND waits for the owner's RECEIPT, and the bound on connecting.
pub const WAIT_BOUND: Duration = Duration::from_secs(2);
/// How long the client tries to resume a lost session before the forwarder gives up on it.
pub const RESUME_WINDOW: Duration = Duration::from_secs(2);
/// First pause after the owner could not be reached; doubled up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most a read waits once poll(2) said the socket is readable (it holds data, so the read
/// returns at once; the bound is for a spurious wake-up).
const READ_AFTER_READABLE: Duration = Duration::from_millis(100);
/// Most frames read from the owner in one round, before the queue is looked at again.
const FRAMES_PER_ROUND: usize = 512;
/// The longest an idle forwarder waits before it looks at its session again (the owner's
/// pings are answered when they come; a closed connection is dropped: the next SEND opens a
/// new session).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// One SEND in a forwarder's hands.
struct Job {
    publisher: ConnRef,
    seq: u64,
    message: SharedMessage,
}

/// The forwarders and relays of one shard, by owner node (see the module doc and
/// [`super::relay`]).
pub struct Forwarders {
    shard: ShardId,
    post_office: Arc<PostOffice>,
    /// The credentials and CA file of every forwarder's session (`--cluster-login`...).
    login: Arc<PeerLogin>,
    by_node: FastMap<Arc<NodeRef>, ForwarderHandle>,
    relays: super::relay::Relays,
    /// This call of [`Forwarders::forward`]'s SENDs, by owner node, each owner's in order:
    /// queued as one batch per owner at its end.
    batches: Vec<(Arc<NodeRef>, Vec<Job>)>,
}

/// The shard's end of one forwarder's queue.
struct ForwarderHandle {
    /// Batches of SENDs, each in order.
    jobs: Sender<Vec<Job>>,
    /// SENDs in the queue's batches (added here, taken off by the forwarder): at most
    /// [`QUEUE_BOUND`].
    queued: Arc<AtomicUsize>,
    wake: QueueWake,
}

impl Forwarders {
    pub fn new(shard: ShardId, post_office: Arc<PostOffice>, login: Arc<PeerLogin>) -> Forwarders {
        let relays = super::relay::Relays::new(shard, post_office.clone(), login.clone());
        Forwarders { shard, post_office, login, by_node: FastMap::default(), relays, batches: Vec::new() }
    }

    /// Queues the SENDs of `forwards` on their owners' forwarders (started on first use), one
    /// batch per owner, in order, and each relayed subscription's command on its owner's
    /// relay; SENDs beyond a queue's [`QUEUE_BOUND`] are refused with 4429 at once.
    pub fn forward(&mut self, forwards: &mut Vec<Forward>) {
        let mut answers = Answers::default();
        for forward in forwards.drain(..) {
            match forward {
                Forward::Send { owner, publisher, seq, message } => {
                    let job = Job { publisher, seq, message };
                    // Few owners: the last one used, else a look along the list.
                    match self.batches.iter_mut().rev().find(|(node, _)| Arc::ptr_eq(node, &owner) || **node == *owner)
                    {
                        Some((_, jobs)) => jobs.push(job),
                        None => self.batches.push((owner, vec![job])),
                    }
                }
                Forward::Subscribe { owner, ticket, command } => {
                    self.relays.subscribe(owner, ticket, command, &mut answers);
                }
                Forward::Settle { owner, command } => self.relays.settle(owner, command, &mut answers),
                Forward::End { owner, consumer, subscription, ticket, refusal } => {
                    self.relays.end(owner, consumer, subscription, ticket, refusal, &mut answers)
                }
            }
        }
        let mut batches = std::mem::take(&mut self.batches);
        for (owner, jobs) in batches.drain(..) {
            self.queue(owner, jobs, &mut answers);
        }
        self.batches = batches;
        answers.post(&self.post_office);
    }

    /// Queues `jobs` (SENDs for `owner`, in order) on its forwarder as one batch, as many as
    /// the queue has room for; the rest are refused with 4429.
    fn queue(&mut self, owner: Arc<NodeRef>, mut jobs: Vec<Job>, answers: &mut Answers) {
        for attempt in 1..=2 {
            let handle = match self.by_node.get(&owner) {
                Some(handle) => handle,
                None => match spawn(self.shard, owner.clone(), self.post_office.clone(), self.login.clone()) {
                    Ok(handle) => self.by_node.entry(owner.clone()).or_insert(handle),
                    Err(error) => {
                        let reason = format!("cannot start the forwarder to cluster node \"{}\": {error}", owner.name);
                        refuse_all(&owner, jobs, ErrorCode::Unavailable, &reason, answers);
                        return;
                    }
                },
            };
            let room = QUEUE_BOUND.saturating_sub(handle.queued.load(Ordering::Acquire));
            let over = if jobs.len() > room { jobs.split_off(room) } else { Vec::new() };
            if !over.is_empty() {
                let reason = format!(
                    "{QUEUE_BOUND} SENDs already wait to be forwarded to cluster node \"{}\" ({}), which owns \
                     \"{}\"; try again later",
                    owner.name,
                    owner.url,
                    String::from_utf8_lossy(over[0].message.address())
                );
                refuse_all(&owner, over, ErrorCode::Overloaded, &reason, answers);
            }
            if jobs.is_empty() {
                return;
            }
            let count = jobs.len();
            handle.queued.fetch_add(count, Ordering::AcqRel);
            match handle.jobs.try_send(jobs) {
                Ok(()) => {
                    handle.wake.notify();
                    return;
                }
                Err(error) => {
                    handle.queued.fetch_sub(count, Ordering::AcqRel);
                    jobs = match error {
                        TrySendError::Full(back) | TrySendError::Disconnected(back) => back,
                    };
                    // The thread is gone (it never stops on its own, and the queue holds at
                    // most QUEUE_BOUND batches of at least one SEND): start a new one, once.
                    self.by_node.remove(&owner);
                    if attempt == 2 {
                        let reason = format!("the forwarder to cluster node \"{}\" stopped", owner.name);
                        refuse_all(&owner, jobs, ErrorCode::Unavailable, &reason, answers);
                        return;
                    }
                }
            }
        }
    }
}

/// Refuses every SEND of `jobs` (for `owner`) with `code` and `reason`.
fn refuse_all(owner: &NodeRef, jobs: Vec<Job>, code: ErrorCode, reason: &str, answers: &mut Answers) {
    owner.counters.refused(jobs.len() as u64);
    for job in jobs {
        answers.refuse(job, code, reason.to_owned());
    }
}

/// Commands to post (PublishDones, and the relays' answers and deliveries), by shard, each
/// shard's in the order they were made.
#[derive(Default)]
pub(super) struct Answers {
    pub(super) by_shard: Vec<(ShardId, Vec<Command>)>,
}

impl Answers {
    fn answer(&mut self, job: &Job, outcome: Result<(), Refusal>) {
        let command = Command::Conn(ConnCommand::PublishDone { publisher: job.publisher.conn, seq: job.seq, outcome });
        self.push(job.publisher.shard, command);
    }

    /// Answers `job` as taken by the owner: joined to its shard's last answer when that one
    /// accepted the same publisher's SEND just before it (a run of RECEIPTed SENDs is one
    /// [`ConnCommand::PublishesAccepted`], one command for the publisher's session, as the
    /// address table answers a local batch), otherwise a new one.
    fn accepted(&mut self, job: &Job) {
        let (publisher, seq) = (job.publisher, job.seq);
        if let Some((_, commands)) = self.by_shard.iter_mut().find(|(shard, _)| *shard == publisher.shard) {
            if let Some(Command::Conn(last)) = commands.last_mut() {
                if last.join_accepted(publisher.conn, seq, 1) {
                    return;
                }
            }
        }
        let command = ConnCommand::PublishesAccepted { publisher: publisher.conn, first_seq: seq, count: 1 };
        self.push(publisher.shard, Command::Conn(command));
    }

    /// Queues `command` for `shard`.
    pub(super) fn push(&mut self, shard: ShardId, command: Command) {
        match self.by_shard.iter_mut().find(|(entry, _)| *entry == shard) {
            Some((_, commands)) => commands.push(command),
            None => self.by_shard.push((shard, vec![command])),
        }
    }

    fn refuse(&mut self, job: Job, code: ErrorCode, reason: String) {
        self.answer(&job, Err(Refusal::new(code, reason)));
    }

    pub(super) fn post(&mut self, post_office: &PostOffice) {
        for (shard, commands) in self.by_shard.drain(..) {
            post_office.post(shard, Envelope::Commands(commands));
        }
    }
}

fn spawn(
    shard: ShardId,
    owner: Arc<NodeRef>,
    post_office: Arc<PostOffice>,
    login: Arc<PeerLogin>,
) -> std::io::Result<ForwarderHandle> {
    // At most QUEUE_BOUND SENDs are queued, in batches of at least one.
    let (sender, jobs) = crossbeam_channel::bounded(QUEUE_BOUND);
    let queued = Arc::new(AtomicUsize::new(0));
    let wake = QueueWake::new()?;
    let forwarder = Forwarder::new(owner.clone(), jobs, queued.clone(), wake.clone(), post_office, login);
    std::thread::Builder::new().name(format!("mbws-fwd-{}-{}", shard.0, owner.name)).spawn(move || forwarder.run())?;
    Ok(ForwarderHandle { jobs: sender, queued, wake })
}

/// Opens a reliable, binary session to `owner` for a forwarder or a relay: logged in with the
/// node's [`PeerLogin`], resumed within [`RESUME_WINDOW`] after a lost connection (after that,
/// the caller's backoff paces the retries). A refused login says what to do.
pub(super) fn connect_to_owner(owner: &NodeRef, login: &PeerLogin) -> Result<Client, String> {
    let mut options = ClientOptions {
        subprotocol: Subprotocol::Reliable,
        binding: Binding::Binary,
        timeout: WAIT_BOUND,
        reconnect: Some(RESUME_WINDOW),
        // A cluster link: the owner never forwards what comes over it (one hop at most).
        headers: vec![(LINK_HEADER.into(), "1".into())],
        ..ClientOptions::default()
    };
    login.apply(&mut options);
    Client::connect(&owner.url, options).map_err(|error| match error {
        ClientError::Broker(refusal) if refusal.code == ErrorCode::Unauthenticated as u16 => format!(
            "it refused this node's login ({} {}): give every node --cluster-login and --cluster-passcode of a \
             user or token the nodes accept",
            refusal.code,
            String::from_utf8_lossy(&refusal.reason)
        ),
        error => format!("connecting: {error}"),
    })
}

/// One forwarder's thread state.
struct Forwarder {
    owner: Arc<NodeRef>,
    login: Arc<PeerLogin>,
    jobs: Receiver<Vec<Job>>,
    /// SENDs in `jobs`' batches (see [`ForwarderHandle::queued`]).
    queued: Arc<AtomicUsize>,
    wake: QueueWake,
    post_office: Arc<PostOffice>,
    client: Option<Client>,
    /// The last wait found the session's socket readable.
    readable: bool,
    /// The last round left work it can do without waiting (frames read but not handled, or
    /// SENDs the window has room for).
    more_to_do: bool,
    /// Taken from the queue, not yet written.
    pending: VecDeque<Job>,
    /// Written to the owner with this session seq, not yet answered, oldest first, with when
    /// the oldest unanswered one was written.
    in_flight: VecDeque<(u64, Job)>,
    oldest_written: Option<Instant>,
    last_seq: u64,
    /// While the owner is unreachable: until when new SENDs are refused at once, and why.
    down: Option<(Instant, String)>,
    backoff: Duration,
    answers: Answers,
}

impl Forwarder {
    fn new(
        owner: Arc<NodeRef>,
        jobs: Receiver<Vec<Job>>,
        queued: Arc<AtomicUsize>,
        wake: QueueWake,
        post_office: Arc<PostOffice>,
        login: Arc<PeerLogin>,
    ) -> Forwarder {
        Forwarder {
            owner,
            login,
            jobs,
            queued,
            wake,
            post_office,
            client: None,
            readable: false,
            more_to_do: false,
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
            oldest_written: None,
            last_seq: 0,
            down: None,
            backoff: FIRST_BACKOFF,
            answers: Answers::default(),
        }
    }

    /// Until every sender (the shard's pool) is gone: one round (the queue, the writes, the
    /// owner's answers), then a wait for the next thing to do.
    fn run(mut self) {
        loop {
            if !self.take_queued() {
                return;
            }
            if let Err(reason) = self.step() {
                self.fail(reason);
            }
            self.answers.post(&self.post_office);
            self.wait();
        }
    }

    /// Waits until the session's socket is readable, the queue has a SEND, or a RECEIPT is
    /// due; not at all when the last round left work.
    fn wait(&mut self) {
        let timeout = if self.more_to_do {
            Duration::ZERO
        } else {
            match self.oldest_written {
                Some(written) => {
                    (written + WAIT_BOUND).saturating_duration_since(Instant::now()) + Duration::from_millis(1)
                }
                None => IDLE_TICK,
            }
        };
        let jobs = &self.jobs;
        self.readable = self.wake.wait(self.client.as_ref().map(Client::socket_fd), timeout, || !jobs.is_empty());
    }

    /// Moves the batches waiting in the channel to `pending`, while it holds fewer than
    /// [`QUEUE_BOUND`] SENDs; false once every sender is gone.
    fn take_queued(&mut self) -> bool {
        while self.pending.len() < QUEUE_BOUND {
            match self.jobs.try_recv() {
                Ok(jobs) => {
                    self.queued.fetch_sub(jobs.len(), Ordering::AcqRel);
                    self.pending.extend(jobs);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    /// Connects if needed, writes what fits the window, reads the owner's answers.
    fn step(&mut self) -> Result<(), String> {
        self.more_to_do = false;
        if let Some((until, reason)) = &self.down {
            if Instant::now() < *until {
                let reason = reason.clone();
                self.owner.counters.refused(self.pending.len() as u64);
                for job in std::mem::take(&mut self.pending) {
                    self.answers.refuse(job, ErrorCode::Unavailable, reason.clone());
                }
                return Ok(());
            }
        }
        if self.client.is_none() {
            if self.pending.is_empty() {
                return Ok(());
            }
            self.connect()?;
        }
        self.write_window()?;
        if let Err(reason) = self.read_answers() {
            if !self.in_flight.is_empty() || !self.pending.is_empty() {
                return Err(reason);
            }
            // Nothing is held, so nothing is refused; the next SEND opens a new session.
            log!(Level::Info, "forwarding to cluster node \"{}\": the idle session ended ({reason}); the next SEND \
                opens a new one", self.owner.name; node = self.owner.name);
            self.client = None;
            return Ok(());
        }
        if self.oldest_written.is_some_and(|written| written.elapsed() > WAIT_BOUND) {
            return Err(format!("no RECEIPT for {} SENDs within {} ms", self.in_flight.len(), WAIT_BOUND.as_millis()));
        }
        // Receipts read may have opened the window for SENDs still pending.
        let client = self.client.as_ref().expect("connected above");
        let window = u64::from(client.opened().limits.max_inflight_sends.max(1));
        if !self.pending.is_empty() && self.last_seq - client.receipted_seq() < window {
            self.more_to_do = true;
        }
        Ok(())
    }

    /// Writes the pending SENDs the owner's window has room for, in one flush.
    fn write_window(&mut self) -> Result<(), String> {
        let client = self.client.as_mut().expect("connected");
        let window = u64::from(client.opened().limits.max_inflight_sends.max(1));
        let mut wrote = false;
        while self.last_seq - client.receipted_seq() < window {
            let Some(job) = self.pending.pop_front() else { break };
            self.last_seq = client
                .send_tail(job.message.durable, remaining_ttl_ms(&job.message), job.message.tail())
                .map_err(|error| format!("sending: {error}"))?;
            self.in_flight.push_back((self.last_seq, job));
            wrote = true;
        }
        if wrote {
            client.flush().map_err(|error| format!("sending: {error}"))?;
            self.oldest_written.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Reads what the socket holds if the wait found it readable, and handles the frames read
    /// (at most [`FRAMES_PER_ROUND`]): RECEIPTs answer the SENDs they cover, ERRORs refuse theirs.
    fn read_answers(&mut self) -> Result<(), String> {
        let client = self.client.as_mut().expect("connected");
        if std::mem::take(&mut self.readable) {
            client.read_available(READ_AFTER_READABLE).map_err(|error| format!("waiting for RECEIPTs: {error}"))?;
        }
        for _ in 0..FRAMES_PER_ROUND {
            let client = self.client.as_mut().expect("connected");
            match client.next_read_frame() {
                Ok(Some(Frame::Receipt(receipt))) => {
                    let mut receipted = 0;
                    while self.in_flight.front().is_some_and(|(seq, _)| *seq <= receipt.seq) {
                        let (_, job) = self.in_flight.pop_front().expect("checked");
                        self.answers.accepted(&job);
                        receipted += 1;
                    }
                    self.owner.counters.forwarded(receipted);
                    self.oldest_written = (!self.in_flight.is_empty()).then(Instant::now);
                }
                Ok(Some(Frame::Error(error))) if !error.fatal && error.seq != 0 => {
                    if let Some(index) = self.in_flight.iter().position(|(seq, _)| *seq == error.seq) {
                        let (_, job) = self.in_flight.remove(index).expect("found");
                        let code = ErrorCode::from_u16(error.code).unwrap_or(ErrorCode::Internal);
                        self.owner.counters.refused(1);
                        self.answers.refuse(job, code, String::from_utf8_lossy(&error.reason).into_owned());
                    }
                }
                Ok(Some(Frame::Error(error))) => {
                    return Err(format!(
                        "the session was ended with {} {}",
                        error.code,
                        String::from_utf8_lossy(&error.reason)
                    ))
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(ClientError::Interrupted) => return Ok(()),
                Err(error) => return Err(format!("waiting for RECEIPTs: {error}")),
            }
        }
        self.more_to_do = true;
        Ok(())
    }

    fn connect(&mut self) -> Result<(), String> {
        let client = connect_to_owner(&self.owner, &self.login)?;
        log!(Level::Info, "forwarding to cluster node \"{}\" ({}): session open", self.owner.name, self.owner.url;
            node = self.owner.name);
        self.client = Some(client);
        self.last_seq = 0;
        self.backoff = FIRST_BACKOFF;
        self.down = None;
        Ok(())
    }

    /// The owner cannot be reached: everything held is refused with 4503 naming it, and new
    /// SENDs are refused at once until the backoff has passed.
    fn fail(&mut self, reason: String) {
        let reason = format!(
            "cluster node \"{}\" ({}), which owns the address, cannot be reached: {reason}; the SEND may or may not \
             have been taken there: try again",
            self.owner.name, self.owner.url
        );
        log!(Level::Warn, "forwarding to cluster node \"{}\": {reason}; {} SENDs refused with 4503, next attempt in {} ms",
            self.owner.name, self.in_flight.len() + self.pending.len(), self.backoff.as_millis(); node = self.owner.name);
        self.owner.counters.refused((self.in_flight.len() + self.pending.len()) as u64);
        for (_, job) in std::mem::take(&mut self.in_flight) {
            self.answers.refuse(job, ErrorCode::Unavailable, reason.clone());
        }
        for job in std::mem::take(&mut self.pending) {
            self.answers.refuse(job, ErrorCode::Unavailable, reason.clone());
        }
        self.client = None;
        self.oldest_written = None;
        self.down = Some((Instant::now() + self.backoff, reason));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// What remains of `message`'s time to live, for the SEND that carries it on (0: none).
fn remaining_ttl_ms(message: &SharedMessage) -> u32 {
    match message.expires_at_ms {
        0 => 0,
        at => at.saturating_sub(crate::clock::now_ms()).clamp(1, u64::from(u32::MAX)) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{ConnId, StoredMessage};
    use crate::mbws::binary::MessageTail;

    fn job(shard: u16, conn: u32, seq: u64) -> Job {
        let tail = MessageTail::encode(b"a", &Default::default(), b"body");
        Job {
            publisher: ConnRef { shard: ShardId(shard), conn: ConnId { index: conn, generation: 0 } },
            seq,
            message: SharedMessage::new(StoredMessage::new(tail, false, 0, false)),
        }
    }

    fn answers_of(answers: &Answers, shard: u16) -> Vec<String> {
        let (_, commands) = answers.by_shard.iter().find(|(entry, _)| entry.0 == shard).expect("the shard's answers");
        commands
            .iter()
            .map(|command| match command {
                Command::Conn(ConnCommand::PublishesAccepted { publisher, first_seq, count }) => {
                    format!("{} accepted {first_seq}+{count}", publisher.index)
                }
                Command::Conn(ConnCommand::PublishDone { publisher, seq, outcome }) => {
                    format!("{} done {seq} {}", publisher.index, outcome.is_ok())
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// RECEIPTed SENDs are answered in runs: one command per run of one publisher's
    /// consecutive SENDs, in the order they were answered, a refusal or another publisher's
    /// answer in between starting a new run; unnumbered SENDs (seq 0) count.
    #[test]
    fn receipted_sends_are_answered_in_runs_of_one_publishers_consecutive_sends_in_order() {
        let mut answers = Answers::default();
        for (shard, conn, seq) in [(0, 1, 5), (0, 1, 6), (0, 1, 7), (1, 9, 3), (0, 1, 8), (0, 2, 1), (0, 1, 9)] {
            answers.accepted(&job(shard, conn, seq));
        }
        answers.refuse(job(0, 1, 10), ErrorCode::Overloaded, "full".into());
        for seq in [11, 13, 0, 0] {
            answers.accepted(&job(0, 1, seq));
        }
        answers.accepted(&job(0, 3, 0));
        answers.accepted(&job(0, 3, 0));
        assert_eq!(
            answers_of(&answers, 0),
            [
                "1 accepted 5+4",
                "2 accepted 1+1",
                "1 accepted 9+1",
                "1 done 10 false",
                "1 accepted 11+1",
                "1 accepted 13+1",
                "1 accepted 0+2",
                "3 accepted 0+2"
            ]
        );
        assert_eq!(answers_of(&answers, 1), ["9 accepted 3+1"]);
    }
}
