//! What a generation hands back besides the image: its cost (`GenerationStats`) and its
//! privacy report — per server, what it received, from the same view audit `veil generate
//! --audit` writes (docs/AUDIT.md), so an app can show "what each server saw".

use std::collections::{BTreeSet, HashMap};

use crate::client::options::ObfuscationReport;
use crate::placement::audit::{Audit, AuditReport};
use crate::placement::policy::Policy as PlacementPolicy;

use super::types::Policy;

/// What one shard server cost this generation.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ServerTraffic {
    /// Index in the server list (= its strip).
    pub server: u32,
    pub address: String,
    /// Tensor payload bytes sent to / received from it (as the runtime accounts them).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Encoded QUIC stream bytes (framing and compression included).
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub requests: u64,
    /// Time spent waiting on its requests (overlaps other servers').
    pub busy_seconds: f64,
}

/// Time and traffic of one generation.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct GenerationStats {
    pub wall_seconds: f64,
    pub steps: u32,
    pub round_trips: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Multiply-accumulates done on this device / on all servers.
    pub device_flops: u64,
    pub server_flops: u64,
    pub per_server: Vec<ServerTraffic>,
}

/// A half-open range of rows `[start, end)` of a feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct RowRange {
    pub start: u32,
    pub end: u32,
}

/// The rows of one feature-map resolution a server held and received.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ResolutionRows {
    pub height: u32,
    pub width: u32,
    /// Its own strip there (`None` where it has none).
    pub strip: Option<RowRange>,
    /// Every row of that map it received, merged.
    pub received: Vec<RowRange>,
}

/// What one server received in this generation (the audit file's `servers[i]`).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ServerView {
    /// Index in the server list.
    pub server: u32,
    pub address: String,
    /// Tensor bytes received (before the wire codec), and how many tensors.
    pub bytes: u64,
    pub tensors: u64,
    /// Bytes by what the tensor is: `latent`, `strip`, `halo`, `moments`, `key_value`,
    /// `text_key_value`, `prompt`, … (docs/AUDIT.md).
    pub bytes_by_kind: HashMap<String, u64>,
    /// Bytes by what they depend on: the input's nearby rows only, the whole map, the prompt.
    pub raw_bytes: u64,
    pub whole_map_bytes: u64,
    pub text_bytes: u64,
    /// Bytes whose rows index text tokens (text keys and values, token ids).
    pub text_indexed_bytes: u64,
    /// Whether anything that depends on the prompt reached it (text-derived tensors or prompts
    /// as text).
    pub received_text: bool,
    /// Rows per feature-map resolution.
    pub rows: Vec<ResolutionRows>,
    /// The guidance half it ran: `both`, `conditional` or `unconditional`.
    pub guidance_half: String,
    /// `obfuscated`: the candidate prompts it received, sorted (the real one is among them; the
    /// order it was sent in is not shown).
    pub prompts: Vec<String>,
}

/// A sensitive span the `obfuscated` policy found in the prompt.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct SensitiveSpan {
    /// The attribute (`gender`, `age`, `ethnicity`, or a lexicon's own).
    pub category: String,
    pub text: String,
}

/// What an `obfuscated` generation sent; never which candidate is the real prompt.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ObfuscationSummary {
    /// K: candidate prompts sent (0 when k = 0: nothing left the phone).
    pub candidates: u32,
    /// Every combination of the detected values, before the K max cut.
    pub combinations: u64,
    pub spans: Vec<SensitiveSpan>,
    /// k: steps the server ran; the rest ran on this device.
    pub server_steps: u32,
    pub device_steps: u32,
}

/// What each server saw of a generation, from the runtime's view audit.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct PrivacyReport {
    pub policy: Policy,
    /// The halo rows per side a server may receive beyond its strip under this policy's
    /// claim (strict: 1); `None` where nothing is claimed.
    pub halo_bound: Option<u32>,
    pub servers: Vec<ServerView>,
    /// `obfuscated` only.
    pub obfuscation: Option<ObfuscationSummary>,
}

fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn rows(r: &std::ops::Range<usize>) -> RowRange {
    RowRange {
        start: u32_of(r.start),
        end: u32_of(r.end),
    }
}

/// Server `i`'s strip and received rows per resolution, straight from the audit.
fn resolution_rows(audit: &Audit, i: usize) -> Vec<ResolutionRows> {
    let strips = audit.strips.get(i);
    let received = audit.received_rows(i);
    let keys: BTreeSet<(usize, usize)> = strips
        .into_iter()
        .flat_map(|m| m.keys().copied())
        .chain(received.keys().copied())
        .collect();
    keys.into_iter()
        .map(|res| ResolutionRows {
            height: u32_of(res.0),
            width: u32_of(res.1),
            strip: strips.and_then(|m| m.get(&res)).map(rows),
            received: received
                .get(&res)
                .map(|v| v.iter().map(rows).collect())
                .unwrap_or_default(),
        })
        .collect()
}

impl PrivacyReport {
    /// The report of a generation under `policy` whose server `i` is at `addresses[i]`.
    pub(crate) fn new(
        policy: Policy,
        audit: &Audit,
        unet_calls: u64,
        addresses: &[String],
        obfuscation: Option<&ObfuscationReport>,
    ) -> Self {
        let placement: PlacementPolicy = policy.placement();
        let report: AuditReport =
            audit.report(placement.name(), unet_calls, placement.halo_bound());
        let servers = report
            .servers
            .into_iter()
            .map(|s| {
                let prompts = audit.prompt_multiset(s.server);
                ServerView {
                    server: u32_of(s.server),
                    address: addresses.get(s.server).cloned().unwrap_or_default(),
                    bytes: s.bytes,
                    tensors: s.tensors as u64,
                    bytes_by_kind: s.bytes_by_kind.into_iter().collect(),
                    raw_bytes: s.bytes_by_class.raw,
                    whole_map_bytes: s.bytes_by_class.whole_map,
                    text_bytes: s.bytes_by_class.text,
                    text_indexed_bytes: s.text_indexed_bytes,
                    received_text: s.text_conditioned_bytes > 0 || !prompts.is_empty(),
                    rows: resolution_rows(audit, s.server),
                    guidance_half: s.guidance_half.to_string(),
                    prompts,
                }
            })
            .collect();
        Self {
            policy,
            halo_bound: report.halo_bound.map(u32_of),
            servers,
            obfuscation: obfuscation.map(|o| ObfuscationSummary {
                candidates: u32_of(o.candidates),
                combinations: o.combinations as u64,
                spans: o
                    .spans
                    .iter()
                    .map(|s| SensitiveSpan {
                        category: s.category.clone(),
                        text: s.text.clone(),
                    })
                    .collect(),
                server_steps: u32_of(o.server_steps),
                device_steps: u32_of(o.device_steps),
            }),
        }
    }
}
