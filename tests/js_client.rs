//! The JavaScript client (clients/js): the broker serves it at `/mbws.js`, and its own Node tests
//! (`node --test clients/js/test/`) pass against this build of the broker, once with the `ws`
//! package and once with Node's built-in WebSocket where Node has one behind a flag (Node 20).
//!
//! Node 20 or later must be on PATH. Its packages are installed with `npm ci --prefix clients/js`
//! when `clients/js/node_modules` is missing (`.ci/run` does it up front). `MBWS_SKIP_NODE=1`
//! turns a missing Node into a loud skip notice instead of a failure.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Broker};

/// Bound on `npm ci` and on each `node --test` run.
const NODE_TIMEOUT: Duration = Duration::from_secs(300);
const SETUP_HINT: &str = "install Node 20 or later and run `npm ci --prefix clients/js` (or .ci/run); \
     set MBWS_SKIP_NODE=1 to skip this test";

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Sends `request` on a fresh connection and reads the whole answer (the broker closes after it).
fn http(broker: &Broker, request: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(broker.addr).expect("connect to the broker");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the broker answers and closes within 5 s");
    let split = answer.windows(4).position(|window| window == b"\r\n\r\n").expect("a complete HTTP head") + 4;
    (String::from_utf8(answer[..split].to_vec()).unwrap(), answer[split..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn the_broker_serves_the_module_at_mbws_js() {
    let broker = Broker::start(&["--shards", "1"]);
    let module = std::fs::read(client_dir().join("mbws.js")).unwrap();

    let (head, body) = http(&broker, "GET /mbws.js HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "Content-Type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(header(&head, "Content-Length"), Some(module.len().to_string().as_str()));
    assert_eq!(header(&head, "Cache-Control"), Some("no-cache"));
    assert_eq!(header(&head, "Access-Control-Allow-Origin"), Some("*"));
    assert!(body == module, "the body is clients/js/mbws.js as built into the binary");

    // Revalidation with the ETag costs no body; a query string (cache busting) is ignored.
    let etag = header(&head, "ETag").expect("an ETag").to_owned();
    let (head, body) =
        http(&broker, &format!("GET /mbws.js?v=2 HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: {etag}\r\n\r\n"));
    assert!(head.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{head}");
    assert!(body.is_empty());

    // Every other request keeps its answer: an upgrade at /mbws.js, other methods, other paths.
    let upgrade = "GET /mbws.js HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Protocol: MBWS.huawei.com\r\n\r\n";
    assert!(http(&broker, upgrade).0.starts_with("HTTP/1.1 404 "));
    assert!(http(&broker, "POST /mbws.js HTTP/1.1\r\nHost: localhost\r\n\r\n").0.starts_with("HTTP/1.1 405 "));
    assert!(http(&broker, "GET /other.js HTTP/1.1\r\nHost: localhost\r\n\r\n").0.starts_with("HTTP/1.1 404 "));
    assert!(http(&broker, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").0.starts_with("HTTP/1.1 400 "));

    // And the broker still upgrades at / after serving files.
    let _client = broker.client();
}

/// The node binary, or why there is none.
fn node() -> Result<(), String> {
    let version = run_bounded(Command::new("node").arg("--version"), Duration::from_secs(30))?;
    let major: u32 = version.stdout.trim().trim_start_matches('v').split('.').next().unwrap_or("").parse().unwrap_or(0);
    if !version.status.success() || major < 20 {
        return Err(format!("node --version says {:?}; Node 20 or later is needed", version.stdout.trim()));
    }
    Ok(())
}

/// `npm ci` in clients/js unless its packages are installed already.
fn ensure_packages() {
    let dir = client_dir();
    if dir.join("node_modules/typescript/bin/tsc").exists() && dir.join("node_modules/ws/package.json").exists() {
        return;
    }
    let finished =
        run_bounded(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir), NODE_TIMEOUT)
            .unwrap_or_else(|problem| panic!("npm ci in clients/js: {problem}; {SETUP_HINT}"));
    assert!(
        finished.status.success(),
        "npm ci in clients/js failed:\n{}\n{}\n{SETUP_HINT}",
        finished.stdout,
        finished.stderr
    );
}

/// Runs the client's Node tests with `flags` before `--test`; panics with their report if any fails.
fn run_node_tests(flags: &[&str]) {
    let finished = run_bounded(
        Command::new("node")
            .args(flags)
            .args(["--test", "test/"])
            .current_dir(client_dir())
            .env("MBWS_BROKER", common::binaries::broker_binary()),
        NODE_TIMEOUT,
    )
    .unwrap_or_else(|problem| panic!("{problem}"));
    let report = format!("stdout:\n{}\nstderr:\n{}", finished.stdout, finished.stderr);
    assert!(
        finished.status.success(),
        "node {flags:?} --test clients/js/test/ failed ({}):\n{report}",
        finished.status
    );
    assert!(finished.stdout.contains("# fail 0"), "{report}");
    let summary: Vec<&str> = finished.stdout.lines().filter(|line| line.starts_with("# ")).collect();
    eprintln!("node {flags:?} --test clients/js/test/: {}", summary.join(", "));
}

#[test]
fn the_javascript_client_passes_its_node_tests() {
    match node() {
        Ok(()) => {}
        Err(problem) if std::env::var("MBWS_SKIP_NODE").as_deref() == Ok("1") => {
            eprintln!("\n!!!!!!!! SKIPPED: JavaScript client tests (MBWS_SKIP_NODE=1): {problem} !!!!!!!!\n");
            return;
        }
        Err(problem) => panic!("no Node for the JavaScript client tests: {problem}; {SETUP_HINT}"),
    }
    ensure_packages();
    // With the `ws` package (Node 20 has no global WebSocket by default)...
    run_node_tests(&[]);
    // ...and with Node's own WebSocket, where a flag turns it on (Node 20; on by default later).
    let flag = "--experimental-websocket";
    let probe = run_bounded(
        Command::new("node").args([flag, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]),
        Duration::from_secs(30),
    );
    if probe.is_ok_and(|probe| probe.status.success()) {
        run_node_tests(&[flag]);
    }
}
