//! TLS (`wss://`) in the broker, against the real binary over real sockets: round trips with
//! the Rust client (rustls), with Python's `ssl` + `websockets` and with `openssl s_client` in
//! TLS 1.2 and 1.3 (s_client's KeyUpdate too), sessions
//! resumed over TLS through a proxy that cuts connections (a resume moves the TLS session to the
//! shard that holds the MBWS session), certificate reload on SIGHUP while a TLS session stays
//! open, and the refusals of `--tls-cert` / `--tls-key`. Certificates are made per test with
//! the `openssl` command-line tool (tests/common/certs.rs).

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;
#[path = "support/mbws_by_hand.rs"]
mod mbws_by_hand;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::{ChaosProxy, Schedule};
use common::certs::{make_certificate, CertPair};
use common::{output_within, temp_dir, Broker};
use mbws::mbws::{AckMode, DeliveryMode};
use mbws_client::{Client, ClientError, ClientOptions};

const WAIT: Duration = Duration::from_secs(10);

fn tls_url(broker: &Broker) -> String {
    format!("wss://localhost:{}/", broker.addr.port())
}

fn tls_client(url: &str, ca_file: &Path) -> Result<Client, ClientError> {
    let options = ClientOptions { timeout: WAIT, ca_file: Some(ca_file.to_path_buf()), ..ClientOptions::default() };
    Client::connect(url, options)
}

/// Sends `bodies` from a new session and checks that `consumer` receives them in order.
fn round_trip(url: &str, ca_file: &Path, consumer: &mut Client, address: &str, bodies: &[Bytes]) {
    let mut producer = tls_client(url, ca_file).expect("a new TLS session");
    let mut last = 0;
    for body in bodies {
        last = producer.send(address, body.clone()).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    for (index, body) in bodies.iter().enumerate() {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {index} did not arrive"));
        assert_eq!(&message.body, body, "message {index}");
        consumer.ack(message.delivery_seq, false).unwrap();
    }
    consumer.flush().unwrap();
    producer.close().unwrap();
}

#[test]
fn rust_client_round_trip_over_tls_with_small_and_large_messages() {
    let dir = temp_dir("tls-round-trip");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "2"][..], &pair.flags()].concat());
    assert!(broker.wait_for_log("(wss://", WAIT).is_some(), "the start-up line says wss://");
    let url = tls_url(&broker);
    let mut consumer = tls_client(&url, &pair.cert).expect("connect over TLS");
    consumer.subscribe(1, "tls", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    // Small messages many to a record, and messages larger than a TLS record (16 KiB) and than
    // rustls's send buffer (64 KiB), which the broker encrypts and writes in several rounds.
    let mut bodies: Vec<Bytes> = (0..500).map(|index| Bytes::from(format!("small {index}"))).collect();
    for size in [16 * 1024 - 1, 16 * 1024 + 1, 100_000, 300_000] {
        bodies.push(Bytes::from((0..size).map(|index| (index % 251) as u8).collect::<Vec<u8>>()));
    }
    round_trip(&url, &pair.cert, &mut consumer, "tls", &bodies);
    consumer.close().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_that_does_not_trust_the_certificate_is_refused_by_its_tls_handshake() {
    let dir = temp_dir("tls-untrusted");
    let pair = make_certificate(&dir, "broker");
    let other = make_certificate(&dir, "other");
    let broker = Broker::start(&pair.flags());
    match tls_client(&tls_url(&broker), &other.cert) {
        Err(ClientError::Tls(problem)) => assert!(problem.contains("certificate"), "{problem}"),
        other => panic!("expected a TLS handshake failure, got {:?}", other.map(|_| "a session")),
    }
    // A plain ws:// client gets no WebSocket from a wss:// broker.
    let plain = ClientOptions { timeout: Duration::from_secs(3), ..ClientOptions::default() };
    assert!(Client::connect(&broker.url(), plain).is_err(), "plain ws:// must not reach a TLS-only broker");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reliable session over TLS through a proxy that cuts the connection again and again: each
/// resume may land on the other shard, which then takes over the socket and its TLS session.
#[test]
fn sessions_resume_over_tls_across_shards_exactly_once() {
    const MIN_MESSAGES: u64 = 3_000;
    const MIN_RESUMES: u64 = 20;
    let dir = temp_dir("tls-resume");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "2", "--session-expiry-ms", "30000"][..], &pair.flags()].concat());
    let proxy = ChaosProxy::start(
        broker.addr,
        Schedule { seed: 0x7e57_2026, gap_ms: (5, 25), cut_percent: 75, stall_ms: (5, 40), max_cuts: 200 },
    );
    let url = proxy.url().replace("ws://", "wss://");
    let reliable = |url: &str| {
        let options = ClientOptions {
            timeout: WAIT,
            reconnect: Some(Duration::from_secs(20)),
            ca_file: Some(pair.cert.clone()),
            ..ClientOptions::default()
        };
        Client::connect(url, options).expect("connect through the proxy over TLS")
    };
    let mut consumer = reliable(&url);
    consumer.subscribe(1, "tls-chaos", DeliveryMode::Anycast, AckMode::Client, 500).unwrap();
    let mut publisher = reliable(&url);
    let mut received = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    // At least MIN_MESSAGES, and on until MIN_RESUMES resumes (bounded by the deadline; how
    // many cuts that takes depends on timing: a cut may hit a connection that is reconnecting
    // already): each resume lands on either shard, so MIN_RESUMES of them all on the
    // session's own shard would take a one-in-a-million chance.
    let mut sent = 0u64;
    let resumes = |publisher: &Client, consumer: &Client| publisher.reconnects() + consumer.reconnects();
    while sent < MIN_MESSAGES || resumes(&publisher, &consumer) < MIN_RESUMES {
        assert!(
            Instant::now() < deadline,
            "{sent} messages, {} cuts and {} resumes within 60 s",
            proxy.cuts(),
            resumes(&publisher, &consumer)
        );
        let mut last = 0;
        for _ in 0..100 {
            last = publisher.send("tls-chaos", sent.to_string()).unwrap();
            sent += 1;
        }
        publisher.wait_receipt(last).unwrap();
        while received < sent {
            assert!(Instant::now() < deadline, "only {received} of {sent} messages within 60 s");
            let Some(message) = consumer.next_message(WAIT).unwrap() else { continue };
            assert_eq!(message.body, Bytes::from(received.to_string()), "exactly once, in order");
            consumer.ack(message.delivery_seq, true).unwrap();
            received += 1;
        }
    }
    let reconnects = resumes(&publisher, &consumer);
    let handed_over = broker.log_lines().iter().filter(|line| line.contains("handing the resume")).count();
    eprintln!("{} cuts, {reconnects} resumes over TLS, {handed_over} of them handed to the other shard", proxy.cuts());
    assert!(handed_over >= 1, "no resume was handed to the other shard with its TLS session");
    let _ = std::fs::remove_dir_all(dir);
}

fn sighup(broker: &Broker) {
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGHUP) };
}

/// Waits (bounded) for the `count`-th log line containing `needle`.
fn wait_for_nth_log(broker: &Broker, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<String> = broker.log_lines().into_iter().filter(|line| line.contains(needle)).collect();
        if lines.len() >= count {
            return lines[count - 1].clone();
        }
        assert!(Instant::now() < deadline, "no {count}. log line with {needle:?}: {:#?}", broker.log_lines());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_reloads_the_certificate_while_a_tls_session_stays_open() {
    let dir = temp_dir("tls-reload");
    let live = CertPair { cert: dir.join("live.crt"), key: dir.join("live.key") };
    let old = make_certificate(&dir, "old");
    let new = make_certificate(&dir, "new");
    std::fs::copy(&old.cert, &live.cert).unwrap();
    std::fs::copy(&old.key, &live.key).unwrap();
    let broker = Broker::start(&[&["--shards", "2"][..], &live.flags()].concat());
    let url = tls_url(&broker);
    let mut consumer = tls_client(&url, &old.cert).expect("connect with the old certificate");
    consumer.subscribe(1, "reload", DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    round_trip(&url, &old.cert, &mut consumer, "reload", &[Bytes::from("before")]);

    // The files change, then SIGHUP: new handshakes present the new certificate.
    std::fs::copy(&new.cert, &live.cert).unwrap();
    std::fs::copy(&new.key, &live.key).unwrap();
    sighup(&broker);
    let line = wait_for_nth_log(&broker, "reloaded the TLS certificate", 1);
    assert!(line.contains("live.crt"), "{line}");
    assert!(tls_client(&url, &old.cert).is_err(), "a new connection must not get the old certificate");
    // The session opened before the reload goes on, with the new certificate's clients.
    round_trip(&url, &new.cert, &mut consumer, "reload", &[Bytes::from("after")]);

    // A broken new pair (a key that is not the certificate's) is refused; the one in use stays.
    std::fs::copy(&old.key, &live.key).unwrap();
    sighup(&broker);
    let line = wait_for_nth_log(&broker, "keeping the TLS certificate in use", 1);
    assert!(line.contains("does not match") && line.contains("live.key"), "{line}");
    round_trip(&url, &new.cert, &mut consumer, "reload", &[Bytes::from("after a bad reload")]);
    // A missing file likewise.
    std::fs::remove_file(&live.cert).unwrap();
    sighup(&broker);
    let line = wait_for_nth_log(&broker, "keeping the TLS certificate in use", 2);
    assert!(line.contains("no such file") && line.contains("live.crt"), "{line}");
    round_trip(&url, &new.cert, &mut consumer, "reload", &[Bytes::from("after a missing file")]);
    consumer.close().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts the broker with `flags` and expects it to refuse with exit status 2 and a message
/// containing each of `says`.
fn refused(flags: &[&str], says: &[&str]) {
    let dir = temp_dir("tls-refused");
    match Broker::try_start_in(&dir, flags) {
        Ok(_) => panic!("the broker started with {flags:?}"),
        Err((status, log)) => {
            assert_eq!(status.code(), Some(2), "{flags:?}: {log:#?}");
            let text = log.join("\n");
            for word in says {
                assert!(text.contains(word), "{flags:?}: no {word:?} in {text}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_tls_flags_stop_the_start_naming_the_file_and_the_problem() {
    let dir = temp_dir("tls-flags");
    let pair = make_certificate(&dir, "good");
    let other = make_certificate(&dir, "other");
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let text = |name: &str, contents: &str| -> String {
        std::fs::write(path(name), contents).unwrap();
        path(name).to_str().unwrap().to_string()
    };
    let missing = path("missing.pem");
    let missing = missing.to_str().unwrap();
    let (cert, key) = (pair.cert_str(), pair.key_str());
    // Both or neither.
    refused(&["--tls-cert", cert], &["--tls-key"]);
    refused(&["--tls-key", key], &["--tls-cert"]);
    // Missing files.
    refused(&["--tls-cert", missing, "--tls-key", key], &[missing, "--tls-cert", "no such file"]);
    refused(&["--tls-cert", cert, "--tls-key", missing], &[missing, "--tls-key", "no such file"]);
    // No certificate, no key.
    let empty = text("empty.pem", "not a certificate\n");
    refused(&["--tls-cert", &empty, "--tls-key", key], &[&empty, "holds no certificate"]);
    refused(&["--tls-cert", cert, "--tls-key", &empty], &[&empty, "holds no private key"]);
    refused(&["--tls-cert", cert, "--tls-key", cert], &[cert, "holds no private key"]);
    // A key that is not the certificate's.
    refused(&["--tls-cert", cert, "--tls-key", other.key_str()], &[other.key_str(), cert, "does not match"]);
    // Unreadable (a directory reads as an error too, also as root).
    let directory = dir.to_str().unwrap();
    refused(&["--tls-cert", directory, "--tls-key", key], &[directory, "cannot read the TLS certificate file"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP proxy on 127.0.0.1 that forwards every connection to `target` in both directions, in
/// pieces of 1 to 700 bytes with one write each and TCP_NODELAY, so the reads on both sides end
/// inside TLS records and inside their 5-byte headers. Runs until dropped; each connection's
/// threads end when either side closes.
struct SplittingProxy {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SplittingProxy {
    fn start(target: std::net::SocketAddr) -> SplittingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for (seed, client) in listener.incoming().enumerate() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = std::net::TcpStream::connect(target) else { continue };
                for socket in [&client, &upstream] {
                    socket.set_nodelay(true).unwrap();
                }
                let (client_copy, upstream_copy) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || forward_in_pieces(client, upstream, 2 * seed as u64 + 1));
                std::thread::spawn(move || forward_in_pieces(upstream_copy, client_copy, 2 * seed as u64 + 2));
            }
        });
        SplittingProxy { addr, stop }
    }
}

impl Drop for SplittingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop, which then ends
    }
}

/// Copies `from` to `to` in pieces of 1 to 700 bytes (sizes from a seeded generator).
fn forward_in_pieces(mut from: std::net::TcpStream, mut to: std::net::TcpStream, seed: u64) {
    use std::io::{Read, Write};
    let mut rng = chaos_proxy::Rng::new(seed);
    let mut buf = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let mut rest = &buf[..read];
        while !rest.is_empty() {
            let piece = (rng.between(1, 701) as usize).min(rest.len());
            if to.write_all(&rest[..piece]).is_err() {
                let _ = from.shutdown(std::net::Shutdown::Both);
                return;
            }
            rest = &rest[piece..];
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// The broker's TLS reads and writes when every read ends at an arbitrary byte (inside a
/// record, inside a record header) and a write carries many frames: Python's `ssl` +
/// `websockets` (TLS 1.3 and 1.2) sends and receives 1,000 messages per run, and the Rust client
/// messages larger than a record and than a write, all through a proxy that splits the stream
/// into pieces of 1 to 700 bytes. Nothing may be lost, duplicated or reordered.
#[test]
fn tls_streams_split_at_every_byte_lose_and_reorder_nothing() {
    let dir = temp_dir("tls-split");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "1"][..], &pair.flags()].concat());
    let proxy = SplittingProxy::start(broker.addr);
    let url = format!("wss://localhost:{}/", proxy.addr.port());
    let mut consumer = tls_client(&url, &pair.cert).expect("connect over TLS through the proxy");
    consumer.subscribe(1, "split", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut bodies: Vec<Bytes> = (0..300).map(|index| Bytes::from(format!("small {index}"))).collect();
    for size in [16 * 1024 + 1, 200_000] {
        bodies.push(Bytes::from((0..size).map(|index| (index % 251) as u8).collect::<Vec<u8>>()));
    }
    round_trip(&url, &pair.cert, &mut consumer, "split", &bodies);
    consumer.close().unwrap();
    if let Some(python) = python_with_websockets() {
        python_round_trips_in_tls_1_3_and_1_2(&python, &url, 1000, &pair, Duration::from_secs(120));
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}

/// Python's `ssl` + `websockets` against the broker's TLS, in TLS 1.3 and 1.2: the same
/// round trips as tests/interop_python.rs, over wss://.
#[test]
fn python_ssl_websockets_round_trip_over_tls_1_3_and_1_2() {
    let Some(python) = python_with_websockets() else { return };
    let dir = temp_dir("tls-python");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "1"][..], &pair.flags()].concat());
    python_round_trips_in_tls_1_3_and_1_2(&python, &tls_url(&broker), 50, &pair, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(dir);
}

/// tests/python/mbws_roundtrip.py (Python's `ssl` + `websockets`) against `url`, trusting
/// `pair`'s certificate: four round trips of `messages` messages, in TLS 1.3 and then 1.2,
/// each run bounded by `within`.
fn python_round_trips_in_tls_1_3_and_1_2(python: &Path, url: &str, messages: usize, pair: &CertPair, within: Duration) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mbws_roundtrip.py");
    let count = messages.to_string();
    for version in ["1.3", "1.2"] {
        let output =
            output_within(Command::new(python).arg(&script).args([url, &count, pair.cert_str(), version]), within);
        let report = format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "TLS {version}: the Python peer failed:\n{report}");
        assert!(report.contains(&format!("TLS version TLSv{version}")), "TLS {version} not negotiated:\n{report}");
        assert!(report.contains(&format!("OK 4 round trips of {messages} messages")), "{report}");
    }
}

/// The Python interpreter with `websockets` (as tests/interop_python.rs finds it), or a loud
/// skip when `MBWS_SKIP_PYTHON=1` and there is none.
fn python_with_websockets() -> Option<PathBuf> {
    let python = std::env::var_os("MBWS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let usable = python.exists()
        && output_within(Command::new(&python).args(["-c", "import websockets"]), Duration::from_secs(30))
            .status
            .success();
    if usable {
        return Some(python);
    }
    if std::env::var("MBWS_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!! SKIPPED: Python TLS interop test (MBWS_SKIP_PYTHON=1): no Python with websockets !!!!!!!!\n"
        );
        return None;
    }
    panic!("{} cannot import websockets: run scripts/test.sh (it makes .venv) or set MBWS_PYTHON", python.display());
}

/// The `mbws` CLI over wss://: `--ca-file` trusts the broker's certificate; a missing CA file
/// is named.
#[test]
fn the_cli_sends_and_consumes_over_tls() {
    let dir = temp_dir("tls-cli");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&pair.flags());
    let mbws = common::binaries::workspace_binary("mbws");
    let url = tls_url(&broker);
    let cli = |args: &[&str]| {
        let mut command = Command::new(&mbws);
        command.args(args).args(["--url", &url, "--ca-file", pair.cert_str(), "--wait", "10"]);
        output_within(&mut command, Duration::from_secs(30))
    };
    let sent = cli(&["send", "cli-tls", "over TLS", "--count", "3"]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let consumed = cli(&["consume", "cli-tls", "--count", "3", "--timeout", "10"]);
    assert!(consumed.status.success(), "{}", String::from_utf8_lossy(&consumed.stderr));
    assert_eq!(String::from_utf8_lossy(&consumed.stdout), "over TLS\nover TLS\nover TLS\n");
    let missing = dir.join("missing-ca.pem");
    let mut command = Command::new(&mbws);
    command.args(["send", "cli-tls", "x", "--url", &url, "--ca-file", missing.to_str().unwrap()]);
    let refused = output_within(&mut command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing-ca.pem") && stderr.contains("cannot read"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A client that opens TCP and never completes its TLS handshake is closed by the handshake
/// timeout, as a stalled upgrade request is.
#[test]
fn a_stalled_tls_handshake_is_closed_by_the_handshake_timeout() {
    use std::io::{Read, Write};
    let dir = temp_dir("tls-stall");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--handshake-timeout-ms", "300"][..], &pair.flags()].concat());
    let mut stream = std::net::TcpStream::connect(broker.addr).unwrap();
    // Half a TLS record header, then silence.
    stream.write_all(&[0x16, 0x03]).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let ended = stream.read_to_end(&mut rest);
    if let Err(error) = &ended {
        let timed_out = matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
        assert!(!timed_out, "the broker did not close the stalled connection within {WAIT:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "closed only after {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(dir);
}

/// A failed TLS handshake is logged at info with the peer and rustls's reason, and without
/// anything the client sent; a flood of them is rate-limited (at most 20 lines per 10 s per
/// shard, then one line counting those left out).
#[test]
fn failed_tls_handshakes_are_logged_at_info_with_the_reason_and_rate_limited() {
    use std::io::{Read, Write};
    let dir = temp_dir("tls-failed-handshake");
    let pair = make_certificate(&dir, "broker");
    let mut flags = pair.flags().to_vec();
    flags.extend_from_slice(&["--shards", "1"]);
    let broker = Broker::start(&flags);
    // Plain HTTP to a wss:// port: not a TLS record. 30 of them, past the 20-line budget.
    let secret = "Authorization: Bearer do-not-log-this";
    for _ in 0..30 {
        let mut stream = std::net::TcpStream::connect(broker.addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(format!("GET /?token=also-secret HTTP/1.1\r\nHost: x\r\n{secret}\r\n\r\n").as_bytes())
            .unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
    }
    let line = broker.wait_for_log("TLS handshake failed", WAIT).expect("a log line for the failed handshake");
    assert!(line.contains("INFO") && line.contains("peer=127.0.0.1:") && line.contains("reason="), "{line}");
    // The count of those left out comes with the next line after the window; within it, at
    // most the budget is written.
    let logged = broker.log_lines().iter().filter(|line| line.contains("TLS handshake failed")).count();
    assert!((1..=20).contains(&logged), "{logged} lines for 30 failures");
    for line in broker.log_lines() {
        assert!(!line.contains("do-not-log-this") && !line.contains("also-secret"), "{line}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// The in-place record layer (--tls-records in-place, the default) against a rustls client that
// drives its own TLS records: KeyUpdates mid-stream, a damaged record, an oversized header.

/// A rustls client session under tungstenite, speaking hand-made binary MBWS frames; the test
/// reaches its TLS connection (KeyUpdate) and its socket (raw records) directly.
struct RawTlsPeer {
    socket: tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
}

impl RawTlsPeer {
    fn open(broker: &Broker, pair: &CertPair, version: &'static rustls::SupportedProtocolVersion) -> RawTlsPeer {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(&pair.cert).unwrap()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let tcp = std::net::TcpStream::connect(broker.addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let stream = rustls::StreamOwned::new(connection, tcp);
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("wss://localhost:{}/", broker.addr.port()).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "MBWS.huawei.com".parse().unwrap());
        let (socket, response) = tungstenite::client(request, stream).expect("upgrade over TLS");
        assert_eq!(response.status(), 101);
        let mut peer = RawTlsPeer { socket };
        peer.send(mbws_by_hand::binary_open());
        assert!(matches!(peer.recv(), mbws_by_hand::Reply::Opened { .. }));
        peer
    }

    fn send(&mut self, frame: Vec<u8>) {
        self.socket.send(tungstenite::Message::Binary(frame.into())).expect("send");
    }

    fn recv(&mut self) -> mbws_by_hand::Reply {
        loop {
            match self.socket.read().expect("a frame from the broker within the timeout") {
                tungstenite::Message::Binary(payload) => return mbws_by_hand::parse_binary(&payload).unwrap(),
                tungstenite::Message::Close(_) => return mbws_by_hand::Reply::Close,
                _ => continue,
            }
        }
    }

    /// Reads RECEIPTs (each covers the SENDs up to its seq) until the one for `seq`.
    fn wait_receipt(&mut self, seq: u64) {
        let mut last = 0;
        while last < seq {
            match self.recv() {
                mbws_by_hand::Reply::Receipt { seq: receipted } if receipted > last => last = receipted,
                other => panic!("expected a receipt after {last}, got {other:?}"),
            }
        }
        assert_eq!(last, seq);
    }

    /// Sends a KeyUpdate (rustls asks the broker to update its keys too).
    fn key_update(&mut self) {
        self.socket.get_mut().conn.refresh_traffic_keys().unwrap();
    }

    /// Writes `bytes` to the socket under the TLS layer, as they are.
    fn write_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.socket.get_mut().sock.write_all(bytes).unwrap();
    }

    /// Seals `plaintext` as the client's next record(s) and returns them, unsent.
    fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let connection = &mut self.socket.get_mut().conn;
        connection.writer().write_all(plaintext).unwrap();
        let mut wire = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Reads until the broker's alert arrives; the error rustls reports for it.
    fn alert(&mut self) -> rustls::Error {
        use std::io::Read;
        let stream = self.socket.get_mut();
        loop {
            match stream.conn.read_tls(&mut stream.sock) {
                Ok(0) => panic!("the broker closed without an alert"),
                Ok(_) => {}
                Err(error) => panic!("no alert within the timeout: {error}"),
            }
            match stream.conn.process_new_packets() {
                Err(error) => return error,
                Ok(_) => {
                    let _ = stream.conn.reader().read_to_end(&mut Vec::new());
                }
            }
        }
    }
}

fn expect_messages(consumer: &mut RawTlsPeer, count: u64, key_update_every: u64) {
    for index in 0..count {
        match consumer.recv() {
            mbws_by_hand::Reply::Message { body, .. } => {
                assert_eq!(body, format!("message {index}").into_bytes(), "message {index}")
            }
            other => panic!("expected message {index}, got {other:?}"),
        }
        if key_update_every > 0 && index % key_update_every == key_update_every / 2 {
            consumer.key_update();
        }
    }
}

/// KeyUpdates from the client in the middle of a stream, in both directions: the producer
/// updates its keys every 100 SENDs (its SENDs and the broker's RECEIPTs keep flowing), the
/// consumer every 100 MESSAGEs, asking the broker to update its own, under which the next
/// MESSAGEs arrive (rustls's client reads them only if the broker's KeyUpdate came first).
/// Nothing is lost or reordered. With either record layer (`--tls-records`).
#[test]
fn client_key_updates_mid_stream_lose_and_reorder_nothing_in_either_direction() {
    let dir = temp_dir("tls-key-update");
    let pair = make_certificate(&dir, "broker");
    for records in ["in-place", "rustls"] {
        let broker = Broker::start(&[&["--shards", "1", "--tls-records", records][..], &pair.flags()].concat());
        key_updates_round_trip(&broker, &pair);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn key_updates_round_trip(broker: &Broker, pair: &CertPair) {
    let mut consumer = RawTlsPeer::open(broker, pair, &rustls::version::TLS13);
    let subscribe =
        mbws_by_hand::binary_subscribe(1, "ku", mbws_by_hand::Mode::Anycast, mbws_by_hand::AckMode::Auto, 1000);
    consumer.send(subscribe);
    assert!(matches!(consumer.recv(), mbws_by_hand::Reply::Subscribed { subscription_id: 1 }));
    let mut producer = RawTlsPeer::open(broker, pair, &rustls::version::TLS13);
    let count = 600u64;
    for index in 0..count {
        producer.send(mbws_by_hand::binary_send(index + 1, "ku", format!("message {index}").as_bytes()));
        if index % 100 == 50 {
            producer.key_update();
        }
    }
    producer.wait_receipt(count);
    expect_messages(&mut consumer, count, 100);
    // The consumer's last KeyUpdate is answered too: one more round trip under the new keys.
    producer.send(mbws_by_hand::binary_send(count + 1, "ku", b"message after"));
    producer.wait_receipt(count + 1);
    assert!(matches!(consumer.recv(), mbws_by_hand::Reply::Message { body, .. } if body == b"message after"));
}

/// A record whose ciphertext was altered ends the session with bad_record_mac (TLS 1.3 and
/// 1.2); every message receipted before it is still delivered. A record header that announces
/// more than 2^14 + 256 bytes ends it with record_overflow.
#[test]
fn a_damaged_record_or_an_oversized_header_ends_the_session_with_its_alert_and_loses_nothing_receipted() {
    let dir = temp_dir("tls-bad-record");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "1"][..], &pair.flags()].concat());
    for (round, version) in [&rustls::version::TLS13, &rustls::version::TLS12].into_iter().enumerate() {
        let address = format!("bad-record-{round}");
        let mut consumer = RawTlsPeer::open(&broker, &pair, version);
        let subscribe =
            mbws_by_hand::binary_subscribe(1, &address, mbws_by_hand::Mode::Anycast, mbws_by_hand::AckMode::Auto, 1000);
        consumer.send(subscribe);
        assert!(matches!(consumer.recv(), mbws_by_hand::Reply::Subscribed { .. }));
        let mut producer = RawTlsPeer::open(&broker, &pair, version);
        for index in 0..50u64 {
            producer.send(mbws_by_hand::binary_send(index + 1, &address, format!("message {index}").as_bytes()));
        }
        producer.wait_receipt(50);
        let mut damaged = producer.seal(b"any bytes: the record is refused before they are read");
        let last = damaged.len() - 1;
        damaged[last] ^= 0x80;
        producer.write_raw(&damaged);
        assert_eq!(
            producer.alert(),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac),
            "{version:?}"
        );
        expect_messages(&mut consumer, 50, 0);
        let mut oversized = RawTlsPeer::open(&broker, &pair, version);
        oversized.write_raw(&[23, 3, 3, 0x41, 0x01]);
        assert_eq!(
            oversized.alert(),
            rustls::Error::AlertReceived(rustls::AlertDescription::RecordOverflow),
            "{version:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What a child process printed so far, filled by a thread; waits are bounded.
#[derive(Clone, Default)]
struct Printed(std::sync::Arc<(std::sync::Mutex<Vec<u8>>, std::sync::Condvar)>);

impl Printed {
    fn collect(pipe: impl std::io::Read + Send + 'static) -> Printed {
        let printed = Printed::default();
        let filled = printed.clone();
        std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 4096];
            loop {
                let read = pipe.read(&mut buf).unwrap_or(0);
                let (bytes, changed) = &*filled.0;
                if read > 0 {
                    bytes.lock().unwrap().extend_from_slice(&buf[..read]);
                }
                changed.notify_all();
                if read == 0 {
                    return;
                }
            }
        });
        printed
    }

    /// Waits until `needle` was printed `times` times in all, for at most `WAIT`.
    fn wait_for(&self, needle: &[u8], times: usize) -> bool {
        let deadline = Instant::now() + WAIT;
        let (bytes, changed) = &*self.0;
        let mut bytes = bytes.lock().unwrap();
        loop {
            if bytes.windows(needle.len()).filter(|window| *window == needle).count() >= times {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            bytes = changed.wait_timeout(bytes, deadline - now).unwrap().0;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap()).into_owned()
    }
}

/// A client's WebSocket frame (masked, final) of `opcode` carrying `payload`.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(index, byte)| byte ^ mask[index % 4]));
    frame
}

/// OpenSSL's own client (`openssl s_client`, a third TLS implementation beside rustls and
/// Python's `ssl`, itself on OpenSSL but driven byte by byte here) in TLS 1.3 and 1.2: the
/// upgrade, an MBWS session sending to itself, and in TLS 1.3 a KeyUpdate asking the broker to
/// update its keys too (s_client's `K` command), after which a second message goes through in
/// both directions (the broker opens the new keys' records, and OpenSSL the broker's records
/// under its new keys, which it reads only if the broker's KeyUpdate came first). Then
/// s_client's close_notify ends the session cleanly. The broker's default record layer.
#[test]
fn openssl_s_client_upgrades_round_trips_and_updates_keys_in_tls_1_3_and_1_2() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = temp_dir("tls-openssl");
    let pair = make_certificate(&dir, "broker");
    let broker = Broker::start(&[&["--shards", "1"][..], &pair.flags()].concat());
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &broker.addr.to_string(), "-servername", "localhost", flag])
            .args(["-CAfile", pair.cert_str(), "-verify_return_error"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client (apt-get install openssl)");
        let stdout = Printed::collect(child.stdout.take().unwrap());
        let stderr = Printed::collect(child.stderr.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let report = |what: &str| format!("{version}: {what}\nstdout:\n{}\nstderr:\n{}", stdout.text(), stderr.text());
        // Each write below waits for the answer to the one before, so s_client reads each in its
        // own read of stdin: a read that starts with `K` is its KeyUpdate command, anything else
        // is sent as it is.
        let upgrade = format!(
            "GET / HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: MBWS.huawei.com\r\n\r\n",
            broker.addr.port()
        );
        stdin.write_all(upgrade.as_bytes()).unwrap();
        assert!(stdout.wait_for(b"HTTP/1.1 101", 1), "{}", report("no 101 answer to the upgrade"));
        assert!(stdout.text().contains(&format!("New, {version},")), "{}", report("another version negotiated"));
        let address = format!("openssl-{version}");
        let first = format!("first message over {version} from s_client");
        let mut frames = masked_frame(2, &mbws_by_hand::binary_open());
        let subscribe =
            mbws_by_hand::binary_subscribe(1, &address, mbws_by_hand::Mode::Anycast, mbws_by_hand::AckMode::Auto, 100);
        frames.extend(masked_frame(2, &subscribe));
        frames.extend(masked_frame(2, &mbws_by_hand::binary_send(1, &address, first.as_bytes())));
        stdin.write_all(&frames).unwrap();
        assert!(stdout.wait_for(first.as_bytes(), 1), "{}", report("the first message did not come back"));
        if version == "TLSv1.3" {
            stdin.write_all(b"K\n").unwrap();
            assert!(stderr.wait_for(b"KEYUPDATE", 1), "{}", report("s_client did not take the K command"));
        }
        let second = format!("second message over {version} from s_client, after the KeyUpdate");
        stdin.write_all(&masked_frame(2, &mbws_by_hand::binary_send(2, &address, second.as_bytes()))).unwrap();
        assert!(stdout.wait_for(second.as_bytes(), 1), "{}", report("the second message did not come back"));
        // The end of its input: s_client sends its close_notify and exits.
        drop(stdin);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{}", report("s_client did not end after its input did"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{}", report("s_client failed"));
        assert!(!stderr.text().contains(":error:"), "{}", report("s_client reported an error"));
    }
    let failures: Vec<String> = broker.log_lines().into_iter().filter(|line| line.contains("TLS")).collect();
    assert!(
        failures.iter().all(|line| !line.contains("alert") && !line.contains("failed")),
        "the broker logged a TLS failure: {failures:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
