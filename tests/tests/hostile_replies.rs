//! The phone distrusts what shard servers answer: a reply whose shape the request does not
//! imply (a short GroupNorm-statistics reply, a tensor too many or too few), or that carries a
//! NaN, ends the generation with a typed error naming the server — never a panic, and never a
//! NaN in the image. Every generation here also passes the check when the servers are honest.

use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::placement::backend::{ShardReply, ShardRequest};
use veil_core::placement::{Policy, ShardBackend};
use veil_core::vocab::job::EarlySteps;
use veil_core::Error;
use veil_tests::tiny_model;

#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Drops the last entry of the last dimension of every [B, G, 3] reply (GroupNorm stats).
    ShortStats,
    /// Puts a NaN at the start of every reply.
    NaN,
    /// Answers one tensor more than asked.
    Extra,
    /// Answers nothing.
    Nothing,
}

struct Liar {
    inner: Arc<dyn ShardBackend<Tensor>>,
    lie: Lie,
}

fn tamper(t: &Tensor, lie: Lie) -> veil_core::Result<Tensor> {
    Ok(match lie {
        Lie::ShortStats if t.rank() == 3 && t.dims()[2] == 3 => t.narrow(2, 0, 2)?,
        Lie::NaN => {
            let flat = t.flatten_all()?;
            let nan = Tensor::new(&[f32::NAN], t.device())?;
            let rest = flat.narrow(0, 1, flat.dim(0)? - 1)?;
            Tensor::cat(&[&nan, &rest], 0)?.reshape(t.dims())?
        }
        _ => t.clone(),
    })
}

#[async_trait]
impl ShardBackend<Tensor> for Liar {
    async fn execute(
        &self,
        request: ShardRequest<Tensor>,
    ) -> veil_core::Result<ShardReply<Tensor>> {
        let mut r = self.inner.execute(request).await?;
        r.outputs = r
            .outputs
            .iter()
            .map(|t| tamper(t, self.lie))
            .collect::<veil_core::Result<_>>()?;
        match self.lie {
            Lie::Extra => {
                if let Some(t) = r.outputs.first().cloned() {
                    r.outputs.push(t);
                }
            }
            Lie::Nothing => r.outputs.clear(),
            _ => {}
        }
        Ok(r)
    }

    async fn early_steps(&self, job: EarlySteps<Tensor>) -> veil_core::Result<Tensor> {
        self.inner.early_steps(job).await
    }
}

fn opts(policy: Policy) -> GenerateOptions {
    GenerateOptions {
        prompt: "a small red circle at the top on a white background".into(),
        steps: 2,
        seed: 3,
        width: 64,
        height: 64,
        policy,
        ..Default::default()
    }
}

#[tokio::test]
async fn lying_servers_end_the_generation_with_a_typed_error() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    for policy in [
        Policy::Strict,
        Policy::Ppidm {
            gn: Default::default(),
        },
    ] {
        let honest = sd.in_process_backends(4);
        let ok = sd.generate(&opts(policy), &honest, &mut |_| {}).await;
        assert!(
            ok.is_ok(),
            "{policy:?}: honest servers fail the check: {:?}",
            ok.err()
        );
        for lie in [Lie::ShortStats, Lie::NaN, Lie::Extra, Lie::Nothing] {
            // Server 2 lies; the others are honest.
            let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = sd
                .in_process_backends(4)
                .into_iter()
                .enumerate()
                .map(|(i, inner)| match i {
                    2 => Arc::new(Liar { inner, lie }) as Arc<dyn ShardBackend<Tensor>>,
                    _ => inner,
                })
                .collect();
            let r = sd.generate(&opts(policy), &backends, &mut |_| {}).await;
            match r {
                Err(Error::Backend { backend, message }) => {
                    assert!(message.contains("protocol error"), "{lie:?}: {message}");
                    // The halves-apart layout renumbers nothing: server 2 is named.
                    assert_eq!(backend, 2, "{policy:?} {lie:?}: {message}");
                }
                Err(e) => panic!("{policy:?} {lie:?}: another error: {e}"),
                Ok(_) => panic!("{policy:?} {lie:?}: the lie went unnoticed"),
            }
        }
    }
}
