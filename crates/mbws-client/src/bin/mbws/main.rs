//! `mbws`: a command-line MBWS client, in the spirit of `nats pub` / `nats sub`.
//!
//! Exit codes ([`EXIT_CODES`], also in `--help`): 0 done (or, for `consume`, its output closed); 1 connection, protocol or broker
//! error; 2 bad usage (flags, URL, a `--credit` above the broker's max-credit); 3 `consume` timed
//! out before `--count` messages arrived; 130 / 143 `consume` stopped by SIGINT / SIGTERM.
//!
//! `consume` writes each message as it arrives: per line on a terminal, and into a pipe or file
//! whenever no further message is already waiting, so output never sits unprinted while the
//! consumer waits. It acknowledges only what it has written. On SIGINT or SIGTERM it writes out
//! what it printed, acknowledges it, and ends the session with CLOSE, so the broker releases
//! what was delivered but not printed at once (not after the session expiry). A closed standard
//! output (`mbws consume x | head -1`) ends it the same way, with exit 0: what it wrote out is
//! acknowledged, the rest is released.

// The `///` comments on the argument structs are clap's help texts, shown verbatim by `--help`
// (`[IPv6]:PORT`, `DLQ.<address>`), not rustdoc markdown.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};

mod top;

use mbws_client::{parse_url_syntax, Client, ClientError, ClientOptions};
// Credit of `consume` when `--credit` is not given (lowered to the broker's max-credit): the
// credit the broker itself gives a SUBSCRIBE without one.
use mbws_proto::mbws::DEFAULT_CREDIT;
use mbws_proto::mbws::{AckMode, Binding, DeliveryMode, Frame, Properties, Send, Subprotocol};

const EXIT_CODES: &str = "Exit codes: 0 done (for consume also: its standard output was closed, as by `| head`); 1 connection, protocol or broker error; 2 bad usage (flags, \
                          URL, --credit above the broker's max-credit); 3 consume: --timeout passed before \
                          --count messages; 130 / 143 consume: stopped by SIGINT / SIGTERM (after writing out \
                          and acknowledging what it printed and closing the session).";

const TOP_EXIT_CODES: &str =
    "Exit codes: 0 after --count refreshes, on SIGINT or SIGTERM, or when standard output closes; \
                              1 the admin API could not be read (the message says which request and why); 2 bad usage.";

const HASH_PASSWORD_EXIT_CODES: &str = "Exit codes: 0 the hash is printed; 1 hashing failed; 2 the password is empty \
                                        or could not be read.";

/// Runs shorter than this print their count and time, not a rate (which would be noise).
const MIN_SECONDS_FOR_A_RATE: f64 = 0.1;
/// Longest single wait of `consume` for the socket: bounds how late a stop signal that
/// arrives just before a blocking read is noticed.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Parser, Debug)]
#[command(name = "mbws", version, about = "Send to and consume from an MBWS broker", after_help = EXIT_CODES)]
struct Args {
    /// Broker URL: ws://HOST[:PORT][/PATH] (port 80 when absent; the scheme is case-insensitive),
    /// wss://HOST[:PORT][/PATH] for TLS (port 443 when absent), or HOST:PORT.
    #[arg(long, global = true, env = "MBWS_URL", default_value = "ws://127.0.0.1:7447/")]
    url: String,
    /// wss:// only: PEM file of the certificate authorities to trust (for a self-signed broker,
    /// its own certificate) [default: /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, global = true, env = "MBWS_CA_FILE", value_name = "PATH")]
    ca_file: Option<std::path::PathBuf>,
    /// Use MBLWS.huawei.com (light, at most once) instead of MBWS.huawei.com.
    #[arg(long, global = true)]
    light: bool,
    /// Send frames in the text binding instead of the binary one.
    #[arg(long, global = true)]
    text: bool,
    /// Seconds to wait for the broker (connect, receipts, the close handshake).
    #[arg(long, global = true, default_value_t = 10.0, value_parser = positive_seconds)]
    wait: f64,
    /// User name sent in OPEN, with the password from the environment variable MBWS_PASSWORD
    /// (never a flag: a flag shows in `ps`).
    #[arg(long, global = true, env = "MBWS_USER")]
    user: Option<String>,
    /// A bearer token sent in OPEN (static or JWT), from the environment variable MBWS_TOKEN.
    #[arg(long, global = true, env = "MBWS_TOKEN", hide_env_values = true, conflicts_with = "user")]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send messages to an address and wait until the broker has receipted them.
    #[command(after_help = EXIT_CODES)]
    Send {
        /// Address to send to (a queue or topic name, e.g. orders).
        address: String,
        /// Message body; read from standard input when absent (one trailing newline, \n or
        /// \r\n, is removed from it unless --raw).
        body: Option<String>,
        /// Send the body this many times.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// With the body from standard input: one message per line.
        #[arg(long)]
        lines: bool,
        /// With the body from standard input: send it byte for byte, trailing newline included.
        #[arg(long, conflicts_with = "lines")]
        raw: bool,
        /// Ask for a durable message: its RECEIPT comes only after the broker has synced it.
        #[arg(long)]
        durable: bool,
        /// Content type property of the message (e.g. application/json).
        #[arg(long)]
        content_type: Option<String>,
        /// Correlation id property, for matching a reply to its request.
        #[arg(long)]
        correlation_id: Option<String>,
        /// Reply-to property: the address the receiver should answer to.
        #[arg(long)]
        reply_to: Option<String>,
        /// Time to live in milliseconds (0: never expires).
        #[arg(long, default_value_t = 0)]
        ttl_ms: u32,
        /// Application header `x-name=value` (repeatable).
        #[arg(long = "header", value_name = "x-name=value")]
        headers: Vec<String>,
        /// With --light: send every SEND with seq 0, "no receipt wanted" (PROTOCOL.md 7.2):
        /// nothing is receipted, and the command ends with CLOSE once all are written.
        #[arg(long, conflicts_with = "durable")]
        unnumbered: bool,
    },
    /// Consume messages from an address and print their bodies, one per line, as they arrive.
    #[command(after_help = EXIT_CODES)]
    Consume {
        /// Address to consume from.
        address: String,
        /// Stop after this many messages (0: run until interrupted or --timeout).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Receive every message (publish/subscribe) instead of competing for them.
        #[arg(long)]
        multicast: bool,
        /// Most unacknowledged messages at a time [default: 1000, or the broker's max-credit if
        /// lower]; a value above the broker's max-credit is refused.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        credit: Option<u32>,
        /// Seconds to wait for the next message before giving up (exit 3); 0 waits forever.
        #[arg(long, default_value_t = 0.0, value_parser = seconds)]
        timeout: f64,
        /// Print `address delivery-seq message-id [redelivered]` before each body.
        #[arg(long)]
        verbose: bool,
        /// Print only a summary (with the rate) on standard error.
        #[arg(long)]
        quiet: bool,
    },
    /// Print an argon2id hash (PHC string) of a password read from the terminal or standard
    /// input, for `password-hash` in the broker's [[auth.user]] (docs/SECURITY.md).
    #[command(after_help = HASH_PASSWORD_EXIT_CODES)]
    HashPassword,
    /// A live view of a broker through its admin API: sessions, and addresses by rate, depth or
    /// consumers, refreshed every --interval seconds (q: Ctrl-C). Into a pipe or file each
    /// refresh is appended, so `mbws top --count 1` is a one-shot report. The admin API's bearer
    /// token (its --admin-token), when it needs one, comes from the environment variable
    /// MBWS_ADMIN_TOKEN (never a flag: a flag shows in `ps`).
    #[command(after_help = TOP_EXIT_CODES)]
    Top {
        /// The broker's admin listener (its --admin-listen), HOST:PORT or HOST (port 7448).
        #[arg(long, env = "MBWS_ADMIN", default_value = "127.0.0.1:7448")]
        admin: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
        interval: f64,
        /// Exit after this many refreshes (0: run until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Most addresses and most sessions listed.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        rows: u64,
        /// How the addresses are ordered.
        #[arg(long, value_enum, default_value_t = top::SortKey::Rate)]
        sort: top::SortKey,
    },
}

/// `mbws top` until its count, a stop signal or a closed output.
fn run_top(options: top::TopOptions) -> ExitCode {
    if let Err(error) = catch_stop_signals() {
        eprintln!("mbws top: cannot catch SIGINT/SIGTERM: {error}");
        return ExitCode::from(1);
    }
    match top::run(&options, || stop_signal().is_some()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("mbws top: {problem}");
            ExitCode::from(1)
        }
    }
}

/// Reads a password (from the terminal without echo, or one line of standard input) and
/// prints its argon2id hash, a PHC string for `password-hash` in the broker's [[auth.user]].
fn hash_password() -> ExitCode {
    let password = match read_password() {
        Ok(password) => password,
        Err(problem) => {
            eprintln!("mbws hash-password: {problem}");
            return ExitCode::from(2);
        }
    };
    if password.is_empty() {
        eprintln!("mbws hash-password: the password is empty; type one (or pipe it in on standard input)");
        return ExitCode::from(2);
    }
    match mbws_client::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("mbws hash-password: {problem}");
            ExitCode::from(1)
        }
    }
}

/// The password: from the terminal with echo off (asked for on standard error), or the first
/// line of standard input (its newline removed).
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let mut line = String::new();
    if terminal {
        eprint!("Password: ");
        let _echo = EchoOff::new();
        stdin.read_line(&mut line).map_err(|error| format!("cannot read the password: {error}"))?;
        eprintln!();
    } else {
        stdin.read_line(&mut line).map_err(|error| format!("cannot read the password from standard input: {error}"))?;
    }
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string())
}

/// The terminal's echo turned off until dropped.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr fills the zeroed termios for fd 0; the result is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a live termios the call writes into.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return EchoOff(None);
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: sets fd 0's attributes from a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
        EchoOff(Some(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores fd 0's attributes as they were.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

/// What `consume` does, from its flags.
struct ConsumePlan {
    address: String,
    mode: DeliveryMode,
    credit: Option<u32>,
    count: u64,
    timeout: Option<Duration>,
    verbose: bool,
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if matches!(args.command, Command::HashPassword) {
        return hash_password();
    }
    if let Command::Top { admin, interval, count, rows, sort } = &args.command {
        return run_top(top::TopOptions {
            admin: admin.clone(),
            token: std::env::var("MBWS_ADMIN_TOKEN").ok().filter(|token| !token.is_empty()),
            interval: Duration::from_secs_f64(*interval),
            count: *count,
            rows: *rows as usize,
            sort: *sort,
            wait: Duration::from_secs_f64(args.wait),
        });
    }
    if let Err(error) = parse_url_syntax(&args.url) {
        eprintln!("mbws: {error} (set it with --url or MBWS_URL)");
        return ExitCode::from(2);
    }
    let options = ClientOptions {
        subprotocol: if args.light { Subprotocol::Light } else { Subprotocol::Reliable },
        binding: if args.text { Binding::Text } else { Binding::Binary },
        timeout: Duration::from_secs_f64(args.wait),
        ca_file: args.ca_file.clone(),
        login: args.user.clone().unwrap_or_default(),
        passcode: match (&args.user, &args.token) {
            (Some(_), _) => std::env::var("MBWS_PASSWORD").unwrap_or_default(),
            (None, Some(token)) => token.clone(),
            (None, None) => String::new(),
        },
        ..ClientOptions::default()
    };
    let result = match args.command {
        Command::Send {
            address,
            body,
            count,
            lines,
            raw,
            durable,
            content_type,
            correlation_id,
            reply_to,
            ttl_ms,
            headers,
            unnumbered,
        } => {
            if unnumbered && !args.light {
                eprintln!("mbws send: --unnumbered needs --light (an MBWS SEND must be numbered)");
                return ExitCode::from(2);
            }
            let properties = match properties(content_type, correlation_id, reply_to, headers) {
                Ok(properties) => properties,
                Err(problem) => {
                    eprintln!("mbws send: {problem}");
                    return ExitCode::from(2);
                }
            };
            let template = Send { address: Bytes::from(address), durable, ttl_ms, properties, ..Default::default() };
            send(&args.url, options, template, SendPlan { body, count, lines, raw, unnumbered })
        }
        Command::Consume { address, count, multicast, credit, timeout, verbose, quiet } => {
            let plan = ConsumePlan {
                address,
                mode: if multicast { DeliveryMode::Multicast } else { DeliveryMode::Anycast },
                credit,
                count,
                timeout: (timeout > 0.0).then(|| Duration::from_secs_f64(timeout)),
                verbose,
                quiet,
            };
            consume(&args.url, options, &plan)
        }
        Command::HashPassword | Command::Top { .. } => unreachable!("answered above"),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // A stop signal during connect or subscribe: no session to close, exit as for one.
            if let (ClientError::Interrupted, Some(signal)) = (&error, stop_signal()) {
                return ExitCode::from(128 + signal as u8);
            }
            eprintln!("mbws: {error}");
            ExitCode::from(match error {
                ClientError::Url(_) => 2,
                _ => 1,
            })
        }
    }
}

/// `--timeout`: finite seconds, 0 or more.
fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("\"{text}\" is not a number of seconds"))?;
    if !(value.is_finite() && (0.0..=86_400.0 * 365.0).contains(&value)) {
        return Err(format!("{text}: give 0 or more seconds (at most a year)"));
    }
    Ok(value)
}

/// `--wait`: finite seconds, more than 0.
fn positive_seconds(text: &str) -> Result<f64, String> {
    let value = seconds(text)?;
    if value < 0.001 {
        return Err(format!("{text}: give at least 0.001 seconds"));
    }
    Ok(value)
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

/// The bodies to send: the argument, or standard input whole (one trailing newline removed
/// unless `raw`), or standard input split into lines.
fn bodies(body: Option<String>, lines: bool, raw: bool) -> std::io::Result<Vec<Bytes>> {
    if let Some(body) = body {
        return Ok(vec![Bytes::from(body)]);
    }
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    if lines {
        return Ok(input
            .split(|&byte| byte == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .map(Bytes::copy_from_slice)
            .collect());
    }
    if !raw {
        let end = input.strip_suffix(b"\r\n").or_else(|| input.strip_suffix(b"\n")).map_or(input.len(), <[u8]>::len);
        input.truncate(end);
    }
    Ok(vec![Bytes::from(input)])
}

/// "in T s (R msg/s)" for `count` messages, without the rate when the run was too short to
/// measure one.
fn time_and_rate(count: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds < MIN_SECONDS_FOR_A_RATE {
        format!("in {seconds:.3} s")
    } else {
        format!("in {seconds:.3} s ({:.0} msg/s)", count as f64 / seconds)
    }
}

/// What `send` sends beside the SEND template: the bodies, how often, and whether numbered.
struct SendPlan {
    body: Option<String>,
    count: u64,
    lines: bool,
    raw: bool,
    /// MBLWS only: every SEND with seq 0, no RECEIPT awaited.
    unnumbered: bool,
}

fn send(url: &str, options: ClientOptions, template: Send, plan: SendPlan) -> Result<ExitCode, ClientError> {
    let bodies = bodies(plan.body, plan.lines, plan.raw)?;
    let mut client = Client::connect(url, options)?;
    let started = Instant::now();
    let mut last_seq = 0;
    let mut sent = 0u64;
    for _ in 0..plan.count {
        for body in &bodies {
            sent += 1;
            if plan.unnumbered {
                // MBLWS seq 0: written as fast as TCP takes them (the broker paces an
                // at-most-once publisher by reading it); nothing is receipted, so a refusal
                // (an ERROR naming seq 0) is not reported.
                client.write_frame(&Frame::Send(Send { seq: 0, body: body.clone(), ..template.clone() }))?;
                continue;
            }
            let send = Send { body: body.clone(), ..template.clone() };
            last_seq = client.send_message(send)?;
            // Stay inside the broker's in-flight window: wait for receipts every half window.
            let window = u64::from(client.opened().limits.max_inflight_sends / 2).max(1);
            if last_seq > client.receipted_seq() + window {
                client.wait_receipt(last_seq - window)?;
            }
        }
    }
    // Unnumbered: CLOSE's answer comes after the broker has read them all.
    let (kind, outcome) = if plan.unnumbered {
        client.flush()?;
        ("unnumbered messages", "")
    } else {
        client.wait_receipt(last_seq)?;
        ("messages", ", all receipted")
    };
    if sent > 1 {
        eprintln!(
            "sent {sent} {kind} to \"{}\" {}{outcome}",
            String::from_utf8_lossy(&template.address),
            time_and_rate(sent, started.elapsed())
        );
    }
    client.close()?;
    Ok(ExitCode::SUCCESS)
}

/// The stop signal received (SIGINT or SIGTERM), 0 while none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
}

/// Catches SIGINT and SIGTERM without SA_RESTART, so a blocking read returns EINTR and the
/// consume loop sees the signal at once.
fn catch_stop_signals() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is integers, a sigset_t and a handler address, for which all-zero
        // bytes are valid (SIG_DFL, empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: sigemptyset writes the live `sa_mask` it is given.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is a valid sigaction whose handler only stores to an atomic, which
        // is async-signal-safe; a null old-action pointer is allowed.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::Relaxed)).filter(|&signal| signal != 0)
}

/// The credit to subscribe with: the one asked for (refused above the broker's max-credit) or
/// the default, lowered to the broker's max-credit.
fn credit_for(requested: Option<u32>, max_credit: u32) -> Result<u32, String> {
    let max_credit = max_credit.max(1);
    match requested {
        Some(credit) if credit > max_credit => Err(format!(
            "--credit {credit} is above the broker's max-credit {max_credit} (announced in OPENED); \
             give --credit {max_credit} or less, or leave it out"
        )),
        Some(credit) => Ok(credit),
        None => Ok(DEFAULT_CREDIT.min(max_credit)),
    }
}

fn consume(url: &str, options: ClientOptions, plan: &ConsumePlan) -> Result<ExitCode, ClientError> {
    catch_stop_signals()?;
    let mut client = Client::connect(url, options)?;
    let credit = match credit_for(plan.credit, client.opened().limits.max_credit) {
        Ok(credit) => credit,
        Err(problem) => {
            eprintln!("mbws consume: {problem}");
            let _ = client.close();
            return Ok(ExitCode::from(2));
        }
    };
    client.subscribe(1, &plan.address, plan.mode, AckMode::Client, credit)?;
    let line_by_line = std::io::stdout().is_terminal();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let ack_every = u64::from((credit / 4).max(1));
    let mut received = 0u64;
    let mut printed_seq = 0u64;
    // Printed and written out: what may be acknowledged.
    let mut written_seq = 0u64;
    let mut acked_seq = 0u64;
    let mut started: Option<Instant> = None;
    let mut last_arrival = Instant::now();
    let mut timed_out = false;
    // The reader of our output went away (`mbws consume x | head -1`): stop like after
    // --count, acknowledging only what was written out, so CLOSE releases the rest at once.
    let mut output_closed = false;
    macro_rules! output {
        ($result:expr) => {
            match $result {
                Ok(value) => value,
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
                    output_closed = true;
                    break;
                }
                Err(error) => return Err(error.into()),
            }
        };
    }
    while plan.count == 0 || received < plan.count {
        if stop_signal().is_some() {
            break;
        }
        // Take what has already arrived without waiting; before waiting for more, write out
        // what was printed and acknowledge it, so nothing sits unprinted while we wait.
        let message = match client.next_message(Duration::ZERO)? {
            Some(message) => message,
            None => {
                output!(out.flush());
                written_seq = printed_seq;
                if written_seq > acked_seq {
                    client.ack(written_seq, true)?;
                    acked_seq = written_seq;
                }
                let wait = match plan.timeout {
                    Some(timeout) => {
                        let left = timeout.saturating_sub(last_arrival.elapsed());
                        if left.is_zero() {
                            timed_out = true;
                            break;
                        }
                        left.min(SIGNAL_CHECK_INTERVAL)
                    }
                    None => SIGNAL_CHECK_INTERVAL,
                };
                match client.next_message(wait) {
                    Ok(Some(message)) => message,
                    Ok(None) | Err(ClientError::Interrupted) => continue,
                    Err(error) => return Err(error),
                }
            }
        };
        if stop_signal().is_some() {
            break; // Not printed, so not acknowledged: CLOSE releases it.
        }
        last_arrival = Instant::now();
        started.get_or_insert(last_arrival);
        received += 1;
        if !plan.quiet {
            if plan.verbose {
                output!(write!(
                    out,
                    "{} {} {}{} ",
                    String::from_utf8_lossy(&message.address),
                    message.delivery_seq,
                    message.message_id,
                    if message.redelivered { " redelivered" } else { "" }
                ));
            }
            output!(out.write_all(&message.body));
            output!(out.write_all(b"\n"));
            if line_by_line {
                output!(out.flush());
                written_seq = message.delivery_seq;
            }
        }
        printed_seq = message.delivery_seq;
        // Acknowledge cumulatively every quarter window (what is printed is written out first).
        if received % ack_every == 0 {
            output!(out.flush());
            written_seq = printed_seq;
            client.ack(written_seq, true)?;
            acked_seq = written_seq;
        }
    }
    if !output_closed {
        match out.flush() {
            Ok(()) => written_seq = printed_seq,
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => output_closed = true,
            Err(error) => return Err(error.into()),
        }
    }
    if written_seq > acked_seq {
        client.ack(written_seq, true)?;
    }
    if let Some(started) = started {
        if plan.quiet || received > 1 {
            eprintln!("received {received} messages {}", time_and_rate(received, started.elapsed()));
        }
    }
    if output_closed {
        // What was printed but not written out goes back to the address with the CLOSE.
        eprintln!("mbws consume: standard output was closed; closing the session");
        drop(out.into_parts());
    }
    let signal = stop_signal();
    client.close()?;
    if let Some(signal) = signal {
        return Ok(ExitCode::from(128 + signal as u8));
    }
    if timed_out {
        let timeout = plan.timeout.unwrap_or_default().as_secs_f64();
        eprintln!("mbws consume: no message for {timeout} s after {received} messages; giving up");
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}
