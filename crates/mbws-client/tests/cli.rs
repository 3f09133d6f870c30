//! The `mbws` command-line tool as a user runs it: the real `target/debug/mbws` against the real
//! broker, its output read through pipes. Covers what it prints and when, how it stops on a
//! signal, how it reads bodies, its URL errors and exit codes, its help texts (and those of
//! `mbws-bench`), the README's quick throughput check, and its credit against the broker's
//! max-credit.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Broker;
use mbws_client::{Client, ClientOptions};
use mbws_proto::mbws::{AckMode, DeliveryMode};

/// Every run of a binary here is bounded by this; past it the process is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn mbws(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mbws"));
    command.args(args).env("MBWS_URL", url).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Runs `command` to completion (bounded by `RUN_TIMEOUT`), feeding it `input` on stdin.
fn run(mut command: Command, input: Option<&[u8]>) -> Output {
    if input.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("start the binary");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
    }
    wait_output(child, RUN_TIMEOUT)
}

/// Waits for `child` to exit and collects its output; kills it (by PID) and panics after `limit`.
fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("process {pid} did not finish within {limit:?}");
        }
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `body` to `address` with the CLI and asserts it was receipted (exit 0).
fn send(url: &str, address: &str, body: &str) {
    let output = run(mbws(url, &["send", address, body]), None);
    assert!(output.status.success(), "send {body}: {}", text(&output.stderr));
}

/// A running `mbws consume` whose standard output is a pipe, read line by line on a thread.
struct Consumer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Consumer {
    fn start(url: &str, args: &[&str]) -> Consumer {
        let mut child = mbws(url, args).spawn().expect("start mbws consume");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Consumer { child, lines }
    }

    fn next_line(&self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Waits (bounded) for the process to exit; returns its exit code, its standard error and
    /// the lines it printed that were not read yet.
    fn finish(self, limit: Duration) -> (Option<i32>, String, Vec<String>) {
        let output = wait_output(self.child, limit);
        // The process has exited, so its stdout is closed and the reader thread ends.
        let rest = std::iter::from_fn(|| self.lines.recv_timeout(Duration::from_secs(5)).ok()).collect();
        (output.status.code(), text(&output.stderr), rest)
    }
}

/// Bytes waiting unread in the receive queues of the TCP sockets `pid` holds (from /proc).
fn unread_socket_bytes(pid: u32) -> u64 {
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')) {
                inodes.push(inode.to_string());
            }
        }
    }
    let mut unread = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && inodes.iter().any(|inode| inode == fields[9]) {
                let rx_queue = fields[4].split(':').nth(1).unwrap_or("0");
                unread += u64::from_str_radix(rx_queue, 16).unwrap_or(0);
            }
        }
    }
    unread
}

/// Polls `condition` every 10 ms until it holds or `limit` passes (a state with no event to wait on).
fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

// ---------------------------------------------------------------------------------------------
// Item 16: output as messages arrive; a clean session close on SIGINT/SIGTERM.

#[test]
fn consume_into_a_pipe_prints_each_message_as_it_arrives() {
    let broker = Broker::start(&[]);
    let url = broker.url();
    let consumer = Consumer::start(&url, &["consume", "arrivals"]);
    send(&url, "arrivals", "first");
    assert_eq!(consumer.next_line(Duration::from_secs(10)).as_deref(), Some("first"), "held in a buffer");
    send(&url, "arrivals", "second");
    assert_eq!(consumer.next_line(Duration::from_secs(10)).as_deref(), Some("second"));
    signal(consumer.child.id(), libc::SIGINT);
    let (code, stderr, _) = consumer.finish(Duration::from_secs(10));
    assert_eq!(code, Some(130), "SIGINT exits 130: {stderr}");
}

#[test]
fn sigterm_closes_the_session_so_the_next_consumer_gets_the_rest_at_once() {
    // A session expiry far longer than the test's waits: only a CLOSE can release messages in time.
    let broker = Broker::start(&["--session-expiry-ms", "120000"]);
    let url = broker.url();
    let first = Consumer::start(&url, &["consume", "jobs"]);
    send(&url, "jobs", "one");
    assert_eq!(first.next_line(Duration::from_secs(10)).as_deref(), Some("one"));

    // Stopped, the consumer cannot print "two": the broker delivers it into its socket, unprinted.
    let pid = first.child.id();
    signal(pid, libc::SIGSTOP);
    send(&url, "jobs", "two");
    assert!(eventually(Duration::from_secs(10), || unread_socket_bytes(pid) > 0), "\"two\" was not delivered");
    signal(pid, libc::SIGTERM);
    signal(pid, libc::SIGCONT);
    let (code, stderr, printed_after) = first.finish(Duration::from_secs(10));
    assert_eq!(code, Some(143), "SIGTERM exits 143: {stderr}");
    assert_eq!(printed_after, Vec::<String>::new(), "nothing printed after the signal");
    send(&url, "jobs", "three");

    // The next consumer gets "two" (delivered before, so redelivered) and "three" (never
    // delivered, so not) at once, and never "one" (printed and acknowledged).
    let started = Instant::now();
    let output = run(mbws(&url, &["consume", "jobs", "--count", "2", "--timeout", "5", "--verbose"]), None);
    assert!(output.status.success(), "{:?}: {}", output.status, text(&output.stderr));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let lines: Vec<String> = text(&output.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("jobs ") && lines[0].ends_with(" redelivered two"), "{lines:?}");
    assert!(lines[1].starts_with("jobs ") && lines[1].ends_with(" three"), "{lines:?}");
    assert!(!lines[1].contains("redelivered"), "{lines:?}");
}

/// A reader that goes away (`mbws consume jobs | head -1`) ends the consumer like --count: it
/// closes the session, so what it had not written out goes back to the address at once rather
/// than after the session expiry.
#[test]
fn a_closed_output_pipe_closes_the_session_so_the_rest_is_released_at_once() {
    let broker = Broker::start(&["--session-expiry-ms", "120000"]);
    let url = broker.url();
    let mut child = mbws(&url, &["consume", "jobs"]).spawn().expect("start mbws consume");
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    send(&url, "jobs", "one");
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");
    drop(reader); // The pipe's only reader is gone: the next write fails with EPIPE.
    send(&url, "jobs", "two");
    let output = wait_output(child, Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(0), "a closed output ends consume: {}", text(&output.stderr));
    assert!(text(&output.stderr).contains("standard output was closed"), "{}", text(&output.stderr));

    // "two" reached the consumer but never its reader: released by the CLOSE, not 120 s later.
    let output = run(mbws(&url, &["consume", "jobs", "--count", "1", "--timeout", "5"]), None);
    assert!(output.status.success(), "{:?}: {}", output.status, text(&output.stderr));
    assert_eq!(text(&output.stdout), "two\n");
}

// ---------------------------------------------------------------------------------------------
// Item 17: one trailing newline of a standard-input body is removed, unless --raw.

#[test]
fn a_body_from_standard_input_loses_one_trailing_newline_unless_raw() {
    let broker = Broker::start(&[]);
    let url = broker.url();
    let cases: [(&[u8], &[&str], &[u8]); 4] = [
        (b"x\n", &[], b"x"),
        (b"y\r\n", &[], b"y"),
        (b"two lines\n\n", &[], b"two lines\n"),
        (b"kept\n", &["--raw"], b"kept\n"),
    ];
    for (input, flags, _) in cases {
        let mut args = vec!["send", "bodies"];
        args.extend(flags);
        let output = run(mbws(&url, &args), Some(input));
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let mut client = Client::connect(&url, ClientOptions::default()).unwrap();
    client.subscribe(1, "bodies", DeliveryMode::Anycast, AckMode::Auto, 10).unwrap();
    for (input, flags, expected) in cases {
        let message = client.next_message(Duration::from_secs(10)).unwrap().expect("a message");
        assert_eq!(&message.body[..], expected, "{:?} {flags:?}", text(input));
    }
    let help = run(mbws(&url, &["send", "--help"]), None);
    assert!(text(&help.stdout).contains("trailing newline"), "the help says so");
}

// ---------------------------------------------------------------------------------------------
// Item 18: URLs.

#[test]
fn url_mistakes_are_usage_errors_that_name_the_url() {
    for (url, says) in [
        ("http://127.0.0.1:7447/", "ws://HOST:PORT/"),
        ("https://127.0.0.1:7447/", "ws://HOST:PORT/"),
        ("wss://127.0.0.1:http/", "port"),
        ("127.0.0.1", "HOST:PORT"),
        ("ws://127.0.0.1:http/", "port"),
        ("ws:///", "no host"),
    ] {
        let output = run(mbws(url, &["send", "a", "b"]), None);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(url) && stderr.contains(says), "{url}: {stderr}");
    }
}

#[test]
fn a_refused_connection_says_where_and_what_to_do() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/");
    let output = run(mbws(&url, &["send", "a", "b"]), None);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to {url}")) && stderr.contains("MBWS_URL"), "{stderr}");
}

#[test]
fn the_scheme_is_case_insensitive_and_the_port_defaults_to_80() {
    let broker = Broker::start(&[]);
    let upper = format!("WS://{}/", broker.addr);
    let output = run(mbws(&upper, &["send", "a", "b"]), None);
    assert!(output.status.success(), "{upper}: {}", text(&output.stderr));
    // No port: the client dials port 80, as RFC 6455 says (whatever answers there, it says so).
    let output = run(mbws("ws://127.0.0.1/", &["send", "a", "b", "--wait", "2"]), None);
    let stderr = text(&output.stderr);
    assert!(output.status.success() || stderr.contains("127.0.0.1:80"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Item 19: help texts, exit codes in --help, no rates over runs too short to measure.

/// The entries (first line of each) of the "Arguments:" and "Options:" sections of clap's
/// help output that carry no help text (nothing but a `[default: ..]`-style note counts as none).
fn arguments_without_help(help: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut in_section = false;
    let lines: Vec<&str> = help.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_section = matches!(line.trim_end(), "Arguments:" | "Options:");
            continue;
        }
        let is_entry = line.starts_with("  ") && {
            let rest = line.trim_start();
            (rest.starts_with('-') || rest.starts_with('<') || rest.starts_with('[')) && line.len() - rest.len() <= 6
        };
        if !in_section || !is_entry {
            continue;
        }
        let spec_and_help = line.trim_start();
        let same_line = spec_and_help.split_once("  ").map(|(_, help)| help.trim()).unwrap_or("");
        let next_line = lines
            .get(index + 1)
            .filter(|next| next.starts_with("          ") && !next.trim().is_empty())
            .map(|next| next.trim())
            .unwrap_or("");
        let words = if same_line.is_empty() { next_line } else { same_line };
        let only_notes = words.is_empty() || (words.starts_with('[') && words.ends_with(']'));
        if only_notes {
            missing.push(spec_and_help.split("  ").next().unwrap_or(spec_and_help).to_string());
        }
    }
    missing
}

/// The subcommand names listed under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim_end() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_argument_of_mbws_and_mbws_bench_has_help_and_the_help_gives_exit_codes() {
    assert!(arguments_without_help("Options:\n      --credit <CREDIT>  [default: 1]\n").len() == 1);
    assert!(arguments_without_help("Options:\n      --credit <CREDIT>\n          Credit\n").is_empty());
    for path in [std::path::PathBuf::from(env!("CARGO_BIN_EXE_mbws")), common::binaries::workspace_binary("mbws-bench")]
    {
        let binary = path.display();
        let top = run(
            {
                let mut command = Command::new(&path);
                command.arg("--help").stdout(Stdio::piped()).stderr(Stdio::piped());
                command
            },
            None,
        );
        let top_help = text(&top.stdout);
        let names = subcommands(&top_help);
        assert!(!names.is_empty(), "{binary}: no subcommands in {top_help}");
        assert!(top_help.contains("Exit codes"), "{binary} --help gives no exit codes:\n{top_help}");
        for long_or_short in ["--help", "-h"] {
            for name in &names {
                let mut command = Command::new(&path);
                command.args([name.as_str(), long_or_short]).stdout(Stdio::piped()).stderr(Stdio::piped());
                let help = text(&run(command, None).stdout);
                let missing = arguments_without_help(&help);
                assert!(missing.is_empty(), "{binary} {name} {long_or_short}: no help for {missing:?}\n{help}");
                if long_or_short == "--help" {
                    assert!(help.contains("Exit codes"), "{binary} {name} --help gives no exit codes:\n{help}");
                }
            }
        }
    }
}

#[test]
fn runs_too_short_to_measure_print_no_rate() {
    let broker = Broker::start(&[]);
    let url = broker.url();
    let output = run(mbws(&url, &["send", "short", "x", "--count", "2"]), None);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("sent 2 messages to \"short\" in "), "{stderr}");
    assert!(!stderr.contains("msg/s"), "a rate over a few milliseconds is noise: {stderr}");
}

// ---------------------------------------------------------------------------------------------
// Item 20: the README's quick throughput check, run as written, twice.

/// The shell block that follows the README line mentioning the quick throughput check.
fn readme_throughput_check() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let from = readme.find("quick throughput check").expect("the README has a quick throughput check");
    let block = &readme[from..];
    let start = block.find("```sh\n").expect("followed by a sh block") + "```sh\n".len();
    let end = block[start..].find("```").unwrap() + start;
    block[start..end].to_string()
}

#[test]
fn the_readme_quick_throughput_check_can_be_run_again_and_again() {
    let script = readme_throughput_check();
    assert!(script.contains("mbws send") && script.contains("mbws consume"), "{script}");
    let broker = Broker::start(&[]);
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_mbws")).parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    for attempt in 1..=2 {
        let mut command = Command::new("bash");
        command
            .args(["-e", "-c", &script])
            .env("PATH", &path)
            .env("MBWS_URL", broker.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = run(command, None);
        let stderr = text(&output.stderr);
        assert!(output.status.success(), "run {attempt}: {stderr}");
        assert!(stderr.contains("sent 100000 messages"), "run {attempt}: {stderr}");
        assert!(stderr.contains("received 100000 messages"), "run {attempt}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// Item 22: the default credit follows the broker's max-credit; an explicit one above it is refused.

#[test]
fn the_default_credit_fits_a_broker_with_a_low_max_credit() {
    let broker = Broker::start(&["--max-credit", "10"]);
    let url = broker.url();
    for body in ["a", "b", "c"] {
        send(&url, "small", body);
    }
    let output = run(mbws(&url, &["consume", "small", "--count", "3", "--timeout", "10"]), None);
    assert!(output.status.success(), "{:?}: {}", output.status, text(&output.stderr));
    assert_eq!(text(&output.stdout), "a\nb\nc\n");

    let output = run(mbws(&url, &["consume", "small", "--count", "1", "--credit", "20", "--timeout", "2"]), None);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--credit 20") && stderr.contains("max-credit 10"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Unnumbered MBLWS SENDs (`send --light --unnumbered`, what `scripts/callgrind-broker.sh --light`
// drives): at most once, no RECEIPTs, paced by the broker's at-most-once lead.

#[test]
fn unnumbered_light_sends_arrive_in_order_once_each_through_the_at_most_once_lead() {
    // Lead 128 (twice max-inflight-sends): 3,000 SENDs to a consumer with credit 10 are held
    // at the lead and let go as the consumer acknowledges.
    let broker = Broker::start(&["--max-inflight-sends", "64"]);
    let url = broker.url();
    let consumer =
        Consumer::start(&url, &["--light", "consume", "lead", "--count", "3000", "--credit", "10", "--timeout", "30"]);
    std::thread::sleep(Duration::from_millis(300)); // usually subscribed by then; either way all arrive
    let bodies: String = (1..=3000).map(|index| format!("m{index}\n")).collect();
    let output = run(mbws(&url, &["--light", "send", "lead", "--lines", "--unnumbered"]), Some(bodies.as_bytes()));
    assert!(output.status.success(), "{:?}: {}", output.status, text(&output.stderr));
    assert!(text(&output.stderr).contains("sent 3000 unnumbered messages"), "{}", text(&output.stderr));
    let (code, stderr, lines) = consumer.finish(Duration::from_secs(40));
    assert_eq!(code, Some(0), "{stderr}");
    let expected: Vec<String> = (1..=3000).map(|index| format!("m{index}")).collect();
    assert_eq!(lines.len(), expected.len(), "every message once: {stderr}");
    assert!(lines == expected, "in the order sent");

    let output = run(mbws(&url, &["send", "lead", "x", "--unnumbered"]), None);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--unnumbered needs --light"), "{stderr}");
}
