//! Property tests over both bindings: every valid frame of every kind round-trips in each
//! binding, the two bindings agree, and no input (random, or a valid frame damaged) makes a
//! decoder panic or produce an error reason unfit for an ERROR frame.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

fn bytes_of(text: String) -> Bytes {
    Bytes::from(text)
}

/// Addresses: printable ascii or any non-control unicode, 1..=80 bytes.
fn address() -> impl Strategy<Value = Bytes> {
    prop_oneof!["[a-zA-Z0-9./_:*#-]{1,60}", "\\PC{1,20}"].prop_map(bytes_of)
}

fn optional_address() -> impl Strategy<Value = Bytes> {
    prop_oneof![Just(Bytes::new()), address()]
}

/// String field values: any characters but CR, LF and NUL (leading/trailing spaces, tabs,
/// colons and other control characters included, to exercise the text binding).
fn value(max_chars: usize) -> impl Strategy<Value = Bytes> {
    let pattern = format!("[^\\r\\n\\x00]{{0,{max_chars}}}");
    proptest::string::string_regex(&pattern).expect("valid regex").prop_map(bytes_of)
}

fn headers() -> impl Strategy<Value = Headers> {
    vec(("x-[a-z0-9._-]{1,20}".prop_map(bytes_of), value(40)), 0..6).prop_map(|pairs| pairs.into_iter().collect())
}

fn properties() -> impl Strategy<Value = Properties> {
    (value(30), value(30), optional_address(), headers()).prop_map(
        |(content_type, correlation_id, reply_to, headers)| Properties {
            content_type,
            correlation_id,
            reply_to,
            headers,
        },
    )
}

fn body() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..200).prop_map(Bytes::from)
}

fn limits() -> impl Strategy<Value = Limits> {
    (any::<u32>(), any::<u16>(), any::<u16>(), any::<u32>(), any::<[u32; 4]>()).prop_map(
        |(max_frame_bytes, max_address_bytes, max_headers, max_header_bytes, rest)| Limits {
            max_frame_bytes,
            max_address_bytes,
            max_headers,
            max_header_bytes,
            max_credit: rest[0],
            max_subscriptions: rest[1],
            max_inflight_sends: rest[2],
            max_queued_messages: rest[3],
        },
    )
}

fn subscription_id() -> impl Strategy<Value = u32> {
    1..=u32::MAX
}

fn nonzero_seq() -> impl Strategy<Value = u64> {
    1..=u64::MAX
}

/// Valid frames of one kind, covering every field's range.
fn frame_of(kind: FrameKind) -> BoxedStrategy<Frame> {
    match kind {
        FrameKind::Open => (value(40), any::<u64>(), any::<u32>(), value(40), value(300))
            .prop_map(|(session_id, last_received_seq, heartbeat_ms, login, passcode)| {
                Frame::Open(Open {
                    version: PROTOCOL_VERSION,
                    session_id,
                    last_received_seq,
                    heartbeat_ms,
                    login,
                    passcode,
                })
            })
            .boxed(),
        FrameKind::Opened => (
            "[a-zA-Z0-9-]{1,40}".prop_map(bytes_of),
            any::<bool>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            limits(),
            value(40),
        )
            .prop_map(|(session_id, resumed, last_received_seq, heartbeat_ms, session_expiry_ms, limits, server)| {
                Frame::Opened(Opened {
                    version: PROTOCOL_VERSION,
                    session_id,
                    resumed,
                    last_received_seq,
                    heartbeat_ms,
                    session_expiry_ms,
                    limits,
                    server,
                })
            })
            .boxed(),
        FrameKind::Send => (any::<u64>(), address(), any::<bool>(), any::<u32>(), properties(), body())
            .prop_map(|(seq, address, durable, ttl_ms, properties, body)| {
                Frame::Send(Send { seq, address, durable, ttl_ms, properties, body })
            })
            .boxed(),
        FrameKind::Receipt => nonzero_seq().prop_map(|seq| Frame::Receipt(Receipt { seq })).boxed(),
        FrameKind::Subscribe => (subscription_id(), address(), any::<bool>(), any::<bool>(), any::<u32>())
            .prop_map(|(subscription_id, address, multicast, auto_ack, credit)| {
                Frame::Subscribe(Subscribe {
                    subscription_id,
                    address,
                    mode: if multicast { DeliveryMode::Multicast } else { DeliveryMode::Anycast },
                    ack_mode: if auto_ack { AckMode::Auto } else { AckMode::Client },
                    credit,
                })
            })
            .boxed(),
        FrameKind::Subscribed => {
            subscription_id().prop_map(|subscription_id| Frame::Subscribed(Subscribed { subscription_id })).boxed()
        }
        FrameKind::Unsubscribe => {
            subscription_id().prop_map(|subscription_id| Frame::Unsubscribe(Unsubscribe { subscription_id })).boxed()
        }
        FrameKind::Message => (
            subscription_id(),
            nonzero_seq(),
            any::<u64>(),
            address(),
            any::<bool>(),
            any::<bool>(),
            properties(),
            body(),
        )
            .prop_map(|(subscription_id, delivery_seq, message_id, address, redelivered, durable, properties, body)| {
                Frame::Message(Message {
                    subscription_id,
                    delivery_seq,
                    message_id,
                    address,
                    redelivered,
                    durable,
                    properties,
                    body,
                })
            })
            .boxed(),
        FrameKind::Ack => (nonzero_seq(), any::<bool>())
            .prop_map(|(delivery_seq, cumulative)| Frame::Ack(Ack { delivery_seq, cumulative }))
            .boxed(),
        FrameKind::Nack => (nonzero_seq(), any::<bool>())
            .prop_map(|(delivery_seq, requeue)| Frame::Nack(Nack { delivery_seq, requeue }))
            .boxed(),
        FrameKind::Flow => (subscription_id(), any::<u32>())
            .prop_map(|(subscription_id, credit)| Frame::Flow(Flow { subscription_id, credit }))
            .boxed(),
        FrameKind::Ping => any::<u64>().prop_map(|token| Frame::Ping(Ping { token })).boxed(),
        FrameKind::Pong => any::<u64>().prop_map(|token| Frame::Pong(Pong { token })).boxed(),
        FrameKind::Error => (4000..=4999u16, any::<bool>(), any::<u64>(), any::<u32>(), value(300))
            .prop_map(|(code, fatal, seq, subscription_id, reason)| {
                Frame::Error(ErrorFrame { code, fatal, seq, subscription_id, reason })
            })
            .boxed(),
        FrameKind::Close => Just(Frame::Close(Close)).boxed(),
    }
}

fn any_frame() -> impl Strategy<Value = Frame> {
    proptest::sample::select(FrameKind::ALL.to_vec()).prop_flat_map(frame_of)
}

fn round_trip(binding: Binding, frame: &Frame) -> Result<Frame, DecodeError> {
    decode(binding, encode(binding, frame).freeze(), &CodecLimits::default())
}

/// Runs `check` on valid frames of every kind, naming the kind on failure.
/// Property-test cases: `cases`, or a handful under Miri (scripts/miri.sh), which interprets
/// every step and would take hours over the full count; Miri looks for undefined behaviour, which
/// a few cases of each shape reach as well as a thousand.
fn under_miri(cases: u32) -> u32 {
    if cfg!(miri) {
        cases.min(4)
    } else {
        cases
    }
}

fn for_every_kind(cases: u32, check: impl Fn(Frame) -> Result<(), TestCaseError>) {
    for kind in FrameKind::ALL {
        let mut runner = TestRunner::new(Config { cases: under_miri(cases), ..Config::default() });
        if let Err(failure) = runner.run(&frame_of(kind), &check) {
            panic!("{}: {failure}", kind.name());
        }
    }
}

#[test]
fn every_kind_round_trips_in_the_binary_binding() {
    for_every_kind(256, |frame| {
        prop_assert_eq!(round_trip(Binding::Binary, &frame), Ok(frame.clone()));
        Ok(())
    });
}

#[test]
fn every_kind_round_trips_in_the_text_binding() {
    for_every_kind(256, |frame| {
        prop_assert_eq!(round_trip(Binding::Text, &frame), Ok(frame.clone()));
        Ok(())
    });
}

#[test]
fn both_bindings_decode_to_the_same_frame() {
    for_every_kind(128, |frame| {
        let limits = CodecLimits::default();
        let binary = decode(Binding::Binary, encode(Binding::Binary, &frame).freeze(), &limits);
        let text = decode(Binding::Text, encode(Binding::Text, &frame).freeze(), &limits);
        prop_assert_eq!(&binary, &text);
        prop_assert_eq!(binary, Ok(frame));
        Ok(())
    });
}

#[test]
fn no_message_is_larger_than_largest_message_bytes_and_the_widest_one_is_exactly_that() {
    let mut runner = TestRunner::new(Config { cases: under_miri(256), ..Config::default() });
    let checked = runner.run(&frame_of(FrameKind::Message), |frame| {
        let Frame::Message(message) = frame else { unreachable!("frame_of(MESSAGE) gives MESSAGEs") };
        let largest = largest_message_bytes(&message.address, &message.properties, message.body.len());
        let encoded = |message: &Message| {
            let frame = Frame::Message(message.clone());
            encode(Binding::Binary, &frame).len().max(encode(Binding::Text, &frame).len())
        };
        prop_assert!(encoded(&message) <= largest);
        let widest = Message {
            subscription_id: u32::MAX,
            delivery_seq: u64::MAX,
            message_id: u64::MAX,
            redelivered: true,
            durable: true,
            ..message
        };
        prop_assert_eq!(encoded(&widest), largest);
        Ok(())
    });
    checked.unwrap();
}

#[test]
fn text_header_lines_may_end_with_crlf() {
    for_every_kind(64, |frame| {
        let encoded = encode(Binding::Text, &frame).freeze();
        let body_length = frame.body().map_or(0, Bytes::len);
        let (header, body) = encoded.split_at(encoded.len() - body_length);
        let mut crlf = String::from_utf8(header.to_vec()).unwrap().replace('\n', "\r\n").into_bytes();
        crlf.extend_from_slice(body);
        let decoded = decode(Binding::Text, Bytes::from(crlf), &CodecLimits::default());
        prop_assert_eq!(decoded, Ok(frame));
        Ok(())
    });
}

#[test]
fn encode_header_writes_everything_but_the_body() {
    for_every_kind(32, |frame| {
        for binding in [Binding::Binary, Binding::Text] {
            let mut header = Vec::new();
            encode_header(binding, &frame, &mut header);
            let whole = encode(binding, &frame);
            let body = frame.body().cloned().unwrap_or_default();
            prop_assert_eq!(&whole[..header.len()], &header[..]);
            prop_assert_eq!(&whole[header.len()..], &body[..]);
        }
        Ok(())
    });
}

#[test]
fn decoded_strings_and_body_are_slices_of_the_payload() {
    let frame = Frame::Send(Send {
        seq: 1,
        address: Bytes::from_static(b"orders"),
        body: Bytes::from_static(b"hello"),
        ..Send::default()
    });
    for binding in [Binding::Binary, Binding::Text] {
        let payload = encode(binding, &frame).freeze();
        let range = payload.as_ptr_range();
        let Ok(Frame::Send(send)) = decode(binding, payload.clone(), &CodecLimits::default()) else {
            panic!("{binding:?}: SEND does not decode");
        };
        for slice in [&send.address, &send.body] {
            assert!(range.contains(&slice.as_ptr()), "{binding:?}: a field was copied");
        }
    }
}

/// An error reason goes back to the peer in an ERROR frame: it must be a valid `reason`.
fn assert_reason_is_sendable(error: &DecodeError) -> Result<(), TestCaseError> {
    prop_assert!(matches!(error.code, ErrorCode::MalformedFrame | ErrorCode::TooLarge));
    prop_assert!(!error.reason.is_empty());
    prop_assert!(error.reason.len() < 1024, "reason too long: {}", error.reason);
    prop_assert!(
        !error.reason.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0)),
        "reason would break an ERROR frame: {:?}",
        error.reason
    );
    Ok(())
}

/// Whatever a decoder accepts, it accepts again after re-encoding (in both bindings).
fn check_decoded(binding: Binding, result: Result<Frame, DecodeError>) -> Result<(), TestCaseError> {
    match result {
        Ok(frame) => {
            prop_assert_eq!(round_trip(binding, &frame), Ok(frame.clone()));
            let other = if binding == Binding::Binary { Binding::Text } else { Binding::Binary };
            prop_assert_eq!(round_trip(other, &frame), Ok(frame));
        }
        Err(error) => assert_reason_is_sendable(&error)?,
    }
    Ok(())
}

/// Damage to a valid encoding: flip a byte, cut the frame short, or insert a byte.
#[derive(Debug, Clone)]
enum Damage {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Set(at, byte)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop_oneof![Just(b'\n'), Just(b':'), Just(b'\r'), any::<u8>()])
            .prop_map(|(at, byte)| Damage::Insert(at, byte)),
    ]
}

fn apply(damage: &Damage, bytes: &mut Vec<u8>) {
    let length = bytes.len().max(1);
    match *damage {
        Damage::Set(at, byte) => {
            if let Some(slot) = bytes.get_mut(at % length) {
                *slot = byte;
            }
        }
        Damage::Truncate(at) => bytes.truncate(at % length),
        Damage::Insert(at, byte) => bytes.insert(at % (bytes.len() + 1), byte),
    }
}

#[test]
fn decode_send_keeps_what_decode_finds_as_the_tail_of_the_message_that_delivers_it() {
    let mut runner = TestRunner::new(Config { cases: under_miri(512), ..Config::default() });
    let checked = runner.run(&frame_of(FrameKind::Send), |frame| {
        let Frame::Send(send) = &frame else { unreachable!("frame_of(SEND) gives SENDs") };
        let payload = encode(Binding::Binary, &frame).freeze();
        let decoded = binary::decode_send(payload.clone(), &CodecLimits::default());
        let decoded = decoded.map_err(|error| TestCaseError::fail(error.reason))?;
        prop_assert_eq!((decoded.durable, decoded.seq, decoded.ttl_ms), (send.durable, send.seq, send.ttl_ms));
        prop_assert_eq!(decoded.tail.address(), &send.address[..]);
        prop_assert_eq!(decoded.tail.properties(), send.properties.clone());
        prop_assert_eq!(decoded.tail.body(), &send.body[..]);
        prop_assert_eq!(&decoded.tail.body_bytes(), &send.body);
        prop_assert_eq!(decoded.tail.has_properties(), !send.properties.is_empty());
        // No copy: the tail is the payload from the address on.
        prop_assert_eq!(decoded.tail.as_bytes().as_ptr(), payload[15..].as_ptr());
        // The same tail as one encoded from the fields (a text-binding SEND's).
        prop_assert_eq!(&binary::SendTail::encode(send), &decoded);
        prop_assert_eq!(
            largest_message_bytes_of_tail(&decoded.tail),
            largest_message_bytes(&send.address, &send.properties, send.body.len())
        );
        // Found while decoding, with or without properties.
        prop_assert_eq!(
            decoded.largest_message_bytes,
            largest_message_bytes(&send.address, &send.properties, send.body.len())
        );
        // The fixed fields followed by the tail are the MESSAGE that delivers it.
        let mut message = binary::encode_message_fixed(7, 8, 9, true, send.durable).to_vec();
        message.extend_from_slice(decoded.tail.as_bytes());
        let expected = Frame::Message(Message {
            redelivered: true,
            durable: send.durable,
            subscription_id: 7,
            delivery_seq: 8,
            message_id: 9,
            address: send.address.clone(),
            properties: send.properties.clone(),
            body: send.body.clone(),
        });
        prop_assert_eq!(decode(Binding::Binary, Bytes::from(message), &CodecLimits::default()), Ok(expected));
        Ok(())
    });
    checked.unwrap();
}

#[test]
fn decode_message_keeps_the_tail_of_what_decode_finds_and_the_tail_behind_sends_fixed_bytes_reads_back_as_that_send() {
    let mut runner = TestRunner::new(Config { cases: under_miri(512), ..Config::default() });
    let checked = runner.run(&frame_of(FrameKind::Message), |frame| {
        let Frame::Message(message) = &frame else { unreachable!("frame_of(MESSAGE) gives MESSAGEs") };
        let payload = encode(Binding::Binary, &frame).freeze();
        let decoded = binary::decode_message(payload.clone(), &CodecLimits::default());
        let decoded = decoded.map_err(|error| TestCaseError::fail(error.reason))?;
        prop_assert_eq!(&decoded.to_message(), message);
        prop_assert_eq!(&binary::MessageWithTail::from_message(message), &decoded);
        // No copy: the tail is the payload from the address on.
        prop_assert_eq!(decoded.tail.as_bytes().as_ptr(), payload[binary::MESSAGE_FIXED_BYTES..].as_ptr());
        // SEND's fixed bytes and the tail (what a cluster node's forwarder writes): the same
        // message, field for field, as a SEND.
        let mut send = binary::encode_send_fixed(5, 6, message.durable).to_vec();
        send.extend_from_slice(decoded.tail.as_bytes());
        let expected = Frame::Send(Send {
            durable: message.durable,
            seq: 5,
            ttl_ms: 6,
            address: message.address.clone(),
            properties: message.properties.clone(),
            body: message.body.clone(),
        });
        let limits = CodecLimits { max_headers: 1024, ..CodecLimits::default() };
        prop_assert_eq!(decode(Binding::Binary, Bytes::from(send), &limits), Ok(expected));
        Ok(())
    });
    checked.unwrap();
}

proptest! {
    #![proptest_config(Config { cases: under_miri(1024), ..Config::default() })]

    #[test]
    fn decode_message_refuses_exactly_what_decode_refuses(frame in frame_of(FrameKind::Message), damages in vec(damage(), 1..4)) {
        let mut bytes = encode(Binding::Binary, &frame).to_vec();
        for damage in &damages {
            apply(damage, &mut bytes);
        }
        // decode_message is called only for frames whose kind byte says MESSAGE.
        if bytes.get(1) == Some(&FrameKind::Message.code()) {
            let limits = CodecLimits::default();
            let generic = decode(Binding::Binary, Bytes::from(bytes.clone()), &limits);
            let direct = binary::decode_message(Bytes::from(bytes), &limits);
            match (generic, direct) {
                (Ok(Frame::Message(message)), Ok(direct)) => prop_assert_eq!(message, direct.to_message()),
                (Err(generic), Err(direct)) => prop_assert_eq!(generic, direct),
                (generic, direct) => prop_assert!(false, "decode gave {generic:?}, decode_message {direct:?}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(Config { cases: under_miri(1024), ..Config::default() })]

    #[test]
    fn decode_send_refuses_exactly_what_decode_refuses(frame in frame_of(FrameKind::Send), damages in vec(damage(), 1..4)) {
        let mut bytes = encode(Binding::Binary, &frame).to_vec();
        for damage in &damages {
            apply(damage, &mut bytes);
        }
        // decode_send is called only for frames whose kind byte says SEND.
        if bytes.get(1) == Some(&FrameKind::Send.code()) {
            let limits = CodecLimits::default();
            let generic = decode(Binding::Binary, Bytes::from(bytes.clone()), &limits);
            let direct = binary::decode_send(Bytes::from(bytes), &limits);
            match (generic, direct) {
                (Ok(Frame::Send(send)), Ok(direct)) => prop_assert_eq!(binary::SendTail::encode(&send), direct),
                (Err(generic), Err(direct)) => prop_assert_eq!(generic, direct),
                (generic, direct) => prop_assert!(false, "decode gave {generic:?}, decode_send {direct:?}"),
            }
        }
    }

    #[test]
    fn a_plain_send_read_where_it_lies_is_what_decode_send_makes_of_it(
        frame in sends_with_and_without_properties(),
        damages in vec(damage(), 0..3),
    ) {
        let Frame::Send(send) = &frame else { unreachable!("SENDs only") };
        let mut bytes = encode(Binding::Binary, &frame).to_vec();
        for damage in &damages {
            apply(damage, &mut bytes);
        }
        let limits = CodecLimits::default();
        let plain = binary::decode_plain_send(&bytes, &limits);
        // decode_send is called only for frames whose kind byte says SEND, as the broker's
        // receive path calls it (a damage that turns the kind byte into another kind's is a
        // caller's mistake there); the plain read leaves any other payload to the caller.
        if bytes.get(1) != Some(&FrameKind::Send.code()) {
            prop_assert!(matches!(plain, Ok(None)), "another kind read as a plain SEND: {plain:?}");
            return Ok(());
        }
        let direct = binary::decode_send(Bytes::from(bytes.clone()), &limits);
        match plain {
            // The same fields, the same tail, the same errors: the broker's receive path
            // takes the tail itself from the read buffer.
            Ok(Some(plain)) => {
                let tail = Bytes::copy_from_slice(&bytes[binary::PlainSend::TAIL_OFFSET..]);
                prop_assert_eq!(Ok(plain.with_tail(tail)), direct);
            }
            Err(error) => prop_assert_eq!(Err(error), direct),
            // Left to decode_send: only a SEND with properties or a damaged one.
            Ok(None) => prop_assert!(!send.properties.is_empty() || !damages.is_empty(), "a plain SEND left: {bytes:?}"),
        }
    }
}

/// SENDs, half of them without properties (the shape the text binding's slice decode takes).
fn sends_with_and_without_properties() -> impl Strategy<Value = Frame> {
    (frame_of(FrameKind::Send), any::<bool>()).prop_map(|(frame, plain)| match frame {
        Frame::Send(send) if plain => Frame::Send(Send { properties: Properties::default(), ..send }),
        other => other,
    })
}

proptest! {
    #![proptest_config(Config { cases: under_miri(1024), ..Config::default() })]

    #[test]
    fn a_plain_text_send_read_from_a_slice_is_what_decode_finds(
        frame in sends_with_and_without_properties(),
        damages in vec(damage(), 0..4),
    ) {
        let Frame::Send(send) = &frame else { unreachable!("SENDs only") };
        let mut bytes = encode(Binding::Text, &frame).to_vec();
        for damage in &damages {
            apply(damage, &mut bytes);
        }
        let limits = CodecLimits::default();
        // A chunk with room for the tail, as the broker leaves: the tail is never longer than
        // its payload, so it is split off without growing the chunk, and nothing is written
        // when the payload is left to decode.
        let mut chunk = BytesMut::with_capacity(bytes.len());
        let room = chunk.capacity();
        let direct = decode_plain_text_send(&bytes, &limits, &mut chunk);
        prop_assert!(chunk.is_empty());
        match &direct {
            Some(direct) => prop_assert_eq!(chunk.capacity(), room - direct.tail.as_bytes().len()),
            None => prop_assert_eq!(chunk.capacity(), room),
        }
        // Undamaged and without properties: the slice decode takes it.
        if damages.is_empty() && send.properties.is_empty() {
            prop_assert!(direct.is_some(), "a plain text SEND was left to decode");
        }
        // Whatever it takes is exactly what decode finds; anything else (faults included) is
        // left to decode, which reports it as before.
        if let Some(direct) = direct {
            match decode(Binding::Text, Bytes::from(bytes), &limits) {
                Ok(Frame::Send(send)) => prop_assert_eq!(binary::SendTail::encode(&send), direct),
                other => prop_assert!(false, "decode gave {other:?}, the slice decode {direct:?}"),
            }
        }
    }

    #[test]
    fn a_plain_text_send_is_judged_by_decodes_field_rules(
        seq in prop_oneof![Just(String::new()), "[0-9]{1,21}", "[0-9a-z +-]{0,4}"],
        ttl in prop_oneof![Just(String::new()), "[0-9]{1,11}", "[0-9 -]{0,3}"],
        durable in prop_oneof![Just(String::new()), Just("true".to_string()), Just("false".to_string()), "[a-zT]{0,5}"],
        address in prop_oneof![address().prop_map(|address| String::from_utf8(address.to_vec()).unwrap()), "[ -~\\t]{0,3}", "a{250,260}"],
        order in Just([0usize, 1, 2, 3]).prop_shuffle(),
        max_address_bytes in prop_oneof![Just(255usize), 1usize..40],
    ) {
        let fields = [("seq", seq), ("ttl-ms", ttl), ("durable", durable), ("address", address)];
        let mut text = String::from("SEND\n");
        for index in order {
            let (name, value) = &fields[index];
            // An empty value stands for a line left out, except for the address (required).
            if !value.is_empty() || *name == "address" {
                text.push_str(&format!("{name}:{value}\n"));
            }
        }
        text.push_str("\nbody");
        let limits = CodecLimits { max_address_bytes, ..CodecLimits::default() };
        let direct = decode_plain_text_send(text.as_bytes(), &limits, &mut BytesMut::new());
        match decode(Binding::Text, Bytes::from(text), &limits) {
            Ok(Frame::Send(send)) => prop_assert_eq!(Some(binary::SendTail::encode(&send)), direct),
            Ok(other) => prop_assert!(false, "a SEND decoded as {other:?}"),
            Err(_) => prop_assert_eq!(direct, None),
        }
    }

    #[test]
    fn random_bytes_never_panic_either_decoder(payload in vec(any::<u8>(), 0..256)) {
        for binding in [Binding::Binary, Binding::Text] {
            let result = decode(binding, Bytes::from(payload.clone()), &CodecLimits::default());
            check_decoded(binding, result)?;
        }
    }

    #[test]
    fn random_binary_frames_with_a_valid_prefix_never_panic(
        kind in 1..=15u8,
        flags in any::<u8>(),
        rest in vec(any::<u8>(), 0..128),
    ) {
        let mut payload = vec![PROTOCOL_VERSION, kind, flags];
        payload.extend_from_slice(&rest);
        check_decoded(Binding::Binary, binary::decode(Bytes::from(payload), &CodecLimits::default()))?;
    }

    #[test]
    fn random_text_frames_never_panic(
        kind in proptest::sample::select(FrameKind::ALL.to_vec()),
        lines in vec("(x-)?[a-z-]{0,12}:[ -~]{0,12}\r?", 0..6),
        body in "[ -~\n]{0,20}",
    ) {
        let payload = format!("{}\n{}\n{body}", kind.name(), lines.iter().map(|line| format!("{line}\n")).collect::<String>());
        check_decoded(Binding::Text, text::decode(Bytes::from(payload), &CodecLimits::default()))?;
    }

    #[test]
    fn damaged_frames_never_panic(frame in any_frame(), damages in vec(damage(), 1..4)) {
        for binding in [Binding::Binary, Binding::Text] {
            let mut bytes = encode(binding, &frame).to_vec();
            for damage in &damages {
                apply(damage, &mut bytes);
            }
            let result = decode(binding, Bytes::from(bytes), &CodecLimits::default());
            check_decoded(binding, result)?;
        }
    }
}

/// One valid frame of `kind` with most fields set: the frames of the examples in
/// docs/PROTOCOL.md, and the starting point of the unit tests.
pub(crate) fn sample(kind: FrameKind) -> Frame {
    let properties = Properties {
        content_type: Bytes::from_static(b"application/json"),
        correlation_id: Bytes::new(),
        reply_to: Bytes::new(),
        headers: [(Bytes::from_static(b"x-trace"), Bytes::from_static(b"abc123"))].into_iter().collect(),
    };
    let body = Bytes::from_static(b"{\"order\":42}\n");
    match kind {
        FrameKind::Open => Frame::Open(Open {
            heartbeat_ms: 30_000,
            login: Bytes::from_static(b"alice"),
            passcode: Bytes::from_static(b"s3cret"),
            ..Open::default()
        }),
        FrameKind::Opened => Frame::Opened(Opened {
            version: PROTOCOL_VERSION,
            session_id: Bytes::from_static(b"s-7f3a9c"),
            resumed: false,
            last_received_seq: 0,
            heartbeat_ms: 30_000,
            session_expiry_ms: 60_000,
            limits: Limits {
                max_frame_bytes: 1 << 20,
                max_address_bytes: 255,
                max_headers: 64,
                max_header_bytes: 16 * 1024,
                max_credit: 65_535,
                max_subscriptions: 1024,
                max_inflight_sends: 4096,
                max_queued_messages: 100_000,
            },
            server: Bytes::from_static(b"mbws-broker/0.1.0"),
        }),
        FrameKind::Send => Frame::Send(Send {
            seq: 1,
            address: Bytes::from_static(b"orders"),
            durable: false,
            ttl_ms: 0,
            properties,
            body,
        }),
        FrameKind::Receipt => Frame::Receipt(Receipt { seq: 1 }),
        FrameKind::Subscribe => Frame::Subscribe(Subscribe {
            subscription_id: 1,
            address: Bytes::from_static(b"orders"),
            mode: DeliveryMode::Anycast,
            ack_mode: AckMode::Client,
            credit: 10,
        }),
        FrameKind::Subscribed => Frame::Subscribed(Subscribed { subscription_id: 1 }),
        FrameKind::Unsubscribe => Frame::Unsubscribe(Unsubscribe { subscription_id: 1 }),
        FrameKind::Message => Frame::Message(Message {
            subscription_id: 1,
            delivery_seq: 1,
            message_id: 1001,
            address: Bytes::from_static(b"orders"),
            redelivered: false,
            durable: false,
            properties,
            body,
        }),
        FrameKind::Ack => Frame::Ack(Ack { delivery_seq: 1, cumulative: true }),
        FrameKind::Nack => Frame::Nack(Nack { delivery_seq: 2, requeue: true }),
        FrameKind::Flow => Frame::Flow(Flow { subscription_id: 1, credit: 100 }),
        FrameKind::Ping => Frame::Ping(Ping { token: 42 }),
        FrameKind::Pong => Frame::Pong(Pong { token: 42 }),
        FrameKind::Error => Frame::Error(ErrorFrame {
            code: ErrorCode::Overloaded.as_u16(),
            fatal: false,
            seq: 7,
            subscription_id: 0,
            reason: Bytes::from_static(b"address `orders` is full (max_queued_messages 100000)"),
        }),
        FrameKind::Close => Frame::Close(Close),
    }
}

/// Asserts `result` is an error with `code` whose reason contains every one of `needles`.
#[track_caller]
pub(crate) fn assert_error(result: Result<Frame, DecodeError>, code: ErrorCode, needles: &[&str]) {
    let error = match result {
        Ok(frame) => panic!("expected {code}, but decoded {frame:?}"),
        Err(error) => error,
    };
    assert_eq!(error.code, code, "wrong code; reason: {}", error.reason);
    for needle in needles {
        assert!(error.reason.contains(needle), "reason {:?} does not mention {needle:?}", error.reason);
    }
}

#[test]
fn samples_are_valid_in_both_bindings() {
    for kind in FrameKind::ALL {
        let frame = sample(kind);
        assert_eq!(frame.kind(), kind);
        for binding in [Binding::Binary, Binding::Text] {
            assert_eq!(round_trip(binding, &frame), Ok(frame.clone()), "{binding:?}");
        }
    }
}
