//! The view audit: every tensor a shard server receives, with the layer and U-Net call it was
//! sent for, what kind of data it is, and which rows of which feature-map resolution it covers.
//! The runtime records a view at the one place requests leave the phone, from the same ranges it
//! cuts the tensors with, and checks each view's byte count against the tensor it describes.
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
    pub bytes: u64,
    /// Bytes per view kind.
    pub bytes_by_kind: BTreeMap<String, u64>,
    pub tensors: usize,
    /// The prompts (as text) it received, in send order (`obfuscated` only).
    pub prompts: Vec<String>,
}

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
                    bytes: self.bytes(i),
                    bytes_by_kind: by_kind,
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
            format: "veil-audit/1",
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
}
