//! What a shard server holds: the U-Net's shard layers (every convolution and GroupNorm, by
//! diffusers name) and only their weights, plus the model identity of those weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use veil_core::model::config::ModelPaths;
use veil_core::model::layers::ShardLayer;
use veil_core::model::unet::UNet;
use veil_core::model::weights::WeightFile;
use veil_core::placement::backend::ShardExecutor;
use veil_core::placement::engine::CandleEngine;
use veil_core::wire::identity::{model_identity, shard_parameters};
use veil_core::wire::ModelId;

use crate::ServerError;

/// The layers and weights a shard server executes with.
#[derive(Debug, Clone)]
pub struct ShardModel {
    layers: HashMap<String, ShardLayer>,
    engine: CandleEngine,
    id: ModelId,
}

impl ShardModel {
    /// Loads the shard-layer weights of a diffusers-layout model folder (`unet/config.json` and
    /// `unet/diffusion_pytorch_model*.safetensors`; nothing else is read) onto `device`.
    pub fn load(root: &Path, device: &Device) -> Result<Self, ServerError> {
        let paths = ModelPaths::new(root)?;
        let unet = UNet::new(&paths.unet_config()?)?;
        let file = WeightFile::open_component(&paths.component("unet"), "diffusion_pytorch_model")?;
        let weights = shard_parameters(&unet)
            .into_iter()
            .map(|(name, shape)| {
                let t = file.load(&name, &shape, DType::F32, device)?;
                Ok((name, t))
            })
            .collect::<Result<HashMap<_, _>, veil_core::Error>>()?;
        Ok(Self::from_weights(&unet, weights, device))
    }

    /// A shard model over weights already in memory (extra, non-shard weights are dropped).
    pub fn from_weights(unet: &UNet, weights: HashMap<String, Tensor>, device: &Device) -> Self {
        let layers = unet.shard_layers();
        let names: Vec<String> = layers.keys().cloned().collect();
        let engine = CandleEngine::new(weights, device.clone()).subset(&names);
        let id = model_identity(unet, engine.weights());
        Self { layers, engine, id }
    }

    /// From a loaded pipeline's U-Net engine (shares the weight storage; for local servers).
    pub fn from_engine(unet: &UNet, engine: &CandleEngine) -> Self {
        Self::from_weights(unet, engine.weights().clone(), engine.device())
    }

    /// The model identity of the weights held.
    pub fn id(&self) -> ModelId {
        self.id
    }

    pub fn device(&self) -> &Device {
        self.engine.device()
    }

    /// Number of layers and of parameter values held.
    pub fn size(&self) -> (usize, usize) {
        let values = self.engine.weights().values().map(|t| t.elem_count()).sum();
        (self.layers.len(), values)
    }

    /// A fresh executor for one session (shares the weights).
    pub fn executor(&self) -> ShardExecutor<CandleEngine> {
        ShardExecutor::new(self.engine.clone(), self.layers.clone())
    }
}
