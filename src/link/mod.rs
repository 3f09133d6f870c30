//! Links: MBWS sessions from this broker to another broker, which carry messages one way
//! (the RabbitMQ shovel, the mosquitto bridge). Configured as `[[link]]` sections
//! ([`config`]); described for operators in docs/CLUSTER.md, "Links".
//!
//! **What a link owns.** One thread (`mbws-link-NAME`) and two MBWS sessions, both opened with
//! the blocking client of `mbws-client` on the reliable subprotocol `MBWS.huawei.com`, which
//! resumes a session transparently after a lost connection (resends unreceipted SENDs,
//! repeats ACKs, drops deliveries it has seen):
//! - the **source** session subscribes (client ack, credit `max-in-flight`) to the link's
//!   addresses where the messages are: this broker for `direction = "out"` (over loopback, to
//!   its own listener, as any client), the remote broker for `"in"`;
//! - the **sink** session sends them on where they go: the remote broker for `"out"`, this
//!   broker for `"in"`, to `target-prefix + address` (or the `rename` table's name).
//!
//! **How messages enter and leave.** The thread repeats one round (`Pump::round`): take up
//! to a batch of MESSAGEs from the source (at most the credit, and at most the sink's
//! `max-inflight-sends`), SEND each to the sink (properties, headers, body and the durable flag
//! as they came; the hop count in the header [`HOPS_HEADER`] one higher), wait for the sink's
//! RECEIPT covering the last one, and only then settle the deliveries at the source: ACK what
//! the sink took, NACK with requeue what it refused for want of room (4429, retried after a
//! pause), NACK without requeue (dead-letter) what it refused for good (4403, 4413) and what
//! crossed `max-hops` links already.
//!
//! **Invariants.** A delivery is acknowledged at the source only after the sink's RECEIPT
//! covers its SEND, so a message is never settled here before the far side holds it (for a
//! durable address there, after its fsync): nothing receipted is lost when the link drops.
//! Both sessions resume with their numbering intact, so a dropped connection repeats nothing:
//! a resent SEND is dropped by the sink's broker as a duplicate, a resent MESSAGE by the client.
//! The order of the source's deliveries is the order of the SENDs (one thread, one session
//! each way), so a publisher's order to one address is kept, except for a message refused and
//! requeued. Bounded: at most `max-in-flight` deliveries are held, one batch of SENDs is kept
//! for resending, and every wait is bounded by `timeout-ms`.
//!
//! **When a session cannot be resumed** (the far broker restarted and lost it, or the outage
//! outlasted its `session-expiry-ms`), the link closes both sessions (the source's unsettled
//! deliveries go back to their queue), waits with exponential backoff and jitter (capped by
//! `reconnect-max-ms`) and opens new ones. SENDs the sink's broker had taken but not yet
//! receipted to us may then be forwarded twice; this is the only way a link duplicates.
//!
//! Why threads and the blocking client (rather than a monoio task in a shard with a sans-IO
//! client): the client already implements resume and is tested against the broker under
//! faults; a link is a handful of threads per broker, off the shards; and the loopback session
//! into this broker goes through the same checks (limits, ACL, durability) as any client, so
//! a link cannot take a message the broker would not. The cost is one loopback hop per message
//! on this side, and one batch in flight per round trip (not yet measured: docs/CLUSTER.md,
//! "Figures").
//!
//! Visibility: a log line on every state change (connecting, up, resumed, down with the reason,
//! with the lag), [`LinkStatus`] for the admin API (`GET /api/links`) and the `mbws_link_*`
//! metrics.

pub mod config;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mbws_client::{Client, ClientError, ClientOptions};

pub use config::{Direction, LinkSection, LinkSpec};

use crate::log;
use crate::logging::Level;
use crate::mbws::{self, AckMode, Binding, ErrorCode, Frame, Subprotocol};

/// The application header that counts the links a message has crossed (the loop guard).
pub const HOPS_HEADER: &str = "x-mbws-link-hops";

/// How long a round waits for the first MESSAGE before it looks at the stop flag again.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// How long a round waits for each further MESSAGE of a batch (they are usually in the buffer).
const BATCH_GATHER_WAIT: Duration = Duration::from_micros(500);
/// How long a session keeps trying to resume a lost connection before the link gives it up
/// and opens new sessions (capped by the broker's `session-expiry-ms`).
const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// First pause before opening new sessions again; doubled per failure up to `reconnect-max-ms`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Pause before a batch refused for want of room (4429) is tried again.
const FULL_PAUSE: Duration = Duration::from_millis(100);

/// A link's state, as the admin API and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    Connecting = 0,
    Up = 1,
    Down = 2,
    Stopped = 3,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Stopped => "stopped",
        }
    }

    fn from_u8(value: u8) -> LinkState {
        match value {
            0 => LinkState::Connecting,
            1 => LinkState::Up,
            2 => LinkState::Down,
            _ => LinkState::Stopped,
        }
    }
}

/// What a link shows: written by its thread, read by the admin API (plain atomics; the
/// reason of the last failure behind a mutex that only state changes take).
pub struct LinkStatus {
    pub spec: LinkSpec,
    started: Instant,
    state: AtomicU8,
    /// Milliseconds since `started` at the last state change.
    state_since_ms: AtomicU64,
    last_error: Mutex<String>,
    /// Messages the sink receipted and the source was told (ACK) since start.
    pub forwarded: AtomicU64,
    /// Body bytes of those.
    pub forwarded_bytes: AtomicU64,
    /// SENDs the sink refused (requeued at the source or dead-lettered).
    pub refused: AtomicU64,
    /// Messages not forwarded because they had crossed `max-hops` links (dead-lettered).
    pub hops_exceeded: AtomicU64,
    /// Lost connections a session resumed over, and new session pairs opened after the first.
    pub resumes: AtomicU64,
    pub restarts: AtomicU64,
    /// Deliveries taken from the source and not yet settled there (the lag the link holds).
    pub in_flight: AtomicU64,
    /// Milliseconds since `started` when the oldest of those was taken (0: none held).
    oldest_in_flight_ms: AtomicU64,
}

impl LinkStatus {
    fn new(spec: LinkSpec) -> LinkStatus {
        LinkStatus {
            spec,
            started: Instant::now(),
            state: AtomicU8::new(LinkState::Connecting as u8),
            state_since_ms: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            hops_exceeded: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            oldest_in_flight_ms: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// How long the link has been in its state.
    pub fn state_age(&self) -> Duration {
        self.since_start().saturating_sub(Duration::from_millis(self.state_since_ms.load(Ordering::Relaxed)))
    }

    /// The reason of the last failure ("" if none yet).
    pub fn last_error(&self) -> String {
        self.last_error.lock().map(|reason| reason.clone()).unwrap_or_default()
    }

    /// How long the oldest unsettled delivery has waited (zero if none).
    pub fn oldest_wait(&self) -> Duration {
        match self.oldest_in_flight_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            taken => self.since_start().saturating_sub(Duration::from_millis(taken)),
        }
    }

    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    fn set_state(&self, state: LinkState, error: Option<&str>) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.state_since_ms.store(self.since_start().as_millis() as u64, Ordering::Relaxed);
        if let (Some(error), Ok(mut last)) = (error, self.last_error.lock()) {
            *last = error.to_string();
        }
    }

    fn hold(&self, count: usize) {
        self.in_flight.store(count as u64, Ordering::Relaxed);
        // Never 0 while something is held (0 means none).
        let now = (self.since_start().as_millis() as u64).max(1);
        self.oldest_in_flight_ms.store(if count == 0 { 0 } else { now }, Ordering::Relaxed);
    }

    /// `in_flight=N oldest_wait_ms=M`, for log lines.
    fn lag(&self) -> String {
        format!(
            "in_flight={} oldest_wait_ms={}",
            self.in_flight.load(Ordering::Relaxed),
            self.oldest_wait().as_millis()
        )
    }
}

/// The links of a running broker.
#[derive(Default)]
pub struct Links {
    statuses: Vec<Arc<LinkStatus>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// How a link reaches this broker: its own listener over loopback.
#[derive(Debug, Clone)]
pub struct LocalBroker {
    /// `ws://127.0.0.1:PORT/` (or the `[::1]` form) for a plain listener.
    pub url: String,
}

impl LocalBroker {
    /// The loopback URL of a broker listening on `listen`; `tls`: it serves `wss://` only, which
    /// links do not reach over loopback yet (the certificate names a host, not 127.0.0.1).
    pub fn for_listener(listen: std::net::SocketAddr, tls: bool) -> Result<LocalBroker, String> {
        if tls {
            return Err("[[link]] sections need a plain ws:// listener to reach this broker over loopback, and \
                        --tls-cert makes it wss:// only; run the links on a broker without TLS (put TLS in front, \
                        docs/CLUSTER.md \"Links\") or remove the [[link]] sections"
                .into());
        }
        let host = match listen.ip() {
            ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_string(),
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            std::net::IpAddr::V4(ip) => ip.to_string(),
        };
        Ok(LocalBroker { url: format!("ws://{host}:{}/", listen.port()) })
    }
}

impl Links {
    /// Starts one thread per link.
    pub fn start(specs: &[LinkSpec], local: &LocalBroker) -> std::io::Result<Links> {
        let mut links = Links::default();
        for spec in specs {
            let status = Arc::new(LinkStatus::new(spec.clone()));
            let (thread_status, stop, local) = (status.clone(), links.stop.clone(), local.clone());
            let thread = std::thread::Builder::new()
                .name(format!("mbws-link-{}", spec.name))
                .spawn(move || run(&thread_status, &local, &stop))?;
            links.statuses.push(status);
            links.threads.push(thread);
        }
        Ok(links)
    }

    pub fn statuses(&self) -> Vec<Arc<LinkStatus>> {
        self.statuses.clone()
    }

    /// Asks every link to finish its round and close its sessions, waiting at most `grace`.
    pub fn stop(self, grace: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + grace;
        for thread in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// The link's thread: new sessions, rounds until one fails, backoff, again; until stopped.
fn run(status: &LinkStatus, local: &LocalBroker, stop: &AtomicBool) {
    let spec = &status.spec;
    let mut backoff = FIRST_BACKOFF;
    let mut jitter = Jitter::seeded(spec.name.as_bytes());
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        status.set_state(LinkState::Connecting, None);
        log!(Level::Info, "link {}: connecting to {} ({} {})", spec.name, spec.url, spec.direction.name(), spec.addresses.join(",");
            link = spec.name, state = "connecting");
        if !first {
            status.restarts.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let failure = match Pump::open(status, local) {
            Ok(mut pump) => {
                status.set_state(LinkState::Up, None);
                backoff = FIRST_BACKOFF;
                log!(Level::Info, "link {}: up ({} {} -> {}), {}", spec.name, spec.direction.name(), pump.source_name(), pump.sink_name(), status.lag();
                    link = spec.name, state = "up");
                let failure = pump.run(stop);
                pump.close();
                failure
            }
            Err(failure) => Some(failure),
        };
        status.hold(0);
        let Some(reason) = failure else { break };
        status.set_state(LinkState::Down, Some(&reason));
        let pause = jitter.spread(backoff);
        log!(Level::Warn, "link {}: down: {reason}; new sessions in {} ms, {}", spec.name, pause.as_millis(), status.lag();
            link = spec.name, state = "down");
        let until = Instant::now() + pause;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(IDLE_WAIT));
        }
        backoff = (backoff * 2).min(spec.reconnect_max);
    }
    status.set_state(LinkState::Stopped, None);
    log!(Level::Info, "link {}: stopped", spec.name; link = spec.name, state = "stopped");
}

/// A source and a sink session, and what a round does with them.
struct Pump<'a> {
    status: &'a LinkStatus,
    source: Client,
    sink: Client,
    /// Resumes seen so far on each session (a change is logged).
    resumes_seen: (u64, u64),
    /// Most SENDs in one round: the credit, and the sink's `max-inflight-sends`.
    batch_limit: usize,
    /// The session that failed the link, if one did: `close` leaves it alone (a CLOSE on it
    /// would only wait for a resume that does not come).
    failed: std::cell::Cell<Option<Side>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Sink,
}

/// One delivery of a round and what became of it.
enum Outcome {
    /// SENT with this seq (receipted unless refused).
    Sent(u64),
    /// Crossed `max-hops` links already: dead-lettered at the source.
    TooManyHops,
}

impl<'a> Pump<'a> {
    /// Opens the sink, then the source with its subscriptions (so nothing is taken before it
    /// can go somewhere).
    fn open(status: &'a LinkStatus, local: &LocalBroker) -> Result<Pump<'a>, String> {
        let spec = &status.spec;
        let remote = ClientOptions {
            subprotocol: Subprotocol::Reliable,
            binding: Binding::Binary,
            timeout: spec.timeout,
            reconnect: Some(RESUME_WINDOW),
            ca_file: spec.ca_file.clone(),
            login: spec.login.clone(),
            passcode: spec.passcode.as_ref().map(|secret| secret.expose().to_string()).unwrap_or_default(),
            ..ClientOptions::default()
        };
        let here = ClientOptions {
            login: spec.local_login.clone(),
            passcode: spec.local_passcode.as_ref().map(|secret| secret.expose().to_string()).unwrap_or_default(),
            ca_file: None,
            ..remote.clone()
        };
        let (source_url, source_options, sink_url, sink_options) = match spec.direction {
            Direction::Out => (&local.url, here, &spec.url, remote),
            Direction::In => (&spec.url, remote, &local.url, here),
        };
        let sink = Client::connect(sink_url, sink_options).map_err(|error| format!("{sink_url}: {error}"))?;
        let mut source =
            Client::connect(source_url, source_options).map_err(|error| format!("{source_url}: {error}"))?;
        for (index, address) in spec.addresses.iter().enumerate() {
            source
                .subscribe(index as u32 + 1, address, spec.mode, AckMode::Client, spec.max_in_flight)
                .map_err(|error| format!("{source_url}: subscribing to \"{address}\": {error}"))?;
        }
        let sink_window = sink.opened().limits.max_inflight_sends.max(1) as usize;
        Ok(Pump {
            status,
            source,
            sink,
            resumes_seen: (0, 0),
            batch_limit: (spec.max_in_flight as usize).min(sink_window),
            failed: std::cell::Cell::new(None),
        })
    }

    fn source_name(&self) -> &str {
        match self.status.spec.direction {
            Direction::Out => "here",
            Direction::In => &self.status.spec.url,
        }
    }

    fn sink_name(&self) -> &str {
        match self.status.spec.direction {
            Direction::Out => &self.status.spec.url,
            Direction::In => "here",
        }
    }

    /// Rounds until stopped (`None`) or a session fails (`Some(reason)`).
    fn run(&mut self, stop: &AtomicBool) -> Option<String> {
        while !stop.load(Ordering::Relaxed) {
            if let Err(reason) = self.round() {
                return Some(reason);
            }
            self.note_resumes();
        }
        None
    }

    /// Logs a resume of either session (the client resumed it inside a call).
    fn note_resumes(&mut self) {
        let seen = (self.source.reconnects(), self.sink.reconnects());
        if seen != self.resumes_seen {
            let new = (seen.0 - self.resumes_seen.0) + (seen.1 - self.resumes_seen.1);
            self.status.resumes.fetch_add(new, Ordering::Relaxed);
            let which = if seen.0 != self.resumes_seen.0 { self.source_name() } else { self.sink_name() };
            let spec = &self.status.spec;
            log!(Level::Info, "link {}: resumed the session with {which} after a lost connection ({} resumes so far), {}",
                spec.name, self.status.resumes.load(Ordering::Relaxed), self.status.lag();
                link = spec.name, state = "resumed");
            self.resumes_seen = seen;
        }
    }

    /// Takes a batch from the source, sends it to the sink, waits for the RECEIPT, settles.
    fn round(&mut self) -> Result<(), String> {
        let batch = self.gather()?;
        if batch.is_empty() {
            return Ok(());
        }
        self.status.hold(batch.len());
        let spec = &self.status.spec;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut last_seq = 0;
        for message in &batch {
            let hops = hops_of(message);
            if hops >= spec.max_hops {
                outcomes.push(Outcome::TooManyHops);
                continue;
            }
            let send = self.forwarded(message, hops + 1);
            last_seq = self.sink.send_message(send).map_err(|error| self.sink_failure("sending", error))?;
            outcomes.push(Outcome::Sent(last_seq));
        }
        let refused = self.wait_receipt(last_seq)?;
        self.settle(&batch, &outcomes, &refused)
    }

    /// Up to `batch_limit` MESSAGEs: the first within [`IDLE_WAIT`], the rest as they come.
    fn gather(&mut self) -> Result<Vec<mbws::Message>, String> {
        let mut batch = Vec::new();
        let mut wait = IDLE_WAIT;
        while batch.len() < self.batch_limit {
            match self.source.next_message(wait) {
                Ok(Some(message)) => batch.push(message),
                Ok(None) => break,
                Err(error) => return Err(self.source_failure("consuming", error)),
            }
            wait = BATCH_GATHER_WAIT;
        }
        Ok(batch)
    }

    /// The SEND that carries `message` on, with its hop count.
    fn forwarded(&self, message: &mbws::Message, hops: u32) -> mbws::Send {
        let source = String::from_utf8_lossy(&message.address);
        let mut properties = message.properties.clone();
        properties.headers.retain(|(name, _)| name.as_ref() != HOPS_HEADER.as_bytes());
        properties.headers.push((Bytes::from_static(HOPS_HEADER.as_bytes()), Bytes::from(hops.to_string())));
        mbws::Send {
            seq: 0, // The client numbers it.
            address: Bytes::from(self.status.spec.target_of(&source)),
            durable: message.durable,
            ttl_ms: 0,
            properties,
            body: message.body.clone(),
        }
    }

    /// Reads the sink until its RECEIPT covers `last_seq`; returns the refused seqs and codes.
    fn wait_receipt(&mut self, last_seq: u64) -> Result<Vec<(u64, u16)>, String> {
        let mut refused = Vec::new();
        let deadline = Instant::now() + self.status.spec.timeout;
        while self.sink.receipted_seq() < last_seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.failed.set(Some(Side::Sink));
                return Err(format!(
                    "{}: no RECEIPT for SEND {last_seq} within {} ms (timeout-ms)",
                    self.sink_name(),
                    self.status.spec.timeout.as_millis()
                ));
            }
            match self.sink.next_frame(left) {
                Ok(Frame::Error(error)) if !error.fatal && error.seq != 0 => refused.push((error.seq, error.code)),
                Ok(Frame::Error(error)) => {
                    return Err(self.sink_failure("waiting for a RECEIPT", ClientError::Broker(error)))
                }
                Ok(_) => {}
                Err(ClientError::Timeout(_)) => {}
                Err(error) => return Err(self.sink_failure("waiting for a RECEIPT", error)),
            }
        }
        Ok(refused)
    }

    /// ACKs what the sink took, NACKs the rest (see the module doc), and flushes.
    fn settle(&mut self, batch: &[mbws::Message], outcomes: &[Outcome], refused: &[(u64, u16)]) -> Result<(), String> {
        let all_taken = refused.is_empty() && outcomes.iter().all(|outcome| matches!(outcome, Outcome::Sent(_)));
        let mut taken = 0u64;
        let mut taken_bytes = 0u64;
        let mut full = false;
        if all_taken {
            let last = batch.last().expect("a round settles a non-empty batch");
            self.source.ack(last.delivery_seq, true).map_err(|error| self.source_failure("acknowledging", error))?;
            taken = batch.len() as u64;
            taken_bytes = batch.iter().map(|message| message.body.len() as u64).sum();
        } else {
            for (message, outcome) in batch.iter().zip(outcomes) {
                let requeue = match outcome {
                    Outcome::TooManyHops => {
                        self.status.hops_exceeded.fetch_add(1, Ordering::Relaxed);
                        log!(Level::Warn, "link {}: a message to \"{}\" crossed {} links already (max-hops): dead-lettered, \
                              not forwarded; check the links of both brokers for a loop",
                            self.status.spec.name, String::from_utf8_lossy(&message.address), hops_of(message);
                            link = self.status.spec.name);
                        false
                    }
                    Outcome::Sent(seq) => match refused.iter().find(|(refused_seq, _)| refused_seq == seq) {
                        None => {
                            taken += 1;
                            taken_bytes += message.body.len() as u64;
                            self.source
                                .ack(message.delivery_seq, false)
                                .map_err(|error| self.source_failure("acknowledging", error))?;
                            continue;
                        }
                        Some((_, code)) => {
                            self.status.refused.fetch_add(1, Ordering::Relaxed);
                            let requeue = [ErrorCode::Overloaded, ErrorCode::Internal, ErrorCode::Unavailable]
                                .iter()
                                .any(|retry| *code == *retry as u16);
                            full |= requeue;
                            requeue
                        }
                    },
                };
                // The client repeats a NACK after a resume, before the ACKs that follow it.
                self.source
                    .nack(message.delivery_seq, requeue)
                    .map_err(|error| self.source_failure("settling", error))?;
            }
        }
        self.source.flush().map_err(|error| self.source_failure("settling", error))?;
        self.status.forwarded.fetch_add(taken, Ordering::Relaxed);
        self.status.forwarded_bytes.fetch_add(taken_bytes, Ordering::Relaxed);
        self.status.hold(0);
        if full {
            // The sink's queue is full: let it drain before the requeued messages come back.
            std::thread::sleep(FULL_PAUSE);
        }
        Ok(())
    }

    fn sink_failure(&self, doing: &str, error: ClientError) -> String {
        self.failed.set(Some(Side::Sink));
        format!("{} ({doing}): {error}", self.sink_name())
    }

    fn source_failure(&self, doing: &str, error: ClientError) -> String {
        self.failed.set(Some(Side::Source));
        format!("{} ({doing}): {error}", self.source_name())
    }

    /// Ends the sessions that did not fail (CLOSE, bounded by the client's timeout): the
    /// source's unsettled deliveries go back to their queue at once instead of after the
    /// session expiry. A failed session is dropped; its broker ends it at its expiry.
    fn close(self) {
        let failed = self.failed.get();
        if failed != Some(Side::Source) {
            let _ = self.source.close();
        }
        if failed != Some(Side::Sink) {
            let _ = self.sink.close();
        }
    }
}

/// The hop count a message carries (0 if it came from a client, not a link).
fn hops_of(message: &mbws::Message) -> u32 {
    message
        .properties
        .headers
        .iter()
        .find(|(name, _)| name.as_ref() == HOPS_HEADER.as_bytes())
        .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Spreads pauses over 50 % to 150 % of their length, so links that failed together do not
/// retry together (xorshift; a pause needs no cryptographic randomness).
struct Jitter(u64);

impl Jitter {
    fn seeded(name: &[u8]) -> Jitter {
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut seed = clock as u64 | 1;
        for byte in name {
            seed = seed.rotate_left(5) ^ u64::from(*byte);
        }
        Jitter(seed | 1)
    }

    fn spread(&mut self, pause: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let percent = 50 + self.0 % 101;
        pause * percent as u32 / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let mut jitter = Jitter::seeded(b"x");
        for _ in 0..1000 {
            let pause = jitter.spread(Duration::from_millis(1000));
            assert!(pause >= Duration::from_millis(500) && pause <= Duration::from_millis(1500), "{pause:?}");
        }
    }

    #[test]
    fn the_hop_count_reads_from_its_header() {
        let mut message = mbws::Message::default();
        assert_eq!(hops_of(&message), 0);
        message.properties.headers.push((Bytes::from_static(HOPS_HEADER.as_bytes()), Bytes::from_static(b"2")));
        assert_eq!(hops_of(&message), 2);
    }
}
