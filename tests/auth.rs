//! Authentication and permissions against the real broker (docs/SECURITY.md): users with
//! argon2id password hashes and static tokens from a configuration file, credentials in the
//! OPEN frame (the Rust client, and OPEN frames built by hand from docs/PROTOCOL.md's layout),
//! in the upgrade's Authorization header (Basic, Bearer) and in `?token=` (tungstenite as the
//! WebSocket peer); 4401 refusals that do not tell an unknown user from a wrong password; 4403
//! for each permission rule while the session stays up; anonymous access and the loopback rule;
//! the slow-down of repeated failures; `mbws hash-password`.

mod common;
#[path = "support/mbws_by_hand.rs"]
mod mbws_by_hand;

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{temp_dir, Broker};
use mbws_by_hand::{AckMode, Mode, Reply};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "correct horse";
/// A static token and its SHA-256 (`printf %s "$TOKEN" | sha256sum`).
const TOKEN: &str = "tok-3f9a1c7e5b2d4680";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A configuration file with user alice (send orders and audit.*, but not audit.secret;
/// consume orders and its dead letters), user bob (nothing), and a token that may consume
/// every address; `extra` goes into `[auth]`.
fn config_file(extra: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir("auth-config");
    let hash = mbws_client::hash_password(PASSWORD).unwrap();
    let text = format!(
        "[auth]\n{extra}\n\
         [[auth.user]]\nname = \"alice\"\npassword-hash = \"{hash}\"\nsend = [\"orders\", \"audit.*\"]\n\
         deny-send = [\"audit.secret\"]\nconsume = [\"orders\", \"DLQ.orders\"]\n\n\
         [[auth.user]]\nname = \"bob\"\npassword-hash = \"{hash}\"\n\n\
         [[auth.token]]\nname = \"dashboard\"\nsha256 = \"{}\"\nconsume = [\"*\"]\n",
        sha256_hex(TOKEN)
    );
    let file = dir.join("broker.toml");
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

fn start(extra_auth: &str, flags: &[&str]) -> (Broker, PathBuf) {
    let (dir, file) = config_file(extra_auth);
    let mut args = vec!["--config", file.to_str().unwrap()];
    args.extend_from_slice(flags);
    let broker = Broker::start(&args);
    (broker, dir)
}

fn options(login: &str, passcode: &str) -> mbws_client::ClientOptions {
    mbws_client::ClientOptions {
        timeout: IO_TIMEOUT,
        login: login.into(),
        passcode: passcode.into(),
        ..Default::default()
    }
}

/// The fatal ERROR a refused connection gets: (code, reason).
fn refusal(broker: &Broker, login: &str, passcode: &str) -> (u16, String) {
    match mbws_client::Client::connect(&broker.url(), options(login, passcode)) {
        Err(mbws_client::ClientError::Broker(error)) => {
            assert!(error.fatal, "a refused OPEN is fatal: {error:?}");
            (error.code, String::from_utf8_lossy(&error.reason).into_owned())
        }
        Err(other) => panic!("expected an ERROR from the broker, got {other:?}"),
        Ok(_) => panic!("login {login:?} was accepted"),
    }
}

/// An OPEN with `login` and `passcode`, laid out by hand (docs/PROTOCOL.md 6.2).
fn binary_open_with(login: &str, passcode: &str) -> Vec<u8> {
    let mut out = vec![1, mbws_by_hand::kind::OPEN, 0];
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.push(0); // session-id: empty
    out.push(login.len() as u8);
    out.extend_from_slice(login.as_bytes());
    out.extend_from_slice(&(passcode.len() as u16).to_be_bytes());
    out.extend_from_slice(passcode.as_bytes());
    out
}

/// A tungstenite connection speaking hand-made binary MBWS frames.
struct Peer {
    socket: WebSocket<TcpStream>,
}

impl Peer {
    /// Upgrades at `path` with `headers`, then sends `open`; returns the peer and the answer.
    fn open(broker: &Broker, path: &str, headers: &[(&str, &str)], open: Vec<u8>) -> (Peer, Reply) {
        let stream = TcpStream::connect(broker.addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = format!("ws://{}{path}", broker.addr).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "MBWS.huawei.com".parse().unwrap());
        for (name, value) in headers {
            let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            request.headers_mut().insert(name, value.parse().unwrap());
        }
        let (socket, response) = tungstenite::client(request, stream).expect("upgrade");
        assert_eq!(response.status(), 101);
        let mut peer = Peer { socket };
        peer.send(open);
        let reply = peer.recv();
        (peer, reply)
    }

    fn opened(broker: &Broker, path: &str, headers: &[(&str, &str)], open: Vec<u8>) -> Peer {
        let (peer, reply) = Peer::open(broker, path, headers, open);
        assert!(matches!(reply, Reply::Opened { .. }), "expected OPENED, got {reply:?}");
        peer
    }

    fn send(&mut self, frame: Vec<u8>) {
        self.socket.send(Message::Binary(frame.into())).expect("send");
    }

    fn recv(&mut self) -> Reply {
        loop {
            match self.socket.read().expect("a frame from the broker within the timeout") {
                Message::Binary(payload) => return mbws_by_hand::parse_binary(&payload).unwrap(),
                Message::Close(_) => return Reply::Close,
                _ => continue,
            }
        }
    }

    /// Sends SEND `seq` to `address`; returns the first answer (RECEIPT or ERROR).
    fn send_to(&mut self, seq: u64, address: &str) -> Reply {
        self.send(mbws_by_hand::binary_send(seq, address, b"body"));
        self.recv()
    }

    fn subscribe_to(&mut self, subscription_id: u32, address: &str) -> Reply {
        self.send(mbws_by_hand::binary_subscribe(subscription_id, address, Mode::Anycast, AckMode::Client, 10));
        self.recv()
    }
}

fn assert_forbidden(reply: Reply, address: &str) {
    match reply {
        Reply::Error { code: 4403, fatal: false, reason, .. } => {
            assert!(reason.contains(address) && reason.contains("permissions"), "{reason}")
        }
        other => panic!("expected a non-fatal 4403 for {address}, got {other:?}"),
    }
}

fn assert_refused(reply: Reply) -> String {
    match reply {
        Reply::Error { code: 4401, fatal: true, reason, .. } => reason,
        other => panic!("expected a fatal 4401, got {other:?}"),
    }
}

fn assert_never_logged(broker: &Broker, secrets: &[&str]) {
    for line in broker.log_lines() {
        for secret in secrets {
            assert!(!line.contains(secret), "the log shows a secret: {line}");
        }
    }
}

#[test]
fn a_password_in_open_is_checked_and_a_wrong_password_and_an_unknown_user_are_refused_alike() {
    let (broker, dir) = start("", &[]);
    let mut alice = mbws_client::Client::connect(&broker.url(), options("alice", PASSWORD)).expect("alice opens");
    let seq = alice.send("orders", "first").unwrap();
    alice.wait_receipt(seq).unwrap();
    let (code, wrong_password) = refusal(&broker, "alice", "battery staple");
    assert_eq!(code, 4401);
    let (code, unknown_user) = refusal(&broker, "mallory", PASSWORD);
    assert_eq!(code, 4401);
    assert_eq!(wrong_password, unknown_user, "the reason does not tell whether the user exists");
    assert!(!wrong_password.contains("alice") && !unknown_user.contains("mallory"), "{wrong_password}");
    // The text binding carries the same fields.
    let text_options =
        mbws_client::ClientOptions { binding: mbws_proto::mbws::Binding::Text, ..options("alice", PASSWORD) };
    mbws_client::Client::connect(&broker.url(), text_options).expect("alice opens in the text binding");
    assert_never_logged(&broker, &[PASSWORD, "battery staple"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn basic_and_bearer_headers_the_query_token_and_a_token_in_open_are_accepted_and_wrong_ones_refused() {
    let (broker, dir) = start("", &[]);
    let no_credentials = binary_open_with("", "");
    let basic = format!("Basic {}", mbws_proto::ws::handshake::base64_encode(format!("alice:{PASSWORD}").as_bytes()));
    Peer::opened(&broker, "/", &[("Authorization", &basic)], no_credentials.clone());
    let bearer = format!("Bearer {TOKEN}");
    Peer::opened(&broker, "/", &[("Authorization", &bearer)], no_credentials.clone());
    Peer::opened(&broker, &format!("/?token={TOKEN}"), &[], no_credentials.clone());
    // A token in OPEN: an empty login and the token as passcode.
    Peer::opened(&broker, "/", &[], binary_open_with("", TOKEN));

    let wrong_basic = format!("Basic {}", mbws_proto::ws::handshake::base64_encode(b"alice:nope"));
    let refused = [
        Peer::open(&broker, "/", &[("Authorization", &wrong_basic)], no_credentials.clone()).1,
        Peer::open(&broker, "/", &[("Authorization", "Bearer not-the-token")], no_credentials.clone()).1,
        Peer::open(&broker, "/?token=not-the-token", &[], no_credentials.clone()).1,
        Peer::open(&broker, "/", &[], binary_open_with("", "not-the-token")).1,
    ];
    let reasons: Vec<String> = refused.into_iter().map(assert_refused).collect();
    assert!(reasons.iter().all(|reason| *reason == reasons[0]), "one reason for every refusal: {reasons:?}");
    // Credentials in two places are refused rather than one picked.
    let (_, twice) = Peer::open(&broker, &format!("/?token={TOKEN}"), &[], binary_open_with("alice", PASSWORD));
    assert!(assert_refused(twice).contains("one place"));
    assert_never_logged(&broker, &[PASSWORD, TOKEN, "not-the-token", &basic[6..]]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn permissions_allow_deny_wildcard_and_dead_letter_rules_refuse_with_4403_and_the_session_stays_up() {
    let (broker, dir) = start("", &[]);
    let mut alice = Peer::opened(&broker, "/", &[], binary_open_with("alice", PASSWORD));
    assert_eq!(alice.send_to(1, "orders"), Reply::Receipt { seq: 1 }, "allowed by its exact name");
    assert_forbidden(alice.send_to(2, "invoices"), "invoices");
    assert_eq!(alice.recv(), Reply::Receipt { seq: 2 }, "the refused SEND is covered by the RECEIPT");
    assert_eq!(alice.send_to(3, "audit.eu"), Reply::Receipt { seq: 3 }, "allowed by the prefix audit.*");
    assert_forbidden(alice.send_to(4, "audit.secret"), "audit.secret");
    assert_eq!(alice.recv(), Reply::Receipt { seq: 4 });
    assert_eq!(alice.subscribe_to(2, "DLQ.orders"), Reply::Subscribed { subscription_id: 2 }, "its dead letters");
    assert_forbidden(alice.subscribe_to(3, "DLQ.invoices"), "DLQ.invoices");
    assert_forbidden(alice.subscribe_to(4, "audit.eu"), "audit.eu");
    assert_eq!(alice.subscribe_to(1, "orders"), Reply::Subscribed { subscription_id: 1 });
    // The session is still up: the message sent to orders arrives.
    match alice.recv() {
        Reply::Message { address, body, .. } => assert_eq!((address.as_str(), &body[..]), ("orders", &b"body"[..])),
        other => panic!("expected the message on orders, got {other:?}"),
    }
    // Bob has no permission at all; the token may consume everything (the wildcard), send nothing.
    let mut bob = Peer::opened(&broker, "/", &[], binary_open_with("bob", PASSWORD));
    assert_forbidden(bob.subscribe_to(1, "orders"), "orders");
    let mut dashboard = Peer::opened(&broker, "/", &[], binary_open_with("", TOKEN));
    assert_eq!(dashboard.subscribe_to(1, "anything.at.all"), Reply::Subscribed { subscription_id: 1 });
    assert_eq!(dashboard.subscribe_to(2, "DLQ.invoices"), Reply::Subscribed { subscription_id: 2 });
    assert_forbidden(dashboard.send_to(1, "orders"), "orders");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn anonymous_sessions_are_refused_once_users_exist_unless_allowed() {
    let (closed, dir) = start("", &[]);
    let (_, anonymous) = Peer::open(&closed, "/", &[], binary_open_with("", ""));
    assert!(assert_refused(anonymous).contains("anonymous"));
    let (open, dir2) = start("", &["--allow-anonymous"]);
    let mut anonymous = Peer::opened(&open, "/", &[], binary_open_with("", ""));
    assert_eq!(anonymous.send_to(1, "orders"), Reply::Receipt { seq: 1 });
    let (limited, dir3) = start("[auth.anonymous]\nconsume = [\"public.*\"]\n", &["--allow-anonymous"]);
    let mut anonymous = Peer::opened(&limited, "/", &[], binary_open_with("", ""));
    assert_forbidden(anonymous.send_to(1, "orders"), "orders");
    for dir in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn beyond_loopback_anonymous_access_needs_allow_anonymous_remote() {
    let dir = temp_dir("auth-remote");
    let (status, log) = Broker::try_start_in(&dir, &["--listen", "0.0.0.0:0"]).err().expect("a refusal to start");
    assert_eq!(status.code(), Some(2), "{log:?}");
    let said = log.join("\n");
    assert!(said.contains("beyond loopback") && said.contains("--allow-anonymous-remote"), "{said}");
    let broker = Broker::start_in(&dir, &["--listen", "0.0.0.0:0", "--allow-anonymous-remote"]);
    let warning = broker.wait_for_log("anonymous sessions allowed", IO_TIMEOUT).expect("a warning at start");
    assert!(warning.contains("WARN"), "{warning}");
    drop(broker);
    // With users, anonymous access is off by default, so listening beyond loopback is fine.
    let (_, file) = config_file("");
    Broker::start_in(&dir, &["--listen", "0.0.0.0:0", "--config", file.to_str().unwrap()]);
    // The README's one-command start (loopback, nothing configured) lets anonymous sessions in,
    // and, having no user or token to check them against, takes any credentials as anonymous.
    let loopback = Broker::start_in(&dir, &[]);
    let mut client = loopback.client();
    let seq = client.send("readme", "hello").unwrap();
    client.wait_receipt(seq).unwrap();
    mbws_client::Client::connect(&loopback.url(), options("someone", "anything")).expect("taken as anonymous");
    Peer::opened(&loopback, "/?token=t", &[], binary_open_with("someone", "anything"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn repeated_failures_from_one_address_are_slowed_down() {
    let (broker, dir) = start("", &["--shards", "1"]);
    let refusal_time = |broker: &Broker| {
        let started = Instant::now();
        assert_refused(Peer::open(broker, "/", &[], binary_open_with("", "wrong-token")).1);
        started.elapsed()
    };
    let first = refusal_time(&broker);
    refusal_time(&broker);
    refusal_time(&broker);
    // After three failures the fourth check waits 500 ms (250 ms, doubling from the third).
    let fourth = refusal_time(&broker);
    assert!(fourth >= Duration::from_millis(450), "the fourth refusal took {fourth:?} (the first {first:?})");
    // A success forgets the failures.
    Peer::opened(&broker, "/", &[], binary_open_with("", TOKEN));
    let after_success = refusal_time(&broker);
    assert!(after_success < Duration::from_millis(450), "{after_success:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mbws_hash_password_prints_an_argon2id_hash_that_verifies() {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(common::binaries::workspace_binary("mbws"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret phrase\n").unwrap();
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let Ok(output) = finished.recv_timeout(IO_TIMEOUT) else {
        // SAFETY: kill(2) on the PID of the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("mbws hash-password did not finish within {IO_TIMEOUT:?}");
    };
    let output = output.unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    let hash = printed.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let parsed = PasswordHash::new(hash).unwrap();
    assert!(argon2::Argon2::default().verify_password(b"s3cret phrase", &parsed).is_ok());
    assert!(argon2::Argon2::default().verify_password(b"s3cret phrase\n", &parsed).is_err(), "newline removed");
    // Two hashes of one password differ (a fresh salt each time).
    let again = mbws_client::hash_password("s3cret phrase").unwrap();
    assert_ne!(again, hash);
}

/// A thread's CPU list, nice value and scheduling policy, from /proc/PID/task/TID/{status,stat}.
fn thread_placement(pid: u32, tid: &str) -> (String, i64, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let cpus = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in status")
        .trim()
        .to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the parenthesised name: state is field 3, nice field 19, policy field 41.
    let after_name: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (cpus, after_name[16].parse().unwrap(), after_name[38].parse().unwrap())
}

/// Password checks run on threads that may use every CPU of the process at the lowest priority,
/// not on the core of the shard that happened to start them (a thread inherits its creator's
/// pinning): a storm of logins must not take a shard's own core from its other clients.
#[test]
fn password_checks_run_beside_the_shards_not_on_a_shards_core() {
    let (dir, file) = config_file("");
    let data = temp_dir("auth-placement");
    // Pinned, unlike the other tests' brokers: one shard on one core.
    let mut command = std::process::Command::new(common::binaries::broker_binary());
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "off", "--shards", "1", "--log-level", "debug"])
        .args(["--config", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let broker = Broker::try_spawn(command).unwrap_or_else(|(status, log)| panic!("exited {status}: {log:#?}"));
    // The check runs at the lowest priority: on a machine busy with other work it may take up
    // to the broker's own bound (VERIFY_TIMEOUT, 10 s), after which the broker answers 4429,
    // retry later. The client waits longer than that, so that the broker's answer comes first.
    let patient =
        mbws_client::ClientOptions { timeout: Duration::from_secs(10) + IO_TIMEOUT, ..options("alice", PASSWORD) };
    let mut attempts = 0;
    let _alice = loop {
        attempts += 1;
        match mbws_client::Client::connect(&broker.url(), patient.clone()) {
            Err(mbws_client::ClientError::Broker(error)) if error.code == 4429 && attempts < 3 => continue,
            opened => break opened.expect("alice opens"),
        }
    };
    let pid = broker.pid();
    // The main thread's nice value is the process's (the test may run under `nice`).
    let (process_cpus, process_nice, _) = thread_placement(pid, &pid.to_string());
    let verifier_nice = (process_nice + 10).min(19);
    // A verification thread names itself and takes its placement when it first runs, which on
    // a loaded machine may be a while after the first check (done by the other thread): until
    // then it carries its creator's name and placement. Read until both have (bounded); the
    // placement they then have is what is asserted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (shard, verifiers) = loop {
        let mut shard = None;
        let mut verifiers = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid = task.unwrap().file_name().into_string().unwrap();
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            if name.starts_with("mbws-shard-0") {
                shard.get_or_insert_with(Vec::new).push(thread_placement(pid, &tid));
            } else if name.starts_with("mbws-verify-") {
                verifiers.push(thread_placement(pid, &tid));
            }
        }
        // Started: named, and past their first step (the placement, asserted below).
        let started = verifiers.len() == 2
            && verifiers.iter().all(|(_, _, policy)| *policy != 0)
            && shard.as_ref().is_some_and(|shard| shard.len() == 1);
        if started || Instant::now() >= deadline {
            break (shard, verifiers);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let shard = shard.expect("a thread named mbws-shard-0");
    assert_eq!(shard.len(), 1, "one thread named mbws-shard-0 (a verifier not started yet bears its name)");
    let (shard_cpus, shard_nice, shard_policy) = shard[0].clone();
    assert_eq!((shard_nice, shard_policy), (process_nice, 0), "shards run at the process's priority (SCHED_OTHER)");
    assert_eq!(verifiers.len(), 2, "two verification threads once a password was checked");
    for (cpus, nice, policy) in verifiers {
        assert_eq!(cpus, process_cpus, "a verifier may run on every CPU of the process (the shard has {shard_cpus})");
        assert_eq!(
            (nice, policy),
            (verifier_nice, 5),
            "verifiers yield to the shards: nice 10 more than the process's ({process_nice}), SCHED_IDLE"
        );
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(data);
}

// --- JWT (docs/SECURITY.md, "JWT") ----------------------------------------------------------
//
// Tokens are made here with the `openssl` command-line tool (HMAC, RSA and ECDSA signatures),
// independently of the crate the broker verifies them with.

/// The HS256 secret of the JWT tests' brokers.
const JWT_SECRET: &str = "a-shared-secret-of-at-least-32-bytes";

fn base64url(bytes: &[u8]) -> String {
    mbws_proto::ws::handshake::base64_encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

fn openssl(args: &[&str], input: Option<&std::path::Path>) -> Vec<u8> {
    let mut command = std::process::Command::new("openssl");
    command.args(args);
    if let Some(input) = input {
        command.arg(input);
    }
    let output = command.output().expect("run openssl (apt-get install openssl)");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// How a test token is signed.
enum Signer<'a> {
    Hs256(&'a str),
    /// A PEM private key: RSA (RS256) or EC P-256 (ES256).
    Rs256(&'a std::path::Path),
    Es256(&'a std::path::Path),
    /// `alg: none`, no signature.
    None,
}

/// A JWT with `claims`, signed by `signer`.
fn jwt(signer: &Signer<'_>, claims: &str) -> String {
    let alg = match signer {
        Signer::Hs256(_) => "HS256",
        Signer::Rs256(_) => "RS256",
        Signer::Es256(_) => "ES256",
        Signer::None => "none",
    };
    let input = format!(
        "{}.{}",
        base64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes()),
        base64url(claims.as_bytes())
    );
    let dir = temp_dir("jwt-sign");
    let file = dir.join("input");
    std::fs::write(&file, &input).unwrap();
    let signature = match signer {
        Signer::Hs256(secret) => {
            openssl(&["dgst", "-sha256", "-binary", "-mac", "HMAC", "-macopt", &format!("key:{secret}")], Some(&file))
        }
        Signer::Rs256(key) => openssl(&["dgst", "-sha256", "-binary", "-sign", key.to_str().unwrap()], Some(&file)),
        Signer::Es256(key) => {
            let der = openssl(&["dgst", "-sha256", "-binary", "-sign", key.to_str().unwrap()], Some(&file));
            ecdsa_der_to_raw(&der)
        }
        Signer::None => Vec::new(),
    };
    let _ = std::fs::remove_dir_all(dir);
    format!("{input}.{}", base64url(&signature))
}

/// An ECDSA signature as openssl writes it (DER: SEQUENCE of INTEGER r, INTEGER s) to the 64
/// bytes r || s that JWS's ES256 wants (RFC 7518 3.4).
fn ecdsa_der_to_raw(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "a DER SEQUENCE");
    let mut position = 2;
    let mut raw = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[position], 0x02, "a DER INTEGER");
        let length = usize::from(der[position + 1]);
        let integer = &der[position + 2..position + 2 + length];
        let integer = &integer[integer.len().saturating_sub(32)..];
        raw.extend(std::iter::repeat_n(0u8, 32 - integer.len()));
        raw.extend_from_slice(integer);
        position += 2 + length;
    }
    raw
}

/// A private key of `kind` ("RSA" or "EC") and its public key, as PEM files in `dir`.
fn key_pair(dir: &std::path::Path, kind: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{kind}.pem"));
    let public = dir.join(format!("{kind}.pub.pem"));
    let options: &[&str] =
        if kind == "RSA" { &["-pkeyopt", "rsa_keygen_bits:2048"] } else { &["-pkeyopt", "ec_paramgen_curve:P-256"] };
    let mut args = vec!["genpkey", "-algorithm", kind];
    args.extend_from_slice(options);
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    openssl(&args, None);
    openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()], None);
    (private, public)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Claims that may send to `orders.*` and consume `invoices`, expiring `in_secs` from now.
fn claims(in_secs: i64) -> String {
    claims_expiring_at(unix_now() as i64 + in_secs)
}

/// Claims like [`claims`], expiring at `exp` (Unix seconds).
fn claims_expiring_at(exp: i64) -> String {
    format!(r#"{{"sub":"web-user-7","exp":{exp},"mbws":{{"send":["orders.*"],"consume":["invoices"]}}}}"#)
}

/// A consumer whose token expires while it holds an unacknowledged delivery and then says
/// nothing (it neither answers the close frame nor closes its socket: a peer that vanished, or
/// a stuck one) loses the delivery within its token's life and the close grace: the message
/// goes to the next consumer. Before, the broker waited for that peer forever and the message
/// with it (found by the simulator, seed 774 with expiring credentials).
#[test]
fn a_silent_consumer_whose_jwt_expired_gives_its_unacknowledged_delivery_back() {
    let (broker, dir) = start(&format!("[auth.jwt]\nhs256-secret = \"{JWT_SECRET}\"\nleeway-secs = 0\n"), &[]);
    let jobs_claims = |in_secs: i64| {
        let exp = unix_now() as i64 + in_secs;
        format!(r#"{{"sub":"worker","exp":{exp},"mbws":{{"send":["jobs"],"consume":["jobs"]}}}}"#)
    };
    // exp is in whole seconds: 2 s from now is 1 to 2 s away.
    let mut silent =
        Peer::opened(&broker, "/", &[], binary_open_with("", &jwt(&Signer::Hs256(JWT_SECRET), &jobs_claims(2))));
    assert_eq!(silent.subscribe_to(1, "jobs"), Reply::Subscribed { subscription_id: 1 });
    let mut producer =
        Peer::opened(&broker, "/", &[], binary_open_with("", &jwt(&Signer::Hs256(JWT_SECRET), &jobs_claims(600))));
    assert_eq!(producer.send_to(1, "jobs"), Reply::Receipt { seq: 1 });
    assert!(matches!(silent.recv(), Reply::Message { .. }), "the first consumer holds the message");
    let sent_at = Instant::now();
    // From here on `silent` reads nothing and writes nothing; its socket stays open.
    let mut next =
        Peer::opened(&broker, "/", &[], binary_open_with("", &jwt(&Signer::Hs256(JWT_SECRET), &jobs_claims(600))));
    assert_eq!(next.subscribe_to(1, "jobs"), Reply::Subscribed { subscription_id: 1 });
    // Token (at most 2 s) + close grace (2 s) + slack; `recv` itself is bounded by IO_TIMEOUT.
    match next.recv() {
        Reply::Message { body, .. } => assert_eq!(body, b"body"),
        other => panic!("expected the expired consumer's message redelivered, got {other:?}"),
    }
    let waited = sent_at.elapsed();
    assert!(waited < Duration::from_secs(8), "redelivered only after {waited:?}");
    drop(silent);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn jwt_hs256_is_accepted_in_open_in_the_bearer_header_and_in_the_query_and_its_claims_are_enforced() {
    let (broker, dir) = start(&format!("[auth.jwt]\nhs256-secret = \"{JWT_SECRET}\"\n"), &[]);
    let token = jwt(&Signer::Hs256(JWT_SECRET), &claims(600));
    let mut in_open = Peer::opened(&broker, "/", &[], binary_open_with("", &token));
    Peer::opened(&broker, "/", &[("Authorization", &format!("Bearer {token}"))], binary_open_with("", ""));
    let mut in_query = Peer::opened(&broker, &format!("/?token={token}"), &[], binary_open_with("", ""));
    // The claims' permissions: 4403 outside them, and the session stays up.
    assert_eq!(in_open.send_to(1, "orders.eu"), Reply::Receipt { seq: 1 });
    assert_forbidden(in_open.send_to(2, "invoices"), "invoices");
    assert_eq!(in_open.recv(), Reply::Receipt { seq: 2 });
    assert_eq!(in_query.subscribe_to(1, "invoices"), Reply::Subscribed { subscription_id: 1 });
    assert_forbidden(in_query.subscribe_to(2, "orders.eu"), "orders.eu");
    // Static tokens and users keep working beside JWTs.
    Peer::opened(&broker, "/", &[], binary_open_with("", TOKEN));
    assert_never_logged(&broker, &[&token, JWT_SECRET]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn jwt_rs256_and_es256_are_accepted_with_their_public_keys() {
    let keys = temp_dir("jwt-keys");
    for kind in ["RSA", "EC"] {
        let signer_of = |key| if kind == "RSA" { Signer::Rs256(key) } else { Signer::Es256(key) };
        let (private, public) = key_pair(&keys, kind);
        let (broker, dir) = start(&format!("[auth.jwt]\npublic-key-file = \"{}\"\n", public.display()), &[]);
        let token = jwt(&signer_of(&private), &claims(600));
        let mut peer = Peer::opened(&broker, "/", &[], binary_open_with("", &token));
        assert_eq!(peer.send_to(1, "orders.eu"), Reply::Receipt { seq: 1 }, "{kind}");
        // Another key pair of the same kind signs a forgery.
        let other = temp_dir("jwt-other-key");
        let (other_private, _) = key_pair(&other, kind);
        let forged = jwt(&signer_of(&other_private), &claims(600));
        let reason = assert_refused(Peer::open(&broker, "/", &[], binary_open_with("", &forged)).1);
        assert!(reason.contains("signature does not verify"), "{kind}: {reason}");
        for dir in [dir, other] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let _ = std::fs::remove_dir_all(keys);
}

#[test]
fn jwt_expired_forged_unsigned_and_wrong_algorithm_or_issuer_are_refused_with_4401_saying_why() {
    let keys = temp_dir("jwt-keys");
    let (private, public) = key_pair(&keys, "RSA");
    let section = format!(
        "[auth.jwt]\npublic-key-file = \"{}\"\nalgorithms = [\"RS256\"]\nissuer = \"https://auth.example.com\"\n\
         leeway-secs = 0\n",
        public.display()
    );
    let (broker, dir) = start(&section, &[]);
    let with_issuer = |in_secs: i64| claims(in_secs).replacen('{', r#"{"iss":"https://auth.example.com","#, 1);
    let good = jwt(&Signer::Rs256(&private), &with_issuer(600));
    Peer::opened(&broker, "/", &[], binary_open_with("", &good));

    // A payload changed after signing: the signature no longer verifies.
    let (head, rest) = good.split_once('.').unwrap();
    let signature = rest.rsplit_once('.').unwrap().1;
    let widened = with_issuer(600).replace(r#"["orders.*"]"#, r#"["*"]"#);
    let tampered = format!("{head}.{}.{signature}", base64url(widened.as_bytes()));
    // The public key used as an HS256 secret (the algorithm-confusion attack).
    let public_pem = std::fs::read_to_string(&public).unwrap();
    let cases = [
        (jwt(&Signer::Rs256(&private), &with_issuer(-60)), "expired"),
        (tampered, "signature does not verify"),
        (jwt(&Signer::None, &with_issuer(600)), "header"),
        (jwt(&Signer::Hs256(&public_pem), &with_issuer(600)), "does not accept"),
        (jwt(&Signer::Rs256(&private), &claims(600)), "iss"),
    ];
    for (token, says) in &cases {
        let reason = assert_refused(Peer::open(&broker, "/", &[], binary_open_with("", token)).1);
        assert!(reason.contains("JWT") && reason.contains(says), "{says}: {reason}");
        let (_, signature) = token.rsplit_once('.').unwrap();
        assert!(signature.is_empty() || !reason.contains(signature), "the reason quotes the token: {reason}");
        // In the query string too.
        let reason = assert_refused(Peer::open(&broker, &format!("/?token={token}"), &[], binary_open_with("", "")).1);
        assert!(reason.contains(says), "{says}: {reason}");
    }
    let tokens: Vec<&str> = cases.iter().map(|(token, _)| token.as_str()).collect();
    assert_never_logged(&broker, &tokens);
    for dir in [dir, keys] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_jwt_that_expires_during_the_session_ends_it_with_4401_token_expired() {
    let (broker, dir) = start(&format!("[auth.jwt]\nhs256-secret = \"{JWT_SECRET}\"\nleeway-secs = 0\n"), &[]);
    // exp is in whole seconds: 3 s from now is 2 to 3 s away, time enough to sign the token
    // (with openssl) and open before it expires, on a loaded machine too.
    let exp = unix_now() as i64 + 3;
    let token = jwt(&Signer::Hs256(JWT_SECRET), &claims_expiring_at(exp));
    let mut peer = Peer::opened(&broker, "/", &[], binary_open_with("", &token));
    assert_eq!(peer.send_to(1, "orders.eu"), Reply::Receipt { seq: 1 }, "valid until its exp");
    // The broker ends the session on its own: the next frame is the fatal ERROR (the read is
    // bounded by IO_TIMEOUT).
    match peer.recv() {
        Reply::Error { code: 4401, fatal: true, reason, .. } => assert!(reason.contains("token expired"), "{reason}"),
        other => panic!("expected fatal 4401 when the token expired, got {other:?}"),
    }
    // Measured against the exp itself (the same wall clock as the broker's), not against a
    // moment of the test's: signing and opening take a varying part of the token's life.
    let ended_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let after_exp_ms = ended_at_ms - exp * 1000;
    // 100 ms: the broker turns the exp into a time on its monotonic clock (two clock reads).
    assert!(
        (-100..3000).contains(&after_exp_ms),
        "ended {after_exp_ms} ms after the token's exp: it must end at its exp, not before, and promptly"
    );
    match peer.socket.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 4401),
        other => panic!("expected close 4401, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}
