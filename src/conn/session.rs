//! One client's MBWS session, as a state machine: frames in, frames and commands out.
//!
//! The session owns the client-facing rules of docs/PROTOCOL.md: OPEN first, SEND sequencing
//! and cumulative RECEIPTs, subscription ids, delivery sequence numbers, ACK/NACK routing to
//! the shards that own the addresses, and which binding each answer goes out in. It never
//! touches a socket: answers go into an [`Outbound`], requests for address owners into a
//! `Vec<(ShardId, AddressCommand)>`, and the connection task moves them.
//!
//! Bounds: SENDs awaiting their owner's answer <= `max_inflight_sends` (the connection stops
//! reading beyond it), subscriptions <= `max_subscriptions`, unacknowledged deliveries <= the
//! sum of the subscriptions' credit (enforced by the owners).
//!
//! Resume (MBWS): when its connection is lost, a session is *detached* rather than ended. It
//! keeps its subscriptions, SEND numbering and unacknowledged deliveries (with their messages),
//! encodes nothing, keeps the errors it would have sent, and holds auto-ack deliveries. A new
//! connection that presents the session id and token [`resume`](Session::resume)s it: OPENED
//! with the last SEND sequence taken, the ERRORs of refused SENDs, the kept errors, SUBSCRIBED
//! for every live subscription, every delivery above the client's last received sequence (same
//! delivery sequence), the held auto-ack deliveries, and the cumulative RECEIPT.
//!
//! Refused SENDs: a cumulative RECEIPT covers the refused SENDs below it, so a client must see a
//! refused SEND's ERROR before any RECEIPT covering its seq, even when the ERROR was lost with a
//! connection. The session keeps the ERROR of every refused SEND among the last
//! `max_inflight_sends` seqs it took (`refused_sends`) and replays them, before the RECEIPT, on
//! every resume (docs/PROTOCOL.md section 11).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::outbound::Outbound;
use crate::auth::{Access, Permissions};
use crate::broker::sorted_ring::SortedRing;
use crate::broker::text_tails;
use crate::broker::{
    owner_of, AckedMessages, AddressCommand, ConnCommand, ConnId, ConnRef, Delivered, Deliveries, FastMap, MessageId,
    Refusal, ShardId, SharedMessage, StoredMessage, SubscriptionId,
};
use crate::mbws::{
    self, AckMode, Binding, CodecLimits, DeliveryMode, ErrorCode, ErrorFrame, Frame, Limits, Opened, Subprotocol,
    PROTOCOL_VERSION,
};
use crate::planted::{planted, Bug};
use crate::ws::message::DataMessage;

/// Shortest heartbeat interval the broker agrees to (a shorter non-zero request is raised to
/// it; docs/PROTOCOL.md, OPENED `heartbeat-ms`). `max_heartbeat_ms` is the other end.
pub const MIN_HEARTBEAT_MS: u32 = 1000;

/// Settings every session on a shard shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub limits: Limits,
    pub codec_limits: CodecLimits,
    pub max_heartbeat_ms: u32,
    pub session_expiry_ms: u32,
    pub shard_count: usize,
    /// Credit a SUBSCRIBE with credit 0 gets.
    pub default_credit: u32,
}

impl SessionConfig {
    /// The session settings of a broker with `config` and `shard_count` shards.
    pub fn from_config(config: &crate::config::Config, shard_count: usize) -> SessionConfig {
        SessionConfig {
            limits: config.limits(),
            codec_limits: config.codec_limits(),
            max_heartbeat_ms: config.max_heartbeat_ms,
            session_expiry_ms: config.session_expiry_ms,
            shard_count,
            default_credit: config.default_credit,
        }
    }
}

/// Why the session must end: the connection sends the (already queued) ERROR and closes the
/// WebSocket with `close_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub close_code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingOpen,
    Open,
    Closed,
}

#[derive(Debug)]
struct Subscription {
    owner: ShardId,
    address: Bytes,
    mode: DeliveryMode,
    ack_mode: AckMode,
    confirmed: bool,
}

/// A delivery: kept until acknowledged (client ack), or while detached (auto ack), so that a
/// resumed session can send it again.
#[derive(Debug, Clone)]
struct Delivery {
    subscription: SubscriptionId,
    message_id: MessageId,
    message: SharedMessage,
    redelivered: bool,
}

/// The message ids one ACK acknowledges, grouped by subscription, in the order the
/// subscriptions first appear: while every id so far is one subscription's and each is one
/// above the one before (the usual cumulative ACK), they are a run, and the owner gets
/// [`AckedMessages::Run`] without a list being built; the first id that breaks the run turns
/// it into lists.
struct AckedBySubscription {
    /// Every id added so far, while they form a run (`lists` is empty then): subscription,
    /// first id, count.
    run: Option<(SubscriptionId, MessageId, u32)>,
    lists: SmallVec<[(SubscriptionId, SmallVec<[MessageId; 4]>); 2]>,
    /// Room for the first list: every id the ACK covers (usually they are all its own),
    /// instead of growing by doubling to a few hundred.
    first_list_capacity: usize,
}

impl AckedBySubscription {
    fn new(first_list_capacity: usize) -> Self {
        AckedBySubscription { run: None, lists: SmallVec::new(), first_list_capacity }
    }

    #[inline(always)]
    fn add(&mut self, subscription: SubscriptionId, id: MessageId) {
        if self.lists.is_empty() {
            match &mut self.run {
                None => {
                    self.run = Some((subscription, id, 1));
                    return;
                }
                Some((run_subscription, first, count))
                    if *run_subscription == subscription && first.0 + u64::from(*count) == id.0 =>
                {
                    *count += 1;
                    return;
                }
                Some(_) => self.run_to_list(),
            }
        }
        self.add_to_lists(subscription, id);
    }

    /// The run becomes the first list.
    #[cold]
    fn run_to_list(&mut self) {
        let Some((subscription, first, count)) = self.run.take() else { return };
        let mut ids = SmallVec::with_capacity(std::mem::replace(&mut self.first_list_capacity, 1));
        ids.extend((first.0..first.0 + u64::from(count)).map(MessageId));
        self.lists.push((subscription, ids));
    }

    fn add_to_lists(&mut self, subscription: SubscriptionId, id: MessageId) {
        match self.lists.iter_mut().rev().find(|(listed, _)| *listed == subscription) {
            Some((_, ids)) => ids.push(id),
            None => {
                let mut ids = SmallVec::with_capacity(std::mem::replace(&mut self.first_list_capacity, 1));
                ids.push(id);
                self.lists.push((subscription, ids));
            }
        }
    }

    fn into_commands(self) -> impl Iterator<Item = (SubscriptionId, AckedMessages)> {
        let run = self.run.map(|(subscription, first, count)| (subscription, AckedMessages::Run { first, count }));
        run.into_iter()
            .chain(self.lists.into_iter().map(|(subscription, ids)| (subscription, AckedMessages::List(ids))))
    }
}

/// Parses a session id made by this broker, `<shard>-<slot>-<generation>-<token>`: where the
/// session lives, and the 64 random bits (hex) that make the id unguessable.
pub fn parse_session_id(id: &[u8]) -> Option<(ShardId, ConnId, u64)> {
    let text = std::str::from_utf8(id).ok()?;
    let mut parts = text.split('-');
    let shard = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let token = u64::from_str_radix(parts.next()?, 16).ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((ShardId(shard), ConnId { index, generation }, token))
}

/// Why an OPEN naming `session_id` is refused with 4404 (the id is quoted, cut to 64 bytes).
pub fn unknown_session_reason(session_id: &[u8]) -> String {
    format!(
        "OPEN: session \"{}\" is not known to this broker (expired, or the broker restarted); open a new session with \
         an empty session-id",
        String::from_utf8_lossy(&session_id[..session_id.len().min(64)])
    )
}

/// 64 random bits from the kernel for a new session's token (the shell draws it; the sans-IO
/// core takes it as an input, so a simulation can draw it from its seed).
pub fn random_token() -> u64 {
    let mut token = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into the live u64.
    let filled = unsafe { libc::getrandom((&mut token as *mut u64).cast(), 8, 0) };
    if filled != 8 {
        // No entropy source: the clock keeps ids unique, only less unguessable.
        token =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    }
    token
}

pub struct Session {
    me: ConnRef,
    subprotocol: Subprotocol,
    config: Arc<SessionConfig>,
    state: State,
    /// Binding of the OPEN frame: deferred answers (RECEIPT, SUBSCRIBED, MESSAGE) use it.
    binding: Binding,
    session_id: Bytes,
    token: u64,
    /// What the connection's credentials were found to allow, decided before OPEN arrived
    /// (`crate::auth`): a refusal answers the OPEN with its fatal ERROR.
    access: Access,
    /// What the open session may do (nothing before OPEN): every SEND and SUBSCRIBE is checked.
    permissions: Arc<Permissions>,
    /// When the session's credentials expire (broker clock, ms; a JWT's `exp`): the core ends
    /// the session then ([`Session::end_unprompted`]). `None`: they do not.
    credentials_expire_at_ms: Option<u64>,
    /// False while a detached MBWS session waits for its client to come back.
    attached: bool,
    /// Non-fatal errors about subscriptions produced while detached, sent on resume (bounded by
    /// the subscriptions).
    pending_errors: Vec<ErrorFrame>,
    /// ERRORs of refused SENDs, in seq order, replayed on every resume: those whose seq is among
    /// the last `max_inflight_sends` seqs taken (so at most `max_inflight_sends` of them).
    refused_sends: VecDeque<ErrorFrame>,
    /// Auto-ack deliveries that arrived while detached (bounded by their credit).
    held: VecDeque<Delivery>,
    /// Agreed heartbeat interval; 0 for none.
    heartbeat_ms: u32,
    /// Highest SEND sequence accepted.
    last_send_seq: u64,
    /// Numbered SENDs routed to their owners and not receipted yet, in sequence order (so
    /// strictly increasing): (seq, answered).
    inflight_sends: VecDeque<(u64, bool)>,
    /// Unnumbered MBLWS SENDs (seq 0, no receipt wanted) routed to their owners and not
    /// answered yet: they count against `max_inflight_sends` beside `inflight_sends`, but need
    /// no entry of their own, since no RECEIPT waits for them.
    light_sends_in_flight: u32,
    receipted_seq: u64,
    receipt_due: bool,
    subscriptions: FastMap<SubscriptionId, Subscription>,
    last_delivery_seq: u64,
    unacked: SortedRing<(u64, Delivery)>,
    /// Another cluster node's forwarder opened this session (its upgrade carried
    /// [`crate::cluster::view::LINK_HEADER`]): its SENDs are marked so, and are never
    /// forwarded again. It grants nothing: the session's credentials decide what it may do.
    cluster_link: bool,
}

/// Where a session's effects go.
pub struct Effects<'a> {
    pub outbound: &'a mut Outbound,
    pub commands: &'a mut Vec<(ShardId, AddressCommand)>,
}

impl Session {
    /// A session of connection `me`; `token` (random, see [`random_token`]) makes its id
    /// unguessable once it opens; `access` is what the connection's credentials allow
    /// ([`crate::auth`]), applied when the OPEN arrives.
    pub fn new(
        me: ConnRef,
        subprotocol: Subprotocol,
        config: Arc<SessionConfig>,
        token: u64,
        access: Access,
    ) -> Session {
        Session {
            me,
            subprotocol,
            config,
            state: State::AwaitingOpen,
            binding: Binding::Binary,
            session_id: Bytes::new(),
            token,
            access,
            permissions: Arc::new(Permissions::default()),
            credentials_expire_at_ms: None,
            attached: true,
            pending_errors: Vec::new(),
            refused_sends: VecDeque::new(),
            held: VecDeque::new(),
            heartbeat_ms: 0,
            last_send_seq: 0,
            inflight_sends: VecDeque::new(),
            light_sends_in_flight: 0,
            receipted_seq: 0,
            receipt_due: false,
            subscriptions: FastMap::default(),
            last_delivery_seq: 0,
            unacked: SortedRing::default(),
            cluster_link: false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn session_id(&self) -> &Bytes {
        &self.session_id
    }

    /// The highest delivery sequence this session has given out (0 before the first).
    pub fn last_delivery_seq(&self) -> u64 {
        self.last_delivery_seq
    }

    /// The binding of the OPEN (or resuming OPEN) of the current connection.
    pub fn binding(&self) -> Binding {
        self.binding
    }

    /// The heartbeat interval agreed in OPENED: the client must send something (any frame,
    /// PING if idle) at least this often; silence for twice as long ends the session (4408).
    pub fn heartbeat_ms(&self) -> u32 {
        self.heartbeat_ms
    }

    /// False while the session holds `max_inflight_sends` unanswered SENDs: stop reading.
    pub fn can_accept_sends(&self) -> bool {
        self.inflight_send_count() < self.config.limits.max_inflight_sends as usize
    }

    pub fn unacked_deliveries(&self) -> usize {
        self.unacked.len()
    }

    /// For the admin API: the subprotocol, the subscriptions, and the SENDs not answered yet.
    pub fn subprotocol(&self) -> Subprotocol {
        self.subprotocol
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn inflight_send_count(&self) -> usize {
        self.inflight_sends.len() + self.light_sends_in_flight as usize
    }

    pub fn me(&self) -> ConnRef {
        self.me
    }

    /// An open MBWS session outlives its connection (for `session_expiry_ms`); others end with it.
    pub fn is_resumable(&self) -> bool {
        self.state == State::Open && self.subprotocol == Subprotocol::Reliable && self.config.session_expiry_ms > 0
    }

    /// When the session's credentials expire (broker clock, ms), if they do (set by its OPEN).
    pub fn credentials_expire_at_ms(&self) -> Option<u64> {
        self.credentials_expire_at_ms
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    pub fn token_matches(&self, token: u64) -> bool {
        self.token == token
    }

    /// The connection was lost: keep everything, encode nothing until [`Session::resume`].
    pub fn detach(&mut self) {
        debug_assert!(self.is_resumable());
        self.attached = false;
    }

    /// Re-attaches a detached (or superseded) session to a new connection, in answer to
    /// `open`, writing the resume frames into `outbound` (see the module docs).
    pub fn resume(&mut self, binding: Binding, open: &mbws::Open, outbound: &mut Outbound) {
        debug_assert!(self.state == State::Open);
        self.attached = true;
        self.binding = binding;
        let session_expiry_ms = self.config.session_expiry_ms;
        outbound.push_frame(
            binding,
            &Frame::Opened(Opened {
                version: PROTOCOL_VERSION,
                session_id: self.session_id.clone(),
                resumed: true,
                last_received_seq: self.last_send_seq,
                heartbeat_ms: self.heartbeat_ms,
                session_expiry_ms,
                limits: self.config.limits,
                server: server_name(),
            }),
        );
        // Before the RECEIPT that covers their seqs: a client that lost them with the old
        // connection must not take those SENDs as safe. A client that has seen one already
        // (or a RECEIPT at or above its seq, which it preceded) drops the replay.
        for error in &self.refused_sends {
            outbound.push_frame(binding, &Frame::Error(error.clone()));
        }
        for error in std::mem::take(&mut self.pending_errors) {
            outbound.push_frame(binding, &Frame::Error(error));
        }
        let mut confirmed: SmallVec<[u32; 8]> =
            self.subscriptions.iter().filter(|(_, s)| s.confirmed).map(|(id, _)| id.0).collect();
        confirmed.sort_unstable();
        for subscription_id in confirmed {
            outbound.push_frame(binding, &Frame::Subscribed(mbws::Subscribed { subscription_id }));
        }
        // Each goes again as it was first sent: same delivery sequence, same `redelivered` flag.
        // The client said it received nothing above `last_received_seq`, so a resend is the
        // same delivery reaching it for the first time, not a redelivery (PROTOCOL.md 7.4).
        let after = if planted(Bug::ResendAllOnResume) { 0 } else { open.last_received_seq };
        let resend: Vec<(u64, Delivery)> =
            self.unacked.after(after).map(|(seq, delivery)| (*seq, delivery.clone())).collect();
        for (delivery_seq, delivery) in resend {
            self.encode_delivery(delivery_seq, &delivery, outbound);
        }
        for delivery in std::mem::take(&mut self.held) {
            self.deliver_now(delivery, outbound);
        }
        if self.receipted_seq > 0 {
            self.receipt_due = true;
        }
    }

    /// Decodes and handles one complete WebSocket data message: usually one still in the read
    /// buffer (`DataMessage`), split off as a `Bytes` only when the session keeps it.
    ///
    /// Always inline: the connection's read loop hands it the message the decoder found
    /// without writing it out; out of line (as it went once the SEND's decode was inlined
    /// here) it cost about 50 instructions per SEND more, in the call and the moves.
    #[inline(always)]
    pub fn on_message<'a>(
        &mut self,
        binding: Binding,
        payload: impl Into<DataMessage<'a>>,
        now_ms: u64,
        fx: &mut Effects<'_>,
    ) -> Result<(), SessionEnd> {
        let payload = payload.into();
        // A binary SEND on an open session, the common frame, is decoded straight into the
        // message it becomes: its payload from the address on is the stored message (see
        // `StoredMessage`), with no `Frame` in between. One of the common shape (no
        // properties) is read where it lies, and only its tail is split off the read buffer.
        // Everything else is handled out of line (`on_other_message`), so this path carries
        // none of its state.
        if binding == Binding::Binary
            && self.state == State::Open
            && payload.payload().get(1) == Some(&mbws::FrameKind::Send.code())
        {
            return match mbws::binary::decode_plain_send(payload.payload(), &self.config.codec_limits) {
                Ok(Some(plain)) => {
                    let tail = payload.into_bytes_from(mbws::binary::PlainSend::TAIL_OFFSET);
                    self.on_send(binding, plain.with_tail(tail), now_ms, fx)
                }
                Ok(None) => self.on_unusual_binary_send(binding, payload.into_bytes(), now_ms, fx),
                Err(error) => Err(self.fatal(binding, error.code, 0, 0, error.reason, fx)),
            };
        }
        self.on_other_message(binding, payload, now_ms, fx)
    }

    /// [`Session::on_message`] of a binary SEND that `decode_plain_send` left (one with
    /// properties, or a fault to report), decoded field by field.
    #[inline(never)]
    fn on_unusual_binary_send(
        &mut self,
        binding: Binding,
        payload: Bytes,
        now_ms: u64,
        fx: &mut Effects<'_>,
    ) -> Result<(), SessionEnd> {
        match mbws::binary::decode_send(payload, &self.config.codec_limits) {
            Ok(send) => self.on_send(binding, send, now_ms, fx),
            Err(error) => Err(self.fatal(binding, error.code, 0, 0, error.reason, fx)),
        }
    }

    /// [`Session::on_message`] of any payload but a binary SEND on an open session.
    #[inline(never)]
    fn on_other_message(
        &mut self,
        binding: Binding,
        payload: DataMessage<'_>,
        now_ms: u64,
        fx: &mut Effects<'_>,
    ) -> Result<(), SessionEnd> {
        // A text SEND of the common shape is read where it lies and copied into its message (a
        // text SEND's tail is encoded anyway): no `Bytes` of the payload, no `Frame`. Any other
        // text payload, faults included, is decoded below as before.
        let plain_text_send = (binding == Binding::Text && self.state == State::Open)
            .then(|| text_tails::decode_plain_send(payload.payload(), &self.config.codec_limits))
            .flatten();
        let decoded = if let Some(send) = plain_text_send {
            Ok(self.on_send(binding, send, now_ms, fx))
        } else {
            mbws::decode(binding, payload.into_bytes(), &self.config.codec_limits)
                .map(|frame| self.on_frame(binding, frame, now_ms, fx))
        };
        match decoded {
            Ok(handled) => handled,
            Err(error) => Err(self.fatal(binding, error.code, 0, 0, error.reason, fx)),
        }
    }

    pub fn on_frame(
        &mut self,
        binding: Binding,
        frame: Frame,
        now_ms: u64,
        fx: &mut Effects<'_>,
    ) -> Result<(), SessionEnd> {
        if self.state == State::Closed {
            return Ok(());
        }
        if self.state == State::AwaitingOpen {
            return match frame {
                Frame::Open(open) => self.on_open(binding, open, fx),
                other => Err(self.fatal(
                    binding,
                    ErrorCode::InvalidState,
                    0,
                    0,
                    format!("{} before OPEN: the first frame of a session must be OPEN", other.kind().name()),
                    fx,
                )),
            };
        }
        match frame {
            Frame::Open(_) => Err(self.fatal(
                binding,
                ErrorCode::InvalidState,
                0,
                0,
                "a second OPEN on an open session: one OPEN per connection".into(),
                fx,
            )),
            Frame::Send(send) => self.on_send(binding, text_tails::encode_send(&send), now_ms, fx),
            Frame::Subscribe(subscribe) => {
                self.on_subscribe(binding, subscribe, fx);
                Ok(())
            }
            Frame::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(binding, SubscriptionId(unsubscribe.subscription_id), fx);
                Ok(())
            }
            Frame::Ack(ack) => {
                self.on_ack(ack.delivery_seq, ack.cumulative, fx);
                Ok(())
            }
            Frame::Nack(nack) => {
                if let Some((_, entry)) = self.unacked.remove(nack.delivery_seq) {
                    if let Some(subscription) = self.subscriptions.get(&entry.subscription) {
                        fx.commands.push((
                            subscription.owner,
                            AddressCommand::Nack {
                                consumer: self.me,
                                subscription: entry.subscription,
                                message: entry.message_id,
                                requeue: nack.requeue,
                            },
                        ));
                    }
                }
                Ok(())
            }
            Frame::Flow(flow) => {
                self.on_flow(binding, SubscriptionId(flow.subscription_id), flow.credit, fx);
                Ok(())
            }
            Frame::Ping(ping) => {
                fx.outbound.push_frame(binding, &Frame::Pong(mbws::Pong { token: ping.token }));
                Ok(())
            }
            Frame::Pong(_) | Frame::Error(_) => Ok(()),
            Frame::Close(_) => {
                fx.outbound.push_frame(binding, &Frame::Close(mbws::Close));
                self.state = State::Closed;
                Err(SessionEnd { close_code: crate::ws::close_code::NORMAL, reason: "session closed".into() })
            }
            Frame::Opened(_) | Frame::Receipt(_) | Frame::Subscribed(_) | Frame::Message(_) => {
                let kind = frame.kind().name();
                Err(self.fatal(
                    binding,
                    ErrorCode::InvalidState,
                    0,
                    0,
                    format!("{kind} is sent by brokers only; a client must not send it"),
                    fx,
                ))
            }
        }
    }

    fn on_open(&mut self, binding: Binding, open: mbws::Open, fx: &mut Effects<'_>) -> Result<(), SessionEnd> {
        if open.version != PROTOCOL_VERSION {
            return Err(self.fatal(
                binding,
                ErrorCode::MalformedFrame,
                0,
                0,
                format!(
                    "OPEN: protocol version {} is not supported; this broker speaks version {PROTOCOL_VERSION}",
                    open.version
                ),
                fx,
            ));
        }
        if !open.session_id.is_empty() {
            let reason = match self.subprotocol {
                Subprotocol::Light => format!(
                    "OPEN: session \"{}\" cannot be resumed: {} sessions are never resumable; open a new session \
                     with an empty session-id",
                    String::from_utf8_lossy(&open.session_id),
                    Subprotocol::LIGHT_NAME
                ),
                Subprotocol::Reliable => unknown_session_reason(&open.session_id),
            };
            return Err(self.fatal(binding, ErrorCode::UnknownSession, 0, 0, reason, fx));
        }
        match &self.access {
            Access::Granted(permissions, expire_at_ms) => {
                self.permissions = permissions.clone();
                self.credentials_expire_at_ms = *expire_at_ms;
            }
            Access::Refused(code, reason) => {
                let (code, reason) = (*code, reason.clone());
                return Err(self.fatal(binding, code, 0, 0, reason, fx));
            }
        }
        let heartbeat_ms = match open.heartbeat_ms {
            0 => 0,
            asked => asked.clamp(MIN_HEARTBEAT_MS, self.config.max_heartbeat_ms.max(MIN_HEARTBEAT_MS)),
        };
        self.binding = binding;
        self.heartbeat_ms = heartbeat_ms;
        self.state = State::Open;
        self.session_id = Bytes::from(format!(
            "{}-{}-{}-{:016x}",
            self.me.shard.0, self.me.conn.index, self.me.conn.generation, self.token
        ));
        let session_expiry_ms = match self.subprotocol {
            Subprotocol::Reliable => self.config.session_expiry_ms,
            Subprotocol::Light => 0,
        };
        fx.outbound.push_frame(
            binding,
            &Frame::Opened(Opened {
                version: PROTOCOL_VERSION,
                session_id: self.session_id.clone(),
                resumed: false,
                last_received_seq: 0,
                heartbeat_ms,
                session_expiry_ms,
                limits: self.config.limits,
                server: server_name(),
            }),
        );
        Ok(())
    }

    fn on_send(
        &mut self,
        binding: Binding,
        send: mbws::binary::SendTail,
        now_ms: u64,
        fx: &mut Effects<'_>,
    ) -> Result<(), SessionEnd> {
        let seq = send.seq;
        match (self.subprotocol, seq) {
            (Subprotocol::Reliable, 0) => {
                return Err(self.fatal(
                    binding,
                    ErrorCode::MalformedFrame,
                    0,
                    0,
                    format!("SEND: seq 0 is only allowed on {}; number SENDs 1, 2, 3...", Subprotocol::LIGHT_NAME),
                    fx,
                ))
            }
            (_, 0) => {}
            (_, seq)
                if seq <= self.last_send_seq
                    && self.subprotocol == Subprotocol::Reliable
                    && !planted(Bug::RepublishResentSends) =>
            {
                // A duplicate (a client resending after a doubt): already taken, drop it. If it
                // was already receipted, say so again; otherwise its receipt is still to come.
                if seq <= self.receipted_seq {
                    self.receipt_due = true;
                }
                return Ok(());
            }
            (_, seq) if seq != self.last_send_seq + 1 && !planted(Bug::RepublishResentSends) => {
                return Err(self.fatal(
                    binding,
                    ErrorCode::Conflict,
                    seq,
                    0,
                    format!(
                        "SEND: seq {seq} does not follow {}; SEND sequences must increase by exactly one",
                        self.last_send_seq
                    ),
                    fx,
                ));
            }
            _ => {
                self.last_send_seq = seq;
                // Most sessions have no refused SEND kept: one test instead of the window's sums.
                if !self.refused_sends.is_empty() {
                    self.forget_old_refusals();
                }
            }
        }
        // The connection stops reading at `max_inflight_sends`; a SEND past it would break the
        // memory bound the limit promises (and the refused-SEND window that relies on it).
        assert!(self.can_accept_sends(), "the connection reads no SEND past max_inflight_sends");
        // No frame the broker sends may exceed the max-frame-bytes it announced, MESSAGE included.
        let largest = send.largest_message_bytes;
        let max_frame_bytes = self.config.limits.max_frame_bytes as usize;
        if largest > max_frame_bytes {
            let reason = format!(
                "SEND: as a MESSAGE this would be up to {largest} bytes, over max-frame-bytes {max_frame_bytes}; \
                 send a body at least {} bytes smaller",
                largest - max_frame_bytes
            );
            // Kept for the resumes to come like every refused SEND (module docs): a RECEIPT
            // will cover this seq.
            self.refuse_send(seq, Refusal::new(ErrorCode::TooLarge, reason), fx.outbound);
            self.answered_at_once(seq);
            return Ok(());
        }
        if !self.permissions.may_send(send.tail.address()) {
            let reason = format!(
                "SEND: this session may not send to \"{}\" (its permissions, docs/SECURITY.md)",
                String::from_utf8_lossy(send.tail.address())
            );
            // Like every refused SEND: non-fatal, kept for resumes, covered by the RECEIPT.
            self.refuse_send(seq, Refusal::new(ErrorCode::Forbidden, reason), fx.outbound);
            self.answered_at_once(seq);
            return Ok(());
        }
        let expires_at_ms = if send.ttl_ms == 0 { 0 } else { now_ms + u64::from(send.ttl_ms) };
        let owner = owner_of(send.tail.address(), self.config.shard_count);
        let mut message = StoredMessage::new(send.tail, send.durable, expires_at_ms, binding == Binding::Text);
        message.from_cluster_link = self.cluster_link;
        // A binary SEND's tail is a slice of the read buffer, a text SEND's of the thread's
        // text chunk (`broker::text_tails`): in the shard's slab, without an allocation of its
        // own (`broker::shared_message`).
        let message = SharedMessage::in_slab(message);
        if seq == 0 {
            self.light_sends_in_flight += 1;
        } else {
            self.inflight_sends.push_back((seq, false));
        }
        fx.commands.push((owner, AddressCommand::Publish { publisher: self.me, seq, message }));
        Ok(())
    }

    /// SEND `seq` was answered without reaching its owner (refused here): a numbered one takes
    /// its place among the SENDs in flight, for the RECEIPT that covers it comes after theirs.
    fn answered_at_once(&mut self, seq: u64) {
        if seq != 0 {
            self.inflight_sends.push_back((seq, true));
            self.receipt_answered_sends();
        }
    }

    fn on_subscribe(&mut self, binding: Binding, subscribe: mbws::Subscribe, fx: &mut Effects<'_>) {
        let id = SubscriptionId(subscribe.subscription_id);
        let limits = self.config.limits;
        if let Some(existing) = self.subscriptions.get(&id) {
            let same = existing.address == subscribe.address
                && existing.mode == subscribe.mode
                && existing.ack_mode == subscribe.ack_mode;
            if same {
                // The same SUBSCRIBE again (a client that is unsure it arrived, e.g. across a
                // resume): idempotent, its credit ignored (FLOW changes credit). SUBSCRIBED
                // follows when the owner has confirmed it.
                if existing.confirmed {
                    let frame = Frame::Subscribed(mbws::Subscribed { subscription_id: id.0 });
                    fx.outbound.push_frame(binding, &frame);
                }
                return;
            }
        }
        let refusal = if !self.permissions.may_consume(&subscribe.address) {
            Some((
                ErrorCode::Forbidden,
                format!(
                    "SUBSCRIBE: this session may not consume from \"{}\" (its permissions, docs/SECURITY.md)",
                    String::from_utf8_lossy(&subscribe.address)
                ),
            ))
        } else if self.subscriptions.contains_key(&id) {
            Some((
                ErrorCode::Conflict,
                format!("SUBSCRIBE: subscription id {} is already in use on this session; pick another id", id.0),
            ))
        } else if self.subscriptions.len() >= limits.max_subscriptions as usize {
            Some((
                ErrorCode::TooLarge,
                format!(
                    "SUBSCRIBE: this session already has {} subscriptions (max_subscriptions); unsubscribe first",
                    self.subscriptions.len()
                ),
            ))
        } else if subscribe.credit > limits.max_credit {
            Some((
                ErrorCode::TooLarge,
                format!(
                    "SUBSCRIBE: credit {} is over max_credit {}; ask for less",
                    subscribe.credit, limits.max_credit
                ),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            self.send_error(binding, code, 0, id.0, reason, fx.outbound);
            return;
        }
        let credit =
            if subscribe.credit == 0 { self.config.default_credit.min(limits.max_credit) } else { subscribe.credit };
        let owner = owner_of(&subscribe.address, self.config.shard_count);
        // A copy: the decoded name is a slice of the read buffer (up to 64 KiB), which a
        // subscription, living as long as it does, must not keep alive.
        let address = Bytes::copy_from_slice(&subscribe.address);
        self.subscriptions.insert(
            id,
            Subscription {
                owner,
                address: address.clone(),
                mode: subscribe.mode,
                ack_mode: subscribe.ack_mode,
                confirmed: false,
            },
        );
        fx.commands.push((
            owner,
            AddressCommand::Subscribe {
                consumer: self.me,
                subscription: id,
                address,
                mode: subscribe.mode,
                ack_mode: subscribe.ack_mode,
                credit,
            },
        ));
    }

    fn on_unsubscribe(&mut self, binding: Binding, id: SubscriptionId, fx: &mut Effects<'_>) {
        let Some(subscription) = self.subscriptions.remove(&id) else {
            let reason = format!("UNSUBSCRIBE: no subscription {} on this session", id.0);
            self.send_error(binding, ErrorCode::InvalidState, 0, id.0, reason, fx.outbound);
            return;
        };
        // The owner requeues what this subscription had not acknowledged.
        self.unacked.retain(|(_, entry)| entry.subscription != id);
        fx.commands.push((subscription.owner, AddressCommand::Unsubscribe { consumer: self.me, subscription: id }));
    }

    fn on_ack(&mut self, delivery_seq: u64, cumulative: bool, fx: &mut Effects<'_>) {
        // One command per subscription, carrying all of its acknowledged messages.
        // One search for the cumulative ACK's reach: it sizes the list and is what is taken.
        let through = if cumulative { self.unacked.count_through(delivery_seq) } else { 1 };
        let mut acked = AckedBySubscription::new(through);
        if cumulative {
            self.unacked.remove_first(through, |(_, entry)| acked.add(entry.subscription, entry.message_id));
        } else if let Some((_, entry)) = self.unacked.remove(delivery_seq) {
            acked.add(entry.subscription, entry.message_id);
        }
        for (subscription, messages) in acked.into_commands() {
            if let Some(state) = self.subscriptions.get(&subscription) {
                fx.commands.push((state.owner, AddressCommand::Ack { consumer: self.me, subscription, messages }));
            }
        }
    }

    fn on_flow(&mut self, binding: Binding, id: SubscriptionId, credit: u32, fx: &mut Effects<'_>) {
        let max_credit = self.config.limits.max_credit;
        let Some(subscription) = self.subscriptions.get(&id) else {
            let reason = format!("FLOW: no subscription {} on this session", id.0);
            self.send_error(binding, ErrorCode::InvalidState, 0, id.0, reason, fx.outbound);
            return;
        };
        if credit > max_credit {
            let reason = format!("FLOW: credit {credit} is over max_credit {max_credit}; ask for less");
            self.send_error(binding, ErrorCode::TooLarge, 0, id.0, reason, fx.outbound);
            return;
        }
        fx.commands
            .push((subscription.owner, AddressCommand::SetCredit { consumer: self.me, subscription: id, credit }));
    }

    /// Handles an answer or a delivery from an address owner.
    pub fn on_command(&mut self, command: ConnCommand, fx: &mut Effects<'_>) {
        match command {
            ConnCommand::PublishDone { seq, outcome, .. } => self.on_publish_done(seq, outcome, fx.outbound),
            ConnCommand::PublishesAccepted { first_seq, count, .. } => self.on_publishes_accepted(first_seq, count),
            ConnCommand::SubscribeDone { subscription, outcome, .. } => match outcome {
                Ok(()) => {
                    if let Some(state) = self.subscriptions.get_mut(&subscription) {
                        state.confirmed = true;
                        // While detached, SUBSCRIBED is sent on resume (for every confirmed one).
                        if self.attached {
                            let frame = Frame::Subscribed(mbws::Subscribed { subscription_id: subscription.0 });
                            fx.outbound.push_frame(self.binding, &frame);
                        }
                    }
                }
                Err(refusal) => {
                    self.subscriptions.remove(&subscription);
                    self.send_error(self.binding, refusal.code, 0, subscription.0, refusal.reason, fx.outbound);
                }
            },
            ConnCommand::Deliver { subscription, deliveries, .. } => {
                self.on_deliver(subscription, deliveries, fx.outbound)
            }
            ConnCommand::DeliveryExpired { subscription, message_id, .. } => {
                self.unacked.retain(|(_, delivery)| {
                    !(delivery.subscription == subscription && delivery.message_id == message_id)
                });
            }
            ConnCommand::SubscriptionEnded { subscription, refusal, .. } => {
                if self.subscriptions.remove(&subscription).is_some() {
                    self.unacked.retain(|(_, entry)| entry.subscription != subscription);
                    self.send_error(self.binding, refusal.code, 0, subscription.0, refusal.reason, fx.outbound);
                }
            }
        }
    }

    fn on_publish_done(&mut self, seq: u64, outcome: Result<(), Refusal>, outbound: &mut Outbound) {
        if seq == 0 {
            self.light_sends_answered(1);
        } else {
            self.mark_answered(seq, 1);
        }
        if let Err(refusal) = outcome {
            self.refuse_send(seq, refusal, outbound);
        }
        self.receipt_answered_sends();
    }

    /// `count` SENDs from `first_seq` on (or, `first_seq` 0, `count` unnumbered ones) were
    /// accepted by their owner.
    fn on_publishes_accepted(&mut self, first_seq: u64, count: u32) {
        if first_seq == 0 {
            self.light_sends_answered(count);
            return;
        }
        // The usual case: one owner, answering in order, and nothing answered ahead of them.
        let count = count as usize;
        let last_seq = first_seq + count as u64 - 1;
        if self.inflight_sends.front().is_some_and(|&(entry_seq, _)| entry_seq == first_seq)
            && self.inflight_sends.len() >= count
        {
            debug_assert!(self.inflight_sends.range(..count).all(|&(_, answered)| !answered));
            debug_assert_eq!(self.inflight_sends[count - 1].0, last_seq, "numbered SENDs in flight are consecutive");
            self.inflight_sends.drain(..count);
            self.receipted_seq = last_seq;
            self.receipt_due = true;
        } else {
            self.mark_answered(first_seq, count);
        }
        self.receipt_answered_sends();
    }

    fn light_sends_answered(&mut self, count: u32) {
        debug_assert!(count <= self.light_sends_in_flight, "answers for unnumbered SENDs never sent");
        self.light_sends_in_flight = self.light_sends_in_flight.saturating_sub(count);
    }

    /// Marks the `count` numbered SENDs from `first_seq` on as answered. Answers for one owner
    /// come in order; answers from different owners may interleave, so the entries are found
    /// (the list is sorted by seq, and seqs in flight are consecutive numbers).
    fn mark_answered(&mut self, first_seq: u64, count: usize) {
        let position = if self.inflight_sends.front().is_some_and(|&(entry_seq, _)| entry_seq == first_seq) {
            Some(0)
        } else {
            self.inflight_sends.binary_search_by_key(&first_seq, |&(entry_seq, _)| entry_seq).ok()
        };
        let Some(position) = position else {
            debug_assert!(false, "answer for a SEND that is not in flight: seq {first_seq}");
            return;
        };
        for (offset, entry) in self.inflight_sends.range_mut(position..).take(count).enumerate() {
            debug_assert!(entry.0 == first_seq + offset as u64 && !entry.1, "seq {} answered twice", entry.0);
            entry.1 = true;
        }
    }

    /// Receipts every answered SEND at the front of the in-flight list (the cumulative
    /// RECEIPT covers them; refused ones had their ERROR already).
    fn receipt_answered_sends(&mut self) {
        while let Some(&(entry_seq, true)) = self.inflight_sends.front() {
            self.inflight_sends.pop_front();
            self.receipted_seq = entry_seq;
            self.receipt_due = true;
        }
    }

    /// Takes a subscription's deliveries, oldest first: numbered and sent now, or (detached)
    /// kept for the resume.
    fn on_deliver(&mut self, subscription: SubscriptionId, deliveries: Deliveries, outbound: &mut Outbound) {
        let Some(state) = self.subscriptions.get(&subscription) else {
            return; // Unsubscribed meanwhile: the owner requeues them (client ack) or they are dropped.
        };
        let (owner, ack_mode) = (state.owner, state.ack_mode);
        if self.attached && self.binding == Binding::Binary {
            match deliveries {
                Deliveries::Own(own) => self.send_binary_run(owner, ack_mode, subscription, own.into_iter(), outbound),
                Deliveries::Shared { batch, len } => {
                    self.send_binary_run(owner, ack_mode, subscription, batch[..len].iter().cloned(), outbound)
                }
            }
            return;
        }
        match deliveries {
            Deliveries::Own(own) => {
                for delivered in own {
                    self.take_delivery(owner, ack_mode, subscription, delivered, outbound);
                }
            }
            // This subscription's share of a publish batch's list, which other subscriptions
            // share too: each delivery is cloned out of it (a reference count).
            Deliveries::Shared { batch, len } => {
                for delivered in &batch[..len] {
                    self.take_delivery(owner, ack_mode, subscription, delivered.clone(), outbound);
                }
            }
        }
    }

    /// Numbers a run of deliveries of `subscription`, oldest first, writes them as binary
    /// MESSAGEs one after another (what [`Session::number_and_encode`] does for each, without
    /// a call chain, a close check and a segment update per delivery), and records them
    /// (client ack) or notes their credit once for the run (auto ack). Only for an attached
    /// session in the binary binding.
    fn send_binary_run(
        &mut self,
        owner: ShardId,
        ack_mode: AckMode,
        subscription: SubscriptionId,
        deliveries: impl Iterator<Item = Delivered>,
        outbound: &mut Outbound,
    ) {
        debug_assert!(self.attached && self.binding == Binding::Binary);
        let mut messages = outbound.binary_messages();
        let mut delivery_seq = self.last_delivery_seq;
        // Numbers a delivery and writes it. Nothing is written once a close frame is queued;
        // the deliveries are still recorded (resent on resume) or their credit noted, as
        // `number_and_encode` does.
        let mut number_and_write = |delivered: &Delivered| {
            delivery_seq += 1;
            if let Some(messages) = &mut messages {
                let message = &delivered.message;
                let fixed = mbws::binary::encode_message_fixed(
                    subscription.0,
                    delivery_seq,
                    delivered.message_id.0,
                    delivered.redelivered,
                    message.durable,
                );
                messages.push(&fixed, message.tail());
            }
            delivery_seq
        };
        let (mut auto_count, mut auto_bytes) = (0u32, 0u64);
        match ack_mode {
            // Recorded as a run: the sequences increase along it, above every one recorded.
            AckMode::Client => self.unacked.extend_newest(deliveries.map(|delivered| {
                let delivery_seq = number_and_write(&delivered);
                let Delivered { message_id, message, redelivered } = delivered;
                (delivery_seq, Delivery { subscription, message_id, message, redelivered })
            })),
            AckMode::Auto => {
                for delivered in deliveries {
                    number_and_write(&delivered);
                    auto_count += 1;
                    auto_bytes += delivered.message.held_bytes() as u64;
                }
            }
        }
        self.last_delivery_seq = delivery_seq;
        drop(messages);
        if auto_count > 0 {
            outbound.note_auto_deliveries(owner, subscription, auto_count, auto_bytes);
        }
    }

    /// Takes one delivery of `subscription`: numbered and sent now, or (detached) kept for the
    /// resume. Always inlined: it is the body of the per-delivery loop (an out-of-line call
    /// per delivery cost about 27 instructions per message on `callgrind-broker.sh`).
    #[inline(always)]
    fn take_delivery(
        &mut self,
        owner: ShardId,
        ack_mode: AckMode,
        subscription: SubscriptionId,
        delivered: Delivered,
        outbound: &mut Outbound,
    ) {
        let Delivered { message_id, message, redelivered } = delivered;
        let delivery = Delivery { subscription, message_id, message, redelivered };
        if self.attached {
            self.number_and_encode(owner, ack_mode, delivery, outbound);
            return;
        }
        match ack_mode {
            // Sent on resume, from `unacked`, with the sequence it gets now.
            AckMode::Client if planted(Bug::DropWhileDetached) => {}
            AckMode::Client => {
                self.last_delivery_seq += 1;
                self.unacked.push((self.last_delivery_seq, delivery));
            }
            AckMode::Auto => self.held.push_back(delivery),
        }
    }

    /// Sends a delivery held while detached, if its subscription is still there.
    fn deliver_now(&mut self, delivery: Delivery, outbound: &mut Outbound) {
        let Some(state) = self.subscriptions.get(&delivery.subscription) else { return };
        let (owner, ack_mode) = (state.owner, state.ack_mode);
        self.number_and_encode(owner, ack_mode, delivery, outbound);
    }

    /// Numbers a delivery, encodes it, and records it (client ack) or notes its credit (auto
    /// ack).
    #[inline]
    fn number_and_encode(&mut self, owner: ShardId, ack_mode: AckMode, delivery: Delivery, outbound: &mut Outbound) {
        self.last_delivery_seq += 1;
        let delivery_seq = self.last_delivery_seq;
        self.encode_delivery(delivery_seq, &delivery, outbound);
        match ack_mode {
            // Kept (not cloned) until acknowledged.
            AckMode::Client => self.unacked.push((delivery_seq, delivery)),
            AckMode::Auto => outbound.note_auto_delivery(owner, delivery.subscription, delivery.message.held_bytes()),
        }
    }

    fn encode_delivery(&self, delivery_seq: u64, delivery: &Delivery, outbound: &mut Outbound) {
        let message = &delivery.message;
        // A text session gets text frames, unless the body is not UTF-8 (then binary).
        let binding = match self.binding {
            Binding::Text if message.body_is_text || std::str::from_utf8(message.body()).is_ok() => Binding::Text,
            _ => Binding::Binary,
        };
        if binding == Binding::Binary {
            // Only the fixed fields are this delivery's own; the rest is the stored tail.
            let fixed = mbws::binary::encode_message_fixed(
                delivery.subscription.0,
                delivery_seq,
                delivery.message_id.0,
                delivery.redelivered,
                message.durable,
            );
            outbound.push_binary_message(&fixed, message.tail());
            return;
        }
        let properties = message.properties();
        let header = mbws::MessageHeader {
            subscription_id: delivery.subscription.0,
            delivery_seq,
            message_id: delivery.message_id.0,
            address: message.address(),
            redelivered: delivery.redelivered,
            durable: message.durable,
            properties: &properties,
        };
        outbound.push_message(binding, &header, &message.body_bytes());
    }

    /// End of a batch of events: sends one cumulative RECEIPT if any SEND became safe.
    pub fn flush(&mut self, outbound: &mut Outbound) {
        if self.receipt_due && self.state == State::Open && self.attached {
            debug_assert!(self.receipted_seq > 0, "a receipt is due only once something was receipted");
            self.receipt_due = false;
            outbound.push_frame(self.binding, &Frame::Receipt(mbws::Receipt { seq: self.receipted_seq }));
        }
    }

    /// The connection is gone: owners drop its subscriptions and requeue what it had not acked.
    pub fn on_disconnect(&mut self, commands: &mut Vec<(ShardId, AddressCommand)>) {
        self.state = State::Closed;
        let mut owners: SmallVec<[ShardId; 8]> = self.subscriptions.values().map(|s| s.owner).collect();
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            commands.push((owner, AddressCommand::ConsumerGone { consumer: self.me }));
        }
        self.subscriptions.clear();
        self.unacked.clear();
        self.held.clear();
    }

    fn send_error(
        &mut self,
        binding: Binding,
        code: ErrorCode,
        seq: u64,
        subscription_id: u32,
        reason: String,
        outbound: &mut Outbound,
    ) {
        let error = ErrorFrame { code: code.as_u16(), fatal: false, seq, subscription_id, reason: Bytes::from(reason) };
        if self.attached {
            outbound.push_frame(binding, &Frame::Error(error));
        } else {
            self.pending_errors.push(error);
        }
    }

    /// Answers a SEND its owner refused with a non-fatal ERROR, and keeps that ERROR for the
    /// resumes to come (module docs). Seq 0 (MBLWS, no answer wanted) is answered but not kept.
    fn refuse_send(&mut self, seq: u64, refusal: Refusal, outbound: &mut Outbound) {
        // A burst of refusals usually repeats one reason: the kept copies share it.
        let reason = match self.refused_sends.back() {
            Some(last) if last.reason == refusal.reason.as_bytes() => last.reason.clone(),
            _ => Bytes::from(refusal.reason),
        };
        let error = ErrorFrame { code: refusal.code.as_u16(), fatal: false, seq, subscription_id: 0, reason };
        if self.attached {
            outbound.push_frame(self.binding, &Frame::Error(error.clone()));
        }
        if seq == 0 || !self.is_resumable() {
            return;
        }
        // Answers from different owners interleave: keep the list sorted by seq.
        let position = self.refused_sends.partition_point(|kept| kept.seq < seq);
        self.refused_sends.insert(position, error);
        self.forget_old_refusals();
    }

    /// Drops the ERRORs of refused SENDs that are `max_inflight_sends` or more seqs below the
    /// last SEND taken: a client whose unreceipted SENDs lie within its last
    /// `max_inflight_sends` seqs no longer holds those SENDs (docs/PROTOCOL.md section 11).
    fn forget_old_refusals(&mut self) {
        let window = u64::from(self.config.limits.max_inflight_sends);
        let oldest_kept = self.last_send_seq.saturating_sub(window) + 1;
        while self.refused_sends.front().is_some_and(|kept| kept.seq < oldest_kept) {
            self.refused_sends.pop_front();
        }
        debug_assert!(self.refused_sends.len() <= window as usize);
    }

    /// Queues a fatal ERROR that answers no frame (a heartbeat timeout, a broker failure) and
    /// returns how the connection must close. It goes in the binding of the session's OPEN
    /// (binary before OPEN), like every answer that does not follow a frame (docs/PROTOCOL.md
    /// section 6.1). The session's state is the connection's business: a resumable session
    /// whose connection is closed this way is detached, as after any lost connection.
    pub fn unprompted_fatal_error(&self, code: ErrorCode, reason: String, outbound: &mut Outbound) -> SessionEnd {
        outbound.push_frame(self.binding, &Frame::Error(ErrorFrame::fatal(code, 0, 0, &reason)));
        SessionEnd { close_code: code.as_u16(), reason }
    }

    /// An operator ends this session (the admin API's `DELETE /api/sessions/{id}`: 4403; its
    /// user deleted: 4401): a fatal ERROR `code` with `reason`, and the session is not kept for
    /// a resume.
    pub fn end_by_operator(&mut self, code: ErrorCode, reason: String, outbound: &mut Outbound) -> SessionEnd {
        self.end_unprompted(code, reason, outbound)
    }

    /// Ends this session for good, with a fatal ERROR `code` that answers no frame (an
    /// operator's decision, expired credentials): it is not kept for a resume.
    pub fn end_unprompted(&mut self, code: ErrorCode, reason: String, outbound: &mut Outbound) -> SessionEnd {
        self.state = State::Closed;
        self.unprompted_fatal_error(code, reason, outbound)
    }

    /// A drain ends this session: a fatal ERROR 4503 (unavailable) with `reason`, and the
    /// session is not kept for a resume (the broker is going away).
    pub fn end_for_drain(&mut self, reason: String, outbound: &mut Outbound) -> SessionEnd {
        self.state = State::Closed;
        self.unprompted_fatal_error(ErrorCode::Unavailable, reason, outbound)
    }

    /// The connection said it is another cluster node's link
    /// ([`crate::cluster::view::LINK_HEADER`]): its SENDs are never forwarded to another node.
    pub fn mark_cluster_link(&mut self) {
        self.cluster_link = true;
    }

    /// An operator changed what this session's user may do: its next SEND and SUBSCRIBE are
    /// checked against `permissions` (subscriptions made already stay).
    pub fn set_permissions(&mut self, permissions: Arc<Permissions>) {
        self.permissions = permissions;
    }

    /// Queues a fatal ERROR and returns how the connection must close.
    fn fatal(
        &mut self,
        binding: Binding,
        code: ErrorCode,
        seq: u64,
        subscription_id: u32,
        reason: String,
        fx: &mut Effects<'_>,
    ) -> SessionEnd {
        fx.outbound.push_frame(binding, &Frame::Error(ErrorFrame::fatal(code, seq, subscription_id, &reason)));
        self.state = State::Closed;
        SessionEnd { close_code: code.as_u16(), reason }
    }
}

fn server_name() -> Bytes {
    Bytes::from_static(concat!("mbws-broker/", env!("CARGO_PKG_VERSION")).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::ConnId;
    use crate::conn::outbound::WriteBatch;

    fn config() -> Arc<SessionConfig> {
        let broker = crate::config::Config { shards: 1, ..Default::default() };
        Arc::new(SessionConfig {
            limits: broker.limits(),
            codec_limits: broker.codec_limits(),
            max_heartbeat_ms: 60_000,
            session_expiry_ms: 30_000,
            shard_count: 1,
            default_credit: 100,
        })
    }

    fn session(subprotocol: Subprotocol) -> Session {
        let me = ConnRef { shard: ShardId(0), conn: ConnId { index: 1, generation: 1 } };
        Session::new(me, subprotocol, config(), 7, Access::unrestricted())
    }

    /// Feeds `frames` in order, returns the frames the session answered and the commands.
    fn drive(
        session: &mut Session,
        frames: Vec<Frame>,
    ) -> (Vec<Frame>, Vec<(ShardId, AddressCommand)>, Option<SessionEnd>) {
        let mut outbound = Outbound::new();
        let mut commands = Vec::new();
        let mut end = None;
        for frame in frames {
            let mut fx = Effects { outbound: &mut outbound, commands: &mut commands };
            if let Err(e) = session.on_frame(Binding::Binary, frame, 0, &mut fx) {
                end = Some(e);
                break;
            }
        }
        session.flush(&mut outbound);
        (decode_all(&mut outbound), commands, end)
    }

    fn decode_all(outbound: &mut Outbound) -> Vec<Frame> {
        decode_with_bindings(outbound).into_iter().map(|(_, frame)| frame).collect()
    }

    /// Every frame queued in `outbound`, with the binding it went out in.
    fn decode_with_bindings(outbound: &mut Outbound) -> Vec<(Binding, Frame)> {
        let Some(batch) = outbound.take_batch(WriteBatch::default()) else { return Vec::new() };
        let mut bytes = bytes::BytesMut::from(&batch.to_vec()[..]);
        let mut decoder = crate::ws::message::Decoder::new(crate::ws::Role::Client, 1 << 20, 1 << 20);
        let mut frames = Vec::new();
        while let Some(event) = decoder.next_event(&mut bytes).unwrap() {
            let (binding, payload) = match event {
                crate::ws::message::WsEvent::Binary(p) => (Binding::Binary, p),
                crate::ws::message::WsEvent::Text(p) => (Binding::Text, p),
                _ => continue,
            };
            frames.push((binding, mbws::decode(binding, payload, &CodecLimits::default()).unwrap()));
        }
        frames
    }

    fn open() -> Frame {
        Frame::Open(mbws::Open { version: PROTOCOL_VERSION, ..Default::default() })
    }

    fn send(seq: u64) -> Frame {
        Frame::Send(mbws::Send { seq, address: Bytes::from_static(b"a"), ..Default::default() })
    }

    #[test]
    fn frames_before_open_are_fatal() {
        let mut s = session(Subprotocol::Reliable);
        let (frames, _, end) = drive(&mut s, vec![send(1)]);
        assert_eq!(end.unwrap().close_code, 4405);
        assert!(matches!(&frames[0], Frame::Error(e) if e.fatal && e.code == 4405));
    }

    #[test]
    fn receipts_are_cumulative_and_wait_for_every_owner_answer() {
        let mut s = session(Subprotocol::Reliable);
        let (_, commands, end) = drive(&mut s, vec![open(), send(1), send(2), send(3)]);
        assert!(end.is_none());
        assert_eq!(commands.len(), 3);
        let mut outbound = Outbound::new();
        let mut fx_commands = Vec::new();
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        let me = s.me.conn;
        // Owner answers 2 before 1: no receipt for 2 alone.
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 2, outcome: Ok(()) }, &mut fx);
        s.flush(fx.outbound);
        assert!(decode_all(&mut outbound).is_empty());
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 1, outcome: Ok(()) }, &mut fx);
        let refusal = Refusal::new(ErrorCode::Overloaded, "full");
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 3, outcome: Err(refusal) }, &mut fx);
        s.flush(&mut outbound);
        let frames = decode_all(&mut outbound);
        assert!(matches!(&frames[0], Frame::Error(e) if !e.fatal && e.seq == 3 && e.code == 4429));
        assert_eq!(frames[1], Frame::Receipt(mbws::Receipt { seq: 3 }));
    }

    /// A run of SENDs answered as one `PublishesAccepted` is receipted as if each had been
    /// answered alone: in order, behind an earlier SEND still waiting, and cumulatively.
    #[test]
    fn a_run_of_accepted_sends_is_receipted_once_its_earlier_sends_are_answered() {
        let mut s = session(Subprotocol::Reliable);
        let (_, commands, _) = drive(&mut s, (0..=6).map(|seq| if seq == 0 { open() } else { send(seq) }).collect());
        assert_eq!(commands.len(), 6);
        let me = s.me.conn;
        let mut outbound = Outbound::new();
        let mut fx_commands = Vec::new();
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        // Another owner accepted 3..=5 while 1 and 2 wait: nothing is safe yet.
        s.on_command(ConnCommand::PublishesAccepted { publisher: me, first_seq: 3, count: 3 }, &mut fx);
        s.flush(fx.outbound);
        assert!(decode_all(&mut outbound).is_empty());
        assert_eq!(s.inflight_send_count(), 6, "answered but not receipted SENDs still count");
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        s.on_command(ConnCommand::PublishesAccepted { publisher: me, first_seq: 1, count: 2 }, &mut fx);
        s.flush(&mut outbound);
        assert_eq!(decode_all(&mut outbound), vec![Frame::Receipt(mbws::Receipt { seq: 5 })]);
        assert_eq!(s.inflight_send_count(), 1);
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        s.on_command(ConnCommand::PublishesAccepted { publisher: me, first_seq: 6, count: 1 }, &mut fx);
        s.flush(&mut outbound);
        assert_eq!(decode_all(&mut outbound), vec![Frame::Receipt(mbws::Receipt { seq: 6 })]);
        assert_eq!(s.inflight_send_count(), 0);
    }

    /// Unnumbered MBLWS SENDs count against `max_inflight_sends` until their answers come,
    /// as one count, and a numbered SEND among them is receipted without waiting for them.
    #[test]
    fn unnumbered_sends_count_against_the_in_flight_bound_until_answered() {
        let mut s = session_with_window(4);
        s.subprotocol = Subprotocol::Light;
        let (_, commands, end) = drive(&mut s, vec![open(), send(0), send(0), send(1), send(0)]);
        assert!(end.is_none());
        assert_eq!(commands.len(), 4);
        assert!(!s.can_accept_sends(), "four SENDs in flight of four");
        let me = s.me.conn;
        let mut outbound = Outbound::new();
        let mut fx_commands = Vec::new();
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 1, outcome: Ok(()) }, &mut fx);
        s.flush(fx.outbound);
        assert_eq!(decode_all(&mut outbound), vec![Frame::Receipt(mbws::Receipt { seq: 1 })]);
        assert_eq!(s.inflight_send_count(), 3);
        let mut fx = Effects { outbound: &mut outbound, commands: &mut fx_commands };
        s.on_command(ConnCommand::PublishesAccepted { publisher: me, first_seq: 0, count: 2 }, &mut fx);
        assert_eq!(s.inflight_send_count(), 1);
        let refusal = Refusal::new(ErrorCode::Overloaded, "full");
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 0, outcome: Err(refusal) }, &mut fx);
        s.flush(&mut outbound);
        let frames = decode_all(&mut outbound);
        assert!(matches!(&frames[..], [Frame::Error(e)] if !e.fatal && e.seq == 0 && e.code == 4429), "{frames:?}");
        assert_eq!(s.inflight_send_count(), 0);
        assert!(s.can_accept_sends());
    }

    #[test]
    fn sequence_gaps_are_fatal_and_duplicates_dropped() {
        let mut s = session(Subprotocol::Reliable);
        let (_, commands, end) = drive(&mut s, vec![open(), send(1), send(1)]);
        assert!(end.is_none());
        assert_eq!(commands.len(), 1, "the duplicate is not routed again");
        let (frames, _, end) = drive(&mut s, vec![send(5)]);
        assert_eq!(end.unwrap().close_code, 4409);
        assert!(matches!(&frames[0], Frame::Error(e) if e.seq == 5));
    }

    #[test]
    fn light_sessions_may_send_without_sequence_and_cannot_resume() {
        let mut s = session(Subprotocol::Light);
        let (_, commands, end) = drive(&mut s, vec![open(), send(0), send(0)]);
        assert!(end.is_none());
        assert_eq!(commands.len(), 2);
        let mut s = session(Subprotocol::Light);
        let resume = Frame::Open(mbws::Open {
            version: PROTOCOL_VERSION,
            session_id: Bytes::from_static(b"old"),
            ..Default::default()
        });
        let (_, _, end) = drive(&mut s, vec![resume]);
        assert_eq!(end.unwrap().close_code, 4404);
    }

    #[test]
    fn duplicate_subscription_ids_are_refused_without_ending_the_session() {
        let mut s = session(Subprotocol::Reliable);
        let subscribe = |address: &'static [u8]| {
            Frame::Subscribe(mbws::Subscribe {
                subscription_id: 7,
                address: Bytes::from_static(address),
                mode: mbws::DeliveryMode::Anycast,
                ack_mode: AckMode::Client,
                credit: 0,
            })
        };
        // The same SUBSCRIBE twice is idempotent; the same id for another address is a conflict.
        let (frames, commands, end) = drive(&mut s, vec![open(), subscribe(b"a"), subscribe(b"a"), subscribe(b"b")]);
        assert!(end.is_none());
        assert_eq!(commands.len(), 1);
        assert!(matches!(&commands[0].1, AddressCommand::Subscribe { credit: 100, .. }), "credit 0 means the default");
        assert_eq!(frames.len(), 2, "OPENED and one ERROR: {frames:?}");
        assert!(matches!(&frames[1], Frame::Error(e) if !e.fatal && e.code == 4409 && e.subscription_id == 7));
    }

    #[test]
    fn a_detached_session_resends_unacknowledged_deliveries_on_resume() {
        let mut s = session(Subprotocol::Reliable);
        let subscribe = Frame::Subscribe(mbws::Subscribe {
            subscription_id: 1,
            address: Bytes::from_static(b"a"),
            mode: mbws::DeliveryMode::Anycast,
            ack_mode: AckMode::Client,
            credit: 10,
        });
        drive(&mut s, vec![open(), subscribe, send(1)]);
        let me = s.me.conn;
        let mut outbound = Outbound::new();
        let mut commands = Vec::new();
        let mut fx = Effects { outbound: &mut outbound, commands: &mut commands };
        s.on_command(
            ConnCommand::SubscribeDone { consumer: me, subscription: SubscriptionId(1), outcome: Ok(()) },
            &mut fx,
        );
        let message = SharedMessage::new(StoredMessage::from_fields(b"a", &Default::default(), b"body", false));
        let deliver = |id: u64| ConnCommand::Deliver {
            consumer: me,
            subscription: SubscriptionId(1),
            deliveries: Deliveries::one(Delivered {
                message_id: MessageId(id),
                message: message.clone(),
                redelivered: false,
            }),
        };
        // Deliveries 1 and 2 go out; the client will say it saw 1. Then the connection drops,
        // delivery 3 and the answer to SEND 1 arrive while detached.
        s.on_command(deliver(1), &mut fx);
        s.on_command(deliver(2), &mut fx);
        s.detach();
        let mut lost = Outbound::new();
        let mut fx = Effects { outbound: &mut lost, commands: &mut commands };
        s.on_command(deliver(3), &mut fx);
        s.on_command(ConnCommand::PublishDone { publisher: me, seq: 1, outcome: Ok(()) }, &mut fx);
        s.flush(&mut lost);
        assert!(lost.is_empty(), "a detached session encodes nothing");
        let mut resumed = Outbound::new();
        let open = mbws::Open { session_id: s.session_id().clone(), last_received_seq: 1, ..Default::default() };
        s.resume(Binding::Binary, &open, &mut resumed);
        s.flush(&mut resumed);
        let frames = decode_all(&mut resumed);
        assert!(matches!(&frames[0], Frame::Opened(o) if o.resumed && o.last_received_seq == 1));
        assert_eq!(frames[1], Frame::Subscribed(mbws::Subscribed { subscription_id: 1 }));
        let resent: Vec<(u64, bool)> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Message(m) => Some((m.delivery_seq, m.redelivered)),
                _ => None,
            })
            .collect();
        // 2 was queued for the lost connection, 3 numbered while detached: the client received
        // neither (it said so), so both keep their flag.
        assert_eq!(
            resent,
            vec![(2, false), (3, false)],
            "everything above the client's last received sequence, same numbers"
        );
        assert_eq!(frames.last(), Some(&Frame::Receipt(mbws::Receipt { seq: 1 })));
    }

    /// A cumulative ACK tells each owner which messages its subscription acknowledged: a run
    /// (first id, count) when they are consecutive ids of one subscription, the list of ids
    /// otherwise, in delivery order and per subscription, and never an id twice.
    #[test]
    fn a_cumulative_ack_names_consecutive_ids_as_a_run_and_any_other_ids_as_lists() {
        let mut s = session(Subprotocol::Reliable);
        let subscribe = |id: u32| {
            Frame::Subscribe(mbws::Subscribe {
                subscription_id: id,
                address: Bytes::from_static(b"a"),
                mode: mbws::DeliveryMode::Anycast,
                ack_mode: AckMode::Client,
                credit: 100,
            })
        };
        drive(&mut s, vec![open(), subscribe(1), subscribe(2)]);
        // Delivery seqs 1.. in this order: (subscription, message id).
        fn deliver(s: &mut Session, deliveries: &[(u32, u64)]) {
            let message = SharedMessage::new(StoredMessage::from_fields(b"a", &Default::default(), b"body", false));
            let mut outbound = Outbound::new();
            let mut commands = Vec::new();
            let mut fx = Effects { outbound: &mut outbound, commands: &mut commands };
            for &(subscription, id) in deliveries {
                let delivered = Delivered { message_id: MessageId(id), message: message.clone(), redelivered: false };
                let command = ConnCommand::Deliver {
                    consumer: s.me.conn,
                    subscription: SubscriptionId(subscription),
                    deliveries: Deliveries::one(delivered),
                };
                s.on_command(command, &mut fx);
            }
        }
        deliver(&mut s, &[(1, 5), (1, 6), (1, 7), (1, 9), (2, 10), (1, 11), (2, 3), (1, 12), (1, 13)]);
        let acked = |s: &mut Session, frames: Vec<Frame>| -> Vec<(u32, AckedMessages)> {
            let (_, commands, end) = drive(s, frames);
            assert!(end.is_none());
            commands
                .into_iter()
                .map(|(_, command)| match command {
                    AddressCommand::Ack { subscription, messages, .. } => (subscription.0, messages),
                    other => panic!("not an ACK: {other:?}"),
                })
                .collect()
        };
        let ack = |delivery_seq: u64, cumulative: bool| Frame::Ack(mbws::Ack { delivery_seq, cumulative });
        let list = |ids: &[u64]| AckedMessages::List(ids.iter().map(|&id| MessageId(id)).collect());
        let run = |first: u64, count: u32| AckedMessages::Run { first: MessageId(first), count };
        assert_eq!(acked(&mut s, vec![ack(2, true)]), vec![(1, run(5, 2))], "ids 5 and 6: a run");
        assert_eq!(acked(&mut s, vec![ack(4, true)]), vec![(1, list(&[7, 9]))], "a gap in the ids: a list");
        assert_eq!(acked(&mut s, vec![ack(6, false)]), vec![(1, run(11, 1))], "a single ACK is a run of one");
        assert_eq!(acked(&mut s, vec![ack(6, true)]), vec![(2, run(10, 1))], "seq 6 is gone: only 5 is left");
        assert_eq!(
            acked(&mut s, vec![ack(9, true)]),
            vec![(2, list(&[3])), (1, list(&[12, 13]))],
            "one per subscription"
        );
        assert!(acked(&mut s, vec![ack(9, true)]).is_empty(), "nothing left to acknowledge");
        deliver(&mut s, &[(1, 20), (2, 21), (1, 22), (1, 23)]);
        assert_eq!(acked(&mut s, vec![ack(13, true)]), vec![(1, list(&[20, 22, 23])), (2, list(&[21]))]);
    }

    /// A session with `max_inflight_sends` of `window`.
    fn session_with_window(window: u32) -> Session {
        let mut config = (*config()).clone();
        config.limits.max_inflight_sends = window;
        let me = ConnRef { shard: ShardId(0), conn: ConnId { index: 1, generation: 1 } };
        Session::new(me, Subprotocol::Reliable, Arc::new(config), 7, Access::unrestricted())
    }

    /// Answers SEND `seq` as its owner would: accepted, or refused with 4429.
    fn answer(s: &mut Session, seq: u64, accepted: bool, outbound: &mut Outbound) {
        let mut commands = Vec::new();
        let mut fx = Effects { outbound, commands: &mut commands };
        let outcome = if accepted { Ok(()) } else { Err(Refusal::new(ErrorCode::Overloaded, "queue full")) };
        s.on_command(ConnCommand::PublishDone { publisher: s.me.conn, seq, outcome }, &mut fx);
        s.flush(fx.outbound);
    }

    /// Loses the connection and resumes; returns what the resume sends.
    fn lose_and_resume(s: &mut Session) -> Vec<Frame> {
        s.detach();
        let mut resumed = Outbound::new();
        let open = mbws::Open { session_id: s.session_id().clone(), ..Default::default() };
        s.resume(Binding::Binary, &open, &mut resumed);
        s.flush(&mut resumed);
        decode_all(&mut resumed)
    }

    #[test]
    fn a_refused_send_whose_error_was_lost_is_answered_again_before_the_resume_receipt() {
        let mut s = session(Subprotocol::Reliable);
        drive(&mut s, vec![open(), send(1), send(2), send(3)]);
        // The answers go out on the connection, which is then lost with them.
        let mut lost = Outbound::new();
        answer(&mut s, 1, true, &mut lost);
        answer(&mut s, 2, false, &mut lost);
        answer(&mut s, 3, true, &mut lost);
        let frames = lose_and_resume(&mut s);
        assert!(matches!(&frames[0], Frame::Opened(o) if o.resumed && o.last_received_seq == 3), "{frames:?}");
        let error =
            frames.iter().position(|f| matches!(f, Frame::Error(e) if !e.fatal && e.seq == 2 && e.code == 4429));
        let receipt = frames.iter().position(|f| matches!(f, Frame::Receipt(r) if r.seq >= 2));
        let (Some(error), Some(receipt)) = (error, receipt) else {
            panic!("ERROR for 2 and RECEIPT 3 expected: {frames:?}")
        };
        assert!(error < receipt, "the ERROR comes before the RECEIPT that covers its seq: {frames:?}");
        // Refused while detached: answered on resume, once.
        drive(&mut s, vec![send(4)]);
        s.detach();
        answer(&mut s, 4, false, &mut Outbound::new());
        let frames = lose_and_resume(&mut s);
        let errors: Vec<u64> =
            frames.iter().filter_map(|f| if let Frame::Error(e) = f { Some(e.seq) } else { None }).collect();
        assert_eq!(errors, vec![2, 4], "every kept refusal, in seq order, each once: {frames:?}");
    }

    /// A SEND the session refuses itself (its MESSAGE could exceed max-frame-bytes) is kept
    /// and replayed on resume like one its owner refused: RECEIPT 2 covers its seq.
    #[test]
    fn a_send_refused_as_too_large_is_replayed_on_resume_before_the_receipt() {
        let mut s = session(Subprotocol::Reliable);
        let too_large = s.config.limits.max_frame_bytes as usize;
        let big = Frame::Send(mbws::Send {
            seq: 1,
            address: Bytes::from_static(b"a"),
            body: Bytes::from(vec![b'x'; too_large]),
            ..Default::default()
        });
        let (frames, _, end) = drive(&mut s, vec![open(), big, send(2)]);
        assert!(end.is_none());
        assert!(frames.iter().any(|f| matches!(f, Frame::Error(e) if !e.fatal && e.seq == 1 && e.code == 4413)));
        answer(&mut s, 2, true, &mut Outbound::new());
        let frames = lose_and_resume(&mut s);
        let error = frames.iter().position(|f| matches!(f, Frame::Error(e) if e.seq == 1 && e.code == 4413));
        let receipt = frames.iter().position(|f| matches!(f, Frame::Receipt(r) if r.seq >= 1));
        let (Some(error), Some(receipt)) = (error, receipt) else {
            panic!("ERROR 4413 for 1 and a RECEIPT expected: {frames:?}")
        };
        assert!(error < receipt, "the ERROR comes before the RECEIPT that covers its seq: {frames:?}");
    }

    #[test]
    fn refusals_are_kept_for_max_inflight_sends_seqs_then_forgotten() {
        let mut s = session_with_window(2);
        let mut wire = Outbound::new();
        drive(&mut s, vec![open(), send(1)]);
        answer(&mut s, 1, false, &mut wire);
        drive(&mut s, vec![send(2)]);
        answer(&mut s, 2, true, &mut wire);
        let kept = |frames: &[Frame]| frames.iter().filter(|f| matches!(f, Frame::Error(_))).count();
        assert_eq!(kept(&lose_and_resume(&mut s)), 1, "seq 1 is within the last 2 seqs taken");
        drive(&mut s, vec![send(3)]);
        answer(&mut s, 3, true, &mut wire);
        assert_eq!(kept(&lose_and_resume(&mut s)), 0, "seq 1 is 2 seqs behind 3: forgotten");
    }

    #[test]
    fn an_error_that_answers_no_frame_goes_in_the_binding_of_the_open() {
        for binding in [Binding::Text, Binding::Binary] {
            let mut s = session(Subprotocol::Reliable);
            let mut outbound = Outbound::new();
            let mut commands = Vec::new();
            let mut fx = Effects { outbound: &mut outbound, commands: &mut commands };
            s.on_frame(binding, open(), 0, &mut fx).unwrap();
            let end = s.unprompted_fatal_error(ErrorCode::Timeout, "silent".into(), &mut outbound);
            assert_eq!(end.close_code, 4408);
            let frames = decode_with_bindings(&mut outbound);
            assert!(
                matches!(&frames[1], (b, Frame::Error(e)) if *b == binding && e.fatal && e.code == 4408),
                "{frames:?}"
            );
        }
        // Before OPEN there is no session binding: binary.
        let s = session(Subprotocol::Reliable);
        let mut outbound = Outbound::new();
        s.unprompted_fatal_error(ErrorCode::Unavailable, "draining".into(), &mut outbound);
        assert!(
            matches!(&decode_with_bindings(&mut outbound)[0], (Binding::Binary, Frame::Error(e)) if e.code == 4503)
        );
    }

    #[test]
    fn session_ids_carry_their_home_and_an_unguessable_token() {
        let mut s = session(Subprotocol::Reliable);
        drive(&mut s, vec![open()]);
        let (shard, conn, token) = parse_session_id(s.session_id()).expect("a broker-made id parses");
        assert_eq!((shard, conn), (s.me.shard, s.me.conn));
        assert!(s.token_matches(token));
        assert!(!s.token_matches(token ^ 1));
        assert_eq!(parse_session_id(b"0-1-2"), None);
        assert_eq!(parse_session_id(b"not-a-session-id-at-all"), None);
    }
}
