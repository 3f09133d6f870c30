//! The admin API: health, Prometheus metrics, addresses (list, one, declare, delete, purge),
//! sessions (list, close), users (list, one, put, delete) and the drain (lame duck) over
//! HTTP/1.1 (`--admin-listen`, default 127.0.0.1:7448; docs/OPERATIONS.md lists every endpoint).
//! What it changes is kept in the data directory ([`state`]); address rates come from
//! [`rates`]; changes to addresses and users are in `changes`.
//!
//! It runs off the message path: one thread (`mbws-admin`) accepts on a blocking std listener
//! and hands each connection to a short-lived thread of its own (at most
//! [`MAX_ADMIN_CONNECTIONS`] at once; beyond, an immediate 503). A request that needs the
//! shards' figures asks each shard through its inbox ([`Inspector`]), which it answers between
//! two rounds of work; a shard that does not answer within [`SHARD_ANSWER_TIMEOUT`] is left
//! out, and the answer says how many shards it covers. A purge or a close goes to the one
//! shard concerned as an `Envelope::Admin`. The shards keep only plain per-shard counters on
//! the message path; everything else is counted when asked.
//!
//! Security: with `--admin-token`, every endpoint but `/healthz` and `/readyz` requires
//! `Authorization: Bearer TOKEN` (401 otherwise); the token is required whenever the listener
//! is beyond loopback (checked at start, [`Config::validate`](crate::config::Config::validate)).
//! A web page may call it from the broker's own origin or an `--allowed-origin` (CORS, with
//! the preflight `OPTIONS` answered without a token): the console at `/console` does.

mod changes;
pub mod http;
pub mod metrics;
pub mod process;
pub mod rates;
pub mod state;

pub use changes::apply_user_changes;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::broker::{ConnId, ConnRef, ShardId};
use crate::config::Secret;
use crate::log;
use crate::logging::Level;
use crate::mbws::ErrorCode;
use crate::shard::core::{AdminCommand, AdminOutcome, SessionInfo, ShardSnapshot, SnapshotRequest};
use crate::shard::Inspector;
use crate::ws::handshake::HttpRequest;
use http::{Response, Target};

/// Admin connections served at once; one more is answered 503 at once and closed.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;

/// How long a request waits for the shards' answers.
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Entries a list (`/api/addresses`, `/api/sessions`) holds without `?limit=`, and the most
/// `?limit=` may ask for.
pub const DEFAULT_LIST_LIMIT: usize = 1_000;
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Binds the admin listener on `addr`, with an error that says what to do.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|error| {
        format!(
            "--admin-listen {addr}: cannot listen there: {error}; is another broker's admin API on it? give \
             --admin-listen another address, or off"
        )
    })
}

/// What the admin API needs of the configuration.
pub struct AdminSettings {
    pub token: Option<Secret>,
    /// The users (the API changes them), and where changes are kept.
    pub auth: Arc<crate::auth::Auth>,
    pub data_dir: std::path::PathBuf,
    /// The broker's limits, for the settings a `PUT /api/addresses/{name}` leaves out.
    pub defaults: changes::AddressDefaults,
    /// Origins whose pages may call the API (CORS): the broker's own and `--allowed-origin`.
    pub origins: Vec<String>,
    /// The links to other brokers, for `/api/links` and the `mbws_link_*` metrics.
    pub links: Vec<Arc<crate::link::LinkStatus>>,
}

impl AdminSettings {
    pub fn from_config(config: &crate::config::Config, broker_origins: Vec<String>) -> AdminSettings {
        let mut origins = broker_origins;
        origins.extend(config.allowed_origins.iter().cloned());
        AdminSettings {
            token: config.admin_token.clone(),
            auth: config.auth.clone(),
            data_dir: config.data_dir.clone(),
            defaults: changes::AddressDefaults::from_config(config),
            origins,
            links: Vec::new(),
        }
    }
}

/// What every admin connection's thread shares.
struct Admin {
    token: Option<Secret>,
    inspector: Inspector,
    started: Instant,
    connections: AtomicUsize,
    changes: changes::Changes,
    rates: rates::Rates,
    origins: Vec<String>,
    links: Vec<Arc<crate::link::LinkStatus>>,
}

/// Starts the admin thread on `listener`; `declared` are the addresses declared at start.
pub fn spawn(
    listener: TcpListener,
    settings: AdminSettings,
    declared: &[(bytes::Bytes, crate::broker::address::AddressSettings)],
    inspector: Inspector,
) -> std::io::Result<()> {
    let admin = Arc::new(Admin {
        token: settings.token,
        inspector,
        started: Instant::now(),
        connections: AtomicUsize::new(0),
        changes: changes::Changes::new(settings.auth, settings.data_dir, settings.defaults, declared),
        rates: rates::Rates::default(),
        origins: settings.origins,
        links: settings.links,
    });
    std::thread::Builder::new().name("mbws-admin".into()).spawn(move || accept_loop(&listener, &admin))?;
    Ok(())
}

/// Admin accept failures are logged at most once per this interval (the kernel fails a
/// blocking accept at once while the process is out of descriptors, connection or not).
const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

fn accept_loop(listener: &TcpListener, admin: &Arc<Admin>) {
    let mut last_report: Option<Instant> = None;
    let mut consecutive_failures = 0u32;
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(accepted) => {
                consecutive_failures = 0;
                accepted
            }
            Err(error) => {
                consecutive_failures += 1;
                if last_report.is_none_or(|at| at.elapsed() >= ACCEPT_FAILURE_LOG_INTERVAL) {
                    log!(
                        Level::Warn,
                        "admin: cannot take a connection: {error}; the admin API retries, and says so again in {} s \
                         if it still cannot",
                        ACCEPT_FAILURE_LOG_INTERVAL.as_secs()
                    );
                    last_report = Some(Instant::now());
                }
                // 10 ms, 20 ms, ... up to 1 s between attempts while it lasts.
                std::thread::sleep(Duration::from_millis(10 * u64::from(consecutive_failures.min(100))));
                continue;
            }
        };
        if admin.connections.fetch_add(1, Ordering::SeqCst) >= MAX_ADMIN_CONNECTIONS {
            admin.connections.fetch_sub(1, Ordering::SeqCst);
            let busy = Response::error(
                503,
                format!("the admin API serves {MAX_ADMIN_CONNECTIONS} connections at once; try again"),
            );
            http::write_response(&mut stream, &busy);
            continue;
        }
        let serving = admin.clone();
        let spawned = std::thread::Builder::new().name("mbws-admin-conn".into()).spawn(move || {
            serve(&serving, &mut stream, peer);
            serving.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(error) = spawned {
            log!(Level::Warn, "admin: cannot start a thread for {peer}: {error}");
            admin.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One connection: one request, one answer.
fn serve(admin: &Admin, stream: &mut TcpStream, peer: SocketAddr) {
    let response = match http::read_request(stream) {
        Ok((request, body)) => {
            let response = admin.answer(&request, &body);
            let response = admin.with_cors(&request, response);
            log!(Level::Debug, "admin: {} {} from {peer}: {}", request.method, request.path, response.status);
            response
        }
        Err(Some(refusal)) => refusal,
        Err(None) => return,
    };
    http::write_response(stream, &response);
}

impl Admin {
    fn answer(&self, request: &HttpRequest, body: &[u8]) -> Response {
        let target = match Target::parse(&request.path) {
            Ok(target) => target,
            Err(reason) => return Response::error(400, reason),
        };
        let segments: Vec<&str> = target.segments.iter().map(String::as_str).collect();
        let method = request.method.as_str();
        if method == "OPTIONS" {
            return self.preflight(request);
        }
        // Health needs no token: it says nothing but whether the broker runs.
        match segments[..] {
            ["healthz"] => return only_get(method).unwrap_or_else(|| self.healthz()),
            ["readyz"] => return only_get(method).unwrap_or_else(|| self.readyz()),
            _ => {}
        }
        if let Some(refusal) = self.check_token(request) {
            return refusal;
        }
        // `?force=true` is DELETE /api/addresses/{name}'s; every other endpoint takes `?limit=`
        // or nothing.
        if let (["api", "addresses", name], "DELETE") = (&segments[..], method) {
            return match force_parameter(&target) {
                Ok(force) => self.changes.delete_address(&self.inspector, name, force),
                Err(refusal) => refusal,
            };
        }
        let limit = match list_limit(&target) {
            Ok(limit) => limit,
            Err(refusal) => return refusal,
        };
        match segments[..] {
            ["metrics"] => only_get(method).unwrap_or_else(|| self.metrics()),
            ["api", "addresses"] => only_get(method).unwrap_or_else(|| self.addresses(limit)),
            ["api", "addresses", name] => match method {
                "GET" => self.address(name),
                "PUT" => self.changes.declare_address(&self.inspector, name, body),
                _ => not_allowed(method, "GET, PUT, DELETE"),
            },
            ["api", "users"] => only_get(method).unwrap_or_else(|| self.changes.users()),
            ["api", "users", name] => match method {
                "GET" => self.changes.user(name),
                "PUT" => self.changes.put_user(&self.inspector, name, body),
                "DELETE" => self.changes.delete_user(&self.inspector, name),
                _ => not_allowed(method, "GET, PUT, DELETE"),
            },
            ["api", "sessions"] => only_get(method).unwrap_or_else(|| self.sessions(limit)),
            ["api", "addresses", name, "purge"] => only(method, "POST").unwrap_or_else(|| self.purge(name)),
            ["api", "sessions", id] => only(method, "DELETE").unwrap_or_else(|| self.close_session(id)),
            ["api", "drain"] => only(method, "POST").unwrap_or_else(|| self.drain()),
            ["api", "cluster"] => only_get(method).unwrap_or_else(Self::cluster_status),
            ["api", "cluster", "addresses", name] => {
                only(method, "PUT").unwrap_or_else(|| Self::move_cluster_address(name, body))
            }
            ["api", "links"] => only_get(method).unwrap_or_else(|| self.links()),
            _ => Response::error(
                404,
                format!(
                    "no admin endpoint at {}: see /healthz, /readyz, /metrics, /api/addresses, /api/sessions, \
                     /api/users, /api/links, /api/drain, /api/cluster (docs/OPERATIONS.md, docs/CLUSTER.md)",
                    request.path
                ),
            ),
        }
    }

    /// `GET /api/cluster`: nodes, this node's lease and the placement (docs/CLUSTER.md).
    fn cluster_status() -> Response {
        match crate::cluster::handle() {
            Some(cluster) => Response::json(200, &cluster.status()),
            None => Response::error(404, "this broker is not a cluster node (start it with --cluster NAME --etcd URL)"),
        }
    }

    /// `PUT /api/cluster/addresses/NAME` with `{"owner": "NODE"}`: an operator's move.
    fn move_cluster_address(name: &str, body: &[u8]) -> Response {
        let Some(cluster) = crate::cluster::handle() else {
            return Response::error(404, "this broker is not a cluster node (start it with --cluster NAME --etcd URL)");
        };
        let owner = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|value| value.get("owner").and_then(|owner| owner.as_str()).map(str::to_string));
        let Some(owner) = owner else {
            return Response::error(
                400,
                "the body must be JSON {\"owner\": \"NODE\"}: the node to move the address to",
            );
        };
        match cluster.move_address(name.as_bytes(), &owner, std::time::Duration::from_secs(5)) {
            Ok(done) => Response::json(200, &json!({ "address": name, "owner": owner, "result": done })),
            Err(problem) => Response::error(409, problem),
        }
    }

    /// `None` when the request carries the token (or none is configured); else the 401.
    fn check_token(&self, request: &HttpRequest) -> Option<Response> {
        let token = self.token.as_ref()?;
        let given = request
            .header("authorization")
            .and_then(|value| value.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, given)| given.trim());
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) => None,
            Some(_) => Some(unauthorized("the bearer token is not the admin token")),
            None => Some(unauthorized("this endpoint requires `Authorization: Bearer TOKEN` (the --admin-token)")),
        }
    }

    fn snapshot(&self, request: &SnapshotRequest) -> Vec<ShardSnapshot> {
        self.inspector.snapshot(request, SHARD_ANSWER_TIMEOUT)
    }

    fn healthz(&self) -> Response {
        Response::json(200, &json!({ "status": "alive", "uptime_seconds": self.started.elapsed().as_secs() }))
    }

    /// Ready: every shard answers (its event loop runs, it accepts) and no durable log failed
    /// (the logs were recovered before the shards started).
    fn readyz(&self) -> Response {
        let shards = self.inspector.shard_count();
        if self.inspector.is_draining() {
            return Response::json(
                503,
                &json!({ "status": "draining", "shards": shards, "problems": ["the broker is draining (lame duck) \
                    and takes no new connections"] }),
            );
        }
        let snapshots = self.snapshot(&SnapshotRequest::default());
        let mut problems: Vec<String> = snapshots
            .iter()
            .filter_map(|snapshot| {
                let failure = snapshot.durable_log_failure.as_ref()?;
                Some(format!("shard {}: the durable log failed: {failure}", snapshot.report.shard.0))
            })
            .collect();
        if snapshots.len() < shards {
            problems.push(format!(
                "only {} of {shards} shards answered within {} ms",
                snapshots.len(),
                SHARD_ANSWER_TIMEOUT.as_millis()
            ));
        }
        if problems.is_empty() {
            Response::json(200, &json!({ "status": "ready", "shards": shards }))
        } else {
            Response::json(503, &json!({ "status": "not ready", "shards": shards, "problems": problems }))
        }
    }

    /// Lame duck (`POST /api/drain`, as SIGUSR2): new upgrades are refused (503), /readyz
    /// answers 503, the connections are closed over `--drain-duration-ms`, then the broker stops.
    fn drain(&self) -> Response {
        let started = self.inspector.start_drain();
        log!(Level::Info, "admin: drain requested{}", if started { "" } else { " (already draining)" });
        Response::json(202, &json!({ "status": "draining", "already_draining": !started }))
    }

    fn metrics(&self) -> Response {
        let request = SnapshotRequest { max_addresses: metrics::MAX_ADDRESS_SERIES, ..SnapshotRequest::default() };
        let snapshots = self.snapshot(&request);
        let mut text = metrics::render(&snapshots, self.inspector.shard_count(), &process::ProcessStats::read());
        text.push_str(&metrics::render_links(&self.links));
        text.push_str(&metrics::render_cluster());
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: text.into_bytes(),
            headers: Vec::new(),
        }
    }

    /// `GET /api/links`: each link's state, counts and lag (docs/CLUSTER.md, "Links").
    fn links(&self) -> Response {
        let links: Vec<Value> = self.links.iter().map(|link| link_json(link)).collect();
        Response::json(200, &json!({ "links": links }))
    }

    fn addresses(&self, limit: usize) -> Response {
        let snapshots = self.snapshot(&SnapshotRequest { max_addresses: limit, ..SnapshotRequest::default() });
        let total: usize =
            snapshots.iter().map(|snapshot| snapshot.addresses.len() + snapshot.other_address_count).sum();
        let mut listed: Vec<(u16, &crate::broker::address::AddressInfo)> = snapshots
            .iter()
            .flat_map(|snapshot| snapshot.addresses.iter().map(|info| (snapshot.report.shard.0, info)))
            .collect();
        listed.sort_by(|(_, a), (_, b)| b.held().cmp(&a.held()).then_with(|| a.name.cmp(&b.name)));
        listed.truncate(limit);
        let rates = self.rates.sample(listed.iter().map(|(_, info)| *info), true);
        let addresses: Vec<Value> =
            listed.iter().zip(rates).map(|((shard, info), rates)| address_json(*shard, info, rates)).collect();
        Response::json(
            200,
            &json!({
                "addresses": addresses,
                "total": total,
                "truncated": total > addresses.len(),
                "shards_reporting": snapshots.len(),
                "shards": self.inspector.shard_count(),
            }),
        )
    }

    fn address(&self, name: &str) -> Response {
        let request = SnapshotRequest {
            address: Some(bytes::Bytes::copy_from_slice(name.as_bytes())),
            ..SnapshotRequest::default()
        };
        let snapshots = self.snapshot(&request);
        let found = snapshots.iter().find_map(|snapshot| Some((snapshot.report.shard.0, snapshot.addresses.first()?)));
        match found {
            Some((shard, info)) => {
                let rates = self.rates.sample(std::iter::once(info), false).pop().flatten();
                Response::json(200, &address_json(shard, info, rates))
            }
            None if snapshots.len() < self.inspector.shard_count() => Response::error(
                503,
                format!("not every shard answered within {} ms; try again", SHARD_ANSWER_TIMEOUT.as_millis()),
            ),
            None => Response::error(
                404,
                format!(
                    "no address {name:?}: an address exists while it holds messages or subscribers, or once \
                     declared (PUT /api/addresses/{{name}})"
                ),
            ),
        }
    }

    fn sessions(&self, limit: usize) -> Response {
        let snapshots = self.snapshot(&SnapshotRequest { max_sessions: limit, ..SnapshotRequest::default() });
        let total: usize =
            snapshots.iter().flat_map(|snapshot| &snapshot.sessions_by_kind).map(|kind| kind.count).sum();
        let sessions: Vec<Value> =
            snapshots.iter().flat_map(|snapshot| &snapshot.sessions).take(limit).map(session_json).collect();
        Response::json(
            200,
            &json!({
                "sessions": sessions,
                "total": total,
                "truncated": total > sessions.len(),
                "shards_reporting": snapshots.len(),
                "shards": self.inspector.shard_count(),
            }),
        )
    }
}

impl Admin {
    /// `POST /api/addresses/{name}/purge`: asks the address's owner to drop its queue.
    fn purge(&self, name: &str) -> Response {
        let owner = crate::broker::owner_of(name.as_bytes(), self.inspector.shard_count());
        let command = AdminCommand::PurgeAddress(bytes::Bytes::copy_from_slice(name.as_bytes()));
        match self.inspector.command(owner, command, SHARD_ANSWER_TIMEOUT) {
            Some(AdminOutcome::Purged { messages }) => {
                log!(Level::Info, "admin: address {name:?} purged"; messages = messages);
                Response::json(200, &json!({ "address": name, "purged_messages": messages }))
            }
            Some(_) => Response::error(
                404,
                format!("no address {name:?}: an address exists while it holds messages or subscribers"),
            ),
            None => shard_did_not_answer(owner.0),
        }
    }

    /// `DELETE /api/sessions/{id}`: ends the session (fatal ERROR 4403, close 4403, no resume).
    fn close_session(&self, id: &str) -> Response {
        let Some(conn) = parse_session_id(id).filter(|conn| usize::from(conn.shard.0) < self.inspector.shard_count())
        else {
            return Response::error(
                404,
                format!("no session {id:?}: ids are shard.slot.generation, as GET /api/sessions lists them"),
            );
        };
        match self.inspector.command(conn.shard, AdminCommand::CloseSession(conn.conn), SHARD_ANSWER_TIMEOUT) {
            Some(AdminOutcome::Closing) => {
                log!(Level::Info, "admin: session {id} closed by an operator");
                Response::json(200, &json!({ "id": id, "closed": true, "code": ErrorCode::Forbidden.as_u16() }))
            }
            Some(AdminOutcome::NotConnected) => Response::error(
                409,
                format!(
                    "session {id} has no connection (it waits for a resume, or is closing already); a detached \
                     session ends by itself after session-expiry-ms"
                ),
            ),
            Some(_) => Response::error(404, format!("no session {id:?} (it may have ended)")),
            None => shard_did_not_answer(conn.shard.0),
        }
    }
}

fn link_json(link: &crate::link::LinkStatus) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let spec = &link.spec;
    json!({
        "name": spec.name,
        "url": spec.url,
        "direction": spec.direction.name(),
        "addresses": spec.addresses,
        "mode": crate::link::config::mode_name(spec.mode),
        "state": link.state().name(),
        "state_seconds": link.state_age().as_secs(),
        "last_error": link.last_error(),
        "forwarded": link.forwarded.load(Relaxed),
        "forwarded_bytes": link.forwarded_bytes.load(Relaxed),
        "refused": link.refused.load(Relaxed),
        "hops_exceeded": link.hops_exceeded.load(Relaxed),
        "resumes": link.resumes.load(Relaxed),
        "restarts": link.restarts.load(Relaxed),
        "in_flight": link.in_flight.load(Relaxed),
        "oldest_wait_ms": link.oldest_wait().as_millis() as u64,
    })
}

fn shard_did_not_answer(shard: u16) -> Response {
    Response::error(
        503,
        format!("shard {shard} did not answer within {} ms; try again", SHARD_ANSWER_TIMEOUT.as_millis()),
    )
}

/// `shard.index.generation` (as [`session_id`] writes it) into the connection it names.
fn parse_session_id(id: &str) -> Option<ConnRef> {
    let mut parts = id.split('.').map(str::parse::<u32>);
    let (Some(Ok(shard)), Some(Ok(index)), Some(Ok(generation)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(ConnRef { shard: ShardId(u16::try_from(shard).ok()?), conn: ConnId { index, generation } })
}

fn address_json(shard: u16, info: &crate::broker::address::AddressInfo, rates: Option<rates::AddressRates>) -> Value {
    // A declared address's routing; else the routing rule (docs/PROTOCOL.md, "Addresses"):
    // messages go to the anycast queue unless the address has only multicast subscribers.
    let routing = match &info.declared {
        Some(settings) => settings.routing.name(),
        None if info.anycast_consumers == 0 && info.multicast_consumers > 0 && info.queued_messages == 0 => "multicast",
        None => "anycast",
    };
    json!({
        "name": String::from_utf8_lossy(&info.name),
        "shard": shard,
        "routing": routing,
        "durable": info.durable,
        "depth": info.queued_messages,
        "depth_bytes": info.queued_bytes,
        "consumers": info.anycast_consumers + info.multicast_consumers,
        "anycast_consumers": info.anycast_consumers,
        "multicast_consumers": info.multicast_consumers,
        "unacked": info.unacked,
        "multicast_backlog": info.multicast_backlog,
        "messages_in": info.messages_in,
        "messages_out": info.messages_out,
        "rates": rates.map(|rates| json!({
            "in_per_second": rates.in_per_second,
            "out_per_second": rates.out_per_second,
            "window_seconds": rates.window_seconds,
        })),
        "declared": info.declared.as_ref().map(changes::settings_json),
    })
}

/// The admin API's id of a session: `shard.index.generation` of its connection slot.
pub fn session_id(session: &SessionInfo) -> String {
    format!("{}.{}.{}", session.conn.shard.0, session.conn.conn.index, session.conn.conn.generation)
}

fn session_json(session: &SessionInfo) -> Value {
    json!({
        "id": session_id(session),
        "shard": session.conn.shard.0,
        "peer": session.peer.map(|peer| peer.to_string()),
        "user": session.user.as_deref(),
        "subprotocol": session.subprotocol.name(),
        "binding": match session.binding {
            crate::mbws::Binding::Binary => "binary",
            crate::mbws::Binding::Text => "text",
        },
        "attached": session.attached,
        "subscriptions": session.subscriptions,
        "inflight_sends": session.inflight_sends,
        "unacked_deliveries": session.unacked_deliveries,
        "outbound_bytes": session.outbound_bytes,
    })
}

/// `None` for GET; the 405 otherwise.
fn only_get(method: &str) -> Option<Response> {
    only(method, "GET")
}

/// `None` for `allowed`; the 405 otherwise.
fn only(method: &str, allowed: &str) -> Option<Response> {
    (method != allowed).then(|| not_allowed(method, allowed))
}

/// The 405 for `method` where `allowed` (`GET, PUT`) are.
fn not_allowed(method: &str, allowed: &str) -> Response {
    Response::error(405, format!("{method} is not allowed here: use {allowed}"))
        .with_header(format!("Allow: {allowed}"))
}

/// `?force=true` or `?force=false` (default false); any other parameter is refused.
fn force_parameter(target: &Target) -> Result<bool, Response> {
    let mut force = false;
    for (name, value) in &target.query {
        if name != "force" {
            return Err(Response::error(400, format!("unknown query parameter {name:?}: the only one is force")));
        }
        force = match value.as_str() {
            "true" => true,
            "false" => false,
            other => return Err(Response::error(400, format!("force={other} is not valid: use true or false"))),
        };
    }
    Ok(force)
}

/// The methods and headers a page may use (CORS preflight).
const CORS_METHODS: &str = "GET, PUT, POST, DELETE, OPTIONS";
const CORS_HEADERS: &str = "Authorization, Content-Type";
/// How long a browser may remember a preflight's answer.
const CORS_MAX_AGE_SECONDS: u32 = 600;

impl Admin {
    /// The page's origin, if it is one the API answers (see the module docs).
    fn allowed_origin<'a>(&self, request: &'a HttpRequest) -> Option<&'a str> {
        let origin = request.header("origin")?.trim();
        self.origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin)).then_some(origin)
    }

    /// Adds the CORS headers for an allowed origin (without them a browser withholds the answer).
    fn with_cors(&self, request: &HttpRequest, response: Response) -> Response {
        match self.allowed_origin(request) {
            Some(origin) => response
                .with_header(format!("Access-Control-Allow-Origin: {origin}"))
                .with_header("Vary: Origin".into()),
            None => response,
        }
    }

    /// `OPTIONS`: a browser's preflight, answered without a token (it carries none).
    fn preflight(&self, request: &HttpRequest) -> Response {
        if request.header("origin").is_some() && self.allowed_origin(request).is_none() {
            return Response::error(
                403,
                format!(
                    "origin {:?} may not call the admin API: the broker's own origin and --allowed-origin may",
                    request.header("origin").unwrap_or_default()
                ),
            );
        }
        Response { status: 204, content_type: "text/plain", body: Vec::new(), headers: Vec::new() }
            .with_header(format!("Access-Control-Allow-Methods: {CORS_METHODS}"))
            .with_header(format!("Access-Control-Allow-Headers: {CORS_HEADERS}"))
            .with_header(format!("Access-Control-Max-Age: {CORS_MAX_AGE_SECONDS}"))
            .with_header(format!("Allow: {CORS_METHODS}"))
    }
}

fn unauthorized(reason: &str) -> Response {
    Response::error(401, reason).with_header("WWW-Authenticate: Bearer realm=\"mbws-admin\"".into())
}

/// `?limit=N` (1..=[`MAX_LIST_LIMIT`], default [`DEFAULT_LIST_LIMIT`]); any other parameter
/// is refused, so a typo does not pass unnoticed.
fn list_limit(target: &Target) -> Result<usize, Response> {
    let mut limit = DEFAULT_LIST_LIMIT;
    for (name, value) in &target.query {
        if name != "limit" {
            return Err(Response::error(400, format!("unknown query parameter {name:?}: the only one is limit")));
        }
        limit = value
            .parse()
            .ok()
            .filter(|limit| (1..=MAX_LIST_LIMIT).contains(limit))
            .ok_or_else(|| Response::error(400, format!("limit={value} is not valid: use 1..={MAX_LIST_LIMIT}")))?;
    }
    Ok(limit)
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |difference, (x, y)| difference | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_read_back() {
        let conn = ConnRef { shard: ShardId(3), conn: ConnId { index: 17, generation: 2 } };
        assert_eq!(parse_session_id("3.17.2"), Some(conn));
        for bad in ["3.17", "3.17.2.1", "x.1.2", "70000.1.2", ""] {
            assert_eq!(parse_session_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
    }

    #[test]
    fn the_limit_is_bounded_and_other_parameters_are_refused() {
        let limit = |target: &str| list_limit(&Target::parse(target).unwrap()).map_err(|refusal| refusal.status);
        assert_eq!(limit("/api/sessions"), Ok(DEFAULT_LIST_LIMIT));
        assert_eq!(limit("/api/sessions?limit=5"), Ok(5));
        assert_eq!(limit("/api/sessions?limit=0"), Err(400));
        assert_eq!(limit("/api/sessions?limit=10001"), Err(400));
        assert_eq!(limit("/api/sessions?limits=5"), Err(400));
    }
}
