//! The targets a run can measure, each a sans-IO codec plus an async set-up.
//!
//! - [`mbws`]: this project's broker (MBWS or MBLWS over WebSocket), with the crate's own codecs.
//! - [`nats`]: nats-server's WebSocket endpoint, NATS text protocol (INFO, CONNECT, PUB, SUB, MSG,
//!   PING/PONG, +OK/-ERR).
//! - [`mqtt`]: mosquitto's WebSocket listener (subprotocol `mqtt`), MQTT 3.1.1 QoS 0 and 1.
//! - [`relay`]: `mbws-relay`, length-prefixed frames over plain TCP: the machine's limit.
//!
//! Set-up ([`open`]) connects, upgrades to WebSocket when the target needs it, and runs the
//! protocol's opening exchange (and subscriptions) with [`Conn`], waiting at most
//! [`SETUP_TIMEOUT`] for each answer. It returns a [`Session`]: the socket, any bytes already
//! read, and the target's [`Codec`] that the reader task then feeds with every [`Unit`] the
//! target sends. A codec reports deliveries (with their timestamps) and publish acknowledgements
//! and queues its replies (ACK, PUBACK, PONG) in the connection's outbox.
//!
//! Each message is one WebSocket frame for every WebSocket target (NATS and MQTT would accept
//! several operations per frame; one per frame gives every broker the same WebSocket work per
//! message, as with MBWS, where a frame is a message by definition).

pub(crate) mod mbws;
pub(crate) mod mqtt;
pub(crate) mod nats;
pub mod relay;

use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;

use super::cli::{Endpoint, TlsTarget};
use super::cli::{Plan, TargetKind};
use super::net;
use super::stream::Stream;
use super::wire::{Deframer, Framing, Template, Unit};
use mbws_proto::ws::handshake::{client_request, new_client_key, parse_response, verify_accept};
use mbws_proto::ws::message::DataMessage;
use mbws_proto::ws::OpCode;

/// Longest wait for any answer during set-up (upgrade, open, subscribe).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A connect the target refused or dropped (a listen backlog full while a hundred subscribers
/// connect at once, a broker a moment from listening) is tried this many times in all, waiting
/// [`CONNECT_RETRY_FIRST_WAIT`] and then twice as long each time (0.03 + 0.06 + 0.12 + 0.24 s:
/// under half a second of waiting at most), before the run fails.
pub const CONNECT_ATTEMPTS: u32 = 5;
const CONNECT_RETRY_FIRST_WAIT: Duration = Duration::from_millis(30);
/// Largest upgrade response accepted.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;
/// Largest message accepted from a target: the largest body plus generous protocol headers.
pub const MAX_INBOUND_MESSAGE_BYTES: usize = super::cli::MAX_SIZE_BYTES + 64 * 1024;

/// What set-up needs to know about the target and the run.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub light: bool,
    pub qos: u8,
    pub size: usize,
    pub credit: u32,
    pub auto_ack: bool,
    /// Makes address names and client ids unique to this run, so nothing left on a broker by
    /// an earlier run (requeued deliveries, retained sessions) can reach this one.
    pub run_id: String,
    /// `wss://`: TLS over each connection.
    pub tls: Option<TlsTarget>,
    /// Where consumers connect when not to `addr` (`--consumer-url`: other nodes of a cluster;
    /// consumer i to the (i mod N)-th).
    pub consumer_endpoints: Vec<Endpoint>,
}

impl TargetConfig {
    pub fn new(plan: &Plan, run_id: String) -> TargetConfig {
        TargetConfig {
            kind: plan.target,
            addr: plan.addr,
            host: plan.host.clone(),
            path: plan.path.clone(),
            light: plan.light,
            qos: plan.qos,
            size: plan.size,
            credit: plan.credit,
            auto_ack: plan.auto_ack,
            run_id,
            tls: plan.tls.clone(),
            consumer_endpoints: plan.consumer_endpoints.clone(),
        }
    }

    /// The address (subject, topic) with index `index`, in the target's naming style.
    pub fn address_name(&self, index: usize) -> String {
        let run = &self.run_id;
        match self.kind {
            TargetKind::Mbws => format!("bench-{run}-{index}"),
            TargetKind::Nats => format!("bench.{run}.{index}"),
            TargetKind::Mqtt => format!("bench/{run}/{index}"),
            TargetKind::Relay => String::new(),
        }
    }
}

/// What a connection does in the run.
#[derive(Debug, Clone)]
pub enum Role {
    /// Publishes to `addresses`, in turn.
    Publisher { addresses: Vec<usize>, durable: bool },
    /// Consumes `addresses`. `multicast`: every subscriber gets every message (otherwise
    /// competing consumers where the target has them); `queue_group`: NATS queue group.
    Consumer { addresses: Vec<usize>, multicast: bool, queue_group: bool },
    /// Opens a session and does nothing (connections scenario).
    Idle,
}

impl Role {
    fn letter(&self) -> char {
        match self {
            Role::Publisher { .. } => 'p',
            Role::Consumer { .. } => 'c',
            Role::Idle => 'i',
        }
    }
}

/// How a publisher's per-message counter field is numbered from the connection's message
/// index n (0, 1, 2, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterRule {
    None,
    /// n + 1 (MBWS SEND seq).
    FromOne,
    /// n mod 65535 + 1 (MQTT packet identifier, never 0).
    PacketId,
}

impl CounterRule {
    #[inline]
    pub fn value(self, index: u64) -> u64 {
        match self {
            CounterRule::None => 0,
            CounterRule::FromOne => index + 1,
            CounterRule::PacketId => index % 65_535 + 1,
        }
    }
}

/// What a publisher needs to send.
#[derive(Debug, Clone)]
pub struct PublishWire {
    /// One template per address of the role, in the role's order.
    pub templates: Vec<Template>,
    pub counter: CounterRule,
    /// Most publishes the protocol lets wait for an acknowledgement (None: no acknowledgements).
    pub window: Option<u64>,
}

/// Why a codec stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The target closed the session or the WebSocket (normal while a run is stopping).
    Closed(String),
    Protocol(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Closed(message) | Failure::Protocol(message) => message,
        }
    }
}

/// Where a codec puts what it learns from one batch of input.
pub struct Inbound<'a> {
    /// When this batch was read.
    pub now_ns: u64,
    pub framing: Framing,
    /// The connection's outbox: replies are framed into it.
    pub replies: &'a mut BytesMut,
    /// Messages delivered in this batch.
    pub deliveries: u64,
    /// Where delivery latencies go, while the run records.
    pub latency: Option<&'a mut Histogram<u64>>,
}

impl Inbound<'_> {
    /// Counts one delivered message and records its latency from the stamp in its body.
    #[inline]
    pub fn delivered(&mut self, stamp_ns: Option<u64>) {
        self.deliveries += 1;
        if let (Some(histogram), Some(stamp)) = (self.latency.as_deref_mut(), stamp_ns) {
            histogram.saturating_record(self.now_ns.saturating_sub(stamp).max(1));
        }
    }

    /// Queues one payload for the target, framed.
    pub fn reply(&mut self, payload: &[u8]) {
        self.framing.frame(self.replies, payload);
    }
}

/// The per-connection protocol state of a target.
#[derive(Debug)]
pub enum Codec {
    Mbws(mbws::MbwsCodec),
    Nats(nats::NatsCodec),
    Mqtt(mqtt::MqttCodec),
    Relay(relay::RelayCodec),
}

impl Codec {
    /// Handles one WebSocket data message lent in place (see `DataMessage`): turned into a
    /// `Bytes` only where a codec keeps it.
    pub fn on_message(&mut self, message: DataMessage<'_>, text: bool, cx: &mut Inbound<'_>) -> Result<(), Failure> {
        match self {
            Codec::Mbws(codec) => codec.on_message(message, text, cx),
            Codec::Nats(codec) => codec.on_unit(message.payload(), cx),
            Codec::Mqtt(codec) => codec.on_unit(message.payload(), cx),
            Codec::Relay(codec) => codec.on_unit(message.payload(), cx),
        }
    }

    /// Handles one payload lent in place (length-prefixed framing, no `Bytes` per message).
    pub fn on_slice(&mut self, payload: &[u8], cx: &mut Inbound<'_>) -> Result<(), Failure> {
        match self {
            Codec::Mbws(codec) => codec.on_unit(Bytes::copy_from_slice(payload), false, cx),
            Codec::Nats(codec) => codec.on_unit(payload, cx),
            Codec::Mqtt(codec) => codec.on_unit(payload, cx),
            Codec::Relay(codec) => codec.on_unit(payload, cx),
        }
    }

    /// Publishes the target has acknowledged so far (MBWS RECEIPT seq, MQTT PUBACKs, JetStream
    /// PubAcks).
    pub fn publishes_acknowledged(&self) -> u64 {
        match self {
            Codec::Mbws(codec) => codec.receipted(),
            Codec::Mqtt(codec) => codec.pubacks(),
            Codec::Nats(codec) => codec.pubacks(),
            Codec::Relay(_) => 0,
        }
    }

    /// Publishes the target refused without ending the session (MBWS ERROR 4429).
    pub fn publishes_refused(&self) -> u64 {
        match self {
            Codec::Mbws(codec) => codec.refused(),
            _ => 0,
        }
    }

    /// Queues the protocol's polite goodbye (final ACK and CLOSE, MQTT DISCONNECT).
    pub fn goodbye(&mut self, framing: Framing, out: &mut BytesMut) {
        match self {
            Codec::Mbws(codec) => codec.goodbye(framing, out),
            Codec::Mqtt(codec) => codec.goodbye(framing, out),
            Codec::Nats(_) | Codec::Relay(_) => {}
        }
    }
}

/// An open session, ready to be handed to the engine's tasks.
pub struct Session {
    pub stream: Stream,
    /// Bytes read during set-up that belong to the running phase.
    pub read_buf: BytesMut,
    pub deframer: Deframer,
    pub framing: Framing,
    pub codec: Codec,
    /// Publishers only.
    pub publish: Option<PublishWire>,
}

/// Connects and runs the target's opening exchange for `role`. `index` distinguishes the
/// connections of one run (client ids, mask keys).
pub async fn open(
    config: &TargetConfig,
    role: &Role,
    index: usize,
    source: Option<Ipv4Addr>,
) -> Result<Session, String> {
    // A consumer of a cluster run goes to its own node: the same run, another endpoint (consumer
    // `index` to the endpoints' (index mod N)-th, so subscribers spread evenly over the nodes).
    let consumer_config;
    let endpoints = &config.consumer_endpoints;
    let config = match role {
        Role::Consumer { .. } if !endpoints.is_empty() => {
            let Endpoint { addr, host, path, tls } = &endpoints[index % endpoints.len()];
            consumer_config = TargetConfig {
                addr: *addr,
                host: host.clone(),
                path: path.clone(),
                tls: tls.clone(),
                consumer_endpoints: Vec::new(),
                ..config.clone()
            };
            &consumer_config
        }
        _ => config,
    };
    let stream = connect_with_retries(config.addr, source).await.map_err(|error| match source {
        Some(source) => format!("cannot connect from {source} ({CONNECT_ATTEMPTS} attempts): {error}"),
        None => format!("cannot connect ({CONNECT_ATTEMPTS} attempts): {error}"),
    })?;
    let stream = match &config.tls {
        None => Stream::Plain(stream),
        Some(tls) => {
            let handshake = Stream::start_tls(stream, tls.config.clone(), tls.name.clone());
            match monoio::time::timeout(SETUP_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return Err(format!("TLS handshake failed: {error}")),
                Err(_) => return Err(format!("no TLS handshake within {} s", SETUP_TIMEOUT.as_secs())),
            }
        }
    };
    let seed = ((index as u64) << 8) | u64::from(role.letter() as u8);
    let framing = match config.kind {
        TargetKind::Relay => Framing::LengthPrefixed,
        _ => Framing::websocket(seed ^ crate::clock::now_ns()),
    };
    let mut conn = Conn::new(stream, framing);
    let client_id = format!("mbws-bench-{}-{}{index}", config.run_id, role.letter());
    let (codec, publish) = match config.kind {
        TargetKind::Mbws => {
            let subprotocol = if config.light {
                mbws_proto::mbws::Subprotocol::Light
            } else {
                mbws_proto::mbws::Subprotocol::Reliable
            };
            conn.upgrade(config, Some(subprotocol.name()), seed).await?;
            mbws::setup(&mut conn, config, role).await?
        }
        TargetKind::Nats => {
            conn.upgrade(config, None, seed).await?;
            nats::setup(&mut conn, config, role).await?
        }
        TargetKind::Mqtt => {
            conn.upgrade(config, Some(mqtt::SUBPROTOCOL), seed).await?;
            mqtt::setup(&mut conn, config, role, &client_id).await?
        }
        TargetKind::Relay => relay::setup(&mut conn, config, role).await?,
    };
    Ok(Session {
        stream: conn.stream,
        read_buf: conn.read_buf,
        deframer: conn.deframer,
        framing: conn.framing,
        codec,
        publish,
    })
}

/// `net::connect`, tried again after a refusal, reset or timeout, at most [`CONNECT_ATTEMPTS`]
/// times in all with doubling waits; any other error (no such address, no descriptors left)
/// fails at once.
async fn connect_with_retries(addr: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<monoio::net::TcpStream> {
    let mut wait = CONNECT_RETRY_FIRST_WAIT;
    let mut attempt = 1;
    loop {
        match net::connect(addr, source).await {
            Ok(stream) => return Ok(stream),
            Err(error) if attempt < CONNECT_ATTEMPTS && is_transient_connect_error(&error) => {
                monoio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Errors a busy or starting target gives that the same connect may not meet a moment later.
fn is_transient_connect_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::TimedOut
    )
}

/// A connection during set-up: request and answer, one at a time, with timeouts.
pub struct Conn {
    stream: Stream,
    read_buf: BytesMut,
    deframer: Deframer,
    framing: Framing,
    out: BytesMut,
    deadline: Instant,
}

impl Conn {
    fn new(stream: Stream, framing: Framing) -> Conn {
        Conn {
            stream,
            read_buf: BytesMut::with_capacity(16 * 1024),
            deframer: Deframer::for_framing(framing, MAX_INBOUND_MESSAGE_BYTES),
            framing,
            out: BytesMut::with_capacity(4096),
            deadline: Instant::now() + SETUP_TIMEOUT,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Queues one payload, framed.
    pub fn queue(&mut self, payload: &[u8]) {
        self.framing.frame(&mut self.out, payload);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = mem::take(&mut self.out);
        let (result, mut out) = self.stream.write_all(out).await;
        result.map_err(|error| format!("cannot write to the target: {error}"))?;
        out.clear();
        self.out = out;
        Ok(())
    }

    /// Restarts the set-up timeout (each answer gets its own `SETUP_TIMEOUT`).
    fn restart_deadline(&mut self) {
        self.deadline = Instant::now() + SETUP_TIMEOUT;
    }

    /// Reads more bytes, failing after the deadline or at end of stream.
    async fn read_some(&mut self, waiting_for: &str) -> Result<(), String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let buf = mem::take(&mut self.read_buf);
        match monoio::time::timeout(left, self.stream.read_more(buf)).await {
            Err(_) => Err(format!("no answer within {} s while waiting for {waiting_for}", SETUP_TIMEOUT.as_secs())),
            Ok((result, buf)) => {
                self.read_buf = buf;
                match result {
                    Ok(0) => Err(format!("the target closed the connection while we waited for {waiting_for}")),
                    Ok(_) => Ok(()),
                    Err(error) => {
                        Err(format!("reading from the target failed while we waited for {waiting_for}: {error}"))
                    }
                }
            }
        }
    }

    /// The next payload from the target (answering WebSocket pings on the way).
    pub async fn next_unit(&mut self, waiting_for: &str) -> Result<(Bytes, bool), String> {
        loop {
            match self.deframer.next(&mut self.read_buf)? {
                Some(Unit::Data { payload, text }) => return Ok((payload, text)),
                Some(Unit::Ping(payload)) => {
                    self.framing.control(&mut self.out, OpCode::Pong, &payload);
                    self.flush().await?;
                }
                Some(Unit::Pong) => {}
                Some(Unit::Close { code, reason }) => {
                    return Err(format!(
                        "the target closed the WebSocket ({code}: {reason}) while we waited for {waiting_for}"
                    ))
                }
                None => self.read_some(waiting_for).await?,
            }
        }
    }

    /// Runs the client side of the WebSocket upgrade, offering `subprotocol` if given, and
    /// checks that the target agreed to exactly that.
    async fn upgrade(&mut self, config: &TargetConfig, subprotocol: Option<&str>, seed: u64) -> Result<(), String> {
        let key = new_client_key(seed ^ crate::clock::now_ns());
        let offered: Vec<&str> = subprotocol.into_iter().collect();
        let request = client_request(&config.host, &config.path, &key, &offered);
        self.out.extend_from_slice(request.as_bytes());
        self.flush().await?;
        self.restart_deadline();
        let mut response = loop {
            let parsed = parse_response(&self.read_buf, MAX_RESPONSE_BYTES)
                .map_err(|error| format!("bad WebSocket upgrade response: {}", error.reason))?;
            if let Some((response, consumed)) = parsed {
                self.read_buf.advance(consumed);
                break response;
            }
            self.read_some("the WebSocket upgrade response").await?;
        };
        if response.status != 101 {
            return Err(format!("the target refused the WebSocket upgrade: {} {}", response.status, response.reason));
        }
        // verify_accept knows only the MBWS tokens, so the subprotocol is checked here.
        let (chosen, others): (Vec<_>, Vec<_>) =
            response.headers.into_iter().partition(|(name, _)| name.eq_ignore_ascii_case("Sec-WebSocket-Protocol"));
        response.headers = others;
        verify_accept::<mbws_proto::mbws::Subprotocol>(&response, &key)?;
        let chosen: Vec<String> = chosen.into_iter().map(|(_, value)| value.trim().to_string()).collect();
        match (subprotocol, chosen.as_slice()) {
            (None, []) => Ok(()),
            (Some(offered), [answer]) if answer == offered => Ok(()),
            (Some(offered), []) => Err(format!("the target did not accept WebSocket subprotocol {offered}")),
            _ => Err(format!("the target chose WebSocket subprotocol {chosen:?}; we offered {offered:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connect_is_tried_again_with_doubling_waits_then_reported() {
        // A port nothing listens on: every attempt is refused.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let addr = probe.local_addr().expect("its address");
        drop(probe);
        let mut runtime =
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().expect("an io_uring runtime");
        let started = Instant::now();
        let error = runtime.block_on(connect_with_retries(addr, None)).expect_err("nothing listens");
        let waited = started.elapsed();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        // Four waits between five attempts: 30 + 60 + 120 + 240 ms.
        let waits: Duration =
            (0..CONNECT_ATTEMPTS - 1).map(|attempt| CONNECT_RETRY_FIRST_WAIT * 2u32.pow(attempt)).sum();
        assert_eq!(waits, Duration::from_millis(450));
        assert!(waited >= waits, "gave up after {waited:?}, before its {waits:?} of waits");
        assert!(waited < waits + SETUP_TIMEOUT, "the retries are bounded: {waited:?}");
    }

    #[test]
    fn only_refusals_resets_and_timeouts_are_tried_again() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::ConnectionRefused, ErrorKind::ConnectionReset, ErrorKind::TimedOut] {
            assert!(is_transient_connect_error(&Error::from(kind)), "{kind:?}");
        }
        for kind in [ErrorKind::AddrNotAvailable, ErrorKind::InvalidInput, ErrorKind::PermissionDenied] {
            assert!(!is_transient_connect_error(&Error::from(kind)), "{kind:?}");
        }
    }
}
