//! The runtime as the U-Net sees it: `UNetOps`, each op delegated to the runtime's own
//! placement-aware method.

use std::future::Future;

use super::*;
use crate::model::ops::UNetOps;

impl<E: Engine> UNetOps for Runtime<'_, E> {
    type T = E::T;
    type Val = Val<E>;

    fn input(&self, t: E::T) -> Val<E> {
        Runtime::input(self, t)
    }
    fn local(&mut self, v: &Val<E>) -> impl Future<Output = Result<E::T>> + Send {
        Runtime::local(self, v)
    }
    fn dims(&self, v: &Val<E>) -> Vec<usize> {
        Runtime::dims(self, v)
    }
    fn note_unet_call(&mut self) {
        Runtime::note_unet_call(self)
    }
    fn set_pyramid(&mut self, levels: &[(usize, usize)]) -> Result<()> {
        Runtime::set_pyramid(self, levels)
    }
    fn timestep_embedding(
        &mut self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
    ) -> Result<Val<E>> {
        Runtime::timestep_embedding(self, t, batch, dim, flip, shift)
    }
    fn conv2d(
        &mut self,
        c: &Conv2dSpec,
        x: &Val<E>,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::conv2d(self, c, x)
    }
    fn group_norm(
        &mut self,
        g: &GroupNormSpec,
        x: &Val<E>,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::group_norm(self, g, x)
    }
    fn linear(
        &mut self,
        l: &LinearSpec,
        x: &Val<E>,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::linear(self, l, x)
    }
    fn layer_norm(
        &mut self,
        l: &LayerNormSpec,
        x: &Val<E>,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::layer_norm(self, l, x)
    }
    fn attention(
        &mut self,
        layer: &str,
        q: &Val<E>,
        k: &Val<E>,
        v: &Val<E>,
        heads: usize,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::attention(self, layer, q, k, v, heads)
    }
    fn silu(&mut self, x: &Val<E>) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::silu(self, x)
    }
    fn geglu(&mut self, x: &Val<E>, kind: GeluKind) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::geglu(self, x, kind)
    }
    fn scale(&mut self, x: &Val<E>, f: f64) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::scale(self, x, f)
    }
    fn add(&mut self, a: &Val<E>, b: &Val<E>) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::add(self, a, b)
    }
    fn add_channel_bias(
        &mut self,
        x: &Val<E>,
        e: &Val<E>,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::add_channel_bias(self, x, e)
    }
    fn cat(&mut self, xs: &[Val<E>], dim: usize) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::cat(self, xs, dim)
    }
    fn upsample_nearest(
        &mut self,
        x: &Val<E>,
        h: usize,
        w: usize,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::upsample_nearest(self, x, h, w)
    }
    fn to_tokens(&mut self, x: &Val<E>) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::to_tokens(self, x)
    }
    fn to_spatial(
        &mut self,
        x: &Val<E>,
        h: usize,
        w: usize,
    ) -> impl Future<Output = Result<Val<E>>> + Send {
        Runtime::to_spatial(self, x, h, w)
    }
    fn reused_attention(&self, block: &str) -> Option<Val<E>> {
        Runtime::reused_attention(self, block)
    }
    fn offer_attention(
        &mut self,
        block: &str,
        before: &Val<E>,
        after: &Val<E>,
    ) -> impl Future<Output = Result<()>> + Send {
        Runtime::offer_attention(self, block, before, after)
    }
}
