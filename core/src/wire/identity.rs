//! Model identity: which weights a shard server holds. The phone computes it from its full U-Net
//! weights, a server from the shard weights it loaded; the handshake carries it so a server with
//! different weights refuses the session instead of computing garbage.
//!
//! SHA-256 over the parameters of the U-Net's shard layers (`UNet::shard_layers`: every
//! convolution and GroupNorm), sorted by name; for each parameter: the name's UTF-8 bytes, each
//! dimension as a little-endian u64, then the values as little-endian f32.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::model::unet::UNet;
use crate::vocab::layers::ShardLayer;
use crate::wire::ModelId;

/// Values hashed per chunk (bounds the temporary byte buffer).
const CHUNK: usize = 1 << 16;

/// The names and declared shapes of the parameters a shard server holds, sorted by name.
pub fn shard_parameters(unet: &UNet) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = unet
        .shard_layers()
        .values()
        .flat_map(ShardLayer::params)
        .collect();
    v.sort();
    v.dedup_by(|a, b| a.0 == b.0);
    v
}

/// The model identity of `weights` for `unet` (see the module documentation). A parameter that
/// is missing from `weights`, or cannot be read as f32, hashes as its name followed by an
/// all-ones marker instead of dimensions and data, so such a holder never matches a complete one.
pub fn model_identity(unet: &UNet, weights: &HashMap<String, Tensor>) -> ModelId {
    identity_of(unet, |name| weights.get(name).cloned())
}

/// The model identity of the shard parameters `fetch` hands out one at a time (a tensor may be
/// dropped as soon as it is hashed, so a manifest of SD1.5 does not hold its 3.4 GB at once).
/// `None` for a missing parameter (see `model_identity`).
pub fn identity_of(unet: &UNet, mut fetch: impl FnMut(&str) -> Option<Tensor>) -> ModelId {
    let mut h = Sha256::new();
    for (name, _) in shard_parameters(unet) {
        h.update(name.as_bytes());
        let values = fetch(&name).and_then(|t| {
            let dims = t.dims().to_vec();
            t.to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .ok()
                .map(|v| (dims, v))
        });
        match values {
            Some((dims, v)) => {
                for d in dims {
                    h.update((d as u64).to_le_bytes());
                }
                let mut buf = Vec::with_capacity(CHUNK.min(v.len()) * 4);
                for chunk in v.chunks(CHUNK) {
                    buf.clear();
                    for x in chunk {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                    h.update(&buf);
                }
            }
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    h.finalize().into()
}

/// A model identity as 64 lowercase hex digits.
pub fn model_id_hex(id: &ModelId) -> String {
    hex::encode(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::UNetConfig;
    use candle_core::Device;

    fn tiny_unet() -> UNet {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels":[8,16],"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
                "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":1,
                "attention_head_dim":2,"cross_attention_dim":8,"norm_num_groups":4,
                "in_channels":4,"out_channels":4}"#,
        )
        .expect("config");
        UNet::new(&cfg).expect("unet")
    }

    fn weights(unet: &UNet, offset: f32) -> HashMap<String, Tensor> {
        unet.parameters()
            .into_iter()
            .map(|(n, s)| {
                let len: usize = s.iter().product();
                let v: Vec<f32> = (0..len).map(|i| i as f32 * 1e-3 + offset).collect();
                let t = Tensor::from_vec(v, s.as_slice(), &Device::Cpu).expect("tensor");
                (n, t)
            })
            .collect()
    }

    #[test]
    fn identity_covers_shard_weights_only() {
        let unet = tiny_unet();
        let full = weights(&unet, 0.0);
        let shard: HashMap<String, Tensor> = shard_parameters(&unet)
            .into_iter()
            .filter_map(|(n, _)| full.get(&n).map(|t| (n, t.clone())))
            .collect();
        assert!(shard.len() < full.len());
        let a = model_identity(&unet, &full);
        assert_eq!(
            a,
            model_identity(&unet, &shard),
            "full and shard weights agree"
        );
        assert_ne!(a, model_identity(&unet, &weights(&unet, 0.5)));
        let mut missing = shard.clone();
        let first = shard_parameters(&unet)[0].0.clone();
        missing.remove(&first);
        assert_ne!(a, model_identity(&unet, &missing));
        // f16 storage hashes as its f32 values.
        let half: HashMap<String, Tensor> = shard
            .iter()
            .map(|(n, t)| {
                let r = t
                    .to_dtype(DType::F16)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .expect("round");
                (n.clone(), r)
            })
            .collect();
        let half16: HashMap<String, Tensor> = half
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::F16).expect("f16")))
            .collect();
        assert_eq!(model_identity(&unet, &half), model_identity(&unet, &half16));
        assert_eq!(model_id_hex(&a).len(), 64);
    }
}
