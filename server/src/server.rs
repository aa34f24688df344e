//! The QUIC shard server: accepts connections, runs the handshake (version, tenant token,
//! model identity), then answers each request stream with one reply. A connection is a session
//! with its own tensor handles; a malformed message closes that connection only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, ReadToEndError, RecvStream, VarInt};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use veil_core::placement::admission::MemoryBudget;
use veil_core::placement::backend::ShardExecutor;
use veil_core::placement::engine::CandleEngine;
use veil_core::placement::engine::WireDtype;
use veil_core::transport::quic::close_code;
use veil_core::transport::tls::{server_config, TransportTuning};
use veil_core::transport::Fingerprint;
use veil_core::wire::codec::{decode, WireError};
use veil_core::wire::convert::{calls_from_wire, early_steps_from_wire, reply_to_wire};
use veil_core::wire::references::{exact_reply, CodecEnd};
use veil_core::wire::{
    Compression, ErrorCode, Limits, Message, ModelId, ReplyCoding, WireCall, WireEarlySteps,
    WireTensor, PROTOCOL_VERSION,
};

use crate::answer::{answer, error_msg, refuse, send_answer, Pace, ReplyStream, Sent};
use crate::limits::PendingHellos;
pub use crate::limits::{ServerLimits, DEFAULT_MEMORY_BUDGET_BYTES};
use crate::model::ShardModel;
use crate::stats::bump;
use crate::stats::{prometheus, Gauges};
pub use crate::stats::{ServerStats, StatsSnapshot};
use crate::tls::TlsIdentity;
use crate::ServerError;

/// Largest handshake message read.
const MAX_HELLO_BYTES: usize = 64 << 10;
/// Flow-control window of a connection before its Welcome (a Hello and some framing).
const PRE_AUTH_WINDOW: u32 = 2 * MAX_HELLO_BYTES as u32;
/// The connection window after the Welcome: tens of MiB keep bulk tensor streams from stalling
/// (the per-stream window, set for every connection, is `TransportTuning`'s 16 MiB).
const SESSION_CONNECTION_WINDOW: u32 = 64 << 20;

/// Everything a server needs besides its model.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    /// Accepted tenant tokens (at least one).
    pub tokens: Vec<String>,
    pub limits: ServerLimits,
    pub identity: TlsIdentity,
    /// Where to serve the Prometheus metrics and the health check over HTTP (none: off).
    pub metrics_listen: Option<SocketAddr>,
}

/// Shared by every connection task.
struct Ctx {
    model: Arc<ShardModel>,
    /// Accepted tenant tokens (replaced on reload, `ShardServer::set_tokens`).
    tokens: std::sync::RwLock<Vec<String>>,
    limits: ServerLimits,
    sessions: Arc<Semaphore>,
    stats: Arc<ServerStats>,
    active: AtomicUsize,
    /// Memory all sessions draw from (`ServerLimits::memory_budget_bytes`).
    budget: Arc<MemoryBudget>,
    pending: PendingHellos,
    /// Turns to compute (`max_concurrent_work`) and the requests waiting for one.
    compute: Arc<Semaphore>,
    queued: AtomicUsize,
    /// Set by `drain`: new Hellos are refused, open sessions may finish.
    draining: std::sync::atomic::AtomicBool,
    /// Open sessions per tenant token (by its index in `tokens`).
    per_token: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A running shard server.
pub struct ShardServer {
    endpoint: Endpoint,
    addr: SocketAddr,
    fingerprint: Fingerprint,
    model_id: ModelId,
    stats: Arc<ServerStats>,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for ShardServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardServer")
            .field("addr", &self.addr)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl ShardServer {
    /// Binds the endpoint and starts serving on the current tokio runtime.
    pub fn start(options: ServerOptions, model: Arc<ShardModel>) -> Result<Self, ServerError> {
        if options.tokens.is_empty() {
            return Err(ServerError::Config(
                "no tenant tokens configured (token_file or tokens)".into(),
            ));
        }
        let min = crate::config::MIN_TOKEN_CHARS;
        if options.tokens.iter().any(|t| t.chars().count() < min) {
            return Err(ServerError::Config(format!(
                "a tenant token shorter than {min} characters"
            )));
        }
        let l = &options.limits;
        if l.max_sessions == 0 || l.max_concurrent_streams == 0 || l.max_message_bytes == 0 {
            return Err(ServerError::Config(
                "max_sessions, max_concurrent_streams and max_message_bytes must be positive"
                    .into(),
            ));
        }
        let fingerprint = options.identity.fingerprint();
        // Before its Welcome a connection gets one stream and a connection window just big
        // enough for a Hello: an unauthenticated peer cannot make the server buffer more.
        // `handshake` raises both after the Welcome.
        let tuning = TransportTuning {
            idle_timeout: l.idle_timeout,
            keep_alive: None,
            max_incoming_streams: 1,
            connection_window: PRE_AUTH_WINDOW,
            ..TransportTuning::default()
        };
        let config = server_config(options.identity.cert, options.identity.key, &tuning)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        let endpoint = Endpoint::server(config, options.listen).map_err(|e| ServerError::Bind {
            addr: options.listen,
            source: e,
        })?;
        let addr = endpoint.local_addr().map_err(|e| ServerError::Bind {
            addr: options.listen,
            source: e,
        })?;
        let stats = Arc::new(ServerStats::default());
        let model_id = model.id();
        let ctx = Arc::new(Ctx {
            model,
            tokens: std::sync::RwLock::new(options.tokens),
            limits: options.limits,
            sessions: Arc::new(Semaphore::new(options.limits.max_sessions)),
            budget: MemoryBudget::new(options.limits.memory_budget_bytes),
            pending: PendingHellos::new(
                options.limits.max_pending_hellos,
                options.limits.max_pending_hellos_per_ip,
            ),
            compute: Arc::new(Semaphore::new(match options.limits.max_concurrent_work {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            })),
            queued: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            per_token: Default::default(),
            stats: stats.clone(),
            active: AtomicUsize::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let metrics_addr = match options.metrics_listen {
            Some(at) => Some(spawn_metrics(at, ctx.clone(), stop_rx.clone())?),
            None => None,
        };
        let accept = tokio::spawn(accept_loop(endpoint.clone(), ctx.clone(), stop_rx));
        tracing::info!(%addr, %fingerprint, model = %hex::encode(model_id), "serving");
        Ok(Self {
            endpoint,
            addr,
            fingerprint,
            model_id,
            stats,
            stop,
            accept: Some(accept),
            metrics_addr,
            ctx,
        })
    }

    /// Where the metrics endpoint listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address (the actual port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// The certificate fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
    pub fn model_id(&self) -> ModelId {
        self.model_id
    }
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Replaces the accepted tenant tokens (SIGHUP): new Hellos are checked against these;
    /// open sessions keep going. Refuses an empty list or a token shorter than 32 characters.
    pub fn set_tokens(&self, tokens: Vec<String>) -> Result<(), ServerError> {
        let min = crate::config::MIN_TOKEN_CHARS;
        if tokens.is_empty() || tokens.iter().any(|t| t.chars().count() < min) {
            return Err(ServerError::Config(format!(
                "tokens not replaced: give at least one, each of {min} characters or more"
            )));
        }
        let mut held = self
            .ctx
            .tokens
            .write()
            .map_err(|_| ServerError::Config("the token table is poisoned".into()))?;
        *held = tokens;
        Ok(())
    }

    /// Bytes of the memory budget in use now: running ops and tensors sessions keep.
    pub fn memory_in_use(&self) -> u64 {
        self.ctx.budget.used()
    }

    /// Sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.ctx
            .limits
            .max_sessions
            .saturating_sub(self.ctx.sessions.available_permits())
    }

    /// Graceful drain (SIGTERM): from now on every Hello is refused with `Busy` ("server
    /// draining") while the open sessions go on; returns once none is left or `deadline` has
    /// passed (then `shutdown` closes the rest with the reason "server draining").
    pub async fn drain(&self, deadline: Duration) {
        self.ctx.draining.store(true, Ordering::Release);
        tracing::info!(sessions = self.active_sessions(), "draining");
        let until = tokio::time::Instant::now() + deadline;
        while self.active_sessions() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.active_sessions();
        if left > 0 {
            tracing::warn!(sessions = left, "drain deadline passed; closing them");
        }
    }

    /// Stops accepting, closes every connection (clients see "server shutting down") and
    /// waits until the close frames went out (at most `grace`).
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if let Some(a) = self.accept.take() {
            let _ = a.await;
        }
        let reason: &[u8] = match self.ctx.draining.load(Ordering::Acquire) {
            true => b"server draining",
            false => b"server shutting down",
        };
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), reason);
        if tokio::time::timeout(grace, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("connections did not close within {grace:?}");
        }
        tracing::info!("stopped");
    }

    /// Waits until the accept loop ends (it ends only on `shutdown`, or when the endpoint is
    /// closed).
    pub async fn closed(&mut self) {
        if let Some(a) = self.accept.as_mut() {
            let _ = a.await;
            self.accept = None;
        }
    }
}

impl Drop for ShardServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"server dropped");
    }
}

/// Binds the metrics endpoint at `at` and serves the server's counters and gauges there.
fn spawn_metrics(
    at: SocketAddr,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) -> Result<SocketAddr, ServerError> {
    let bind = |e: std::io::Error| ServerError::Bind {
        addr: at,
        source: e,
    };
    let std_listener = std::net::TcpListener::bind(at).map_err(bind)?;
    std_listener.set_nonblocking(true).map_err(bind)?;
    let bound = std_listener.local_addr().map_err(bind)?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind)?;
    let render = Arc::new(move || {
        let gauges = Gauges {
            sessions_active: (ctx.limits.max_sessions - ctx.sessions.available_permits()) as u64,
            connections_active: ctx.active.load(Ordering::Relaxed) as u64,
            pending_hellos: ctx.pending.len() as u64,
            queued_work: ctx.queued.load(Ordering::Relaxed) as u64,
            budget_used_bytes: ctx.budget.used(),
            budget_limit_bytes: ctx.budget.limit(),
        };
        prometheus(&ctx.stats, &gauges)
    });
    tokio::spawn(crate::metrics::serve(listener, render, stop));
    tracing::info!(%bound, "metrics at http://{bound}/metrics");
    Ok(bound)
}

async fn accept_loop(endpoint: Endpoint, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            _ = stop.changed() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        // An address that has not proven it receives at it gets a stateless retry first, so
        // spoofed sources cost the server no connection state.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        // Bound the work in flight: sessions, connections owing a Hello (the oldest evicted,
        // `PendingHellos`) and QUIC handshakes under way.
        let cap = ctx
            .limits
            .max_sessions
            .saturating_add(ctx.limits.max_pending_hellos.saturating_mul(2));
        if ctx.active.load(Ordering::Relaxed) >= cap {
            tracing::warn!(remote = %incoming.remote_address(), "refusing: too many connections");
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.active.fetch_add(1, Ordering::Relaxed);
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    bump(&ctx.stats.connections);
                    serve_connection(conn, &ctx).await;
                }
                Err(e) => {
                    bump(&ctx.stats.tls_failures);
                    tracing::debug!(%remote, "connection failed during the QUIC handshake: {e}");
                }
            }
            ctx.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Which configured token `given` is, comparing against every one in constant time (no early
/// exit on a match or a mismatch).
fn token_index(tokens: &[String], given: &str) -> Option<usize> {
    let mut found = 0u64;
    let mut any = Choice::from(0u8);
    for (i, t) in tokens.iter().enumerate() {
        let hit = t.as_bytes().ct_eq(given.as_bytes());
        found = u64::conditional_select(&found, &(i as u64), hit);
        any |= hit;
    }
    bool::from(any).then_some(found as usize)
}

/// A session counted against its tenant token's cap until dropped.
struct TokenSession {
    ctx: Arc<Ctx>,
    token: String,
}

impl Drop for TokenSession {
    fn drop(&mut self) {
        if let Ok(mut m) = self.ctx.per_token.lock() {
            if let Some(n) = m.get_mut(&self.token) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

async fn serve_connection(conn: Connection, ctx: &Arc<Ctx>) {
    let remote = conn.remote_address();
    let ticket = ctx.pending.admit(&conn);
    let permit = handshake(&conn, ctx).await;
    ctx.pending.done(ticket);
    let Some(_permit) = permit else {
        return;
    };
    tracing::info!(%remote, "session opened");
    let executor = Arc::new(
        ctx.model
            .executor()
            .with_max_handle_bytes(ctx.limits.max_session_bytes)
            .with_limits(
                ctx.limits.max_op_bytes,
                ctx.limits.max_tensor_bytes as u64,
                ctx.budget.clone(),
            ),
    );
    let codec: SessionCodec = Arc::new(std::sync::Mutex::new(CodecEnd::new(
        usize::try_from(ctx.limits.max_session_bytes).unwrap_or(usize::MAX),
        MAX_CODEC_SLOTS,
    )));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                let conn = conn.clone();
                let executor = executor.clone();
                let codec = codec.clone();
                tokio::spawn(async move {
                    serve_stream(&conn, ReplyStream::new(send), recv, &ctx, executor, codec).await;
                });
            }
            Err(e) => {
                tracing::info!(%remote, "session ended: {e}");
                break;
            }
        }
    }
}

/// Runs the handshake; on success returns the session permit (held for the session's life).
async fn handshake(
    conn: &Connection,
    ctx: &Arc<Ctx>,
) -> Option<(tokio::sync::OwnedSemaphorePermit, TokenSession)> {
    let remote = conn.remote_address();
    let first = tokio::time::timeout(ctx.limits.handshake_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let buf = recv.read_to_end(MAX_HELLO_BYTES).await;
        Some((ReplyStream::new(send), buf))
    })
    .await;
    let (send, buf) = match first {
        Ok(Some(x)) => x,
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(%remote, "no Hello in time");
            conn.close(VarInt::from_u32(close_code::TIMEOUT), b"no hello");
            return None;
        }
    };
    let refused = |stats: &ServerStats| bump(&stats.refused);
    let buf = match buf {
        Ok(b) => b,
        Err(e) => {
            bump(&ctx.stats.malformed);
            refused(&ctx.stats);
            let msg = error_msg(ErrorCode::Malformed, format!("handshake stream: {e}"));
            refuse(conn, send, msg, close_code::MALFORMED, b"malformed hello").await;
            return None;
        }
    };
    let small = Limits {
        max_message_bytes: MAX_HELLO_BYTES,
        ..ctx.limits.wire()
    };
    let (version, token, model_id) = match decode(&buf, &small) {
        Ok(Message::Hello {
            version,
            token,
            model_id,
        }) => (version, token, model_id),
        Ok(_) => {
            refused(&ctx.stats);
            let msg = error_msg(ErrorCode::WrongState, "the first stream must carry Hello");
            refuse(conn, send, msg, close_code::REFUSED, b"expected hello").await;
            return None;
        }
        Err(WireError::UnsupportedVersion(v)) => {
            refused(&ctx.stats);
            let msg = error_msg(
                ErrorCode::VersionMismatch,
                format!("this server speaks protocol {PROTOCOL_VERSION}, not {v}"),
            );
            refuse(conn, send, msg, close_code::REFUSED, b"version").await;
            return None;
        }
        Err(e) => {
            bump(&ctx.stats.malformed);
            refused(&ctx.stats);
            let msg = error_msg(ErrorCode::Malformed, e);
            refuse(conn, send, msg, close_code::MALFORMED, b"malformed hello").await;
            return None;
        }
    };
    bump(&ctx.stats.hellos);
    if version != PROTOCOL_VERSION {
        refused(&ctx.stats);
        let msg = error_msg(
            ErrorCode::VersionMismatch,
            format!("this server speaks protocol {PROTOCOL_VERSION}, not {version}"),
        );
        refuse(conn, send, msg, close_code::REFUSED, b"version").await;
        return None;
    }
    let known = ctx
        .tokens
        .read()
        .map(|t| token_index(&t, &token).is_some())
        .unwrap_or(false);
    if !known {
        refused(&ctx.stats);
        bump(&ctx.stats.auth_failures);
        tracing::warn!(%remote, "refused: wrong tenant token");
        let msg = error_msg(ErrorCode::AuthFailed, "tenant token not accepted");
        refuse(conn, send, msg, close_code::REFUSED, b"auth").await;
        return None;
    }
    if model_id != ctx.model.id() {
        refused(&ctx.stats);
        tracing::warn!(%remote, expected = %hex::encode(model_id), "refused: model mismatch");
        let msg = error_msg(
            ErrorCode::ModelMismatch,
            format!(
                "this server holds model {}, the client expects {}",
                hex::encode(ctx.model.id()),
                hex::encode(model_id)
            ),
        );
        refuse(conn, send, msg, close_code::REFUSED, b"model").await;
        return None;
    }
    if ctx.draining.load(Ordering::Acquire) {
        let msg = "server draining: try another replica or later".to_string();
        refuse_busy(conn, send, ctx, msg, b"draining").await;
        return None;
    }
    let Some(tenant) = token_session(ctx, token) else {
        tracing::warn!(%remote, "refused: the token is at its session limit");
        let n = ctx.limits.max_sessions_per_token;
        let msg = format!("this tenant token is at its limit of {n} sessions");
        refuse_busy(conn, send, ctx, msg, b"busy").await;
        return None;
    };
    let Ok(permit) = ctx.sessions.clone().try_acquire_owned() else {
        tracing::warn!(%remote, "refused: at the session limit");
        let msg = format!(
            "server at its limit of {} sessions",
            ctx.limits.max_sessions
        );
        refuse_busy(conn, send, ctx, msg, b"busy").await;
        return None;
    };
    let mut send = send;
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        model_id: ctx.model.id(),
    };
    answer(&mut send, &welcome, Compression::None).await?;
    // Authenticated: the session's stream credit (one beyond the request limit, so the
    // client's next stream never waits) and windows.
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(
        ctx.limits.max_concurrent_streams.saturating_add(1),
    ));
    conn.set_receive_window(VarInt::from_u32(SESSION_CONNECTION_WINDOW));
    conn.set_send_window(u64::from(SESSION_CONNECTION_WINDOW));
    bump(&ctx.stats.sessions);
    Some((permit, tenant))
}

/// Refuses a Hello with `Busy` (counted as a refused handshake) and closes the connection.
async fn refuse_busy(conn: &Connection, send: ReplyStream, ctx: &Ctx, message: String, why: &[u8]) {
    bump(&ctx.stats.refused);
    let msg = error_msg(ErrorCode::Busy, message);
    refuse(conn, send, msg, close_code::REFUSED, why).await;
}

/// Counts a session against token `token`'s cap, or None at the cap.
fn token_session(ctx: &Arc<Ctx>, token: String) -> Option<TokenSession> {
    let mut m = ctx.per_token.lock().ok()?;
    let n = m.entry(token.clone()).or_insert(0);
    if *n >= ctx.limits.max_sessions_per_token {
        return None;
    }
    *n += 1;
    Some(TokenSession {
        ctx: ctx.clone(),
        token,
    })
}

/// Most reference slots of the shard codecs a session keeps per direction.
const MAX_CODEC_SLOTS: usize = 1 << 16;

/// A session's end of the shard codecs (docs/PROTOCOL.md §8).
type SessionCodec = Arc<std::sync::Mutex<CodecEnd>>;

/// What one request stream asks for.
enum Work {
    /// Shard calls, executed in order, and how to code their replies.
    Shard(Vec<WireCall>, ReplyCoding),
    /// The `obfuscated` policy's early steps (a full-model server only).
    EarlySteps(WireEarlySteps),
}

async fn serve_stream(
    conn: &Connection,
    send: ReplyStream,
    mut recv: RecvStream,
    ctx: &Arc<Ctx>,
    executor: Arc<ShardExecutor<CandleEngine>>,
    codec: SessionCodec,
) {
    let remote = conn.remote_address();
    let Some((work, reply_dtype, compression, send)) = read_work(conn, send, &mut recv, ctx).await
    else {
        return;
    };
    bump(&ctx.stats.requests);
    let compression = clamp_reply_compression(compression);
    // A bounded queue for the compute turns: a request beyond it is answered Busy at once
    // instead of piling up behind the others.
    if ctx.queued.fetch_add(1, Ordering::AcqRel) >= ctx.limits.max_queued_work {
        ctx.queued.fetch_sub(1, Ordering::AcqRel);
        bump(&ctx.stats.busy);
        let msg = error_msg(ErrorCode::Busy, "the server's compute queue is full");
        reply(conn, send, msg, compression, ctx).await;
        return;
    }
    let turn = ctx.compute.clone().acquire_owned().await;
    ctx.queued.fetch_sub(1, Ordering::AcqRel);
    let Ok(_turn) = turn else {
        return;
    };
    // Work of a connection that closed while it waited is dropped, and a running request
    // stops between calls once its connection is gone.
    if conn.close_reason().is_some() {
        return;
    }
    let device = ctx.model.device().clone();
    let watched = conn.clone();
    let started = std::time::Instant::now();
    // Compute off the async workers: convolutions take long, and a panic in candle on some
    // unforeseen shape becomes an Internal error instead of taking the server down.
    let work = tokio::task::spawn_blocking(move || {
        let outputs = match work {
            Work::Shard(mut calls, coding) => {
                // References are per session: a request decodes, and later codes its replies,
                // under the session's lock; the compute between runs without it.
                let lock = || {
                    codec
                        .lock()
                        .map_err(|_| veil_core::Error::Internal("codec state poisoned".into()))
                };
                lock()?.decode_calls(&mut calls)?;
                let exact: Vec<bool> = calls
                    .iter()
                    .filter(|c| c.reply)
                    .map(|c| exact_reply(&c.op))
                    .collect();
                let request = calls_from_wire(calls, &device)?;
                let gone = || watched.close_reason().is_some();
                let reply = executor.execute_until(&request, &gone)?;
                let raw = reply_to_wire(&reply, &request, reply_dtype)?;
                lock()?.encode_replies(raw, &exact, coding)?
            }
            Work::EarlySteps(job) => {
                let job = early_steps_from_wire(job, &device)?;
                let latents = executor.early_steps(&job)?;
                vec![WireTensor::from_tensor(&latents, reply_dtype)?]
            }
        };
        Ok::<_, veil_core::Error>(Message::Reply { outputs })
    })
    .await;
    ctx.stats.latency.observe(started.elapsed());
    let msg = match work {
        Ok(Ok(m)) => {
            bump(&ctx.stats.replies);
            m
        }
        Ok(Err(veil_core::Error::Internal(e))) => {
            tracing::error!(%remote, "internal error: {e}");
            error_msg(ErrorCode::Internal, e)
        }
        Ok(Err(e)) => {
            bump(&ctx.stats.bad_requests);
            tracing::debug!(%remote, "bad request: {e}");
            error_msg(ErrorCode::BadRequest, e)
        }
        Err(e) => {
            tracing::error!(%remote, "request task failed: {e}");
            error_msg(ErrorCode::Internal, "the request failed inside the server")
        }
    };
    reply(conn, send, msg, compression, ctx).await;
}

/// Sends the answer of a request stream at the session's pace; a peer that does not take it in
/// time is closed as a slow peer (its reply's buffers are not held for it).
async fn reply(
    conn: &Connection,
    send: ReplyStream,
    msg: Message,
    compression: Compression,
    ctx: &Ctx,
) {
    let pace = Pace {
        grace: ctx.limits.request_grace,
        min_rate: ctx.limits.min_request_rate,
    };
    if send_answer(send, msg, compression, &ctx.stats.bytes_out, pace).await == Sent::TooSlow {
        bump(&ctx.stats.malformed);
        tracing::warn!(remote = %conn.remote_address(), "closing: reply not read at the minimum pace");
        conn.close(VarInt::from_u32(close_code::MALFORMED), b"too slow");
    }
}

enum Paced {
    Read(ReadToEndError),
    /// The stream fell behind its deadline, having sent this many bytes.
    TooSlow(usize),
}

/// Reads a whole stream of at most `max` bytes, as long as it keeps pace: by any moment
/// `request_grace` plus one second per `min_request_rate` bytes received so far must not have
/// passed (a peer trickling bytes cannot hold a stream, and its buffers, open forever).
async fn read_paced(recv: &mut RecvStream, max: usize, l: &ServerLimits) -> Result<Vec<u8>, Paced> {
    let start = tokio::time::Instant::now();
    let mut buf = Vec::new();
    loop {
        let allowance =
            Duration::from_secs_f64(buf.len() as f64 / l.min_request_rate.max(1) as f64);
        let deadline = start + l.request_grace + allowance;
        let chunk = match tokio::time::timeout_at(deadline, recv.read_chunk(64 << 10, true)).await {
            Err(_) => return Err(Paced::TooSlow(buf.len())),
            Ok(Err(e)) => return Err(Paced::Read(ReadToEndError::Read(e))),
            Ok(Ok(None)) => return Ok(buf),
            Ok(Ok(Some(c))) => c,
        };
        if buf.len() + chunk.bytes.len() > max {
            return Err(Paced::Read(ReadToEndError::TooLong));
        }
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Reads and decodes one request stream; on anything but a `Request` or an `EarlySteps`, answers
/// with an error, closes the connection and returns None.
async fn read_work(
    conn: &Connection,
    send: ReplyStream,
    recv: &mut RecvStream,
    ctx: &Arc<Ctx>,
) -> Option<(Work, WireDtype, Compression, ReplyStream)> {
    let remote = conn.remote_address();
    let limits = ctx.limits.wire();
    let buf = match read_paced(recv, limits.max_message_bytes, &ctx.limits).await {
        Ok(b) => b,
        Err(Paced::TooSlow(got)) => {
            bump(&ctx.stats.malformed);
            tracing::warn!(%remote, got, "closing: request arriving too slowly");
            let msg = error_msg(
                ErrorCode::Malformed,
                format!(
                    "request too slow: {got} bytes within the deadline (at least {} bytes/s after a \
                     {:?} grace)",
                    ctx.limits.min_request_rate, ctx.limits.request_grace
                ),
            );
            refuse(conn, send, msg, close_code::MALFORMED, b"too slow").await;
            return None;
        }
        Err(Paced::Read(ReadToEndError::TooLong)) => {
            bump(&ctx.stats.malformed);
            tracing::warn!(%remote, "closing: request over {} bytes", limits.max_message_bytes);
            let msg = error_msg(
                ErrorCode::Malformed,
                format!("message larger than {} bytes", limits.max_message_bytes),
            );
            refuse(conn, send, msg, close_code::MALFORMED, b"message too large").await;
            return None;
        }
        Err(Paced::Read(e)) => {
            tracing::debug!(%remote, "request stream failed: {e}");
            return None;
        }
    };
    ctx.stats
        .bytes_in
        .fetch_add(buf.len() as u64, Ordering::Relaxed);
    match decode(&buf, &limits) {
        Ok(Message::Request {
            calls,
            reply_dtype,
            compression,
            reply_coding,
        }) => Some((
            Work::Shard(calls, reply_coding),
            reply_dtype,
            compression,
            send,
        )),
        Ok(Message::EarlySteps {
            job,
            reply_dtype,
            compression,
        }) => Some((Work::EarlySteps(job), reply_dtype, compression, send)),
        Ok(_) => {
            bump(&ctx.stats.malformed);
            let msg = error_msg(ErrorCode::WrongState, "expected a Request");
            refuse(
                conn,
                send,
                msg,
                close_code::MALFORMED,
                b"unexpected message",
            )
            .await;
            None
        }
        Err(e) => {
            bump(&ctx.stats.malformed);
            tracing::warn!(%remote, "closing: malformed request: {e}");
            let msg = error_msg(ErrorCode::Malformed, e);
            refuse(conn, send, msg, close_code::MALFORMED, b"malformed").await;
            None
        }
    }
}

/// Most zstd level a client may ask its replies to be compressed at: higher levels cost the
/// server far more CPU for a few percent of bytes.
const MAX_REPLY_ZSTD_LEVEL: i32 = 9;

fn clamp_reply_compression(c: Compression) -> Compression {
    match c {
        Compression::Zstd(l) => Compression::Zstd(l.min(MAX_REPLY_ZSTD_LEVEL)),
        Compression::ZstdByteSplit(l) => Compression::ZstdByteSplit(l.min(MAX_REPLY_ZSTD_LEVEL)),
        Compression::None => Compression::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let tokens = vec!["alpha".to_string(), "beta-token".to_string()];
        assert_eq!(token_index(&tokens, "alpha"), Some(0));
        assert_eq!(token_index(&tokens, "beta-token"), Some(1));
        for bad in ["", "alph", "alphaa", "beta", "ALPHA"] {
            assert_eq!(token_index(&tokens, bad), None, "{bad}");
        }
        assert_eq!(token_index(&[], "alpha"), None);
    }
}
