//! Load on one `veil-server` process (`VEIL_SERVER_BIN`, as the abuse suite), loopback only,
//! bounded in count and time (`VEIL_LOAD_SECONDS`, default 20; the numbers in the closing
//! note are from longer runs): 16 concurrent `strict` clients generating in a loop for that long,
//! the server's resident memory within its budget and its memory accounting back to zero with
//! no session left once they disconnect; 8 honest clients beside one that loops over the hostile
//! requests get the image of an undisturbed run, bit for bit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::placement::ShardBackend;
use veil_core::transport::{connect_strips, ClientOptions, ServerSpec};
use veil_core::wire::{ErrorCode, Message, ModelId};

mod common;
use common::hostile::cases;
use common::process::{identity, sample_peak, Server, BUDGET, MIB};
use common::{exchange, load, raw_session, strict_64px};

fn opts(seed: u64) -> GenerateOptions {
    strict_64px(2, seed)
}

fn seconds() -> u64 {
    std::env::var("VEIL_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// One generation over its own session with `spec`; the image's values.
async fn generate(sd: &StableDiffusion, spec: &ServerSpec, id: ModelId, seed: u64) -> Vec<f32> {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let strips = connect_strips(std::slice::from_ref(spec), id, &options)
        .await
        .expect("connect");
    let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = strips
        .iter()
        .map(|s| s.clone() as Arc<dyn ShardBackend<Tensor>>)
        .collect();
    let g = sd
        .generate(&opts(seed), &backends, &mut |_| {})
        .await
        .expect("generate");
    for s in &strips {
        s.close().await;
    }
    g.image
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("pixels")
}

/// Waits (up to 10 s) until the server reports no session and no memory in use.
async fn settles(server: &Server) -> (u64, u64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let sessions = server.metric("veil_sessions_active").await;
        let used = server.metric("veil_memory_budget_used_bytes").await;
        if (sessions == 0 && used == 0) || Instant::now() > until {
            return (sessions, used);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_strict_clients_within_bounded_memory_that_is_given_back() {
    let mut server = Server::start("load16", true);
    let sd = Arc::new(load());
    let id = identity();
    // Warm-up: the first generation's allocations are the baseline's, not the load's.
    generate(&sd, &server.spec, id, 1).await;
    let baseline = server.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(server.child.id(), stop.clone());
    let deadline = Instant::now() + Duration::from_secs(seconds());
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16u64)
        .map(|c| {
            let (sd, spec, done) = (sd.clone(), server.spec.clone(), done.clone());
            tokio::spawn(async move {
                let mut seed = c;
                while Instant::now() < deadline {
                    generate(&sd, &spec, id, seed).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    seed += 16;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    let busy_sessions = server.metric("veil_sessions_total").await;
    let (sessions, used) = settles(&server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler").max(baseline);
    let after = server.rss();
    println!(
        "{} generations by 16 clients in {} s ({busy_sessions} sessions); server RSS {:.0} MiB \
         before, {:.0} MiB at most, {:.0} MiB after; {sessions} sessions and {used} budget bytes \
         left",
        done.load(Ordering::Relaxed),
        seconds(),
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    assert!(server.alive());
    assert!(done.load(Ordering::Relaxed) >= 16, "every client generated");
    assert_eq!(
        (sessions, used),
        (0, 0),
        "sessions or memory left after disconnect"
    );
    assert!(
        peak <= baseline + BUDGET,
        "RSS grew by {} MiB under load, over the {} MiB budget",
        (peak - baseline) / MIB,
        BUDGET / MIB
    );
    assert!(
        after <= baseline + BUDGET / 4,
        "RSS {} MiB over the baseline after disconnect",
        (after.saturating_sub(baseline)) / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_clients_beside_an_abuser_get_the_undisturbed_image() {
    let mut server = Server::start("load-abuse", true);
    let sd = Arc::new(load());
    let id = identity();
    let undisturbed = generate(&sd, &server.spec, id, 42).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let abuser = {
        let (spec, stop, answered) = (server.spec.clone(), stop.clone(), answered.clone());
        tokio::spawn(async move {
            let hostile = cases();
            let (mut _ep, mut conn) = raw_session(&spec, id).await;
            while !stop.load(Ordering::Relaxed) {
                for (what, bytes) in &hostile {
                    match exchange(&conn, bytes).await {
                        Some(Message::Error { code, .. }) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            // Breaking a wire limit ends the session.
                            if code == ErrorCode::Malformed {
                                (_ep, conn) = raw_session(&spec, id).await;
                            }
                        }
                        other => panic!("{what}: {other:?}"),
                    }
                }
            }
        })
    };
    let honest: Vec<_> = (0..8)
        .map(|_| {
            let (sd, spec) = (sd.clone(), server.spec.clone());
            tokio::spawn(async move { generate(&sd, &spec, id, 42).await })
        })
        .collect();
    for h in honest {
        let image = h.await.expect("honest client");
        assert!(
            image == undisturbed,
            "an honest image changed beside the abuser"
        );
    }
    stop.store(true, Ordering::Relaxed);
    abuser.await.expect("abuser");
    println!(
        "8 honest images equal the undisturbed one; {} hostile requests answered meanwhile",
        answered.load(Ordering::Relaxed)
    );
    assert!(answered.load(Ordering::Relaxed) > 0);
    assert!(server.alive());
    let (sessions, used) = settles(&server).await;
    assert_eq!((sessions, used), (0, 0));
}
