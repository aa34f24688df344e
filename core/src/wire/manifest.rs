//! The model manifest (`veil-manifest.json`, written next to the weights by `veil manifest DIR`):
//! the SHA-256 of every file of the model's component folders and, per component with shard
//! layers, the model identity the handshake carries. With a manifest the phone learns the
//! identity without reading the servers' weights at all (under `strict` it never opens a
//! convolution); `verify` re-hashes everything on request (`veil verify DIR`).
//!
//! A folder without a manifest still works: the identity is computed from the U-Net's shard
//! weights on first use, one tensor at a time, and cached in `veil-identity-cache.json` in the
//! folder (best effort: a read-only folder just computes again next time). The cache is keyed
//! by the size and modification time of the U-Net's weight files and ignored once they change.
//! A manifest is trusted as written; a cache only while its key matches.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::config::{read_json, ModelPaths};
use crate::model::unet::UNet;
use crate::model::weights::WeightFile;
use crate::vocab::error::{Error, Result};
use crate::wire::identity::{identity_of, model_id_hex};
use crate::wire::ModelId;

/// The manifest's file name in a model folder.
pub const MANIFEST_FILE: &str = "veil-manifest.json";
/// The identity cache's file name in a model folder.
pub const CACHE_FILE: &str = "veil-identity-cache.json";
/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// One file of the model, relative to the folder, with '/' separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What the handshake needs of a component with shard layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentIdentity {
    /// The model identity (`wire::identity`) of the component's shard layers, 64 hex digits.
    pub shard_identity: String,
    /// How many parameters it covers.
    pub shard_parameters: usize,
}

/// `veil-manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub files: Vec<FileEntry>,
    pub unet: ComponentIdentity,
}

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    Manifest,
    Cache,
    /// Hashed from the weights now (no manifest, no valid cache).
    Computed,
}

/// The outcome of `verify`: every difference found, empty when the folder matches.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub files_checked: usize,
    pub mismatches: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every regular file under the component folders of `root` (not the manifest, the cache or
/// loose files at the top), sorted, as paths relative to `root`.
fn model_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for e in std::fs::read_dir(root).map_err(io(root))? {
        let p = e.map_err(io(root))?.path();
        if p.is_dir() {
            stack.push(p);
        }
    }
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let p = e.map_err(io(&dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn rel_name(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// SHA-256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    Ok((bytes, hex::encode(h.finalize())))
}

/// The identity of the U-Net shard layers stored in `root`, reading one tensor at a time.
pub fn compute_unet_identity(root: &Path) -> Result<(ModelId, usize)> {
    let paths = ModelPaths::new(root)?;
    let unet = UNet::new(&paths.unet_config()?)?;
    let file = WeightFile::open_component(&paths.component("unet"), "diffusion_pytorch_model")?;
    let params = crate::wire::identity::shard_parameters(&unet);
    let mut first_error = None;
    let id = identity_of(&unet, |name| {
        let shape = params.iter().find(|(n, _)| n == name).map(|(_, s)| s)?;
        match file.load(name, shape, DType::F32, &Device::Cpu) {
            Ok(t) => Some(t),
            Err(e) => {
                first_error.get_or_insert(e);
                None
            }
        }
    });
    match first_error {
        Some(e) => Err(e),
        None => Ok((id, params.len())),
    }
}

impl Manifest {
    /// Hashes every file of the model in `root` and its U-Net shard identity. `progress` is
    /// told each file as it starts (index, count, path).
    pub fn build(root: &Path, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<Self> {
        let rels = model_files(root)?;
        let mut files = Vec::with_capacity(rels.len());
        for (i, rel) in rels.iter().enumerate() {
            let name = rel_name(rel);
            progress(i, rels.len(), &name);
            let (bytes, sha256) = hash_file(&root.join(rel))?;
            files.push(FileEntry {
                path: name,
                bytes,
                sha256,
            });
        }
        let (id, n) = compute_unet_identity(root)?;
        Ok(Self {
            format: MANIFEST_FORMAT,
            files,
            unet: ComponentIdentity {
                shard_identity: model_id_hex(&id),
                shard_parameters: n,
            },
        })
    }

    /// Writes `veil-manifest.json` into `root` (through a temporary file and a rename).
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let path = root.join(MANIFEST_FILE);
        write_json(&path, self)?;
        Ok(path)
    }

    /// The manifest of `root`, if it has one.
    pub fn read(root: &Path) -> Result<Option<Self>> {
        let path = root.join(MANIFEST_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let m: Manifest = read_json(&path)?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::Config {
                path,
                message: format!(
                    "manifest format {} (this build reads {MANIFEST_FORMAT}); rewrite it with `veil manifest`",
                    m.format
                ),
            });
        }
        m.unet_identity(&path)?;
        Ok(Some(m))
    }

    /// The U-Net shard identity as bytes.
    pub fn unet_identity(&self, path: &Path) -> Result<ModelId> {
        parse_id(&self.unet.shard_identity).ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            message: "unet.shard_identity is not 64 hex digits".into(),
        })
    }

    /// Re-hashes every listed file and the shard identity; reports files that differ, are
    /// missing, or are present but unlisted.
    pub fn verify(
        &self,
        root: &Path,
        progress: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<Verification> {
        let mut v = Verification::default();
        for (i, f) in self.files.iter().enumerate() {
            progress(i, self.files.len(), &f.path);
            let path = root.join(&f.path);
            if !path.is_file() {
                v.mismatches.push(format!("{}: missing", f.path));
                continue;
            }
            let (bytes, sha) = hash_file(&path)?;
            v.files_checked += 1;
            if bytes != f.bytes || sha != f.sha256 {
                v.mismatches.push(format!(
                    "{}: {bytes} bytes, sha256 {sha}; the manifest says {} bytes, {}",
                    f.path, f.bytes, f.sha256
                ));
            }
        }
        for rel in model_files(root)? {
            let name = rel_name(&rel);
            if !self.files.iter().any(|f| f.path == name) {
                v.mismatches.push(format!("{name}: not in the manifest"));
            }
        }
        match compute_unet_identity(root) {
            Ok((id, _)) if model_id_hex(&id) == self.unet.shard_identity => {}
            Ok((id, _)) => v.mismatches.push(format!(
                "unet shard identity {}; the manifest says {}",
                model_id_hex(&id),
                self.unet.shard_identity
            )),
            Err(e) => v.mismatches.push(format!("unet shard identity: {e}")),
        }
        Ok(v)
    }
}

fn parse_id(s: &str) -> Option<ModelId> {
    hex::decode(s).ok()?.try_into().ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The cache's key: each U-Net weight file with its size and modification time (ns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheKey {
    files: Vec<(String, u64, u128)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cache {
    key: CacheKey,
    unet: ComponentIdentity,
}

fn cache_key(root: &Path) -> Result<CacheKey> {
    let unet = root.join("unet");
    let mut files = Vec::new();
    for rel in model_files(root)? {
        let full = root.join(&rel);
        let weights = full.starts_with(&unet)
            && rel
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "json");
        if !weights {
            continue;
        }
        let meta = std::fs::metadata(&full).map_err(io(&full))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push((rel_name(&rel), meta.len(), mtime));
    }
    Ok(CacheKey { files })
}

/// The U-Net shard identity of the model in `root`: from its manifest, else from a cache whose
/// key still matches, else computed from the weights (and cached, best effort).
pub fn resolve_unet_identity(root: &Path) -> Result<(ModelId, IdentitySource)> {
    if let Some(m) = Manifest::read(root)? {
        return Ok((
            m.unet_identity(&root.join(MANIFEST_FILE))?,
            IdentitySource::Manifest,
        ));
    }
    let key = cache_key(root)?;
    let cache_path = root.join(CACHE_FILE);
    if let Ok(c) = read_json::<Cache>(&cache_path) {
        if c.key == key {
            if let Some(id) = parse_id(&c.unet.shard_identity) {
                return Ok((id, IdentitySource::Cache));
            }
        }
    }
    let (id, n) = compute_unet_identity(root)?;
    let cache = Cache {
        key,
        unet: ComponentIdentity {
            shard_identity: model_id_hex(&id),
            shard_parameters: n,
        },
    };
    if let Err(e) = write_json(&cache_path, &cache) {
        tracing::info!("model identity not cached ({e}); it is computed again next start");
    }
    Ok((id, IdentitySource::Computed))
}
/// The components whose files a full-model server's answers (the `obfuscated` policy's early
/// steps) depend on beyond the shard layers: the U-Net's files (its attention weights), the
/// text encoder(s), the tokenizer(s) and the scheduler (SDXL's second text side where present).
pub const FULL_MODEL_COMPONENTS: [&str; 6] = [
    "unet",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
];

/// Single files the same answers depend on: the VAE's config (its factor gives SDXL's size
/// ids). The folder's top-level files (`model_index.json`, SDXL's
/// `force_zeros_for_empty_prompt`) are in no manifest and so in no identity.
pub const FULL_MODEL_FILES: [&str; 1] = ["vae/config.json"];

/// The SHA-256 of every file of `FULL_MODEL_COMPONENTS` in `root`, by relative name, sorted:
/// from the manifest when the folder has one (a phone), else hashed now.
pub fn component_hashes(root: &Path) -> Result<Vec<(String, String)>> {
    components(root, true)
}

/// `component_hashes` from the files themselves, manifest or not: what a server that loaded
/// them presents.
pub fn hash_components(root: &Path) -> Result<Vec<(String, String)>> {
    components(root, false)
}

fn components(root: &Path, trust_manifest: bool) -> Result<Vec<(String, String)>> {
    let in_components = |rel: &str| {
        FULL_MODEL_FILES.contains(&rel)
            || FULL_MODEL_COMPONENTS
                .iter()
                .any(|c| rel.strip_prefix(c).is_some_and(|r| r.starts_with('/')))
    };
    let manifest = match trust_manifest {
        true => Manifest::read(root)?,
        false => None,
    };
    let mut out: Vec<(String, String)> = match manifest {
        Some(m) => m
            .files
            .into_iter()
            .filter(|f| in_components(&f.path))
            .map(|f| (f.path, f.sha256))
            .collect(),
        None => model_files(root)?
            .into_iter()
            .map(|rel| (rel_name(&rel), rel))
            .filter(|(name, _)| in_components(name))
            .map(|(name, rel)| Ok((name, hash_file(&root.join(rel))?.1)))
            .collect::<Result<_>>()?,
    };
    out.sort();
    Ok(out)
}

/// The identity a full-model server presents (and a client of the `obfuscated` policy expects):
/// SHA-256 over a version tag, the U-Net shard identity, then each component file's name and
/// SHA-256 (`component_hashes`). A consistency check between honest parties (the same files on
/// both ends), not attestation: a server can present any identity it likes.
pub fn full_model_identity(unet: &ModelId, components: &[(String, String)]) -> ModelId {
    let mut h = Sha256::new();
    h.update(b"veil-full-model-1");
    h.update(unet);
    for (name, sha) in components {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(sha.as_bytes());
    }
    h.finalize().into()
}

/// `full_model_identity` of the model in `root` (the U-Net identity resolved as
/// `resolve_unet_identity` does).
pub fn resolve_full_model_identity(root: &Path) -> Result<ModelId> {
    let (unet, _) = resolve_unet_identity(root)?;
    Ok(full_model_identity(&unet, &component_hashes(root)?))
}
