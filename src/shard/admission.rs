//! The broker-wide counts of connections (in all, and per source IP address) and sessions,
//! against `--max-connections`, `--max-connections-per-ip` and `--max-sessions`.
//!
//! One [`Admission`] is shared by every shard (connections spread over shards, so a limit per
//! broker needs a count per broker). It is touched at accept, at OPEN and when a connection or
//! a session ends, never on the message path: atomics for the totals, one mutex around the map
//! per IP address (a few hundred nanoseconds at accept). A count is held by a permit
//! ([`ConnectionPermit`], [`SessionPermit`]) and given back when the permit is dropped, so no
//! path that ends a connection or frees a session slot can forget it.
//!
//! Bounds: the map holds one entry per IP address with a connection open, so at most
//! `max_connections` entries; an address's entry goes when its last connection does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;

/// The counts and their limits (see the module docs).
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    max_connections_per_ip: usize,
    max_sessions: usize,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    sessions: AtomicUsize,
}

/// One open connection counted (in all and for its IP address) until dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

/// One session counted until dropped (it lives in the session's connection slot).
#[derive(Debug)]
pub struct SessionPermit {
    admission: Arc<Admission>,
}

impl Admission {
    pub fn new(config: &Config) -> Arc<Admission> {
        Arc::new(Admission {
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            max_sessions: config.max_sessions,
            connections: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            sessions: AtomicUsize::new(0),
        })
    }

    /// Counts a new connection from `ip`, or says which limit it would exceed (the body of the
    /// 503 answer).
    pub fn admit_connection(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, String> {
        if !take_one(&self.connections, self.max_connections) {
            return Err(format!(
                "the broker has max-connections {} connections open already (--max-connections); retry later, or \
                 ask its operator to raise the limit",
                self.max_connections
            ));
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_connections_per_ip {
            drop(per_ip);
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(format!(
                "{ip} has max-connections-per-ip {} connections open already (--max-connections-per-ip); close some \
                 (one connection carries any number of subscriptions), or ask the broker's operator to raise the limit",
                self.max_connections_per_ip
            ));
        }
        *count += 1;
        Ok(ConnectionPermit { admission: self.clone(), ip })
    }

    /// Counts a new session, or says which limit it would exceed (the reason of a fatal 4503).
    pub fn admit_session(self: &Arc<Self>) -> Result<SessionPermit, String> {
        if !take_one(&self.sessions, self.max_sessions) {
            return Err(format!(
                "OPEN: the broker holds max-sessions {} sessions already, detached ones waiting for a resume \
                 included (--max-sessions); retry later, or ask its operator to raise the limit",
                self.max_sessions
            ));
        }
        Ok(SessionPermit { admission: self.clone() })
    }

    /// Connections open now (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Sessions held now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// Adds one to `count` unless it is at `limit` already.
fn take_one(count: &AtomicUsize, limit: usize) -> bool {
    count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| (now < limit).then_some(now + 1)).is_ok()
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.admission.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_connections: usize, max_connections_per_ip: usize, max_sessions: usize) -> Arc<Admission> {
        Admission::new(&Config { max_connections, max_connections_per_ip, max_sessions, ..Config::default() })
    }

    #[test]
    fn connections_are_limited_in_all_and_per_address_and_given_back_on_drop() {
        let admission = admission(3, 2, 1);
        let one: IpAddr = [10, 0, 0, 1].into();
        let two: IpAddr = [10, 0, 0, 2].into();
        let first = admission.admit_connection(one).unwrap();
        let _second = admission.admit_connection(one).unwrap();
        let refused = admission.admit_connection(one).unwrap_err();
        assert!(refused.contains("10.0.0.1") && refused.contains("max-connections-per-ip 2"), "{refused}");
        let _third = admission.admit_connection(two).unwrap();
        let refused = admission.admit_connection(two).unwrap_err();
        assert!(refused.contains("max-connections 3"), "{refused}");
        assert_eq!(admission.connections(), 3, "a refusal counts nothing");
        drop(first);
        assert_eq!(admission.connections(), 2);
        admission.admit_connection(one).expect("room again once one closed");
        assert!(admission.per_ip.lock().unwrap().len() <= 2);
    }

    #[test]
    fn sessions_are_limited_and_given_back_on_drop() {
        let admission = admission(10, 10, 1);
        let session = admission.admit_session().unwrap();
        assert!(admission.admit_session().unwrap_err().contains("max-sessions 1"));
        drop(session);
        assert_eq!(admission.sessions(), 0);
        admission.admit_session().unwrap();
    }
}
