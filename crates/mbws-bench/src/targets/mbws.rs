//! The MBWS target: this project's broker, spoken to with the crate's own codecs.
//!
//! Publishers send SENDs in the binary binding. Under MBWS (and for durable runs) SENDs are
//! numbered 1, 2, 3, ... and a publisher keeps at most half of the broker's announced
//! `max-inflight-sends` unreceipted (RECEIPTs are cumulative). Under MBLWS a non-durable SEND
//! carries seq 0, "no receipt wanted", and only TCP and the end-to-end window slow it down.
//!
//! Consumers SUBSCRIBE with `--credit` (anycast, or multicast for fanout) and, in client-ack
//! mode, acknowledge cumulatively every credit/4 deliveries, so the credit never runs dry while
//! the consumer keeps up.
//!
//! A consumer reads a binary MESSAGE's delivery seq and body straight from the fixed layout
//! ([`peek_message`]) instead of decoding and validating the whole frame: full decoding took
//! more than half of the generator's time per delivery. Every other frame, and any MESSAGE the
//! peek does not understand, goes through the crate's decoder.

use bytes::{Bytes, BytesMut};

use super::{Codec, Conn, Failure, Inbound, PublishWire, Role, TargetConfig};
use crate::targets::CounterRule;
use crate::wire::{read_stamp, Counter, Framing, Template};
use mbws_proto::mbws::{
    self, Ack, AckMode, Binding, CodecLimits, DeliveryMode, ErrorFrame, Frame, FrameKind, Open, Opened, Pong, Send,
    Subscribe, PROTOCOL_VERSION,
};
use mbws_proto::ws::message::DataMessage;

/// Offset of the u64 `seq` in a binary SEND (docs/PROTOCOL.md 6.2).
const SEND_SEQ_OFFSET: usize = 3;

/// Limits for decoding what the broker sends: as loose as the binary layout allows.
const DECODE_LIMITS: CodecLimits =
    CodecLimits { max_address_bytes: 255, max_headers: 255, max_header_bytes: 16 * 1024 * 1024 };

/// MBWS state of one connection.
#[derive(Debug)]
pub struct MbwsCodec {
    /// Highest cumulative RECEIPT seq.
    receipted: u64,
    /// SENDs answered with a non-fatal ERROR (4429 overloaded, 4403 forbidden).
    refused: u64,
    /// Highest delivery seq seen, and deliveries not yet acknowledged.
    last_delivery: u64,
    unacknowledged: u64,
    /// Acknowledge after this many deliveries; 0 for auto-ack subscriptions.
    ack_every: u64,
}

impl MbwsCodec {
    pub(crate) fn new(ack_every: u64) -> MbwsCodec {
        MbwsCodec { receipted: 0, refused: 0, last_delivery: 0, unacknowledged: 0, ack_every }
    }

    pub fn receipted(&self) -> u64 {
        self.receipted
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// [`MbwsCodec::on_unit`] of a message lent in place: a binary MESSAGE (every delivery) is
    /// read where it lies; anything else is split off and decoded.
    pub fn on_message(&mut self, message: DataMessage<'_>, text: bool, cx: &mut Inbound<'_>) -> Result<(), Failure> {
        if !text {
            if let Some((delivery_seq, body)) = peek_message(message.payload()) {
                cx.delivered(read_stamp(body));
                self.on_delivery(delivery_seq, cx);
                return Ok(());
            }
        }
        self.on_unit(message.into_bytes(), text, cx)
    }

    pub fn on_unit(&mut self, payload: Bytes, text: bool, cx: &mut Inbound<'_>) -> Result<(), Failure> {
        if !text {
            if let Some((delivery_seq, body)) = peek_message(&payload) {
                cx.delivered(read_stamp(body));
                self.on_delivery(delivery_seq, cx);
                return Ok(());
            }
        }
        let binding = if text { Binding::Text } else { Binding::Binary };
        let frame = mbws::decode(binding, payload, &DECODE_LIMITS)
            .map_err(|error| Failure::Protocol(format!("invalid MBWS frame from the broker: {error}")))?;
        match frame {
            Frame::Message(message) => {
                cx.delivered(read_stamp(&message.body));
                self.on_delivery(message.delivery_seq, cx);
                Ok(())
            }
            Frame::Receipt(receipt) => {
                self.receipted = self.receipted.max(receipt.seq);
                Ok(())
            }
            Frame::Error(error) => self.on_error(error),
            Frame::Ping(ping) => {
                cx.reply(&encode(&Frame::Pong(Pong { token: ping.token })));
                Ok(())
            }
            Frame::Pong(_) | Frame::Subscribed(_) => Ok(()),
            Frame::Close(_) => Err(Failure::Closed("the broker closed the session (CLOSE)".to_string())),
            other => Err(Failure::Protocol(format!("unexpected {} frame from the broker", other.kind().name()))),
        }
    }

    /// Tracks a delivery and acknowledges cumulatively every `ack_every` of them.
    fn on_delivery(&mut self, delivery_seq: u64, cx: &mut Inbound<'_>) {
        self.last_delivery = self.last_delivery.max(delivery_seq);
        if self.ack_every > 0 {
            self.unacknowledged += 1;
            if self.unacknowledged >= self.ack_every {
                self.acknowledge(cx.framing, cx.replies);
            }
        }
    }

    fn on_error(&mut self, error: ErrorFrame) -> Result<(), Failure> {
        let reason = String::from_utf8_lossy(&error.reason).into_owned();
        if error.fatal {
            return Err(Failure::Protocol(format!("broker error {} (fatal): {reason}", error.code)));
        }
        if error.seq != 0 {
            self.refused += 1;
            return Ok(());
        }
        Err(Failure::Protocol(format!(
            "broker error {} on subscription {}: {reason}",
            error.code, error.subscription_id
        )))
    }

    fn acknowledge(&mut self, framing: Framing, out: &mut BytesMut) {
        if self.unacknowledged > 0 {
            let ack = Frame::Ack(Ack { delivery_seq: self.last_delivery, cumulative: true });
            framing.frame(out, &encode(&ack));
            self.unacknowledged = 0;
        }
    }

    /// Acknowledges what is left (so the broker keeps nothing for a dead address) and closes.
    pub fn goodbye(&mut self, framing: Framing, out: &mut BytesMut) {
        self.acknowledge(framing, out);
        framing.frame(out, &encode(&Frame::Close(mbws::Close)));
    }
}

/// The delivery seq and body of a binary MESSAGE, located by its layout (docs/PROTOCOL.md 6.2:
/// subscription-id u32 at 3, delivery-seq u64 at 7, message-id u64 at 15, then address,
/// content-type, correlation-id, reply-to as str8, a u8 header count, headers as str8 name and
/// str16 value, then the body). Strings are skipped, not validated. `None` for anything else.
pub fn peek_message(payload: &[u8]) -> Option<(u64, &[u8])> {
    const DELIVERY_SEQ_OFFSET: usize = 7;
    const ADDRESS_OFFSET: usize = 23;
    if payload.len() < ADDRESS_OFFSET + 5 || payload[0] != PROTOCOL_VERSION || payload[1] != FrameKind::Message.code() {
        return None;
    }
    let seq_bytes = payload.get(DELIVERY_SEQ_OFFSET..DELIVERY_SEQ_OFFSET + 8)?;
    let delivery_seq = u64::from_be_bytes(seq_bytes.try_into().ok()?);
    let mut at = ADDRESS_OFFSET;
    let skip_str8 = |at: &mut usize| -> Option<()> {
        *at += 1 + usize::from(*payload.get(*at)?);
        Some(())
    };
    for _ in 0..4 {
        skip_str8(&mut at)?;
    }
    let header_count = *payload.get(at)?;
    at += 1;
    for _ in 0..header_count {
        skip_str8(&mut at)?;
        let length = payload.get(at..at + 2)?;
        at += 2 + usize::from(u16::from_be_bytes([length[0], length[1]]));
    }
    Some((delivery_seq, payload.get(at..)?))
}

fn encode(frame: &Frame) -> BytesMut {
    mbws::encode(Binding::Binary, frame)
}

/// OPEN, OPENED, then what the role needs: SUBSCRIBEs (and their SUBSCRIBEDs) for a consumer,
/// SEND templates for a publisher.
pub async fn setup(
    conn: &mut Conn,
    config: &TargetConfig,
    role: &Role,
) -> Result<(Codec, Option<PublishWire>), String> {
    conn.queue(&encode(&Frame::Open(Open::default())));
    conn.flush().await?;
    let opened = match next_frame(conn, "OPENED").await? {
        Frame::Opened(opened) => opened,
        other => return Err(unexpected(other, "OPENED")),
    };
    match role {
        Role::Publisher { addresses, durable } => {
            let wire = publish_wire(conn.framing(), config, &opened, addresses, *durable)?;
            Ok((Codec::Mbws(MbwsCodec::new(0)), Some(wire)))
        }
        Role::Consumer { addresses, multicast, .. } => {
            subscribe(conn, config, &opened, addresses, *multicast).await?;
            let ack_every = if config.auto_ack { 0 } else { u64::from(config.credit / 4).max(1) };
            Ok((Codec::Mbws(MbwsCodec::new(ack_every)), None))
        }
        Role::Idle => Ok((Codec::Mbws(MbwsCodec::new(0)), None)),
    }
}

fn publish_wire(
    framing: Framing,
    config: &TargetConfig,
    opened: &Opened,
    addresses: &[usize],
    durable: bool,
) -> Result<PublishWire, String> {
    let numbered = !config.light || durable;
    let body = Bytes::from(vec![0u8; config.size]);
    let mut templates = Vec::with_capacity(addresses.len());
    for &address in addresses {
        let send = Send {
            seq: 0,
            address: Bytes::from(config.address_name(address)),
            durable,
            body: body.clone(),
            ..Default::default()
        };
        // The broker refuses a SEND whose MESSAGE could exceed max-frame-bytes (PROTOCOL.md 9).
        let largest = mbws_proto::mbws::largest_message_bytes(&send.address, &send.properties, send.body.len());
        if largest > opened.limits.max_frame_bytes as usize {
            return Err(format!(
                "--size {} makes MESSAGEs of up to {largest} bytes, over the broker's max-frame-bytes {}; \
                 use a smaller --size",
                config.size, opened.limits.max_frame_bytes
            ));
        }
        let payload = encode(&Frame::Send(send));
        let counter = numbered.then_some(Counter { offset: SEND_SEQ_OFFSET, width: 8 });
        templates.push(Template::new(framing, &payload, payload.len() - config.size, counter));
    }
    Ok(PublishWire {
        templates,
        counter: if numbered { CounterRule::FromOne } else { CounterRule::None },
        window: numbered.then(|| u64::from(opened.limits.max_inflight_sends / 2).max(1)),
    })
}

async fn subscribe(
    conn: &mut Conn,
    config: &TargetConfig,
    opened: &Opened,
    addresses: &[usize],
    multicast: bool,
) -> Result<(), String> {
    if config.credit > opened.limits.max_credit {
        return Err(format!("--credit {} is over the broker's max-credit {}", config.credit, opened.limits.max_credit));
    }
    for (index, &address) in addresses.iter().enumerate() {
        let subscribe = Subscribe {
            subscription_id: index as u32 + 1,
            address: Bytes::from(config.address_name(address)),
            mode: if multicast { DeliveryMode::Multicast } else { DeliveryMode::Anycast },
            ack_mode: if config.auto_ack { AckMode::Auto } else { AckMode::Client },
            credit: config.credit,
        };
        conn.queue(&encode(&Frame::Subscribe(subscribe)));
    }
    conn.flush().await?;
    let mut confirmed = 0;
    while confirmed < addresses.len() {
        match next_frame(conn, "SUBSCRIBED").await? {
            Frame::Subscribed(_) => confirmed += 1,
            other => return Err(unexpected(other, "SUBSCRIBED")),
        }
    }
    Ok(())
}

/// The next MBWS frame during set-up; ERROR frames become errors, PINGs are answered.
async fn next_frame(conn: &mut Conn, waiting_for: &str) -> Result<Frame, String> {
    loop {
        let (payload, text) = conn.next_unit(waiting_for).await?;
        let binding = if text { Binding::Text } else { Binding::Binary };
        let frame = mbws::decode(binding, payload, &DECODE_LIMITS)
            .map_err(|error| format!("invalid MBWS frame from the broker: {error}"))?;
        match frame {
            Frame::Ping(ping) => {
                conn.queue(&encode(&Frame::Pong(Pong { token: ping.token })));
                conn.flush().await?;
            }
            Frame::Error(error) => {
                return Err(format!(
                    "broker error {} while we waited for {waiting_for}: {}",
                    error.code,
                    String::from_utf8_lossy(&error.reason)
                ))
            }
            frame => return Ok(frame),
        }
    }
}

fn unexpected(frame: Frame, waiting_for: &str) -> String {
    format!("expected {waiting_for}, got {}", frame.kind().name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbws_proto::mbws::{Message, Properties};

    #[test]
    fn peek_finds_delivery_seq_and_body_past_properties_and_headers() {
        let headers = vec![
            (Bytes::from_static(b"x-trace"), Bytes::from_static(b"abc123")),
            (Bytes::from_static(b"x-empty"), Bytes::new()),
        ];
        let message = Message {
            subscription_id: 3,
            delivery_seq: 0x0102_0304_0506_0708,
            message_id: 99,
            address: Bytes::from_static(b"orders"),
            redelivered: true,
            durable: true,
            properties: Properties {
                content_type: Bytes::from_static(b"application/json"),
                correlation_id: Bytes::from_static(b"c-1"),
                reply_to: Bytes::new(),
                headers,
            },
            body: Bytes::from_static(b"the body"),
        };
        let payload = encode(&Frame::Message(message));
        assert_eq!(peek_message(&payload), Some((0x0102_0304_0506_0708, &b"the body"[..])));
        assert_eq!(peek_message(&payload[..30]), None, "a cut frame is left to the decoder");
        let receipt = encode(&Frame::Receipt(mbws_proto::mbws::Receipt { seq: 5 }));
        assert_eq!(peek_message(&receipt), None);
    }
}
