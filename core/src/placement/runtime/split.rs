//! PPIDM's row split of a convolution: each server gets its block of input rows plus halo
//! rows (explicit zero padding where the block meets the border) and returns its output rows.

use super::*;

impl<'a, E: Engine> Runtime<'a, E> {
    /// PPICnv: output rows split; each backend gets its input rows plus halo. `class` is what
    /// `x` depends on (its blocks are audited with it).
    pub(super) async fn conv_split(
        &mut self,
        c: &Conv2dSpec,
        x: &E::T,
        class: DepClass,
    ) -> Result<E::T> {
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
            // What falls outside the map becomes explicit zero padding on the server.
            let (rows, pad) = c.input_rows(&r, h);
            let (lo, hi) = (rows.start, rows.end);
            let block = self.wire(&self.engine.narrow(x, 2, lo, hi - lo)?)?;
            let view = self.view(
                i,
                &c.name,
                ViewKind::Block,
                Some((h, d[3])),
                Some(lo..hi),
                false,
                class,
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
