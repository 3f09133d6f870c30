//! A connection's state without its IO: session, write queue and lifecycle, changed by events
//! (bytes read, a batch written, the reader finished, the expiry came) that answer with what
//! the IO shell must do (wake the writer or the reader, close, detach).
//!
//! This is what the shard core is to own per connection slot (`shard/core.rs`, "Next
//! steps"); for now `super::Connection` holds it beside the tasks' wakers. Nothing here reads
//! a clock (`now_ms` comes in), touches a socket or wakes a task, so the unit tests below
//! drive a connection with bytes in and frames out.

use bytes::BytesMut;

use super::lifecycle::{Attachment, Lifecycle};
use super::outbound::{CreditReturns, Outbound, WriteBatch};
use super::session::{Effects, Session};
use crate::broker::{AddressCommand, ConnRef, ShardId};
use crate::log;
use crate::logging::Level;
use crate::mbws::{self, Binding, ErrorCode};
use crate::ws::message::{close_payload, Decoder, Received};
use crate::ws::{OpCode, WsError};

/// The sans-IO part of a connection (see the module doc).
pub struct ConnState {
    pub session: Session,
    /// The client's address, as the shell accepted it (for the admin API; `None` in the
    /// simulator and until the shell says).
    pub peer: Option<std::net::SocketAddr>,
    /// The user whose password opened the session (`None`: a token or anonymous), for the
    /// admin API's list and its changes of users.
    pub user: Option<std::sync::Arc<str>>,
    pub outbound: Outbound,
    /// The session's place in `--max-sessions`, given back when the slot is freed (the shell
    /// sets it; `None` in the simulator and the unit tests).
    pub session_permit: Option<crate::shard::admission::SessionPermit>,
    max_outbound_bytes: usize,
    lifecycle: Lifecycle,
    /// Who began closing the current attachment, with what code and reason (for the log).
    close: Option<CloseReason>,
    /// The broker is stopping: no more input is processed (the reader pauses), so the SENDs
    /// already taken can be answered before the close ([`ConnState::stop_input`]).
    input_stopped: bool,
}

/// Why a connection closed: the first close frame, the broker's or the peer's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub by_peer: bool,
    pub reason: String,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.by_peer, self.reason.is_empty()) {
            (true, _) => write!(formatter, "closed by the client ({})", self.code),
            (false, true) => write!(formatter, "closed by the broker ({})", self.code),
            (false, false) => write!(formatter, "closed by the broker ({}: {})", self.code, self.reason),
        }
    }
}

/// Which of a connection's tasks the shell must wake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Wake {
    pub writer: bool,
    pub reader: bool,
    /// The connection is closing (or its reader finished, or it was superseded): a writer in
    /// the middle of a write is woken too, to bound that write by the close grace (the shell's
    /// `write_loop`; a parked writer is woken by `writer`).
    pub closing: bool,
}

impl Wake {
    pub const ALL: Wake = Wake { writer: true, reader: true, closing: true };
}

/// Where the reader stands after the bytes it read were handled ([`ConnState::bytes_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStep {
    /// Everything buffered is handled; read more.
    NeedMore,
    /// Stop until the session can take more SENDs or the write queue drains.
    Paused,
    /// The connection is closing (or was superseded): stop reading. The writer and reader
    /// are to be woken.
    Closing,
}

/// What the writer does next ([`ConnState::take_write_batch`]).
pub enum NextWrite {
    /// Write this batch; `closing` when it may hold the close frame (the peer may no longer
    /// read, so the write is bounded by the close grace).
    Batch { batch: WriteBatch, closing: bool },
    /// Nothing to write yet: wait (holding no write buffers) to be woken.
    Wait,
    /// Everything is written and the reader finished, or the close frame is queued: end.
    Done,
    /// A newer attachment took the slot over: end, with the superseded farewell.
    Superseded,
}

/// How the write of a batch went (the event [`ConnState::write_completed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// All of it is on the wire.
    Written,
    /// The socket failed: the peer is gone.
    Failed,
    /// The close grace ran out first: the rest of the batch is dropped.
    CutShort,
}

/// What the writer does after a batch was written ([`ConnState::write_completed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Go on; wake the reader if `wake_reader` (the queue drained below its bound).
    Continue { wake_reader: bool },
    /// The write failed: the peer is gone; input stops. Wake both tasks.
    Failed,
    /// The close grace ran out: the writer ends (the farewell of a superseded connection is
    /// not written either).
    CutShort,
    /// A newer attachment took the slot over meanwhile.
    Superseded,
}

/// How a detached session's expiry timer went ([`ConnState::expire`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// The session ended: its commands are queued; free the slot.
    Expired,
    /// Resumed meanwhile: nothing to do.
    Resumed,
    /// Not due until this time (the timer woke early).
    NotBefore(u64),
}

impl ConnState {
    pub fn new(session: Session, max_outbound_bytes: usize) -> ConnState {
        ConnState {
            session,
            peer: None,
            user: None,
            outbound: Outbound::new(),
            session_permit: None,
            max_outbound_bytes,
            lifecycle: Lifecycle::default(),
            close: None,
            input_stopped: false,
        }
    }

    /// The broker is stopping: input is no longer processed (bytes read stay unread, their
    /// SENDs unanswered, as if never sent), while what was taken is answered. A close still
    /// goes through (the reader then reads on to the peer's close frame).
    pub fn stop_input(&mut self) {
        self.input_stopped = true;
    }

    /// Who closed the current attachment and why; `None` if its socket ended without a close.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close.as_ref()
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Starts a new attachment of the socket `socket`, with a fresh write queue. Wake both
    /// tasks: those of an earlier attachment notice they are superseded and stop.
    pub fn attach(&mut self, socket: std::os::fd::RawFd) -> Attachment {
        self.outbound = Outbound::new();
        self.close = None;
        self.lifecycle.attach(socket)
    }

    /// The reader may go on reading: its input is to stop (closing), or the session can take
    /// more SENDs and the write queue is under its bound.
    pub fn reader_may_continue(&self) -> bool {
        self.lifecycle.is_stopping()
            || (!self.input_stopped
                && self.session.can_accept_sends()
                && self.outbound.queued_bytes() < self.max_outbound_bytes)
    }

    /// End of a round of work: cumulative receipt; the writer has something to write, the
    /// reader may go on.
    pub fn flush(&mut self) -> Wake {
        self.session.flush(&mut self.outbound);
        Wake {
            writer: !self.outbound.is_empty(),
            reader: self.reader_may_continue(),
            closing: self.lifecycle.is_stopping(),
        }
    }

    /// Queues a close frame and stops processing input. Wake both tasks.
    pub fn begin_close(&mut self, code: u16, reason: &str) {
        if self.lifecycle.begin_close() {
            self.outbound.push_control(OpCode::Close, &close_payload(code, reason));
            self.close = Some(CloseReason { code, by_peer: false, reason: reason.to_string() });
        }
    }

    /// An operator ends the session (the admin API): a fatal ERROR 4403, then the close; the
    /// session is not kept for a resume. False (nothing done) unless a socket is attached and
    /// still processes input. Wake both tasks.
    pub fn end_by_operator(&mut self, code: ErrorCode, reason: String) -> bool {
        if !matches!(self.lifecycle.state(), super::lifecycle::State::Running { .. }) {
            return false;
        }
        let end = self.session.end_by_operator(code, reason, &mut self.outbound);
        self.begin_close(end.close_code, &end.reason);
        true
    }

    /// A drain closes this connection (docs/OPERATIONS.md, "Drain"): a fatal ERROR 4503
    /// (unavailable) with `reason`, then the close with 4503; the session is not kept for a
    /// resume (its client opens a new one on another broker). False (nothing done) unless a
    /// socket is attached and still processes input. Wake both tasks.
    pub fn end_for_drain(&mut self, reason: String) -> bool {
        if !matches!(self.lifecycle.state(), super::lifecycle::State::Running { .. }) {
            return false;
        }
        let end = self.session.end_for_drain(reason, &mut self.outbound);
        self.begin_close(end.close_code, &end.reason);
        true
    }

    /// The session's credentials expired (a JWT's `exp`, found by
    /// [`ShardCore::expire_credentials`](crate::shard::core::ShardCore::expire_credentials)):
    /// an attached session gets fatal 4401 and the close, and is not kept for a resume (wake
    /// both tasks); a detached one ends now (true: free the slot), so that its unacknowledged
    /// deliveries and its credit go back to their addresses at once instead of waiting out the
    /// session expiry for a resume that can no longer come (found by the simulator, seed 98
    /// with expiring credentials: six deliveries held until the run gave up).
    pub fn credentials_expired(&mut self, commands: &mut Vec<(ShardId, AddressCommand)>) -> bool {
        let reason = "the session's token expired (its exp claim); open a new session with a fresh token".to_string();
        match self.lifecycle.state() {
            super::lifecycle::State::Running { .. } => {
                let end = self.session.end_unprompted(ErrorCode::Unauthenticated, reason, &mut self.outbound);
                self.begin_close(end.close_code, &end.reason);
                false
            }
            super::lifecycle::State::Detached { .. } => {
                self.lifecycle.end_detached();
                self.session.on_disconnect(commands);
                true
            }
            _ => false,
        }
    }

    /// The reader's silence outlasted twice the heartbeat (or a like fault the session did not
    /// see itself): a fatal ERROR, then the close. Nothing for a superseded attachment.
    pub fn close_with_error(&mut self, attachment: Attachment, code: ErrorCode, reason: String) {
        if !self.lifecycle.is_current(attachment) {
            return;
        }
        let end = self.session.unprompted_fatal_error(code, reason, &mut self.outbound);
        self.begin_close(end.close_code, &end.reason);
    }

    /// Bytes were read into `buf`: decodes and handles every complete WebSocket message in
    /// it (answers go to the write queue, commands for address owners into `commands`), until
    /// the buffer runs dry, the reader must pause, or the connection closes.
    pub fn bytes_read(
        &mut self,
        attachment: Attachment,
        decoder: &mut Decoder,
        buf: &mut BytesMut,
        now_ms: u64,
        commands: &mut Vec<(ShardId, AddressCommand)>,
    ) -> ReadStep {
        loop {
            if !self.lifecycle.accepts_input(attachment) {
                return ReadStep::Closing;
            }
            if !self.reader_may_continue() {
                return ReadStep::Paused;
            }
            // A data message stays in `buf` (read in place, consumed when handled); only what the
            // session keeps (a SEND it stores) becomes a `Bytes`.
            let event = match decoder.next_in_place(buf) {
                Ok(Some(event)) => event,
                Ok(None) => return ReadStep::NeedMore,
                Err(WsError { close_code, reason }) => {
                    let me = self.session.me();
                    log!(
                        Level::Debug,
                        "shard {}: conn {}: websocket error {close_code}: {reason}",
                        me.shard.0,
                        me.conn.index
                    );
                    self.begin_close(close_code, &reason);
                    return ReadStep::Closing;
                }
            };
            let (binding, payload) = match event {
                Received::Binary(payload) => (Binding::Binary, payload),
                Received::Text(payload) => (Binding::Text, payload),
                Received::Ping(payload) => {
                    self.outbound.push_control(OpCode::Pong, &payload);
                    continue;
                }
                Received::Pong(_) => continue,
                Received::Close(frame) => {
                    // Echo the peer's code (RFC 6455 section 5.5.1); no code means none is echoed.
                    let payload = match &frame {
                        Some(frame) => close_payload(frame.code, ""),
                        None => BytesMut::new(),
                    };
                    // Closing now: the echo is the close frame (the lifecycle's own is not queued).
                    if self.lifecycle.begin_close() {
                        // 1005: "no status code was present" (RFC 6455 section 7.4.1), never sent.
                        let code = frame.as_ref().map_or(1005, |frame| frame.code);
                        self.close = Some(CloseReason { code, by_peer: true, reason: String::new() });
                    }
                    self.outbound.push_control(OpCode::Close, &payload);
                    return ReadStep::Closing;
                }
            };
            let mut fx = Effects { outbound: &mut self.outbound, commands };
            if let Err(end) = self.session.on_message(binding, payload, now_ms, &mut fx) {
                let me = self.session.me();
                log!(
                    Level::Debug,
                    "shard {}: conn {}: session ended: {} {}",
                    me.shard.0,
                    me.conn.index,
                    end.close_code,
                    end.reason
                );
                self.begin_close(end.close_code, &end.reason);
                return ReadStep::Closing;
            }
        }
    }

    /// The writer of `attachment` asks for its next batch (`spare` gives its buffers back).
    pub fn take_write_batch(&mut self, attachment: Attachment, spare: WriteBatch) -> NextWrite {
        if !self.lifecycle.is_current(attachment) {
            return NextWrite::Superseded;
        }
        if let Some(batch) = self.outbound.take_batch(spare) {
            // The close frame is queued as the connection starts closing: a batch taken from
            // then on may wait for a peer that no longer reads.
            return NextWrite::Batch { batch, closing: self.outbound.close_queued() };
        }
        if self.lifecycle.reader_finished_already() || self.outbound.close_queued() {
            return NextWrite::Done;
        }
        // Caught up: wait holding no write buffers (the batch's went with `spare`).
        self.outbound.release_buffers();
        NextWrite::Wait
    }

    /// The writer of `attachment` wrote a batch, or failed to, or ran out of time. The batch's
    /// auto-ack `credits` go back to the owners in every case (into `commands`): a delivery
    /// written is done with, and one lost is lost (auto ack is at most once).
    pub fn write_completed(
        &mut self,
        attachment: Attachment,
        outcome: WriteOutcome,
        credits: CreditReturns,
        commands: &mut Vec<(ShardId, AddressCommand)>,
    ) -> Written {
        return_credits(self.session.me(), credits, commands);
        if outcome == WriteOutcome::CutShort {
            return Written::CutShort;
        }
        if !self.lifecycle.is_current(attachment) {
            return Written::Superseded;
        }
        if outcome == WriteOutcome::Failed {
            // The peer is gone; the reader sees it too and detaches or ends the session.
            self.lifecycle.write_failed();
            return Written::Failed;
        }
        Written::Continue { wake_reader: self.reader_may_continue() }
    }

    /// The reader of `attachment` has finished (EOF, error, or the close is done). A resumable
    /// session is detached until `now_ms + expiry_ms` (true): the auto-ack credit of frames
    /// queued for the dead socket goes back to the owners (those deliveries are lost: auto ack
    /// is at most once). Otherwise the session ends (false) and the slot is to be freed.
    /// `None` when a newer attachment superseded this one (nothing changes). Wake both tasks.
    pub fn reader_finished(
        &mut self,
        attachment: Attachment,
        now_ms: u64,
        expiry_ms: u64,
        commands: &mut Vec<(ShardId, AddressCommand)>,
    ) -> Option<bool> {
        if !self.lifecycle.is_current(attachment) {
            return None;
        }
        let resumable = self.session.is_resumable();
        self.lifecycle.reader_finished(resumable.then(|| now_ms + expiry_ms));
        if resumable {
            self.session.detach();
            return_credits(self.session.me(), self.outbound.take_credits(), commands);
        } else {
            self.session.on_disconnect(commands);
        }
        Some(resumable)
    }

    /// The expiry timer of `attachment`'s detached session fired at `now_ms`.
    pub fn expire(
        &mut self,
        attachment: Attachment,
        now_ms: u64,
        commands: &mut Vec<(ShardId, AddressCommand)>,
    ) -> Expiry {
        let Some(expires_at_ms) = self.lifecycle.expires_at_ms(attachment) else { return Expiry::Resumed };
        if !self.lifecycle.expire(attachment, now_ms) {
            return Expiry::NotBefore(expires_at_ms);
        }
        self.session.on_disconnect(commands);
        Expiry::Expired
    }

    /// Resumes the session on a new socket (its token and sequence numbers were checked):
    /// credit still held by the old write queue goes back, the new attachment starts. Returns
    /// it, and the socket of a connection it supersedes (one that has not noticed it is dead),
    /// for the shell to shut down. Wake both tasks.
    pub fn resume(
        &mut self,
        socket: std::os::fd::RawFd,
        binding: Binding,
        open: &mbws::Open,
        commands: &mut Vec<(ShardId, AddressCommand)>,
    ) -> (Attachment, Option<std::os::fd::RawFd>) {
        return_credits(self.session.me(), self.outbound.take_credits(), commands);
        let stale = self.lifecycle.socket();
        let attachment = self.attach(socket);
        self.session.resume(binding, open, &mut self.outbound);
        (attachment, stale)
    }
}

/// Why a superseded connection ends (fatal ERROR 4409 and close 4409, docs/PROTOCOL.md 11).
pub const SUPERSEDED_REASON: &str = "session resumed on another connection";

/// What a connection superseded by a resume of its session writes last (unless it already
/// wrote a close frame): fatal ERROR 4409 in `binding` (its OPEN's), and close 4409.
pub fn superseded_farewell(binding: Binding) -> Option<WriteBatch> {
    let mut farewell = Outbound::new();
    let error = mbws::ErrorFrame::fatal(ErrorCode::Conflict, 0, 0, SUPERSEDED_REASON);
    farewell.push_frame(binding, &mbws::Frame::Error(error));
    farewell.push_control(OpCode::Close, &close_payload(ErrorCode::Conflict.as_u16(), SUPERSEDED_REASON));
    farewell.take_batch(WriteBatch::default())
}

/// Auto-ack credit of frames that were written (or lost) goes back to the owners.
pub fn return_credits(me: ConnRef, credits: CreditReturns, commands: &mut Vec<(ShardId, AddressCommand)>) {
    for (owner, subscription, count, bytes) in credits {
        commands.push((owner, AddressCommand::ReturnCredit { consumer: me, subscription, count, bytes }));
    }
}

#[cfg(test)]
mod tests {
    //! One connection driven by events: WebSocket bytes in (as a client sends them, masked),
    //! frames out (decoded as a client reads them), time passed in by hand.

    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::broker::ConnId;
    use crate::config::Config;
    use crate::conn::session::SessionConfig;
    use crate::mbws::{CodecLimits, Frame, Subprotocol, PROTOCOL_VERSION};
    use crate::ws::frame::encode_frame;
    use crate::ws::message::WsEvent;
    use crate::ws::Role;

    const EXPIRY_MS: u64 = 1_000;

    fn connection(subprotocol: Subprotocol, max_outbound_bytes: usize) -> (ConnState, Attachment, Decoder) {
        let config = Config::default();
        let session_config = Arc::new(SessionConfig {
            limits: config.limits(),
            codec_limits: config.codec_limits(),
            max_heartbeat_ms: config.max_heartbeat_ms,
            session_expiry_ms: EXPIRY_MS as u32,
            shard_count: 1,
            default_credit: config.default_credit,
        });
        let me = ConnRef { shard: ShardId(0), conn: ConnId { index: 0, generation: 0 } };
        let mut state = ConnState::new(
            Session::new(me, subprotocol, session_config, 7, crate::auth::Access::unrestricted()),
            max_outbound_bytes,
        );
        let attachment = state.attach(10);
        (state, attachment, Decoder::new(Role::Server, 1 << 20, 1 << 20))
    }

    /// A frame as a client sends it (masked).
    fn from_client(opcode: OpCode, payload: &[u8]) -> BytesMut {
        encode_frame(true, opcode, payload, Some([7, 1, 9, 3]))
    }

    fn open() -> BytesMut {
        let open = Frame::Open(mbws::Open { version: PROTOCOL_VERSION, ..Default::default() });
        from_client(OpCode::Binary, &mbws::encode(Binding::Binary, &open))
    }

    /// Everything queued for the client, as it decodes it.
    fn written(state: &mut ConnState, attachment: Attachment) -> Vec<WsEvent> {
        let NextWrite::Batch { batch, .. } = state.take_write_batch(attachment, WriteBatch::default()) else {
            return Vec::new();
        };
        let mut bytes = BytesMut::from(&batch.to_vec()[..]);
        let mut decoder = Decoder::new(Role::Client, 1 << 20, 1 << 20);
        std::iter::from_fn(|| decoder.next_event(&mut bytes).expect("valid WebSocket frames")).collect()
    }

    fn mbws_frame(event: &WsEvent) -> Frame {
        let WsEvent::Binary(payload) = event else { panic!("a binary message: {event:?}") };
        mbws::decode(Binding::Binary, payload.clone(), &CodecLimits::default()).expect("MBWS")
    }

    #[test]
    fn bytes_in_give_frames_out() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        // An OPEN and a PING in one read, the PING split across two reads.
        let mut buf = open();
        let ping = from_client(OpCode::Ping, b"are you there");
        buf.extend_from_slice(&ping[..3]);
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::NeedMore);
        buf.extend_from_slice(&ping[3..]);
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::NeedMore);
        assert!(commands.is_empty(), "an OPEN routes nothing");
        assert_eq!(state.flush(), Wake { writer: true, reader: true, closing: false });
        let out = written(&mut state, attachment);
        assert!(matches!(mbws_frame(&out[0]), Frame::Opened(_)), "{out:?}");
        assert_eq!(out[1], WsEvent::Pong(Bytes::from_static(b"are you there")));
        assert_eq!(out.len(), 2);
        assert!(matches!(state.take_write_batch(attachment, WriteBatch::default()), NextWrite::Wait));
    }

    #[test]
    fn a_close_from_the_peer_is_echoed_and_ends_the_writer() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        let mut buf = open();
        buf.extend_from_slice(&from_client(OpCode::Close, &close_payload(1000, "bye")));
        buf.extend_from_slice(&from_client(OpCode::Ping, b"ignored"));
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::Closing);
        assert!(!state.lifecycle().accepts_input(attachment));
        let NextWrite::Batch { batch, closing: true } = state.take_write_batch(attachment, WriteBatch::default())
        else {
            panic!("the OPENED and the close echo, as a closing batch");
        };
        let mut bytes = BytesMut::from(&batch.to_vec()[..]);
        let mut client = Decoder::new(Role::Client, 1 << 20, 1 << 20);
        assert!(matches!(client.next_event(&mut bytes), Ok(Some(WsEvent::Binary(_)))));
        assert!(matches!(client.next_event(&mut bytes), Ok(Some(WsEvent::Close(Some(frame)))) if frame.code == 1000));
        assert!(bytes.is_empty(), "nothing after the close: the PING was not answered");
        assert!(matches!(state.take_write_batch(attachment, WriteBatch::default()), NextWrite::Done));
    }

    #[test]
    fn a_protocol_error_closes_with_its_code() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        // Unmasked: a client must mask (RFC 6455 5.1), so this is a protocol error (1002).
        let mut buf = encode_frame(true, OpCode::Binary, b"x", None);
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::Closing);
        let out = written(&mut state, attachment);
        assert!(matches!(&out[..], [WsEvent::Close(Some(frame))] if frame.code == 1002), "{out:?}");
    }

    #[test]
    fn a_full_write_queue_pauses_the_reader_until_a_write_completes() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 16);
        let mut commands = Vec::new();
        let mut buf = open();
        buf.extend_from_slice(&from_client(OpCode::Ping, &[0; 32]));
        // The OPENED fills the queue past 16 bytes: the PING waits.
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::Paused);
        assert!(!buf.is_empty());
        assert_eq!(state.flush(), Wake { writer: true, reader: false, closing: false });
        let NextWrite::Batch { batch, closing: false } = state.take_write_batch(attachment, WriteBatch::default())
        else {
            panic!("a batch");
        };
        assert_eq!(
            state.write_completed(attachment, WriteOutcome::Written, batch.credits.clone(), &mut commands),
            Written::Continue { wake_reader: true }
        );
        assert_eq!(
            state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands),
            ReadStep::Paused,
            "the PONG fills the queue again"
        );
        assert!(buf.is_empty());
        drop(batch);
        assert!(matches!(&written(&mut state, attachment)[..], [WsEvent::Pong(_)]));
    }

    #[test]
    fn a_failed_write_stops_input() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        assert_eq!(
            state.write_completed(attachment, WriteOutcome::Failed, CreditReturns::new(), &mut commands),
            Written::Failed
        );
        let mut buf = open();
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut buf, 0, &mut commands), ReadStep::Closing);
        assert_eq!(state.lifecycle().socket(), Some(10), "the reader still has to finish");
    }

    #[test]
    fn a_lost_reliable_session_is_detached_until_it_expires() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut open(), 0, &mut commands), ReadStep::NeedMore);
        assert_eq!(state.reader_finished(attachment, 100, EXPIRY_MS, &mut commands), Some(true));
        assert!(state.lifecycle().socket().is_none());
        assert_eq!(state.expire(attachment, 100 + EXPIRY_MS - 1, &mut commands), Expiry::NotBefore(100 + EXPIRY_MS));
        assert_eq!(state.expire(attachment, 100 + EXPIRY_MS, &mut commands), Expiry::Expired);
        assert_eq!(state.expire(attachment, 100 + EXPIRY_MS, &mut commands), Expiry::Resumed, "once");
    }

    #[test]
    fn a_light_session_ends_with_its_connection() {
        let (mut state, attachment, mut decoder) = connection(Subprotocol::Light, 1 << 20);
        let mut commands = Vec::new();
        assert_eq!(state.bytes_read(attachment, &mut decoder, &mut open(), 0, &mut commands), ReadStep::NeedMore);
        assert_eq!(state.reader_finished(attachment, 100, EXPIRY_MS, &mut commands), Some(false));
        assert_eq!(state.expire(attachment, u64::MAX, &mut commands), Expiry::Resumed, "no expiry to wait for");
    }

    #[test]
    fn a_resume_supersedes_the_old_attachment() {
        let (mut state, old, mut decoder) = connection(Subprotocol::Reliable, 1 << 20);
        let mut commands = Vec::new();
        assert_eq!(state.bytes_read(old, &mut decoder, &mut open(), 0, &mut commands), ReadStep::NeedMore);
        let _ = written(&mut state, old);
        let resume = mbws::Open { version: PROTOCOL_VERSION, ..Default::default() };
        let (new, stale) = state.resume(11, Binding::Binary, &resume, &mut commands);
        assert_eq!(stale, Some(10), "the old socket, for the shell to shut down");
        assert!(state.lifecycle().accepts_input(new));
        // The old tasks find out and stop, touching nothing.
        assert_eq!(state.bytes_read(old, &mut decoder, &mut open(), 0, &mut commands), ReadStep::Closing);
        assert!(matches!(state.take_write_batch(old, WriteBatch::default()), NextWrite::Superseded));
        assert_eq!(
            state.write_completed(old, WriteOutcome::Written, CreditReturns::new(), &mut commands),
            Written::Superseded
        );
        assert_eq!(state.reader_finished(old, 0, EXPIRY_MS, &mut commands), None);
        assert_eq!(state.expire(old, u64::MAX, &mut commands), Expiry::Resumed);
        // The new one gets the resume's answer.
        let out = written(&mut state, new);
        assert!(matches!(mbws_frame(&out[0]), Frame::Opened(_)), "{out:?}");
    }
}
