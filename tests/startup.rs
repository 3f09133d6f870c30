//! Start-up and deployment against the real broker binary: a busy port, signals, the data
//! directory, flag ranges, the open-file limit, and what a panicking shard does.

mod common;

use std::net::TcpStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{temp_dir, Broker};
use mbws::config::FLAG_RANGES;
use mbws::mbws::{AckMode, DeliveryMode, Send};
use mbws_client::ClientError;

const WAIT: Duration = Duration::from_secs(5);

/// Runs the broker binary with `args` and returns its exit code and standard error, for starts
/// that must be refused before the broker listens (bounded: a broker that starts is killed).
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbws-broker"))
        .args(["--listen", "127.0.0.1:0", "--no-pin", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mbws-broker");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("mbws-broker {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Item 1 and 3: a port another broker listens on is refused (exit 1, one clear line), the
/// refused broker writes nothing to its data directory, and the first keeps all its traffic.
#[test]
fn a_second_broker_on_a_busy_port_is_refused_and_writes_nothing() {
    let first = Broker::start(&["--shards", "2"]);
    let dir = temp_dir("busy-port");
    let data_dir = dir.join("data");
    let listen = first.addr.to_string();
    let (status, log) = match Broker::try_start_in(&data_dir, &["--shards", "2", "--listen", &listen]) {
        Ok(_) => panic!("a second broker started on {listen}, which the first listens on"),
        Err(refused) => refused,
    };
    assert_eq!(status.code(), Some(1), "exit status 1: {log:?}");
    let line = log.iter().find(|line| line.contains("address already in use")).expect("says the address is in use");
    assert!(line.contains(&listen) && line.contains("--listen"), "names the address and what to do: {line}");
    assert!(!data_dir.exists(), "a start that failed wrote its data directory");

    // Every connection reaches the first broker: 40 fresh publishers, one consumer sees all.
    let mut consumer = first.client();
    consumer.subscribe(1, "busy", DeliveryMode::Anycast, AckMode::Auto, 1000).unwrap();
    for index in 0..40 {
        let mut publisher = first.client();
        let seq = publisher.send("busy", format!("m{index}")).unwrap();
        publisher.wait_receipt(seq).unwrap();
    }
    for index in 0..40 {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {index} is missing"));
        assert_eq!(message.body, Bytes::from(format!("m{index}")));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 2: SIGHUP is logged and ignored; SIGTERM still closes sessions with 1001.
#[test]
fn sighup_is_logged_and_the_broker_keeps_serving() {
    let mut broker = Broker::start(&["--shards", "2"]);
    let mut consumer = broker.client();
    consumer.subscribe(1, "hup", DeliveryMode::Anycast, AckMode::Auto, 10).unwrap();
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGHUP) };
    broker.wait_for_log("SIGHUP", WAIT).expect("the broker says it received SIGHUP");
    assert!(broker.is_running(), "SIGHUP stopped the broker");
    let mut publisher = broker.client();
    let seq = publisher.send("hup", "after the hang-up").unwrap();
    publisher.wait_receipt(seq).unwrap();
    let message = consumer.next_message(WAIT).unwrap().expect("delivered after SIGHUP");
    assert_eq!(message.body, Bytes::from("after the hang-up"));
    let status = broker.terminate();
    assert!(status.success(), "SIGTERM after SIGHUP exits 0: {status:?}");
    match consumer.next_message(WAIT) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
}

fn durable(address: &str, body: &str) -> Send {
    Send {
        address: Bytes::copy_from_slice(address.as_bytes()),
        durable: true,
        body: Bytes::copy_from_slice(body.as_bytes()),
        ..Default::default()
    }
}

/// Item 3: a log with no unsettled message may be served by another shard count, and message
/// ids go on above every id used before (a consumer deduplicating by id loses nothing).
#[test]
fn a_settled_log_may_change_its_shard_count_and_ids_stay_unique() {
    let dir = temp_dir("reshard");
    let addresses = ["a", "b", "c", "d", "e", "f"];
    let mut highest_id = 0;
    {
        let broker = Broker::start_in(&dir, &["--shards", "2"]);
        let mut publisher = broker.client();
        for address in addresses {
            for index in 0..3 {
                let seq = publisher.send_message(durable(address, &format!("{address}{index}"))).unwrap();
                publisher.wait_receipt(seq).unwrap();
            }
        }
        let mut consumer = broker.client();
        for (id, address) in addresses.iter().enumerate() {
            consumer.subscribe(id as u32 + 1, address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
        }
        for _ in 0..addresses.len() * 3 {
            let message = consumer.next_message(WAIT).unwrap().expect("every message arrives");
            highest_id = highest_id.max(message.message_id);
            consumer.ack(message.delivery_seq, false).unwrap();
        }
        consumer.close().unwrap();
        let mut broker = broker;
        // Acknowledgements are logged by the next group commit; SIGTERM waits for it.
        assert!(broker.terminate().success());
    }
    let broker = Broker::start_in(&dir, &["--shards", "1"]);
    broker.wait_for_log("now used with --shards 1", WAIT).expect("says the shard count changed");
    assert_eq!(std::fs::read_to_string(dir.join("SHARDS")).unwrap().trim(), "1");
    let mut publisher = broker.client();
    let mut consumer = broker.client();
    for (id, address) in addresses.iter().enumerate() {
        let seq = publisher.send_message(durable(address, "after")).unwrap();
        publisher.wait_receipt(seq).unwrap();
        consumer.subscribe(id as u32 + 1, address, DeliveryMode::Anycast, AckMode::Auto, 10).unwrap();
        let message = consumer.next_message(WAIT).unwrap().expect("the new message arrives");
        assert_eq!(message.body, Bytes::from("after"), "nothing old was left to redeliver");
        assert!(message.message_id > highest_id, "id {} on {address} repeats an id used before", message.message_id);
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// Items 4 and 7: every numeric flag outside its range is refused at start with exit 2, the
/// flag's name, the value and the range; and `--help` shows every range.
#[test]
fn every_numeric_flag_out_of_range_names_the_flag_the_value_and_the_range() {
    let dir = temp_dir("ranges");
    let data_dir = dir.join("data");
    let data_dir = data_dir.to_str().unwrap();
    for range in FLAG_RANGES {
        let mut wrong = vec![range.max + 1];
        if range.min > 0 {
            wrong.push(range.min - 1);
        }
        for value in wrong {
            let value = value.to_string();
            let (code, stderr) = refused_start(&[range.flag, &value, "--data-dir", data_dir]);
            assert_eq!(code, Some(2), "{} {value}: {stderr}", range.flag);
            let expected = format!("{} {value} is out of range: use {}", range.flag, range.range_text());
            assert!(stderr.contains(&expected), "{} {value}: expected \"{expected}\" in {stderr}", range.flag);
        }
    }
    assert!(!std::path::Path::new(data_dir).exists(), "a refused start wrote its data directory");
    let help = Command::new(env!("CARGO_BIN_EXE_mbws-broker")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for range in FLAG_RANGES {
        let documented = help
            .split(&format!("      {} <", range.flag))
            .nth(1)
            .unwrap_or_else(|| panic!("{} is in --help", range.flag))
            .split("\n      --")
            .next()
            .unwrap();
        assert!(documented.contains(&format!("[range: {}]", range.range_text())), "{}: {documented}", range.flag);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 4 (the README): the flag table gives every numeric flag the range the broker checks.
#[test]
fn the_readme_flag_table_gives_every_range() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for range in FLAG_RANGES {
        let row = readme
            .lines()
            .find(|line| line.starts_with(&format!("| `{}", range.flag)))
            .unwrap_or_else(|| panic!("{} has a row in the README's flag table", range.flag));
        assert!(row.contains(&format!("`{}`", range.range_text())), "{} row lacks its range: {row}", range.flag);
    }
}

/// Items 4 and 5: relations between flags name both flags; a default the user did not set
/// follows the one they did (`--max-message-bytes 65536` alone starts).
#[test]
fn defaults_follow_the_flags_they_depend_on() {
    let broker = Broker::start(&["--shards", "1", "--max-message-bytes", "65536"]);
    let client = broker.client();
    assert_eq!(client.opened().limits.max_frame_bytes, 65536);
    drop(broker);
    let (code, stderr) = refused_start(&["--max-message-bytes", "65536", "--max-frame-bytes", "131072"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--max-frame-bytes 131072 exceeds --max-message-bytes 65536"), "{stderr}");
}

/// Item 7: `--listen` takes host names and a bare port; a data directory that is a file names
/// the flag and what to do.
#[test]
fn listen_takes_host_names_and_bare_ports_and_a_file_data_dir_is_named() {
    let by_name = Broker::start(&["--shards", "1", "--listen", "localhost:0"]);
    assert!(by_name.addr.ip().is_loopback(), "localhost resolves to a loopback address: {}", by_name.addr);
    let _ = by_name.client();
    let by_port = Broker::start(&["--shards", "1", "--listen", "0"]);
    assert_eq!(by_port.addr.ip().to_string(), "127.0.0.1", "a bare port listens on 127.0.0.1");
    let _ = by_port.client();

    let dir = temp_dir("file-data-dir");
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let (code, stderr) = refused_start(&["--data-dir", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--data-dir") && stderr.contains("is a file, not a directory"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The broker command with RLIMIT_NOFILE set to `soft`/`hard` in the child before exec.
fn with_open_file_limit(data_dir: &std::path::Path, extra: &[&str], soft: u64, hard: u64) -> Command {
    let mut command = Broker::command(data_dir, extra);
    let set_limit = move || {
        let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: setrlimit reads one rlimit through the pointer, which points at the live `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe, and allocates nothing.
    unsafe { command.pre_exec(set_limit) };
    command
}

/// Item 6: the soft open-file limit is raised to the hard limit, and the figure logged.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = temp_dir("nofile-raise");
    let broker = Broker::try_spawn(with_open_file_limit(&dir, &["--shards", "1"], 64, 256))
        .unwrap_or_else(|(status, log)| panic!("did not start ({status}): {log:?}"));
    broker.wait_for_log("open-file limit 256 (raised from 64", WAIT).expect("logs the raised limit");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 6: accept failing for want of descriptors is logged once per interval, not per attempt.
#[test]
fn accept_failures_for_want_of_descriptors_are_logged_once_per_interval() {
    let dir = temp_dir("nofile-low");
    let broker = Broker::try_spawn(with_open_file_limit(&dir, &["--shards", "1"], 64, 64))
        .unwrap_or_else(|(status, log)| panic!("did not start ({status}): {log:?}"));
    broker.wait_for_log("open-file limit 64", WAIT).expect("logs the limit");
    // More connections than descriptors: the broker runs out and accept fails from then on.
    let connections: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(broker.addr).unwrap()).collect();
    let first = broker.wait_for_log("accept failed", WAIT).expect("the failure is reported");
    assert!(first.contains("open-file limit (64)"), "says which limit to raise: {first}");
    // Accept is retried with a growing back-off (10 ms, 20 ms, ...): about 15 attempts in 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let reports = broker.log_lines().iter().filter(|line| line.contains("accept failed")).count();
    assert_eq!(reports, 1, "accept failures are reported once per interval: {:?}", broker.log_lines());
    drop(connections);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 8: a panic in a shard thread stops the whole process loudly (SIGABRT, with the thread,
/// the message and the location logged), never leaving a broker with a dead shard. The panic
/// is triggered by a debug-build-only setting (compiled out of release builds).
#[test]
fn a_panicking_shard_aborts_the_whole_broker_with_a_clear_message() {
    if !cfg!(debug_assertions) {
        return; // The trigger exists only in debug builds.
    }
    let dir = temp_dir("panic");
    let mut command = Broker::command(&dir, &["--shards", "2"]);
    command.env("MBWS_DEBUG_PANIC_ON_ACCEPT", "0");
    let mut broker =
        Broker::try_spawn(command).unwrap_or_else(|(status, log)| panic!("did not start ({status}): {log:?}"));
    // Connect until one lands on shard 0 (SO_REUSEPORT spreads them).
    let mut connections = Vec::new();
    let status = loop {
        if let Some(status) = broker.wait_exit(Duration::from_millis(50)) {
            break status;
        }
        assert!(connections.len() < 200, "shard 0 never accepted a connection");
        if let Ok(stream) = TcpStream::connect(broker.addr) {
            connections.push(stream);
        }
    };
    assert_eq!(status.signal(), Some(libc::SIGABRT), "the process aborts: {status:?}");
    let line = broker.wait_for_log("panicked at", WAIT).expect("the panic is logged");
    assert!(
        line.contains("thread mbws-shard-0 panicked at src/shard/mod.rs") && line.contains("panics on purpose"),
        "the panic is logged with its thread, location and message: {line}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A stopped broker no longer listens: once its process has exited, a connection to its port is
/// refused at once, so a restart (or a benchmark's next broker) on the same port is never
/// joined by a dead broker's listening socket that still accepts connections.
#[test]
fn a_stopped_broker_no_longer_accepts_connections() {
    for round in 0..10 {
        let mut broker = Broker::start(&["--shards", "2"]);
        let addr = broker.addr;
        // An idle client keeps the shards busy closing it; the listeners must go regardless.
        let _idle = broker.client();
        let status = broker.terminate();
        assert_eq!(status.code(), Some(0), "round {round}: SIGTERM exits 0");
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(error) => assert_eq!(
                error.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "round {round}: connecting to {addr} after the broker exited: {error}"
            ),
            Ok(_) => panic!("round {round}: {addr} still accepts connections after the broker exited"),
        }
    }
}

/// Transparent huge pages as the kernel reports them for process `pid` (`THP_enabled` in
/// /proc/PID/status, Linux 6.0 on); `None` on a kernel that does not report it.
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1) != Some("0"))
}

/// Issue 14 item 2: the broker turns transparent huge pages off for itself (each first touch
/// of a fresh 2 MiB region zeroed it whole on a shard's thread: half the CPU of a fan-out to
/// 1,000), unless `MIMALLOC_ALLOW_THP` is set, which then decides.
#[test]
fn transparent_huge_pages_are_off_unless_mimalloc_allow_thp_is_set() {
    if thp_enabled(std::process::id()).is_none() {
        eprintln!("skipped: this kernel does not report THP_enabled in /proc/PID/status");
        return;
    }
    let dir = temp_dir("thp");
    let mut command = Broker::command(&dir, &["--shards", "1"]);
    command.env_remove("MIMALLOC_ALLOW_THP");
    let broker = Broker::try_spawn(command).unwrap_or_else(|(status, log)| panic!("did not start ({status}): {log:?}"));
    assert_eq!(thp_enabled(broker.pid()), Some(false), "the broker runs without transparent huge pages");
    drop(broker);

    let mut command = Broker::command(&dir, &["--shards", "1"]);
    command.env("MIMALLOC_ALLOW_THP", "1");
    let broker = Broker::try_spawn(command).unwrap_or_else(|(status, log)| panic!("did not start ({status}): {log:?}"));
    assert_eq!(thp_enabled(broker.pid()), Some(true), "MIMALLOC_ALLOW_THP=1 leaves them on");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
