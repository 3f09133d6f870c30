//! What a shard tells the admin API: a [`ShardSnapshot`] of its counters, connections,
//! addresses and sessions, made by [`ShardCore::snapshot`] between two rounds of work (the
//! shell answers an `Envelope::Snapshot` from its inbox), never on the message path.
//!
//! Bounds: a snapshot lists at most [`SnapshotRequest::max_addresses`] addresses (the deepest
//! queues first; the others are summed into [`ShardSnapshot::other_addresses`]) and at most
//! [`SnapshotRequest::max_sessions`] sessions, so an answer stays small however many a shard
//! holds. Making one walks the shard's addresses and connections once.

use std::net::SocketAddr;

use bytes::Bytes;

use super::{ShardCore, ShardReport};
use crate::broker::address::{AddressInfo, AddressSettings, Deleted};
use crate::broker::{ConnId, ConnRef};
use crate::conn::lifecycle::State as LifecycleState;
use crate::mbws::{Binding, ErrorCode, Subprotocol};

/// What the admin API asks a shard to do (answered with an [`AdminOutcome`]).
#[derive(Debug, Clone)]
pub enum AdminCommand {
    /// Drop the messages waiting in this address's queue ([`AddressTable::purge`](crate::broker::address::AddressTable::purge)).
    PurgeAddress(Bytes),
    /// End this connection's session: fatal ERROR 4403, close 4403, no resume.
    CloseSession(ConnId),
    /// Declare this address with these settings (on its owner).
    DeclareAddress(Bytes, AddressSettings),
    /// Delete this address (on its owner): refused while it has subscribers unless `force`.
    DeleteAddress { name: Bytes, force: bool },
    /// The user's permissions changed (`Some`) or the user was deleted (`None`): every shard
    /// applies it to the live sessions of that user (docs/OPERATIONS.md, "Users").
    UserChanged { name: std::sync::Arc<str>, permissions: Option<std::sync::Arc<crate::auth::Permissions>> },
}

/// What came of an [`AdminCommand`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOutcome {
    Purged {
        messages: usize,
    },
    Closing,
    /// An address was declared (`created`: it was not declared before).
    Declared {
        created: bool,
    },
    Deleted(Deleted),
    /// The sessions of a changed user: `updated` got the new permissions, `closed` were ended.
    UserSessions {
        updated: usize,
        closed: usize,
    },
    /// No such address or session here.
    NotFound,
    /// The session has no connection (it waits for a resume, or is closing already).
    NotConnected,
}

/// What the asker wants listed.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Addresses listed one by one, deepest queues first (0: none, all summed).
    pub max_addresses: usize,
    /// Only this address (the others are neither listed nor summed).
    pub address: Option<Bytes>,
    /// Sessions listed one by one (0: none; they are counted anyway).
    pub max_sessions: usize,
}

/// One shard at one instant (see the module doc).
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub report: ShardReport,
    /// Message body bytes received by this shard as address owner, and delivered to its
    /// connections (counters since start).
    pub bytes_received: u64,
    pub bytes_delivered: u64,
    pub messages_redelivered: u64,
    pub messages_dead_lettered: u64,
    /// Envelopes of commands this shard posted to other shards (the shell counts them).
    pub envelopes_posted: u64,
    /// Upgrades this shard refused, by HTTP status (the shell counts them).
    pub upgrades_refused: Vec<(u16, u64)>,
    /// The durable log's group commits (the shell fills them in; `None` without a log).
    pub log_commits: Option<crate::store::CommitStats>,
    /// How long the rounds of input took (the shell fills it in: `shard::rounds`).
    pub rounds: crate::shard::rounds::RoundHistogram,
    /// Refusals sent to clients (a SEND or SUBSCRIBE refused, a subscription ended by the
    /// broker), by MBWS error code, counted since start; codes never used are left out.
    pub refusals: Vec<(ErrorCode, u64)>,
    /// Connections (attached sessions) and detached sessions, by subprotocol and binding.
    pub sessions_by_kind: Vec<SessionCount>,
    /// The addresses listed, deepest first.
    pub addresses: Vec<AddressInfo>,
    /// The addresses not listed, summed (`name` empty), and how many they are.
    pub other_addresses: AddressInfo,
    pub other_address_count: usize,
    pub sessions: Vec<SessionInfo>,
    /// The durable log's failure, once it failed (the shard refuses durable messages then).
    pub durable_log_failure: Option<String>,
}

/// How many sessions of one kind a shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCount {
    pub subprotocol: Subprotocol,
    pub binding: Binding,
    /// With a connection (true), or kept for a resume (false).
    pub attached: bool,
    pub count: usize,
}

/// One session, as `GET /api/sessions` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The connection slot (the admin API's session id `shard.index.generation`).
    pub conn: ConnRef,
    pub peer: Option<SocketAddr>,
    /// The user whose password opened it (`None`: a token, or anonymous).
    pub user: Option<std::sync::Arc<str>>,
    pub subprotocol: Subprotocol,
    pub binding: Binding,
    pub attached: bool,
    pub subscriptions: usize,
    /// SENDs routed and not answered yet; deliveries not acknowledged yet.
    pub inflight_sends: usize,
    pub unacked_deliveries: usize,
    /// Bytes queued for writing to the connection.
    pub outbound_bytes: usize,
}

impl ShardCore {
    /// Purges address `name` if this shard holds it ([`AdminCommand::PurgeAddress`]); the
    /// shell runs a round of work next (answers to route, SETTLED records to commit).
    pub fn purge_address(&mut self, name: &[u8]) -> AdminOutcome {
        let purged = self.addresses.purge(name, &mut self.answers);
        self.route_address_output();
        match purged {
            Some(messages) => AdminOutcome::Purged { messages },
            None => AdminOutcome::NotFound,
        }
    }

    /// Declares address `name` ([`AdminCommand::DeclareAddress`]).
    pub fn declare_address(&mut self, name: &[u8], settings: AddressSettings) -> AdminOutcome {
        AdminOutcome::Declared { created: self.addresses.declare_address(name, settings) }
    }

    /// Deletes address `name` ([`AdminCommand::DeleteAddress`]); the shell runs a round of
    /// work next (the ended subscriptions and the answers to route, SETTLED records to commit).
    pub fn delete_address(&mut self, name: &[u8], force: bool) -> AdminOutcome {
        let deleted = self.addresses.delete_address(name, force, &mut self.answers);
        self.route_address_output();
        AdminOutcome::Deleted(deleted)
    }

    /// The shard's snapshot for `request` (see the module doc).
    pub fn snapshot(&self, request: &SnapshotRequest) -> ShardSnapshot {
        let (addresses, other_addresses, other_address_count) = self.address_snapshot(request);
        let mut sessions_by_kind: Vec<SessionCount> = Vec::new();
        let mut sessions = Vec::new();
        for (index, slot) in self.conns.iter().enumerate() {
            let Some(state) = slot.state.as_ref() else { continue };
            if state.lifecycle().state() == LifecycleState::Ended {
                continue;
            }
            let session = &state.session;
            let (subprotocol, binding, attached) = (session.subprotocol(), session.binding(), session.is_attached());
            match sessions_by_kind
                .iter_mut()
                .find(|kind| (kind.subprotocol, kind.binding, kind.attached) == (subprotocol, binding, attached))
            {
                Some(kind) => kind.count += 1,
                None => sessions_by_kind.push(SessionCount { subprotocol, binding, attached, count: 1 }),
            }
            if sessions.len() < request.max_sessions {
                sessions.push(SessionInfo {
                    conn: ConnRef { shard: self.id, conn: ConnId { index: index as u32, generation: slot.generation } },
                    peer: state.peer,
                    user: state.user.clone(),
                    subprotocol,
                    binding,
                    attached,
                    subscriptions: session.subscription_count(),
                    inflight_sends: session.inflight_send_count(),
                    unacked_deliveries: session.unacked_deliveries(),
                    outbound_bytes: state.outbound.queued_bytes(),
                });
            }
        }
        let refusals = ErrorCode::ALL
            .iter()
            .zip(self.counters.refusals)
            .filter(|(_, count)| *count > 0)
            .map(|(code, count)| (*code, count))
            .collect();
        ShardSnapshot {
            report: self.report(),
            bytes_received: self.counters.bytes_received,
            bytes_delivered: self.counters.bytes_delivered,
            messages_redelivered: self.counters.messages_redelivered,
            messages_dead_lettered: self.counters.messages_dead_lettered,
            envelopes_posted: 0,
            upgrades_refused: Vec::new(),
            log_commits: None,
            rounds: Default::default(),
            refusals,
            sessions_by_kind,
            addresses,
            other_addresses,
            other_address_count,
            sessions,
            durable_log_failure: self.durable_log.as_ref().and_then(|log| log.borrow().failure().map(str::to_string)),
        }
    }

    /// The addresses `request` lists, deepest first, and the others summed.
    fn address_snapshot(&self, request: &SnapshotRequest) -> (Vec<AddressInfo>, AddressInfo, usize) {
        if let Some(name) = &request.address {
            let listed = self.addresses.address_info(name).into_iter().collect();
            return (listed, AddressInfo::default(), 0);
        }
        let mut other = AddressInfo::default();
        if request.max_addresses == 0 {
            // Nothing listed (readiness, a session list): sum as we walk, keep nothing.
            let mut count = 0;
            for info in self.addresses.address_infos() {
                other.add(&info);
                count += 1;
            }
            return (Vec::new(), other, count);
        }
        let mut all: Vec<AddressInfo> = self.addresses.address_infos().collect();
        let deepest_first =
            |a: &AddressInfo, b: &AddressInfo| b.held().cmp(&a.held()).then_with(|| a.name.cmp(&b.name));
        if all.len() > request.max_addresses {
            // Only the listed ones need to be in order.
            all.select_nth_unstable_by(request.max_addresses - 1, deepest_first);
        }
        let others = all.split_off(request.max_addresses.min(all.len()));
        all.sort_unstable_by(deepest_first);
        for info in &others {
            other.add(info);
        }
        (all, other, others.len())
    }
}

/// Where the refusal counter of `code` is in `Counters::refusals`.
pub(super) fn refusal_index(code: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|known| *known == code).expect("ErrorCode::ALL lists every code")
}
