//! A link emulator for tests and benchmarks: a UDP relay between the phone (client) and its
//! shard servers that imposes what a mobile link does to the traffic.
//!
//! - **Delay**: every datagram is held for RTT/2 in each direction.
//! - **Bandwidth**: each direction is a FIFO bottleneck that releases bytes at its rate (a token
//!   bucket refilled at `up_bps` / `down_bps` with no burst allowance above one datagram: a
//!   datagram leaves once the link has finished sending the ones before it, plus its own
//!   serialization time).
//! - **Queue**: a bounded drop-tail buffer in front of each bottleneck, by default twice the
//!   bandwidth-delay product of that direction (at least [`MIN_QUEUE_BYTES`]); a datagram that
//!   would overflow it is dropped, as a real bottleneck would, so QUIC's congestion control sees
//!   loss instead of an unbounded queue.
//!
//! **One phone link, N servers.** The phone has a single uplink and a single downlink; all its
//! connections share them. [`LinkEmulator::start_shared`] fronts N upstream servers, each on its
//! own local port, with *one* pair of bottlenecks shared by all of them — use that for
//! benchmarks. [`LinkEmulator::start`] is the one-server case.
//!
//! Each front port keeps a small NAT table: every client address that sends to it gets its own
//! upstream-facing socket, so several clients may use one front port. Bytes, datagrams and
//! drops are counted per direction ([`LinkStats`]).
//!
//! The relay runs on its own thread (a single-threaded tokio runtime), not on the caller's
//! runtime: the client and the servers it fronts often share one process and a few cores, and
//! a relay task waiting behind tensor encoding or a convolution would let the kernel drop
//! datagrams at its socket buffers — losses no real link imposes. Dropping the emulator stops
//! that thread and closes every socket before `drop` returns.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> Result<(), veil_devtools::link::LinkError> {
//! use veil_devtools::link::{LinkEmulator, LinkProfile};
//! let link = LinkEmulator::start(server, LinkProfile::five_g())?;
//! let via = link.local_addr(); // connect here instead of `server`
//! # let _ = via; Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use veil_core::transport::servers::ServerSpec;

mod profile;
pub use profile::{Direction, LinkProfile};

/// The smallest drop-tail queue per direction, whatever the bandwidth-delay product: about 40
/// full-size QUIC datagrams, so a link with a tiny RTT still absorbs a burst.
pub const MIN_QUEUE_BYTES: usize = 64 << 10;

/// Largest UDP datagram the relay reads.
const MAX_DATAGRAM: usize = 65_535;

/// Most client addresses one front port relays for (each gets an upstream-facing socket).
const MAX_CLIENTS_PER_PORT: usize = 256;

/// Why the emulator could not start or a profile does not parse.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid link profile `{profile}`: {message}")]
    Profile { profile: String, message: String },
    #[error("cannot open a UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve upstream `{address}`: {message}")]
    Resolve { address: String, message: String },
    #[error("cannot start the link emulator's thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the link emulator needs at least one upstream")]
    NoUpstream,
}

/// One direction's bottleneck: a FIFO that serializes datagrams at `rate` bytes/s behind a
/// drop-tail queue of `limit` bytes. Pure logic over explicit instants (unit-testable).
#[derive(Debug)]
struct Bottleneck {
    /// Bytes per second (infinite = no serialization delay).
    rate: f64,
    limit: usize,
    /// When the link finishes sending everything admitted so far.
    busy_until: Option<Instant>,
    /// Admitted datagrams not yet fully sent: (finish time, size).
    in_queue: VecDeque<(Instant, usize)>,
    queued_bytes: usize,
}

impl Bottleneck {
    fn new(bps: f64, limit: usize) -> Self {
        Self {
            rate: bps / 8.0,
            limit,
            busy_until: None,
            in_queue: VecDeque::new(),
            queued_bytes: 0,
        }
    }

    /// Admits a datagram of `size` bytes arriving at `now`: the instant its last byte leaves
    /// the bottleneck, or `None` when the queue is full (drop tail).
    fn admit(&mut self, now: Instant, size: usize) -> Option<Instant> {
        while let Some(&(finish, s)) = self.in_queue.front() {
            if finish > now {
                break;
            }
            self.in_queue.pop_front();
            self.queued_bytes -= s;
        }
        if !self.rate.is_finite() {
            return Some(now);
        }
        if self.queued_bytes.saturating_add(size) > self.limit {
            return None;
        }
        let start = match self.busy_until {
            Some(b) if b > now => b,
            _ => now,
        };
        let finish = start + Duration::from_secs_f64(size as f64 / self.rate);
        self.busy_until = Some(finish);
        self.in_queue.push_back((finish, size));
        self.queued_bytes += size;
        Some(finish)
    }
}

// ---------------------------------------------------------------------------------------------
// Counters

/// What crossed one direction of the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// UDP payload bytes delivered (QUIC headers, acks and retransmissions included).
    pub bytes: u64,
    /// Datagrams delivered.
    pub packets: u64,
    /// Datagrams dropped at the bottleneck's full queue (or that could not be sent on).
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

impl DirectionStats {
    /// `self - earlier`, per counter.
    pub fn since(&self, earlier: &DirectionStats) -> DirectionStats {
        DirectionStats {
            bytes: self.bytes.saturating_sub(earlier.bytes),
            packets: self.packets.saturating_sub(earlier.packets),
            dropped_packets: self.dropped_packets.saturating_sub(earlier.dropped_packets),
            dropped_bytes: self.dropped_bytes.saturating_sub(earlier.dropped_bytes),
        }
    }
}

/// Both directions' counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub up: DirectionStats,
    pub down: DirectionStats,
}

impl LinkStats {
    /// `self - earlier`, per counter.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            up: self.up.since(&earlier.up),
            down: self.down.since(&earlier.down),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    packets: AtomicU64,
    dropped_packets: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Counters {
    fn delivered(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.packets.fetch_add(1, Ordering::Relaxed);
    }
    /// A counted delivery whose send failed: it was dropped instead.
    fn undeliver(&self, n: usize) {
        self.bytes.fetch_sub(n as u64, Ordering::Relaxed);
        self.packets.fetch_sub(1, Ordering::Relaxed);
        self.dropped(n);
    }
    fn dropped(&self, n: usize) {
        self.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.dropped_packets.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            packets: self.packets.load(Ordering::Relaxed),
            dropped_packets: self.dropped_packets.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay

/// Where a delayed datagram goes.
enum Target {
    /// To an upstream server, from the socket that stands for this client.
    Up {
        socket: Arc<UdpSocket>,
        to: SocketAddr,
    },
    /// Back to a client, from the front port it talks to.
    Down {
        socket: Arc<UdpSocket>,
        to: SocketAddr,
    },
}

struct Delivery {
    at: Instant,
    data: Vec<u8>,
    target: Target,
}

/// One direction: its bottleneck, its delay line (a FIFO channel drained by one task), counters.
struct Pipe {
    bottleneck: Mutex<Bottleneck>,
    delay: Duration,
    counters: Counters,
    line: mpsc::UnboundedSender<Delivery>,
}

impl Pipe {
    fn bottleneck(&self) -> MutexGuard<'_, Bottleneck> {
        // The critical section cannot panic; recover the state if it ever were poisoned.
        self.bottleneck.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `data` for delivery after the bottleneck and the one-way delay, or drops it.
    fn push(&self, data: Vec<u8>, target: Target) {
        let n = data.len();
        let finish = self.bottleneck().admit(Instant::now(), n);
        match finish {
            Some(f) => {
                let d = Delivery {
                    at: f + self.delay,
                    data,
                    target,
                };
                if self.line.send(d).is_err() {
                    self.counters.dropped(n);
                }
            }
            None => self.counters.dropped(n),
        }
    }
}

struct Shared {
    up: Pipe,
    down: Pipe,
}

/// A running link emulator (see the module docs). Dropping it stops the relay.
pub struct LinkEmulator {
    fronts: Vec<SocketAddr>,
    upstreams: Vec<SocketAddr>,
    profile: LinkProfile,
    shared: Arc<Shared>,
    /// Dropping it ends the relay thread's runtime (and with it every task and socket).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for LinkEmulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkEmulator")
            .field("fronts", &self.fronts)
            .field("upstreams", &self.upstreams)
            .field("profile", &self.profile)
            .finish()
    }
}

impl LinkEmulator {
    /// Relays between clients and one `upstream` server through `profile`. Binds 127.0.0.1:0;
    /// clients send to [`local_addr`](Self::local_addr). Needs no ambient runtime: the relay
    /// runs on its own thread.
    pub fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<Self, LinkError> {
        Self::start_shared(&[upstream], profile)
    }

    /// Fronts every server in `upstreams` on its own local port (127.0.0.1:0), all sharing
    /// one uplink and one downlink bottleneck — the phone's single radio link.
    pub fn start_shared(upstreams: &[SocketAddr], profile: LinkProfile) -> Result<Self, LinkError> {
        if upstreams.is_empty() {
            return Err(LinkError::NoUpstream);
        }
        profile.check()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LinkError::Thread)?;
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let pipe = |dir: Direction, line| Pipe {
            bottleneck: Mutex::new(Bottleneck::new(profile.bps(dir), profile.queue_limit(dir))),
            delay: profile.one_way_delay(),
            counters: Counters::default(),
            line,
        };
        let shared = Arc::new(Shared {
            up: pipe(Direction::Up, up_tx),
            down: pipe(Direction::Down, down_tx),
        });
        // Bind every front port before starting anything, so a failure leaves nothing running.
        let mut fronts = Vec::with_capacity(upstreams.len());
        let mut sockets = Vec::with_capacity(upstreams.len());
        {
            let _guard = rt.enter();
            for _ in upstreams {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                let socket = bind(addr)?;
                fronts.push(
                    socket
                        .local_addr()
                        .map_err(|source| LinkError::Bind { addr, source })?,
                );
                sockets.push(Arc::new(socket));
            }
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = shared.clone();
        let routes: Vec<(Arc<UdpSocket>, SocketAddr)> =
            sockets.into_iter().zip(upstreams.iter().copied()).collect();
        let thread = std::thread::Builder::new()
            .name("veil-link".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(deliver(up_rx, relay.clone(), Direction::Up));
                    tokio::spawn(deliver(down_rx, relay.clone(), Direction::Down));
                    for (socket, upstream) in routes {
                        tokio::spawn(front(socket, upstream, relay.clone()));
                    }
                    // Until the emulator is dropped (the sender goes away).
                    let _ = stopped.await;
                });
                // Dropping the runtime cancels every relay task and closes every socket.
                drop(rt);
            })
            .map_err(LinkError::Thread)?;
        Ok(Self {
            fronts,
            upstreams: upstreams.to_vec(),
            profile,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Puts a shared emulator in front of `specs` and returns it with the specs rewritten to
    /// reach each server through it (same fingerprints and tokens, same strip order). Each
    /// address must be a literal `ip:port`, or a name resolved here.
    pub async fn front_servers(
        specs: &[ServerSpec],
        profile: LinkProfile,
    ) -> Result<(Self, Vec<ServerSpec>), LinkError> {
        let mut upstreams = Vec::with_capacity(specs.len());
        for s in specs {
            let addr = match s.address.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => tokio::net::lookup_host(s.address.as_str())
                    .await
                    .map_err(|e| LinkError::Resolve {
                        address: s.address.clone(),
                        message: e.to_string(),
                    })?
                    .next()
                    .ok_or_else(|| LinkError::Resolve {
                        address: s.address.clone(),
                        message: "no address".into(),
                    })?,
            };
            upstreams.push(addr);
        }
        let link = Self::start_shared(&upstreams, profile)?;
        let routed = specs
            .iter()
            .zip(link.local_addrs())
            .map(|(s, a)| ServerSpec {
                address: a.to_string(),
                ..s.clone()
            })
            .collect();
        Ok((link, routed))
    }

    /// The front port of the first (or only) upstream.
    pub fn local_addr(&self) -> SocketAddr {
        self.fronts[0]
    }

    /// The front port of each upstream, in the order given.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.fronts
    }

    /// The servers behind the link.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// Counters so far (delivered and dropped, per direction, all upstreams together).
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.shared.up.counters.snapshot(),
            down: self.shared.down.counters.snapshot(),
        }
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // The relay thread only awaits the stop signal and then drops its runtime; a panic
            // there has nothing left to clean up.
            let _ = t.join();
        }
    }
}

fn bind(addr: SocketAddr) -> Result<UdpSocket, LinkError> {
    let err = |source| LinkError::Bind { addr, source };
    let std = std::net::UdpSocket::bind(addr).map_err(err)?;
    std.set_nonblocking(true).map_err(err)?;
    enlarge_buffers(&std);
    UdpSocket::from_std(std).map_err(err)
}

/// Socket buffers the relay asks for (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`). The default (~208 KiB) holds a few milliseconds of a 340 Mbit/s burst; a relay
/// descheduled for longer on a busy machine would lose datagrams in the kernel — loss the
/// emulated link did not decide.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Best effort: raises `socket`'s receive and send buffers. Uses quinn-udp's socket-option
/// helpers (the only such API among our dependencies); its state object is built on a scratch
/// socket, because building it on a relay socket would switch that socket to GRO (coalesced
/// datagrams), which a relay reading one datagram at a time must not see.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    use quinn::udp::UdpSocketState;
    thread_local! {
        static HELPER: Option<UdpSocketState> = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .ok()
            .and_then(|scratch| UdpSocketState::new((&scratch).into()).ok());
    }
    HELPER.with(|helper| {
        if let Some(h) = helper {
            if let Err(e) = h.set_recv_buffer_size(socket.into(), SOCKET_BUFFER_BYTES) {
                tracing::debug!(error = %e, "link emulator: cannot enlarge a receive buffer");
            }
            if let Err(e) = h.set_send_buffer_size(socket.into(), SOCKET_BUFFER_BYTES) {
                tracing::debug!(error = %e, "link emulator: cannot enlarge a send buffer");
            }
        }
    });
}

/// Whether a receive error leaves the socket usable (ICMP errors surface on the next recv).
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | Interrupted | WouldBlock | TimedOut
    )
}

/// Reads client datagrams on one front port and pushes them into the uplink.
async fn front(socket: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut nat: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "link emulator: front port failed");
                return;
            }
        };
        let back = match nat.get(&client) {
            Some(b) => b.clone(),
            None => {
                if nat.len() >= MAX_CLIENTS_PER_PORT {
                    shared.up.counters.dropped(n);
                    continue;
                }
                let addr = if upstream.is_ipv4() {
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
                } else {
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
                };
                let b = match bind(addr) {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "link emulator: no upstream socket");
                        shared.up.counters.dropped(n);
                        continue;
                    }
                };
                tokio::spawn(back(
                    b.clone(),
                    upstream,
                    socket.clone(),
                    client,
                    shared.clone(),
                ));
                nat.insert(client, b.clone());
                b
            }
        };
        shared.up.push(
            buf[..n].to_vec(),
            Target::Up {
                socket: back,
                to: upstream,
            },
        );
    }
}

/// Reads one upstream's datagrams for one client and pushes them into the downlink.
async fn back(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "link emulator: upstream socket failed");
                return;
            }
        };
        if from != upstream {
            continue; // not the server this socket stands in front of
        }
        shared.down.push(
            buf[..n].to_vec(),
            Target::Down {
                socket: front.clone(),
                to: client,
            },
        );
    }
}

/// Drains one direction's delay line: each datagram is sent when its time comes (the line is in
/// time order because the bottleneck is FIFO and the delay constant).
async fn deliver(mut line: mpsc::UnboundedReceiver<Delivery>, shared: Arc<Shared>, dir: Direction) {
    while let Some(d) = line.recv().await {
        if d.at > Instant::now() {
            tokio::time::sleep_until(d.at).await;
        }
        let counters = match dir {
            Direction::Up => &shared.up.counters,
            Direction::Down => &shared.down.counters,
        };
        // Counted before the send, so a receiver never sees more than the counters say.
        let n = d.data.len();
        counters.delivered(n);
        let sent = match &d.target {
            Target::Up { socket, to } | Target::Down { socket, to } => {
                socket.send_to(&d.data, *to).await
            }
        };
        if sent.is_err() {
            counters.undeliver(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        assert_eq!(LinkProfile::parse("5g").ok(), Some(LinkProfile::five_g()));
        assert_eq!(LinkProfile::parse(" 5G ").ok(), Some(LinkProfile::five_g()));
        let p = LinkProfile::parse("up=100mbit,down=300mbit,rtt=20ms").expect("parse");
        assert_eq!(p.up_bps, 100e6);
        assert_eq!(p.down_bps, 300e6);
        assert_eq!(p.rtt, Duration::from_millis(20));
        assert_eq!(p.queue_bytes, None);
        let p =
            LinkProfile::parse("down=1.5gbps, up=800kbit, rtt=0.1s, queue=256KiB").expect("parse");
        assert_eq!(p.up_bps, 800e3);
        assert_eq!(p.down_bps, 1.5e9);
        assert_eq!(p.rtt, Duration::from_millis(100));
        assert_eq!(p.queue_bytes, Some(256 << 10));
        let p = LinkProfile::parse("up=inf,down=20mbit,rtt=500us").expect("parse");
        assert!(p.up_bps.is_infinite());
        assert_eq!(p.rtt, Duration::from_micros(500));
        assert_eq!(p.queue_limit(Direction::Up), usize::MAX);
        // A bare time is seconds, a bare rate bit/s.
        let p = LinkProfile::parse("up=1000,down=2e3,rtt=2").expect("parse");
        assert_eq!((p.up_bps, p.down_bps), (1000.0, 2000.0));
        assert_eq!(p.rtt, Duration::from_secs(2));
        for bad in [
            "",
            "4g",
            "up=1mbit,down=1mbit",
            "up=1mb,down=1mbit,rtt=1ms",
            "up=1mbit,down=1mbit,rtt=10ms,loss=1",
            "up=0,down=1mbit,rtt=1ms",
            "up=1furlong,down=1mbit,rtt=1ms",
            "up=-1mbit,down=1mbit,rtt=1ms",
            "up=1mbit,down=1mbit,rtt=1h",
            "up=1mbit,down=1mbit,rtt=1ms,queue=0",
            "up=1mbit;down=1mbit",
        ] {
            assert!(LinkProfile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn five_g_queues_hold_two_bandwidth_delay_products() {
        let p = LinkProfile::five_g();
        // 81.14 Mbit/s × 30 ms = 304 275 B; 340.56 Mbit/s × 30 ms = 1 277 100 B.
        assert_eq!(p.queue_limit(Direction::Up), 608_550);
        assert_eq!(p.queue_limit(Direction::Down), 2_554_200);
        assert_eq!(p.one_way_delay(), Duration::from_millis(15));
        let slow = LinkProfile::parse("up=1mbit,down=1mbit,rtt=1ms").expect("parse");
        assert_eq!(slow.queue_limit(Direction::Up), MIN_QUEUE_BYTES);
        assert!((p.serialization_seconds(Direction::Up, 81_140_000 / 8) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bottleneck_serializes_and_drops_tail() {
        // 8 Mbit/s = 1 byte per µs; queue 3000 B.
        let mut b = Bottleneck::new(8e6, 3000);
        let t0 = Instant::now();
        let us = |n: u64| Duration::from_micros(n);
        assert_eq!(b.admit(t0, 1000), Some(t0 + us(1000)));
        assert_eq!(b.admit(t0, 1000), Some(t0 + us(2000)));
        assert_eq!(b.admit(t0, 1000), Some(t0 + us(3000)));
        assert_eq!(b.admit(t0, 1), None, "queue full: drop tail");
        // After the first datagram left, there is room again; it queues behind the others.
        assert_eq!(b.admit(t0 + us(1000), 1000), Some(t0 + us(4000)));
        // An idle link sends at once.
        assert_eq!(b.admit(t0 + us(10_000), 500), Some(t0 + us(10_500)));
        let mut open = Bottleneck::new(f64::INFINITY, 0);
        assert_eq!(open.admit(t0, 1 << 20), Some(t0));
    }
}
