//! The view audit: every tensor a shard server receives, with the layer and U-Net call it was
//! sent for, what kind of data it is, and which rows of which feature-map resolution it covers.
//! The runtime records a view at the one place requests leave the phone, from the same ranges it
//! cuts the tensors with, and checks each view's byte count against the tensor it describes.
//! Each view also carries its dependency class (`DepClass`): whether the tensor is a function
//! of the U-Net input's rows near the ones it covers, of the whole map, or of the prompt.
//! `veil generate --audit` writes the per-server summary documented in docs/AUDIT.md.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Serialize;

/// What a received tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    /// Rows of the latent (the U-Net input).
    Latent,
    /// A row block of a feature map (ppidm: conv or GroupNorm input).
    Block,
    /// A strip of features the phone sends back (strict: after the attention sub-layers).
    Strip,
    /// Neighbour rows relayed for a 3×3 convolution.
    Halo,
    /// Query rows (ppidm attention).
    Query,
    /// Keys or values of self-attention: every position of the map.
    KeyValue,
    /// Keys or values of cross-attention: indexed by text tokens.
    TextKeyValue,
    /// GroupNorm moments [B, G, 2]: one mean and variance per group of the whole map.
    Moments,
    /// A whole prompt as text (`obfuscated`: the candidate prompts; `Audit::texts` holds them).
    Prompt,
    /// A per-channel or per-batch vector (no spatial rows).
    Vector,
}

/// What a tensor depends on, relative to one U-Net call; ordered `Raw < WholeMap < Text`. A
/// tensor's class is the maximum of the classes of what it was computed from, raised by the op
/// that computed it:
/// - the sample (latent) rows and public values (the timestep and its embedding, weights) are
///   `Raw`; convolutions, up/down-sampling and per-element or per-token ops (SiLU, GEGLU,
///   linear layers, LayerNorm over channels, residual adds) keep their inputs' class;
/// - GroupNorm raises to at least `WholeMap`: its moments are statistics of the whole map (or,
///   under ppidm's `paper` variant, of a row block), and every row normalised with them depends
///   on rows it does not cover; the moments themselves are `WholeMap` (or `Text`, when the map
///   was already `Text`);
/// - self-attention raises to at least `WholeMap` (every output token mixes every token);
/// - the text states and anything computed from them (text keys and values, cross-attention
///   outputs, every tensor downstream of a cross-attention) are `Text`.
///
/// The latent itself is the reference: at step i > 0 it carries what earlier steps put into it
/// (the prompt's effect included), which is what the strip-only control measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DepClass {
    /// A function of the U-Net input's rows within the local receptive field of the rows it
    /// covers, and of public values only.
    Raw,
    /// Depends on rows beyond the ones it covers (GroupNorm moments, anything normalised with
    /// them, anything downstream of a self-attention), but not on the prompt.
    WholeMap,
    /// Depends on the prompt (text states, text K/V, anything downstream of a cross-attention).
    Text,
}

impl DepClass {
    /// The class of a tensor computed from tensors of classes `classes` (`Raw` for none).
    pub fn of(classes: impl IntoIterator<Item = DepClass>) -> DepClass {
        classes.into_iter().max().unwrap_or(DepClass::Raw)
    }

    /// This class raised to at least `floor` (what an op that mixes rows or reads text adds).
    pub fn at_least(self, floor: DepClass) -> DepClass {
        self.max(floor)
    }
}

/// Bytes a server received per dependency class (the audit file's `bytes_by_class`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BytesByClass {
    pub raw: u64,
    pub whole_map: u64,
    pub text: u64,
}

impl BytesByClass {
    fn add(&mut self, class: DepClass, bytes: u64) {
        match class {
            DepClass::Raw => self.raw += bytes,
            DepClass::WholeMap => self.whole_map += bytes,
            DepClass::Text => self.text += bytes,
        }
    }
}

/// One tensor one server received.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub server: usize,
    /// The U-Net call (denoising step) it was sent in, counted from 0.
    pub call: u64,
    pub layer: String,
    pub kind: ViewKind,
    /// (H, W) of the feature map the rows index, for spatial tensors.
    pub resolution: Option<(usize, usize)>,
    /// Half-open row range of that map.
    pub rows: Option<Range<usize>>,
    /// Rows index text tokens (token ids, text embeddings, text K/V).
    pub text_indexed: bool,
    /// What the tensor depends on (see `DepClass`).
    pub class: DepClass,
    pub bytes: u64,
}

/// A text one server received (the `obfuscated` policy's candidate prompts).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TextView {
    pub server: usize,
    pub call: u64,
    pub text: String,
}

/// Every view of a run, plus each server's own strip per resolution.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    pub views: Vec<View>,
    /// Every text a server received, in send order.
    pub texts: Vec<TextView>,
    /// Server → resolution → its own rows there.
    pub strips: Vec<BTreeMap<(usize, usize), Range<usize>>>,
    /// Server → which classifier-free-guidance half it ran (`both` unless the halves were
    /// apart: `conditional` or `unconditional`).
    pub halves: Vec<&'static str>,
}

/// `"<H>x<W>"`, the resolution key of the audit file.
pub fn res_key(r: (usize, usize)) -> String {
    format!("{}x{}", r.0, r.1)
}

/// Merges half-open ranges (touching ones too) into a sorted disjoint list.
pub fn union(mut v: Vec<Range<usize>>) -> Vec<Range<usize>> {
    v.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in v.into_iter().filter(|r| !r.is_empty()) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One server's summary (the audit file's `servers[i]`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerView {
    pub server: usize,
    pub strip: BTreeMap<String, [usize; 2]>,
    pub received_rows: BTreeMap<String, Vec<[usize; 2]>>,
    pub text_indexed_bytes: u64,
    /// Bytes of class `text`: tensors that depend on the prompt.
    pub text_conditioned_bytes: u64,
    pub bytes: u64,
    /// Bytes per view kind.
    pub bytes_by_kind: BTreeMap<String, u64>,
    /// Bytes per dependency class.
    pub bytes_by_class: BytesByClass,
    pub tensors: usize,
    /// The guidance half it ran: both, conditional or unconditional.
    pub guidance_half: &'static str,
    /// The prompts (as text) it received, in send order (`obfuscated` only).
    pub prompts: Vec<String>,
}

/// The audit file's `format`.
pub const AUDIT_FORMAT: &str = "veil-audit/2";

/// The audit file.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub format: &'static str,
    pub policy: String,
    pub unet_calls: u64,
    /// Halo rows (per side, at every resolution) a server's received rows may extend past its
    /// strip under this policy's confinement claim (strict: 1); null where nothing is claimed.
    pub halo_bound: Option<usize>,
    pub servers: Vec<ServerView>,
}

impl Audit {
    pub fn new(servers: usize) -> Self {
        Self {
            views: Vec::new(),
            texts: Vec::new(),
            strips: vec![BTreeMap::new(); servers],
            halves: vec!["both"; servers],
        }
    }

    pub fn absorb(&mut self, other: Audit) {
        self.views.extend(other.views);
        self.texts.extend(other.texts);
        for (a, b) in self.strips.iter_mut().zip(other.strips) {
            a.extend(b);
        }
    }

    /// Union of received rows of `server` per resolution.
    pub fn received_rows(&self, server: usize) -> BTreeMap<(usize, usize), Vec<Range<usize>>> {
        let mut m: BTreeMap<(usize, usize), Vec<Range<usize>>> = BTreeMap::new();
        for v in self.views.iter().filter(|v| v.server == server) {
            if let (Some(res), Some(rows)) = (v.resolution, v.rows.clone()) {
                m.entry(res).or_default().push(rows);
            }
        }
        m.into_iter().map(|(k, v)| (k, union(v))).collect()
    }

    /// The texts `server` received, sorted: the multiset of prompts it saw.
    pub fn prompt_multiset(&self, server: usize) -> Vec<String> {
        let mut v: Vec<String> = self
            .texts
            .iter()
            .filter(|t| t.server == server)
            .map(|t| t.text.clone())
            .collect();
        v.sort();
        v
    }

    pub fn text_indexed_bytes(&self, server: usize) -> u64 {
        self.views
            .iter()
            .filter(|v| v.server == server && v.text_indexed)
            .map(|v| v.bytes)
            .sum()
    }

    /// Bytes `server` received per dependency class.
    pub fn bytes_by_class(&self, server: usize) -> BytesByClass {
        let mut b = BytesByClass::default();
        for v in self.views.iter().filter(|v| v.server == server) {
            b.add(v.class, v.bytes);
        }
        b
    }

    /// Bytes of class `Text` that `server` received: tensors that depend on the prompt.
    pub fn text_conditioned_bytes(&self, server: usize) -> u64 {
        self.bytes_by_class(server).text
    }

    pub fn bytes(&self, server: usize) -> u64 {
        self.views
            .iter()
            .filter(|v| v.server == server)
            .map(|v| v.bytes)
            .sum()
    }

    pub fn report(&self, policy: &str, unet_calls: u64, halo_bound: Option<usize>) -> AuditReport {
        let servers = (0..self.strips.len())
            .map(|i| {
                let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
                let mut tensors = 0;
                for v in self.views.iter().filter(|v| v.server == i) {
                    let k = serde_json::to_value(v.kind)
                        .ok()
                        .and_then(|s| s.as_str().map(str::to_string))
                        .unwrap_or_default();
                    *by_kind.entry(k).or_default() += v.bytes;
                    tensors += 1;
                }
                ServerView {
                    server: i,
                    guidance_half: self.halves.get(i).copied().unwrap_or("both"),
                    strip: self.strips[i]
                        .iter()
                        .map(|(res, r)| (res_key(*res), [r.start, r.end]))
                        .collect(),
                    received_rows: self
                        .received_rows(i)
                        .into_iter()
                        .map(|(res, rs)| {
                            (
                                res_key(res),
                                rs.into_iter().map(|r| [r.start, r.end]).collect(),
                            )
                        })
                        .collect(),
                    text_indexed_bytes: self.text_indexed_bytes(i),
                    text_conditioned_bytes: self.text_conditioned_bytes(i),
                    bytes: self.bytes(i),
                    bytes_by_kind: by_kind,
                    bytes_by_class: self.bytes_by_class(i),
                    tensors,
                    prompts: self
                        .texts
                        .iter()
                        .filter(|t| t.server == i)
                        .map(|t| t.text.clone())
                        .collect(),
                }
            })
            .collect();
        AuditReport {
            format: AUDIT_FORMAT,
            policy: policy.to_string(),
            unet_calls,
            halo_bound,
            servers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_touching_and_overlapping() {
        assert_eq!(
            union(vec![4..6, 0..2, 2..3, 5..9, 12..13]),
            vec![0..3, 4..9, 12..13]
        );
        assert!(union(vec![3..3, 5..5]).is_empty());
    }

    fn view(server: usize, kind: ViewKind, class: DepClass, bytes: u64) -> View {
        View {
            server,
            call: 0,
            layer: "l".into(),
            kind,
            resolution: None,
            rows: None,
            text_indexed: false,
            class,
            bytes,
        }
    }

    #[test]
    fn classes_are_ordered_and_reported_per_server() {
        use DepClass::{Raw, Text, WholeMap};
        assert!(Raw < WholeMap && WholeMap < Text);
        assert_eq!(DepClass::of([]), Raw);
        assert_eq!(DepClass::of([Raw, Text, WholeMap]), Text);
        assert_eq!(Raw.at_least(WholeMap), WholeMap);
        assert_eq!(Text.at_least(WholeMap), Text);
        let mut a = Audit::new(2);
        a.views = vec![
            view(0, ViewKind::Latent, Raw, 10),
            view(0, ViewKind::Moments, WholeMap, 3),
            view(0, ViewKind::Strip, Text, 40),
            view(0, ViewKind::Halo, Text, 2),
            view(1, ViewKind::Moments, WholeMap, 3),
        ];
        let r = a.report("strict", 1, Some(1));
        let j = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(j["format"], "veil-audit/2");
        let s0 = &j["servers"][0];
        assert_eq!(
            s0["bytes_by_class"],
            serde_json::json!({ "raw": 10, "whole_map": 3, "text": 42 })
        );
        assert_eq!(s0["text_conditioned_bytes"], 42);
        assert_eq!(s0["text_indexed_bytes"], 0);
        assert_eq!(s0["bytes"], 55);
        assert_eq!(
            j["servers"][1]["bytes_by_class"],
            serde_json::json!({ "raw": 0, "whole_map": 3, "text": 0 })
        );
    }
}
