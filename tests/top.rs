//! `mbws top` against the real broker's admin API: it lists the addresses (with their depth
//! and consumers) and the sessions it sees, refreshes `--count` times into a pipe and exits 0,
//! uses the admin token from MBWS_ADMIN_TOKEN, and names the request and the reason when the
//! admin API refuses it or cannot be reached.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{output_within, Broker};

const TOKEN: &str = "top-test-token-0123456789abcdef";
const RUN_LIMIT: Duration = Duration::from_secs(30);

fn top(admin: &str, token: Option<&str>, extra: &[&str]) -> std::process::Output {
    let mut command = Command::new(common::binaries::workspace_binary("mbws"));
    command.args(["top", "--admin", admin, "--wait", "5"]).args(extra).env_remove("MBWS_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("MBWS_ADMIN_TOKEN", token);
    }
    output_within(&mut command, RUN_LIMIT)
}

#[test]
fn top_lists_addresses_and_sessions_and_refreshes_count_times() {
    let broker = Broker::start(&["--shards", "2", "--admin-token", TOKEN]);
    let admin = broker.admin_addr().to_string();
    let mut producer = broker.client();
    for index in 0..5 {
        let seq = producer.send("top.waiting", format!("message {index}")).unwrap();
        producer.wait_receipt(seq).unwrap();
    }
    let mut consumer = broker.client();
    consumer
        .subscribe(1, "top.consumed", mbws_proto::mbws::DeliveryMode::Anycast, mbws_proto::mbws::AckMode::Client, 10)
        .unwrap();

    let output = top(&admin, Some(TOKEN), &["--count", "2", "--interval", "0.2", "--sort", "depth"]);
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(screen.matches("mbws top - admin").count(), 2, "two refreshes:\n{screen}");
    let waiting = screen.lines().find(|line| line.starts_with("top.waiting")).expect("top.waiting listed");
    let columns: Vec<&str> = waiting.split_whitespace().collect();
    // ADDRESS SHARD ROUTING IN/S OUT/S DEPTH UNACKED CONSUMERS DURABLE
    assert_eq!(columns[5], "5", "depth 5: {waiting}");
    assert_eq!(columns[7], "0", "no consumer: {waiting}");
    let consumed = screen.lines().find(|line| line.starts_with("top.consumed")).expect("top.consumed listed");
    assert_eq!(consumed.split_whitespace().nth(7), Some("1"), "one consumer: {consumed}");
    let sessions = screen.lines().filter(|line| line.contains("127.0.0.1:") && line.contains("binary")).count();
    assert_eq!(sessions, 4, "both sessions, in both refreshes:\n{screen}");
    assert!(screen.contains("sessions 2 (2 attached)"), "{screen}");

    let refused = top(&admin, None, &["--count", "1"]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{message}");
    assert!(
        message.contains("/api/addresses") && message.contains("401") && message.contains("MBWS_ADMIN_TOKEN"),
        "{message}"
    );
    drop(consumer);
}

#[test]
fn top_says_which_admin_listener_it_could_not_reach() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = top(&format!("127.0.0.1:{port}"), None, &["--count", "1"]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")) && message.contains("cannot connect"), "{message}");
}
