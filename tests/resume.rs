//! Reliable transport (MBWS): sessions survive lost connections. A fault-injection proxy cuts
//! and stalls connections at random (seeded) points while a reliable publisher and consumer
//! exchange messages; every message must arrive exactly once, in order.

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::{ChaosProxy, Schedule};
use common::Broker;
use mbws::mbws::{AckMode, Binding, DeliveryMode, Frame, Subprotocol};
use mbws_client::{Client, ClientOptions};

fn reliable(url: &str) -> Client {
    let options = ClientOptions {
        subprotocol: Subprotocol::Reliable,
        binding: Binding::Binary,
        timeout: Duration::from_secs(10),
        reconnect: Some(Duration::from_secs(20)),
        ..ClientOptions::default()
    };
    Client::connect(url, options).expect("connect")
}

fn seed() -> u64 {
    std::env::var("MBWS_FAULT_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or(0x5eed_2026)
}

#[test]
fn twenty_thousand_messages_survive_fifty_disconnects_exactly_once_in_order() {
    const TOTAL: u64 = 20_000;
    const MIN_CUTS: u64 = 50;
    let seed = seed();
    eprintln!("fault schedule seed {seed} (set MBWS_FAULT_SEED to replay)");
    let broker = Broker::start(&["--shards", "2", "--session-expiry-ms", "30000"]);
    let proxy = ChaosProxy::start(
        broker.addr,
        Schedule { seed, gap_ms: (5, 25), cut_percent: 75, stall_ms: (5, 80), max_cuts: 400 },
    );
    let url = proxy.url();
    let mut consumer = reliable(&url);
    consumer.subscribe(1, "chaos", DeliveryMode::Anycast, AckMode::Client, 500).unwrap();

    let publisher_url = url.clone();
    let cut_counter = proxy.cut_counter();
    let publisher = std::thread::spawn(move || {
        let mut publisher = reliable(&publisher_url);
        let mut last = 0;
        for index in 0..TOTAL {
            last = publisher.send("chaos", index.to_string()).unwrap();
            if index % 100 == 99 {
                publisher.wait_receipt(last).unwrap();
                // Pace by the faults: batch b waits (bounded) for b/3 cuts, so the run spans at
                // least MIN_CUTS + 10 of them wherever they fall.
                let wanted = ((index + 1) / 300).min(MIN_CUTS + 10);
                let patience = Instant::now() + Duration::from_secs(2);
                while cut_counter.load(std::sync::atomic::Ordering::Relaxed) < wanted && Instant::now() < patience {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        publisher.wait_receipt(last).unwrap();
        publisher.reconnects()
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    for expected in 0..TOTAL {
        assert!(Instant::now() < deadline, "stuck at message {expected}");
        let message = consumer
            .next_message(Duration::from_secs(15))
            .unwrap_or_else(|error| panic!("consumer failed at message {expected}: {error}"))
            .unwrap_or_else(|| panic!("message {expected} never arrived"));
        assert_eq!(message.body, Bytes::from(expected.to_string()), "exactly once, in order");
        if expected % 50 == 49 || expected + 1 == TOTAL {
            consumer.ack(message.delivery_seq, true).unwrap();
            consumer.flush().unwrap();
        }
    }
    let publisher_reconnects = publisher.join().expect("publisher thread");
    let cuts = proxy.cuts();
    eprintln!(
        "cuts {cuts}, stalls {}, publisher reconnects {publisher_reconnects}, consumer reconnects {}",
        proxy.stalls(),
        consumer.reconnects()
    );
    assert!(cuts >= MIN_CUTS, "only {cuts} disconnects were injected");
    assert!(publisher_reconnects + consumer.reconnects() >= MIN_CUTS, "the clients resumed after the cuts");
    drop(proxy);
    // Nothing extra is left over (no duplicate queued behind the last message).
    let mut direct = reliable(&broker.url());
    direct.subscribe(1, "chaos", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    assert!(direct.next_message(Duration::from_millis(300)).unwrap().is_none(), "a duplicate was queued");
}

#[test]
fn a_resume_lands_on_another_shard_and_still_finds_its_session() {
    // Many reconnects through SO_REUSEPORT: most land on the other shard, whose socket is
    // handed to the session's shard.
    let broker = Broker::start(&["--shards", "2", "--session-expiry-ms", "30000"]);
    let proxy = ChaosProxy::start(
        broker.addr,
        Schedule { seed: seed() ^ 1, gap_ms: (20, 40), cut_percent: 100, stall_ms: (1, 2), max_cuts: 40 },
    );
    let mut consumer = reliable(&proxy.url());
    consumer.subscribe(1, "handover", DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    let mut publisher = reliable(&broker.url());
    for round in 0..40u64 {
        let seq = publisher.send("handover", round.to_string()).unwrap();
        publisher.wait_receipt(seq).unwrap();
        let message = consumer.next_message(Duration::from_secs(10)).unwrap().expect("delivered");
        assert_eq!(message.body, Bytes::from(round.to_string()));
        consumer.ack(message.delivery_seq, true).unwrap();
        consumer.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let handovers = broker.log_lines().iter().filter(|line| line.contains("handing the resume")).count();
    eprintln!("reconnects {}, handovers {handovers}", consumer.reconnects());
    assert!(consumer.reconnects() >= 5, "the proxy forced reconnects");
    assert!(handovers >= 1, "at least one resume crossed shards");
}

#[test]
fn an_unknown_or_expired_session_gets_4404() {
    let broker = Broker::start(&["--shards", "1", "--session-expiry-ms", "300"]);
    let mut client = reliable(&broker.url());
    let session_id = client.opened().session_id.clone();
    client.subscribe(1, "expiring", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    drop(client); // Lost, not closed: the session waits 300 ms.
    std::thread::sleep(Duration::from_millis(800));
    let error = resume_by_hand(&broker, &session_id);
    assert_eq!(error.code, 4404, "{error:?}");
    assert!(error.fatal);
    assert!(String::from_utf8_lossy(&error.reason).contains("not known"), "{error:?}");
}

/// Opens a WebSocket with tungstenite and sends OPEN{session_id}; returns the broker's ERROR.
fn resume_by_hand(broker: &Broker, session_id: &Bytes) -> mbws::mbws::ErrorFrame {
    use tungstenite::client::IntoClientRequest;
    let mut request = broker.url().into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "MBWS.huawei.com".parse().unwrap());
    let stream = std::net::TcpStream::connect(broker.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut socket, _) = tungstenite::client(request, stream).unwrap();
    let open = mbws::mbws::Open { session_id: session_id.clone(), last_received_seq: 0, ..Default::default() };
    let payload = mbws::mbws::encode(Binding::Binary, &Frame::Open(open));
    socket.send(tungstenite::Message::Binary(payload.freeze())).unwrap();
    loop {
        match socket.read().unwrap() {
            tungstenite::Message::Binary(payload) => {
                match mbws::mbws::decode(Binding::Binary, payload, &Default::default()).unwrap() {
                    Frame::Error(error) => return error,
                    other => panic!("expected ERROR, got {other:?}"),
                }
            }
            tungstenite::Message::Close(_) => panic!("closed without ERROR"),
            _ => continue,
        }
    }
}

#[test]
fn closing_a_session_is_final_and_a_light_session_never_resumes() {
    let broker = Broker::start(&["--shards", "1"]);
    let client = reliable(&broker.url());
    let session_id = client.opened().session_id.clone();
    client.close().unwrap();
    assert_eq!(resume_by_hand(&broker, &session_id).code, 4404, "CLOSE ends the session for good");

    let light = ClientOptions { subprotocol: Subprotocol::Light, ..ClientOptions::default() };
    let client = Client::connect(&broker.url(), light).unwrap();
    assert_eq!(client.opened().session_expiry_ms, 0, "MBLWS sessions announce no expiry");
    let reliable_client = reliable(&broker.url());
    assert_eq!(reliable_client.opened().session_expiry_ms, 30_000, "the default expiry is announced");
}
