//! What a server counts (for logs, tests and the metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what a server saw (for logs and tests).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// QUIC connections whose TLS handshake completed.
    pub connections: AtomicU64,
    /// Connection attempts that failed before completing TLS (e.g. a client that rejected the
    /// certificate).
    pub tls_failures: AtomicU64,
    /// Hello messages received.
    pub hellos: AtomicU64,
    /// Handshakes answered with Welcome.
    pub sessions: AtomicU64,
    /// Handshakes refused (token, model, version, busy, wrong message).
    pub refused: AtomicU64,
    /// Request messages decoded (after a Welcome).
    pub requests: AtomicU64,
    /// Requests answered with a reply.
    pub replies: AtomicU64,
    /// Messages that did not decode or broke a limit.
    pub malformed: AtomicU64,
    /// Decoded requests the executor refused (unknown layer or handle, shapes).
    pub bad_requests: AtomicU64,
    /// Bytes of request streams read.
    pub bytes_in: AtomicU64,
    /// Bytes of replies written.
    pub bytes_out: AtomicU64,
    /// Hellos refused for their tenant token.
    pub auth_failures: AtomicU64,
    /// Requests answered `Busy` because the compute queue was full.
    pub busy: AtomicU64,
    /// Requests' compute time (from their turn to their answer), as a histogram.
    pub latency: Histogram,
}

/// Upper bounds (seconds) of the latency histogram's buckets (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 9] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0];

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations ≤ each bucket's bound (not cumulative here; summed when rendered).
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// What the metrics endpoint reports besides the counters: the state now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub sessions_active: u64,
    pub connections_active: u64,
    pub pending_hellos: u64,
    pub queued_work: u64,
    pub budget_used_bytes: u64,
    pub budget_limit_bytes: u64,
}

/// The Prometheus text exposition (version 0.0.4) of `stats` and `gauges`.
pub fn prometheus(stats: &ServerStats, gauges: &Gauges) -> String {
    use std::fmt::Write as _;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let counters: [(&str, &str, &AtomicU64); 13] = [
        (
            "veil_connections_total",
            "QUIC connections past TLS",
            &stats.connections,
        ),
        (
            "veil_tls_failures_total",
            "connections that failed TLS",
            &stats.tls_failures,
        ),
        (
            "veil_hellos_total",
            "Hello messages received",
            &stats.hellos,
        ),
        (
            "veil_sessions_total",
            "handshakes answered with Welcome",
            &stats.sessions,
        ),
        (
            "veil_handshakes_refused_total",
            "handshakes refused",
            &stats.refused,
        ),
        (
            "veil_auth_failures_total",
            "Hellos with a wrong tenant token",
            &stats.auth_failures,
        ),
        ("veil_requests_total", "requests decoded", &stats.requests),
        (
            "veil_replies_total",
            "requests answered with a reply",
            &stats.replies,
        ),
        (
            "veil_bad_requests_total",
            "requests refused as bad (admission, shapes, layers)",
            &stats.bad_requests,
        ),
        (
            "veil_malformed_total",
            "messages that did not decode or broke a limit",
            &stats.malformed,
        ),
        (
            "veil_busy_total",
            "requests answered Busy (compute queue full)",
            &stats.busy,
        ),
        ("veil_bytes_in_total", "request bytes read", &stats.bytes_in),
        (
            "veil_bytes_out_total",
            "reply bytes written",
            &stats.bytes_out,
        ),
    ];
    for (name, help, a) in counters {
        metric(name, "counter", help, g(a));
    }
    let gauges = [
        (
            "veil_sessions_active",
            "sessions open now",
            gauges.sessions_active,
        ),
        (
            "veil_connections_active",
            "connections open now, welcomed or not",
            gauges.connections_active,
        ),
        (
            "veil_pending_hellos",
            "connections owing their Hello",
            gauges.pending_hellos,
        ),
        (
            "veil_queued_work",
            "requests waiting for a compute turn",
            gauges.queued_work,
        ),
        (
            "veil_memory_budget_used_bytes",
            "bytes reserved from the memory budget",
            gauges.budget_used_bytes,
        ),
        (
            "veil_memory_budget_bytes",
            "the memory budget",
            gauges.budget_limit_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        metric(name, "gauge", help, v);
    }
    let h = &stats.latency;
    let name = "veil_request_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} compute time of a request\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (b, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
        cumulative += g(n);
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let count = g(&h.count);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", g(&h.sum_micros) as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {count}");
    out
}

/// A plain copy of `ServerStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connections: u64,
    pub tls_failures: u64,
    pub hellos: u64,
    pub sessions: u64,
    pub refused: u64,
    pub requests: u64,
    pub replies: u64,
    pub malformed: u64,
    pub bad_requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: g(&self.connections),
            tls_failures: g(&self.tls_failures),
            hellos: g(&self.hellos),
            sessions: g(&self.sessions),
            refused: g(&self.refused),
            requests: g(&self.requests),
            replies: g(&self.replies),
            malformed: g(&self.malformed),
            bad_requests: g(&self.bad_requests),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}
