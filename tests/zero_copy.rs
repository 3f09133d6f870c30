//! Proof that a message body is never copied between the publisher's read buffer and the
//! consumers' socket writes: the broker's own pipeline (WebSocket decoder, publisher session,
//! address table, consumer sessions, write queues) is driven in-process on a multicast fan-out,
//! and every outgoing iovec that carries the body must point into the publisher's read buffer.

use std::sync::Arc;

use bytes::Bytes;
use mbws::auth::Access;
use mbws::broker::address::{AddressLimits, AddressTable};
use mbws::broker::{AddressCommand, ConnId, ConnRef, ShardId};
use mbws::config::Config;
use mbws::conn::outbound::{Outbound, WriteBatch};
use mbws::conn::session::{Effects, Session, SessionConfig};
use mbws::mbws::{self as protocol, AckMode, Binding, DeliveryMode, Frame, Subprotocol};
use mbws::ws::frame::encode_frame;
use mbws::ws::message::{Decoder, WsEvent};
use mbws::ws::{OpCode, Role};

const SUBSCRIBERS: u32 = 3;

fn session_config() -> Arc<SessionConfig> {
    let config = Config { shards: 1, ..Config::default() };
    Arc::new(SessionConfig {
        limits: config.limits(),
        codec_limits: config.codec_limits(),
        max_heartbeat_ms: 60_000,
        session_expiry_ms: 0,
        shard_count: 1,
        default_credit: 100,
    })
}

fn conn(index: u32) -> ConnRef {
    ConnRef { shard: ShardId(0), conn: ConnId { index, generation: 0 } }
}

/// Feeds one client frame to a session and runs the resulting address commands.
fn feed(
    session: &mut Session,
    outbound: &mut Outbound,
    table: &mut AddressTable,
    frame: Frame,
) -> Vec<mbws::broker::ConnCommand> {
    let mut commands = Vec::new();
    let mut fx = Effects { outbound, commands: &mut commands };
    session.on_frame(Binding::Binary, frame, 0, &mut fx).expect("frame accepted");
    run(table, commands)
}

fn run(table: &mut AddressTable, commands: Vec<(ShardId, AddressCommand)>) -> Vec<mbws::broker::ConnCommand> {
    let mut out = Vec::new();
    for (_, command) in commands {
        table.handle(command, 0, &mut out);
    }
    out.into_iter().map(|(_, command)| command).collect()
}

#[test]
fn multicast_fan_out_writes_the_publishers_buffer_without_copying_the_body() {
    let config = session_config();
    let mut table = AddressTable::new(
        ShardId(0),
        AddressLimits { max_queued_messages: 100, max_credit: 100, ..AddressLimits::default() },
    );
    let open = Frame::Open(protocol::Open::default());

    // Subscribers 1..=3, each with its own session and write queue.
    let mut subscribers: Vec<(Session, Outbound)> = (1..=SUBSCRIBERS)
        .map(|index| {
            let mut session =
                Session::new(conn(index), Subprotocol::Reliable, config.clone(), index as u64, Access::unrestricted());
            let mut outbound = Outbound::new();
            feed(&mut session, &mut outbound, &mut table, open.clone());
            let subscribe = Frame::Subscribe(protocol::Subscribe {
                subscription_id: 1,
                address: Bytes::from_static(b"fan-out"),
                mode: DeliveryMode::Multicast,
                ack_mode: AckMode::Client,
                credit: 10,
            });
            let answers = feed(&mut session, &mut outbound, &mut table, subscribe);
            let mut commands = Vec::new();
            for answer in answers {
                session.on_command(answer, &mut Effects { outbound: &mut outbound, commands: &mut commands });
            }
            // Discard OPENED and SUBSCRIBED.
            assert!(outbound.take_batch(WriteBatch::default()).is_some());
            (session, outbound)
        })
        .collect();

    // The publisher's read buffer holds one masked client frame, as it came off the socket.
    let body = vec![0xA5u8; 4096];
    let send = Frame::Send(protocol::Send {
        seq: 1,
        address: Bytes::from_static(b"fan-out"),
        body: Bytes::from(body.clone()),
        ..Default::default()
    });
    let payload = protocol::encode(Binding::Binary, &send);
    let mut read_buffer = encode_frame(true, OpCode::Binary, &payload, Some([1, 2, 3, 4]));
    let buffer_start = read_buffer.as_ptr() as usize;
    let buffer_end = buffer_start + read_buffer.len();

    let mut decoder = Decoder::new(Role::Server, 1 << 20, 1 << 20);
    let Some(WsEvent::Binary(message)) = decoder.next_event(&mut read_buffer).unwrap() else {
        panic!("one binary message");
    };
    let mut publisher = Session::new(conn(100), Subprotocol::Reliable, config.clone(), 100, Access::unrestricted());
    let mut publisher_out = Outbound::new();
    let mut commands = Vec::new();
    let mut fx = Effects { outbound: &mut publisher_out, commands: &mut commands };
    publisher.on_frame(Binding::Binary, Frame::Open(protocol::Open::default()), 0, &mut fx).unwrap();
    publisher.on_message(Binding::Binary, message, 0, &mut fx).unwrap();
    let deliveries = run(&mut table, commands);

    let mut pointers = Vec::new();
    for command in deliveries {
        let target = command.conn().index;
        if target == 100 {
            continue; // The publisher's own answer (PublishDone).
        }
        let (session, outbound) = &mut subscribers[(target - 1) as usize];
        let mut unused = Vec::new();
        session.on_command(command, &mut Effects { outbound, commands: &mut unused });
    }
    for (_, outbound) in subscribers.iter_mut() {
        let batch = outbound.take_batch(WriteBatch::default()).expect("a MESSAGE to write");
        let bytes = batch.to_vec();
        assert!(bytes.ends_with(&body), "the MESSAGE frame carries the body");
        pointers.extend(batch.body_pointers());
    }
    assert_eq!(pointers.len(), SUBSCRIBERS as usize, "one body iovec per subscriber");
    for pointer in &pointers {
        let address = *pointer as usize;
        assert!(
            (buffer_start..buffer_end).contains(&address),
            "the body iovec points into the publisher's read buffer, not into a copy"
        );
    }
    assert!(pointers.windows(2).all(|pair| pair[0] == pair[1]), "every subscriber writes the same bytes");
}
