//! The JavaScript client (clients/js): the broker serves it at `/mbws.js` and the web console at
//! `/console`; the client's own Node tests (`node --test clients/js/test/`) pass against this
//! build of the broker, once with the `ws` package and once with Node's built-in WebSocket where
//! Node has one behind a flag (Node 20); and the browser tests (`clients/js/test-browser/`: the
//! console, a second page, a dropped connection, the chat example) pass in headless Chromium.
//!
//! Node 20 or later must be on PATH, and Chromium at /usr/bin/chromium (or `$MBWS_CHROMIUM`).
//! The packages are installed with `npm ci --prefix clients/js` when `clients/js/node_modules` is
//! missing (`.ci/run` does it up front, and installs Debian's chromium). `MBWS_SKIP_NODE=1`
//! turns a missing Node into a loud skip notice instead of a failure, `MBWS_SKIP_BROWSER=1` a
//! missing Chromium.

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

    let (console_head, console) = http(&broker, "GET /console HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(console_head.starts_with("HTTP/1.1 200 OK\r\n"), "{console_head}");
    assert_eq!(header(&console_head, "Content-Type"), Some("text/html; charset=utf-8"));
    assert!(
        console == std::fs::read(client_dir().join("console.html")).unwrap(),
        "the body is clients/js/console.html"
    );

    let (session_head, session) = http(&broker, "GET /console-session.js HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(session_head.starts_with("HTTP/1.1 200 OK\r\n"), "{session_head}");
    // A module Worker's script must be served as JavaScript, or the browser refuses to run it.
    assert_eq!(header(&session_head, "Content-Type"), Some("text/javascript; charset=utf-8"));
    assert!(
        session == std::fs::read(client_dir().join("console-session.js")).unwrap(),
        "the body is clients/js/console-session.js"
    );

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

/// `npm ci` in clients/js unless its packages are installed already (once for all tests here).
fn ensure_packages() {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = ONCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = client_dir();
    let installed = ["typescript/bin/tsc", "ws/package.json", "playwright-core/package.json"];
    if installed.iter().all(|file| dir.join("node_modules").join(file).exists()) {
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

/// Runs the Node tests in `dir` (of clients/js) with `flags` before `--test`; panics with their
/// report if any fails.
fn run_node_tests(flags: &[&str], dir: &str) {
    let finished = run_bounded(
        Command::new("node")
            .args(flags)
            .args(["--test", dir])
            .current_dir(client_dir())
            .env("MBWS_BROKER", common::binaries::broker_binary()),
        NODE_TIMEOUT,
    )
    .unwrap_or_else(|problem| panic!("{problem}"));
    let report = format!("stdout:\n{}\nstderr:\n{}", finished.stdout, finished.stderr);
    assert!(
        finished.status.success(),
        "node {flags:?} --test clients/js/{dir} failed ({}):\n{report}",
        finished.status
    );
    assert!(finished.stdout.contains("# fail 0"), "{report}");
    let summary: Vec<&str> =
        finished.stdout.lines().filter(|line| line.starts_with("# ") && !line.starts_with("# Subtest")).collect();
    eprintln!("node {flags:?} --test clients/js/{dir}: {}", summary.join(", "));
}

/// Node, or a skip notice (`MBWS_SKIP_NODE=1`); panics without either.
fn node_or_skip() -> bool {
    match node() {
        Ok(()) => true,
        Err(problem) if std::env::var("MBWS_SKIP_NODE").as_deref() == Ok("1") => {
            eprintln!("\n!!!!!!!! SKIPPED: JavaScript client tests (MBWS_SKIP_NODE=1): {problem} !!!!!!!!\n");
            false
        }
        Err(problem) => panic!("no Node for the JavaScript client tests: {problem}; {SETUP_HINT}"),
    }
}

#[test]
fn the_javascript_client_passes_its_node_tests() {
    if !node_or_skip() {
        return;
    }
    ensure_packages();
    // With the `ws` package (Node 20 has no global WebSocket by default)...
    run_node_tests(&[], "test/");
    // ...and with Node's own WebSocket, where a flag turns it on (Node 20; on by default later).
    let flag = "--experimental-websocket";
    let probe = run_bounded(
        Command::new("node").args([flag, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]),
        Duration::from_secs(30),
    );
    if probe.is_ok_and(|probe| probe.status.success()) {
        run_node_tests(&[flag], "test/");
    }
}

#[test]
fn the_console_and_the_chat_example_work_in_headless_chromium() {
    if !node_or_skip() {
        return;
    }
    let chromium = std::env::var("MBWS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !Path::new(&chromium).exists() {
        let problem = format!("no Chromium at {chromium}: `apt-get install chromium` (Debian), or set MBWS_CHROMIUM");
        if std::env::var("MBWS_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("\n!!!!!!!! SKIPPED: browser tests (MBWS_SKIP_BROWSER=1): {problem} !!!!!!!!\n");
            return;
        }
        panic!("{problem}; set MBWS_SKIP_BROWSER=1 to skip the browser tests");
    }
    ensure_packages();
    run_node_tests(&[], "test-browser/");
}
