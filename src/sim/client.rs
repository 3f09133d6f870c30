//! Simulated MBWS clients, sans-IO: each event (connected, bytes arrived, connection lost,
//! timer) answers with what the client does ([`Out`]). They encode and decode with the
//! protocol crate's codecs and follow docs/PROTOCOL.md section 11 for resume, and they record
//! everything they see in the [`Ledger`], which checks the invariants as frames arrive.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::rng::Rng;
use super::world::{Ledger, MsgKey};
use crate::mbws::{self, AckMode, Binding, CodecLimits, DeliveryMode, ErrorCode, Frame, PROTOCOL_VERSION};
use crate::ws::frame::encode_frame;
use crate::ws::message::{close_payload, Decoder, WsEvent};
use crate::ws::{OpCode, Role};

/// What a client does after an event.
#[derive(Debug)]
pub enum Out {
    /// Write these bytes on the current connection.
    Write(Bytes),
    /// Open a new connection (the world calls [`Client::connected`] once it exists).
    Connect,
    /// Call [`Client::wake`] at this time.
    WakeAt(u64),
    /// Drop the current connection without telling the broker (it may think it alive).
    Abandon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection; a reconnect is due at the next wake.
    Disconnected,
    /// OPEN sent, OPENED not yet seen.
    Opening,
    Open,
}

/// A publisher's unreceipted SEND.
#[derive(Debug, Clone)]
pub struct Pending {
    seq: u64,
    key: MsgKey,
    address: Bytes,
    body: Bytes,
}

pub enum Kind {
    Publisher {
        /// Messages still to send.
        remaining: u32,
        next_message: u32,
        next_seq: u64,
        /// Sent and not yet receipted, in seq order.
        unreceipted: VecDeque<Pending>,
        window: usize,
        addresses: Vec<Bytes>,
        /// Resends every unreceipted SEND right behind a resuming OPEN, without waiting for
        /// OPENED to say which the broker took (legal: the broker drops what it has, 7.2).
        eager_resend: bool,
    },
    Consumer {
        address: Bytes,
        mode: DeliveryMode,
        /// Auto-ack consumers acknowledge nothing (at most once: PROTOCOL.md 7.5).
        ack_mode: AckMode,
        credit: u32,
        subscribed: bool,
        /// Unacknowledged deliveries of this session, by delivery-seq.
        unacked: BTreeMap<u64, MsgKey>,
        /// ACKs to send, at their time.
        acks_due: Vec<(u64, u64)>,
        /// ACKs sent in this session: a lost connection may have lost them (MBWS does not
        /// confirm ACKs), so a resume sends them again (harmless, PROTOCOL.md 7.5).
        acks_unconfirmed: Vec<u64>,
        /// Per mille of deliveries acknowledged late (past the ack timeout) or never.
        late_per_mille: u32,
    },
}

pub struct Client {
    pub id: usize,
    pub kind: Kind,
    binding: Binding,
    phase: Phase,
    decoder: Decoder,
    rx: BytesMut,
    session_id: Bytes,
    /// Sessions this client opened (a new one after its old one was lost for good).
    pub session_number: u32,
    /// The highest delivery-seq received in this session.
    max_delivery_seq: u64,
    /// The highest SEND seq the broker receipted or refused in this session.
    answered_seq: u64,
    /// Faults stopped: acknowledge everything at once.
    pub settling: bool,
    pub ack_timeout_ms: u64,
    /// Per mille of settlements sent as NACK with requeue (the message comes back, redelivered).
    pub nack_per_mille: u32,
    /// Print every frame (`MBWS_SIM_TRACE=1`, for a replay).
    pub trace: bool,
    /// Sessions of this client open with credentials valid this long (a JWT's lifetime), if it
    /// is one that uses expiring credentials (see `World`).
    pub credential_lifetime_ms: Option<u64>,
    /// When the credentials of the session on the current connection expire (broker clock,
    /// set by the world when the broker opens the session).
    pub credentials_expire_at_ms: Option<u64>,
    /// The current connection carried fatal 4401 for expired credentials: nothing but the
    /// close may follow on it.
    credentials_ended: bool,
}

impl Client {
    pub fn publisher(id: usize, messages: u32, window: usize, addresses: Vec<Bytes>, rng: &mut Rng) -> Client {
        let kind = Kind::Publisher {
            remaining: messages,
            next_message: 0,
            next_seq: 1,
            unreceipted: VecDeque::new(),
            window,
            addresses,
            eager_resend: rng.chance(500),
        };
        Client::new(id, kind, rng)
    }

    pub fn consumer(
        id: usize,
        (address, mode, ack_mode): (Bytes, DeliveryMode, AckMode),
        credit: u32,
        late_per_mille: u32,
        rng: &mut Rng,
    ) -> Client {
        let kind = Kind::Consumer {
            address,
            mode,
            ack_mode,
            credit,
            subscribed: false,
            unacked: BTreeMap::new(),
            acks_due: Vec::new(),
            acks_unconfirmed: Vec::new(),
            late_per_mille,
        };
        Client::new(id, kind, rng)
    }

    fn new(id: usize, kind: Kind, rng: &mut Rng) -> Client {
        Client {
            id,
            kind,
            binding: if rng.chance(300) { Binding::Text } else { Binding::Binary },
            phase: Phase::Disconnected,
            decoder: Decoder::new(Role::Client, 1 << 24, 1 << 24),
            rx: BytesMut::new(),
            session_id: Bytes::new(),
            session_number: 0,
            max_delivery_seq: 0,
            answered_seq: 0,
            settling: false,
            ack_timeout_ms: 0,
            nack_per_mille: 0,
            trace: false,
            credential_lifetime_ms: None,
            credentials_expire_at_ms: None,
            credentials_ended: false,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.phase != Phase::Disconnected
    }

    /// A publisher with nothing left to send and every SEND answered; any consumer.
    pub fn is_done(&self) -> bool {
        match &self.kind {
            Kind::Publisher { remaining, unreceipted, .. } => *remaining == 0 && unreceipted.is_empty(),
            Kind::Consumer { .. } => true,
        }
    }

    /// A new connection exists: the OPEN goes first (naming the session to resume, if any).
    pub fn connected(&mut self, out: &mut Vec<Out>) {
        self.phase = Phase::Opening;
        self.credentials_ended = false;
        self.decoder = Decoder::new(Role::Client, 1 << 24, 1 << 24);
        self.rx.clear();
        let open = mbws::Open {
            version: PROTOCOL_VERSION,
            session_id: self.session_id.clone(),
            last_received_seq: if self.session_id.is_empty() { 0 } else { self.max_delivery_seq },
            ..Default::default()
        };
        let resuming = !open.session_id.is_empty();
        self.write(Frame::Open(open), out);
        if let Kind::Publisher { unreceipted, eager_resend: true, .. } = &self.kind {
            if resuming {
                let resend: Vec<Frame> = unreceipted.iter().map(send_frame).collect();
                for send in resend {
                    self.write(send, out);
                }
            }
        }
    }

    /// The connection is gone (cut, closed, or abandoned): reconnect after a backoff.
    pub fn lost(&mut self, now: u64, rng: &mut Rng, out: &mut Vec<Out>) {
        if self.phase == Phase::Disconnected {
            return;
        }
        self.phase = Phase::Disconnected;
        out.push(Out::WakeAt(now + rng.range(1, 300)));
    }

    /// A timer: reconnect, send more, or acknowledge what is due.
    pub fn wake(&mut self, now: u64, rng: &mut Rng, out: &mut Vec<Out>) {
        match self.phase {
            Phase::Disconnected => out.push(Out::Connect),
            Phase::Opening => {}
            Phase::Open => {
                self.send_more(now, rng, out);
                self.send_due_acks(now, rng, out);
            }
        }
    }

    /// Bytes from the broker arrived.
    pub fn bytes(&mut self, now: u64, bytes: &[u8], rng: &mut Rng, ledger: &mut Ledger, out: &mut Vec<Out>) {
        self.rx.extend_from_slice(bytes);
        loop {
            if self.phase == Phase::Disconnected {
                return;
            }
            let event = match self.decoder.next_event(&mut self.rx) {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(error) => {
                    ledger.violation(format!("client {}: the broker sent broken WebSocket: {error:?}", self.id));
                    return;
                }
            };
            let payload = match event {
                WsEvent::Binary(payload) | WsEvent::Text(payload) => payload,
                WsEvent::Ping(_) | WsEvent::Pong(_) => continue,
                WsEvent::Close(_) => {
                    // The broker closed: answer, drop the connection, come back later.
                    let close = encode_frame(true, OpCode::Close, &close_payload(1000, ""), Some(mask(rng)));
                    out.push(Out::Write(close.freeze()));
                    out.push(Out::Abandon);
                    self.lost(now, rng, out);
                    return;
                }
            };
            let binding = self.binding;
            match mbws::decode(binding, payload, &CodecLimits::default()) {
                Ok(frame) => self.frame(now, frame, rng, ledger, out),
                Err(error) => {
                    ledger.violation(format!("client {}: undecodable frame from the broker: {error:?}", self.id))
                }
            }
        }
    }

    fn frame(&mut self, now: u64, frame: Frame, rng: &mut Rng, ledger: &mut Ledger, out: &mut Vec<Out>) {
        if ledger.trace {
            eprintln!("{now:>7} client {} <- {}", self.id, brief(&frame));
        }
        if self.credentials_ended {
            ledger.violation(format!(
                "client {} session {}: {} after the fatal 4401 that ended the session for its expired credentials",
                self.id,
                self.session_number,
                brief(&frame)
            ));
            return;
        }
        match frame {
            Frame::Opened(opened) => self.opened(now, opened, rng, ledger, out),
            Frame::Receipt(receipt) => self.receipt(receipt.seq, ledger),
            Frame::Error(error) if !error.fatal && error.subscription_id != 0 => {
                self.subscription_ended(error.code, ledger, out)
            }
            Frame::Error(error) if !error.fatal => self.refused(error.seq, error.code, ledger),
            Frame::Error(error) => {
                let code = error.code;
                if code == ErrorCode::UnknownSession.as_u16() {
                    // The session expired: the next connection opens a new one.
                    self.session_id = Bytes::new();
                } else if code == ErrorCode::Unauthenticated.as_u16() {
                    self.credentials_expired(now, ledger);
                } else if code == ErrorCode::Conflict.as_u16() && error.seq == 0 {
                    // Superseded by a resume over a connection this client gave up moments ago
                    // (its OPEN was still on its way, or being handed to the session's shard):
                    // this client has no other connection, so it resumes again (the close
                    // that follows ends this one).
                    ledger.supersede_races += 1;
                } else {
                    ledger.violation(format!(
                        "client {}: unexpected fatal ERROR {code}: {}",
                        self.id,
                        String::from_utf8_lossy(&error.reason)
                    ));
                }
            }
            Frame::Subscribed(_) => {
                if let Kind::Consumer { subscribed, .. } = &mut self.kind {
                    *subscribed = true;
                }
            }
            Frame::Message(message) => self.message(now, message, rng, ledger, out),
            other => ledger.violation(format!("client {}: unexpected frame {other:?}", self.id)),
        }
    }

    /// Fatal 4401: the session's credentials expired. Only a session opened with expiring
    /// credentials may get it, and not before they expire (it leaves the broker at the deadline
    /// and takes the network's delay to arrive). The next connection opens a new session, with
    /// fresh credentials (as an application fetches a new token).
    fn credentials_expired(&mut self, now: u64, ledger: &mut Ledger) {
        match self.credentials_expire_at_ms {
            None => ledger.violation(format!(
                "client {} session {}: fatal 4401 for credentials that do not expire",
                self.id, self.session_number
            )),
            Some(at_ms) if now < at_ms => ledger.violation(format!(
                "client {} session {}: fatal 4401 at {now} ms, before its credentials expire at {at_ms} ms",
                self.id, self.session_number
            )),
            Some(_) => ledger.credentials_expired += 1,
        }
        self.credentials_ended = true;
        self.session_id = Bytes::new();
    }

    fn opened(&mut self, now: u64, opened: mbws::Opened, rng: &mut Rng, ledger: &mut Ledger, out: &mut Vec<Out>) {
        let resumed = opened.resumed;
        if !resumed {
            // A new session: seqs and delivery-seqs start again; what the old one held is the
            // broker's to requeue.
            let had_session = self.session_number > 0;
            self.session_number += 1;
            self.session_id = opened.session_id.clone();
            self.max_delivery_seq = 0;
            self.answered_seq = 0;
            match &mut self.kind {
                Kind::Publisher { next_seq, unreceipted, .. } => {
                    *next_seq = 1;
                    // Unreceipted SENDs of the lost session may have been published: resent on
                    // the new session they may be published twice (PROTOCOL.md 11, step 7).
                    for pending in unreceipted.iter_mut() {
                        if had_session {
                            ledger.may_duplicate(pending.key);
                        }
                        pending.seq = *next_seq;
                        *next_seq += 1;
                    }
                }
                Kind::Consumer { subscribed, unacked, acks_due, acks_unconfirmed, .. } => {
                    *subscribed = false;
                    unacked.clear();
                    acks_due.clear();
                    acks_unconfirmed.clear();
                }
            }
        }
        self.phase = Phase::Open;
        let last_taken = opened.last_received_seq;
        match &mut self.kind {
            Kind::Publisher { unreceipted, eager_resend, window, .. } => {
                // Unreceipted SENDs stay within the last `max-inflight-sends` seqs, so the ERROR
                // of a refused one is never forgotten (PROTOCOL.md 11, "Refused SENDs").
                *window = (*window).min(opened.limits.max_inflight_sends as usize).max(1);
                // Resend every SEND above what the broker took, in order, with its seq (an eager
                // client sent them all behind its OPEN already).
                let already_sent = *eager_resend && resumed;
                let resend: Vec<Pending> =
                    unreceipted.iter().filter(|p| p.seq > last_taken && !already_sent).cloned().collect();
                for pending in resend {
                    let send = send_frame(&pending);
                    self.write(send, out);
                }
            }
            Kind::Consumer { address, mode, ack_mode, credit, subscribed, acks_unconfirmed, .. } => {
                // Nothing ever confirms an ACK, so every one is sent again on every resume.
                let mut frames: Vec<Frame> = acks_unconfirmed
                    .iter()
                    .copied()
                    .map(|delivery_seq| Frame::Ack(mbws::Ack { delivery_seq, cumulative: false }))
                    .collect();
                if !resumed || !*subscribed {
                    let subscribe = Frame::Subscribe(mbws::Subscribe {
                        subscription_id: 1,
                        address: address.clone(),
                        mode: *mode,
                        ack_mode: *ack_mode,
                        credit: *credit,
                    });
                    frames.push(subscribe);
                }
                for frame in frames {
                    self.write(frame, out);
                }
            }
        }
        // ACKs that fell due while there was no connection.
        self.send_due_acks(now, rng, out);
        self.send_more(now, rng, out);
    }

    fn receipt(&mut self, seq: u64, ledger: &mut Ledger) {
        let id = self.id;
        let Kind::Publisher { unreceipted, .. } = &mut self.kind else {
            ledger.violation(format!("client {id}: a RECEIPT for a consumer"));
            return;
        };
        while unreceipted.front().is_some_and(|pending| pending.seq <= seq) {
            let pending = unreceipted.pop_front().expect("just checked");
            ledger.receipted(pending.key, &pending.address);
        }
        self.answered_seq = self.answered_seq.max(seq);
    }

    /// The broker ended the subscription (a multicast subscriber fell `max-queued-messages`
    /// behind: 4429): its deliveries are done with; subscribe again.
    fn subscription_ended(&mut self, code: u16, ledger: &mut Ledger, out: &mut Vec<Out>) {
        let id = self.id;
        let Kind::Consumer { address, mode, ack_mode, credit, subscribed, unacked, acks_due, .. } = &mut self.kind
        else {
            ledger.violation(format!("client {id}: a subscription's ERROR {code} for a publisher"));
            return;
        };
        if code != ErrorCode::Overloaded.as_u16() || *mode != DeliveryMode::Multicast {
            ledger.violation(format!("client {id}: its {mode:?} subscription ended with ERROR {code}"));
            return;
        }
        ledger.subscriptions_ended += 1;
        unacked.clear();
        acks_due.clear();
        *subscribed = false;
        let subscribe = Frame::Subscribe(mbws::Subscribe {
            subscription_id: 1,
            address: address.clone(),
            mode: *mode,
            ack_mode: *ack_mode,
            credit: *credit,
        });
        self.write(subscribe, out);
    }

    fn refused(&mut self, seq: u64, code: u16, ledger: &mut Ledger) {
        let id = self.id;
        let Kind::Publisher { unreceipted, .. } = &mut self.kind else {
            ledger.violation(format!("client {id}: ERROR {code} for a consumer"));
            return;
        };
        if seq == 0 || seq <= self.answered_seq {
            return; // A replay of an ERROR already seen, or covered by a RECEIPT seen.
        }
        if let Some(index) = unreceipted.iter().position(|pending| pending.seq == seq) {
            let pending = unreceipted.remove(index).expect("just found");
            ledger.refused(pending.key);
        }
    }

    fn message(&mut self, now: u64, message: mbws::Message, rng: &mut Rng, ledger: &mut Ledger, out: &mut Vec<Out>) {
        let id = self.id;
        let session = self.session_number;
        if message.delivery_seq <= self.max_delivery_seq {
            ledger.violation(format!(
                "client {id} session {session}: delivery-seq {} again (or out of order) after {}: a duplicate \
                 delivery to a resumed session",
                message.delivery_seq, self.max_delivery_seq
            ));
            return;
        }
        self.max_delivery_seq = message.delivery_seq;
        let Kind::Consumer { mode, ack_mode, credit, unacked, acks_due, late_per_mille, .. } = &mut self.kind else {
            ledger.violation(format!("client {id}: a MESSAGE for a publisher"));
            return;
        };
        let Some((key, epoch, seq)) = MsgKey::parse(&message.body) else {
            ledger.violation(format!("client {id}: a body that no publisher sent: {:?}", message.body));
            return;
        };
        let multicast = *mode == DeliveryMode::Multicast;
        let delivery = (epoch, seq);
        let named = (&message.address, message.message_id);
        if *ack_mode == AckMode::Auto {
            // Credit bounds what is not yet written, which a client cannot see; nothing to ACK.
            ledger.delivered((id, session), key, delivery, named, message.redelivered, multicast);
            return;
        }
        // The broker takes back a delivery at its ack timeout without a word (PROTOCOL.md 7.5),
        // freeing its credit, and a client cannot tell when (a delivery resent on resume may
        // be older than it looks): with ack timeouts the check is the broker's own assertion
        // (`broker/address/dispatch.rs`), without them it is exact here.
        let held = unacked.len();
        if self.ack_timeout_ms == 0 && held >= *credit as usize {
            ledger.violation(format!(
                "client {id} session {session}: MESSAGE {} beyond credit {credit} ({held} unacknowledged)",
                message.delivery_seq,
            ));
        }
        ledger.delivered((id, session), key, delivery, named, message.redelivered, multicast);
        unacked.insert(message.delivery_seq, key);
        let delay = if !self.settling && rng.chance(*late_per_mille) {
            // Late: past the ack timeout (redelivered meanwhile), or very late.
            let timeout = if self.ack_timeout_ms == 0 { 500 } else { self.ack_timeout_ms };
            timeout + rng.range(1, 2 * timeout)
        } else {
            rng.range(0, 20)
        };
        acks_due.push((now + delay, message.delivery_seq));
        out.push(Out::WakeAt(now + delay));
    }

    fn send_due_acks(&mut self, now: u64, rng: &mut Rng, out: &mut Vec<Out>) {
        let settling = self.settling;
        let Kind::Consumer { unacked, acks_due, acks_unconfirmed, .. } = &mut self.kind else { return };
        let mut acks = Vec::new();
        acks_due.retain(|&(at, delivery_seq)| {
            if at <= now || settling {
                if unacked.remove(&delivery_seq).is_some() {
                    acks.push(delivery_seq);
                }
                false
            } else {
                true
            }
        });
        acks_unconfirmed.extend_from_slice(&acks);
        for delivery_seq in acks {
            let frame = if !self.settling && rng.chance(self.nack_per_mille) {
                Frame::Nack(mbws::Nack { delivery_seq, requeue: true })
            } else {
                Frame::Ack(mbws::Ack { delivery_seq, cumulative: false })
            };
            self.write(frame, out);
        }
    }

    /// A publisher sends while it has messages and room in its window.
    fn send_more(&mut self, now: u64, rng: &mut Rng, out: &mut Vec<Out>) {
        if self.phase != Phase::Open {
            return;
        }
        let id = self.id;
        let session_number = self.session_number;
        let mut sends = Vec::new();
        if let Kind::Publisher { remaining, next_message, next_seq, unreceipted, window, addresses, .. } =
            &mut self.kind
        {
            // The next SEND's seq stays within `window` (<= max-inflight-sends) of the oldest
            // unreceipted one: counting unreceipted SENDs is not enough, since a refused SEND
            // leaves the count but not the span, and the broker forgets the ERROR of a SEND that
            // many seqs back (PROTOCOL.md 11, "Refused SENDs across a resume").
            let within_window = |unreceipted: &VecDeque<Pending>, next_seq: u64, window: usize| {
                unreceipted.front().is_none_or(|oldest| next_seq - oldest.seq < window as u64)
            };
            while *remaining > 0 && within_window(unreceipted, *next_seq, *window) {
                let key = MsgKey { publisher: id as u32, message: *next_message };
                let address = addresses[rng.index(addresses.len())].clone();
                let body = key.body(session_number, *next_seq);
                let pending = Pending { seq: *next_seq, key, address, body };
                *next_seq += 1;
                *next_message += 1;
                *remaining -= 1;
                sends.push(send_frame(&pending));
                unreceipted.push_back(pending);
                if rng.chance(300) {
                    break; // Not always a full window at once.
                }
            }
        }
        for send in sends {
            self.write(send, out);
        }
        if let Kind::Publisher { remaining, .. } = &self.kind {
            if *remaining > 0 {
                out.push(Out::WakeAt(now + rng.range(0, 5)));
            }
        }
    }

    fn write(&mut self, frame: Frame, out: &mut Vec<Out>) {
        if self.trace {
            eprintln!("        client {} -> {}", self.id, brief(&frame));
        }
        let payload = mbws::encode(self.binding, &frame);
        let opcode = match self.binding {
            Binding::Binary => OpCode::Binary,
            Binding::Text => OpCode::Text,
        };
        // A fixed mask: the broker unmasks whatever it is; the seed need not draw it.
        out.push(Out::Write(encode_frame(true, opcode, &payload, Some([0x5a, 0x17, 0xc3, 0x08])).freeze()));
    }
}

fn mask(rng: &mut Rng) -> [u8; 4] {
    (rng.next_u64() as u32).to_be_bytes()
}

fn send_frame(pending: &Pending) -> Frame {
    Frame::Send(mbws::Send {
        seq: pending.seq,
        address: pending.address.clone(),
        body: pending.body.clone(),
        ..Default::default()
    })
}

/// One line for a frame in a trace.
fn brief(frame: &Frame) -> String {
    match frame {
        Frame::Message(m) => format!(
            "MESSAGE d{} {} {}{}",
            m.delivery_seq,
            String::from_utf8_lossy(&m.body),
            String::from_utf8_lossy(&m.address),
            if m.redelivered { " redelivered" } else { "" }
        ),
        Frame::Send(m) => format!("SEND s{} {}", m.seq, String::from_utf8_lossy(&m.body)),
        Frame::Opened(o) => format!(
            "OPENED {} resumed {} last {}",
            String::from_utf8_lossy(&o.session_id),
            o.resumed,
            o.last_received_seq
        ),
        Frame::Open(o) => format!("OPEN {:?} last {}", String::from_utf8_lossy(&o.session_id), o.last_received_seq),
        other => format!("{other:?}"),
    }
}
