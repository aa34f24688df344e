//! Stale synchronisation (`--stale-sync`, DistriFusion's displaced patch parallelism applied to
//! `strict`): from U-Net call `from_call` on, a GroupNorm on strips normalises with the global
//! moments the same layer had at the previous call, and convolves with the halo rows prefetched
//! then, instead of waiting a round trip for this call's. This call's statistics and halo rows
//! are still asked for by the same calls, but those calls wait in the per-server queue and ride
//! along with the next round trip the phone has to make anyway (a gather for attention, the
//! output); their replies are kept for the next call. Halo rows fetched for a convolution that
//! no GroupNorm precedes (`ensure_rows`) go the same way. Every server receives the same kinds of
//! tensors over the same rows as without it, one step older.

use super::*;

/// A GroupNorm's (or a halo fetch's) replies, as they arrived: each server's statistics, then
/// the halo rows its neighbours asked it for (the order `halo_requests` laid them out in).
pub(super) struct GnReplies<T> {
    pub outs: Vec<Vec<T>>,
    pub asks: Vec<Vec<HaloAsk>>,
}

/// Replies queued on the servers for a GroupNorm, collected at the next round trip.
struct Deferred {
    layer: String,
    /// Reply calls queued on each server for it.
    per_server: Vec<usize>,
    asks: Vec<Vec<HaloAsk>>,
}

pub(super) struct StaleSync<T> {
    pub from_call: u64,
    /// Per GroupNorm layer, its replies at the last call that ran it.
    last: HashMap<String, GnReplies<T>>,
    deferred: Vec<Deferred>,
}

impl<T: Clone> StaleSync<T> {
    pub fn new(from_call: u64) -> Self {
        Self {
            from_call,
            last: HashMap::new(),
            deferred: Vec::new(),
        }
    }

    pub fn keep(&mut self, layer: &str, replies: GnReplies<T>) {
        self.last.insert(layer.to_string(), replies);
    }

    pub fn last(&self, layer: &str) -> Option<&GnReplies<T>> {
        self.last.get(layer)
    }

    /// Moves the deferred replies at the front of each server's outputs into `last`, leaving
    /// the outputs the round trip's own caller asked for.
    pub fn collect(&mut self, outs: &mut [Vec<T>]) -> Result<()> {
        for d in std::mem::take(&mut self.deferred) {
            let mut mine = Vec::with_capacity(outs.len());
            for (i, o) in outs.iter_mut().enumerate() {
                let k = d.per_server.get(i).copied().unwrap_or(0);
                if o.len() < k {
                    return Err(internal(format!(
                        "{}: server {i} returned {} of {k} deferred replies",
                        d.layer,
                        o.len()
                    )));
                }
                mine.push(o.drain(..k).collect());
            }
            self.keep(
                &d.layer,
                GnReplies {
                    outs: mine,
                    asks: d.asks,
                },
            );
        }
        Ok(())
    }
}

impl<'a, E: Engine> Runtime<'a, E> {
    /// Stale synchronisation from U-Net call `from_call` on (None: never). Calls before it run
    /// exactly and leave the replies the first stale call uses.
    pub fn with_stale_sync(mut self, from_call: Option<u64>) -> Self {
        self.stale = from_call.map(StaleSync::new);
        self
    }

    /// The previous call's replies for GroupNorm `layer`, when this call runs it stale.
    pub(super) fn stale_replies(&self, layer: &str) -> Option<&GnReplies<E::T>> {
        let s = self.stale.as_ref()?;
        (self.call_index() >= s.from_call)
            .then(|| s.last(layer))
            .flatten()
    }

    /// Queues `replies` (a GroupNorm's statistics and halo asks) with the pending calls; their
    /// results are kept for the next call when the next round trip brings them.
    pub(super) fn defer(
        &mut self,
        layer: &str,
        replies: Vec<Vec<ShardCall<E::T>>>,
        asks: Vec<Vec<HaloAsk>>,
    ) -> Result<()> {
        let Some(s) = self.stale.as_mut() else {
            return Err(internal("deferred replies without stale sync"));
        };
        let per_server = replies.iter().map(Vec::len).collect();
        s.deferred.push(Deferred {
            layer: layer.to_string(),
            per_server,
            asks,
        });
        for (i, calls) in replies.into_iter().enumerate() {
            self.pending[i].extend(calls);
        }
        Ok(())
    }

    /// The replies of `replies` (statistics and halo asks laid out by `halo_requests`) with the
    /// asks they answer: this call's, after one round trip; or, when this call runs `key` stale,
    /// the previous call's at once, this call's queued for the next round trip.
    pub(super) async fn replies_or_stale(
        &mut self,
        (kind, layer, key): (OpKind, &str, &str),
        replies: Vec<Vec<ShardCall<E::T>>>,
        asks: Vec<Vec<HaloAsk>>,
    ) -> Result<(Vec<Vec<E::T>>, Vec<Vec<HaloAsk>>)> {
        if let Some(prev) = self.stale_replies(key) {
            let (outs, old_asks) = (prev.outs.clone(), prev.asks.clone());
            self.defer(key, replies, asks)?;
            return Ok((outs, old_asks));
        }
        let outs = self.flush(kind, layer, replies).await?;
        if let Some(s) = self.stale.as_mut() {
            s.keep(
                key,
                GnReplies {
                    outs: outs.clone(),
                    asks: asks.clone(),
                },
            );
        }
        Ok((outs, asks))
    }
}
