//! Whole generations: `ppidm` against `local` on the committed tiny model (PSNR of the final
//! image), the paper's lossy GroupNorm reported, and the shape-only plan equal to what a real
//! run measured.

use candle_core::Device;
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::client::plan::{account_step, plan, PlanInput};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::{GnVariant, Policy, WireDtype};
use veil_tests::{psnr, tiny_model};

fn opts(policy: Policy) -> GenerateOptions {
    GenerateOptions {
        prompt: "a small red circle at the top left on a white background".into(),
        steps: 8,
        guidance: 5.0,
        seed: 3,
        // 128 px: latent 16x16, so the U-Net's 8-row level still splits over 8 backends.
        width: 128,
        height: 128,
        scheduler: SchedulerKind::Ddim,
        policy,
        ..Default::default()
    }
}

#[tokio::test]
async fn ppidm_exact_generation_matches_local_above_60_db() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let local = sd
        .generate(&opts(Policy::Local), &[], &mut |_| {})
        .await
        .expect("local");
    for n in [1, 2, 3, 4, 8] {
        let backends = sd.in_process_backends(n);
        let mut steps = 0;
        let out = sd
            .generate(
                &opts(Policy::Ppidm {
                    gn: GnVariant::Exact,
                }),
                &backends,
                &mut |_| steps += 1,
            )
            .await
            .expect("ppidm");
        assert_eq!(steps, 8, "one progress report per step");
        let db = psnr(&out.image, &local.image);
        println!(
            "ppidm exact, N = {n}: PSNR vs local = {db:.1} dB, up {} B, down {} B",
            out.stats.bytes_up, out.stats.bytes_down
        );
        assert!(db >= 60.0, "N = {n}: {db} dB");
        assert_eq!(out.stats.per_server.len(), n);
        assert!(out
            .stats
            .per_server
            .iter()
            .all(|s| s.bytes_up > 0 && s.bytes_down > 0));
    }
}

#[tokio::test]
async fn ppidm_paper_gn_deviation_is_reported() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let local = sd
        .generate(&opts(Policy::Local), &[], &mut |_| {})
        .await
        .expect("local");
    for n in [2, 4, 8] {
        let backends = sd.in_process_backends(n);
        let out = sd
            .generate(
                &opts(Policy::Ppidm {
                    gn: GnVariant::Paper,
                }),
                &backends,
                &mut |_| {},
            )
            .await
            .expect("ppidm");
        let db = psnr(&out.image, &local.image);
        // PPIDM's Table V: PPIGN is the lossy part. It must differ visibly from local.
        println!("ppidm paper GN, N = {n}: PSNR vs local = {db:.1} dB");
        assert!(db < 60.0, "paper GN should be lossy, got {db} dB");
    }
}

#[tokio::test]
async fn f16_wire_costs_half_the_bytes_and_little_fidelity() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let backends = sd.in_process_backends(2);
    let local = sd
        .generate(&opts(Policy::Local), &[], &mut |_| {})
        .await
        .expect("local");
    let f32 = sd
        .generate(
            &opts(Policy::Ppidm {
                gn: GnVariant::Exact,
            }),
            &backends,
            &mut |_| {},
        )
        .await
        .expect("f32");
    let mut o = opts(Policy::Ppidm {
        gn: GnVariant::Exact,
    });
    o.wire = WireDtype::F16;
    let f16 = sd.generate(&o, &backends, &mut |_| {}).await.expect("f16");
    assert_eq!(f16.stats.bytes_up * 2, f32.stats.bytes_up);
    // Down: half, except the GroupNorm statistics, which come back in f32 under either wire
    // (their sums of squares overflow f16): 2·f16 − f32 is exactly their bytes, a sliver.
    let stats = f16.stats.bytes_down * 2 - f32.stats.bytes_down;
    assert!(
        stats > 0 && stats * 100 < f32.stats.bytes_down,
        "{stats} B of statistics in {} B down",
        f32.stats.bytes_down
    );
    let db = psnr(&f16.image, &local.image);
    println!("ppidm exact, f16 wire: PSNR vs local = {db:.1} dB");
    assert!(db > 30.0 && db < 200.0, "{db}");
}

#[tokio::test]
async fn plan_equals_measured_traffic() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let ppidm = Policy::Ppidm {
        gn: GnVariant::Exact,
    };
    for (n, wire, policy) in [
        (3, WireDtype::F32, ppidm),
        (4, WireDtype::F16, ppidm),
        (3, WireDtype::F32, Policy::Strict),
        (8, WireDtype::F16, Policy::Strict),
    ] {
        let mut o = opts(policy);
        o.steps = 2;
        o.wire = wire;
        let backends = sd.in_process_backends(n);
        let run = sd.generate(&o, &backends, &mut |_| {}).await.expect("run");
        let input = PlanInput {
            latent_height: 16,
            latent_width: 16,
            batch: 2,
            context_len: 77,
            servers: n,
            policy,
            wire,
            reuse_attention: false,
            stale_sync: false,
            guidance_halves: None,
        };
        let step = account_step(&sd.unet, &input).expect("plan");
        assert_eq!(run.stats.bytes_up, 2 * step.bytes_up(), "bytes up");
        assert_eq!(run.stats.bytes_down, 2 * step.bytes_down(), "bytes down");
        assert_eq!(run.stats.round_trips, 2 * step.round_trips, "round trips");
        assert_eq!(
            run.stats.server_flops,
            2 * step.server_flops_total(),
            "server FLOPs"
        );
        assert_eq!(
            run.stats.device_flops,
            2 * step.device_flops,
            "device FLOPs"
        );
        for i in 0..n {
            assert_eq!(run.stats.per_server[i].bytes_up, 2 * step.bytes_up_of(i));
        }
        let p = plan(&sd.unet, &input).expect("plan");
        assert_eq!(p.bytes_up_per_step, step.bytes_up());
        println!(
            "{} N = {n} {wire}: plan = measured ({} B up per step)",
            policy.name(),
            step.bytes_up()
        );
    }
}

#[test]
fn sd15_plan_matches_ppidm_groupnorm_table() {
    // PPIDM Table X (N = 4, 512 px): GN upload 85.93 MB per device, 343.74 MB in all, which is
    // the full fp32 GroupNorm input at CFG batch 2 (MB = 2^20 bytes).
    let cfg = veil_core::model::config::read_json(
        &veil_tests::repo_root().join("models/configs/sd15/unet/config.json"),
    )
    .expect("cfg");
    let unet = veil_core::model::unet::UNet::new(&cfg).expect("unet");
    let p = plan(
        &unet,
        &PlanInput {
            latent_height: 64,
            latent_width: 64,
            batch: 2,
            context_len: 77,
            servers: 4,
            policy: Policy::Ppidm {
                gn: GnVariant::Exact,
            },
            wire: WireDtype::F32,
            reuse_attention: false,
            stale_sync: false,
            guidance_halves: None,
        },
    )
    .expect("plan");
    let gn = p
        .per_kind_per_device
        .iter()
        .find(|r| r.kind == veil_core::placement::OpKind::GroupNorm)
        .expect("gn row");
    assert_eq!(gn.layers, 61);
    let per_device_mb = gn.up_total as f64 / 1048576.0;
    assert!((per_device_mb - 85.93).abs() < 0.05, "{per_device_mb}");
    let conv = p
        .per_kind_per_device
        .iter()
        .find(|r| r.kind == veil_core::placement::OpKind::Conv)
        .expect("conv row");
    assert_eq!(conv.layers, 98, "SD1.5 has 98 convolutions");
    // 803 GMAC per call (DESIGN.md §2): our FLOPs count multiply and add, plus bias/softmax terms.
    let gflop = (p.phone_flops_per_step + p.server_flops_per_step) as f64 / 1e9;
    assert!((1600.0..1700.0).contains(&gflop), "{gflop} GFLOP");
}

/// Stale synchronisation at SD1.5 scale (512 px, N = 4, CFG, `strict` with the guidance halves
/// apart): a stale step waits only for the attention gathers and the output, at most 20 round
/// trips against the exact step's 84, and moves the same bytes.
#[test]
fn sd15_stale_sync_plan_round_trips() {
    let cfg = veil_core::model::config::read_json(
        &veil_tests::repo_root().join("models/configs/sd15/unet/config.json"),
    )
    .expect("cfg");
    let unet = veil_core::model::unet::UNet::new(&cfg).expect("unet");
    let input = |stale_sync| PlanInput {
        latent_height: 64,
        latent_width: 64,
        batch: 2,
        context_len: 77,
        servers: 4,
        policy: Policy::Strict,
        wire: WireDtype::F16,
        reuse_attention: false,
        stale_sync,
        guidance_halves: None,
    };
    let exact = plan(&unet, &input(false)).expect("plan");
    let stale = plan(&unet, &input(true)).expect("plan");
    println!(
        "SD1.5 strict N = 4: {} round trips per step exact, {} stale",
        exact.round_trips_per_step, stale.round_trips_per_step
    );
    assert_eq!(exact.round_trips_per_step, 84);
    assert!(stale.round_trips_per_step <= 20);
    // 16 transformer blocks' gathers and the output.
    assert_eq!(stale.round_trips_per_step, 17);
    assert_eq!(stale.bytes_up_per_step, exact.bytes_up_per_step);
    assert_eq!(stale.bytes_down_per_step, exact.bytes_down_per_step);
}

/// A stale-synchronised run accounts what its plan says: the exact first step, then stale ones.
#[tokio::test]
async fn stale_sync_plan_equals_measured() {
    let sd = StableDiffusion::load(&veil_tests::tiny_model(), &Device::Cpu).expect("load");
    let mut o = opts(Policy::Strict);
    o.steps = 3;
    o.stale_sync_from = Some(1);
    let backends = sd.in_process_backends(4);
    let run = sd.generate(&o, &backends, &mut |_| {}).await.expect("run");
    let input = |stale_sync| PlanInput {
        latent_height: 16,
        latent_width: 16,
        batch: 2,
        context_len: 77,
        servers: 4,
        policy: Policy::Strict,
        wire: WireDtype::F32,
        reuse_attention: false,
        stale_sync,
        guidance_halves: None,
    };
    let exact = account_step(&sd.unet, &input(false)).expect("plan");
    let stale = account_step(&sd.unet, &input(true)).expect("plan");
    assert!(stale.round_trips < exact.round_trips);
    assert_eq!(
        run.stats.round_trips,
        exact.round_trips + 2 * stale.round_trips
    );
    assert_eq!(run.stats.bytes_up, exact.bytes_up() + 2 * stale.bytes_up());
    assert_eq!(
        run.stats.bytes_down,
        exact.bytes_down() + 2 * stale.bytes_down()
    );
}
