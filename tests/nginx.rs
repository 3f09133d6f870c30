//! The recipe of docs/SECURITY.md, "TLS terminated by nginx", run for real: nginx (Debian's,
//! installed with apt-get when missing) with the doc's own server block, on a free loopback
//! port, a throwaway certificate made with openssl, and the plain broker behind it; the Rust
//! client round-trips messages over wss:// through nginx.
//!
//! nginx runs in the foreground from a temporary directory (its own config, pid file, logs and
//! temp paths) and is stopped through its PID. The test is skipped, loudly, only where neither
//! nginx nor apt-get exists (CI runs as root with apt).

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::certs::make_certificate;
use common::{output_within, temp_dir, Broker};
use mbws::mbws::{AckMode, DeliveryMode};
use mbws_client::{Client, ClientOptions};

const WAIT: Duration = Duration::from_secs(10);
/// apt-get update and install together may take this long on a slow mirror.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The nginx binary, installed with apt-get if missing; `None` (skip) when there is no apt-get.
fn nginx_binary() -> Option<PathBuf> {
    let installed = || ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|path| path.is_file());
    if let Some(nginx) = installed() {
        return Some(nginx);
    }
    if !Path::new("/usr/bin/apt-get").is_file() {
        eprintln!(
            "\n!!!!!!!! SKIPPED: the nginx recipe test: nginx is not installed and there is no apt-get to install it \
             (install nginx to run it) !!!!!!!!\n"
        );
        return None;
    }
    let install = || {
        output_within(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "nginx"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            INSTALL_TIMEOUT,
        )
    };
    let mut output = install();
    if !output.status.success() {
        // A fresh machine has no package lists yet.
        output_within(Command::new("apt-get").arg("update"), INSTALL_TIMEOUT);
        output = install();
    }
    assert!(
        output.status.success(),
        "apt-get install nginx failed (the test needs root, or nginx installed): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(installed().expect("nginx is installed now"))
}

/// The ```nginx block of the section "TLS terminated by nginx" in docs/SECURITY.md.
fn recipe_from_the_doc() -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/SECURITY.md")).unwrap();
    let section = doc.split("## TLS terminated by nginx").nth(1).expect("docs/SECURITY.md has the nginx section");
    let block = section.split("```nginx\n").nth(1).expect("the section has an ```nginx block");
    block.split("```").next().unwrap().to_string()
}

/// Replaces `from` with `to` in `text`, insisting that the doc still says `from`.
fn substitute(text: String, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the nginx recipe in docs/SECURITY.md no longer contains {from:?}: update this test");
    text.replace(from, to)
}

/// nginx in the foreground, stopped by its PID (SIGTERM, then SIGKILL) when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
            eprintln!("nginx error.log:\n{log}");
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn nginx_terminates_tls_in_front_of_the_broker_as_the_doc_says() {
    let Some(nginx) = nginx_binary() else { return };
    let dir = temp_dir("nginx");
    let pair = make_certificate(&dir, "localhost");
    let broker = Broker::start(&["--shards", "2"]);
    let port = free_port();

    let recipe = recipe_from_the_doc();
    let recipe = substitute(recipe, "listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"));
    let recipe = substitute(recipe, "/etc/ssl/mbws/fullchain.pem", pair.cert_str());
    let recipe = substitute(recipe, "/etc/ssl/mbws/privkey.pem", pair.key_str());
    let recipe = substitute(recipe, "http://127.0.0.1:7447", &format!("http://{}", broker.addr));
    let d = dir.display();
    // Everything nginx writes goes to the temp directory; one process, in the foreground.
    let config = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{recipe}\n}}\n"
    );
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new(&nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx { child, dir: dir.clone() };
    // Ready once it accepts connections (bounded; an nginx that exits is reported with its log).
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = nginx.child.try_wait().unwrap() {
            panic!("nginx exited ({status}): {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "nginx did not listen on port {port} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let url = format!("wss://localhost:{port}/");
    let options = ClientOptions { timeout: WAIT, ca_file: Some(pair.cert.clone()), ..ClientOptions::default() };
    let mut consumer = Client::connect(&url, options.clone()).expect("a session through nginx");
    consumer.subscribe(1, "behind-nginx", DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    let mut producer = Client::connect(&url, options).expect("a second session through nginx");
    let mut bodies: Vec<Bytes> = (0..300).map(|index| Bytes::from(format!("through nginx {index}"))).collect();
    bodies.push(Bytes::from(vec![7u8; 200_000]));
    let mut last = 0;
    for body in &bodies {
        last = producer.send("behind-nginx", body.clone()).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    for (index, body) in bodies.iter().enumerate() {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {index} did not arrive"));
        assert_eq!(&message.body, body, "message {index}");
        consumer.ack(message.delivery_seq, false).unwrap();
    }
    producer.close().unwrap();
    consumer.close().unwrap();
    // The broker saw the sessions come from nginx, over loopback.
    assert!(broker.wait_for_log("from 127.0.0.1:", WAIT).is_some());
    drop(nginx);
    let _ = std::fs::remove_dir_all(dir);
}
