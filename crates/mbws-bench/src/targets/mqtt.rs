//! The MQTT target: MQTT 3.1.1 over WebSocket (subprotocol `mqtt`), as mosquitto serves it.
//!
//! WebSocket payloads form one byte stream of MQTT control packets ([`parse`]). Set-up sends
//! CONNECT (clean session, keep-alive off, a client id unique to the run) and waits for
//! CONNACK; a consumer SUBSCRIBEs to each of its topics at `--qos` and waits for each SUBACK.
//! Publishers send PUBLISH at `--qos`; at QoS 1 each carries a packet identifier, at most
//! `window` wait for their PUBACK, and consumers answer every QoS 1 delivery with PUBACK.
//!
//! MQTT 3.1.1 has no competing consumers without extensions, so every consumer of a topic
//! gets every message published to it.
//!
//! mosquitto quirks: without the `mqtt` subprotocol it never answers CONNECT, and it stalls on
//! WebSocket deliveries over about 4 KB (the flags refuse `--size` above 4000).

use bytes::{Buf, BufMut, BytesMut};

use super::{Codec, Conn, CounterRule, Failure, Inbound, PublishWire, Role, TargetConfig};
use crate::wire::{read_stamp, Counter, Framing, Template};

/// The WebSocket subprotocol of MQTT.
pub const SUBPROTOCOL: &str = "mqtt";
/// Largest packet accepted from the broker.
const MAX_PACKET_BYTES: usize = crate::targets::MAX_INBOUND_MESSAGE_BYTES;
/// Packet identifiers in flight never reach the point where one is reused.
const MAX_QOS1_WINDOW: u64 = 32_768;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// One control packet from the broker, reduced to what the generator uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        return_code: u8,
    },
    /// The first return code of the SUBACK (0x80: refused).
    SubAck {
        packet_id: u16,
        return_code: u8,
    },
    Publish {
        qos: u8,
        packet_id: u16,
        stamp: Option<u64>,
    },
    PubAck {
        packet_id: u16,
    },
    PingResp,
    Other {
        packet_type: u8,
    },
}

/// Parses the first packet of `buf`: `Ok(None)` until it is complete.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet, usize)>, String> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let mut remaining: usize = 0;
    let mut header = 1;
    loop {
        let Some(&byte) = buf.get(header) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7F) << (7 * (header - 1));
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Err("the MQTT broker sent a remaining length longer than 4 bytes".to_string());
        }
    }
    if remaining > MAX_PACKET_BYTES {
        return Err(format!("the MQTT broker sent a {remaining}-byte packet, over the {MAX_PACKET_BYTES}-byte limit"));
    }
    let end = header + remaining;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[header..end];
    let packet_type = first >> 4;
    let short = || format!("the MQTT broker sent a truncated packet of type {packet_type}");
    let u16_at = |at: usize| -> Result<u16, String> {
        body.get(at..at + 2).map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]])).ok_or_else(short)
    };
    let packet = match packet_type {
        CONNACK => Packet::ConnAck { return_code: *body.get(1).ok_or_else(short)? },
        SUBACK => Packet::SubAck { packet_id: u16_at(0)?, return_code: *body.get(2).ok_or_else(short)? },
        PUBACK => Packet::PubAck { packet_id: u16_at(0)? },
        PINGRESP => Packet::PingResp,
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            let topic_bytes = usize::from(u16_at(0)?);
            let mut at = 2 + topic_bytes;
            let packet_id = if qos > 0 {
                let id = u16_at(at)?;
                at += 2;
                id
            } else {
                0
            };
            let payload = body.get(at..).ok_or_else(short)?;
            Packet::Publish { qos, packet_id, stamp: read_stamp(payload) }
        }
        packet_type => Packet::Other { packet_type },
    };
    Ok(Some((packet, end)))
}

/// Appends the MQTT remaining-length encoding of `length`.
fn put_remaining_length(out: &mut Vec<u8>, mut length: usize) {
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.put_u16(text.len() as u16);
    out.extend_from_slice(text.as_bytes());
}

/// A whole packet: fixed header byte, remaining length, `rest`.
fn packet(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, rest.len());
    out.extend_from_slice(rest);
    out
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    put_string(&mut rest, "MQTT");
    rest.push(4); // protocol level 3.1.1
    rest.push(0x02); // clean session
    rest.put_u16(0); // keep-alive off: idle sessions need no PINGREQ
    put_string(&mut rest, client_id);
    packet(CONNECT << 4, &rest)
}

fn subscribe_packet(packet_id: u16, topic: &str, qos: u8) -> Vec<u8> {
    let mut rest = Vec::new();
    rest.put_u16(packet_id);
    put_string(&mut rest, topic);
    rest.push(qos);
    packet((SUBSCRIBE << 4) | 0x02, &rest)
}

/// PUBLISH with a zeroed body; returns the packet, the body offset and the packet-id offset.
fn publish_packet(topic: &str, qos: u8, size: usize) -> (Vec<u8>, usize, Option<usize>) {
    let mut rest = Vec::new();
    put_string(&mut rest, topic);
    let id_in_rest = (qos > 0).then(|| {
        let at = rest.len();
        rest.put_u16(0);
        at
    });
    let body_in_rest = rest.len();
    rest.resize(body_in_rest + size, 0);
    let packet = packet((PUBLISH << 4) | (qos << 1), &rest);
    let header = packet.len() - rest.len();
    (packet, header + body_in_rest, id_in_rest.map(|at| header + at))
}

fn connack_reason(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

/// MQTT state of one connection.
#[derive(Debug, Default)]
pub struct MqttCodec {
    stream: BytesMut,
    pubacks: u64,
}

impl MqttCodec {
    pub fn pubacks(&self) -> u64 {
        self.pubacks
    }

    pub fn on_unit(&mut self, payload: &[u8], cx: &mut Inbound<'_>) -> Result<(), Failure> {
        if self.stream.is_empty() {
            let used = handle_packets(payload, &mut self.pubacks, cx)?;
            self.stream.extend_from_slice(&payload[used..]);
        } else {
            self.stream.extend_from_slice(payload);
            let used = handle_packets(&self.stream, &mut self.pubacks, cx)?;
            self.stream.advance(used);
        }
        Ok(())
    }

    pub fn goodbye(&mut self, framing: Framing, out: &mut BytesMut) {
        framing.frame(out, &[DISCONNECT << 4, 0]);
    }

    async fn next_packet(&mut self, conn: &mut Conn, waiting_for: &str) -> Result<Packet, String> {
        loop {
            if let Some((packet, used)) = parse(&self.stream)? {
                self.stream.advance(used);
                return Ok(packet);
            }
            let (payload, _) = conn.next_unit(waiting_for).await?;
            self.stream.extend_from_slice(&payload);
        }
    }
}

fn handle_packets(data: &[u8], pubacks: &mut u64, cx: &mut Inbound<'_>) -> Result<usize, Failure> {
    let mut used = 0;
    while let Some((packet, length)) = parse(&data[used..]).map_err(Failure::Protocol)? {
        used += length;
        match packet {
            Packet::Publish { qos, packet_id, stamp } => {
                cx.delivered(stamp);
                match qos {
                    0 => {}
                    1 => {
                        let [high, low] = packet_id.to_be_bytes();
                        cx.reply(&[PUBACK << 4, 2, high, low]);
                    }
                    _ => return Err(Failure::Protocol("the MQTT broker delivered at QoS 2, never requested".into())),
                }
            }
            Packet::PubAck { .. } => *pubacks += 1,
            Packet::PingResp | Packet::SubAck { .. } => {}
            other => return Err(Failure::Protocol(format!("unexpected MQTT packet from the broker: {other:?}"))),
        }
    }
    Ok(used)
}

pub async fn setup(
    conn: &mut Conn,
    config: &TargetConfig,
    role: &Role,
    client_id: &str,
) -> Result<(Codec, Option<PublishWire>), String> {
    let mut codec = MqttCodec::default();
    conn.queue(&connect_packet(client_id));
    conn.flush().await?;
    match codec.next_packet(conn, "CONNACK").await? {
        Packet::ConnAck { return_code: 0 } => {}
        Packet::ConnAck { return_code } => {
            return Err(format!("the MQTT broker refused CONNECT: {return_code} ({})", connack_reason(return_code)))
        }
        other => return Err(format!("expected CONNACK, got {other:?}")),
    }
    let mut publish = None;
    match role {
        Role::Publisher { addresses, .. } => {
            let templates = addresses
                .iter()
                .map(|&address| {
                    let (packet, body_at, id_at) =
                        publish_packet(&config.address_name(address), config.qos, config.size);
                    let counter = id_at.map(|offset| Counter { offset, width: 2 });
                    Template::new(conn.framing(), &packet, body_at, counter)
                })
                .collect();
            let (counter, window) = if config.qos == 1 {
                (CounterRule::PacketId, Some(MAX_QOS1_WINDOW))
            } else {
                (CounterRule::None, None)
            };
            publish = Some(PublishWire { templates, counter, window });
        }
        Role::Consumer { addresses, .. } => {
            for (index, &address) in addresses.iter().enumerate() {
                let packet_id = index as u16 + 1;
                conn.queue(&subscribe_packet(packet_id, &config.address_name(address), config.qos));
                conn.flush().await?;
                match codec.next_packet(conn, "SUBACK").await? {
                    Packet::SubAck { return_code, .. } if return_code <= 2 => {}
                    Packet::SubAck { return_code, .. } => {
                        return Err(format!("the MQTT broker refused SUBSCRIBE: return code {return_code:#04x}"))
                    }
                    other => return Err(format!("expected SUBACK, got {other:?}")),
                }
            }
        }
        Role::Idle => {}
    }
    Ok((Codec::Mqtt(codec), publish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_the_parser() {
        let (mut packet, body_at, id_at) = publish_packet("bench/1/0", 1, 200);
        packet[body_at..body_at + 8].copy_from_slice(&7u64.to_be_bytes());
        let id_at = id_at.unwrap();
        packet[id_at..id_at + 2].copy_from_slice(&513u16.to_be_bytes());
        assert_eq!(parse(&packet[..packet.len() - 1]).unwrap(), None);
        assert_eq!(
            parse(&packet).unwrap(),
            Some((Packet::Publish { qos: 1, packet_id: 513, stamp: Some(7) }, packet.len()))
        );
        // 2 + 9 + 2 + 200 = 213 bytes: a two-byte remaining length.
        assert_eq!(&packet[..3], &[0x32, 0xD5, 0x01]);
    }

    #[test]
    fn acknowledgements_and_refusals() {
        assert_eq!(parse(&[0x20, 2, 0, 0]).unwrap(), Some((Packet::ConnAck { return_code: 0 }, 4)));
        assert_eq!(
            parse(&[0x90, 3, 0, 1, 0x80]).unwrap(),
            Some((Packet::SubAck { packet_id: 1, return_code: 0x80 }, 5))
        );
        assert_eq!(parse(&[0x40, 2, 1, 2]).unwrap(), Some((Packet::PubAck { packet_id: 258 }, 4)));
        assert!(parse(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1]).is_err());
        assert!(parse(&[0x40, 1, 0]).is_err());
    }

    #[test]
    fn connect_is_mqtt_3_1_1_with_a_clean_session() {
        let connect = connect_packet("c1");
        assert_eq!(connect, [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 2, b'c', b'1']);
    }
}
