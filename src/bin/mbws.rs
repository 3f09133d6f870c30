//! `mbws`: a command-line MBWS client, in the spirit of `nats pub` / `nats sub`.
//!
//! Exit codes: 0 done; 1 connection, protocol or broker error; 2 bad usage; 3 `consume` timed
//! out before `--count` messages arrived.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};

use mbws::client::{Client, ClientError, ClientOptions};
use mbws::mbws::{AckMode, Binding, DeliveryMode, Properties, Send, Subprotocol};

#[derive(Parser, Debug)]
#[command(name = "mbws", version, about = "Send to and consume from an MBWS broker")]
struct Args {
    /// Broker URL (ws://host:port/ or host:port).
    #[arg(long, global = true, env = "MBWS_URL", default_value = "ws://127.0.0.1:7447/")]
    url: String,
    /// Use MBLWS.huawei.com (light, at most once) instead of MBWS.huawei.com.
    #[arg(long, global = true)]
    light: bool,
    /// Send frames in the text binding instead of the binary one.
    #[arg(long, global = true)]
    text: bool,
    /// Seconds to wait for the broker (connect, receipts).
    #[arg(long, global = true, default_value_t = 10.0)]
    wait: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send messages to an address and wait until the broker has receipted them.
    Send {
        address: String,
        /// Message body; read from standard input when absent.
        body: Option<String>,
        /// Send the body this many times.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// With the body from standard input: one message per line.
        #[arg(long)]
        lines: bool,
        #[arg(long)]
        durable: bool,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        reply_to: Option<String>,
        /// Time to live in milliseconds (0: never expires).
        #[arg(long, default_value_t = 0)]
        ttl_ms: u32,
        /// Application header `x-name=value` (repeatable).
        #[arg(long = "header", value_name = "x-name=value")]
        headers: Vec<String>,
    },
    /// Consume messages from an address and print their bodies, one per line.
    Consume {
        address: String,
        /// Stop after this many messages (0: run until interrupted or --timeout).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Receive every message (publish/subscribe) instead of competing for them.
        #[arg(long)]
        multicast: bool,
        /// Most unacknowledged messages at a time.
        #[arg(long, default_value_t = 1000)]
        credit: u32,
        /// Seconds to wait for the next message before giving up (exit 3); 0 waits forever.
        #[arg(long, default_value_t = 0.0)]
        timeout: f64,
        /// Print `address delivery-seq message-id [redelivered]` before each body.
        #[arg(long)]
        verbose: bool,
        /// Print only a summary with the rate on standard error.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = ClientOptions {
        subprotocol: if args.light { Subprotocol::Light } else { Subprotocol::Reliable },
        binding: if args.text { Binding::Text } else { Binding::Binary },
        timeout: Duration::from_secs_f64(args.wait.max(0.001)),
        ..ClientOptions::default()
    };
    let result = match args.command {
        Command::Send {
            address,
            body,
            count,
            lines,
            durable,
            content_type,
            correlation_id,
            reply_to,
            ttl_ms,
            headers,
        } => {
            let properties = match properties(content_type, correlation_id, reply_to, headers) {
                Ok(properties) => properties,
                Err(problem) => {
                    eprintln!("mbws send: {problem}");
                    return ExitCode::from(2);
                }
            };
            let template = Send { address: Bytes::from(address), durable, ttl_ms, properties, ..Default::default() };
            send(&args.url, options, template, body, count, lines)
        }
        Command::Consume { address, count, multicast, credit, timeout, verbose, quiet } => {
            let mode = if multicast { DeliveryMode::Multicast } else { DeliveryMode::Anycast };
            consume(&args.url, options, &address, mode, credit, count, timeout, verbose, quiet)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mbws: {error}");
            ExitCode::from(1)
        }
    }
}

fn properties(
    content_type: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    headers: Vec<String>,
) -> Result<Properties, String> {
    let mut properties = Properties {
        content_type: content_type.map(Bytes::from).unwrap_or_default(),
        correlation_id: correlation_id.map(Bytes::from).unwrap_or_default(),
        reply_to: reply_to.map(Bytes::from).unwrap_or_default(),
        ..Default::default()
    };
    for header in headers {
        let Some((name, value)) = header.split_once('=') else {
            return Err(format!("--header \"{header}\" is not name=value"));
        };
        if !name.starts_with("x-") {
            return Err(format!("--header name \"{name}\" must start with x- (application headers are x-*)"));
        }
        properties.headers.push((Bytes::from(name.to_string()), Bytes::from(value.to_string())));
    }
    Ok(properties)
}

fn send(
    url: &str,
    options: ClientOptions,
    template: Send,
    body: Option<String>,
    count: u64,
    lines: bool,
) -> Result<ExitCode, ClientError> {
    let bodies: Vec<Bytes> = match body {
        Some(body) => vec![Bytes::from(body)],
        None => {
            let mut input = Vec::new();
            std::io::stdin().read_to_end(&mut input)?;
            if lines {
                input.split(|&byte| byte == b'\n').filter(|line| !line.is_empty()).map(Bytes::copy_from_slice).collect()
            } else {
                vec![Bytes::from(input)]
            }
        }
    };
    let mut client = Client::connect(url, options)?;
    let started = Instant::now();
    let mut last_seq = 0;
    let mut sent = 0u64;
    for _ in 0..count {
        for body in &bodies {
            let send = Send { body: body.clone(), ..template.clone() };
            last_seq = client.send_message(send)?;
            sent += 1;
            // Stay inside the broker's in-flight window: wait for receipts every half window.
            let window = u64::from(client.opened().limits.max_inflight_sends / 2).max(1);
            if last_seq > client.receipted_seq() + window {
                client.wait_receipt(last_seq - window)?;
            }
        }
    }
    client.wait_receipt(last_seq)?;
    let elapsed = started.elapsed().as_secs_f64();
    if sent > 1 {
        eprintln!(
            "sent {sent} messages to \"{}\" in {elapsed:.3} s ({:.0} msg/s), all receipted",
            String::from_utf8_lossy(&template.address),
            sent as f64 / elapsed.max(1e-9)
        );
    }
    client.close()?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn consume(
    url: &str,
    options: ClientOptions,
    address: &str,
    mode: DeliveryMode,
    credit: u32,
    count: u64,
    timeout: f64,
    verbose: bool,
    quiet: bool,
) -> Result<ExitCode, ClientError> {
    let mut client = Client::connect(url, options)?;
    client.subscribe(1, address, mode, AckMode::Client, credit)?;
    let wait = if timeout > 0.0 { Duration::from_secs_f64(timeout) } else { Duration::from_secs(3600) };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut received = 0u64;
    let mut started: Option<Instant> = None;
    while count == 0 || received < count {
        let Some(message) = client.next_message(wait)? else {
            if timeout > 0.0 {
                out.flush()?;
                eprintln!("mbws consume: no message for {timeout} s after {received} messages; giving up");
                return Ok(ExitCode::from(3));
            }
            continue;
        };
        started.get_or_insert_with(Instant::now);
        received += 1;
        if !quiet {
            if verbose {
                write!(
                    out,
                    "{} {} {}{} ",
                    String::from_utf8_lossy(&message.address),
                    message.delivery_seq,
                    message.message_id,
                    if message.redelivered { " redelivered" } else { "" }
                )?;
            }
            out.write_all(&message.body)?;
            out.write_all(b"\n")?;
        }
        // Acknowledge cumulatively every quarter window, and at the end.
        if received % u64::from((credit / 4).max(1)) == 0 || received == count {
            client.ack(message.delivery_seq, true)?;
            client.flush()?;
            out.flush()?;
        }
    }
    out.flush()?;
    if let Some(started) = started {
        let elapsed = started.elapsed().as_secs_f64();
        if quiet || received > 1 {
            eprintln!(
                "received {received} messages in {elapsed:.3} s ({:.0} msg/s)",
                received as f64 / elapsed.max(1e-9)
            );
        }
    }
    client.close()?;
    Ok(ExitCode::SUCCESS)
}
