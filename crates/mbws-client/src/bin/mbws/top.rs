//! `mbws top`: a live view of a broker through its admin API, in the spirit of `nats top`.
//!
//! Every refresh reads `GET /api/addresses` and `GET /api/sessions` (docs/OPERATIONS.md) over a
//! fresh HTTP/1.1 connection, computes each address's message rates from the change of its
//! `messages_in` / `messages_out` counters since the previous refresh (the broker's own `rates`
//! before there is one), and prints one screen: the totals, the busiest addresses, the sessions.
//! On a terminal the screen is redrawn in place; into a pipe or file each refresh is appended,
//! separated by a blank line, so `mbws top --count 1` is a one-shot report a script can read.
//!
//! Bounds: one answer is read up to [`MAX_ANSWER_BYTES`]; a refresh waits at most the `--wait`
//! of every `mbws` command for the broker; the view lists at most `--rows` of each kind.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Largest admin API answer `top` reads (a list of 1,000 addresses is about 400 KiB).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Entries asked of each list per refresh (the admin API's `?limit=`).
const LIST_LIMIT: usize = 1_000;

/// How the addresses are ordered.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Messages in and out per second.
    Rate,
    /// Messages waiting.
    Depth,
    /// Subscribers.
    Consumers,
    /// Name.
    Name,
}

/// What `top` was asked to show.
pub struct TopOptions {
    /// The admin listener, `HOST:PORT`.
    pub admin: String,
    pub token: Option<String>,
    pub interval: Duration,
    /// Refreshes before exiting (0: until interrupted).
    pub count: u64,
    pub rows: usize,
    pub sort: SortKey,
    pub wait: Duration,
}

/// One reading of the admin API.
struct Sample {
    at: Instant,
    addresses: Value,
    sessions: Value,
}

/// Runs the view; `Err` is a message for standard error (exit 1).
pub fn run(options: &TopOptions, stopping: impl Fn() -> bool) -> Result<(), String> {
    let addr = resolve(&options.admin)?;
    let redraw = std::io::stdout().is_terminal();
    let mut previous: Option<Sample> = None;
    let mut refreshes = 0;
    loop {
        let sample = Sample {
            at: Instant::now(),
            addresses: get_json(addr, &options.admin, "/api/addresses", options)?,
            sessions: get_json(addr, &options.admin, "/api/sessions", options)?,
        };
        let screen = render(options, previous.as_ref(), &sample, &clock_time());
        let mut out = std::io::stdout().lock();
        let written = if redraw {
            // Home, the screen with each line cleared to its end, then clear whatever the
            // previous (longer) screen left below.
            write!(out, "\x1b[H{}\x1b[J", screen.replace('\n', "\x1b[K\n"))
        } else {
            writeln!(out, "{screen}")
        };
        // A closed output (`mbws top | head`) ends the view.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        drop(out);
        previous = Some(sample);
        refreshes += 1;
        if options.count != 0 && refreshes >= options.count {
            return Ok(());
        }
        let due = Instant::now() + options.interval;
        while Instant::now() < due {
            if stopping() {
                return Ok(());
            }
            std::thread::sleep(due.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
        }
    }
}

fn resolve(admin: &str) -> Result<SocketAddr, String> {
    let with_port = if admin.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        admin.to_string()
    } else {
        format!("{admin}:7448")
    };
    with_port
        .to_socket_addrs()
        .map_err(|error| format!("--admin {admin}: cannot resolve it: {error}"))?
        .next()
        .ok_or_else(|| format!("--admin {admin}: no address"))
}

/// `GET path` on the admin listener; the JSON body of a 200, else the API's error message.
fn get_json(addr: SocketAddr, admin: &str, path: &str, options: &TopOptions) -> Result<Value, String> {
    let target = format!("{path}?limit={LIST_LIMIT}");
    let failed = |what: String| format!("GET http://{admin}{path}: {what}");
    let mut stream = TcpStream::connect_timeout(&addr, options.wait)
        .map_err(|error| failed(format!("cannot connect: {error} (is the broker's --admin-listen here?)")))?;
    stream.set_read_timeout(Some(options.wait)).and_then(|()| stream.set_write_timeout(Some(options.wait))).ok();
    let authorization = options.token.as_ref().map(|token| format!("Authorization: Bearer {token}\r\n"));
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {admin}\r\n{}Accept: application/json\r\nConnection: close\r\n\r\n",
        authorization.unwrap_or_default()
    );
    stream.write_all(request.as_bytes()).map_err(|error| failed(format!("cannot send the request: {error}")))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES as u64 + 1)
        .read_to_end(&mut answer)
        .map_err(|error| failed(format!("cannot read the answer: {error}")))?;
    if answer.len() > MAX_ANSWER_BYTES {
        return Err(failed(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
    }
    let (status, body) = split_response(&answer).ok_or_else(|| failed("the answer is not HTTP".into()))?;
    let json: Value = serde_json::from_slice(body).map_err(|error| failed(format!("the body is not JSON: {error}")))?;
    match status {
        200 => Ok(json),
        401 => Err(failed("401: the admin API wants a token (--admin-token or MBWS_ADMIN_TOKEN)".into())),
        _ => Err(failed(format!("{status}: {}", json["error"].as_str().unwrap_or("(no message)")))),
    }
}

/// The status code and body of a whole HTTP/1.1 response read until the connection closed.
fn split_response(answer: &[u8]) -> Option<(u16, &[u8])> {
    let end = answer.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, &answer[end + 4..]))
}

fn clock_time() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let of_day = seconds % 86_400;
    format!("{:02}:{:02}:{:02} UTC", of_day / 3600, of_day / 60 % 60, of_day % 60)
}

/// One address's row, with its rates.
struct AddressRow<'a> {
    address: &'a Value,
    in_per_second: Option<f64>,
    out_per_second: Option<f64>,
}

/// The rates of an address: from its counters' change since `previous`, else the broker's.
fn address_rows<'a>(previous: Option<&Sample>, sample: &'a Sample) -> Vec<AddressRow<'a>> {
    let mut before: HashMap<(&str, u64), (u64, u64)> = HashMap::new();
    let mut elapsed = 0.0;
    if let Some(previous) = previous {
        elapsed = sample.at.duration_since(previous.at).as_secs_f64();
        for address in list(&previous.addresses, "addresses") {
            if let (Some(name), Some(shard), Some(received), Some(delivered)) = (
                address["name"].as_str(),
                address["shard"].as_u64(),
                address["messages_in"].as_u64(),
                address["messages_out"].as_u64(),
            ) {
                before.insert((name, shard), (received, delivered));
            }
        }
    }
    list(&sample.addresses, "addresses")
        .map(|address| {
            let key = (address["name"].as_str().unwrap_or(""), address["shard"].as_u64().unwrap_or(0));
            let counted = before.get(&key).filter(|_| elapsed > 0.0).and_then(|&(received, delivered)| {
                let now = (address["messages_in"].as_u64()?, address["messages_out"].as_u64()?);
                Some((
                    now.0.saturating_sub(received) as f64 / elapsed,
                    now.1.saturating_sub(delivered) as f64 / elapsed,
                ))
            });
            let (in_per_second, out_per_second) = match counted {
                Some((received, delivered)) => (Some(received), Some(delivered)),
                None => (address["rates"]["in_per_second"].as_f64(), address["rates"]["out_per_second"].as_f64()),
            };
            AddressRow { address, in_per_second, out_per_second }
        })
        .collect()
}

fn list<'a>(document: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    document[key].as_array().into_iter().flatten()
}

/// One screen of the view.
fn render(options: &TopOptions, previous: Option<&Sample>, sample: &Sample, time: &str) -> String {
    let mut rows = address_rows(previous, sample);
    let rate = |row: &AddressRow| row.in_per_second.unwrap_or(0.0) + row.out_per_second.unwrap_or(0.0);
    let number = |row: &AddressRow, key: &str| row.address[key].as_u64().unwrap_or(0);
    let name = |row: &AddressRow| row.address["name"].as_str().unwrap_or("").to_string();
    match options.sort {
        SortKey::Rate => rows.sort_by(|a, b| rate(b).total_cmp(&rate(a)).then_with(|| name(a).cmp(&name(b)))),
        SortKey::Depth => {
            rows.sort_by(|a, b| number(b, "depth").cmp(&number(a, "depth")).then_with(|| name(a).cmp(&name(b))))
        }
        SortKey::Consumers => {
            rows.sort_by(|a, b| number(b, "consumers").cmp(&number(a, "consumers")).then_with(|| name(a).cmp(&name(b))))
        }
        SortKey::Name => rows.sort_by_key(name),
    }
    let sessions: Vec<&Value> = list(&sample.sessions, "sessions").collect();
    let total_in: f64 = rows.iter().filter_map(|row| row.in_per_second).sum();
    let total_out: f64 = rows.iter().filter_map(|row| row.out_per_second).sum();
    let depth: u64 = rows.iter().map(|row| number(row, "depth")).sum();
    let attached = sessions.iter().filter(|session| session["attached"].as_bool() == Some(true)).count();

    let mut screen = String::new();
    let mut line = |text: String| {
        screen.push_str(&text);
        screen.push('\n');
    };
    line(format!(
        "mbws top - admin {} - {time} - every {} s",
        options.admin,
        trim_float(options.interval.as_secs_f64())
    ));
    line(format!(
        "sessions {} ({attached} attached)   addresses {}   in {}/s   out {}/s   waiting {}",
        sample.sessions["total"].as_u64().unwrap_or(sessions.len() as u64),
        sample.addresses["total"].as_u64().unwrap_or(rows.len() as u64),
        grouped(total_in.round() as u64),
        grouped(total_out.round() as u64),
        grouped(depth),
    ));
    line(String::new());
    line(format!(
        "{:<32} {:>5} {:<9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}",
        "ADDRESS", "SHARD", "ROUTING", "IN/S", "OUT/S", "DEPTH", "UNACKED", "CONSUMERS", "DURABLE"
    ));
    for row in rows.iter().take(options.rows) {
        let address = row.address;
        let per_second =
            |value: Option<f64>| value.map_or_else(|| "-".to_string(), |rate| grouped(rate.round() as u64));
        line(format!(
            "{:<32} {:>5} {:<9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}",
            clip(address["name"].as_str().unwrap_or("?"), 32),
            address["shard"].as_u64().unwrap_or(0),
            address["routing"].as_str().unwrap_or("?"),
            per_second(row.in_per_second),
            per_second(row.out_per_second),
            grouped(number(row, "depth")),
            grouped(number(row, "unacked")),
            number(row, "consumers"),
            if address["durable"].as_bool() == Some(true) { "yes" } else { "no" },
        ));
    }
    if rows.len() > options.rows {
        line(format!("... {} more addresses (--rows)", rows.len() - options.rows));
    }
    line(String::new());
    line(format!(
        "{:<14} {:<22} {:<12} {:<6} {:<7} {:>4} {:>9} {:>9} {:>10}",
        "SESSION", "PEER", "USER", "PROTO", "BINDING", "SUBS", "INFLIGHT", "UNACKED", "OUTBOUND"
    ));
    for session in sessions.iter().take(options.rows) {
        let protocol = match session["subprotocol"].as_str() {
            Some(name) if name.starts_with("MBLWS") => "MBLWS",
            Some(_) => "MBWS",
            None => "?",
        };
        let peer = session["peer"].as_str().unwrap_or("-");
        let peer = if session["attached"].as_bool() == Some(false) { format!("({peer})") } else { peer.to_string() };
        line(format!(
            "{:<14} {:<22} {:<12} {:<6} {:<7} {:>4} {:>9} {:>9} {:>10}",
            session["id"].as_str().unwrap_or("?"),
            clip(&peer, 22),
            clip(session["user"].as_str().unwrap_or("-"), 12),
            protocol,
            session["binding"].as_str().unwrap_or("?"),
            session["subscriptions"].as_u64().unwrap_or(0),
            session["inflight_sends"].as_u64().unwrap_or(0),
            session["unacked_deliveries"].as_u64().unwrap_or(0),
            bytes(session["outbound_bytes"].as_u64().unwrap_or(0)),
        ));
    }
    if sessions.len() > options.rows {
        line(format!("... {} more sessions (--rows)", sessions.len() - options.rows));
    }
    screen
}

/// `1234567` as `1,234,567`.
fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn bytes(value: u64) -> String {
    match value {
        0..1024 => format!("{value} B"),
        1024..1_048_576 => format!("{:.1} KiB", value as f64 / 1024.0),
        _ => format!("{:.1} MiB", value as f64 / 1_048_576.0),
    }
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// At most `width` characters, the end replaced by `~` when cut.
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(width - 1).collect();
    clipped.push('~');
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(sort: SortKey, rows: usize) -> TopOptions {
        TopOptions {
            admin: "127.0.0.1:7448".into(),
            token: None,
            interval: Duration::from_secs(1),
            count: 1,
            rows,
            sort,
            wait: Duration::from_secs(1),
        }
    }

    fn address(name: &str, depth: u64, received: u64, delivered: u64) -> Value {
        json!({"name": name, "shard": 0, "routing": "anycast", "durable": false, "depth": depth,
               "unacked": 0, "consumers": 1, "messages_in": received, "messages_out": delivered})
    }

    fn sample(at: Instant, addresses: Vec<Value>) -> Sample {
        let total = addresses.len();
        Sample {
            at,
            addresses: json!({"addresses": addresses, "total": total}),
            sessions: json!({"sessions": [{"id": "0.1.1", "peer": "127.0.0.1:5000", "user": "alice",
                "subprotocol": "MBWS.huawei.com", "binding": "binary", "attached": true, "subscriptions": 2,
                "inflight_sends": 0, "unacked_deliveries": 3, "outbound_bytes": 2048}], "total": 1}),
        }
    }

    #[test]
    fn rates_come_from_the_counters_change_and_sort_the_addresses() {
        let start = Instant::now();
        let first = sample(start, vec![address("slow", 5, 100, 100), address("fast", 0, 1_000, 1_000)]);
        let second = sample(
            start + Duration::from_secs(2),
            vec![address("slow", 5, 120, 110), address("fast", 0, 21_000, 20_000)],
        );
        let screen = render(&options(SortKey::Rate, 10), Some(&first), &second, "12:00:00 UTC");
        let fast = screen.lines().position(|line| line.starts_with("fast")).unwrap();
        let slow = screen.lines().position(|line| line.starts_with("slow")).unwrap();
        assert!(fast < slow, "{screen}");
        assert!(screen.lines().nth(fast).unwrap().contains("10,000"), "{screen}");
        assert!(screen.contains("in 10,010/s"), "{screen}");
        assert!(screen.contains("0.1.1") && screen.contains("alice") && screen.contains("2.0 KiB"), "{screen}");
        let by_depth = render(&options(SortKey::Depth, 1), Some(&first), &second, "12:00:00 UTC");
        assert!(by_depth.lines().any(|line| line.starts_with("slow")), "{by_depth}");
        assert!(!by_depth.lines().any(|line| line.starts_with("fast")), "{by_depth}");
        assert!(by_depth.contains("... 1 more addresses"), "{by_depth}");
    }

    #[test]
    fn the_first_screen_uses_the_brokers_rates_or_a_dash() {
        let mut with_rates = address("a", 0, 0, 0);
        with_rates["rates"] = json!({"in_per_second": 42.0, "out_per_second": 41.0});
        let screen = render(&options(SortKey::Name, 10), None, &sample(Instant::now(), vec![with_rates]), "t");
        assert!(
            screen.lines().any(|line| line.starts_with('a') && line.contains("42") && line.contains("41")),
            "{screen}"
        );
        let bare = render(&options(SortKey::Name, 10), None, &sample(Instant::now(), vec![address("b", 0, 0, 0)]), "t");
        assert!(bare.lines().any(|line| line.starts_with('b') && line.contains(" - ")), "{bare}");
    }

    #[test]
    fn numbers_are_grouped_and_http_answers_split() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(clip("abcdef", 4), "abc~");
        assert_eq!(split_response(b"HTTP/1.1 401 Unauthorized\r\nX: y\r\n\r\n{}"), Some((401, &b"{}"[..])));
        assert_eq!(split_response(b"garbage"), None);
    }
}
