//! Replicas: the servers one tenant runs for one strip. `servers.toml` entries that share a
//! `tenant` name are one strip; a session uses one of them at a time. When that replica dies,
//! drains, times out or is busy, the strip moves to another replica **of the same tenant**
//! (never another tenant's, so no server's view widens): the new session is brought to where
//! the old one was by replaying the requests since the last step boundary at which the
//! session held no live handles, and the failed request is sent again. Server compute is
//! deterministic, so the generation yields the image an undisturbed run does (bit for bit with
//! exact wires; a residual codec restarts its references, so lossy codings differ within the
//! codec's tolerance).
//!
//! The replay log is bounded (`ClientOptions::max_replay_bytes`): past it, failover is off until
//! the next quiescent step boundary, and a failure gives the typed error a single server does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::Tensor;

use crate::transport::quic::{ClientOptions, QuicBackend};
use crate::transport::servers::ServerSpec;
use crate::vocab::error::{Error, Result, TransportError};
use crate::vocab::job::EarlySteps;
use crate::vocab::ops::{HandleId, ShardBackend, ShardCall, ShardOp, ShardReply, ShardRequest};
use crate::wire::ModelId;

/// Encoded bytes, requests and waiting time summed over every connection a strip used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficTotals {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub requests: u64,
    pub busy_nanos: u64,
}

impl TrafficTotals {
    /// What moved since `earlier` (a session kept across generations counts them all).
    pub fn since(&self, earlier: &TrafficTotals) -> TrafficTotals {
        TrafficTotals {
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
            requests: self.requests.saturating_sub(earlier.requests),
            busy_nanos: self.busy_nanos.saturating_sub(earlier.busy_nanos),
        }
    }
}

enum Entry {
    Begin(u64),
    Request(ShardRequest<Tensor>),
}

/// The handles the session holds, and (with replicas) what a new replica must be sent to hold
/// what the failed one held.
struct ReplayLog {
    /// Whether requests are kept (a strip with replicas) or only handles tracked.
    keep_entries: bool,
    entries: Vec<Entry>,
    bytes: u64,
    max_bytes: u64,
    /// Handles created and not yet released.
    live: HashSet<HandleId>,
    /// Live handles the runtime has dropped (their release goes out with a later request).
    dropped: HashSet<HandleId>,
    /// The log outgrew `max_bytes` since the last quiescent boundary: no replay possible.
    overflowed: bool,
}

fn request_bytes(r: &ShardRequest<Tensor>) -> u64 {
    r.calls
        .iter()
        .flat_map(|c| c.op.inline_operands())
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

impl ReplayLog {
    fn new(keep_entries: bool, max_bytes: u64) -> Self {
        Self {
            keep_entries,
            entries: Vec::new(),
            bytes: 0,
            max_bytes,
            live: HashSet::new(),
            dropped: HashSet::new(),
            overflowed: false,
        }
    }

    /// A step boundary: with nothing live the past is not needed any more.
    fn begin(&mut self, step: u64) {
        if self.live.iter().all(|h| self.dropped.contains(h)) {
            self.entries.clear();
            self.bytes = 0;
            self.overflowed = false;
            self.live.clear();
            self.dropped.clear();
        }
        if self.keep_entries && !self.overflowed {
            self.entries.push(Entry::Begin(step));
        }
    }

    /// A request the active replica executed.
    fn record(&mut self, request: &ShardRequest<Tensor>) {
        for c in &request.calls {
            if let ShardOp::Release { handle } = c.op {
                self.live.remove(&handle);
                self.dropped.remove(&handle);
            }
            if let Some(h) = c.keep_as {
                self.live.insert(h);
            }
        }
        if !self.keep_entries || self.overflowed {
            return;
        }
        self.bytes = self.bytes.saturating_add(request_bytes(request));
        if self.bytes > self.max_bytes {
            self.overflowed = true;
            self.entries.clear();
            self.bytes = 0;
        } else {
            self.entries.push(Entry::Request(request.clone()));
        }
    }
}

struct Active {
    backend: Arc<QuicBackend>,
    replica: usize,
}

/// One strip's replicas, as one shard backend.
pub struct ReplicaSet {
    index: usize,
    replicas: Vec<ServerSpec>,
    model_id: ModelId,
    options: ClientOptions,
    active: Mutex<Active>,
    /// Replicas that failed during this session, and every connection used (for traffic).
    failed: Mutex<Vec<bool>>,
    used: Mutex<Vec<Arc<QuicBackend>>>,
    /// Live handles; with replicas also the requests to replay.
    log: Mutex<ReplayLog>,
    /// Serialises failovers (two requests failing together switch once).
    switching: tokio::sync::Mutex<()>,
    failovers: AtomicU32,
    replayed: AtomicU32,
    /// The session was kept from an earlier generation and has not answered since: a dead one
    /// (a server that crashed silently) is reconnected once, even without replicas.
    kept: AtomicBool,
}

fn poisoned() -> Error {
    Error::Internal("replica state poisoned".into())
}

impl ReplicaSet {
    /// Connects strip `index` to one of `replicas` (tried in order from `first`, wrapping);
    /// fails with the first replica's error when none connects.
    pub async fn connect(
        index: usize,
        replicas: Vec<ServerSpec>,
        first: usize,
        model_id: ModelId,
        options: &ClientOptions,
    ) -> std::result::Result<Self, TransportError> {
        let n = replicas.len();
        let mut failed = vec![false; n];
        let mut first_err = None;
        for k in 0..n {
            let r = (first + k) % n;
            match QuicBackend::connect(index, &replicas[r], model_id, options).await {
                Ok(b) => {
                    let backend = Arc::new(b);
                    let log = Mutex::new(ReplayLog::new(n > 1, options.max_replay_bytes));
                    return Ok(Self {
                        index,
                        model_id,
                        options: options.clone(),
                        active: Mutex::new(Active {
                            backend: backend.clone(),
                            replica: r,
                        }),
                        failed: Mutex::new(failed),
                        used: Mutex::new(vec![backend]),
                        log,
                        switching: tokio::sync::Mutex::new(()),
                        failovers: AtomicU32::new(0),
                        replayed: AtomicU32::new(0),
                        kept: AtomicBool::new(false),
                        replicas,
                    });
                }
                Err(e) => {
                    tracing::warn!(strip = index, replica = %replicas[r].address, "cannot connect: {e}");
                    failed[r] = true;
                    if !fatal(&e) && k + 1 < n {
                        first_err.get_or_insert(e);
                        continue;
                    }
                    return Err(first_err.unwrap_or(e));
                }
            }
        }
        Err(TransportError::Unreachable {
            server: index,
            address: String::new(),
            message: "no replica given".into(),
        })
    }

    /// The strip index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The connection serving the strip now.
    pub fn active(&self) -> Result<Arc<QuicBackend>> {
        Ok(self.active.lock().map_err(|_| poisoned())?.backend.clone())
    }

    /// The address of the replica serving the strip now.
    pub fn address(&self) -> String {
        self.active()
            .map(|b| b.address().to_string())
            .unwrap_or_default()
    }

    /// How many times the strip moved to another replica.
    pub fn failovers(&self) -> u32 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Requests sent again to rebuild a session on another replica.
    pub fn replayed_requests(&self) -> u32 {
        self.replayed.load(Ordering::Relaxed)
    }

    /// Traffic summed over every connection this strip used.
    pub fn traffic(&self) -> TrafficTotals {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut t = TrafficTotals::default();
        for b in used {
            let x = b.traffic();
            t.bytes_sent += x.bytes_sent.load(Ordering::Relaxed);
            t.bytes_received += x.bytes_received.load(Ordering::Relaxed);
            t.requests += x.requests.load(Ordering::Relaxed);
            t.busy_nanos += x.busy_nanos.load(Ordering::Relaxed);
        }
        t
    }

    /// The serving connection is still open: the strip can serve another generation.
    pub fn is_open(&self) -> bool {
        self.active().is_ok_and(|b| b.is_open())
    }

    /// A generation is over and the session will serve another: the handles the server still
    /// holds (those whose release the runtime had not sent yet) are released in one request,
    /// and the log starts afresh. An error means the session is not fit for reuse.
    pub async fn end_generation(&self) -> Result<()> {
        let live: Vec<HandleId> = {
            let mut l = self.log.lock().map_err(|_| poisoned())?;
            let live = l.live.iter().copied().collect();
            *l = ReplayLog::new(l.keep_entries, l.max_bytes);
            live
        };
        let active = self.active()?;
        // Requests carry at most `Limits::max_calls` (1024) calls.
        for chunk in live.chunks(512) {
            let request = ShardRequest {
                calls: chunk
                    .iter()
                    .map(|&handle| ShardCall {
                        op: ShardOp::Release { handle },
                        keep_as: None,
                        reply: false,
                    })
                    .collect(),
            };
            active.execute(request).await?;
        }
        self.kept.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A kept session failed on its first request of a new generation (nothing to replay yet):
    /// connects again, to any replica (the others first: this one was just found dead),
    /// instead of failing the generation.
    async fn reconnect_kept(&self, old: &Arc<QuicBackend>, cause: Error) -> Result<()> {
        let _turn = self.switching.lock().await;
        let first = {
            let a = self.active.lock().map_err(|_| poisoned())?;
            if !Arc::ptr_eq(&a.backend, old) {
                return Ok(());
            }
            a.replica
        };
        self.kept.store(false, Ordering::Relaxed);
        old.close().await;
        let n = self.replicas.len();
        for k in 1..=n {
            let r = (first + k) % n;
            let spec = &self.replicas[r];
            match QuicBackend::connect(self.index, spec, self.model_id, &self.options).await {
                Ok(b) => {
                    tracing::info!(strip = self.index, replica = %spec.address, "the kept session was dead ({cause}); reconnected");
                    let backend = Arc::new(b);
                    if let Ok(mut u) = self.used.lock() {
                        u.push(backend.clone());
                    }
                    *self.active.lock().map_err(|_| poisoned())? = Active {
                        backend,
                        replica: r,
                    };
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(strip = self.index, replica = %spec.address, "cannot reconnect: {e}")
                }
            }
        }
        Err(cause)
    }

    /// Ends the session on every connection still open.
    pub async fn close(&self) {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        futures::future::join_all(used.iter().map(|b| b.close())).await;
    }

    /// Whether `e` is a kept session found dead on the first request of a generation.
    fn kept_and_dead(&self, e: &Error) -> bool {
        self.kept.load(Ordering::Relaxed)
            && matches!(
                e,
                Error::Transport(
                    TransportError::ConnectionLost { .. } | TransportError::Timeout { .. }
                )
            )
    }

    /// Whether `e`, from the active replica, is worth another replica.
    fn may_fail_over(&self, e: &Error) -> bool {
        self.replicas.len() > 1
            && match e {
                Error::Transport(t) => !fatal(t),
                _ => false,
            }
    }

    /// Moves the strip off `old` (which failed with `cause`) onto another replica, replaying
    /// the log; `cause` again when no replica can take over.
    async fn fail_over(&self, old: &Arc<QuicBackend>, cause: Error) -> Result<()> {
        let _turn = self.switching.lock().await;
        let old_replica = {
            let a = self.active.lock().map_err(|_| poisoned())?;
            if !Arc::ptr_eq(&a.backend, old) {
                return Ok(()); // another request already switched
            }
            a.replica
        };
        self.mark_failed(old_replica);
        // The log does not change while the strip is switching: one copy serves every candidate.
        let Some(replay) = self.replay_entries()? else {
            return Err(cause); // the log overflowed: nothing can be rebuilt
        };
        let n = self.replicas.len();
        for k in 1..n {
            let r = (old_replica + k) % n;
            if self.failed.lock().map_err(|_| poisoned())?[r] {
                continue;
            }
            let spec = &self.replicas[r];
            let backend = match QuicBackend::connect(self.index, spec, self.model_id, &self.options)
                .await
            {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    tracing::warn!(strip = self.index, replica = %spec.address, "cannot fail over: {e}");
                    self.mark_failed(r);
                    continue;
                }
            };
            if let Ok(mut u) = self.used.lock() {
                u.push(backend.clone());
            }
            match replay_on(&backend, &replay).await {
                Ok(()) => {
                    tracing::warn!(
                        strip = self.index,
                        from = %old.address(),
                        to = %spec.address,
                        requests = replay.len(),
                        "replica failed ({cause}); the strip continues on another replica"
                    );
                    let mut a = self.active.lock().map_err(|_| poisoned())?;
                    *a = Active {
                        backend,
                        replica: r,
                    };
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    let requests = replay
                        .iter()
                        .filter(|i| matches!(i, ReplayItem::Request(_)))
                        .count();
                    self.replayed.fetch_add(
                        u32::try_from(requests).unwrap_or(u32::MAX),
                        Ordering::Relaxed,
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(strip = self.index, replica = %spec.address, "replay failed: {e}");
                    backend.close().await;
                    self.mark_failed(r);
                }
            }
        }
        Err(cause)
    }

    fn mark_failed(&self, r: usize) {
        if let Ok(mut f) = self.failed.lock() {
            f[r] = true;
        }
    }

    /// A copy of the log (None when it overflowed).
    fn replay_entries(&self) -> Result<Option<Vec<ReplayItem>>> {
        let log = self.log.lock().map_err(|_| poisoned())?;
        if !log.keep_entries || log.overflowed {
            return Ok(None);
        }
        Ok(Some(
            log.entries
                .iter()
                .map(|e| match e {
                    Entry::Begin(s) => ReplayItem::Begin(*s),
                    Entry::Request(r) => ReplayItem::Request(r.clone()),
                })
                .collect(),
        ))
    }
}

enum ReplayItem {
    Begin(u64),
    Request(ShardRequest<Tensor>),
}

async fn replay_on(b: &QuicBackend, items: &[ReplayItem]) -> Result<()> {
    for item in items {
        match item {
            ReplayItem::Begin(s) => b.begin_step(*s),
            ReplayItem::Request(r) => {
                b.execute(r.clone()).await?;
            }
        }
    }
    Ok(())
}

/// Errors another replica of the same tenant would give too (or that say the session itself
/// is wrong): no failover on them.
fn fatal(e: &TransportError) -> bool {
    match e {
        TransportError::ConnectionLost { .. }
        | TransportError::Timeout { .. }
        | TransportError::Unreachable { .. } => false,
        TransportError::ServerError { message, .. } => !message.starts_with("Busy"),
        _ => true,
    }
}

#[async_trait]
impl ShardBackend<Tensor> for ReplicaSet {
    async fn execute(&self, request: ShardRequest<Tensor>) -> Result<ShardReply<Tensor>> {
        loop {
            let active = self.active()?;
            match active.execute(request.clone()).await {
                Ok(reply) => {
                    self.kept.store(false, Ordering::Relaxed);
                    self.log.lock().map_err(|_| poisoned())?.record(&request);
                    return Ok(reply);
                }
                Err(e) if self.kept_and_dead(&e) => self.reconnect_kept(&active, e).await?,
                Err(e) if self.may_fail_over(&e) => self.fail_over(&active, e).await?,
                Err(e) => return Err(e),
            }
        }
    }

    fn begin_step(&self, step: u64) {
        if let Ok(mut l) = self.log.lock() {
            l.begin(step);
        }
        if let Ok(a) = self.active() {
            a.begin_step(step);
        }
    }

    fn dropped(&self, handles: &[HandleId]) {
        if let Ok(mut l) = self.log.lock() {
            l.dropped.extend(handles.iter().copied());
        }
    }

    async fn early_steps(&self, job: EarlySteps<Tensor>) -> Result<Tensor> {
        loop {
            let active = self.active()?;
            match active.early_steps(job.clone()).await {
                Ok(t) => {
                    self.kept.store(false, Ordering::Relaxed);
                    return Ok(t);
                }
                Err(e) if self.kept_and_dead(&e) => self.reconnect_kept(&active, e).await?,
                Err(e) if self.may_fail_over(&e) => self.fail_over(&active, e).await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The strips of `specs`: entries sharing a `tenant` are one strip (at the place of its first
/// entry); an entry without a tenant is a strip of its own. Returns each strip's replicas.
pub fn group_strips(specs: &[ServerSpec]) -> Vec<Vec<ServerSpec>> {
    let mut strips: Vec<Vec<ServerSpec>> = Vec::new();
    for s in specs {
        let same = s.tenant.as_ref().and_then(|t| {
            strips
                .iter()
                .position(|g| g[0].tenant.as_deref() == Some(t.as_str()))
        });
        match same {
            Some(i) => strips[i].push(s.clone()),
            None => strips.push(vec![s.clone()]),
        }
    }
    strips
}

/// Connects every strip of `specs` (concurrently), each to one of its replicas, starting from a
/// random one so that sessions spread over a tenant's replicas. Fails with the first strip's
/// error in strip order, closing what connected.
pub async fn connect_strips(
    specs: &[ServerSpec],
    model_id: ModelId,
    options: &ClientOptions,
) -> std::result::Result<Vec<Arc<ReplicaSet>>, TransportError> {
    let strips = group_strips(specs);
    let results = futures::future::join_all(strips.into_iter().enumerate().map(|(i, r)| {
        let first = rand::random::<u32>() as usize % r.len().max(1);
        ReplicaSet::connect(i, r, first, model_id, options)
    }))
    .await;
    let mut ok = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(s) => ok.push(Arc::new(s)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        futures::future::join_all(ok.iter().map(|s| s.close())).await;
        return Err(e);
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::Fingerprint;
    use crate::vocab::ops::Operand;

    fn spec(address: &str, tenant: Option<&str>) -> ServerSpec {
        ServerSpec {
            address: address.into(),
            fingerprint: Fingerprint([0; 32]),
            token: "t".into(),
            tenant: tenant.map(str::to_string),
        }
    }

    #[test]
    fn tenants_group_into_strips_in_order_of_first_entry() {
        let specs = [
            spec("a1", Some("a")),
            spec("x", None),
            spec("b1", Some("b")),
            spec("a2", Some("a")),
            spec("y", None),
        ];
        let strips = group_strips(&specs);
        let names: Vec<Vec<&str>> = strips
            .iter()
            .map(|g| g.iter().map(|s| s.address.as_str()).collect())
            .collect();
        assert_eq!(
            names,
            vec![vec!["a1", "a2"], vec!["x"], vec!["b1"], vec!["y"]]
        );
    }

    fn call(op: ShardOp<Tensor>, keep: Option<HandleId>) -> ShardCall<Tensor> {
        ShardCall {
            op,
            keep_as: keep,
            reply: false,
        }
    }

    fn keep(h: HandleId, len: usize) -> ShardRequest<Tensor> {
        let t =
            Tensor::zeros(len, candle_core::DType::F32, &candle_core::Device::Cpu).expect("tensor");
        ShardRequest {
            calls: vec![call(
                ShardOp::Identity {
                    input: Operand::Inline(t),
                },
                Some(h),
            )],
        }
    }

    fn release(h: HandleId) -> ShardRequest<Tensor> {
        ShardRequest {
            calls: vec![call(ShardOp::Release { handle: h }, None)],
        }
    }

    #[test]
    fn the_log_keeps_what_live_handles_need_and_forgets_at_quiet_boundaries() {
        let mut log = ReplayLog::new(true, 1 << 20);
        log.begin(0);
        log.record(&keep(1, 4));
        log.record(&keep(2, 4));
        log.record(&release(1));
        // Handle 2 is live: step 1 still needs step 0's requests.
        log.begin(1);
        assert_eq!(log.entries.len(), 5);
        // The runtime dropped handle 2; its release is still queued: step 2 starts afresh.
        log.dropped.insert(2);
        log.begin(2);
        assert_eq!(log.entries.len(), 1);
        assert!(matches!(log.entries[0], Entry::Begin(2)));
        // The late release of 2 changes nothing.
        log.record(&release(2));
        assert!(log.live.is_empty());

        // Past the byte bound the log stops (no replay) until the next quiet boundary.
        let mut log = ReplayLog::new(true, 64);
        log.begin(0);
        log.record(&keep(1, 8)); // 32 bytes
        log.record(&keep(2, 16)); // 64 more: over
        assert!(log.overflowed && log.entries.is_empty());
        log.begin(1);
        assert!(log.overflowed, "handles are live, the past is still needed");
        log.record(&release(1));
        log.record(&release(2));
        log.begin(2);
        assert!(!log.overflowed);
        assert_eq!(log.entries.len(), 1);
    }
}
