//! PPIDM's row split of a convolution: each server gets its block of input rows plus halo
//! rows (explicit zero padding where the block meets the border) and returns its output rows.

use super::*;

impl<'a, E: Engine> Runtime<'a, E> {
    /// PPICnv: output rows split; each backend gets its input rows plus halo.
    pub(super) async fn conv_split(&mut self, c: &Conv2dSpec, x: &E::T) -> Result<E::T> {
        let p = c.padding;
        let d = self.engine.dims(x);
        let h = d[2];
        let out_rows = c.out_len(h);
        self.rows_check(&c.name, out_rows)?;
        let mut outgoing = Vec::new();
        let mut sflops = Vec::new();
        for (i, r) in partition(out_rows, self.backends.len())
            .into_iter()
            .enumerate()
        {
            // Input rows [first, end) in padded coordinates, clipped to the map; what falls
            // outside becomes explicit zero padding on the server.
            let first = (r.start * c.stride) as isize - p as isize;
            let end = ((r.end - 1) * c.stride + c.kernel) as isize - p as isize;
            let lo = first.max(0) as usize;
            let hi = (end.min(h as isize)) as usize;
            let pad = Pad {
                top: (lo as isize - first) as usize,
                bottom: (end - hi as isize) as usize,
                left: p,
                right: p,
            };
            let block = self.wire(&self.engine.narrow(x, 2, lo, hi - lo)?)?;
            let view = self.view(
                i,
                &c.name,
                ViewKind::Block,
                Some((h, d[3])),
                Some(lo..hi),
                false,
                &block,
            );
            let out_dims = [d[0], c.out_channels, r.len(), c.out_len(d[3])];
            sflops.push(flops::conv2d(&out_dims, c.in_channels, c.kernel));
            outgoing.push(Outgoing {
                calls: vec![ShardCall::reply(ShardOp::Conv2d {
                    layer: c.name.clone(),
                    input: Operand::Inline(block),
                    pad,
                })],
                views: vec![view],
            });
        }
        let parts = Self::one_reply(
            self.round_trip(OpKind::Conv, &c.name, outgoing, sflops)
                .await?,
        )?;
        self.engine.cat(&parts, 2)
    }
}
