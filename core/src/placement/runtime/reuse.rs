//! Attention reuse (T-GATE): from a gate call on, each transformer block adds the attention
//! delta cached at the call before instead of recomputing it.

use super::*;

impl<'a, E: Engine> Runtime<'a, E> {
    // ---- attention reuse (T-GATE) -------------------------------------------------------

    /// The cached attention delta of transformer block `block`, when this call reuses it.
    pub fn reused_attention(&self, block: &str) -> Option<Val<E>> {
        let r = self.reuse.as_ref()?;
        if self.call_index() < r.from_call {
            return None;
        }
        r.deltas.get(block).cloned()
    }

    /// Offers a block's attention result: at the last call before the gate, the delta
    /// `after − before` is kept (computed on the phone, which holds both).
    pub async fn offer_attention(
        &mut self,
        block: &str,
        before: &Val<E>,
        after: &Val<E>,
    ) -> Result<()> {
        let gate = match &self.reuse {
            Some(r) if r.from_call == self.call_index() + 1 => r.from_call,
            _ => return Ok(()),
        };
        let b = self.local(before).await?;
        let a = self.local(after).await?;
        let delta = self.engine.add(&a, &self.engine.scale(&b, -1.0)?)?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&a), 2);
        let v = self.lv(delta);
        if let Some(r) = self.reuse.as_mut().filter(|r| r.from_call == gate) {
            r.deltas.insert(block.to_string(), v);
        }
        Ok(())
    }
}
