//! The link emulator (`veil_devtools::link`): it imposes its delay (a ping takes at least
//! the RTT), its bandwidth (2 MiB through 20 Mbit/s takes ≥ 0.84 s and not much more, also when
//! two servers share the bottleneck), drops the tail of an overfull queue, stops on drop, and a
//! generation over real QUIC servers behind it equals the direct one bit for bit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::net::UdpSocket;
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::{GnVariant, Policy, WireDtype};
use veil_core::transport::{connect_all, ClientOptions};
use veil_core::wire::identity::model_identity;
use veil_devtools::link::{Direction, LinkEmulator, LinkProfile, MIN_QUEUE_BYTES};
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::tiny_model;

async fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind")
}

/// Echoes every datagram back to its sender.
async fn echo_server() -> SocketAddr {
    let s = udp().await;
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Counts received bytes and remembers when the last one arrived.
struct Sink {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    last: Arc<std::sync::Mutex<Option<Instant>>>,
}

async fn sink() -> Sink {
    let s = udp().await;
    let addr = s.local_addr().expect("addr");
    let bytes = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(None));
    let (b, l) = (bytes.clone(), last.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, _)) = s.recv_from(&mut buf).await {
            b.fetch_add(n as u64, Ordering::Relaxed);
            *l.lock().expect("lock") = Some(Instant::now());
        }
    });
    Sink { addr, bytes, last }
}

impl Sink {
    /// Waits until `bytes` arrived or nothing arrived for 300 ms; (bytes, last arrival).
    async fn wait_for(&self, bytes: u64) -> (u64, Option<Instant>) {
        let mut seen = (0, Instant::now());
        loop {
            let now = self.bytes.load(Ordering::Relaxed);
            if now >= bytes {
                break;
            }
            if now != seen.0 {
                seen = (now, Instant::now());
            } else if seen.1.elapsed() > Duration::from_millis(300) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (
            self.bytes.load(Ordering::Relaxed),
            *self.last.lock().expect("lock"),
        )
    }
}

/// Sends `total` bytes in 1000-byte datagrams from a fresh socket at about `kb_per_ms` kB per
/// millisecond (catching up after a late wake-up, at most 32 datagrams at once): faster than the
/// emulated links here, gentle enough that the relay's socket buffer does not overflow on a
/// loaded machine.
async fn blast(to: SocketAddr, total: usize, kb_per_ms: usize) {
    let s = udp().await;
    let chunk = vec![0xA5u8; 1000];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let allowed = ((start.elapsed().as_secs_f64() * 1e3 + 1.0) * kb_per_ms as f64 * 1e3)
            .min(total as f64) as usize;
        let mut burst = 0;
        while sent < allowed && burst < 32 {
            let n = chunk.len().min(total - sent);
            s.send_to(&chunk[..n], to).await.expect("send");
            sent += n;
            burst += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// At most this share of the datagrams may be lost outside the emulator (the kernel drops
/// datagrams at a full socket buffer when a loaded machine deschedules the relay); everything
/// the emulator itself decides is checked exactly.
const KERNEL_LOSS_TOLERANCE: f64 = 0.05;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_through_the_link_takes_at_least_the_rtt() {
    let server = echo_server().await;
    let profile = LinkProfile::parse("up=inf,down=inf,rtt=40ms").expect("profile");
    let link = LinkEmulator::start(server, profile).expect("link");
    let client = udp().await;
    let mut times = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        let t = Instant::now();
        client
            .send_to(&[i; 32], link.local_addr())
            .await
            .expect("send");
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("echo within 5 s")
            .expect("recv");
        times.push(t.elapsed());
        assert_eq!((n, from), (32, link.local_addr()));
        assert_eq!(buf[0], i);
    }
    for t in &times {
        assert!(*t >= Duration::from_millis(40), "ping took {t:?} < RTT");
    }
    times.sort();
    assert!(
        times[2] < Duration::from_millis(150),
        "median ping {:?}: the link adds far more than its RTT",
        times[2]
    );
    let s = link.stats();
    assert_eq!((s.up.packets, s.down.packets), (5, 5));
    assert_eq!((s.up.bytes, s.down.bytes), (160, 160));
}

/// 2 MiB at 20 Mbit/s is 0.839 s of serialization (+ 5 ms one-way delay).
const TWO_MIB: usize = 2 << 20;
fn at_20_mbit(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 * 8.0 / 20e6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mib_through_20_mbit_takes_what_the_rate_says() {
    let sink = sink().await;
    // A queue large enough to hold the whole burst: this test is about the rate, not drops.
    let profile = LinkProfile::parse("up=20mbit,down=inf,rtt=10ms,queue=4mib").expect("profile");
    let link = LinkEmulator::start(sink.addr, profile).expect("link");
    let t = Instant::now();
    blast(link.local_addr(), TWO_MIB, 8).await;
    let sent_in = t.elapsed();
    let (got, last) = sink.wait_for(TWO_MIB as u64).await;
    let took = last.expect("datagrams arrive").duration_since(t);
    assert!(
        got as f64 >= TWO_MIB as f64 * (1.0 - KERNEL_LOSS_TOLERANCE),
        "{got} of {TWO_MIB} bytes arrived"
    );
    let s = link.stats();
    assert_eq!(s.up.dropped_packets, 0, "the 4 MiB queue never overflows");
    assert_eq!(s.up.bytes, got);
    let floor = at_20_mbit(got as usize) + Duration::from_millis(5);
    assert!(
        sent_in < floor,
        "the sender itself took {sent_in:?}, longer than the link needs: the test measures nothing"
    );
    assert!(took >= floor, "{got} B in {took:?} < {floor:?}");
    let ceiling = at_20_mbit(TWO_MIB) + Duration::from_millis(5 + 400);
    assert!(
        took < ceiling,
        "{got} B in {took:?}: much slower than 20 Mbit/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_behind_a_shared_link_share_its_bandwidth() {
    let (a, b) = (sink().await, sink().await);
    let profile = LinkProfile::parse("up=20mbit,down=inf,rtt=10ms,queue=4mib").expect("profile");
    let link = LinkEmulator::start_shared(&[a.addr, b.addr], profile).expect("link");
    assert_eq!(link.local_addrs().len(), 2);
    assert_ne!(link.local_addrs()[0], link.local_addrs()[1]);
    let t = Instant::now();
    // 1 MiB to each server at once: 2 MiB over one 20 Mbit/s uplink (separate links would
    // take half the time).
    tokio::join!(
        blast(link.local_addrs()[0], TWO_MIB / 2, 4),
        blast(link.local_addrs()[1], TWO_MIB / 2, 4)
    );
    let (ga, la) = a.wait_for(TWO_MIB as u64 / 2).await;
    let (gb, lb) = b.wait_for(TWO_MIB as u64 / 2).await;
    let got = ga + gb;
    assert!(
        got as f64 >= TWO_MIB as f64 * (1.0 - KERNEL_LOSS_TOLERANCE),
        "{got} of {TWO_MIB} bytes arrived"
    );
    assert_eq!(link.stats().up.bytes, got);
    let took = la.max(lb).expect("datagrams arrive").duration_since(t);
    let floor = at_20_mbit(got as usize) + Duration::from_millis(5);
    assert!(took >= floor, "shared: {got} B in {took:?} < {floor:?}");
    let ceiling = at_20_mbit(TWO_MIB) + Duration::from_millis(5 + 400);
    assert!(took < ceiling, "shared: {got} B in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overfull_queue_drops_the_tail() {
    let sink = sink().await;
    let profile = LinkProfile::parse("up=20mbit,down=inf,rtt=10ms").expect("profile");
    // 2 × BDP = 50 kB, below the floor.
    assert_eq!(profile.queue_limit(Direction::Up), MIN_QUEUE_BYTES);
    let link = LinkEmulator::start(sink.addr, profile).expect("link");
    let total = 1_000_000;
    let t = Instant::now();
    blast(link.local_addr(), total, 8).await;
    let sent_for = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = link.stats();
    assert!(s.up.dropped_packets > 0, "no drop: {s:?}");
    // Every datagram the relay read was either sent on or dropped by the queue (the kernel
    // may have dropped some before the relay read them).
    assert!(s.up.bytes + s.up.dropped_bytes <= total as u64, "{s:?}");
    // What got through is at most the queue plus what the link sent meanwhile (+ one datagram
    // of slack per bound).
    let max_through = MIN_QUEUE_BYTES as f64 + (sent_for.as_secs_f64() + 0.3) * 20e6 / 8.0 + 2000.0;
    assert!(
        (s.up.bytes as f64) <= max_through,
        "{} bytes through, at most {max_through} possible",
        s.up.bytes
    );
    assert_eq!(sink.bytes.load(Ordering::Relaxed), s.up.bytes);
}

#[test]
fn the_emulator_runs_on_its_own_thread_and_closes_its_ports_on_drop() {
    // No tokio runtime here: a plain std echo server and client.
    let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let server_addr = server.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let profile = LinkProfile::parse("up=10mbit,down=10mbit,rtt=20ms").expect("profile");
    let link = LinkEmulator::start(server_addr, profile).expect("link");
    let port = link.local_addr();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let t = Instant::now();
    client.send_to(b"ping", port).expect("send");
    let mut buf = [0u8; 16];
    let (n, _) = client.recv_from(&mut buf).expect("echo");
    assert_eq!(&buf[..n], b"ping");
    assert!(t.elapsed() >= Duration::from_millis(20));
    drop(link);
    // `drop` returns after the relay thread closed its sockets: the port is free at once.
    assert!(
        std::net::UdpSocket::bind(port).is_ok(),
        "{port} still bound after the emulator was dropped"
    );
    assert!(LinkEmulator::start_shared(&[], LinkProfile::five_g()).is_err());
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_through_the_link_equals_the_direct_one_bit_for_bit() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load tiny model");
    let opts = GenerateOptions {
        prompt: "a small red circle at the top left on a white background".into(),
        steps: 2,
        guidance: 5.0,
        seed: 3,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        policy: Policy::Ppidm {
            gn: GnVariant::Exact,
        },
        wire: WireDtype::F32,
        ..Default::default()
    };
    let model = Arc::new(ShardModel::from_engine(&sd.unet, &sd.unet_engine));
    let cluster = spawn_local(4, model, ServerLimits::default()).expect("servers");
    let id = model_identity(&sd.unet, sd.unet_engine.weights());
    let client = ClientOptions {
        request_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let direct_backends = connect_all(&cluster.specs, id, &client)
        .await
        .expect("direct");
    let direct = sd
        .generate(&opts, &direct_backends, &mut |_| {})
        .await
        .expect("direct generation");
    drop(direct_backends);

    // A fast, short link so the test stays quick; the path is the same as with `5g`.
    let profile = LinkProfile::parse("up=200mbit,down=400mbit,rtt=6ms").expect("profile");
    let (link, routed) = LinkEmulator::front_servers(&cluster.specs, profile)
        .await
        .expect("link");
    for (r, s) in routed.iter().zip(&cluster.specs) {
        assert_ne!(r.address, s.address);
        assert_eq!((r.fingerprint, &r.token), (s.fingerprint, &s.token));
    }
    let backends = connect_all(&routed, id, &client).await.expect("via link");
    let t = Instant::now();
    let via = sd
        .generate(&opts, &backends, &mut |_| {})
        .await
        .expect("generation through the link");
    let took = t.elapsed();
    assert_eq!(max_abs_diff(&via.latents, &direct.latents), 0.0);
    assert_eq!(max_abs_diff(&via.image, &direct.image), 0.0);
    assert_eq!(via.stats.bytes_up, direct.stats.bytes_up);
    assert_eq!(via.stats.bytes_down, direct.stats.bytes_down);
    assert_eq!(via.stats.round_trips, direct.stats.round_trips);
    // Every tensor crossed the emulated link (UDP carries the payload plus QUIC's framing)…
    let s = link.stats();
    assert!(s.up.bytes >= via.stats.bytes_up, "{s:?}");
    assert!(s.down.bytes >= via.stats.bytes_down, "{s:?}");
    // …and each round trip paid the link's RTT.
    let floor = profile.rtt * via.stats.round_trips as u32;
    assert!(took >= floor, "{took:?} < {floor:?}");
    drop(backends);
    cluster.shutdown().await;
}
