//! `strict` with the guidance halves apart (its default): the conditional and unconditional
//! halves of a step run on disjoint server groups (the phone runs the unconditional half when
//! there are fewer than 4 servers), so no server ever holds both halves of the same rows. The
//! image is unchanged against `local`; the audit shows which rows each group held; what it
//! costs (taller strips with N ≥ 4, phone FLOPs with N < 4) is measured against the halves
//! together.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::pipeline::{GenerateOptions, Generation, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::{Policy, ShardBackend};
use veil_tests::{psnr, tiny_model};

fn opts(policy: Policy, halves: Option<GuidanceHalves>) -> GenerateOptions {
    GenerateOptions {
        prompt: "a large blue square at the bottom on a black background".into(),
        steps: 4,
        guidance: 5.0,
        seed: 9,
        width: 128,
        height: 128,
        scheduler: SchedulerKind::Ddim,
        policy,
        guidance_halves: halves,
        ..Default::default()
    }
}

async fn run(
    sd: &StableDiffusion,
    o: &GenerateOptions,
    b: &[Arc<dyn ShardBackend<Tensor>>],
) -> Generation {
    sd.generate(o, b, &mut |_| {}).await.expect("generate")
}

/// The batch rows of every latent-resolution view a server received: apart, each server
/// holds one half (batch 1); together, both (batch 2).
fn strip_16(g: &Generation, server: usize) -> Option<[usize; 2]> {
    g.audit.strips[server]
        .get(&(16, 16))
        .map(|r| [r.start, r.end])
}

#[tokio::test]
async fn halves_apart_keep_the_image_and_split_the_servers() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let local = run(&sd, &opts(Policy::Local, None), &[]).await;

    // N = 4: two groups of two; each server's strip is half the map.
    let apart = run(&sd, &opts(Policy::Strict, None), &sd.in_process_backends(4)).await;
    let db = psnr(&apart.image, &local.image);
    assert!(db >= 60.0, "apart N = 4: {db} dB");
    assert_eq!(apart.audit.strips.len(), 4);
    let strips: Vec<_> = (0..4).map(|i| strip_16(&apart, i)).collect();
    assert_eq!(
        strips,
        vec![Some([0, 8]), Some([8, 16]), Some([0, 8]), Some([8, 16])]
    );
    assert_eq!(
        apart.audit.halves,
        vec![
            "conditional",
            "conditional",
            "unconditional",
            "unconditional"
        ]
    );
    for i in 0..4 {
        assert!(apart.audit.bytes(i) > 0, "server {i} idle");
        assert_eq!(apart.audit.text_indexed_bytes(i), 0);
    }
    let audited: u64 = (0..4).map(|i| apart.audit.bytes(i)).sum();
    assert_eq!(audited, apart.stats.bytes_up);

    let together = run(
        &sd,
        &opts(Policy::Strict, Some(GuidanceHalves::Together)),
        &sd.in_process_backends(4),
    )
    .await;
    assert!(psnr(&together.image, &local.image) >= 60.0);
    let strips: Vec<_> = (0..4).map(|i| strip_16(&together, i)).collect();
    assert_eq!(
        strips,
        vec![Some([0, 4]), Some([4, 8]), Some([8, 12]), Some([12, 16])]
    );
    assert_eq!(together.audit.halves, vec!["both"; 4]);
    // Concurrent halves: a step waits for no more round trips than with the halves together.
    assert!(apart.stats.round_trips <= together.stats.round_trips);
    // The same server work, less the per-element work on halo rows of fewer strip boundaries;
    // the phone's work is the same.
    assert!(apart.stats.server_flops <= together.stats.server_flops);
    assert!(apart.stats.server_flops as f64 > 0.99 * together.stats.server_flops as f64);
    assert_eq!(apart.stats.device_flops, together.stats.device_flops);
    println!(
        "N = 4 apart vs together: up {} / {} B, round trips {} / {}",
        apart.stats.bytes_up,
        together.stats.bytes_up,
        apart.stats.round_trips,
        together.stats.round_trips
    );

    // N = 2: both servers run the conditional half; the phone runs the unconditional one.
    let two = run(&sd, &opts(Policy::Strict, None), &sd.in_process_backends(2)).await;
    assert!(psnr(&two.image, &local.image) >= 60.0);
    assert_eq!(
        (0..2).map(|i| strip_16(&two, i)).collect::<Vec<_>>(),
        vec![Some([0, 8]), Some([8, 16])]
    );
    assert_eq!(two.audit.halves, vec!["conditional"; 2]);
    let two_together = run(
        &sd,
        &opts(Policy::Strict, Some(GuidanceHalves::Together)),
        &sd.in_process_backends(2),
    )
    .await;
    assert!(two.stats.device_flops > two_together.stats.device_flops);
    assert!(two.stats.server_flops * 2 <= two_together.stats.server_flops);
    assert!(two.stats.server_flops * 2 > two_together.stats.server_flops * 99 / 100);
    assert!(two.stats.bytes_up < two_together.stats.bytes_up);
    println!(
        "N = 2 apart (uncond on the phone) vs together: phone {} / {} FLOP, up {} / {} B",
        two.stats.device_flops,
        two_together.stats.device_flops,
        two.stats.bytes_up,
        two_together.stats.bytes_up
    );

    // Without guidance there is one half: all servers run it, as before.
    let mut o = opts(Policy::Strict, None);
    o.guidance = 1.0;
    let plain = run(&sd, &o, &sd.in_process_backends(4)).await;
    assert_eq!(strip_16(&plain, 3), Some([12, 16]));
}
