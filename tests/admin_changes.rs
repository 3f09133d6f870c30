//! What the admin API changes, against the real broker binary over real sockets: declared
//! addresses whose settings the owner shard honours (a queue bound, multicast routing), their
//! deletion with and without `?force=true`, message rates, users put and deleted (a client logs
//! in with them; live sessions follow the documented rule), persistence across a restart in the
//! same data directory, the SIGHUP reload of the configuration file's users, and CORS for the
//! web console.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{temp_dir, Broker};
use mbws::mbws::{AckMode, DeliveryMode, Frame};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// An HTTP answer: status, headers (names lower-cased), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(field, _)| field == name).map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error in {}", self.body)).to_string()
    }
}

/// One HTTP/1.1 request to the admin API with `extra` header lines and `body` (bounded in time).
fn http(admin: SocketAddr, method: &str, path: &str, extra: &[&str], body: &str) -> Answer {
    let mut stream = TcpStream::connect_timeout(&admin, WAIT).expect("connect to the admin API");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer, then the close");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    Answer { status, headers, body: body.to_string() }
}

fn get(admin: SocketAddr, path: &str) -> Answer {
    http(admin, "GET", path, &[], "")
}

fn put(admin: SocketAddr, path: &str, body: Value) -> Answer {
    http(admin, "PUT", path, &[], &body.to_string())
}

fn delete(admin: SocketAddr, path: &str) -> Answer {
    http(admin, "DELETE", path, &[], "")
}

/// A password login. The client waits longer than the broker's own bound on a password check
/// (`auth::verifier::VERIFY_TIMEOUT`, 10 s), so that the broker's answer always comes first:
/// on a loaded machine the check (argon2, at the lowest priority) may take that long, and the
/// broker then says 4429, retry later, which this does a few times. (With equal bounds, the
/// client gave up first now and then, before any answer.)
fn login(broker: &Broker, user: &str, password: &str) -> Result<mbws_client::Client, mbws_client::ClientError> {
    const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
    let options = mbws_client::ClientOptions {
        timeout: VERIFY_TIMEOUT + WAIT,
        login: user.into(),
        passcode: password.into(),
        ..Default::default()
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        match mbws_client::Client::connect(&broker.url(), options.clone()) {
            Err(mbws_client::ClientError::Broker(error)) if error.code == 4429 && attempts < 3 => continue,
            answer => return answer,
        }
    }
}

/// The code of the fatal ERROR that refuses `user`'s login.
fn refused_login(broker: &Broker, user: &str, password: &str) -> u16 {
    match login(broker, user, password) {
        Err(mbws_client::ClientError::Broker(error)) => {
            assert!(error.fatal, "{error:?}");
            error.code
        }
        Err(other) => panic!("expected an ERROR, got {other:?}"),
        Ok(_) => panic!("{user} logged in: {:#?}", broker.log_lines()),
    }
}

/// The names in a `GET /api/users` answer.
fn user_names(users: &Value) -> Vec<String> {
    users["users"].as_array().unwrap().iter().map(|user| user["name"].as_str().unwrap().to_string()).collect()
}

/// Sends and waits for the answer: Ok, or the ERROR's code.
fn send(client: &mut mbws_client::Client, address: &str, body: &str) -> Result<(), u16> {
    let seq = client.send(address, body.to_string()).unwrap();
    match client.wait_receipt(seq) {
        Ok(()) => Ok(()),
        Err(mbws_client::ClientError::Broker(error)) => Err(error.code),
        Err(other) => panic!("SEND to {address}: {other:?}"),
    }
}

/// The next ERROR frame `client` gets (bounded).
fn next_error(client: &mut mbws_client::Client) -> mbws::mbws::ErrorFrame {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_frame(left) {
            Ok(Frame::Error(error)) => return error,
            Ok(_) => {}
            Err(mbws_client::ClientError::Broker(error)) => return error,
            Err(other) => panic!("expected an ERROR, got {other:?}"),
        }
    }
}

#[test]
fn a_declared_queue_bound_refuses_the_fourth_send_with_4429_and_multicast_routing_queues_nothing() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let declared = put(admin, "/api/addresses/small", json!({ "max-queued-messages": 3 }));
    assert_eq!(declared.status, 201, "{}", declared.body);
    assert_eq!(declared.json()["settings"]["max-queued-messages"], 3);
    // A declared address exists while idle, with its settings; PUT again changes it (200).
    let small = get(admin, "/api/addresses/small").json();
    assert_eq!((small["depth"].as_u64(), small["declared"]["max-queued-messages"].as_u64()), (Some(0), Some(3)));
    let again = put(admin, "/api/addresses/small", json!({ "max-queued-messages": 3, "max-deliveries": 2 }));
    assert_eq!((again.status, again.json()["created"].as_bool()), (200, Some(false)), "{}", again.body);

    let mut producer = broker.client();
    for index in 0..3 {
        send(&mut producer, "small", &format!("{index}")).unwrap();
    }
    assert_eq!(send(&mut producer, "small", "fourth"), Err(4429), "the declared bound, not the broker's 100000");
    assert_eq!(get(admin, "/api/addresses/small").json()["depth"], 3);

    // Multicast routing: with nobody subscribed a message is accepted and not queued.
    let news = put(admin, "/api/addresses/news", json!({ "routing": "multicast" }));
    assert_eq!(news.status, 201, "{}", news.body);
    send(&mut producer, "news", "nobody hears this").unwrap();
    send(&mut producer, "plain", "this one waits").unwrap();
    let news = get(admin, "/api/addresses/news").json();
    assert_eq!((news["depth"].as_u64(), news["routing"].as_str()), (Some(0), Some("multicast")));
    assert_eq!(get(admin, "/api/addresses/plain").json()["depth"], 1, "an undeclared address queues");
    let mut listener = broker.client();
    listener.subscribe(1, "news", DeliveryMode::Multicast, AckMode::Auto, 10).unwrap();
    send(&mut producer, "news", "heard").unwrap();
    let message = listener.next_message(WAIT).unwrap().expect("a delivery");
    assert_eq!(message.body.as_ref(), b"heard", "the message sent before the subscription was not kept");
}

#[test]
fn a_bad_declaration_is_refused_with_the_field_the_value_and_the_limit() {
    let broker = Broker::start(&["--shards", "1"]);
    let admin = broker.admin_addr();
    let cases = [
        (json!({ "max-queued-messages": 0 }), "max-queued-messages = 0"),
        (json!({ "max-queued-messages": 0 }), "1..=100000000"),
        (json!({ "max-queued-bytes": 10 }), "max-queued-bytes = 10"),
        (json!({ "max-deliveries": -1 }), "max-deliveries = -1"),
        (json!({ "routing": "broadcast" }), "routing = \"broadcast\""),
        (json!({ "durable": "yes" }), "durable = \"yes\""),
        (json!({ "max-queue": 5 }), "unknown setting \"max-queue\""),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, expected) in cases {
        let answer = put(admin, "/api/addresses/x", body.clone());
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert!(answer.error().contains(expected), "{body}: {}", answer.error());
    }
    assert!(http(admin, "PUT", "/api/addresses/x", &[], "{").error().contains("not JSON"));
    assert_eq!(get(admin, "/api/addresses/x").status, 404, "nothing was declared");
    let long = "a".repeat(256);
    assert_eq!(put(admin, &format!("/api/addresses/{long}"), json!({})).status, 400);
    assert_eq!(http(admin, "PATCH", "/api/addresses/x", &[], "").status, 405);
    let too_big = "x".repeat(70_000);
    assert_eq!(http(admin, "PUT", "/api/addresses/x", &[], &too_big).status, 413);
}

#[test]
fn deleting_an_address_with_consumers_needs_force_which_ends_their_subscriptions() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    assert_eq!(put(admin, "/api/addresses/jobs", json!({ "durable": true })).status, 201);
    let mut producer = broker.client();
    for index in 0..3 {
        send(&mut producer, "jobs", &format!("job {index}")).unwrap();
    }
    let mut worker = broker.client();
    worker.subscribe(7, "jobs", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    worker.next_message(WAIT).unwrap().expect("one delivery");

    let refused = delete(admin, "/api/addresses/jobs");
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.error().contains("?force=true"), "{}", refused.error());
    assert_eq!(delete(admin, "/api/addresses/jobs?force=maybe").status, 400);
    let forced = delete(admin, "/api/addresses/jobs?force=true");
    assert_eq!(forced.status, 200, "{}", forced.body);
    let forced = forced.json();
    assert_eq!((forced["dropped_messages"].as_u64(), forced["ended_subscriptions"].as_u64()), (Some(2), Some(1)));
    let ended = next_error(&mut worker);
    assert_eq!((ended.code, ended.fatal, ended.subscription_id), (4405, false, 7), "{ended:?}");
    assert_eq!(get(admin, "/api/addresses/jobs").status, 404);
    assert_eq!(delete(admin, "/api/addresses/jobs").status, 404);

    // Without consumers, a DELETE drops what waits; the worker's session lives on.
    send(&mut producer, "scratch", "a").unwrap();
    send(&mut producer, "scratch", "b").unwrap();
    let deleted = delete(admin, "/api/addresses/scratch");
    assert_eq!((deleted.status, deleted.json()["dropped_messages"].as_u64()), (200, Some(2)), "{}", deleted.body);
    send(&mut worker, "scratch", "still here").unwrap();
}

#[test]
fn address_rates_count_the_messages_in_and_out_over_the_window() {
    let broker = Broker::start(&["--shards", "2"]);
    let admin = broker.admin_addr();
    let mut producer = broker.client();
    let mut consumer = broker.client();
    consumer.subscribe(1, "rated", DeliveryMode::Anycast, AckMode::Auto, 100).unwrap();
    let first = get(admin, "/api/addresses").json();
    let rated = first["addresses"].as_array().unwrap().iter().find(|a| a["name"] == "rated").cloned().unwrap();
    assert!(rated["rates"].is_null(), "no earlier list, no rate: {rated}");
    for index in 0..20 {
        send(&mut producer, "rated", &format!("{index}")).unwrap();
    }
    for _ in 0..20 {
        consumer.next_message(WAIT).unwrap().expect("a delivery");
    }
    // A rate needs a window of at least 250 ms after the first list (rates::MIN_WINDOW).
    std::thread::sleep(Duration::from_millis(300));
    let second = get(admin, "/api/addresses").json();
    let rated = second["addresses"].as_array().unwrap().iter().find(|a| a["name"] == "rated").cloned().unwrap();
    assert_eq!((rated["messages_in"].as_u64(), rated["messages_out"].as_u64()), (Some(20), Some(20)), "{rated}");
    let window = rated["rates"]["window_seconds"].as_f64().expect("a window");
    let in_rate = rated["rates"]["in_per_second"].as_f64().unwrap();
    let out_rate = rated["rates"]["out_per_second"].as_f64().unwrap();
    assert_eq!(((in_rate * window).round(), (out_rate * window).round()), (20.0, 20.0), "{rated}");
}

/// A configuration file with `users` (name, password), each allowed to send to and consume
/// from every address; anonymous sessions are refused (the default with users).
fn config_with_users(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from("[auth]\n");
    for (name, password) in users {
        let hash = mbws_client::hash_password(password).unwrap();
        text.push_str(&format!(
            "\n[[auth.user]]\nname = \"{name}\"\npassword-hash = \"{hash}\"\nsend = [\"*\"]\nconsume = [\"*\"]\n"
        ));
    }
    let file = dir.join("broker.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn a_user_put_through_the_api_logs_in_its_permissions_follow_and_its_deletion_closes_its_session() {
    // A broker that checks credentials (it has a user of its own, so anonymous sessions are
    // refused): on a broker with no user and no token at all, credentials are not checked.
    let dir = temp_dir("admin-changes-users");
    let file = config_with_users(&dir, &[("frank", "pw-frank")]);
    let broker = Broker::start(&["--shards", "2", "--config", file.to_str().unwrap()]);
    let admin = broker.admin_addr();
    let created = put(admin, "/api/users/dave", json!({ "password": "pw-dave", "send": ["a"], "consume": ["a"] }));
    assert_eq!(created.status, 201, "{}", created.body);
    let listed = get(admin, "/api/users");
    assert!(!listed.body.contains("argon2") && !listed.body.contains("pw-dave"), "no secret: {}", listed.body);
    assert_eq!(user_names(&listed.json()), ["dave", "frank"]);
    assert_eq!(get(admin, "/api/users/dave").json()["send"], json!(["a"]));
    assert_eq!(get(admin, "/api/users/nobody").status, 404);
    assert_eq!(refused_login(&broker, "dave", "wrong"), 4401);

    let mut dave = login(&broker, "dave", "pw-dave").expect("dave logs in");
    assert_eq!(get(admin, "/api/sessions").json()["sessions"][0]["user"], "dave");
    send(&mut dave, "a", "allowed").unwrap();
    assert_eq!(send(&mut dave, "b", "not yet"), Err(4403));
    // New permissions without a new password: the live session has them at its next SEND.
    let changed = put(admin, "/api/users/dave", json!({ "send": ["a", "b"] }));
    assert_eq!((changed.status, changed.json()["sessions_updated"].as_u64()), (200, Some(1)), "{}", changed.body);
    send(&mut dave, "b", "allowed now").unwrap();

    let bad = put(admin, "/api/users/eve", json!({ "send": ["a*b"] }));
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(put(admin, "/api/users/eve", json!({ "password-hash": "plain" })).error().contains("PHC"));
    assert!(put(admin, "/api/users/eve", json!({ "send": ["a"] })).error().contains("needs a password"));

    let deleted = delete(admin, "/api/users/dave");
    assert_eq!((deleted.status, deleted.json()["sessions_closed"].as_u64()), (200, Some(1)), "{}", deleted.body);
    let closed = next_error(&mut dave);
    assert_eq!((closed.code, closed.fatal), (4401, true), "{closed:?}");
    assert_eq!(refused_login(&broker, "dave", "pw-dave"), 4401);
    assert_eq!(delete(admin, "/api/users/dave").status, 404);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn api_changes_survive_a_restart_in_the_same_data_directory() {
    let dir = temp_dir("admin-changes-restart");
    let file = config_with_users(&dir, &[("frank", "pw-frank")]);
    let flags = ["--shards", "2", "--config", file.to_str().unwrap()];
    let mut broker = Broker::start_in(&dir.join("data"), &flags);
    let admin = broker.admin_addr();
    assert_eq!(put(admin, "/api/addresses/small", json!({ "max-queued-messages": 3 })).status, 201);
    assert_eq!(put(admin, "/api/users/gina", json!({ "password": "pw-gina", "send": ["*"] })).status, 201);
    assert_eq!(delete(admin, "/api/users/frank").status, 200, "a file user deleted through the API");
    assert_eq!(put(admin, "/api/addresses/gone", json!({})).status, 201);
    assert_eq!(delete(admin, "/api/addresses/gone").status, 200);
    broker.kill();

    let broker = Broker::start_in(&dir.join("data"), &flags);
    let admin = broker.admin_addr();
    let small = get(admin, "/api/addresses/small");
    assert_eq!(small.status, 200, "{}", small.body);
    assert_eq!(small.json()["declared"]["max-queued-messages"], 3);
    assert_eq!(get(admin, "/api/addresses/gone").status, 404, "a deleted declaration stays deleted");
    let mut gina = login(&broker, "gina", "pw-gina").expect("gina, put before the restart, logs in");
    for index in 0..3 {
        send(&mut gina, "small", &format!("{index}")).unwrap();
    }
    assert_eq!(send(&mut gina, "small", "fourth"), Err(4429), "the declared bound is back");
    assert_eq!(refused_login(&broker, "frank", "pw-frank"), 4401, "frank stays deleted");
    let users = get(admin, "/api/users").json();
    assert_eq!(user_names(&users), ["gina"]);
    assert_eq!(users["users"][0]["source"], "api");
    drop(gina);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sighup_reloads_the_users_of_the_configuration_file_and_logs_their_names_only() {
    let dir = temp_dir("admin-changes-sighup");
    let file = config_with_users(&dir, &[("alice", "pw-alice"), ("carol", "pw-carol")]);
    let broker = Broker::start(&["--shards", "2", "--config", file.to_str().unwrap()]);
    let mut alice = login(&broker, "alice", "pw-alice").expect("alice logs in");
    config_with_users(&dir, &[("bob", "pw-bob"), ("carol", "pw-carol-2")]);
    // SAFETY: kill(2) on the PID of the broker this test started.
    unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGHUP) };
    let line = broker.wait_for_log("reloaded the users and tokens", WAIT).expect("the reload is logged");
    assert!(line.contains("users_added=bob "), "{line}");
    assert!(line.contains("users_removed=alice "), "{line}");
    assert!(line.contains("users_changed=carol "), "{line}");
    assert!(!line.contains("argon2") && !line.contains("pw-"), "no secret in the log: {line}");
    let closed = next_error(&mut alice);
    assert_eq!((closed.code, closed.fatal), (4401, true), "{closed:?}");
    assert_eq!(refused_login(&broker, "alice", "pw-alice"), 4401);
    login(&broker, "bob", "pw-bob").expect("bob, added by the reload, logs in");
    login(&broker, "carol", "pw-carol-2").expect("carol's new password");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_console_origin_may_call_the_admin_api_and_others_may_not() {
    let broker = Broker::start(&["--shards", "1", "--allowed-origin", "https://ops.example.com"]);
    let admin = broker.admin_addr();
    let own = format!("Origin: http://{}", broker.addr);
    let preflight = http(
        admin,
        "OPTIONS",
        "/api/addresses",
        &[&own, "Access-Control-Request-Method: GET", "Access-Control-Request-Headers: authorization"],
        "",
    );
    assert_eq!(preflight.status, 204, "{}", preflight.body);
    assert_eq!(preflight.header("access-control-allow-origin"), Some(&own["Origin: ".len()..]));
    assert!(preflight.header("access-control-allow-headers").unwrap().contains("Authorization"));
    let listed = http(admin, "GET", "/api/addresses", &[&own], "");
    assert_eq!(listed.header("access-control-allow-origin"), Some(&own["Origin: ".len()..]));
    let configured = http(admin, "GET", "/api/addresses", &["Origin: https://ops.example.com"], "");
    assert_eq!(configured.header("access-control-allow-origin"), Some("https://ops.example.com"));
    let foreign = http(admin, "OPTIONS", "/api/addresses", &["Origin: https://evil.example"], "");
    assert_eq!(foreign.status, 403);
    let foreign = http(admin, "GET", "/api/addresses", &["Origin: https://evil.example"], "");
    assert_eq!(foreign.header("access-control-allow-origin"), None);
}
