//! `mbws-bench` and `mbws-relay` end to end: every scenario runs briefly against the real broker
//! (and the relay), exits 0 and writes the result fields `scripts/bench.sh` and
//! `scripts/plot.py` read; bad usage exits 2, an unreachable target exits 1 naming it.

#[path = "../../../tests/common/binaries.rs"]
mod binaries;
#[path = "../../../tests/common/certs.rs"]
mod certs;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A server binary on an ephemeral loopback port, killed (by PID, through `Child`) on drop.
struct Server {
    child: Child,
    addr: String,
    data_dir: Option<PathBuf>,
}

impl Server {
    /// Starts `binary` with `args` and waits for its "listening on ADDR" line.
    fn start(binary: &Path, args: &[&str], data_dir: Option<PathBuf>) -> Server {
        let mut command = Command::new(binary);
        let binary = binary.display();
        command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some(dir) = &data_dir {
            command.arg("--data-dir").arg(dir);
        }
        let mut child = command.spawn().unwrap_or_else(|error| panic!("start {binary}: {error}"));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap() == 0 {
                panic!("{binary} exited before reporting its address");
            }
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Server { child, addr, data_dir }
    }

    fn broker() -> Server {
        Server::broker_with(&[])
    }

    fn broker_with(extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("mbws-bench-test-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        // Parallel tests cannot all have the admin API on its default port.
        let mut flags = vec!["--listen", "127.0.0.1:0", "--no-pin", "--admin-listen", "127.0.0.1:0"];
        flags.extend(extra);
        Server::start(&binaries::broker_binary(), &flags, Some(dir))
    }

    fn relay() -> Server {
        Server::start(Path::new(env!("CARGO_BIN_EXE_mbws-relay")), &["--listen", "127.0.0.1:0"], None)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn bench(args: &[&str]) -> Output {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_mbws-bench")).args(args).output().expect("run mbws-bench");
    assert!(started.elapsed() < Duration::from_secs(120), "mbws-bench took {:?}", started.elapsed());
    output
}

/// Runs a scenario with short phases and returns its JSON result as text.
fn run_scenario(scenario: &str, target: &str, url: &str, pid: u32, extra: &[&str]) -> String {
    let json = std::env::temp_dir().join(format!("mbws-bench-test-{}-{}.json", std::process::id(), unique()));
    let pid = pid.to_string();
    let mut args = vec![scenario, "--target", target, "--url", url, "--warmup-s", "0", "--duration-s", "0.5"];
    args.extend(["--broker-pid", &pid, "--json", json.to_str().unwrap()]);
    args.extend(extra);
    let output = bench(&args);
    let text = read(&json);
    assert!(
        output.status.success(),
        "{scenario} {target} exited {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_file(&json);
    assert!(text.starts_with(&format!("{{\"scenario\": \"{scenario}\", \"target\": \"{target}\"")), "{text}");
    text
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The number after `"key": ` (first occurrence).
fn number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\": ");
    let start = json.find(&pattern).unwrap_or_else(|| panic!("no {key} in {json}")) + pattern.len();
    let end = json[start..].find([',', '}']).map(|end| start + end).unwrap();
    json[start..end].parse().unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn every_scenario_runs_against_the_broker() {
    let broker = Server::broker();
    let url = format!("ws://{}/", broker.addr);
    let pid = broker.pid();

    let throughput = run_scenario("throughput", "mbws", &url, pid, &["--consumers", "2", "--addresses", "2"]);
    assert!(number(&throughput, "messages") > 0.0);
    for key in ["msgs_per_sec", "mb_per_sec", "broker_cpu_seconds", "cpu_s_per_million", "p50_us", "p99_us"] {
        assert!(number(&throughput, key) >= 0.0, "{key}");
    }
    assert_eq!(number(&throughput, "refused"), 0.0, "the end-to-end window keeps every SEND accepted");

    let latency =
        run_scenario("latency", "mbws", &url, pid, &["--rates", "10,50", "--max-rate", "2000", "--step-s", "0.5"]);
    assert_eq!(latency.matches("\"target_rate\"").count(), 2, "{latency}");
    for key in ["achieved_rate", "messages", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(number(&latency, key) > 0.0, "{key}");
    }
    assert_eq!(number(&latency, "max_rate"), 2000.0);

    let fanout = run_scenario("fanout", "mbws", &url, pid, &["--subscribers", "3", "--light"]);
    assert_fanout(&fanout, 3.0);

    let connections = run_scenario("connections", "mbws", &url, pid, &["--connections", "50", "--source-ips", "2"]);
    assert_eq!(number(&connections, "connections"), 50.0);
    assert!(number(&connections, "rss_after_kib") > 0.0);

    let durable = run_scenario("durable", "mbws", &url, pid, &[]);
    assert!(number(&durable, "messages") > 0.0);
    assert!(number(&durable, "receipt_p99_us") >= number(&durable, "receipt_p50_us"));
    assert!(durable.contains("\"unsupported\": false"));
}

/// wss://: the generator runs TLS itself (trusting the broker's certificate through --ca-file)
/// and measures the same things as over ws://; a certificate it does not trust fails the run
/// with the reason.
#[test]
fn the_generator_speaks_wss_with_a_ca_file() {
    let dir = std::env::temp_dir().join(format!("mbws-bench-tls-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = certs::make_certificate(&dir, "localhost");
    let other = certs::make_certificate(&dir, "someone-else");
    let broker = Server::broker_with(&pair.flags());
    let port = broker.addr.rsplit_once(':').unwrap().1.to_string();
    let url = format!("wss://localhost:{port}/");
    let pid = broker.pid();

    let throughput = run_scenario("throughput", "mbws", &url, pid, &["--ca-file", pair.cert_str()]);
    assert!(number(&throughput, "messages") > 0.0, "{throughput}");
    assert!(number(&throughput, "cpu_s_per_million") > 0.0, "{throughput}");
    let fanout = run_scenario("fanout", "mbws", &url, pid, &["--subscribers", "3", "--ca-file", pair.cert_str()]);
    assert_fanout(&fanout, 3.0);

    let untrusted =
        bench(&["throughput", "--target", "mbws", "--url", &url, "--duration-s", "1", "--ca-file", other.cert_str()]);
    let message = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(1), "{message}");
    assert!(message.contains("TLS handshake failed") && message.contains("certificate"), "{message}");
    let relay = bench(&["throughput", "--target", "relay", "--url", "wss://localhost:1/"]);
    assert_eq!(relay.status.code(), Some(2), "the relay speaks no TLS");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback port that was free a moment ago (for servers that need a port in their config).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nats-server (Debian's package; .ci/run installs it) with JetStream and a WebSocket listener,
/// plain or with `tls` = (cert, key); killed on drop.
struct Nats {
    child: Child,
    client_port: u16,
    ws_port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start(tls: Option<&certs::CertPair>) -> Nats {
        let dir = std::env::temp_dir().join(format!("mbws-bench-nats-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let (client_port, ws_port) = (free_port(), free_port());
        let tls_block = match tls {
            None => "no_tls: true".to_string(),
            Some(pair) => format!("tls {{ cert_file: \"{}\", key_file: \"{}\" }}", pair.cert_str(), pair.key_str()),
        };
        let config = format!(
            "host: 127.0.0.1\nport: {client_port}\njetstream {{ store_dir: \"{}\" }}\n\
             websocket {{ host: 127.0.0.1\n port: {ws_port}\n {tls_block} }}\n",
            dir.join("store").display()
        );
        std::fs::write(dir.join("nats.conf"), config).unwrap();
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .expect("nats-server is not installed: apt-get install nats-server (.ci/run does)");
        let child = Command::new(binary)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let nats = Nats { child, client_port, ws_port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", ws_port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {ws_port} within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        nats
    }

    /// Creates the stream scripts/bench.sh creates (file storage, subjects bench.>) through the
    /// JetStream API over the NATS client protocol.
    fn create_stream(&self) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.client_port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let config = r#"{"name":"BENCH","subjects":["bench.>"],"storage":"file"}"#;
        let request = format!(
            "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.t 1\r\nPUB $JS.API.STREAM.CREATE.BENCH _INBOX.t {}\r\n{config}\r\n",
            config.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"config\"") {
            let read = stream.read(&mut chunk).expect("JetStream answers the stream creation");
            assert!(read > 0, "nats-server closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..read]);
            assert!(!String::from_utf8_lossy(&seen).contains("\"error\""), "{}", String::from_utf8_lossy(&seen));
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The NATS target: core NATS over WebSocket, over wss://, and JetStream as the durable peer
/// (each publish acknowledged by a PubAck); a durable run without a stream fails at set-up,
/// saying so, instead of stalling.
#[test]
fn nats_is_a_target_plain_over_tls_and_with_jetstream() {
    let dir = std::env::temp_dir().join(format!("mbws-bench-nats-tls-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = certs::make_certificate(&dir, "localhost");

    let nats = Nats::start(None);
    let url = format!("ws://127.0.0.1:{}/", nats.ws_port);
    let pid = nats.child.id();
    let throughput = run_scenario("throughput", "nats", &url, pid, &[]);
    assert!(number(&throughput, "messages") > 0.0, "{throughput}");

    let no_stream = bench(&["durable", "--target", "nats", "--url", &url, "--duration-s", "1"]);
    let message = String::from_utf8_lossy(&no_stream.stderr);
    assert_eq!(no_stream.status.code(), Some(1), "{message}");
    assert!(message.contains("no JetStream stream captures bench."), "{message}");

    nats.create_stream();
    let durable = run_scenario("durable", "nats", &url, pid, &[]);
    assert!(durable.contains("\"unsupported\": false"), "{durable}");
    assert!(number(&durable, "messages") > 0.0, "{durable}");
    assert!(number(&durable, "receipt_p99_us") >= number(&durable, "receipt_p50_us"), "{durable}");
    drop(nats);

    let nats = Nats::start(Some(&pair));
    let url = format!("wss://localhost:{}/", nats.ws_port);
    let throughput = run_scenario("throughput", "nats", &url, nats.child.id(), &["--ca-file", pair.cert_str()]);
    assert!(number(&throughput, "messages") > 0.0, "{throughput}");
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_relay_is_a_target_too() {
    let relay = Server::relay();
    let pid = relay.pid();
    let throughput = run_scenario("throughput", "relay", &relay.addr, pid, &["--publishers", "2", "--consumers", "2"]);
    assert!(number(&throughput, "msgs_per_sec") > 0.0);
    let fanout = run_scenario("fanout", "relay", &relay.addr, pid, &["--subscribers", "4"]);
    assert_fanout(&fanout, 4.0);
    let durable = run_scenario("durable", "relay", &relay.addr, pid, &[]);
    assert!(durable.contains("\"unsupported\": true"), "{durable}");
}

#[test]
fn usage_errors_exit_2_and_unreachable_targets_exit_1() {
    let bad_size = bench(&["throughput", "--target", "mqtt", "--url", "ws://127.0.0.1:1/", "--size", "5000"]);
    assert_eq!(bad_size.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_size.stderr).contains("4 KB"));
    assert_eq!(bench(&["throughput", "--target", "mbws"]).status.code(), Some(2), "--url is required");
    assert_eq!(bench(&["nonsense"]).status.code(), Some(2));

    let unreachable = bench(&["throughput", "--target", "mbws", "--url", "ws://127.0.0.1:1/", "--duration-s", "1"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let message = String::from_utf8_lossy(&unreachable.stderr);
    assert!(message.contains("mbws target at ws://127.0.0.1:1/"), "{message}");
}

/// Every subscriber gets every message: over the measured window, deliveries are about
/// `subscribers` times the publishes, give or take what was in flight at its edges (the window).
fn assert_fanout(json: &str, subscribers: f64) {
    let (published, deliveries, window) =
        (number(json, "published"), number(json, "deliveries"), number(json, "window"));
    assert!(published > 0.0, "{json}");
    assert!((deliveries - subscribers * published).abs() <= subscribers * window, "{json}");
}

#[test]
fn an_unwritable_json_path_is_refused_before_the_run() {
    let broker = Server::broker();
    let url = format!("ws://{}/", broker.addr);
    let started = Instant::now();
    let output = bench(&[
        "throughput",
        "--target",
        "mbws",
        "--url",
        &url,
        "--duration-s",
        "30",
        "--json",
        "/nonexistent-mbws-dir/result.json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--json /nonexistent-mbws-dir/result.json"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused only after the run: {:?}", started.elapsed());
}

#[test]
fn connections_notices_that_the_broker_has_gone() {
    use std::io::Read;
    use std::sync::mpsc;
    let mut broker = Server::broker();
    let url = format!("ws://{}/", broker.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbws-bench"))
        .args(["connections", "--target", "mbws", "--url", &url, "--connections", "20", "--duration-s", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The progress line says "holding" once every session is open; collect stderr meanwhile.
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(read @ 1..) = stderr.read(&mut chunk) {
            seen.extend_from_slice(&chunk[..read]);
            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while !text.contains("holding") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(seen) => text = seen,
            Err(_) => {
                let _ = child.kill();
                panic!("mbws-bench never reported holding its sessions: {text}");
            }
        }
    }
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    let gone = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if gone.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mbws-bench kept holding sessions 10 s after the broker was killed");
        }
        // Collect what it printed while we wait for it to exit.
        if let Ok(seen) = rx.recv_timeout(Duration::from_millis(50)) {
            text = seen;
        }
    };
    if let Some(seen) = rx.try_iter().last() {
        text = seen;
    }
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("of the 20 idle sessions held"), "{text}");
}
