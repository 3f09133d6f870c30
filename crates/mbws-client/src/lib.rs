//! A blocking MBWS client over `std::net::TcpStream` (`ws://`) or rustls over one (`wss://`),
//! built on this crate's own codecs.
//!
//! Used by the `mbws` command-line tool and by the integration tests (which also talk to the
//! broker through independent WebSocket implementations). It frames and masks as RFC 6455
//! requires of a client, batches outgoing frames in a write buffer (`flush` sends them), and
//! keeps frames that arrive while it waits for something else (a RECEIPT, SUBSCRIBED) so no
//! MESSAGE is lost.
//!
//! With [`ClientOptions::reconnect`] (MBWS only) the client resumes its session transparently
//! when the connection is lost: it reconnects with backoff, sends OPEN with its session id and
//! the highest delivery sequence it has seen, resends every SEND the broker has not taken
//! (from OPENED's `last-received-seq`), repeats its acknowledgements, and drops MESSAGEs whose
//! delivery sequence it has already seen, and the ERRORs of refused SENDs that a resume replays
//! for seqs it has already seen receipted. The application sees each SEND published once and
//! each delivery once. Kept for resending: the unreceipted SENDs (bounded by the broker's
//! `max_inflight_sends`, which `send` respects by waiting for receipts).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use mbws_proto::mbws::binary::{self as binary_codec, MessageTail, MessageWithTail, SEND_FIXED_BYTES};
use mbws_proto::mbws::{
    self, AckMode, Binding, CodecLimits, DeliveryMode, ErrorFrame, Frame, Limits, Opened, Subprotocol, PROTOCOL_VERSION,
};
use mbws_proto::ws::frame::encode_header;
use mbws_proto::ws::handshake;
use mbws_proto::ws::message::{close_payload, Decoder, WsEvent};
use mbws_proto::ws::{OpCode, Role};

/// Stands in for the broker's limits until its OPENED, which `connect` waits for, replaces it.
const NOT_YET_OPENED: Limits = Limits {
    max_frame_bytes: 0,
    max_address_bytes: 0,
    max_headers: 0,
    max_header_bytes: 0,
    max_credit: 0,
    max_subscriptions: 0,
    max_inflight_sends: 0,
    max_queued_messages: 0,
};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub subprotocol: Subprotocol,
    /// Binding of the frames this client sends (and so of the broker's deferred answers).
    pub binding: Binding,
    pub heartbeat_ms: u32,
    /// Bound on every wait (connect, handshake, OPENED, receipts).
    pub timeout: Duration,
    pub max_message_bytes: usize,
    /// Resume the session after a lost connection (MBWS only), retrying for at most this long
    /// (capped by the session expiry the broker announced). `None`: a lost connection is an error.
    pub reconnect: Option<Duration>,
    /// `wss://` only: the PEM file of the certificate authorities to trust (a self-signed
    /// broker's own certificate will do). `None`: the system's, [`SYSTEM_CA_FILE`].
    pub ca_file: Option<PathBuf>,
    /// Credentials sent in OPEN (docs/PROTOCOL.md): a user name and its password, or an empty
    /// `login` with a bearer token as `passcode`. Both empty: anonymous.
    pub login: String,
    pub passcode: String,
    /// More header fields for the upgrade request, name and value (e.g. the one a cluster
    /// node's links announce themselves with); neither may contain CR or LF.
    pub headers: Vec<(String, String)>,
}

/// The certificate authorities a `wss://` client trusts unless told otherwise (Debian's
/// ca-certificates bundle).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            subprotocol: Subprotocol::Reliable,
            binding: Binding::Binary,
            heartbeat_ms: 0,
            timeout: Duration::from_secs(10),
            max_message_bytes: 16 * 1024 * 1024,
            reconnect: None,
            ca_file: None,
            login: String::new(),
            passcode: String::new(),
            headers: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The URL is malformed or names something this client cannot speak.
    Url(String),
    /// TLS could not be set up or its handshake failed (the CA file, the broker's certificate).
    Tls(String),
    /// The URL's host did not resolve.
    Resolve(String),
    /// TCP connect to the broker failed (refused, unreachable, timed out).
    Connect {
        url: String,
        addr: SocketAddr,
        error: io::Error,
    },
    /// A signal interrupted a wait (the caller decides whether to stop).
    Interrupted,
    /// The URL, the upgrade or a frame from the broker was not what the protocol says.
    Protocol(String),
    /// The broker answered with ERROR.
    Broker(ErrorFrame),
    /// The broker closed the WebSocket.
    Closed {
        code: u16,
        reason: String,
    },
    /// Nothing arrived in time.
    Timeout(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(error) => write!(f, "connection error: {error}"),
            ClientError::Url(problem) => write!(f, "bad broker URL {problem}"),
            ClientError::Resolve(problem) => write!(f, "{problem}"),
            ClientError::Tls(problem) => write!(f, "TLS: {problem}"),
            ClientError::Connect { url, addr, error } => write!(
                f,
                "cannot connect to {url} ({addr}): {error}; is mbws-broker running there? \
                 (set the address with --url or MBWS_URL)"
            ),
            ClientError::Interrupted => write!(f, "interrupted by a signal"),
            ClientError::Protocol(problem) => write!(f, "protocol error: {problem}"),
            ClientError::Broker(error) => write!(
                f,
                "broker error {}{}: {}",
                error.code,
                if error.fatal { " (fatal)" } else { "" },
                String::from_utf8_lossy(&error.reason)
            ),
            ClientError::Closed { code, reason } => write!(f, "connection closed by the broker ({code}): {reason}"),
            ClientError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> Self {
        if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ClientError::Timeout("data from the broker".into())
        } else {
            ClientError::Io(error)
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The parts of a broker URL: what to dial, the `Host` header and the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `host:port` to resolve and dial (the port is 80 when the URL gives none).
    pub authority: String,
    /// `Host` header of the upgrade: the authority as the URL wrote it.
    pub host: String,
    pub path: String,
    /// `wss://`: TLS to the broker.
    pub tls: bool,
}

/// The port of a `ws://` URL that names none (RFC 6455, section 3).
pub const DEFAULT_WS_PORT: u16 = 80;
/// The port of a `wss://` URL that names none.
pub const DEFAULT_WSS_PORT: u16 = 443;

/// Checks the syntax of `ws://host[:port][/path]`, `wss://host[:port][/path]` (or
/// `host:port[/path]`, plain) without resolving it.
/// The scheme is case-insensitive. Errors name the URL and say what to give instead.
pub fn parse_url_syntax(url: &str) -> Result<BrokerUrl> {
    let bad = |problem: String| ClientError::Url(format!("\"{url}\": {problem}"));
    let (scheme, rest) = match url.find("://") {
        Some(end) => (Some(url[..end].to_ascii_lowercase()), &url[end + 3..]),
        None => (None, url),
    };
    match scheme.as_deref() {
        None | Some("ws") | Some("wss") => {}
        Some("http") | Some("https") => {
            return Err(bad(format!(
                "the scheme is {}://, a WebSocket broker URL is ws://HOST:PORT/ or wss://HOST:PORT/",
                scheme.unwrap_or_default()
            )))
        }
        Some(other) => return Err(bad(format!("unknown scheme \"{other}://\"; give ws://HOST:PORT/"))),
    }
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], rest[slash..].to_string()),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err(bad("no host; give ws://HOST:PORT/".into()));
    }
    if authority.contains('@') {
        return Err(bad("user information in the URL is not supported; give ws://HOST:PORT/".into()));
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`: split off the port if there is one.
    let (host_part, port) = if let Some(end) = authority.strip_prefix('[').and_then(|inner| inner.find(']')) {
        let after = &authority[end + 2..];
        match after.strip_prefix(':') {
            Some(port) => (&authority[..end + 2], Some(port)),
            None if after.is_empty() => (authority, None),
            None => return Err(bad(format!("\"{after}\" after the IPv6 address is not :PORT"))),
        }
    } else if scheme.is_none() && !authority.contains(':') {
        return Err(bad("give ws://HOST:PORT/ or HOST:PORT".into()));
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host_part.is_empty() {
        return Err(bad("no host; give ws://HOST:PORT/".into()));
    }
    let tls = scheme.as_deref() == Some("wss");
    let port = match port {
        None if tls => DEFAULT_WSS_PORT,
        None => DEFAULT_WS_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| bad(format!("port \"{port}\" is not a number from 1 to 65535")))?,
    };
    Ok(BrokerUrl { authority: format!("{host_part}:{port}"), host: authority.to_string(), path, tls })
}

/// Splits `ws://host:port/path` (or `host:port`) into a socket address and the parsed URL,
/// resolving the host.
pub fn parse_url(url: &str) -> Result<(SocketAddr, BrokerUrl)> {
    let parsed = parse_url_syntax(url)?;
    let authority = &parsed.authority;
    let addr = authority
        .to_socket_addrs()
        .map_err(|error| ClientError::Resolve(format!("{url}: cannot resolve \"{authority}\": {error}")))?
        .next()
        .ok_or_else(|| ClientError::Resolve(format!("{url}: \"{authority}\" resolves to no address")))?;
    Ok((addr, parsed))
}

/// The connection under the WebSocket: plain TCP, or TLS over it.
/// The connection under a client: the TCP stream, or rustls over it, and the receive timeout
/// last set on the socket (so a read sets it only when it must: see [`read_some`]).
struct Transport {
    io: TransportIo,
    /// `SO_RCVTIMEO` as last set (`None`: not set since the stream was made).
    read_wait: Option<Duration>,
}

enum TransportIo {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Transport {
    fn new(io: TransportIo) -> Transport {
        Transport { io, read_wait: None }
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            TransportIo::Plain(stream) => stream,
            TransportIo::Tls(stream) => &stream.sock,
        }
    }

    /// Makes the socket's receive timeout at most `left` (the time to the caller's deadline),
    /// calling setsockopt(2) only when the one set is longer than `left` or shorter than half
    /// of it: a read that times out early comes back to [`read_some`], which reads again
    /// until the deadline. A client that reads with the same bound over and over (a relay's
    /// [`Client::read_available`]) sets it once.
    fn bound_read_wait(&mut self, left: Duration) -> io::Result<()> {
        if self.read_wait.is_some_and(|set| set <= left && set * 2 >= left) {
            return Ok(());
        }
        // Half the time left, in whole milliseconds (the kernel's granularity is coarser
        // anyway), so that the next reads, with a little less left, keep it.
        let wait =
            if left < Duration::from_millis(2) { left } else { Duration::from_millis((left / 2).as_millis() as u64) };
        self.tcp().set_read_timeout(Some(wait))?;
        self.read_wait = Some(wait);
        Ok(())
    }

    /// One read appended to `buf`, into the room it has (`buf` must have some): straight into
    /// it from a `ws://` socket, through a zeroed window of at most [`TLS_READ_BYTES`] for
    /// `wss://` (rustls reads into an initialised slice).
    fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        debug_assert!(buf.capacity() > buf.len(), "read_into needs room in the buffer");
        match &mut self.io {
            TransportIo::Plain(stream) => {
                let room = buf.spare_capacity_mut();
                let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
                // SAFETY: recv(2) writes at most `room.len()` bytes into `room`, memory the
                // BytesMut owns and nothing else borrows; it never reads it.
                let read = unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), 0) };
                if read < 0 {
                    return Err(io::Error::last_os_error());
                }
                let read = read as usize;
                // SAFETY: the kernel initialised the `read` bytes after the buffer's length.
                unsafe { buf.set_len(buf.len() + read) };
                Ok(read)
            }
            TransportIo::Tls(stream) => {
                let start = buf.len();
                let window = (buf.capacity() - start).min(TLS_READ_BYTES);
                buf.resize(start + window, 0);
                let result = stream.read(&mut buf[start..]);
                buf.truncate(start + *result.as_ref().unwrap_or(&0));
                result
            }
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.io {
            TransportIo::Plain(stream) => stream.write(buf),
            TransportIo::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.io {
            TransportIo::Plain(stream) => stream.flush(),
            TransportIo::Tls(stream) => stream.flush(),
        }
    }
}

/// Room a read needs in the read buffer; with less, the buffer first grows by
/// [`READ_CHUNK_BYTES`].
const READ_ROOM_BYTES: usize = 4 * 1024;
/// What the read buffer grows by when it has less than [`READ_ROOM_BYTES`] of room.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most plaintext one `wss://` read takes (the window zeroed for rustls): one TLS record's.
const TLS_READ_BYTES: usize = 16 * 1024;

pub struct Client {
    stream: Transport,
    options: ClientOptions,
    addr: SocketAddr,
    url: BrokerUrl,
    read_buf: BytesMut,
    write_buf: BytesMut,
    decoder: Decoder,
    opened: Opened,
    last_seq: u64,
    receipted_seq: u64,
    /// Frames received while waiting for something else, in arrival order.
    pending: VecDeque<Frame>,
    mask_state: u64,
    /// SENDs not yet receipted, as encoded, for resending after a resume.
    unreceipted: VecDeque<(u64, KeptSend)>,
    /// Seqs above `receipted_seq` whose refusal (ERROR) was already passed on: a resume
    /// replays it, and the replay is dropped. At most the unreceipted SENDs.
    refusals_seen: Vec<u64>,
    /// Highest MESSAGE delivery sequence received: duplicates at or below it are dropped.
    last_delivery_seq: u64,
    /// Highest cumulative ACK sent, and single ACKs above it, repeated after a resume.
    acked_through: u64,
    acked_single: std::collections::BTreeSet<u64>,
    /// NACKs written (delivery sequence, requeue) that the broker is not known to have read,
    /// oldest first, repeated after a resume before the ACKs (a cumulative ACK would otherwise
    /// acknowledge what was NACKed): at most [`MAX_UNCONFIRMED_NACKS`].
    nacked: VecDeque<(u64, bool)>,
    /// The PING written after NACKs, and how many of `nacked` it covers: its PONG (the broker
    /// reads a session's frames in order) says the broker has read them.
    nack_check: Option<(u64, usize)>,
    nack_checks: u64,
    reconnects: u64,
}

/// Most NACKs a resumable client remembers until a PONG says the broker read them (16 bytes
/// each); beyond, the oldest is forgotten (written that many NACKs ago, one round trip ago
/// at least).
pub const MAX_UNCONFIRMED_NACKS: usize = 65_536;

/// The PING tokens that confirm NACKs (a counter is added): apart from a caller's own.
const NACK_CHECK_TOKEN: u64 = 0x6e61_636b << 32;

/// Folds the single ACKs that continue `acked_through` without a gap into it: once every
/// delivery up to N is acknowledged, one by one or cumulatively, "through N" says the same, so
/// a client that acknowledges in order keeps no record of single ACKs (it grew without bound),
/// and a resume repeats one cumulative ACK. Singles above a gap (a delivery not yet
/// acknowledged) stay until the gap is filled or a cumulative ACK covers them.
/// A SEND kept for resending after a resume: its payload as encoded, or (a SEND queued with
/// [`Client::send_tail`]) its fixed part and the caller's tail (a reference count, no copy).
#[derive(Clone)]
enum KeptSend {
    Encoded(Binding, Bytes),
    Tail { fixed: [u8; SEND_FIXED_BYTES], tail: MessageTail },
}

/// A frame as [`Client::next_read_incoming`] reads it: a binary MESSAGE kept whole (its tail a
/// slice of the bytes read), any other frame decoded.
#[derive(Debug)]
pub enum Incoming {
    Message(MessageWithTail),
    Frame(Frame),
}

impl Incoming {
    fn into_frame(self) -> Frame {
        match self {
            Incoming::Message(message) => Frame::Message(message.to_message()),
            Incoming::Frame(frame) => frame,
        }
    }
}

fn fold_single_acks(acked_through: &mut u64, acked_single: &mut std::collections::BTreeSet<u64>) {
    while acked_single.first() == Some(&(*acked_through + 1)) {
        acked_single.pop_first();
        *acked_through += 1;
    }
}

impl Client {
    /// Connects, upgrades, sends OPEN and waits for OPENED.
    /// With `options.reconnect`, a connection lost before OPENED is retried with backoff within
    /// the reconnect window (no session exists yet, so nothing can be lost or repeated).
    pub fn connect(url: &str, options: ClientOptions) -> Result<Client> {
        let Some(window) = options.reconnect else { return Client::connect_once(url, options) };
        let deadline = Instant::now() + window;
        let mut backoff = Duration::from_millis(5);
        loop {
            match Client::connect_once(url, options.clone()) {
                Err(
                    ClientError::Io(_)
                    | ClientError::Connect { .. }
                    | ClientError::Closed { .. }
                    | ClientError::Timeout(_),
                ) if Instant::now() + backoff < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    fn connect_once(url: &str, options: ClientOptions) -> Result<Client> {
        let (addr, url) = parse_url(url)?;
        let (stream, read_buf, seed) = dial(addr, &url, &options)?;
        let mut client = Client {
            stream,
            addr,
            url,
            decoder: Decoder::new(Role::Client, options.max_message_bytes, options.max_message_bytes),
            options,
            read_buf,
            write_buf: BytesMut::with_capacity(64 * 1024),
            opened: Opened {
                version: PROTOCOL_VERSION,
                session_id: Bytes::new(),
                resumed: false,
                last_received_seq: 0,
                heartbeat_ms: 0,
                session_expiry_ms: 0,
                limits: NOT_YET_OPENED,
                server: Bytes::new(),
            },
            last_seq: 0,
            receipted_seq: 0,
            pending: VecDeque::new(),
            mask_state: seed | 1,
            unreceipted: VecDeque::new(),
            refusals_seen: Vec::new(),
            last_delivery_seq: 0,
            acked_through: 0,
            acked_single: Default::default(),
            nacked: VecDeque::new(),
            nack_check: None,
            nack_checks: 0,
            reconnects: 0,
        };
        let open = mbws::Open {
            version: PROTOCOL_VERSION,
            heartbeat_ms: client.options.heartbeat_ms,
            login: Bytes::copy_from_slice(client.options.login.as_bytes()),
            passcode: Bytes::copy_from_slice(client.options.passcode.as_bytes()),
            ..Default::default()
        };
        client.write_frame(&Frame::Open(open))?;
        client.flush()?;
        let deadline = Instant::now() + client.options.timeout;
        match client.read_frame_once(deadline, "OPENED")? {
            Frame::Opened(opened) => client.opened = opened,
            Frame::Error(error) => return Err(ClientError::Broker(error)),
            other => return Err(ClientError::Protocol(format!("expected OPENED, got {}", other.kind().name()))),
        }
        Ok(client)
    }

    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// How many times the session was resumed over a new connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn may_reconnect(&self) -> bool {
        self.options.reconnect.is_some() && self.options.subprotocol == Subprotocol::Reliable
    }

    /// Reconnects and resumes the session (see the module docs), with backoff, within the
    /// reconnect window. Frames queued but not written are dropped: SENDs, NACKs and ACKs are
    /// resent from the client's own records; other frames (FLOW, UNSUBSCRIBE, PING) are not.
    fn resume(&mut self) -> Result<()> {
        let window = self
            .options
            .reconnect
            .unwrap_or_default()
            .min(Duration::from_millis(u64::from(self.opened.session_expiry_ms.max(1))));
        let deadline = Instant::now() + window;
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.try_resume() {
                Ok(()) => {
                    self.reconnects += 1;
                    return Ok(());
                }
                Err(ClientError::Broker(error)) => return Err(ClientError::Broker(error)),
                Err(error) => {
                    if Instant::now() + backoff >= deadline {
                        return Err(error);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// One attempt: connect, OPEN with the session id, then resend SENDs, NACKs and ACKs.
    fn try_resume(&mut self) -> Result<()> {
        let opened = self.reopen()?;
        // Everything the broker has not taken is sent again, in order, with its original seq.
        let resend: Vec<KeptSend> = self
            .unreceipted
            .iter()
            .filter(|(seq, _)| *seq > opened.last_received_seq)
            .map(|(_, kept)| kept.clone())
            .collect();
        self.opened = opened;
        for kept in resend {
            match kept {
                KeptSend::Encoded(binding, payload) => self.write_ws(opcode_of(binding), &payload)?,
                KeptSend::Tail { fixed, tail } => self.write_send_tail(&fixed, &tail)?,
            }
        }
        // NACKs before ACKs: a cumulative ACK over a NACKed delivery would acknowledge it.
        self.write_nacks_again()?;
        if self.acked_through > 0 {
            self.write_frame(&Frame::Ack(mbws::Ack { delivery_seq: self.acked_through, cumulative: true }))?;
        }
        let singles: Vec<u64> = self.acked_single.iter().copied().collect();
        for delivery_seq in singles {
            self.write_frame(&Frame::Ack(mbws::Ack { delivery_seq, cumulative: false }))?;
        }
        self.write_now()
    }

    /// Writes the NACKs the broker may not have read (a NACK for a delivery it has settled
    /// already is ignored) and a PING to learn when it has.
    fn write_nacks_again(&mut self) -> Result<()> {
        self.nack_check = None;
        let nacked: Vec<(u64, bool)> = self.nacked.iter().copied().collect();
        for (delivery_seq, requeue) in nacked {
            self.write_frame(&Frame::Nack(mbws::Nack { delivery_seq, requeue }))?;
        }
        self.check_nacks()
    }

    /// Writes a PING whose PONG will confirm the NACKs remembered, unless one is on its way.
    fn check_nacks(&mut self) -> Result<()> {
        if self.nack_check.is_some() || self.nacked.is_empty() {
            return Ok(());
        }
        self.nack_checks += 1;
        let token = NACK_CHECK_TOKEN | (self.nack_checks & 0xffff_ffff);
        self.nack_check = Some((token, self.nacked.len()));
        self.write_frame(&Frame::Ping(mbws::Ping { token }))
    }

    /// A PONG came: if it answers the NACKs' PING, the broker has read those NACKs.
    fn on_pong(&mut self, token: u64) -> Result<()> {
        match self.nack_check {
            Some((check, covered)) if check == token => {
                self.nacked.drain(..covered.min(self.nacked.len()));
                self.nack_check = None;
                self.check_nacks()
            }
            _ => Ok(()),
        }
    }

    fn reopen(&mut self) -> Result<Opened> {
        let (stream, read_buf, _) = dial(self.addr, &self.url, &self.options)?;
        self.stream = stream;
        self.read_buf = read_buf;
        self.write_buf.clear();
        self.decoder = Decoder::new(Role::Client, self.options.max_message_bytes, self.options.max_message_bytes);
        let open = mbws::Open {
            version: PROTOCOL_VERSION,
            session_id: self.opened.session_id.clone(),
            last_received_seq: self.last_delivery_seq,
            heartbeat_ms: self.options.heartbeat_ms,
            ..Default::default()
        };
        self.write_frame(&Frame::Open(open))?;
        self.write_now()?;
        let deadline = Instant::now() + self.options.timeout;
        match self.read_frame_once(deadline, "OPENED")? {
            Frame::Opened(opened) if opened.resumed => Ok(opened),
            Frame::Opened(_) => {
                Err(ClientError::Protocol("the broker opened a new session instead of resuming".into()))
            }
            Frame::Error(error) => Err(ClientError::Broker(error)),
            other => Err(ClientError::Protocol(format!("expected OPENED, got {}", other.kind().name()))),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().local_addr()
    }

    /// The socket under the session, for a caller that waits for it to become readable beside
    /// other sources (poll(2)), then reads with [`Client::read_available`] and takes what that
    /// read completed with [`Client::next_read_frame`]. A resume replaces the socket: ask again after any call that
    /// may resume. Over TLS this holds too: one read takes all the plaintext rustls decrypted
    /// (it decrypts at most one socket read's worth, less than the read's 64 KiB), so bytes
    /// still waiting are on the socket, where poll(2) sees them.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.tcp().as_raw_fd()
    }

    pub fn binding(&self) -> Binding {
        self.options.binding
    }

    /// Highest SEND sequence the broker has receipted.
    pub fn receipted_seq(&self) -> u64 {
        self.receipted_seq
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: masks need to be unpredictable to intermediaries, not cryptographic.
        self.mask_state ^= self.mask_state << 13;
        self.mask_state ^= self.mask_state >> 7;
        self.mask_state ^= self.mask_state << 17;
        (self.mask_state as u32).to_ne_bytes()
    }

    /// Queues one frame in the client's binding (masked, as a client must).
    pub fn write_frame(&mut self, frame: &Frame) -> Result<()> {
        let binding = self.options.binding;
        self.write_frame_in(binding, frame)
    }

    pub fn write_frame_in(&mut self, binding: Binding, frame: &Frame) -> Result<()> {
        let payload = mbws::encode(binding, frame);
        let opcode = match binding {
            Binding::Binary => OpCode::Binary,
            Binding::Text => OpCode::Text,
        };
        self.write_ws(opcode, &payload)
    }

    /// Queues one raw WebSocket frame (tests use it to send arbitrary payloads).
    pub fn write_ws(&mut self, opcode: OpCode, payload: &[u8]) -> Result<()> {
        self.write_ws_pieces(opcode, &[payload])
    }

    /// Queues one WebSocket frame whose payload is the concatenation of `pieces`: they are
    /// copied into the write buffer, then masked there in one pass (one word-at-a-time pass
    /// over the whole payload costs a third of masking each piece with the mask turned to its
    /// offset: 6 pieces of a 137-byte SEND, measured).
    fn write_ws_pieces(&mut self, opcode: OpCode, pieces: &[&[u8]]) -> Result<()> {
        let mask = self.next_mask();
        let payload_len = pieces.iter().map(|piece| piece.len()).sum();
        encode_header(&mut self.write_buf, true, opcode, payload_len, Some(mask));
        let start = self.write_buf.len();
        for piece in pieces {
            self.write_buf.extend_from_slice(piece);
        }
        mbws_proto::ws::frame::apply_mask(&mut self.write_buf[start..], mask);
        if self.write_buf.len() >= 256 * 1024 {
            self.write_now()?;
        }
        Ok(())
    }

    fn write_send_tail(&mut self, fixed: &[u8; SEND_FIXED_BYTES], tail: &MessageTail) -> Result<()> {
        self.write_ws_pieces(OpCode::Binary, &[fixed, tail.as_bytes()])
    }

    pub fn flush(&mut self) -> Result<()> {
        match self.write_now() {
            Err(ClientError::Io(_)) if self.may_reconnect() => self.resume(),
            other => other,
        }
    }

    fn write_now(&mut self) -> Result<()> {
        if !self.write_buf.is_empty() {
            let result = self.stream.write_all(&self.write_buf).and_then(|()| self.stream.flush());
            self.write_buf.clear();
            result?;
        }
        Ok(())
    }

    /// Queues a SEND with the next sequence number; returns that sequence.
    pub fn send(&mut self, address: &str, body: impl Into<Bytes>) -> Result<u64> {
        self.send_message(mbws::Send {
            address: Bytes::copy_from_slice(address.as_bytes()),
            body: body.into(),
            ..Default::default()
        })
    }

    /// Queues `send` with the next sequence number filled in; returns that sequence.
    pub fn send_message(&mut self, mut send: mbws::Send) -> Result<u64> {
        self.last_seq += 1;
        send.seq = self.last_seq;
        let binding = self.options.binding;
        let payload = mbws::encode(binding, &Frame::Send(send)).freeze();
        self.keep_for_resending(|| KeptSend::Encoded(binding, payload.clone()))?;
        match self.write_ws(opcode_of(binding), &payload) {
            // The SEND is in `unreceipted`: the resume sends it again.
            Err(ClientError::Io(_)) if self.may_reconnect() => self.resume()?,
            other => other?,
        }
        Ok(self.last_seq)
    }

    /// Queues a binary SEND with the next sequence number whose address, properties and body
    /// are `tail` (a message as a broker keeps it, e.g. what another broker received): its
    /// bytes are copied once, masked, into the write buffer, and kept (a reference count) for
    /// resending: nothing is decoded or encoded again. Returns the SEND's sequence; the
    /// client's binding must be binary.
    pub fn send_tail(&mut self, durable: bool, ttl_ms: u32, tail: &MessageTail) -> Result<u64> {
        if self.options.binding != Binding::Binary {
            return Err(ClientError::Protocol(
                "send_tail writes a binary SEND: connect with the binary binding".into(),
            ));
        }
        self.last_seq += 1;
        let fixed = binary_codec::encode_send_fixed(self.last_seq, ttl_ms, durable);
        self.keep_for_resending(|| KeptSend::Tail { fixed, tail: tail.clone() })?;
        match self.write_send_tail(&fixed, tail) {
            Err(ClientError::Io(_)) if self.may_reconnect() => self.resume()?,
            other => other?,
        }
        Ok(self.last_seq)
    }

    /// With resumption on, keeps the SEND numbered `last_seq` for resending, first waiting for
    /// RECEIPTs if the broker's window is full (so what is kept stays bounded).
    fn keep_for_resending(&mut self, kept: impl FnOnce() -> KeptSend) -> Result<()> {
        self.make_room_to_keep()?;
        if self.may_reconnect() {
            self.unreceipted.push_back((self.last_seq, kept()));
        }
        Ok(())
    }

    /// With resumption on, waits for RECEIPTs while the broker's window is full, so that what
    /// is kept for resending stays bounded.
    fn make_room_to_keep(&mut self) -> Result<()> {
        if self.may_reconnect() {
            let window = u64::from(self.opened.limits.max_inflight_sends.max(2));
            if self.last_seq > self.receipted_seq + window {
                self.wait_receipt(self.last_seq - window)?;
            }
        }
        Ok(())
    }

    /// Flushes and waits until the broker has receipted `seq` (and everything before it).
    pub fn wait_receipt(&mut self, seq: u64) -> Result<()> {
        self.flush()?;
        let deadline = Instant::now() + self.options.timeout;
        while self.receipted_seq < seq {
            let frame = self.read_frame(deadline, "RECEIPT")?;
            if let Frame::Error(error) = &frame {
                if error.seq != 0 && error.seq <= seq {
                    return Err(ClientError::Broker(error.clone()));
                }
            }
            self.pending.push_back(frame);
        }
        Ok(())
    }

    /// Subscribes and waits for SUBSCRIBED.
    pub fn subscribe(
        &mut self,
        id: u32,
        address: &str,
        mode: DeliveryMode,
        ack_mode: AckMode,
        credit: u32,
    ) -> Result<()> {
        let frame = Frame::Subscribe(mbws::Subscribe {
            subscription_id: id,
            address: Bytes::copy_from_slice(address.as_bytes()),
            mode,
            ack_mode,
            credit,
        });
        self.write_frame(&frame)?;
        self.flush()?;
        let deadline = Instant::now() + self.options.timeout;
        let mut reconnects = self.reconnects;
        loop {
            if self.reconnects != reconnects {
                // The SUBSCRIBE may have been lost with the connection; it is idempotent.
                reconnects = self.reconnects;
                self.write_frame(&frame)?;
                self.flush()?;
            }
            match self.read_frame(deadline, "SUBSCRIBED")? {
                Frame::Subscribed(subscribed) if subscribed.subscription_id == id => return Ok(()),
                Frame::Error(error) if error.subscription_id == id => return Err(ClientError::Broker(error)),
                other => self.pending.push_back(other),
            }
        }
    }

    pub fn ack(&mut self, delivery_seq: u64, cumulative: bool) -> Result<()> {
        if self.may_reconnect() {
            if cumulative {
                self.acked_through = self.acked_through.max(delivery_seq);
                let through = self.acked_through;
                self.acked_single.retain(|&seq| seq > through);
            } else if delivery_seq > self.acked_through {
                self.acked_single.insert(delivery_seq);
                fold_single_acks(&mut self.acked_through, &mut self.acked_single);
            }
        }
        self.write_frame(&Frame::Ack(mbws::Ack { delivery_seq, cumulative }))
    }

    /// NACKs a delivery (`requeue`: back to the queue, otherwise dead-lettered). With
    /// resumption on, the NACK is remembered until the broker is known to have read it (a
    /// PING's PONG) and written again after a resume, before any ACK (at most
    /// [`MAX_UNCONFIRMED_NACKS`] remembered).
    pub fn nack(&mut self, delivery_seq: u64, requeue: bool) -> Result<()> {
        self.write_frame(&Frame::Nack(mbws::Nack { delivery_seq, requeue }))?;
        if self.may_reconnect() {
            if self.nacked.len() == MAX_UNCONFIRMED_NACKS {
                self.nacked.pop_front();
                if let Some((_, covered)) = &mut self.nack_check {
                    *covered = covered.saturating_sub(1);
                }
            }
            self.nacked.push_back((delivery_seq, requeue));
            self.check_nacks()?;
        }
        Ok(())
    }

    /// Next MESSAGE, waiting at most `timeout`; `Ok(None)` if none came. RECEIPTs and PONGs
    /// are absorbed; a broker ERROR is returned as an error.
    pub fn next_message(&mut self, timeout: Duration) -> Result<Option<mbws::Message>> {
        self.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_frame_until(deadline) {
                Ok(Frame::Message(message)) => return Ok(Some(message)),
                Ok(Frame::Error(error)) => return Err(ClientError::Broker(error)),
                Ok(_) => continue,
                Err(ClientError::Timeout(_)) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads what the socket holds now, in one read that waits at most `timeout` if it holds
    /// nothing, for a caller that waits on [`Client::socket_fd`] itself: the frames this read
    /// completes come from [`Client::next_read_frame`]. Unlike [`Client::next_frame`], it
    /// never waits for the rest of a frame. A lost connection is resumed (see the module docs).
    pub fn read_available(&mut self, timeout: Duration) -> Result<()> {
        match read_some(&mut self.stream, &mut self.read_buf, Instant::now() + timeout, "a frame") {
            Ok(()) | Err(ClientError::Timeout(_) | ClientError::Interrupted) => Ok(()),
            Err(ClientError::Io(_)) if self.may_reconnect() => self.resume(),
            Err(error) => Err(error),
        }
    }

    /// The next frame already read (set aside, or decoded from bytes already read), never
    /// reading the socket or the clock; `None` when no complete frame waits. For a caller that
    /// reads with [`Client::read_available`] and then takes every frame that read completed.
    pub fn next_read_frame(&mut self) -> Result<Option<Frame>> {
        Ok(self.next_read(false)?.map(Incoming::into_frame))
    }

    /// [`Client::next_read_frame`], with a binary MESSAGE kept whole: its address, properties
    /// and body stay one tail, a slice of the bytes read (for a node that passes deliveries on
    /// without copying them).
    pub fn next_read_incoming(&mut self) -> Result<Option<Incoming>> {
        self.next_read(true)
    }

    fn next_read(&mut self, keep_tails: bool) -> Result<Option<Incoming>> {
        self.flush()?;
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(Incoming::Frame(frame)));
        }
        // A deadline already past: the read stops at the bytes already read.
        static PAST: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        match self.read_incoming(*PAST.get_or_init(Instant::now), "a frame", keep_tails) {
            Ok(incoming) => Ok(Some(incoming)),
            Err(ClientError::Timeout(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Next frame of any kind (pending ones first), waiting at most `timeout`.
    pub fn next_frame(&mut self, timeout: Duration) -> Result<Frame> {
        self.flush()?;
        self.next_frame_until(Instant::now() + timeout)
    }

    fn next_frame_until(&mut self, deadline: Instant) -> Result<Frame> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        self.read_frame(deadline, "a frame")
    }

    /// Reads the next MBWS frame from the socket (not from `pending`), tracking receipts,
    /// dropping duplicate deliveries, and resuming the session after a lost connection.
    fn read_frame(&mut self, deadline: Instant, what: &str) -> Result<Frame> {
        self.read_incoming(deadline, what, false).map(Incoming::into_frame)
    }

    /// [`Client::read_frame`], keeping a binary MESSAGE whole when `keep_tails`.
    fn read_incoming(&mut self, deadline: Instant, what: &str, keep_tails: bool) -> Result<Incoming> {
        loop {
            let incoming = match self.read_once(deadline, what, keep_tails) {
                Ok(frame) => frame,
                Err(ClientError::Io(_)) | Err(ClientError::Closed { code: 1001 | 1006, .. })
                    if self.may_reconnect() =>
                {
                    self.resume()?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let frame = match &incoming {
                Incoming::Message(message) if !self.take_delivery(message.delivery_seq) => continue,
                Incoming::Message(_) => return Ok(incoming),
                Incoming::Frame(frame) => frame,
            };
            match frame {
                Frame::Message(message) if !self.take_delivery(message.delivery_seq) => continue,
                Frame::Receipt(receipt) => {
                    while self.unreceipted.front().is_some_and(|(seq, _)| *seq <= receipt.seq) {
                        self.unreceipted.pop_front();
                    }
                    self.refusals_seen.retain(|seq| *seq > receipt.seq);
                }
                // A resume replays the ERRORs of refused SENDs (docs/PROTOCOL.md section 11):
                // one seen already, or at or below a RECEIPT already seen (which it preceded),
                // is dropped.
                Frame::Error(error) if !error.fatal && error.seq != 0 => {
                    if error.seq <= self.receipted_seq || self.refusals_seen.contains(&error.seq) {
                        continue;
                    }
                    self.refusals_seen.push(error.seq);
                }
                Frame::Pong(pong) => {
                    let token = pong.token;
                    self.on_pong(token)?;
                }
                _ => {}
            }
            return Ok(incoming);
        }
    }

    /// Records a MESSAGE's delivery sequence; false for one seen before the connection was
    /// lost (a resumed session replays what was unacknowledged), which is dropped.
    fn take_delivery(&mut self, delivery_seq: u64) -> bool {
        if self.may_reconnect() && delivery_seq <= self.last_delivery_seq {
            return false;
        }
        self.last_delivery_seq = self.last_delivery_seq.max(delivery_seq);
        true
    }

    fn read_frame_once(&mut self, deadline: Instant, what: &str) -> Result<Frame> {
        self.read_once(deadline, what, false).map(Incoming::into_frame)
    }

    fn read_once(&mut self, deadline: Instant, what: &str, keep_tails: bool) -> Result<Incoming> {
        loop {
            while let Some(event) = self
                .decoder
                .next_event(&mut self.read_buf)
                .map_err(|error| ClientError::Protocol(format!("invalid WebSocket data from the broker: {error}")))?
            {
                let (binding, payload) = match event {
                    WsEvent::Binary(payload) => (Binding::Binary, payload),
                    WsEvent::Text(payload) => (Binding::Text, payload),
                    WsEvent::Ping(payload) => {
                        self.write_ws(OpCode::Pong, &payload.clone())?;
                        continue;
                    }
                    WsEvent::Pong(_) => continue,
                    WsEvent::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (f.code, String::from_utf8_lossy(&f.reason).into_owned()))
                            .unwrap_or((1005, String::new()));
                        let _ = self.write_ws(OpCode::Close, &close_payload(code, ""));
                        let _ = self.write_now();
                        return Err(ClientError::Closed { code, reason });
                    }
                };
                let limits = CodecLimits { max_headers: 1024, ..Default::default() };
                let invalid = |error| ClientError::Protocol(format!("invalid MBWS frame from the broker: {error}"));
                if keep_tails && binding == Binding::Binary && payload.get(1) == Some(&mbws::FrameKind::Message.code())
                {
                    return binary_codec::decode_message(payload, &limits).map(Incoming::Message).map_err(invalid);
                }
                let frame = mbws::decode(binding, payload, &limits).map_err(invalid)?;
                if let Frame::Receipt(receipt) = &frame {
                    self.receipted_seq = self.receipted_seq.max(receipt.seq);
                }
                return Ok(Incoming::Frame(frame));
            }
            read_some(&mut self.stream, &mut self.read_buf, deadline, what)?;
        }
    }

    /// Ends the session for good: CLOSE, then the WebSocket close handshake.
    pub fn close(mut self) -> Result<()> {
        self.write_frame(&Frame::Close(mbws::Close))?;
        self.flush()?;
        let deadline = Instant::now() + self.options.timeout;
        loop {
            match self.read_frame(deadline, "the close handshake") {
                Err(ClientError::Closed { .. }) => return Ok(()),
                Err(ClientError::Io(_)) => return Ok(()),
                Err(error) => return Err(error),
                Ok(_) => continue,
            }
        }
    }
}

fn opcode_of(binding: Binding) -> OpCode {
    match binding {
        Binding::Binary => OpCode::Binary,
        Binding::Text => OpCode::Text,
    }
}

/// The rustls configuration of a `wss://` client: the CA file's certificates as trust anchors
/// (`None`: the system's, [`SYSTEM_CA_FILE`]). Shared with `mbws-bench`, so both trust a broker
/// the same way.
pub fn tls_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let file = ca_file.map_or_else(|| PathBuf::from(SYSTEM_CA_FILE), Path::to_path_buf);
    let problem = |what: String| ClientError::Tls(format!("CA file {}: {what}", file.display()));
    let pem = std::fs::read(&file).map_err(|error| problem(format!("cannot read it: {error}; give --ca-file")))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.map_err(|error| problem(format!("not valid PEM: {error}")))?;
        roots.add(certificate).map_err(|error| problem(format!("a certificate in it is not usable: {error}")))?;
    }
    if roots.is_empty() {
        return Err(problem("holds no certificate (no \"-----BEGIN CERTIFICATE-----\" block)".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientError::Tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Starts TLS over `stream` for the URL's host (the handshake runs on the first write).
fn start_tls(stream: TcpStream, url: &BrokerUrl, options: &ClientOptions) -> Result<Transport> {
    let name = tls_server_name(url)?;
    let connection = rustls::ClientConnection::new(tls_client_config(options.ca_file.as_deref())?, name)
        .map_err(|error| ClientError::Tls(error.to_string()))?;
    Ok(Transport::new(TransportIo::Tls(Box::new(rustls::StreamOwned::new(connection, stream)))))
}

/// The name a `wss://` URL's certificate must carry: its host, without port or IPv6 brackets.
pub fn tls_server_name(url: &BrokerUrl) -> Result<rustls::pki_types::ServerName<'static>> {
    let host = url.authority.rsplit_once(':').map_or(url.authority.as_str(), |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|error| ClientError::Tls(format!("\"{host}\" is not a TLS server name: {error}")))
}

/// TCP connect, TLS for `wss://`, and WebSocket upgrade; returns the stream, any bytes read
/// past the response, and the seed used for the key (reused for masks).
fn dial(addr: SocketAddr, url: &BrokerUrl, options: &ClientOptions) -> Result<(Transport, BytesMut, u64)> {
    let BrokerUrl { host, path, tls, .. } = url;
    let scheme = if *tls { "wss" } else { "ws" };
    let stream = TcpStream::connect_timeout(&addr, options.timeout).map_err(|error| ClientError::Connect {
        url: format!("{scheme}://{host}{path}"),
        addr,
        error,
    })?;
    stream.set_nodelay(true)?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        ^ (stream.local_addr()?.port() as u64) << 48;
    let key = handshake::new_client_key(seed);
    let mut request = handshake::client_request(host, path, &key, &[options.subprotocol.name()]);
    if !options.headers.is_empty() {
        // Before the empty line that ends the request head.
        request.truncate(request.len() - 2);
        for (name, value) in &options.headers {
            if [name, value].iter().any(|text| text.contains(['\r', '\n'])) || name.is_empty() {
                return Err(ClientError::Url(format!(
                    "the upgrade header {name:?}: {value:?} is not a header field: give a non-empty name, and neither \
                     name nor value with CR or LF"
                )));
            }
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
    }
    stream.set_write_timeout(Some(options.timeout))?;
    stream.set_read_timeout(Some(options.timeout))?;
    let mut stream = if *tls { start_tls(stream, url, options)? } else { Transport::new(TransportIo::Plain(stream)) };
    stream.write_all(request.as_bytes()).and_then(|()| stream.flush()).map_err(|error| match &stream.io {
        TransportIo::Tls(_) if error.kind() == io::ErrorKind::InvalidData => {
            ClientError::Tls(format!("TLS handshake with {scheme}://{host}{path} failed: {error}"))
        }
        _ => ClientError::Io(error),
    })?;
    let deadline = Instant::now() + options.timeout;
    let mut read_buf = BytesMut::with_capacity(64 * 1024);
    let response = loop {
        if let Some((response, consumed)) = handshake::parse_response(&read_buf, 16 * 1024)
            .map_err(|error| ClientError::Protocol(format!("bad upgrade response: {error}")))?
        {
            let _ = read_buf.split_to(consumed);
            break response;
        }
        read_some(&mut stream, &mut read_buf, deadline, "the upgrade response")?;
    };
    if response.status != 101 {
        return Err(ClientError::Protocol(format!(
            "the broker refused the upgrade: {} {}",
            response.status, response.reason
        )));
    }
    let protocol = handshake::verify_accept::<Subprotocol>(&response, &key).map_err(ClientError::Protocol)?;
    if protocol != Some(options.subprotocol) {
        return Err(ClientError::Protocol(format!(
            "the broker did not agree to {} (it answered {:?})",
            options.subprotocol.name(),
            protocol.map(Subprotocol::name)
        )));
    }
    Ok((stream, read_buf, seed))
}

/// One read appended to `buf`, bounded by `deadline` (a read that the socket's shorter
/// receive timeout ends early is made again, until `deadline`).
fn read_some(stream: &mut Transport, buf: &mut BytesMut, deadline: Instant, what: &str) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(what.to_string()));
        }
        stream.bound_read_wait(left)?;
        if buf.capacity() - buf.len() < READ_ROOM_BYTES {
            buf.reserve(READ_CHUNK_BYTES);
        }
        return match stream.read_into(buf) {
            Ok(0) => Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the broker closed the connection while we waited for {what}"),
            ))),
            Ok(_) => Ok(()),
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Err(ClientError::Interrupted),
            Err(error) => Err(ClientError::Io(error)),
        };
    }
}

/// An argon2id hash of `password` with a fresh random salt, as a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`, argon2's default cost), for `password-hash` in
/// the broker's `[[auth.user]]`.
pub fn hash_password(password: &str) -> std::result::Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the live array.
    let filled = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if filled != salt.len() as isize {
        return Err(format!("no random salt: getrandom failed ({})", io::Error::last_os_error()));
    }
    let salt = SaltString::encode_b64(&salt).map_err(|error| format!("salt: {error}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| format!("argon2: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (String, String, String) {
        let BrokerUrl { authority, host, path, .. } = parse_url_syntax(url).unwrap();
        (authority, host, path)
    }

    /// A read waits for its deadline and no longer, even when bytes come after the socket's
    /// own (shorter) receive timeout; reads with the same bound over and over set that timeout
    /// once; what is read lands after what the buffer held.
    #[test]
    fn a_read_waits_until_its_deadline_sets_the_socket_timeout_only_when_it_must_and_appends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut stream = Transport::new(TransportIo::Plain(accepted));
        let mut buf = BytesMut::from(&b"held "[..]);

        // Nothing comes: a timeout at the deadline, not before it (nor long after).
        let started = Instant::now();
        let result = read_some(&mut stream, &mut buf, started + Duration::from_millis(300), "a test");
        assert!(matches!(result, Err(ClientError::Timeout(_))), "{result:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(290) && waited < Duration::from_secs(3), "waited {waited:?}");

        // Bytes written after the socket's timeout (at most half the time left) has passed.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            peer.write_all(b"late bytes").unwrap();
            peer
        });
        read_some(&mut stream, &mut buf, Instant::now() + Duration::from_secs(5), "a test").unwrap();
        assert_eq!(&buf[..], b"held late bytes");
        let mut peer = writer.join().unwrap();

        // The same bound again and again (a relay's read_available): the timeout stays as set.
        peer.write_all(b"!").unwrap();
        read_some(&mut stream, &mut buf, Instant::now() + Duration::from_millis(100), "a test").unwrap();
        let set = stream.read_wait.expect("set by the reads");
        assert!(set <= Duration::from_millis(100), "{set:?}");
        for _ in 0..20 {
            peer.write_all(b"!").unwrap();
            read_some(&mut stream, &mut buf, Instant::now() + Duration::from_millis(100), "a test").unwrap();
            assert_eq!(stream.read_wait, Some(set), "set again for the same bound");
        }
        assert_eq!(&buf[..], [&b"held late bytes"[..], &[b'!'; 21]].concat(), "each read appended what came");
        // A much shorter bound lowers it.
        let _ = read_some(&mut stream, &mut buf, Instant::now() + Duration::from_millis(5), "a test");
        assert!(stream.read_wait.unwrap() <= Duration::from_millis(5));
    }

    #[test]
    fn urls_take_the_forms_users_write() {
        let owned = |a: &str, h: &str, p: &str| (a.to_string(), h.to_string(), p.to_string());
        assert_eq!(parts("ws://127.0.0.1:7447/"), owned("127.0.0.1:7447", "127.0.0.1:7447", "/"));
        assert_eq!(parts("WS://Host:1/x"), owned("Host:1", "Host:1", "/x"));
        assert_eq!(parts("ws://example.com"), owned("example.com:80", "example.com", "/"));
        assert_eq!(parts("ws://[::1]/"), owned("[::1]:80", "[::1]", "/"));
        assert_eq!(parts("ws://[::1]:9/"), owned("[::1]:9", "[::1]:9", "/"));
        assert_eq!(parts("localhost:7447"), owned("localhost:7447", "localhost:7447", "/"));
        assert_eq!(parts("wss://example.com/"), owned("example.com:443", "example.com", "/"));
        assert!(parse_url_syntax("WSS://h:1/").unwrap().tls && !parse_url_syntax("ws://h:1/").unwrap().tls);
    }

    #[test]
    fn bad_urls_are_named_with_what_to_give() {
        for (url, says) in [
            ("http://h/", "wss://HOST:PORT/"),
            ("ftp://h/", "unknown scheme"),
            ("h", "HOST:PORT"),
            ("ws://h:0/", "1 to 65535"),
            ("ws://h:x/", "1 to 65535"),
            ("ws://:80/", "no host"),
            ("ws://u@h/", "user information"),
            ("ws://[::1]x/", "IPv6"),
        ] {
            match parse_url_syntax(url) {
                Err(ClientError::Url(problem)) => {
                    assert!(problem.contains(url) && problem.contains(says), "{url}: {problem}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn single_acks_in_order_fold_into_the_cumulative_mark_and_those_above_a_gap_wait() {
        let mut through = 0;
        let mut singles = std::collections::BTreeSet::new();
        for seq in 1..=10_000 {
            singles.insert(seq);
            fold_single_acks(&mut through, &mut singles);
        }
        assert_eq!((through, singles.len()), (10_000, 0), "in order: nothing kept");
        // 10,001 is held by the application: what comes after it waits for it.
        for seq in [10_002, 10_004, 10_003] {
            singles.insert(seq);
            fold_single_acks(&mut through, &mut singles);
        }
        assert_eq!(through, 10_000);
        assert_eq!(singles.iter().copied().collect::<Vec<_>>(), [10_002, 10_003, 10_004]);
        singles.insert(10_001);
        fold_single_acks(&mut through, &mut singles);
        assert_eq!((through, singles.len()), (10_004, 0), "the gap filled: all folded");
    }
}
