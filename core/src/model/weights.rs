//! Weight loading from safetensors files of a diffusers-layout folder, memory-mapped, f32, f16 or
//! bf16 on disk. Matrices and kernels can stay in their stored precision (`load_stored`; the
//! layers that hold them convert per use, which is exact: f16 and bf16 widen to f32 without
//! rounding), so an f16 checkpoint costs the phone half the memory of converting it on load.
//! Every miss names the tensor and the file; every shape mismatch names both shapes. `RecordingBackend` lets tests see exactly which
//! parameters a model asks for, without allocating the weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::model::unet::UNet;
use crate::vocab::error::{Error, Result};

/// The safetensors weights of one component (`unet/`, `vae/`, `text_encoder/`).
pub struct WeightFile {
    tensors: MmapedSafetensors,
    location: String,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("location", &self.location)
            .finish()
    }
}

impl WeightFile {
    /// Opens `<dir>/<stem>.safetensors`, else the fp16 variant `<stem>.fp16.safetensors`, else a
    /// sharded `<stem>.safetensors.index.json` (diffusers' and transformers' file names).
    pub fn open_component(dir: &Path, stem: &str) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if single.is_file() {
            Self::open(&[single])
        } else if fp16.is_file() {
            Self::open(&[fp16])
        } else if index.is_file() {
            let shards = shards_of_index(&index)?;
            Self::open(&shards)
        } else {
            Err(Error::MissingFile {
                path: single,
                what: format!(
                    "weights of {} (also looked for {stem}.fp16.safetensors and {stem}.safetensors.index.json)",
                    dir.display()
                ),
            })
        }
    }

    /// Opens one or more safetensors files as one name space.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p.clone(),
                    what: "safetensors weights".into(),
                });
            }
        }
        let location = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: `MmapedSafetensors` maps the files read-only. The mapping stays valid for the
        // life of `self`; the only hazard is another process truncating or rewriting the file
        // while it is mapped, which would be undefined behaviour as for any mmap. Model folders
        // are immutable inputs by contract (documented in README: do not rewrite weights while
        // Veil runs), and the header is validated by the safetensors crate before any access.
        let tensors = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Config {
            path: paths.first().cloned().unwrap_or_default(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(Self { tensors, location })
    }

    /// Every tensor name in the file(s) with its shape.
    pub fn names_and_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .tensors
            .tensors()
            .into_iter()
            .map(|(n, view)| (n, view.shape().to_vec()))
            .collect();
        v.sort();
        v
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Loads `name`, checks its shape, converts to `dtype`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        self.check(name, shape)?;
        Ok(self.tensors.load(name, dev)?.to_dtype(dtype)?)
    }

    /// Loads `name` and checks its shape; a matrix or kernel (two or more dimensions) stored as
    /// f16 or bf16 stays so, anything else becomes f32 (biases and norms are small, and f32
    /// spares every op a conversion).
    pub fn load_stored(&self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        self.check(name, shape)?;
        let t = self.tensors.load(name, dev)?;
        let keep = shape.len() >= 2 && matches!(t.dtype(), DType::F16 | DType::BF16);
        Ok(if keep { t } else { t.to_dtype(DType::F32)? })
    }

    /// The precision this file's parameters are stored in: f16 or bf16 when every floating
    /// tensor is, else f32. A `VarBuilder` of that dtype hands out tensors without converting.
    pub fn storage_dtype(&self) -> DType {
        let mut seen = self
            .tensors
            .tensors()
            .into_iter()
            .filter_map(|(_, v)| DType::try_from(v.dtype()).ok())
            .filter(|d| d.is_float());
        match seen.next() {
            Some(DType::F16) if seen.all(|d| d == DType::F16) => DType::F16,
            Some(DType::BF16) if seen.all(|d| d == DType::BF16) => DType::BF16,
            _ => DType::F32,
        }
    }

    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let view = self.tensors.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
            location: self.location.clone(),
        })?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        Ok(())
    }

    /// A candle `VarBuilder` over this file whose misses and shape errors keep their typed
    /// form: after a failed model construction, call `take_error` on the returned slot.
    pub fn var_builder(
        self: Arc<Self>,
        dtype: DType,
        dev: &Device,
    ) -> (VarBuilder<'static>, ErrorSlot) {
        let slot = ErrorSlot::default();
        let backend = CheckedBackend {
            file: self,
            first_error: slot.clone(),
        };
        (
            VarBuilder::from_backend(Box::new(backend), dtype, dev.clone()),
            slot,
        )
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let idx: Index = crate::model::config::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Holds the first typed error a `CheckedBackend` produced, so a candle error coming out of a
/// model constructor can be replaced by the precise one.
#[derive(Clone, Default, Debug)]
pub struct ErrorSlot(Arc<Mutex<Option<Error>>>);

impl ErrorSlot {
    fn set(&self, e: Error) {
        if let Ok(mut g) = self.0.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
    }
    /// The typed error if one was recorded, else `fallback` converted.
    pub fn resolve(&self, fallback: candle_core::Error) -> Error {
        match self.0.lock().ok().and_then(|mut g| g.take()) {
            Some(e) => e,
            None => Error::Tensor(fallback),
        }
    }
}

struct CheckedBackend {
    file: Arc<WeightFile>,
    first_error: ErrorSlot,
}

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.file.load(name, s.dims(), dtype, dev).map_err(|e| {
            let msg = e.to_string();
            self.first_error.set(e);
            candle_core::Error::Msg(msg)
        })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.file.tensors.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file.tensors.get(name).is_ok()
    }
}

/// A parameter name with its shape.
pub type NamedShape = (String, Vec<usize>);

/// A `VarBuilder` backend that hands out zero-cost broadcast tensors and records every
/// (name, shape) asked for. With a reference list it answers `contains_tensor` from it and
/// refuses names or shapes outside it, as a real checkpoint would.
#[derive(Clone, Default)]
pub struct RecordingBackend {
    reference: Option<Arc<HashMap<String, Vec<usize>>>>,
    requested: Arc<Mutex<Vec<NamedShape>>>,
}

impl RecordingBackend {
    pub fn new(reference: Option<HashMap<String, Vec<usize>>>) -> Self {
        Self {
            reference: reference.map(Arc::new),
            requested: Arc::default(),
        }
    }
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }
    /// Names and shapes asked for so far, sorted by name.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = self.requested.lock().map(|g| g.clone()).unwrap_or_default();
        v.sort();
        v.dedup();
        v
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(r) = &self.reference {
            match r.get(name) {
                None => candle_core::bail!("no tensor {name} in reference"),
                Some(shape) if shape.as_slice() != s.dims() => {
                    candle_core::bail!("shape of {name}: reference {shape:?}, asked {:?}", s.dims())
                }
                _ => {}
            }
        }
        if let Ok(mut g) = self.requested.lock() {
            g.push((name.to_string(), s.dims().to_vec()));
        }
        // A broadcast scalar has the requested shape but owns a single element.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unchecked access to {name} is not recorded")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.reference
            .as_ref()
            .is_some_and(|r| r.contains_key(name))
    }
}

/// Loads exactly the parameters `unet` asks for from `unet/`, checking every shape, in f32.
pub fn load_unet_weights(
    dir: &Path,
    unet: &UNet,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = WeightFile::open_component(dir, "diffusion_pytorch_model")?;
    unet.parameters()
        .into_iter()
        .map(|(name, shape)| {
            let t = file.load(&name, &shape, DType::F32, device)?;
            Ok((name, t))
        })
        .collect()
}

/// Loads the listed U-Net parameters from `unet/` in their stored precision (`load_stored`),
/// checking every shape; nothing else in the file is read.
pub fn load_unet_parameters(
    dir: &Path,
    parameters: &[NamedShape],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = WeightFile::open_component(dir, "diffusion_pytorch_model")?;
    parameters
        .iter()
        .map(|(name, shape)| Ok((name.clone(), file.load_stored(name, shape, device)?)))
        .collect()
}
