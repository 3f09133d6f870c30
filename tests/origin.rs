//! The Origin allow-list (`--allowed-origin`) against the real broker: a browser's upgrade from
//! a page of another site is refused with 403 and a reason; a listed origin and a client that
//! sends no Origin (not a browser) are upgraded; a broker listening beyond loopback without a
//! list warns at start, and bad values stop the start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{temp_dir, Broker};

const WAIT: Duration = Duration::from_secs(5);

/// Sends an upgrade request (with `origin` as its Origin header, if any) and returns the
/// broker's answer up to the end of its headers, plus the body when it refuses.
fn upgrade_with_origin(broker: &Broker, origin: Option<&str>) -> String {
    let mut stream = TcpStream::connect(broker.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let origin = origin.map(|origin| format!("Origin: {origin}\r\n")).unwrap_or_default();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: MBWS.huawei.com\r\n{origin}\r\n",
        broker.addr
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // A refusal ends with the connection closed; a 101 answer ends with its blank line.
    let complete_101 =
        |answer: &[u8]| answer.starts_with(b"HTTP/1.1 101") && answer.windows(4).any(|window| window == b"\r\n\r\n");
    while !complete_101(&answer) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => answer.extend_from_slice(&chunk[..read]),
            Err(error) => panic!("no answer to the upgrade: {error}; so far: {}", String::from_utf8_lossy(&answer)),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn an_unlisted_origin_is_refused_with_403_and_a_listed_one_or_none_is_upgraded() {
    let broker =
        Broker::start(&["--allowed-origin", "https://app.example.com", "--allowed-origin", "http://localhost:8080"]);
    let refused = upgrade_with_origin(&broker, Some("https://evil.example"));
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("origin \"https://evil.example\" is not allowed"), "{refused}");
    assert!(refused.contains("--allowed-origin"), "the reason says what the operator can do: {refused}");
    // An origin differs by scheme or port too.
    assert!(upgrade_with_origin(&broker, Some("http://app.example.com")).starts_with("HTTP/1.1 403"));
    assert!(upgrade_with_origin(&broker, Some("http://localhost:8081")).starts_with("HTTP/1.1 403"));
    assert!(upgrade_with_origin(&broker, Some("null")).starts_with("HTTP/1.1 403"));
    for allowed in
        [Some("https://app.example.com"), Some("http://localhost:8080"), Some("HTTPS://App.Example.com"), None]
    {
        let answer = upgrade_with_origin(&broker, allowed);
        assert!(answer.starts_with("HTTP/1.1 101"), "{allowed:?}: {answer}");
    }
    // The client library sends no Origin: a full session works.
    let mut client = broker.client();
    let seq = client.send("origin", "from a client that is not a browser").unwrap();
    client.wait_receipt(seq).unwrap();
}

#[test]
fn without_a_list_any_origin_is_upgraded() {
    let broker = Broker::start(&[]);
    assert!(upgrade_with_origin(&broker, Some("https://anywhere.example")).starts_with("HTTP/1.1 101"));
}

#[test]
fn listening_beyond_loopback_without_an_origin_list_warns_at_start() {
    let warning = "beyond loopback without --allowed-origin";
    // (Anonymous sessions beyond loopback need --allow-anonymous-remote: tests/auth.rs.)
    let open = Broker::start(&["--listen", "0.0.0.0:0", "--allow-anonymous-remote"]);
    let line = open.wait_for_log(warning, WAIT).expect("a warning for a broker on every interface without a list");
    assert!(line.contains("WARN") && line.contains("0.0.0.0"), "{line}");
    let listed = Broker::start(&[
        "--listen",
        "0.0.0.0:0",
        "--allow-anonymous-remote",
        "--allowed-origin",
        "https://app.example.com",
    ]);
    let loopback = Broker::start(&[]);
    for broker in [&listed, &loopback] {
        // Both have started (the listening line is logged after the warning would be).
        assert!(broker.wait_for_log("listening on", WAIT).is_some());
        assert!(!broker.log_lines().iter().any(|line| line.contains(warning)), "{:#?}", broker.log_lines());
    }
}

#[test]
fn a_bad_allowed_origin_stops_the_start_with_what_to_give() {
    for (origin, says) in [
        ("app.example.com", "does not start with https:// or http://"),
        ("https://*.example.com", "is a pattern"),
        ("https://app.example.com/", "has a path"),
        ("*", "does not start with"),
    ] {
        let dir = temp_dir("origin-refused");
        match Broker::try_start_in(&dir, &["--allowed-origin", origin]) {
            Ok(_) => panic!("started with --allowed-origin {origin}"),
            Err((status, log)) => {
                assert_eq!(status.code(), Some(2), "{origin}: {log:#?}");
                let text = log.join("\n");
                assert!(text.contains(origin) && text.contains(says) && text.contains("https://HOST"), "{text}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
