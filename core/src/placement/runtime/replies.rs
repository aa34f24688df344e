//! The phone distrusts replies: from each request it derives, with the servers' own admission
//! rules (`admission::admit`) and the dimensions of the handles it has created on each server,
//! how many tensors must come back and what dimensions each must have; a reply that differs, or
//! carries a non-finite value, is a typed error naming the server — never a panic further on
//! (a short GroupNorm-statistics reply used to index out of bounds in the merge).

use std::collections::HashMap;

use crate::placement::admission::admit;
use crate::placement::backend::{HandleId, Operand, ShardCall};
use crate::placement::engine::Engine;
use crate::vocab::error::{Error, Result};
use crate::vocab::layers::ShardLayer;

fn protocol(server: usize, message: String) -> Error {
    Error::Backend {
        backend: server,
        message: format!("protocol error: {message}"),
    }
}

/// What the replies of each server must look like.
pub(crate) struct ReplyCheck {
    layers: HashMap<String, ShardLayer>,
    /// Per server: the dimensions of every handle it holds, as the requests derive them.
    handles: Vec<HashMap<HandleId, Vec<usize>>>,
}

impl ReplyCheck {
    pub fn new(layers: HashMap<String, ShardLayer>, servers: usize) -> Self {
        Self {
            layers,
            handles: vec![HashMap::new(); servers],
        }
    }

    /// Walks server `server`'s calls in the order it will run them: the dimensions each
    /// replied tensor must have (`None` where an operand's dimensions are unknown here).
    pub fn expect<T>(
        &mut self,
        server: usize,
        calls: &[ShardCall<T>],
        dims: &dyn Fn(&T) -> Vec<usize>,
    ) -> Result<Vec<Option<Vec<usize>>>> {
        let Some(held) = self.handles.get_mut(server) else {
            return Ok(calls.iter().filter(|c| c.reply).map(|_| None).collect());
        };
        let mut out = Vec::new();
        for call in calls {
            if let crate::placement::backend::ShardOp::Release { handle } = &call.op {
                held.remove(handle);
            }
            let lookup = |o: &Operand<T>| match o {
                Operand::Inline(t) => Ok(dims(t)),
                Operand::Handle(h) => held
                    .get(h)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("handle {h} has no known shape"))),
            };
            // The phone's own request must pass the rules it holds the servers to.
            let admitted = admit(&call.op, &self.layers, &lookup, 1).ok().flatten();
            let d = admitted.map(|a| a.out);
            if let Some(h) = call.keep_as {
                match &d {
                    Some(d) => held.insert(h, d.clone()),
                    None => held.remove(&h),
                };
            }
            if call.reply {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Checks a server's replies against what its request implies.
    pub fn check<E: Engine>(
        engine: &E,
        server: usize,
        expected: Option<&[Option<Vec<usize>>]>,
        replies: &[E::T],
        asked: usize,
    ) -> Result<()> {
        if replies.len() != asked {
            return Err(protocol(
                server,
                format!("{} tensors in the reply, {asked} asked for", replies.len()),
            ));
        }
        for (k, t) in replies.iter().enumerate() {
            let got = engine.dims(t);
            if let Some(Some(want)) = expected.and_then(|e| e.get(k)) {
                if &got != want {
                    return Err(protocol(
                        server,
                        format!("reply {k} has shape {got:?}, the request implies {want:?}"),
                    ));
                }
            }
            if !engine.all_finite(t)? {
                return Err(protocol(
                    server,
                    format!("reply {k} holds a non-finite value"),
                ));
            }
        }
        Ok(())
    }
}
