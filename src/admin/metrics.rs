//! `GET /metrics`: the shards' snapshots in the Prometheus text exposition format (0.0.4),
//! written by hand: `# HELP` and `# TYPE` once per family, then its samples; label values
//! escaped (`\\`, `\"`, `\n`); counters end in `_total`, units are in the names (`_bytes`,
//! `_seconds`).
//!
//! Per-address series are bounded: the [`MAX_ADDRESS_SERIES`] addresses with the most
//! messages held (queued, unacknowledged, in multicast backlogs) get series of their own, and
//! every other address is summed into one `address="_other"` series, so a broker with a million
//! addresses does not give Prometheus a million series.

use std::fmt::{Display, Write};

use crate::broker::address::AddressInfo;
use crate::mbws::Binding;
use crate::shard::core::ShardSnapshot;
use crate::shard::rounds::ROUND_BUCKETS_NS;
use crate::store::{CommitStats, LatencyHistogram, LATENCY_BUCKETS_SECONDS};

use super::process::ProcessStats;

/// Addresses with series of their own (the rest are `address="_other"`).
pub const MAX_ADDRESS_SERIES: usize = 100;

/// The address label of the series that sums every address without one of its own.
pub const OTHER_ADDRESSES: &str = "_other";

/// The text exposition format, family by family.
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.text, "{label}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// One shard's histogram of the log's commits ([`Exposition::buckets`]).
    fn histogram(&mut self, name: &str, shard: &str, histogram: &LatencyHistogram) {
        let bounds = LATENCY_BUCKETS_SECONDS.iter().copied();
        self.buckets(name, shard, bounds, &histogram.buckets, histogram.sum_seconds, histogram.count);
    }

    /// One shard's histogram: cumulative `_bucket`s (`le`, upper bounds in seconds; `counts`
    /// per bucket, not cumulative, the last being above every bound), `_sum`, `_count`.
    fn buckets(
        &mut self,
        name: &str,
        shard: &str,
        bounds_seconds: impl Iterator<Item = f64>,
        counts: &[u64],
        sum_seconds: f64,
        count: u64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, bucket_count) in bounds_seconds.zip(counts) {
            cumulative += bucket_count;
            self.sample(&bucket, &[("shard", shard), ("le", &bound.to_string())], cumulative);
        }
        self.sample(&bucket, &[("shard", shard), ("le", "+Inf")], count);
        self.sample(&format!("{name}_sum"), &[("shard", shard)], sum_seconds);
        self.sample(&format!("{name}_count"), &[("shard", shard)], count);
    }

    /// A family with one sample per shard.
    fn per_shard(
        &mut self,
        snapshots: &[ShardSnapshot],
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&ShardSnapshot) -> u64,
    ) {
        self.family(name, kind, help);
        for snapshot in snapshots {
            self.sample(name, &[("shard", &snapshot.report.shard.0.to_string())], value(snapshot));
        }
    }
}

fn binding_name(binding: Binding) -> &'static str {
    match binding {
        Binding::Binary => "binary",
        Binding::Text => "text",
    }
}

/// The whole `/metrics` page from the snapshots of the shards that answered (of `shards`).
pub fn render(snapshots: &[ShardSnapshot], shards: usize, process: &ProcessStats) -> String {
    let mut out = Exposition { text: String::with_capacity(16 * 1024) };
    out.family("mbws_build_info", "gauge", "The broker's version, as a label; always 1.");
    out.sample("mbws_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    out.family("mbws_shards", "gauge", "Shard threads of the broker.");
    out.sample("mbws_shards", &[], shards);
    out.family(
        "mbws_shards_reporting",
        "gauge",
        "Shards that answered this scrape in time; the per-shard figures cover only these.",
    );
    out.sample("mbws_shards_reporting", &[], snapshots.len());

    out.per_shard(
        snapshots,
        "mbws_messages_received_total",
        "counter",
        "SENDs that reached their address's owner (accepted or refused).",
        |s| s.report.messages_received,
    );
    out.per_shard(
        snapshots,
        "mbws_messages_delivered_total",
        "counter",
        "MESSAGE deliveries handed to connections, redeliveries included.",
        |s| s.report.messages_delivered,
    );
    out.per_shard(snapshots, "mbws_received_bytes_total", "counter", "Body bytes of the messages received.", |s| {
        s.bytes_received
    });
    out.per_shard(snapshots, "mbws_delivered_bytes_total", "counter", "Body bytes of the messages delivered.", |s| {
        s.bytes_delivered
    });

    out.per_shard(
        snapshots,
        "mbws_messages_redelivered_total",
        "counter",
        "Deliveries of messages delivered before and taken back unacknowledged (NACK, ack timeout, a consumer gone).",
        |s| s.messages_redelivered,
    );
    out.per_shard(
        snapshots,
        "mbws_messages_dead_lettered_total",
        "counter",
        "Messages moved to their dead-letter address DLQ.<address> (max-deliveries, or rejected).",
        |s| s.messages_dead_lettered,
    );
    out.per_shard(
        snapshots,
        "mbws_envelopes_posted_total",
        "counter",
        "Envelopes of commands posted to other shards (one per destination per round of work).",
        |s| s.envelopes_posted,
    );
    out.family(
        "mbws_refusals_total",
        "counter",
        "SENDs and SUBSCRIBEs refused, and subscriptions ended by the broker, by MBWS error code.",
    );
    for snapshot in snapshots {
        let shard = snapshot.report.shard.0.to_string();
        for (code, count) in &snapshot.refusals {
            let code_text = code.as_u16().to_string();
            out.sample("mbws_refusals_total", &[("shard", &shard), ("code", &code_text), ("name", code.name())], count);
        }
    }

    out.family(
        "mbws_upgrades_refused_total",
        "counter",
        "WebSocket upgrades refused, by HTTP status (400 bad request, 403 origin, 404 path, 408 timeout, 426 version, \
         431 too large, 503 draining).",
    );
    for snapshot in snapshots {
        let shard = snapshot.report.shard.0.to_string();
        let mut refused = snapshot.upgrades_refused.clone();
        refused.sort_unstable();
        for (status, count) in &refused {
            out.sample("mbws_upgrades_refused_total", &[("shard", &shard), ("status", &status.to_string())], count);
        }
    }

    out.family(
        "mbws_connections",
        "gauge",
        "Open connections (sessions with a connection), by subprotocol and binding.",
    );
    for snapshot in snapshots {
        let shard = snapshot.report.shard.0.to_string();
        for kind in snapshot.sessions_by_kind.iter().filter(|kind| kind.attached) {
            let labels = [
                ("shard", shard.as_str()),
                ("subprotocol", kind.subprotocol.name()),
                ("binding", binding_name(kind.binding)),
            ];
            out.sample("mbws_connections", &labels, kind.count);
        }
    }
    out.family("mbws_detached_sessions", "gauge", "MBWS sessions without a connection, kept for a resume.");
    for snapshot in snapshots {
        let shard = snapshot.report.shard.0.to_string();
        let detached: usize =
            snapshot.sessions_by_kind.iter().filter(|kind| !kind.attached).map(|kind| kind.count).sum();
        out.sample("mbws_detached_sessions", &[("shard", &shard)], detached);
    }
    out.per_shard(
        snapshots,
        "mbws_queued_messages",
        "gauge",
        "Messages waiting in the anycast queues of the shard's addresses.",
        |s| s.report.queued_messages as u64,
    );
    out.per_shard(
        snapshots,
        "mbws_queued_bytes",
        "gauge",
        "Body bytes waiting in the anycast queues of the shard's addresses.",
        |s| s.report.queued_bytes as u64,
    );
    out.per_shard(
        snapshots,
        "mbws_addresses",
        "gauge",
        "Addresses the shard owns that hold something (messages, subscribers).",
        |s| (s.addresses.len() + s.other_address_count) as u64,
    );
    out.per_shard(
        snapshots,
        "mbws_durable_log_failed",
        "gauge",
        "1 once the shard's durable log failed (durable SENDs are refused until a restart), else 0.",
        |s| u64::from(s.durable_log_failure.is_some()),
    );

    write_log_commits(&mut out, snapshots);
    write_rounds(&mut out, snapshots);
    write_addresses(&mut out, snapshots);
    write_process(&mut out, process);
    out.text
}

/// The durable log's group commits: bytes written, and the latency histograms.
/// The `mbws_link_*` families, one sample per link (labelled `link`), appended after
/// [`render`]'s; nothing when the broker has no links.
pub fn render_links(links: &[std::sync::Arc<crate::link::LinkStatus>]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Exposition { text: String::new() };
    if links.is_empty() {
        return out.text;
    }
    type Figure = fn(&crate::link::LinkStatus) -> f64;
    let families: [(&str, &str, &str, Figure); 9] = [
        ("mbws_link_up", "gauge", "1 while the link's two sessions are open and forwarding, else 0.", |link| {
            f64::from(u8::from(link.state() == crate::link::LinkState::Up))
        }),
        (
            "mbws_link_forwarded_messages_total",
            "counter",
            "Messages the far side receipted and the link settled at their source.",
            |link| link.forwarded.load(Relaxed) as f64,
        ),
        ("mbws_link_forwarded_bytes_total", "counter", "Body bytes of those messages.", |link| {
            link.forwarded_bytes.load(Relaxed) as f64
        }),
        (
            "mbws_link_refused_messages_total",
            "counter",
            "SENDs the far side refused (requeued when it was full, else dead-lettered).",
            |link| link.refused.load(Relaxed) as f64,
        ),
        (
            "mbws_link_hops_exceeded_total",
            "counter",
            "Messages not forwarded because they had crossed max-hops links (a loop), dead-lettered.",
            |link| link.hops_exceeded.load(Relaxed) as f64,
        ),
        (
            "mbws_link_resumes_total",
            "counter",
            "Lost connections that a session of the link resumed over (nothing lost, nothing repeated).",
            |link| link.resumes.load(Relaxed) as f64,
        ),
        (
            "mbws_link_restarts_total",
            "counter",
            "New session pairs the link opened after a failure it could not resume over.",
            |link| link.restarts.load(Relaxed) as f64,
        ),
        (
            "mbws_link_in_flight_messages",
            "gauge",
            "Messages taken from the source and not yet settled (the link's lag).",
            |link| link.in_flight.load(Relaxed) as f64,
        ),
        ("mbws_link_oldest_wait_seconds", "gauge", "How long the oldest of those has waited.", |link| {
            link.oldest_wait().as_secs_f64()
        }),
    ];
    for (name, kind, help, figure) in families {
        out.family(name, kind, help);
        for link in links {
            out.sample(name, &[("link", &link.spec.name), ("direction", link.spec.direction.name())], figure(link));
        }
    }
    out.text
}

/// The `mbws_cluster_*` families, appended after [`render`]'s: this node's view of the cluster
/// and, per owner node (labelled `owner`), what this node forwarded to it and relayed from it;
/// nothing when the broker is not a cluster node (docs/CLUSTER.md, "Metrics").
pub fn render_cluster() -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Exposition { text: String::new() };
    let Some(handle) = crate::cluster::handle() else { return out.text };
    let view = crate::cluster::metrics::node_view();
    if !view.started.load(Relaxed) {
        return out.text;
    }
    let (cluster, node) = handle.names();
    out.family("mbws_cluster_info", "gauge", "The cluster and this node's name, as labels; always 1.");
    out.sample("mbws_cluster_info", &[("cluster", cluster), ("node", node)], 1);
    let gauges: [(&str, &str, u64); 5] = [
        ("mbws_cluster_live_nodes", "Nodes registered in etcd as this node last saw it (itself included).", view.live_nodes.load(Relaxed)),
        (
            "mbws_cluster_fenced",
            "1 while this node is fenced (its lease was not renewed in time: it serves nothing until it joins again), else 0.",
            u64::from(view.fenced.load(Relaxed)),
        ),
        (
            "mbws_cluster_serving",
            "1 while this node serves (registered, placement loaded), else 0 (joining or fenced).",
            u64::from(view.serving.load(Relaxed)),
        ),
        ("mbws_cluster_owned_addresses", "Addresses placed on this node.", view.addresses_owned.load(Relaxed)),
        ("mbws_cluster_placed_addresses", "Addresses placed on any node of the cluster.", view.addresses_placed.load(Relaxed)),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        out.sample(name, &[], value);
    }
    let renewed_at = view.lease_renewed_at_ms.load(Relaxed);
    if renewed_at != u64::MAX {
        let age_ms = crate::clock::now_ms().saturating_sub(renewed_at);
        out.family(
            "mbws_cluster_lease_age_seconds",
            "gauge",
            "Time since the last lease renewal etcd answered was sent; the node fences itself at three quarters of the TTL.",
        );
        out.sample("mbws_cluster_lease_age_seconds", &[], age_ms as f64 / 1000.0);
        out.family("mbws_cluster_lease_ttl_seconds", "gauge", "The lease's time to live.");
        out.sample("mbws_cluster_lease_ttl_seconds", &[], view.lease_ttl_ms.load(Relaxed) as f64 / 1000.0);
    }
    let owners = crate::cluster::metrics::owners();
    type Figure = fn(&crate::cluster::metrics::OwnerCounters) -> u64;
    let families: [(&str, &str, &str, Figure); 5] = [
        (
            "mbws_cluster_forwarded_messages_total",
            "counter",
            "SENDs forwarded to the owner node and receipted by it.",
            |owner| owner.sends_forwarded.load(Relaxed),
        ),
        (
            "mbws_cluster_forward_refused_messages_total",
            "counter",
            "SENDs for the owner node's addresses answered with an error here: its own refusal, unreachable (4503), the forwarder's queue full (4429).",
            |owner| owner.sends_refused.load(Relaxed),
        ),
        (
            "mbws_cluster_relayed_subscriptions",
            "gauge",
            "Subscriptions of clients of this node relayed to the owner node, open now.",
            |owner| owner.relays_open(),
        ),
        (
            "mbws_cluster_relayed_subscriptions_total",
            "counter",
            "Subscriptions of clients of this node relayed to the owner node since start.",
            |owner| owner.relays_opened.load(Relaxed),
        ),
        (
            "mbws_cluster_relayed_deliveries_total",
            "counter",
            "MESSAGEs of relayed subscriptions brought from the owner node to consumers of this node.",
            |owner| owner.deliveries_relayed.load(Relaxed),
        ),
    ];
    for (name, kind, help, figure) in families {
        out.family(name, kind, help);
        for (owner, counters) in &owners {
            out.sample(name, &[("owner", owner)], figure(counters));
        }
    }
    out.text
}

fn write_log_commits(out: &mut Exposition, snapshots: &[ShardSnapshot]) {
    let logs: Vec<(String, CommitStats)> = snapshots
        .iter()
        .filter_map(|snapshot| Some((snapshot.report.shard.0.to_string(), snapshot.log_commits?)))
        .collect();
    out.family("mbws_log_written_bytes_total", "counter", "Bytes the durable log's group commits wrote.");
    for (shard, stats) in &logs {
        out.sample("mbws_log_written_bytes_total", &[("shard", shard)], stats.bytes_written);
    }
    let histograms: [CommitHistogram; 2] = [
        ("mbws_log_sync_duration_seconds", "Time of one fdatasync of the durable log (one per group commit).", |stats| &stats.sync),
        ("mbws_log_commit_duration_seconds", "Time of one group commit of the durable log: its write, fdatasync and the deletion of the segments it freed.", |stats| &stats.commit),
    ];
    for (name, help, histogram) in histograms {
        out.family(name, "histogram", help);
        for (shard, stats) in &logs {
            out.histogram(name, shard, histogram(stats));
        }
    }
}

/// How long each shard's rounds of input took (`shard::rounds`).
fn write_rounds(out: &mut Exposition, snapshots: &[ShardSnapshot]) {
    const NAME: &str = "mbws_shard_round_duration_seconds";
    out.family(
        NAME,
        "histogram",
        "Time from a read's bytes reaching the shard to the end of the round of work they started \
         (decoded, routed, deliveries queued, writers woken), one per read: the broker's own share of \
         a message's latency, and how long the messages arriving meanwhile wait.",
    );
    for snapshot in snapshots {
        let rounds = &snapshot.rounds;
        let bounds = ROUND_BUCKETS_NS.iter().map(|&nanos| nanos as f64 / 1e9);
        let sum_seconds = rounds.sum_ns as f64 / 1e9;
        out.buckets(NAME, &snapshot.report.shard.0.to_string(), bounds, &rounds.buckets, sum_seconds, rounds.count);
    }
}

/// A histogram of the log's commits: its name, its help, and where it is in the stats.
type CommitHistogram = (&'static str, &'static str, fn(&CommitStats) -> &LatencyHistogram);

/// The per-address gauges, bounded to [`MAX_ADDRESS_SERIES`] plus `_other`.
fn write_addresses(out: &mut Exposition, snapshots: &[ShardSnapshot]) {
    let mut listed: Vec<AddressInfo> =
        snapshots.iter().flat_map(|snapshot| snapshot.addresses.iter().cloned()).collect();
    listed.sort_by(|a, b| b.held().cmp(&a.held()).then_with(|| a.name.cmp(&b.name)));
    let mut other = AddressInfo::default();
    let mut named = Vec::with_capacity(MAX_ADDRESS_SERIES);
    for info in listed {
        // An address that happens to be called `_other` is summed there, so no series repeats.
        if named.len() < MAX_ADDRESS_SERIES && info.name.as_ref() != OTHER_ADDRESSES.as_bytes() {
            named.push(info);
        } else {
            other.add(&info);
        }
    }
    for snapshot in snapshots {
        other.add(&snapshot.other_addresses);
    }
    let other_is_used =
        snapshots.iter().any(|snapshot| snapshot.other_address_count > 0) || named.len() == MAX_ADDRESS_SERIES;
    let names: Vec<String> = named.iter().map(|info| String::from_utf8_lossy(&info.name).into_owned()).collect();
    let mut series: Vec<(&str, &AddressInfo)> = names.iter().map(String::as_str).zip(&named).collect();
    if other_is_used {
        series.push((OTHER_ADDRESSES, &other));
    }
    let bounded = format!(
        "The {MAX_ADDRESS_SERIES} addresses holding the most messages have series of their own, the others are \
         summed in address=\"{OTHER_ADDRESSES}\"."
    );
    let families: [AddressFamily; 4] = [
        ("mbws_address_queued_messages", "Messages waiting in the address's anycast queue.", |info| {
            info.queued_messages
        }),
        ("mbws_address_queued_bytes", "Body bytes waiting in the address's anycast queue.", |info| info.queued_bytes),
        ("mbws_address_unacked_messages", "Client-ack deliveries of the address not acknowledged yet.", |info| {
            info.unacked
        }),
        (
            "mbws_address_multicast_backlog_messages",
            "Messages waiting for credit in the backlogs of the address's multicast subscribers.",
            |info| info.multicast_backlog,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "gauge", &format!("{help} {bounded}"));
        for (address, info) in &series {
            out.sample(name, &[("address", address)], value(info));
        }
    }
    out.family("mbws_address_consumers", "gauge", &format!("Subscribers of the address, by delivery mode. {bounded}"));
    for (address, info) in &series {
        out.sample("mbws_address_consumers", &[("address", address), ("mode", "anycast")], info.anycast_consumers);
        out.sample("mbws_address_consumers", &[("address", address), ("mode", "multicast")], info.multicast_consumers);
    }
}

/// A per-address gauge: its name, its help, and its value for one address.
type AddressFamily = (&'static str, &'static str, fn(&AddressInfo) -> usize);

/// The process figures, under the names Prometheus's client libraries use.
fn write_process(out: &mut Exposition, process: &ProcessStats) {
    let floats: [(&str, &str, &str, Option<f64>); 2] = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", process.cpu_seconds),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            process.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in floats {
        if let Some(value) = value {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
    }
    let integers: [(&str, &str, Option<u64>); 5] = [
        ("process_resident_memory_bytes", "Resident memory size, in bytes.", process.resident_memory_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size, in bytes.", process.virtual_memory_bytes),
        ("process_open_fds", "Open file descriptors (each connection holds one).", process.open_fds),
        ("process_max_fds", "The open-file limit.", process.max_fds),
        ("process_threads", "Threads of the process.", process.threads),
    ];
    for (name, help, value) in integers {
        if let Some(value) = value {
            out.family(name, "gauge", help);
            out.sample(name, &[], value);
        }
    }
}
