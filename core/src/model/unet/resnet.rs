//! diffusers' `ResnetBlock2D`: two GroupNorm-SiLU-conv stages with the time embedding added in
//! between, and a 1×1 shortcut where the channel count changes.

use super::{BlockSettings, LayerRef};
use crate::model::ops::UNetOps;
use crate::vocab::error::Result;
use crate::vocab::layers::{Conv2dSpec, GroupNormSpec, LinearSpec};

/// diffusers' `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub(super) struct ResnetBlock {
    norm1: GroupNormSpec,
    conv1: Conv2dSpec,
    time_emb_proj: LinearSpec,
    norm2: GroupNormSpec,
    conv2: Conv2dSpec,
    conv_shortcut: Option<Conv2dSpec>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    /// The resnet `name` from `cin` to `cout` channels; the output is divided by `scale`.
    pub(super) fn new(
        s: &BlockSettings,
        name: String,
        cin: usize,
        cout: usize,
        scale: f64,
    ) -> Self {
        let (groups, eps) = (s.groups, s.eps);
        ResnetBlock {
            norm1: GroupNormSpec::new(format!("{name}.norm1"), groups, cin, eps),
            conv1: Conv2dSpec::new(format!("{name}.conv1"), cin, cout, 3, 1, 1),
            time_emb_proj: LinearSpec::new(format!("{name}.time_emb_proj"), s.temb, cout, true)
                .with_role(s.time_role),
            norm2: GroupNormSpec::new(format!("{name}.norm2"), groups, cout, eps),
            conv2: Conv2dSpec::new(format!("{name}.conv2"), cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout)
                .then(|| Conv2dSpec::new(format!("{name}.conv_shortcut"), cin, cout, 1, 1, 0)),
            output_scale_factor: scale,
        }
    }

    /// The GroupNorm after the time embedding's channel bias.
    pub(super) fn norm2(&self) -> &GroupNormSpec {
        &self.norm2
    }

    /// Appends this block's layers to the U-Net's walk (convolutions, norms, then the time
    /// projection: the order `UNet::layers` documents).
    pub(super) fn specs<'a>(&'a self, out: &mut Vec<LayerRef<'a>>) {
        out.extend([LayerRef::Conv2d(&self.conv1), LayerRef::Conv2d(&self.conv2)]);
        out.extend(self.conv_shortcut.as_ref().map(LayerRef::Conv2d));
        out.extend([
            LayerRef::GroupNorm(&self.norm1),
            LayerRef::GroupNorm(&self.norm2),
            LayerRef::Linear(&self.time_emb_proj),
        ]);
    }

    /// `emb_act` is the time embedding after its SiLU (computed once for every resnet).
    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: &R::Val,
        emb_act: &R::Val,
    ) -> Result<R::Val> {
        let h = rt.group_norm(&self.norm1, x).await?;
        let h = rt.silu(&h).await?;
        let h = rt.conv2d(&self.conv1, &h).await?;
        let t = rt.linear(&self.time_emb_proj, emb_act).await?;
        let h = rt.add_channel_bias(&h, &t).await?;
        let h = rt.group_norm(&self.norm2, &h).await?;
        let h = rt.silu(&h).await?;
        let h = rt.conv2d(&self.conv2, &h).await?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => rt.conv2d(c, x).await?,
            None => x.clone(),
        };
        let y = rt.add(&shortcut, &h).await?;
        if self.output_scale_factor != 1.0 {
            rt.scale(&y, 1.0 / self.output_scale_factor).await
        } else {
            Ok(y)
        }
    }
}
