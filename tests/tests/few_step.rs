//! Few-step generation: guidance ≤ 1 (SD-Turbo / SDXL-Turbo run at guidance 0) drops the
//! classifier-free-guidance batch, so every U-Net call runs at batch 1 — on the phone under
//! `local`, and in every tensor that crosses to a server under `ppidm` and `strict` — and a
//! generation sends half the bytes of the same generation with guidance. The stochastic
//! samplers (euler-a, lcm) reproduce from the seed, and under `obfuscated` the server's early
//! steps and the phone's late steps draw the same step noise as a `local` run.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::pipeline::{GenerateOptions, Generation, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::{ShardReply, ShardRequest};
use veil_core::placement::{GnVariant, Policy, ShardBackend};
use veil_core::vocab::job::EarlySteps;
use veil_core::vocab::ops::ShardOp;
use veil_tests::{psnr, tiny_model};

fn opts(policy: Policy, scheduler: SchedulerKind, guidance: f64) -> GenerateOptions {
    GenerateOptions {
        prompt: "a small red circle at the top left on a white background".into(),
        steps: 4,
        guidance,
        seed: 11,
        // 128 px: latent 16×16, enough rows for two groups of two strips.
        width: 128,
        height: 128,
        scheduler,
        policy,
        ..Default::default()
    }
}

/// Passes requests through, keeping the batch dimension of every tensor that crossed: inline
/// operands up, outputs down, and the batch of a timestep embedding the server builds.
struct BatchProbe {
    inner: Arc<dyn ShardBackend<Tensor>>,
    batches: Seen,
}

#[async_trait]
impl ShardBackend<Tensor> for BatchProbe {
    async fn execute(
        &self,
        request: ShardRequest<Tensor>,
    ) -> veil_core::Result<ShardReply<Tensor>> {
        let mut seen = Vec::new();
        for call in &request.calls {
            if let ShardOp::TimestepEmbedding { batch, .. } = call.op {
                seen.push(batch);
            }
            seen.extend(call.op.inline_operands().iter().map(|t| t.dims()[0]));
        }
        let reply = self.inner.execute(request).await?;
        seen.extend(reply.outputs.iter().map(|t| t.dims()[0]));
        self.batches.lock().expect("probe").extend(seen);
        Ok(reply)
    }

    fn begin_step(&self, step: u64) {
        self.inner.begin_step(step);
    }

    async fn early_steps(&self, job: EarlySteps<Tensor>) -> veil_core::Result<Tensor> {
        self.inner.early_steps(job).await
    }
}

/// The batch sizes the probes of one run saw.
type Seen = Arc<Mutex<Vec<usize>>>;

/// `n` in-process servers behind probes, and what the probes saw.
fn probed(sd: &StableDiffusion, n: usize) -> (Vec<Arc<dyn ShardBackend<Tensor>>>, Seen) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let backends = sd
        .in_process_backends(n)
        .into_iter()
        .map(|inner| {
            Arc::new(BatchProbe {
                inner,
                batches: batches.clone(),
            }) as Arc<dyn ShardBackend<Tensor>>
        })
        .collect();
    (backends, batches)
}

async fn run(
    sd: &StableDiffusion,
    o: &GenerateOptions,
    b: &[Arc<dyn ShardBackend<Tensor>>],
) -> Generation {
    sd.generate(o, b, &mut |_| {}).await.expect("generate")
}

fn total_bytes(g: &Generation) -> u64 {
    g.stats.bytes_up + g.stats.bytes_down
}

/// The distinct batch sizes a run's tensors crossed with.
fn batch_sizes(seen: &Mutex<Vec<usize>>) -> Vec<usize> {
    let mut v = seen.lock().expect("probe").clone();
    v.sort_unstable();
    v.dedup();
    v
}

#[tokio::test]
async fn guidance_zero_runs_batch_one_and_halves_the_bytes() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let euler_a = SchedulerKind::EulerAncestral;

    // local: nothing leaves the phone; the U-Net runs half the rows, so half the FLOPs.
    let l5 = run(&sd, &opts(Policy::Local, euler_a, 5.0), &[]).await;
    let l0 = run(&sd, &opts(Policy::Local, euler_a, 0.0), &[]).await;
    println!(
        "local: device FLOPs {} (guidance 5) vs {} (guidance 0)",
        l5.stats.device_flops, l0.stats.device_flops
    );
    assert_eq!(total_bytes(&l0), 0);
    assert_eq!(2 * l0.stats.device_flops, l5.stats.device_flops);

    let ppidm = Policy::Ppidm {
        gn: GnVariant::Exact,
    };
    let strict_together = |g| GenerateOptions {
        guidance_halves: Some(GuidanceHalves::Together),
        ..opts(Policy::Strict, euler_a, g)
    };
    let cases: [(&str, GenerateOptions, GenerateOptions); 3] = [
        (
            "ppidm",
            opts(ppidm, euler_a, 5.0),
            opts(ppidm, euler_a, 0.0),
        ),
        (
            "strict (halves apart, its default)",
            opts(Policy::Strict, euler_a, 5.0),
            opts(Policy::Strict, euler_a, 0.0),
        ),
        (
            "strict (halves together)",
            strict_together(5.0),
            strict_together(0.0),
        ),
    ];
    for (name, guided, unguided) in cases {
        let (b5, seen5) = probed(&sd, 4);
        let g5 = run(&sd, &guided, &b5).await;
        let (b0, seen0) = probed(&sd, 4);
        let g0 = run(&sd, &unguided, &b0).await;
        let (t5, t0) = (total_bytes(&g5), total_bytes(&g0));
        println!(
            "{name}, 4 servers, 4 euler-a steps, 128 px: guidance 5 up {} + down {} = {t5} B \
             (batches {:?}); guidance 0 up {} + down {} = {t0} B (batches {:?}); ratio {:.6}",
            g5.stats.bytes_up,
            g5.stats.bytes_down,
            batch_sizes(&seen5),
            g0.stats.bytes_up,
            g0.stats.bytes_down,
            batch_sizes(&seen0),
            t0 as f64 / t5 as f64
        );
        // Without guidance every tensor crosses at batch 1.
        assert_eq!(batch_sizes(&seen0), vec![1], "{name}");
        assert_eq!(g0.stats.unet_calls, 4, "{name}");
        if name.contains("apart") {
            // Guided, each half is a batch-1 call on its own group of two servers; unguided,
            // the one batch-1 call spans all four, cut into strips half as tall: the halo rows
            // (a middle strip has two neighbours) and the per-strip GroupNorm replies grow with
            // the number of strips, so the saving is small (ratio printed above).
            assert_eq!(batch_sizes(&seen5), vec![1], "{name}");
            assert!(2 * t0 > t5 && t0 < t5, "{name}: {t0} vs {t5}");
            // Cut the same way (two strips), it is exactly half: the unguided call on two
            // servers sends what one guided half sent.
            let (b2, seen2) = probed(&sd, 2);
            let g2 = run(&sd, &unguided, &b2).await;
            println!(
                "{name}: guidance 0 on 2 servers up {} + down {} = {} B",
                g2.stats.bytes_up,
                g2.stats.bytes_down,
                total_bytes(&g2)
            );
            assert_eq!(batch_sizes(&seen2), vec![1], "{name}");
            assert_eq!(
                2 * total_bytes(&g2),
                t5,
                "{name}: two strips, half the bytes"
            );
        } else {
            assert_eq!(batch_sizes(&seen5), vec![2], "{name}");
            assert_eq!(2 * t0, t5, "{name}: guidance 0 should send exactly half");
            assert_eq!(2 * g0.stats.bytes_up, g5.stats.bytes_up, "{name}");
            assert_eq!(2 * g0.stats.bytes_down, g5.stats.bytes_down, "{name}");
        }
    }
}

#[tokio::test]
async fn stochastic_samplers_reproduce_and_split_like_local() {
    let sd = Arc::new(StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load"));
    for kind in [SchedulerKind::EulerAncestral, SchedulerKind::Lcm] {
        let o = opts(Policy::Local, kind, 0.0);
        let a = run(&sd, &o, &[]).await;
        let b = run(&sd, &o, &[]).await;
        assert_eq!(
            psnr(&a.image, &b.image),
            f64::INFINITY,
            "{kind}: not reproducible"
        );
        let other = run(
            &sd,
            &GenerateOptions {
                seed: 12,
                ..o.clone()
            },
            &[],
        )
        .await;
        assert!(psnr(&other.image, &a.image) < 60.0, "{kind}: seed ignored");

        // strict over 4 servers: the same step noise, so the local image.
        let strict = run(
            &sd,
            &opts(Policy::Strict, kind, 0.0),
            &sd.in_process_backends(4),
        )
        .await;
        let db = psnr(&strict.image, &a.image);
        assert!(db >= 60.0, "{kind} strict: {db} dB vs local");

        // obfuscated, the server running 2 of 4 steps: its noise is the phone's, so the real
        // candidate ends where a local run does.
        let mut obf = opts(Policy::Obfuscated, kind, 0.0);
        obf.obfuscation.server_steps = Some(2);
        let server = [sd.in_process_full_server()];
        let split = run(&sd, &obf, &server).await;
        let db = psnr(&split.image, &a.image);
        println!("{kind}: obfuscated (2 + 2 steps) {db:.1} dB vs local");
        assert!(db >= 60.0, "{kind} obfuscated: {db} dB vs local");
    }
}
