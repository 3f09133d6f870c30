//! Test harness: starts the real `mbws-broker` binary on an ephemeral loopback port, collects
//! its log lines, and stops it (by PID, through `Child`) when dropped.

#![allow(dead_code)]

pub mod binaries;
pub mod certs;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// A data directory this broker made for itself, removed on drop.
    own_data_dir: Option<PathBuf>,
}

/// One request to a broker's admin API (HTTP/1.1, bounded by 10 s): `method path` with `body`
/// (empty for none); the status and the body of the answer.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    const WAIT: Duration = Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, WAIT).expect("connect to the admin API");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let length = body.len();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer, then the close");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string())
}

/// A fresh, unique directory under the system temp dir (the caller removes it).
pub fn temp_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("mbws-{label}-{}-{unique}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Broker {
    /// Starts a broker with `--listen 127.0.0.1:0 --log-level debug` (unless `extra` has its
    /// own) and a data directory of its own (removed on drop), plus `extra` flags.
    pub fn start(extra: &[&str]) -> Broker {
        let dir = temp_dir("broker");
        let mut broker = Broker::start_in(&dir, extra);
        broker.own_data_dir = Some(dir);
        broker
    }

    /// Starts a broker on the data directory `data_dir` (kept on drop: restarts reuse it).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Broker {
        match Broker::try_start_in(data_dir, extra) {
            Ok(broker) => broker,
            Err((status, log)) => panic!("mbws-broker exited at start ({status}): {log:#?}"),
        }
    }

    /// Like `start_in`, but a broker that refuses to start gives its exit status and log.
    pub fn try_start_in(data_dir: &Path, extra: &[&str]) -> Result<Broker, (std::process::ExitStatus, Vec<String>)> {
        Broker::try_spawn(Broker::command(data_dir, extra))
    }

    /// The command `try_start_in` runs (with `--listen 127.0.0.1:0`, `--log-level debug` and
    /// `--admin-listen 127.0.0.1:0` unless `extra` has its own), for a caller that adjusts it (environment, resource limits).
    pub fn command(data_dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(binaries::broker_binary());
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--log-level") {
            command.args(["--log-level", "debug"]);
        }
        // Parallel tests cannot all have the admin API on its default port.
        if !extra.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        command
            .arg("--no-pin")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts `command` (see [`Broker::command`]) and waits for its listen address.
    pub fn try_spawn(mut command: Command) -> Result<Broker, (std::process::ExitStatus, Vec<String>)> {
        let mut child = command.spawn().expect("start mbws-broker");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // The start-up line has the bound address; a warning about the configured one
                // (`listening on 10.0.0.1:0 beyond loopback ...`) has port 0.
                let bound = line.split(" listening on ").nth(1).and_then(|rest| {
                    rest.split_whitespace().next()?.parse::<SocketAddr>().ok().filter(|addr| addr.port() != 0)
                });
                if let Some(addr) = bound {
                    if let Some(tx) = port_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(addr) = port_rx.recv_timeout(Duration::from_millis(20)) {
                return Ok(Broker { child, addr, log, own_data_dir: None });
            }
            if let Some(status) = child.try_wait().unwrap() {
                // The broker has exited, so its stderr ends: the reader has every line once it
                // returns (bounded, in case something else still holds the pipe).
                let drained_by = Instant::now() + Duration::from_secs(5);
                while !reader.is_finished() && Instant::now() < drained_by {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let lines = log.lock().unwrap().clone();
                return Err((status, lines));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("mbws-broker did not report its listen address; log: {:?}", log.lock().unwrap());
            }
        }
    }

    /// Kills the broker with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// A client session on this broker: MBWS, binary binding, 5 s timeouts.
    pub fn client(&self) -> mbws_client::Client {
        let options = mbws_client::ClientOptions {
            subprotocol: mbws_proto::mbws::Subprotocol::Reliable,
            binding: mbws_proto::mbws::Binding::Binary,
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        mbws_client::Client::connect(&self.url(), options).expect("connect to the broker")
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|line| line.contains(needle)) {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The shard that accepted the connection from local `port`, from the broker's debug log.
    pub fn shard_of_connection(&self, port: u16) -> u16 {
        let needle = format!("from 127.0.0.1:{port} upgraded");
        let line = self
            .wait_for_log(&needle, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no log line for the connection from port {port}"));
        let shard = line.split("shard ").nth(1).and_then(|rest| rest.split(':').next()).unwrap();
        shard.parse().unwrap()
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("mbws-broker did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin API's address, from the broker's start-up log line.
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_for_log("admin API at http://", Duration::from_secs(5)).expect("the admin API is on");
        let rest = line.split("admin API at http://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit by itself; None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.own_data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `command` to completion with its output collected, killing it (by its own handle) if
/// it is still running after `timeout`; then the panic message carries what it printed.
pub fn output_within(command: &mut Command, timeout: Duration) -> std::process::Output {
    let finished = run_bounded(command, timeout).unwrap_or_else(|problem| panic!("{problem}"));
    std::process::Output {
        status: finished.status,
        stdout: finished.stdout.into_bytes(),
        stderr: finished.stderr.into_bytes(),
    }
}

/// A process that ran to completion under [`run_bounded`].
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to completion, killing it (by its own handle) after `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Result<Finished, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {command:?}: {error}"))?;
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|error| error.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{command:?} did not finish within {timeout:?} and was killed\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() })
}

/// `promtool check metrics`, Prometheus's own checker of the text format, accepts `page`
/// (`.ci/run` installs Debian's `prometheus` package for it); without promtool, the caller's
/// own asserts are the only check.
pub fn promtool_check(page: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed: the page is checked by this test's own asserts only");
        return;
    };
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics refused the page:\n{}{}\n{page}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
