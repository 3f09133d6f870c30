//! A connection's IO shell: its reader and writer tasks around the sans-IO connection state
//! (`crate::conn`) that the shard core owns.
//!
//! A connection goes through three phases on its shard:
//! 1. upgrade ([`serve`]): the HTTP request, bounded by `handshake_timeout` and
//!    `max_handshake_bytes`, answered 101 or refused with a plain-text reason (or, for a plain
//!    GET of a file the broker serves, answered with that file: [`assets`]);
//! 2. opening: the first MBWS frame, bounded by `open_timeout`. A new session is registered in
//!    a connection slot of this shard. A *resume* (MBWS OPEN naming a session) is served by the
//!    shard that holds the session: if that is another shard, the socket itself is handed over
//!    to it ([`Adoption`]), since SO_REUSEPORT lands a reconnect on any shard;
//! 3. running: a reader task decodes WebSocket messages in place and feeds the [`Session`](crate::conn::session::Session); it
//!    stops reading while the session holds `max_inflight_sends` unanswered SENDs or the write
//!    queue is over `max_outbound_bytes`. A writer task takes everything queued in the
//!    [`Outbound`] as one batch and writes it with one vectored write, returning auto-ack credit
//!    once the batch is on the wire (or lost: a failed write, or one the close grace cut short).
//!
//! A connection slot outlives its socket when its session is resumable (MBWS): the session is
//! detached and waits `session_expiry_ms` for its client; a timer ends it otherwise. Every
//! attachment of a socket to a slot has a number ([`lifecycle`](crate::conn::lifecycle)); tasks of an older attachment
//! (a connection superseded by a resume) stop touching the slot.
//!
//! What a connection decides is sans-IO, in [`ConnState`](crate::conn::state::ConnState) (session, write queue,
//! lifecycle): the tasks here read and write the socket, report what happened as events
//! (`bytes_read`, `take_write_batch`, `write_completed`, `reader_finished`, `expire`,
//! `resume`) and apply the answers (wake a task, stop reading, end). The state is owned by the
//! shard's core (its connection slots); the tasks hold the connection's id and attachment and
//! reach it through `Shard::with_conn`, which borrows the core for that call only, never
//! across an `.await`. Their wakers stay in the shell (`Shard::park`, `Shard::wake`).
//!
//! Memory per idle connection is kept small (docs/PERFORMANCE.md, "Idle sessions"). The read
//! buffer shrinks once the connection has caught up with its peer ([`read_buffer`](crate::conn::read_buffer)), and the
//! write queue gives its buffers back when the writer parks. The two tasks are sized by their
//! largest state, so timers, writes and rare paths (handshake, resume, refusals) are boxed
//! rather than held inline.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::net::TcpStream;

use super::assets;
use super::tls_inplace::{InPlaceState, InPlaceStream};
use super::transport::{ReadSide, RustlsState, Stream, TlsState, TlsStream, WriteSide};
use crate::broker::{ConnRef, ShardId};
use crate::clock::now_ms;
use crate::conn::lifecycle::Attachment;
use crate::conn::outbound::{Outbound, WriteBatch};
use crate::conn::read_buffer::ReadBuffer;
use crate::conn::session::{parse_session_id, unknown_session_reason};
use crate::conn::state::{superseded_farewell, Expiry, NextWrite, ReadStep, Wake, WriteOutcome, Written};
use crate::log;
use crate::logging::Level;
use crate::mbws::{self, Binding, ErrorCode, ErrorFrame, Frame, Subprotocol};
use crate::shard::admission::ConnectionPermit;
use crate::shard::core::{ReaderFinished, Resumed};
use crate::shard::Shard;
use crate::tls::TlsRecords;
use crate::ws::handshake::{self, HandshakeError};
use crate::ws::message::{close_payload, Decoder, WsEvent};
use crate::ws::{OpCode, Role, WsError};

/// How long a closing connection waits for the peer's close frame, and for its last writes.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A socket handed to the shard that holds the session its first frame resumes.
#[derive(Debug)]
pub struct Adoption {
    pub socket: OwnedFd,
    pub peer: SocketAddr,
    /// Bytes read after the OPEN, not yet decoded.
    pub buffered: BytesMut,
    pub binding: Binding,
    pub open: mbws::Open,
    /// The TLS session of a `wss://` connection (it moves with its socket).
    pub tls: Option<Box<TlsState>>,
    /// The connection's place in `--max-connections` (it moves with its socket).
    pub permit: Option<ConnectionPermit>,
}

/// A `BytesMut` that io_uring reads into after its current contents, and what its owner keeps
/// in its spare room for the stream across reads (see [`ReadBuffer`]'s carried bytes).
pub struct ReadTail {
    pub bytes: BytesMut,
    /// `Some(n)`: the owner keeps the `n` bytes in the spare room right after `bytes` until the
    /// next read, and the stream says how many it leaves there when it returns the tail (the
    /// reader's [`ReadBuffer`]). `None`: the spare room is the read's only, the stream leaves
    /// nothing in it (the upgrade's buffer, and any read before the split: the connection may
    /// move to another shard with only its buffered bytes).
    pub carried: Option<usize>,
}

impl ReadTail {
    /// A tail whose owner keeps nothing in its spare room.
    pub fn new(bytes: BytesMut) -> ReadTail {
        ReadTail { bytes, carried: None }
    }
}

// SAFETY: the pointer is the start of the spare capacity and `bytes_total` its exact length;
// the buffer is owned by this value (heap memory that does not move with it) while the runtime
// holds it; `set_init(n)` marks the `n` bytes the kernel wrote as initialized.
unsafe impl IoBufMut for ReadTail {
    fn write_ptr(&mut self) -> *mut u8 {
        // SAFETY: `len <= capacity`, so the result is inside (or one past) the allocation.
        unsafe { self.bytes.as_mut_ptr().add(self.bytes.len()) }
    }

    fn bytes_total(&mut self) -> usize {
        self.bytes.capacity() - self.bytes.len()
    }

    unsafe fn set_init(&mut self, written: usize) {
        // A count past the spare capacity would make `set_len` expose memory the buffer does
        // not own: the runtime's contract says it cannot happen; check it, it costs one compare
        // per read.
        assert!(written <= self.bytes.capacity() - self.bytes.len(), "a read reported more bytes than its room");
        // SAFETY: the kernel initialized `written` bytes of spare capacity (caller contract),
        // and they fit in it (asserted above).
        unsafe { self.bytes.set_len(self.bytes.len() + written) }
    }
}

/// Reads once into `buf`, with the room its traffic calls for ([`ReadBuffer`]). Ok(0) is EOF.
async fn read_more<R: ReadSide>(reader: &mut R, buf: &mut ReadBuffer) -> std::io::Result<usize> {
    let (bytes, carried) = buf.take_for_read();
    let (result, tail) = reader.read_tail(ReadTail { bytes, carried: Some(carried) }).await;
    buf.put_back(tail.bytes, *result.as_ref().unwrap_or(&0), tail.carried.unwrap_or(0));
    result
}

/// Serves one accepted TCP connection (`ws://`) until it closes (or is handed to another shard).
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    match shard.admission.admit_connection(peer.ip()) {
        Ok(permit) => serve_stream(shard, stream, peer, permit).await,
        Err(reason) => Box::pin(refuse_connection(&shard, stream, peer, reason)).await,
    }
}

/// Serves one accepted TLS connection (`wss://`): its TLS handshake is part of the upgrade.
pub async fn serve_tls(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, tls: Arc<rustls::ServerConfig>) {
    let _ = stream.set_nodelay(true);
    let permit = match shard.admission.admit_connection(peer.ip()) {
        Ok(permit) => permit,
        Err(reason) => {
            // No TLS session yet to say it in: the connection is closed at once.
            log_limited(
                &REFUSAL_LOG,
                || log!(Level::Warn, "shard {}: connection refused", shard.id.0; peer = peer, reason = reason),
            );
            return;
        }
    };
    let started = match shard.config.tls_records {
        TlsRecords::InPlace => rustls::server::UnbufferedServerConnection::new(tls)
            .map(|connection| TlsState::InPlace(InPlaceState::new(connection))),
        TlsRecords::Rustls => rustls::ServerConnection::new(tls)
            .map(|connection| TlsState::Rustls(Box::new(RustlsState::new(connection)))),
    };
    match started {
        Ok(TlsState::InPlace(state)) => serve_stream(shard, InPlaceStream::new(stream, state), peer, permit).await,
        Ok(TlsState::Rustls(state)) => serve_stream(shard, TlsStream::new(stream, *state), peer, permit).await,
        Err(error) => log!(Level::Warn, "shard {}: cannot start TLS for {peer}: {error}", shard.id.0),
    }
}

/// How long a refused connection's request is read before the 503 answer (the answer comes
/// after the request, so the client reads it rather than a reset), bounded well below the
/// handshake timeout so that refused connections do not pile up.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Answers a connection over a connection limit with `503 Service Unavailable` and the
/// reason, after reading its request for at most [`REFUSAL_READ_TIMEOUT`].
async fn refuse_connection(shard: &Shard, mut stream: TcpStream, peer: SocketAddr, reason: String) {
    log_limited(
        &REFUSAL_LOG,
        || log!(Level::Warn, "shard {}: connection refused", shard.id.0; peer = peer, reason = reason),
    );
    let max_bytes = shard.config.max_handshake_bytes;
    let mut buf = BytesMut::with_capacity(max_bytes);
    let _ = Box::pin(monoio::time::timeout(REFUSAL_READ_TIMEOUT, read_upgrade(&mut stream, &mut buf, max_bytes))).await;
    let _ = stream.write_bytes(HandshakeError::new(503, reason).response()).await;
    stream.shutdown().await;
}

/// A log line budget: at most [`LOG_BURST`] lines per [`LOG_WINDOW`] per shard, then one line
/// that counts those left out, so a flood (of failed TLS handshakes, of refused connections)
/// cannot fill the log.
struct LogBudget {
    window_start: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

thread_local! {
    static TLS_FAILURE_LOG: std::cell::RefCell<LogBudget> =
        const { std::cell::RefCell::new(LogBudget { window_start: None, logged: 0, suppressed: 0 }) };
    static REFUSAL_LOG: std::cell::RefCell<LogBudget> =
        const { std::cell::RefCell::new(LogBudget { window_start: None, logged: 0, suppressed: 0 }) };
}

/// Runs `write` (one log line) if `budget` allows it now.
fn log_limited(budget: &'static std::thread::LocalKey<std::cell::RefCell<LogBudget>>, write: impl FnOnce()) {
    let (allowed, suppressed) = budget.with(|budget| {
        let mut budget = budget.borrow_mut();
        let now = std::time::Instant::now();
        let mut suppressed = 0;
        if budget.window_start.is_none_or(|start| now.duration_since(start) >= LOG_WINDOW) {
            suppressed = std::mem::take(&mut budget.suppressed);
            budget.window_start = Some(now);
            budget.logged = 0;
        }
        let allowed = budget.logged < LOG_BURST;
        if allowed {
            budget.logged += 1;
        } else {
            budget.suppressed += 1;
        }
        (allowed, suppressed)
    });
    if suppressed > 0 {
        log!(Level::Info, "{suppressed} more lines like the next were left out in the last {} s", LOG_WINDOW.as_secs());
    }
    if allowed {
        write();
    }
}

/// The rustls error behind a failed read of a TLS connection, if that is what failed.
fn tls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Serves one accepted connection over `stream` until it closes (or is handed to another shard).
///
/// This future is the connection's reader task for the connection's whole life, so its size
/// is memory held per idle session: the opening phase (handshake, timers, refusals) runs in a
/// box that is freed once the session runs, and only the running phase is held inline.
async fn serve_stream<S: Stream>(shard: Rc<Shard>, stream: S, peer: SocketAddr, permit: ConnectionPermit) {
    let mut permit = Some(permit);
    let attached = match Box::pin(open_connection(&shard, stream, peer, &mut permit)).await {
        Opening::Opened(attached) => attached,
        Opening::Resume(resumption) => {
            let Resumption { stream, buf, binding, open } = *resumption;
            // Boxed: a resume is rare, and its own state would size every new session's task.
            return Box::pin(resume(shard, stream, peer, buf, binding, open, permit)).await;
        }
        Opening::Ended => return,
    };
    let Attached { me, attachment, stream, mut buf, mut decoder } = *attached;
    run(&shard, me, attachment, stream, &mut buf, &mut decoder, &peer).await
}

/// How the opening phase of a connection ended. The payloads are boxed: an `Opening` lives in
/// `serve` beside the resume path, and a large one would size every connection's task.
enum Opening<S> {
    /// A new session is registered and attached; it runs next.
    Opened(Box<Attached<S>>),
    /// The first frame resumes a session of this shard.
    Resume(Box<Resumption<S>>),
    /// Refused, handed to another shard, or gone.
    Ended,
}

/// A new session, registered and attached to its socket.
struct Attached<S> {
    me: ConnRef,
    attachment: Attachment,
    stream: S,
    buf: ReadBuffer,
    decoder: Decoder,
}

/// A first frame that resumes a session of this shard.
struct Resumption<S> {
    stream: S,
    buf: ReadBuffer,
    binding: Binding,
    open: mbws::Open,
}

/// The upgrade and the first MBWS frame, each bounded by its timeout. A connection handed to
/// another shard takes its `permit` along.
async fn open_connection<S: Stream>(
    shard: &Rc<Shard>,
    mut stream: S,
    peer: SocketAddr,
    permit: &mut Option<ConnectionPermit>,
) -> Opening<S> {
    let config = shard.config.clone();
    let _opening = shard.opening();
    let mut buf = BytesMut::with_capacity(config.max_handshake_bytes);

    // Timeouts are boxed: a monoio timer is large and cache-line aligned, and held inline it
    // would size (and align) the future that holds it.
    let upgrade = Box::pin(shard.unless_shutdown(monoio::time::timeout(
        config.handshake_timeout,
        read_upgrade(&mut stream, &mut buf, config.max_handshake_bytes),
    )))
    .await;
    let Some(upgrade) = upgrade else {
        // Shutting down before the upgrade completed: no WebSocket yet, so nothing to say.
        stream.shutdown().await;
        return Opening::Ended;
    };
    let (upgrade, upgrade_credentials, cluster_link) = match upgrade {
        Ok(Ok(upgrade)) => upgrade,
        Ok(Err(Some(answer))) => {
            let response = match answer {
                NotUpgraded::Refused(refusal) => {
                    shard.count_refused_upgrade(refusal.status);
                    log!(
                        Level::Info,
                        "shard {}: upgrade refused", shard.id.0;
                        peer = peer,
                        status = refusal.status,
                        reason = refusal.reason,
                    );
                    refusal.response()
                }
                NotUpgraded::Served(response) => {
                    log!(Level::Debug, "shard {}: served a file to {peer}", shard.id.0);
                    response
                }
                NotUpgraded::ReadFailed(error) => {
                    if let Some(reason) = tls_error(&error) {
                        // rustls's reason names the protocol step, never key material.
                        log_limited(
                            &TLS_FAILURE_LOG,
                            || log!(Level::Info, "shard {}: TLS handshake failed", shard.id.0; peer = peer, reason = reason),
                        );
                    }
                    return Opening::Ended;
                }
            };
            let _ = stream.write_bytes(response).await;
            stream.shutdown().await;
            return Opening::Ended;
        }
        Ok(Err(None)) => return Opening::Ended, // The peer went away mid-request.
        Err(_) => {
            let refusal = HandshakeError {
                status: 408,
                reason: format!(
                    "the WebSocket upgrade request did not complete within {} ms (handshake timeout)",
                    config.handshake_timeout.as_millis()
                ),
            };
            shard.count_refused_upgrade(refusal.status);
            let _ = stream.write_bytes(refusal.response()).await;
            stream.shutdown().await;
            return Opening::Ended;
        }
    };
    if let Err(reason) = crate::config::check_origin(&config.allowed_origins, upgrade.origin.as_deref()) {
        log!(Level::Debug, "shard {}: refused upgrade from {peer}: 403 {reason}", shard.id.0);
        shard.count_refused_upgrade(403);
        let _ = stream.write_bytes(HandshakeError::new(403, reason).response()).await;
        stream.shutdown().await;
        return Opening::Ended;
    }
    if shard.is_draining() {
        // Lame duck: a new session (or a resume) belongs on another broker of the fleet.
        let reason = "the broker is draining (lame duck) and takes no new connections: connect to another broker";
        log!(Level::Info, "shard {}: upgrade refused", shard.id.0; peer = peer, status = 503, reason = reason);
        shard.count_refused_upgrade(503);
        let _ = stream.write_bytes(HandshakeError::new(503, reason).response()).await;
        stream.shutdown().await;
        return Opening::Ended;
    }
    log!(Level::Debug, "shard {}: connection from {peer} upgraded with {}", shard.id.0, upgrade.protocol.name());
    let written = stream.write_bytes(handshake::accept_response(&upgrade)).await;
    if written.is_err() {
        return Opening::Ended;
    }

    let mut buf = ReadBuffer::new(buf, config.read_buffer_bytes);
    let mut decoder = Decoder::new(Role::Server, config.max_frame_bytes, config.max_message_bytes);
    let first = Box::pin(shard.unless_shutdown(monoio::time::timeout(
        config.open_timeout,
        first_message(&mut stream, &mut buf, &mut decoder),
    )))
    .await;
    let Some(first) = first else {
        // Shutting down before OPEN: every WebSocket connection gets close 1001.
        say_going_away(&mut stream).await;
        return Opening::Ended;
    };
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) => return Opening::Ended,
        Err(_) => {
            let reason =
                format!("no OPEN within {} ms of the upgrade; send OPEN first", config.open_timeout.as_millis());
            refuse_session(&mut stream, Binding::Binary, ErrorCode::Timeout, reason).await;
            return Opening::Ended;
        }
    };
    let (binding, payload) = first;
    let first_open = match mbws::decode(binding, payload.clone(), &shard.session_config.codec_limits) {
        Ok(Frame::Open(open)) => Some(open),
        _ => None,
    };

    // A resume goes to the shard that holds the session (the session id's token is its
    // credential; the session keeps the permissions of its first OPEN).
    if upgrade.protocol == Subprotocol::Reliable {
        if let Some(open) = first_open.as_ref().filter(|open| !open.session_id.is_empty()).cloned() {
            if let Some((home, _, _)) = parse_session_id(&open.session_id) {
                if home == shard.id {
                    return Opening::Resume(Box::new(Resumption { stream, buf, binding, open }));
                } else if usize::from(home.0) < shard.shard_count() {
                    hand_over(shard, stream, peer, buf, binding, open, home, permit.take());
                } else {
                    refuse_unknown_session(&mut stream, binding, &open.session_id).await;
                }
                return Opening::Ended;
            }
        }
    }

    // Credentials are checked before the session answers the OPEN (argon2 off the event loop).
    let mut user: Option<std::sync::Arc<str>> = None;
    let access = match &first_open {
        Some(open) => {
            let credentials = config.auth.credentials_of(open, &upgrade_credentials);
            if let Ok(crate::auth::Credentials::Password { user: name, .. }) = &credentials {
                user = Some(name.as_str().into());
            }
            let anonymous_allowed = config.allow_anonymous;
            Box::pin(crate::auth::verifier::authenticate(
                &config.auth,
                credentials,
                anonymous_allowed,
                peer.ip(),
                now_ms,
            ))
            .await
        }
        // Not an OPEN: the session refuses it before access matters.
        None => crate::auth::Access::refused(),
    };
    if let crate::auth::Access::Refused(code, _) = &access {
        log!(Level::Info, "shard {}: OPEN refused", shard.id.0; peer = peer, code = code.as_u16());
    }
    // A session that would open takes its place in --max-sessions first.
    let session_permit = match (&first_open, &access) {
        (Some(_), crate::auth::Access::Granted(..)) => match shard.admission.admit_session() {
            Ok(session_permit) => Some(session_permit),
            Err(reason) => {
                log_limited(
                    &REFUSAL_LOG,
                    || log!(Level::Warn, "shard {}: OPEN refused", shard.id.0; peer = peer, reason = reason),
                );
                Box::pin(refuse_session(&mut stream, binding, ErrorCode::Unavailable, reason)).await;
                return Opening::Ended;
            }
        },
        _ => None,
    };

    // A new session: its first frame goes through the session's own rules (OPEN or a fatal error).
    let user = user.filter(|_| matches!(access, crate::auth::Access::Granted(..)));
    let (me, attachment) = shard.open_session(upgrade.protocol, stream.socket(), binding, payload, access);
    shard.with_conn(me.conn, |state| {
        state.session_permit = session_permit;
        if cluster_link {
            state.session.mark_cluster_link();
        }
        ((), Wake::default())
    });
    shard.note_peer(me.conn, peer);
    if let Some(user) = user {
        shard.note_user(me.conn, user);
    }
    log!(
        Level::Info,
        "shard {}: connection opened", shard.id.0;
        peer = peer,
        protocol = upgrade.protocol.name(),
        conn = format_args!("{}.{}", me.conn.index, me.conn.generation),
    );
    Opening::Opened(Box::new(Attached { me, attachment, stream, buf, decoder }))
}

/// Reads until the first complete WebSocket data message, answering pings on the way.
/// `None`: the peer closed, failed or broke the WebSocket protocol (already answered).
async fn first_message<S: Stream>(
    stream: &mut S,
    buf: &mut ReadBuffer,
    decoder: &mut Decoder,
) -> Option<(Binding, Bytes)> {
    loop {
        loop {
            match decoder.next_event(buf.bytes_mut()) {
                Ok(Some(WsEvent::Binary(payload))) => return Some((Binding::Binary, payload)),
                Ok(Some(WsEvent::Text(payload))) => return Some((Binding::Text, payload)),
                Ok(Some(WsEvent::Ping(payload))) => {
                    write_frames(stream, |out| out.push_control(OpCode::Pong, &payload)).await;
                }
                Ok(Some(WsEvent::Pong(_))) => {}
                Ok(Some(WsEvent::Close(frame))) => {
                    let payload = frame.map(|frame| close_payload(frame.code, "")).unwrap_or_default();
                    write_frames(stream, |out| out.push_control(OpCode::Close, &payload)).await;
                    stream.shutdown().await;
                    return None;
                }
                Ok(None) => break,
                Err(WsError { close_code, reason }) => {
                    write_frames(stream, |out| out.push_control(OpCode::Close, &close_payload(close_code, &reason)))
                        .await;
                    stream.shutdown().await;
                    return None;
                }
            }
        }
        match read_more(stream, buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Writes frames built into a throw-away write queue (the rare paths before a session exists).
async fn write_frames<W: WriteSide>(stream: &mut W, build: impl FnOnce(&mut Outbound)) {
    let mut outbound = Outbound::new();
    build(&mut outbound);
    if let Some(batch) = outbound.take_batch(WriteBatch::default()) {
        let _ = stream.write_bytes(batch.to_vec()).await;
    }
}

/// Closes a WebSocket that has no session on this shard with 1001 (the broker is shutting down).
async fn say_going_away<W: WriteSide>(stream: &mut W) {
    let payload = close_payload(crate::ws::close_code::GOING_AWAY, "broker shutting down");
    write_frames(stream, |out| out.push_control(OpCode::Close, &payload)).await;
    stream.shutdown().await;
}

/// Sends a fatal ERROR and the matching close before any session exists, then shuts down.
async fn refuse_session<W: WriteSide>(stream: &mut W, binding: Binding, code: ErrorCode, reason: String) {
    write_frames(stream, |out| {
        out.push_frame(binding, &Frame::Error(ErrorFrame::fatal(code, 0, 0, &reason)));
        out.push_control(OpCode::Close, &close_payload(code.as_u16(), &reason));
    })
    .await;
    stream.shutdown().await;
}

async fn refuse_unknown_session<W: WriteSide>(stream: &mut W, binding: Binding, session_id: &[u8]) {
    let reason = unknown_session_reason(session_id);
    refuse_session(stream, binding, ErrorCode::UnknownSession, reason).await;
}

/// Passes the socket to the shard that holds the session being resumed.
#[allow(clippy::too_many_arguments)]
fn hand_over<S: Stream>(
    shard: &Shard,
    stream: S,
    peer: SocketAddr,
    buf: ReadBuffer,
    binding: Binding,
    open: mbws::Open,
    home: ShardId,
    permit: Option<ConnectionPermit>,
) {
    let buffered = buf.into_bytes();
    let (stream, tls) = stream.into_parts();
    // SAFETY: `stream` (alive until the drop below) owns the descriptor, so the number is
    // open; dup(2) touches no memory of ours, and its result is checked and owned below.
    let duplicate = unsafe { libc::dup(stream.as_raw_fd()) };
    if duplicate < 0 {
        log!(
            Level::Warn,
            "shard {}: cannot hand the connection from {peer} to shard {}: dup failed",
            shard.id.0,
            home.0
        );
        return;
    }
    // Dropping our stream closes our descriptor only; the socket lives on in the duplicate.
    drop(stream);
    // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(duplicate) };
    log!(Level::Debug, "shard {}: handing the resume from {peer} to shard {}", shard.id.0, home.0);
    shard.hand_over(home, Box::new(Adoption { socket, peer, buffered, binding, open, tls, permit }));
}

/// Takes a socket handed over by another shard and resumes its session here.
pub async fn adopt(shard: Rc<Shard>, adoption: Adoption) {
    let Adoption { socket, peer, buffered, binding, open, tls, permit } = adoption;
    let std_stream = std::net::TcpStream::from(socket);
    let stream = match TcpStream::from_std(std_stream) {
        Ok(stream) => stream,
        Err(error) => {
            log!(Level::Warn, "shard {}: cannot adopt the connection from {peer}: {error}", shard.id.0);
            return;
        }
    };
    let buf = ReadBuffer::new(buffered, shard.config.read_buffer_bytes);
    match tls {
        None => resume(shard, stream, peer, buf, binding, open, permit).await,
        Some(tls) => match *tls {
            TlsState::Rustls(state) => {
                resume(shard, TlsStream::new(stream, *state), peer, buf, binding, open, permit).await
            }
            TlsState::InPlace(state) => {
                resume(shard, InPlaceStream::new(stream, state), peer, buf, binding, open, permit).await
            }
        },
    }
}

/// Resumes the session `open` names, on this shard, over `stream` (counted by `_permit`
/// until it closes).
async fn resume<S: Stream>(
    shard: Rc<Shard>,
    mut stream: S,
    peer: SocketAddr,
    mut buf: ReadBuffer,
    binding: Binding,
    open: mbws::Open,
    _permit: Option<ConnectionPermit>,
) {
    if shard.shutdown.has_fired() {
        // Handed over (or resumed) after this shard closed its connections.
        Box::pin(say_going_away(&mut stream)).await;
        return;
    }
    let resumed = shard.resume_session(&open, binding, stream.socket());
    let Resumed { me, attachment, stale_socket } = match resumed {
        Ok(resumed) => resumed,
        Err(refusal) => {
            let (code, reason) = refusal.error(&open);
            // Boxed: a rare path that should not size the task of a resumed session.
            Box::pin(refuse_session(&mut stream, binding, code, reason)).await;
            return;
        }
    };
    if let Some(socket) = stale_socket {
        // The old connection has not noticed it is dead (or the client raced it): it is
        // superseded. Its tasks see the new attachment; its writer says why it ends.
        supersede(socket);
    }
    shard.note_peer(me.conn, peer);
    shard.run_work();
    log!(
        Level::Info,
        "shard {}: session resumed", shard.id.0;
        peer = peer,
        conn = format_args!("{}.{}", me.conn.index, me.conn.generation),
    );
    let mut decoder = Decoder::new(Role::Server, shard.config.max_frame_bytes, shard.config.max_message_bytes);
    run(&shard, me, attachment, stream, &mut buf, &mut decoder, &peer).await;
}

/// Ends a superseded connection's reading side at once (its reader stops), and gives its writer
/// `CLOSE_GRACE` to finish what it is writing and send its farewell
/// ([`superseded_farewell`]) before the socket is shut down for good, however stuck its writes are.
fn supersede(socket: RawFd) {
    // SAFETY: the old connection's stream still owns `socket` (the caller holds that connection's
    // slot, whose stream closes the descriptor only when its tasks end), so the number names
    // that socket and no other; shutdown(2) changes the socket's state, not the descriptor.
    unsafe { libc::shutdown(socket, libc::SHUT_RD) };
    // SAFETY: `socket` is open (as above); dup(2) touches no memory of ours, and its result is
    // checked and then owned below, so the timer never touches a number reused by then.
    let duplicate = unsafe { libc::dup(socket) };
    if duplicate < 0 {
        // SAFETY: `socket` is still open and owned by the old stream (as above).
        unsafe { libc::shutdown(socket, libc::SHUT_RDWR) };
        return;
    }
    // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(duplicate) };
    monoio::spawn(async move {
        monoio::time::sleep(CLOSE_GRACE).await;
        // SAFETY: shutdown(2) on the descriptor this task owns.
        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
    });
}

/// The running phase: a writer task and this reader, until the socket ends; then the session
/// is detached (resumable) or ended.
///
/// The caller's state is borrowed, not moved in: an async fn keeps its arguments for its whole
/// life, so moved-in values would be held twice in every connection's task.
#[allow(clippy::too_many_arguments)]
async fn run<S: Stream>(
    shard: &Rc<Shard>,
    me: ConnRef,
    attachment: Attachment,
    stream: S,
    buf: &mut ReadBuffer,
    decoder: &mut Decoder,
    peer: &SocketAddr,
) {
    let (mut reader, writer) = stream.into_split();
    let binding = shard.with_conn(me.conn, |state| (state.session.binding(), Wake::default()));
    let binding = binding.expect("a running connection has a slot");
    shard.set_writer_running(me.conn, true);
    monoio::spawn(write_loop(shard.clone(), me, attachment, binding, writer));
    read_loop(shard, me, attachment, &mut reader, buf, decoder).await;

    // Why it closed, read before the slot may be freed.
    let reason = shard.with_conn(me.conn, |state| {
        let reason = state
            .close_reason()
            .map_or_else(|| "connection lost (no close frame)".to_string(), |close| close.to_string());
        (reason, Wake::default())
    });
    let reason = reason.unwrap_or_default();
    let conn = format!("{}.{}", me.conn.index, me.conn.generation);
    match shard.reader_finished(me.conn, attachment) {
        None => return, // Superseded: the session belongs to a newer connection now.
        Some(ReaderFinished::Detached { expires_at_ms }) => {
            let expiry = Duration::from_millis(expires_at_ms.saturating_sub(now_ms()));
            log!(
                Level::Info,
                "shard {}: connection closed, session kept for resume", shard.id.0;
                peer = peer,
                reason = reason,
                conn = conn,
                expiry_ms = expiry.as_millis(),
            );
            monoio::spawn(expire_later(shard.clone(), me, attachment, expiry, *peer));
        }
        Some(ReaderFinished::Ended) => {
            log!(Level::Info, "shard {}: connection closed", shard.id.0; peer = peer, reason = reason, conn = conn);
        }
    }
    shard.run_work();
}

/// Ends a detached session that nobody resumed by its expiry (`Lifecycle::expire`).
async fn expire_later(shard: Rc<Shard>, me: ConnRef, attachment: Attachment, expiry: Duration, peer: SocketAddr) {
    let mut wait = expiry;
    loop {
        monoio::time::sleep(wait).await;
        match shard.expire_session(me.conn, attachment) {
            Some(Expiry::Expired) => break,
            Some(Expiry::Resumed) | None => return,
            Some(Expiry::NotBefore(at)) => wait = Duration::from_millis(at.saturating_sub(now_ms())), // Woken early.
        }
    }
    log!(
        Level::Info,
        "shard {}: session expired, not resumed in time", shard.id.0;
        peer = peer,
        conn = format_args!("{}.{}", me.conn.index, me.conn.generation),
    );
    shard.run_work();
}

/// A complete request that is not an accepted upgrade: the response to send before closing.
enum NotUpgraded {
    Refused(HandshakeError),
    /// A plain GET of a file the broker serves ([`assets`]): the whole response.
    Served(Vec<u8>),
    /// Reading the request failed (a failed TLS handshake among others): nothing to answer.
    ReadFailed(std::io::Error),
}

/// Reads until a complete upgrade request is parsed and accepted. `Err(Some)` is an answer to
/// send back (a refusal, or a served file); `Err(None)` means the peer went away.
async fn read_upgrade<R: ReadSide>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_bytes: usize,
) -> Result<(handshake::Upgrade<Subprotocol>, crate::auth::UpgradeCredentials, bool), Option<NotUpgraded>> {
    loop {
        match handshake::parse_request(buf, max_bytes) {
            Ok(Some((request, consumed))) => {
                if let Some(response) = assets::response(&request) {
                    return Err(Some(NotUpgraded::Served(response)));
                }
                let upgrade =
                    handshake::validate_upgrade(&request).map_err(|refusal| Some(NotUpgraded::Refused(refusal)))?;
                // Bytes after the request (a first frame sent eagerly) stay in `buf`.
                buf.advance(consumed);
                // Another cluster node's forwarder or relay (it grants nothing: docs/SECURITY.md).
                let cluster_link = request.header(crate::cluster::view::LINK_HEADER).is_some();
                return Ok((upgrade, crate::auth::UpgradeCredentials::from_request(&request), cluster_link));
            }
            Ok(None) => {}
            Err(refusal) => return Err(Some(NotUpgraded::Refused(refusal))),
        }
        let owned = std::mem::take(buf);
        if owned.capacity() - owned.len() == 0 {
            return Err(Some(NotUpgraded::Refused(HandshakeError {
                status: 431,
                reason: format!("the upgrade request is larger than {max_bytes} bytes (max_handshake_bytes)"),
            })));
        }
        let (result, tail) = stream.read_tail(ReadTail::new(owned)).await;
        *buf = tail.bytes;
        match result {
            Ok(0) => return Err(None),
            Err(error) => return Err(Some(NotUpgraded::ReadFailed(error))),
            Ok(_) => {}
        }
    }
}

async fn read_loop<R: ReadSide>(
    shard: &Rc<Shard>,
    me: ConnRef,
    attachment: Attachment,
    reader: &mut R,
    buf: &mut ReadBuffer,
    decoder: &mut Decoder,
) {
    loop {
        wait_until_reader_may_continue(shard, me).await;
        let step = shard.bytes_read(me.conn, attachment, decoder, buf.bytes_mut());
        let woke_writer = shard.run_work();
        match step {
            ReadStep::Closing => break,
            ReadStep::Paused => continue,
            ReadStep::NeedMore => {}
        }
        if woke_writer {
            writes_first(shard).await;
        }
        // Silence is bounded by twice the heartbeat, when one was agreed.
        let heartbeat_ms = shard.with_conn(me.conn, |state| (state.session.heartbeat_ms(), Wake::default()));
        let heartbeat_ms = heartbeat_ms.unwrap_or(0);
        let result = if heartbeat_ms == 0 {
            read_more(reader, buf).await
        } else {
            // Boxed, as in `serve`: the timer stays out of the task's own allocation.
            let deadline = Duration::from_millis(2 * u64::from(heartbeat_ms));
            match Box::pin(monoio::time::timeout(deadline, read_more(reader, buf))).await {
                Ok(result) => result,
                Err(_) => {
                    let reason = format!(
                        "nothing received for {} ms, twice the heartbeat interval; send PING when idle",
                        deadline.as_millis()
                    );
                    shard.with_conn(me.conn, |state| {
                        state.close_with_error(attachment, ErrorCode::Timeout, reason);
                        ((), Wake::ALL)
                    });
                    shard.run_work();
                    return;
                }
            }
        };
        match result {
            Ok(0) | Err(_) => return, // EOF or reset: nothing more to say to this peer.
            Ok(_) => {}
        }
    }
    let current = shard.with_conn(me.conn, |state| (state.lifecycle().is_current(attachment), Wake::default()));
    if current == Some(true) {
        Box::pin(wait_for_peer_close(reader, decoder, buf)).await;
    }
}

/// Lets the writers a round woke submit their writes before this reader re-arms its read.
///
/// The runtime submits queued operations in the order the tasks pushed them: a reader that
/// re-arms at once puts its read ahead of the round's writes, and the kernel then tries that
/// read (and arms a poll for it when the next message has not come) before it writes the
/// delivery (docs/PERFORMANCE.md, "Session 14: kernel entries per message"). The reader waits
/// in [`DeferredReaders`](crate::shard::DeferredReaders) until the first of those writers
/// runs. Only called when the round woke a parked writer, which then has yet to run.
async fn writes_first(shard: &Shard) {
    let mut deferred = false;
    std::future::poll_fn(|cx| {
        if deferred {
            return Poll::Ready(());
        }
        deferred = true;
        shard.deferred_readers.defer(cx.waker());
        Poll::Pending
    })
    .await
}

async fn wait_until_reader_may_continue(shard: &Shard, me: ConnRef) {
    std::future::poll_fn(|cx| {
        let may = shard.with_conn(me.conn, |state| (state.reader_may_continue(), Wake::default()));
        if may.unwrap_or(true) {
            Poll::Ready(())
        } else {
            shard.park(me.conn, false, cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// After we queued a close frame: discard input until the peer's close frame or EOF, bounded
/// by `CLOSE_GRACE`.
async fn wait_for_peer_close<R: ReadSide>(reader: &mut R, decoder: &mut Decoder, buf: &mut ReadBuffer) {
    let _ = monoio::time::timeout(CLOSE_GRACE, async {
        loop {
            loop {
                match decoder.next_event(buf.bytes_mut()) {
                    Ok(Some(WsEvent::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                }
            }
            match read_more(reader, buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Writes whatever the connection queues, one vectored write per batch, until the reader is
/// done, or a newer connection took the slot over: then it ends this connection with the
/// [`superseded_farewell`] in `binding` (the binding of this connection's OPEN), unless a close
/// frame was already written.
///
/// Once the connection starts closing (a close frame queued, the reader finished, or the slot
/// taken over), every write from then on, the one in flight included, must end by
/// [`CLOSE_GRACE`] after it: a peer that stopped reading would otherwise hold the connection,
/// its session and its unacknowledged deliveries forever. A write in flight learns that closing
/// began through [`Wake::closing`] (its waker is registered once, for the writer's life), so
/// the normal path pays one branch per batch; when the grace runs out, the batch is dropped
/// and the connection is torn down ([`end_reading_now`]).
async fn write_loop<W: WriteSide>(
    shard: Rc<Shard>,
    me: ConnRef,
    attachment: Attachment,
    binding: Binding,
    mut writer: W,
) {
    let mut batch = WriteBatch::default();
    let mut superseded = false;
    // A batch taken while closing holds the close frame (it is queued as closing begins).
    let mut close_taken = false;
    let mut failed = false;
    let mut cut_short = false;
    // When this writer's writes must be done by: set as closing begins.
    let mut deadline: Option<monoio::time::Instant> = None;
    // The writer's waker is registered for `Wake::closing` (at its first write that waits).
    let mut watching = false;
    loop {
        let mut spare = Some(std::mem::take(&mut batch));
        let next = std::future::poll_fn(|cx| {
            // Readers whose round woke this writer go on after it has queued its write.
            shard.deferred_readers.release();
            let spare = spare.take().unwrap_or_default();
            let next = shard.with_conn(me.conn, |state| {
                let next = state.take_write_batch(attachment, spare);
                ((next, state.lifecycle().is_stopping()), Wake::default())
            });
            // No slot: the session ended under a newer attachment, which superseded this one.
            match next.unwrap_or((NextWrite::Superseded, true)) {
                (NextWrite::Wait, _) => {
                    shard.park(me.conn, true, cx.waker());
                    Poll::Pending
                }
                next => Poll::Ready(next),
            }
        })
        .await;
        let (taken, closing) = match next {
            (NextWrite::Batch { batch, closing }, stopping) => {
                if (closing || stopping) && deadline.is_none() {
                    deadline = Some(monoio::time::Instant::now() + CLOSE_GRACE);
                }
                (batch, closing)
            }
            (NextWrite::Superseded, _) => {
                superseded = true;
                break;
            }
            (NextWrite::Done | NextWrite::Wait, _) => break,
        };
        batch = taken;
        close_taken |= closing;
        // Auto-ack credit goes back once the batch is written, or once it is lost: with a failed
        // write, or with a write the close grace cut short (which drops the batch). Taken out
        // first so that it survives the batch.
        let credits = std::mem::take(&mut batch.credits);
        // Boxed: the write (and its timer) is much larger than this loop's other state, and held
        // inline it would size the task of every idle connection.
        // The timers are boxed too, for the same reason (and they are only for closing).
        let mut write = Box::pin(writer.write_batch(batch));
        let written = match deadline {
            Some(at) => Box::pin(monoio::time::timeout_at(at, write)).await.ok(),
            None => match until_closing(&shard, me, attachment, write.as_mut(), &mut watching).await {
                Some(written) => Some(written),
                None => {
                    // Closing began during the write: it may take the grace, no more.
                    let at = monoio::time::Instant::now() + CLOSE_GRACE;
                    deadline = Some(at);
                    Box::pin(monoio::time::timeout_at(at, write)).await.ok()
                }
            },
        };
        let outcome = match written {
            Some((result, returned)) => {
                batch = returned;
                if result.is_ok() {
                    WriteOutcome::Written
                } else {
                    WriteOutcome::Failed
                }
            }
            None => {
                batch = WriteBatch::default(); // The timeout dropped the batch; the writer ends.
                WriteOutcome::CutShort
            }
        };
        let next = shard.write_completed(me.conn, attachment, outcome, credits);
        match next.unwrap_or(Written::Superseded) {
            Written::Continue { .. } => {}
            Written::Failed => {
                failed = true;
                break;
            }
            Written::CutShort => {
                log!(
                    Level::Debug,
                    "shard {}: conn {}: close grace ran out before the last writes; dropping them",
                    shard.id.0,
                    me.conn.index
                );
                cut_short = true;
                break;
            }
            Written::Superseded => {
                superseded = true;
                break;
            }
        }
    }
    // Done with the slot: an ended connection's is freed now (unless a newer attachment, with
    // its own writer, holds it).
    let current = shard.with_conn(me.conn, |state| (state.lifecycle().is_current(attachment), Wake::default()));
    if current == Some(true) {
        if watching {
            shard.watch_closing(me.conn, None);
        }
        shard.set_writer_running(me.conn, false);
    }
    if cut_short {
        // The grace is spent: nothing more is written (a TLS close_notify would wait on the
        // same full socket), and a reader still waiting on the silent peer ends now.
        if current == Some(true) {
            end_reading_now(&shard, me, attachment);
        }
        return;
    }
    if superseded && !close_taken && !failed {
        if let Some(farewell) = superseded_farewell(binding) {
            let _ = Box::pin(monoio::time::timeout(CLOSE_GRACE, writer.write_batch(farewell))).await;
        }
    }
    // Bounded as the writes are (a TLS close_notify waits for room on the socket).
    let until = deadline.unwrap_or_else(|| monoio::time::Instant::now() + CLOSE_GRACE);
    let _ = Box::pin(monoio::time::timeout_at(until, writer.shutdown())).await;
    if close_taken && current == Some(true) {
        end_reading_after_grace(shard, me, attachment);
    }
}

/// Awaits `write` until it is done (`Some`), or until the connection starts closing meanwhile
/// (`None`: the write goes on under the close grace). The first time a write waits, the writer
/// registers its waker for [`Wake::closing`] (`watching`); after that, only a poll that finds
/// the write still waiting (a closing wake, or a partial write) looks at the connection.
async fn until_closing<F: std::future::Future>(
    shard: &Shard,
    me: ConnRef,
    attachment: Attachment,
    mut write: std::pin::Pin<&mut F>,
    watching: &mut bool,
) -> Option<F::Output> {
    let mut first = true;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(written) = write.as_mut().poll(cx) {
            return Poll::Ready(Some(written));
        }
        // The first poll of a batch's write follows the take, which saw the connection's
        // state (no await between): nothing to look at, unless the waker is not registered yet.
        if !first || !*watching {
            let closing = shard.with_conn(me.conn, |state| {
                let lifecycle = state.lifecycle();
                (!lifecycle.is_current(attachment) || lifecycle.is_stopping(), Wake::default())
            });
            if closing.unwrap_or(true) {
                return Poll::Ready(None);
            }
            if !*watching {
                // Only while this attachment is current: a superseded writer must not take the
                // registration of its successor.
                shard.watch_closing(me.conn, Some(cx.waker()));
                *watching = true;
            }
        }
        first = false;
        Poll::Pending
    })
    .await
}

/// The close grace ran out on a write to this connection: its reader, if it still waits on the
/// peer, ends now (shutdown(2) of both directions; the pending read returns 0), and the session
/// is detached or ended as its rules say.
fn end_reading_now(shard: &Shard, me: ConnRef, attachment: Attachment) {
    let socket = shard.with_conn(me.conn, |state| {
        let lifecycle = state.lifecycle();
        let reading = lifecycle.is_current(attachment) && !lifecycle.reader_finished_already();
        (if reading { lifecycle.socket() } else { None }, Wake::default())
    });
    if let Some(Some(socket)) = socket {
        // SAFETY: as in `end_reading_after_grace`: the slot is still this attachment's and its
        // reader has not finished, so the reader's half of the stream owns `socket`; shutdown(2)
        // changes the socket's state, not the descriptor.
        unsafe { libc::shutdown(socket, libc::SHUT_RDWR) };
    }
}

/// Our close frame is written: the peer has `CLOSE_GRACE` to answer it (or to close), then the
/// reader is ended however silent the peer is.
///
/// A close begun by the reader is bounded by [`wait_for_peer_close`]; one begun elsewhere (an
/// expired token, a kick, fencing) finds the reader waiting in a read that only the peer can
/// finish. A peer that vanished without a FIN (and agreed no heartbeat) would keep the session,
/// its subscriptions and their unacknowledged deliveries forever (found by the simulator,
/// seed 774 with expiring credentials).
fn end_reading_after_grace(shard: Rc<Shard>, me: ConnRef, attachment: Attachment) {
    monoio::spawn(async move {
        monoio::time::sleep(CLOSE_GRACE).await;
        let socket = shard.with_conn(me.conn, |state| {
            let lifecycle = state.lifecycle();
            let reading = lifecycle.is_current(attachment) && !lifecycle.reader_finished_already();
            (if reading { lifecycle.socket() } else { None }, Wake::default())
        });
        if let Some(Some(socket)) = socket {
            // SAFETY: the slot is still this attachment's and its reader has not finished, so
            // the reader's half of the stream is alive and owns `socket` (it closes the
            // descriptor only after `reader_finished`): the number names this connection's
            // socket. shutdown(2) changes the socket's state (the pending read returns 0), not
            // the descriptor.
            unsafe { libc::shutdown(socket, libc::SHUT_RD) };
        }
    });
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::task::{Poll, Waker};

    use crate::shard::DeferredReaders;

    /// A task parked until woken once; it records `name` when it runs after the wake, having
    /// released the deferred readers first, as a connection's writer does.
    async fn parked_writer(
        parked: Rc<RefCell<Option<Waker>>>,
        deferred: Rc<DeferredReaders>,
        order: Rc<RefCell<Vec<&'static str>>>,
    ) {
        let mut woken = false;
        std::future::poll_fn(|cx| {
            deferred.release();
            if woken {
                return Poll::Ready(());
            }
            woken = true;
            *parked.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        order.borrow_mut().push("writer submits");
    }

    /// What the read loop relies on to put a round's writes ahead of its re-armed read: a
    /// reader that woke a parked writer and waits in `DeferredReaders` goes on only after that
    /// writer ran. (A task that merely wakes itself is run again first: it would not do.)
    #[test]
    fn a_reader_that_woke_a_writer_goes_on_after_the_writer_ran() {
        for defer in [true, false] {
            let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().expect("runtime");
            let order = runtime.block_on(async move {
                let order = Rc::new(RefCell::new(Vec::new()));
                let parked: Rc<RefCell<Option<Waker>>> = Rc::default();
                let deferred = Rc::new(DeferredReaders::default());
                let writer = monoio::spawn(parked_writer(parked.clone(), deferred.clone(), order.clone()));
                let reader = {
                    let order = order.clone();
                    monoio::spawn(async move {
                        // Spawned first, the writer has parked, as an idle connection's has.
                        parked.borrow_mut().take().expect("parked writer").wake();
                        let mut waited = false;
                        std::future::poll_fn(|cx| {
                            if waited {
                                return Poll::Ready(());
                            }
                            waited = true;
                            if defer {
                                deferred.defer(cx.waker());
                            } else {
                                cx.waker().wake_by_ref();
                            }
                            Poll::Pending
                        })
                        .await;
                        order.borrow_mut().push("reader re-arms");
                    })
                };
                reader.await;
                writer.await;
                Rc::try_unwrap(order).expect("tasks done").into_inner()
            });
            let expected =
                if defer { ["writer submits", "reader re-arms"] } else { ["reader re-arms", "writer submits"] };
            assert_eq!(order, expected, "deferred in DeferredReaders: {defer}");
        }
    }
}
