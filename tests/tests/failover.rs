//! Replicas of one tenant (`servers.toml` entries sharing `tenant`) and failover between them:
//! killing the replica that serves a strip mid-generation, or draining it, still yields the
//! image of an undisturbed run bit for bit (f32 wire), the strip having moved to the tenant's
//! other replica; with every replica of a tenant gone the generation fails with the typed error
//! a single server gives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use veil_core::client::pipeline::{GenerateOptions, Generation, StableDiffusion};
use veil_core::placement::ShardBackend;
use veil_core::transport::{connect_strips, ClientOptions, ReplicaSet, ServerSpec, TransportError};
use veil_core::Error;
use veil_server::{spawn_local, ShardServer};

mod common;
use common::{limits, load, model_id, shard_model, spawn_killable, strict_64px, Killable};

fn opts() -> GenerateOptions {
    strict_64px(6, 23)
}

/// Tenant a with two killable replicas and tenant b with one server: `(a1, a2, b)`.
fn two_tenants(sd: &StableDiffusion) -> (Killable, Killable, veil_server::LocalCluster) {
    let model = shard_model(sd);
    let a1 = spawn_killable(model.clone());
    let a2 = spawn_killable(model.clone());
    let b = spawn_local(1, model, limits()).expect("server b");
    (a1, a2, b)
}

fn client() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

fn of_tenant(spec: &ServerSpec, tenant: &str) -> ServerSpec {
    ServerSpec {
        tenant: Some(tenant.into()),
        ..spec.clone()
    }
}

fn backends(strips: &[Arc<ReplicaSet>]) -> Vec<Arc<dyn ShardBackend<Tensor>>> {
    strips
        .iter()
        .map(|s| s.clone() as Arc<dyn ShardBackend<Tensor>>)
        .collect()
}

fn pixels(g: &Generation) -> Vec<f32> {
    g.image
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("image values")
}

/// Runs `action` when strip 0's serving replica has been sent `n` more messages: mid-step,
/// so that the new replica must be rebuilt from the step's earlier requests.
fn after_requests(strips: &[Arc<ReplicaSet>], n: usize, action: impl Fn() + Send + Sync + 'static) {
    let serving = strips[0].active().expect("serving replica");
    let sent = AtomicUsize::new(0);
    serving.observe_sent(Some(Arc::new(move |_| {
        if sent.fetch_add(1, Ordering::Relaxed) + 1 == n {
            action();
        }
    })));
}

/// A generation over `specs`' strips, calling `at_step_2` once step 2 is done.
async fn run(
    sd: &StableDiffusion,
    specs: &[ServerSpec],
    at_step_2: &mut (dyn FnMut(&[Arc<ReplicaSet>]) + Send),
) -> (veil_core::Result<Generation>, Vec<Arc<ReplicaSet>>) {
    let strips = connect_strips(specs, model_id(sd), &client())
        .await
        .expect("connect");
    let b = backends(&strips);
    let result = sd
        .generate(&opts(), &b, &mut |p| {
            if p.step == 2 {
                at_step_2(&strips);
            }
        })
        .await;
    for s in &strips {
        s.close().await;
    }
    (result, strips)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_serving_replica_mid_generation_still_yields_the_undisturbed_image() {
    let sd = load();
    let (a1, a2, b) = two_tenants(&sd);
    // Strip 0 is tenant a (two replicas), strip 1 tenant b (one).
    let specs = vec![
        of_tenant(&a1.spec, "a"),
        of_tenant(&b.specs[0], "b"),
        of_tenant(&a2.spec, "a"),
    ];
    let (undisturbed, strips) = run(&sd, &specs, &mut |_| {}).await;
    let undisturbed = undisturbed.expect("undisturbed run");
    assert_eq!(strips.len(), 2);
    assert!(strips.iter().all(|s| s.failovers() == 0));

    let killed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let k = killed.clone();
    let (a1_kill, a2_kill) = (a1.kill.clone(), a2.kill.clone());
    let (a1_addr, a2_addr) = (a1.spec.address.clone(), a2.spec.address.clone());
    let started = Instant::now();
    let (disturbed, strips) = run(&sd, &specs, &mut |strips| {
        let serving = strips[0].address();
        let kill = if serving == a1_addr {
            a1_kill.clone()
        } else {
            assert_eq!(serving, a2_addr);
            a2_kill.clone()
        };
        // Dies on receiving the fourth request of step 3.
        after_requests(strips, 4, move || {
            let _ = kill.send(());
        });
        if let Ok(mut g) = k.lock() {
            *g = Some(serving);
        }
    })
    .await;
    let disturbed = disturbed.expect("the generation survives the replica's death");
    let killed = killed.lock().ok().and_then(|g| g.clone()).expect("killed");
    println!(
        "killed {killed}; strip 0 went on at {} ({:.1} s in all)",
        strips[0].address(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(strips[0].failovers(), 1);
    // The kill reaches the server's thread asynchronously: it dies on the 4th request of the
    // step or soon after, so at least the step's first three requests are replayed.
    let replayed = strips[0].replayed_requests();
    assert!(
        replayed >= 3,
        "the new replica was rebuilt from {replayed} requests, not the step's first ones"
    );
    assert_ne!(strips[0].address(), killed);
    assert_eq!(strips[1].failovers(), 0, "strip 1 never moves");
    assert_eq!(
        pixels(&disturbed),
        pixels(&undisturbed),
        "failover changed the image"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_hands_its_strip_to_another_of_its_tenant() {
    let sd = load();
    let model = shard_model(&sd);
    let a = spawn_local(2, model.clone(), limits()).expect("tenant a");
    let b = spawn_local(1, model, limits()).expect("tenant b");
    let specs = vec![
        of_tenant(&a.specs[0], "a"),
        of_tenant(&a.specs[1], "a"),
        of_tenant(&b.specs[0], "b"),
    ];
    let addresses: Vec<String> = a.specs.iter().map(|s| s.address.clone()).collect();
    let servers: Vec<Arc<Mutex<Option<ShardServer>>>> = a
        .servers
        .into_iter()
        .map(|s| Arc::new(Mutex::new(Some(s))))
        .collect();
    let (undisturbed, _) = run(&sd, &specs, &mut |_| {}).await;
    let undisturbed = undisturbed.expect("undisturbed run");

    let drained: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let d = drained.clone();
    let slots = servers.clone();
    let (disturbed, strips) = run(&sd, &specs, &mut |strips| {
        let serving = strips[0].address();
        let i = addresses
            .iter()
            .position(|a| *a == serving)
            .expect("a replica of tenant a serves strip 0");
        if let Some(server) = slots[i].lock().ok().and_then(|mut s| s.take()) {
            // SIGTERM's path, from the third request of step 3 on: no new sessions, then the
            // open ones closed as "draining".
            let server = Mutex::new(Some(server));
            let rt = tokio::runtime::Handle::current();
            after_requests(strips, 3, move || {
                if let Some(server) = server.lock().ok().and_then(|mut s| s.take()) {
                    rt.spawn(async move {
                        server.drain(Duration::ZERO).await;
                        server.shutdown(Duration::from_secs(1)).await;
                    });
                }
            });
        }
        if let Ok(mut g) = d.lock() {
            *g = Some(serving);
        }
    })
    .await;
    let disturbed = disturbed.expect("the generation survives the drain");
    let drained = drained
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .expect("drained");
    assert_eq!(strips[0].failovers(), 1);
    assert!(strips[0].replayed_requests() >= 1, "drained mid-step");
    assert_ne!(strips[0].address(), drained);
    assert_eq!(pixels(&disturbed), pixels(&undisturbed));
    for s in servers {
        if let Some(server) = s.lock().ok().and_then(|mut s| s.take()) {
            server.shutdown(Duration::from_secs(1)).await;
        }
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_gone_the_error_is_a_single_servers() {
    let sd = load();
    let (a1, a2, b) = two_tenants(&sd);
    let specs = vec![
        of_tenant(&a1.spec, "a"),
        of_tenant(&a2.spec, "a"),
        of_tenant(&b.specs[0], "b"),
    ];
    let (k1, k2) = (a1.kill.clone(), a2.kill.clone());
    let started = Instant::now();
    let (result, _) = run(&sd, &specs, &mut |_| {
        let _ = k1.send(());
        let _ = k2.send(());
    })
    .await;
    let e = match result {
        Err(Error::Transport(e)) => e,
        Err(other) => panic!("not a transport error: {other}"),
        Ok(_) => panic!("generated with every replica of strip 0 dead"),
    };
    println!("{e} after {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        matches!(
            e,
            TransportError::Timeout { server: 0, .. }
                | TransportError::ConnectionLost { server: 0, .. }
        ),
        "{e}"
    );
    // One request timeout on the serving replica, one failed connect to the other.
    assert!(started.elapsed() < Duration::from_secs(30));
    b.shutdown().await;
}
