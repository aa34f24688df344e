//! What a shard server holds: the U-Net's shard layers (every convolution and GroupNorm, by
//! diffusers name) and only their weights, plus the model identity of those weights.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use veil_core::client::hybrid::EarlyStepsRunner;
use veil_core::client::pipeline::StableDiffusion;
use veil_core::model::config::ModelPaths;
use veil_core::model::layers::ShardLayer;
use veil_core::model::lora::{adapted_identity, LoraAdapter};
use veil_core::model::unet::UNet;
use veil_core::model::weights::load_unet_parameters;
use veil_core::placement::backend::ShardExecutor;
use veil_core::placement::engine::CandleEngine;
use veil_core::wire::identity::{model_identity, shard_parameters};
use veil_core::wire::manifest::{full_model_identity, hash_components};
use veil_core::wire::ModelId;

use crate::ServerError;

/// The layers and weights a shard server executes with.
#[derive(Clone)]
pub struct ShardModel {
    layers: HashMap<String, ShardLayer>,
    engine: CandleEngine,
    id: ModelId,
    /// The whole pipeline, where this server also runs the `obfuscated` policy's early steps.
    denoiser: Option<Arc<dyn EarlyStepsRunner<Tensor>>>,
}

impl std::fmt::Debug for ShardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardModel")
            .field("layers", &self.layers.len())
            .field("id", &hex::encode(self.id))
            .field("early_steps", &self.denoiser.is_some())
            .finish()
    }
}

impl ShardModel {
    /// Loads the shard-layer weights of a diffusers-layout model folder (`unet/config.json` and
    /// `unet/diffusion_pytorch_model*.safetensors`; nothing else is read) onto `device`, in
    /// their stored precision.
    pub fn load(root: &Path, device: &Device) -> Result<Self, ServerError> {
        let paths = ModelPaths::new(root)?;
        let unet = UNet::new(&paths.unet_config()?)?;
        // Stored precision (f16 stays f16, widened per op): half the memory of an f32 copy.
        let weights =
            load_unet_parameters(&paths.component("unet"), &shard_parameters(&unet), device)?;
        Ok(Self::from_weights(&unet, weights, device))
    }

    /// A shard model over weights already in memory (extra, non-shard weights are dropped).
    pub fn from_weights(unet: &UNet, weights: HashMap<String, Tensor>, device: &Device) -> Self {
        let layers = unet.shard_layers();
        let names: Vec<String> = layers.keys().cloned().collect();
        let engine = CandleEngine::new(weights, device.clone()).subset(&names);
        let id = model_identity(unet, engine.weights());
        Self {
            layers,
            engine,
            id,
            denoiser: None,
        }
    }

    /// The whole model of a diffusers folder: the shard layers, and the pipeline that runs the
    /// `obfuscated` policy's early steps (tokenizer, text encoder, U-Net, scheduler).
    pub fn load_full(root: &Path, device: &Device) -> Result<Self, ServerError> {
        let sd = Arc::new(StableDiffusion::load(root, device)?);
        let components = hash_components(root)?;
        Ok(Self::from_engine(&sd.unet, &sd.unet_engine)
            .with_denoiser(sd)
            .with_full_identity(&components))
    }

    /// Loads the model (`load`, or `load_full` when `full`) and merges the LoRA adapters
    /// `loras` (file, scale) into it. The identity presented is the base model's adapted by
    /// each adapter's digest over the shard layers (`adapted_identity`), which a phone merging
    /// the same adapters computes from its manifest without reading the servers' weights.
    pub fn load_adapted(
        root: &Path,
        device: &Device,
        full: bool,
        loras: &[(std::path::PathBuf, f64)],
    ) -> Result<Self, ServerError> {
        if loras.is_empty() {
            return match full {
                true => Self::load_full(root, device),
                false => Self::load(root, device),
            };
        }
        if full {
            let mut sd = StableDiffusion::load(root, device)?;
            let base = model_identity(&sd.unet, sd.unet_engine.weights());
            for (path, scale) in loras {
                sd = sd.with_lora(path, *scale)?;
            }
            let id = sd.full_identity(&base, &hash_components(root)?);
            let sd = Arc::new(sd);
            let mut model = Self::from_engine(&sd.unet, &sd.unet_engine).with_denoiser(sd);
            model.id = id;
            return Ok(model);
        }
        let mut model = Self::load(root, device)?;
        let paths = ModelPaths::new(root)?;
        let unet = UNet::new(&paths.unet_config()?)?;
        let shard = unet.shard_layers();
        let is_shard = |m: &str| shard.contains_key(m);
        let mut digests = Vec::new();
        let mut weights = model.engine.weights().clone();
        for (path, scale) in loras {
            let adapter = LoraAdapter::load(path, &unet)?;
            adapter.merge_into(&mut weights, *scale)?;
            digests.extend(adapter.digest(&is_shard, *scale)?);
        }
        *model.engine.weights_mut() = weights;
        model.id = adapted_identity(&model.id, &digests);
        Ok(model)
    }

    /// Presents the full-model identity (`wire::manifest::full_model_identity`): the U-Net's
    /// shard identity and the files of the text encoder, tokenizer and scheduler, whose
    /// answers to the `obfuscated` policy's early steps depend on them too.
    pub fn with_full_identity(mut self, components: &[(String, String)]) -> Self {
        self.id = full_model_identity(&self.id, components);
        self
    }

    /// Lets this model's sessions run early steps with `runner`.
    pub fn with_denoiser(mut self, runner: Arc<dyn EarlyStepsRunner<Tensor>>) -> Self {
        self.denoiser = Some(runner);
        self
    }

    /// Whether this server runs the `obfuscated` policy's early steps.
    pub fn serves_early_steps(&self) -> bool {
        self.denoiser.is_some()
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
        let e = ShardExecutor::new(self.engine.clone(), self.layers.clone());
        match &self.denoiser {
            Some(d) => e.with_denoiser(d.clone()),
            None => e,
        }
    }
}
