//! A server's resource limits, and the connections still owing their Hello (pre-auth
//! admission: the oldest is closed when too many wait).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{Connection, VarInt};
use veil_core::transport::quic::close_code;
use veil_core::wire::Limits;

/// Default process-wide memory budget.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 16 << 30;

/// Resource limits of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest request message (compressed payloads included).
    pub max_message_bytes: usize,
    /// Largest decoded tensor.
    pub max_tensor_bytes: usize,
    /// Concurrent sessions (connections past the handshake); more are answered `Busy`.
    pub max_sessions: usize,
    /// Concurrent request streams per connection (QUIC stream credit).
    pub max_concurrent_streams: u32,
    /// A connection without any packet for this long is closed.
    pub idle_timeout: Duration,
    /// The Hello must arrive within this after the QUIC handshake.
    pub handshake_timeout: Duration,
    /// Bytes (as f32) one session may keep resident under tensor handles (strict's strips).
    pub max_session_bytes: u64,
    /// One op's admitted peak memory (output and working buffers), checked before it runs.
    pub max_op_bytes: u64,
    /// Bytes all sessions together may hold: every running op's peak and every kept tensor.
    pub memory_budget_bytes: u64,
    /// Connections past the QUIC handshake still owing their Hello; beyond this the oldest is
    /// closed, so silent peers cannot lock honest clients out.
    pub max_pending_hellos: usize,
    /// Of those, how many one source IP may hold; beyond it that IP's own oldest is closed, so
    /// one address flooding handshakes evicts only its own connections, never other clients'.
    pub max_pending_hellos_per_ip: usize,
    /// A request stream must arrive within `request_grace` plus one second per
    /// `min_request_rate` bytes; slower is closed as a slow peer.
    pub request_grace: Duration,
    pub min_request_rate: u64,
    /// Sessions one tenant token may hold at once (a leaked or greedy token cannot take all).
    pub max_sessions_per_token: usize,
    /// Requests computing at once across all sessions (0: one per CPU core), and how many more
    /// may wait for a turn; beyond that a request is answered `Busy` at once.
    pub max_concurrent_work: usize,
    pub max_queued_work: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        let wire = Limits::default();
        Self {
            max_message_bytes: wire.max_message_bytes,
            max_tensor_bytes: wire.max_tensor_bytes,
            max_sessions: 64,
            max_concurrent_streams: 4,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_session_bytes: veil_core::placement::backend::DEFAULT_MAX_HANDLE_BYTES,
            max_op_bytes: veil_core::placement::backend::DEFAULT_MAX_OP_BYTES,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            max_pending_hellos: 64,
            max_pending_hellos_per_ip: 16,
            max_sessions_per_token: 16,
            request_grace: Duration::from_secs(10),
            min_request_rate: 64 << 10,
            max_concurrent_work: 0,
            max_queued_work: 64,
        }
    }
}

impl ServerLimits {
    /// The decoder limits for requests.
    pub fn wire(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_tensor_bytes: self.max_tensor_bytes,
            ..Limits::default()
        }
    }
}

/// Connections past the QUIC handshake that have not been welcomed yet, oldest first. Over the
/// cap the oldest is closed: a peer that never sends its Hello holds a slot only until newer
/// connections need it, and an honest client says Hello within a round trip. Over the per-IP
/// cap the oldest *of that IP* is closed first, so a flood from one address evicts only itself.
pub(crate) struct PendingHellos {
    cap: usize,
    per_ip: usize,
    next: AtomicU64,
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, IpAddr, Connection)>>,
}

impl PendingHellos {
    pub(crate) fn new(cap: usize, per_ip: usize) -> Self {
        Self {
            cap: cap.max(1),
            per_ip: per_ip.max(1),
            next: AtomicU64::new(0),
            queue: Default::default(),
        }
    }

    /// Registers `conn`, closing the oldest pending ones over the caps; returns its ticket.
    pub(crate) fn admit(&self, conn: &Connection) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let ip = conn.remote_address().ip();
        let evicted: Vec<Connection> = match self.queue.lock() {
            Ok(mut q) => {
                q.push_back((id, ip, conn.clone()));
                let mut out = Vec::new();
                let same = q.iter().filter(|(_, a, _)| *a == ip).count();
                if same > self.per_ip {
                    if let Some(i) = q.iter().position(|(_, a, _)| *a == ip) {
                        out.extend(q.remove(i).map(|(_, _, c)| c));
                    }
                }
                let over = q.len().saturating_sub(self.cap);
                out.extend(q.drain(..over).map(|(_, _, c)| c));
                out
            }
            Err(_) => Vec::new(),
        };
        for c in evicted {
            tracing::debug!(remote = %c.remote_address(), "evicted: no Hello while others wait");
            c.close(VarInt::from_u32(close_code::TIMEOUT), b"no hello");
        }
        id
    }

    /// Connections owing their Hello now.
    pub(crate) fn len(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }

    pub(crate) fn done(&self, id: u64) {
        if let Ok(mut q) = self.queue.lock() {
            q.retain(|(i, _, _)| *i != id);
        }
    }
}
