//! Placement policies as data: for each kind of heavy op, where it runs. The U-Net never
//! branches on the policy; the runtime reads this table. A table is validated when it is built
//! (`Placement::new`), so it cannot express a combination the runtime would silently read as
//! something else; the claims a policy makes (its halo bound) are read from its table.

use crate::vocab::error::{Error, Result};
use crate::vocab::layers::{Role, ShardLayer};

/// How GroupNorm is split under `ppidm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GnVariant {
    /// The paper's PPIGN: each block normalised with its own statistics (lossy).
    Paper,
    /// Blocks return per-group partial sums; the device forms the global statistics (exact).
    #[default]
    Exact,
}

impl std::str::FromStr for GnVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "paper" => Ok(Self::Paper),
            "exact" => Ok(Self::Exact),
            o => Err(Error::InvalidArgument(format!(
                "unknown GroupNorm variant `{o}` (expected exact or paper)"
            ))),
        }
    }
}

/// Where convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPlace {
    Device,
    /// PPICnv: output rows split over the backends; each gets its input rows plus halo.
    SplitRows,
    /// On the servers' resident strips (halo rows relayed by the phone).
    Strips,
}

/// Where GroupNorm statistics are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GnPlace {
    Device,
    /// PPIGN: row blocks sent to the backends, which return per-group statistics.
    SplitRows(GnVariant),
    /// On resident strips: servers return partial statistics, the phone merges them and sends
    /// the global moments back (exact).
    Strips,
}

/// Where per-token layers of a role (and the timestep MLP) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPlace {
    Device,
    /// On the servers: each applies the layer to its own strip's tokens (or, for the timestep
    /// embedding, every server computes the same small vector).
    Strips,
}

/// Where the attention core softmax(QKᵀ)V runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPlace {
    Device,
    /// PPIAtt: query rows split; full K and V sent to every backend (as the paper does).
    SplitQueries,
}

/// Halo rows per side a 3×3 convolution on a strip needs beyond the strip.
pub const STRIP_HALO_ROWS: usize = 1;

/// The placement table of one policy. Built only through `Placement::new` (or a named
/// `Policy`), which rejects meaningless combinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Placement {
    pub conv: ConvPlace,
    pub group_norm: GnPlace,
    pub attention: AttnPlace,
    /// LayerNorms and q/k/v/out projections of attention.
    pub attention_layers: LayerPlace,
    pub feed_forward: LayerPlace,
    /// Transformers' proj_in / proj_out.
    pub projection: LayerPlace,
    pub time_embedding: LayerPlace,
}

impl Placement {
    /// A placement table, checked: work can sit on the servers' strips only where the feature
    /// map itself is resident there (convolutions on strips), so a table that puts a per-token
    /// layer, the timestep MLP or GroupNorm on strips without it is refused rather than run on
    /// the phone.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conv: ConvPlace,
        group_norm: GnPlace,
        attention: AttnPlace,
        attention_layers: LayerPlace,
        feed_forward: LayerPlace,
        projection: LayerPlace,
        time_embedding: LayerPlace,
    ) -> Result<Self> {
        let p = Self {
            conv,
            group_norm,
            attention,
            attention_layers,
            feed_forward,
            projection,
            time_embedding,
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks the table (see `new`).
    pub fn validate(&self) -> Result<()> {
        if self.resident() {
            return Ok(());
        }
        let on_strips = [
            ("attention layers", self.attention_layers),
            ("feed-forward", self.feed_forward),
            ("projections", self.projection),
            ("timestep embedding", self.time_embedding),
        ]
        .into_iter()
        .find(|(_, place)| *place == LayerPlace::Strips)
        .map(|(what, _)| what)
        .or((self.group_norm == GnPlace::Strips).then_some("GroupNorm"));
        match on_strips {
            Some(what) => Err(Error::InvalidArgument(format!(
                "a placement puts {what} on the servers' strips, but its convolutions are not on \
                 strips, so no strip is resident there"
            ))),
            None => Ok(()),
        }
    }

    /// The halo rows per side a server may receive beyond its strip, where the table confines
    /// every server to its strip: convolutions and GroupNorm on resident strips, the attention
    /// core on the phone. None where it does not (row blocks with full K/V, or nothing sent).
    pub fn halo_bound(&self) -> Option<usize> {
        let confined = self.conv == ConvPlace::Strips
            && self.group_norm == GnPlace::Strips
            && self.attention == AttnPlace::Device;
        confined.then_some(STRIP_HALO_ROWS)
    }

    /// Where a layer of `role` runs.
    pub fn layer(&self, role: Role) -> LayerPlace {
        match role {
            Role::Attention => self.attention_layers,
            Role::FeedForward => self.feed_forward,
            Role::Projection => self.projection,
            Role::TimeEmbedding => self.time_embedding,
            Role::PooledText | Role::Other => LayerPlace::Device,
        }
    }

    /// Whether the phone runs `layer` itself (and so needs its weights) under this table:
    /// convolutions placed on the device, GroupNorm unless the strips apply it (PPIGN's row
    /// blocks return statistics; the phone applies the affine), per-token layers by role.
    pub fn on_device(&self, layer: &ShardLayer) -> bool {
        match layer {
            ShardLayer::Conv2d(_) => self.conv == ConvPlace::Device,
            ShardLayer::GroupNorm(_) => self.group_norm != GnPlace::Strips,
            ShardLayer::Linear(l) => self.layer(l.role) == LayerPlace::Device,
            ShardLayer::LayerNorm(l) => self.layer(l.role) == LayerPlace::Device,
        }
    }

    /// Whether activations stay resident on the servers between ops.
    pub fn resident(&self) -> bool {
        self.conv == ConvPlace::Strips
    }

    pub fn offloads(&self) -> bool {
        self.conv != ConvPlace::Device
            || self.group_norm != GnPlace::Device
            || self.attention != AttnPlace::Device
    }
}

/// The named policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Everything on the device: the reference output.
    Local,
    /// PPIDM (Wang et al. 2025), faithfully: convolutions, attention cores and GroupNorms split.
    Ppidm { gn: GnVariant },
    /// Veil's flagship: each server only ever holds its own spatial strip (plus halo rows);
    /// the phone runs the attention sub-layers and keeps everything text-derived.
    Strict,
    /// ObCLIP: one server runs the first k steps of K candidate prompts that differ only in
    /// their sensitive attributes; the phone finishes its own with a device U-Net. Each U-Net
    /// call runs whole on one party (see `client::hybrid`).
    Obfuscated,
}

impl Policy {
    pub fn placement(self) -> Placement {
        match self {
            // Every U-Net call of `obfuscated` runs whole, on the server or on the phone.
            Policy::Local | Policy::Obfuscated => Placement {
                conv: ConvPlace::Device,
                group_norm: GnPlace::Device,
                attention: AttnPlace::Device,
                attention_layers: LayerPlace::Device,
                feed_forward: LayerPlace::Device,
                projection: LayerPlace::Device,
                time_embedding: LayerPlace::Device,
            },
            Policy::Ppidm { gn } => Placement {
                conv: ConvPlace::SplitRows,
                group_norm: GnPlace::SplitRows(gn),
                attention: AttnPlace::SplitQueries,
                ..Policy::Local.placement()
            },
            Policy::Strict => Placement {
                conv: ConvPlace::Strips,
                group_norm: GnPlace::Strips,
                attention: AttnPlace::Device,
                attention_layers: LayerPlace::Device,
                feed_forward: LayerPlace::Strips,
                projection: LayerPlace::Strips,
                time_embedding: LayerPlace::Strips,
            },
        }
    }

    /// Parses a policy name (the one parser of policy names: the CLI, the SDK and the server
    /// all go through it); `gn` applies to policies that split GroupNorm.
    pub fn parse(name: &str, gn: GnVariant) -> Result<Self> {
        match name.trim() {
            "local" => Ok(Policy::Local),
            "ppidm" => Ok(Policy::Ppidm { gn }),
            "strict" => Ok(Policy::Strict),
            "obfuscated" => Ok(Policy::Obfuscated),
            o => Err(Error::InvalidArgument(format!(
                "unknown policy `{o}` (expected local, ppidm, strict or obfuscated)"
            ))),
        }
    }

    pub fn needs_backends(self) -> bool {
        !matches!(self, Policy::Local)
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Local => "local",
            Policy::Ppidm { .. } => "ppidm",
            Policy::Strict => "strict",
            Policy::Obfuscated => "obfuscated",
        }
    }

    /// The halo rows per side a server may receive beyond its strip, read from the policy's
    /// table (`Placement::halo_bound`).
    pub fn halo_bound(self) -> Option<usize> {
        self.placement().halo_bound()
    }
}

/// Splits `len` rows into `n` contiguous ranges, the first `len % n` one row longer.
pub fn partition(len: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let base = len / n.max(1);
    let extra = len % n.max(1);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let l = base + usize::from(i < extra);
            let r = start..start + l;
            start += l;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_policy_is_a_valid_table() {
        for p in [
            Policy::Local,
            Policy::Ppidm {
                gn: GnVariant::Paper,
            },
            Policy::Ppidm {
                gn: GnVariant::Exact,
            },
            Policy::Strict,
            Policy::Obfuscated,
        ] {
            assert!(p.placement().validate().is_ok(), "{}", p.name());
            assert_eq!(
                Policy::parse(p.name(), GnVariant::Exact)
                    .map(|q| q.name())
                    .ok(),
                Some(p.name())
            );
        }
        assert_eq!(Policy::Strict.halo_bound(), Some(1));
        assert_eq!(Policy::Local.halo_bound(), None);
        assert_eq!(
            Policy::Ppidm {
                gn: GnVariant::Exact
            }
            .halo_bound(),
            None
        );
    }

    #[test]
    fn strips_without_resident_convolutions_are_refused() {
        let ok = Placement::new(
            ConvPlace::SplitRows,
            GnPlace::SplitRows(GnVariant::Exact),
            AttnPlace::SplitQueries,
            LayerPlace::Device,
            LayerPlace::Device,
            LayerPlace::Device,
            LayerPlace::Device,
        );
        assert!(ok.is_ok());
        let ff_on_strips = Placement::new(
            ConvPlace::SplitRows,
            GnPlace::SplitRows(GnVariant::Exact),
            AttnPlace::SplitQueries,
            LayerPlace::Device,
            LayerPlace::Strips,
            LayerPlace::Device,
            LayerPlace::Device,
        );
        let e = ff_on_strips.expect_err("feed-forward on strips without resident strips");
        assert!(e.to_string().contains("feed-forward"), "{e}");
        let gn_on_strips = Placement::new(
            ConvPlace::Device,
            GnPlace::Strips,
            AttnPlace::Device,
            LayerPlace::Device,
            LayerPlace::Device,
            LayerPlace::Device,
            LayerPlace::Device,
        );
        assert!(gn_on_strips.is_err());
        // Strips with the attention core split by queries: meaningful, but not confined.
        let leaky = Placement::new(
            ConvPlace::Strips,
            GnPlace::Strips,
            AttnPlace::SplitQueries,
            LayerPlace::Device,
            LayerPlace::Strips,
            LayerPlace::Strips,
            LayerPlace::Strips,
        )
        .expect("valid");
        assert_eq!(leaky.halo_bound(), None);
    }

    #[test]
    fn partition_uneven() {
        assert_eq!(partition(64, 3), vec![0..22, 22..43, 43..64]);
        assert_eq!(partition(8, 8).len(), 8);
        assert!(partition(8, 8).iter().all(|r| r.len() == 1));
        assert_eq!(partition(5, 2), vec![0..3, 3..5]);
    }
}
