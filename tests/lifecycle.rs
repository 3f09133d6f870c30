//! The broker's lifecycle (issue 11, item 3) against the real binary over real sockets: a
//! graceful stop answers the SENDs in flight before it closes with 1001 and exits 0 within its
//! grace; a second signal exits at once; a drain (POST /api/drain or SIGUSR2) refuses new
//! upgrades with 503, turns /readyz to 503 and spreads the closes over its duration, then
//! stops the broker; SIGHUP reloads the limits that reload, and a bad file changes nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use mbws::mbws::{AckMode, DeliveryMode, ErrorCode, Frame, Send};
use mbws_client::ClientError;

const WAIT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 request (bounded in time): the status and the whole answer.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|status| status.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A WebSocket upgrade request for MBWS, and the broker's whole answer (it closes after a
/// refusal).
fn upgrade(addr: SocketAddr) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: MBWS.huawei.com\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|status| status.parse().ok()).unwrap_or(0);
    (status, text)
}

fn signal(broker: &Broker, signal: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(broker.pid() as libc::pid_t, signal) };
}

fn durable(address: &str, body: String) -> Send {
    Send {
        address: Bytes::copy_from_slice(address.as_bytes()),
        durable: true,
        body: Bytes::from(body),
        ..Default::default()
    }
}

/// Waits (bounded) until the admin API lists `count` SENDs in flight over all sessions.
fn wait_for_inflight_sends(admin: SocketAddr, count: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, text) = http(admin, "GET", "/api/sessions");
        assert_eq!(status, 200, "{text}");
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let sessions: serde_json::Value = serde_json::from_str(body).unwrap();
        let inflight: u64 =
            sessions["sessions"].as_array().unwrap().iter().map(|s| s["inflight_sends"].as_u64().unwrap()).sum();
        if inflight == count {
            return;
        }
        assert!(Instant::now() < deadline, "{count} SENDs never were in flight together: {body}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM with durable SENDs waiting for their group commit: the broker stops reading, waits
/// for their sync and sends their RECEIPTs, then closes with 1001 and exits 0 within the
/// grace; after a restart every receipted message is there.
#[test]
fn a_stop_answers_the_sends_in_flight_then_closes_with_1001_and_every_receipted_message_is_recovered() {
    let dir = common::temp_dir("lifecycle-stop");
    // A wide group-commit window keeps the SENDs in flight when SIGTERM comes.
    let flags = ["--shards", "2", "--durable-address", "dur.*", "--log-batch-delay-us", "800000"];
    let grace = Duration::from_millis(5000);
    let mut broker = Broker::start_in(&dir, &[&flags[..], &["--shutdown-grace-ms", "5000"]].concat());
    let mut publisher = broker.client();
    const SENDS: u64 = 20;
    for index in 1..=SENDS {
        publisher.send_message(durable("dur.stop", format!("m{index}"))).unwrap();
    }
    publisher.flush().unwrap();
    wait_for_inflight_sends(broker.admin_addr(), SENDS);
    assert_eq!(publisher.receipted_seq(), 0, "nothing is receipted before the group commit");

    let stopping = Instant::now();
    signal(&broker, libc::SIGTERM);
    let close = loop {
        match publisher.next_frame(WAIT) {
            Ok(Frame::Receipt(_)) => continue,
            Ok(other) => panic!("only RECEIPTs before the close, got {other:?}"),
            Err(ClientError::Closed { code, reason }) => break (code, reason),
            Err(error) => panic!("the broker closes with a close frame: {error:?}"),
        }
    };
    assert_eq!(close.0, 1001, "going away: {}", close.1);
    assert_eq!(publisher.receipted_seq(), SENDS, "every SEND in flight at SIGTERM is answered before the close");
    let status = broker.wait_exit(grace + Duration::from_secs(2)).expect("the broker exits within its grace");
    assert!(status.success(), "a graceful stop exits 0: {status:?}");
    assert!(stopping.elapsed() < grace + Duration::from_millis(500), "stopped in {:?}", stopping.elapsed());
    drop(broker);

    let broker = Broker::start_in(&dir, &flags);
    let mut consumer = broker.client();
    consumer.subscribe(1, "dur.stop", DeliveryMode::Anycast, AckMode::Auto, 100).unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < SENDS as usize {
        let message = consumer.next_message(WAIT).unwrap().expect("every receipted message is recovered");
        bodies.push(String::from_utf8(message.body.to_vec()).unwrap());
    }
    bodies.sort_by_key(|body| body[1..].parse::<u64>().unwrap());
    assert_eq!(bodies, (1..=SENDS).map(|index| format!("m{index}")).collect::<Vec<_>>());
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// A second SIGTERM while the stop waits for SENDs in flight exits at once, with status 1.
#[test]
fn a_second_signal_exits_at_once() {
    let flags = [
        "--shards",
        "1",
        "--durable-address",
        "dur.*",
        "--log-batch-delay-us",
        "1000000",
        "--shutdown-grace-ms",
        "60000",
    ];
    let mut broker = Broker::start(&flags);
    let mut publisher = broker.client();
    publisher.send_message(durable("dur.second", "held".to_string())).unwrap();
    publisher.flush().unwrap();
    wait_for_inflight_sends(broker.admin_addr(), 1);
    signal(&broker, libc::SIGTERM);
    broker.wait_for_log("stopping within 60000 ms", WAIT).expect("the stop begins");
    let second = Instant::now();
    signal(&broker, libc::SIGINT);
    let status = broker.wait_exit(WAIT).expect("the second signal ends the process");
    assert_eq!(status.code(), Some(1), "a stop cut short exits 1: {status:?}");
    assert!(second.elapsed() < Duration::from_millis(900), "exited {:?} after the second signal", second.elapsed());
    broker.wait_for_log("while stopping: exiting at once", WAIT).expect("the broker says why it exits");
}

/// Connects `count` MBWS clients, each on a thread that records when its session was ended by
/// the drain (a fatal ERROR 4503, then close 4503), and the ERROR's reason.
fn drained_clients(broker: &Broker, count: usize) -> Vec<std::thread::JoinHandle<(Instant, String)>> {
    let clients: Vec<_> = (0..count).map(|_| broker.client()).collect();
    clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || loop {
                match client.next_frame(Duration::from_secs(10)) {
                    Ok(Frame::Error(error)) if error.fatal => {
                        assert_eq!(error.code, ErrorCode::Unavailable.as_u16(), "{error:?}");
                        let closed_at = Instant::now();
                        match client.next_frame(WAIT) {
                            Err(ClientError::Closed { code: 4503, .. }) => {}
                            other => panic!("close 4503 after the ERROR, got {other:?}"),
                        }
                        return (closed_at, String::from_utf8_lossy(&error.reason).into_owned());
                    }
                    Ok(_) => continue,
                    Err(error) => panic!("the drain ends the session with ERROR 4503: {error:?}"),
                }
            })
        })
        .collect()
}

/// POST /api/drain: new upgrades get 503 with Retry-After, /readyz turns 503 "draining", the
/// 20 sessions are ended (ERROR 4503) spread over the 2 s drain, not all at its start; then the
/// broker stops by itself and exits 0.
#[test]
fn a_drain_refuses_new_upgrades_and_spreads_the_closes_over_its_duration() {
    let mut broker = Broker::start(&["--shards", "2", "--drain-duration-ms", "2000", "--log-level", "info"]);
    let admin = broker.admin_addr();
    const CLIENTS: usize = 20;
    let drained = drained_clients(&broker, CLIENTS);
    let started = Instant::now();
    let (status, answer) = http(admin, "POST", "/api/drain");
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = http(admin, "GET", "/readyz");
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("\"draining\""), "{answer}");
    let (status, answer) = upgrade(broker.addr);
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("Retry-After: 1\r\n") && answer.contains("draining"), "{answer}");
    let (status, metrics) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    let refused_503: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("mbws_upgrades_refused_total{") && line.contains("status=\"503\""))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(refused_503, 1.0, "the one refused upgrade is counted: {metrics}");

    let mut closed: Vec<Duration> = drained
        .into_iter()
        .map(|client| {
            let (closed_at, reason) = client.join().expect("a client saw its session drained");
            assert!(reason.contains("draining"), "{reason}");
            closed_at.duration_since(started)
        })
        .collect();
    closed.sort();
    let early = closed.iter().filter(|at| **at < Duration::from_millis(200)).count();
    let late = closed.iter().filter(|at| **at >= Duration::from_millis(1000)).count();
    // Evenly spread: 2 of 20 fall in the first tenth, 10 in the second half.
    assert!(early <= 4, "{early} of {CLIENTS} closes in the first 10% of the drain: {closed:?}");
    assert!(late >= 6, "only {late} of {CLIENTS} closes in the second half of the drain: {closed:?}");
    assert!(*closed.last().unwrap() < Duration::from_millis(4000), "the drain took {closed:?}");
    let status = broker.wait_exit(Duration::from_secs(15)).expect("the broker stops after the drain");
    assert!(status.success(), "{status:?}");
    broker.wait_for_log("the drain is over", WAIT).expect("the broker says why it stops");
}

/// SIGUSR2 starts the same drain as POST /api/drain.
#[test]
fn sigusr2_starts_a_drain() {
    let mut broker = Broker::start(&["--shards", "1", "--drain-duration-ms", "500"]);
    let admin = broker.admin_addr();
    let drained = drained_clients(&broker, 1);
    signal(&broker, libc::SIGUSR2);
    broker.wait_for_log("draining (lame duck)", WAIT).expect("the broker says it drains");
    let (status, answer) = http(admin, "GET", "/readyz");
    assert_eq!(status, 503, "{answer}");
    let (status, _) = upgrade(broker.addr);
    assert_eq!(status, 503);
    let (_, reason) = drained.into_iter().next().unwrap().join().unwrap();
    assert!(reason.contains("draining"), "{reason}");
    let status = broker.wait_exit(Duration::from_secs(15)).expect("the broker stops after the drain");
    assert!(status.success(), "{status:?}");
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// SIGHUP re-reads the file: a lowered max-subscriptions reaches the sessions opened after it
/// (their OPENED announces it, and a SUBSCRIBE beyond gets ERROR 4413); an open session keeps
/// its limits; a file that is not valid changes nothing and the log says which key and why; a
/// setting that does not reload is named as taking a restart.
#[test]
fn sighup_reloads_the_limits_and_a_bad_file_keeps_the_running_configuration() {
    let dir = common::temp_dir("lifecycle-reload");
    let config = dir.join("broker.toml");
    write_config(&config, "max-subscriptions = 5\nlog-level = \"info\"\n");
    let config_flag = config.display().to_string();
    let broker = Broker::start(&["--shards", "1", "--config", &config_flag]);
    let mut before = broker.client();
    assert_eq!(before.opened().limits.max_subscriptions, 5);

    write_config(&config, "max-subscriptions = 2\nlog-level = \"info\"\nmax-queued-messages = 77\n");
    signal(&broker, libc::SIGHUP);
    let line = broker.wait_for_log("received SIGHUP: reloaded", WAIT).expect("the reload is logged");
    assert!(line.contains("max-subscriptions 5 -> 2"), "{line}");
    assert!(!line.contains("max-queued-messages"), "address limits do not reload: {line}");
    let line = broker.wait_for_log("taking a restart", WAIT).expect("what does not reload is named");
    assert!(line.contains("max-queued-messages (") && line.contains(" -> 77)"), "{line}");

    let mut after = broker.client();
    assert_eq!(after.opened().limits.max_subscriptions, 2, "OPENED announces the reloaded limit");
    for id in 1..=2 {
        after.subscribe(id, &format!("reload.{id}"), DeliveryMode::Anycast, AckMode::Auto, 1).unwrap();
    }
    match after.subscribe(3, "reload.3", DeliveryMode::Anycast, AckMode::Auto, 1) {
        Err(ClientError::Broker(error)) => assert_eq!(error.code, ErrorCode::TooLarge.as_u16(), "{error:?}"),
        other => panic!("the third SUBSCRIBE is over max-subscriptions 2: {other:?}"),
    }
    // The session opened before the reload keeps the limits its OPENED announced.
    for id in 1..=3 {
        before.subscribe(id, &format!("reload.{id}"), DeliveryMode::Anycast, AckMode::Auto, 1).unwrap();
    }

    write_config(&config, "max-subscriptions = 0\n");
    signal(&broker, libc::SIGHUP);
    let line = broker.wait_for_log("configuration is not valid", WAIT).expect("a bad file is refused");
    assert!(line.contains("max-subscriptions = 0") && line.contains("out of range"), "{line}");
    let unchanged = broker.client();
    assert_eq!(unchanged.opened().limits.max_subscriptions, 2, "a bad file keeps the running limits");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
