//! `QuicBackend`: one QUIC connection to one shard server, exposed to the placement runtime as a
//! `ShardBackend`. The connection is the session: tensors the server holds by handle live as
//! long as it does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use quinn::{Connection, Endpoint, ReadToEndError, VarInt, WriteError};

pub use crate::transport::handshake::connect_quic;
use crate::transport::handshake::{hello, kind_name, open_connection, Who};
use crate::transport::servers::ServerSpec;
use crate::transport::tls::TransportTuning;
use crate::transport::TransportError;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::EarlySteps;
use crate::vocab::ops::{PayloadBytes, ShardBackend, ShardReply, ShardRequest};
use crate::vocab::precision::{ShardCodec, WireDtype};
use crate::wire::codec::{decode_counted, encode_counted, WireError};
use crate::wire::convert::{early_steps_to_wire, request_to_wire};
use crate::wire::references::{coded_inputs, CodecEnd, SendAs};
use crate::wire::{Compression, Limits, Message, ModelId, RefMode, ReplyCoding, WireTensor};

/// Application close codes (QUIC CONNECTION_CLOSE) used by client and server.
pub mod close_code {
    /// Normal end of a session.
    pub const DONE: u32 = 0;
    /// The handshake was refused (token, model, version, busy).
    pub const REFUSED: u32 = 1;
    /// The peer sent a message that does not decode or breaks a limit.
    pub const MALFORMED: u32 = 2;
    /// The client gave up waiting for a reply.
    pub const TIMEOUT: u32 = 3;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 4;
}

/// How the client talks to shard servers.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Dtype of tensors on the wire, both ways. Use the runtime's wire dtype.
    pub wire: WireDtype,
    /// Compression of tensors, both ways (the reply uses what the request asks for).
    pub compression: Compression,
    /// Lossy coding of activations, both ways (docs/PROTOCOL.md §8).
    pub codec: ShardCodec,
    /// Denoising steps (U-Net calls of a runtime) from the first on that travel exact: raw,
    /// and kept as the residual codecs' references.
    pub exact_steps: u64,
    /// A request (send, server compute, reply) must complete within this, else `Timeout` and
    /// the session is closed.
    pub request_timeout: Duration,
    /// QUIC handshake plus Hello/Welcome must complete within this.
    pub connect_timeout: Duration,
    /// QUIC transport (idle timeout, keep-alive, windows).
    pub tuning: TransportTuning,
    /// Limits for decoding replies.
    pub limits: Limits,
    /// Where reply tensors are placed.
    pub device: Device,
    /// The client endpoint (UDP socket) to open connections on, shared by all of a client's
    /// connections (`handshake::client_endpoint`); None: each connection opens its own.
    pub endpoint: Option<Endpoint>,
    /// Most tensor bytes a strip with replicas keeps to rebuild a session on another replica
    /// (`replicas`); past it, failover waits for the next step without live handles.
    pub max_replay_bytes: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            wire: WireDtype::F32,
            compression: Compression::None,
            codec: ShardCodec::None,
            exact_steps: 0,
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            tuning: TransportTuning::default(),
            limits: Limits::default(),
            device: Device::Cpu,
            endpoint: None,
            max_replay_bytes: 256 << 20,
        }
    }
}

/// The compression the CLI's `--zstd LEVEL` means: off for level 0, else byte-split zstd for
/// every wire dtype. Splitting the byte planes first is what makes activations compress at all
/// (the sign/exponent planes are redundant, the low mantissa planes noise): docs/PROTOCOL.md §7
/// measures f16 1.09× with plain zstd against 1.18–1.36× byte-split, and f32 1.17–1.26×
/// byte-split.
pub fn compression_for(_wire: WireDtype, zstd_level: i32) -> Compression {
    if zstd_level == 0 {
        Compression::None
    } else {
        Compression::ZstdByteSplit(zstd_level)
    }
}

/// Bytes a `QuicBackend` moved (QUIC stream payloads, i.e. encoded messages after compression).
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub requests: AtomicU64,
    /// Wall time spent in requests to this server (send, its compute, the reply), in
    /// nanoseconds: what the phone waited on it, overlapping other servers.
    pub busy_nanos: AtomicU64,
}

/// The client's end of the shard codec: references, and the step and slot counters that
/// number coded tensors (a slot is "the n-th coded tensor of this step" in one direction).
#[derive(Debug)]
struct ClientCodec {
    end: CodecEnd,
    step: u64,
    up_slot: u32,
    down_slot: u32,
}

/// Most reference slots the client keeps per direction (a step of SD1.5 under `strict` codes a
/// few thousand tensors per server).
const CLIENT_MAX_SLOTS: usize = 1 << 20;

/// Told the encoded bytes of each message a backend sends (`QuicBackend::observe_sent`).
pub type SentObserver = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// One shard server over QUIC.
pub struct QuicBackend {
    who: Who,
    conn: Connection,
    // Kept so the endpoint (its socket and driver) lives as long as the connection.
    endpoint: Endpoint,
    /// The endpoint is the client's shared one (`ClientOptions::endpoint`).
    shared_endpoint: bool,
    options: ClientOptions,
    traffic: Traffic,
    sent_observer: std::sync::Mutex<Option<SentObserver>>,
    server_model: ModelId,
    codec: std::sync::Mutex<ClientCodec>,
}

impl std::fmt::Debug for QuicBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicBackend")
            .field("server", &self.who.server)
            .field("address", &self.who.address)
            .finish()
    }
}

impl QuicBackend {
    /// Connects to `spec` (the strip `index`), verifies the pinned certificate, and runs the
    /// handshake (token, model identity). Nothing else is sent before all of that succeeded.
    pub async fn connect(
        index: usize,
        spec: &ServerSpec,
        model_id: ModelId,
        options: &ClientOptions,
    ) -> Result<Self, TransportError> {
        let who = Who {
            server: index,
            address: spec.address.clone(),
        };
        let deadline = options.connect_timeout;
        let (endpoint, conn, shared_endpoint) = tokio::time::timeout(
            deadline,
            open_connection(
                &who,
                spec.fingerprint,
                &options.tuning,
                options.endpoint.as_ref(),
            ),
        )
        .await
        .map_err(|_| who.unreachable(format!("no QUIC handshake within {deadline:?}")))??;
        let welcome = tokio::time::timeout(
            deadline,
            hello(&who, &conn, &spec.token, model_id, &options.limits),
        )
        .await;
        let server_model = match welcome {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                conn.close(VarInt::from_u32(close_code::REFUSED), b"handshake failed");
                return Err(match e {
                    TransportError::ModelMismatch {
                        server,
                        address,
                        actual,
                        ..
                    } => TransportError::ModelMismatch {
                        server,
                        address,
                        expected: hex::encode(model_id),
                        actual,
                    },
                    other => other,
                });
            }
            Err(_) => {
                conn.close(VarInt::from_u32(close_code::TIMEOUT), b"handshake timeout");
                return Err(who.timeout(deadline));
            }
        };
        if server_model != model_id {
            conn.close(VarInt::from_u32(close_code::REFUSED), b"model mismatch");
            return Err(TransportError::ModelMismatch {
                server: index,
                address: spec.address.clone(),
                expected: hex::encode(model_id),
                actual: hex::encode(server_model),
            });
        }
        Ok(Self {
            who,
            conn,
            endpoint,
            shared_endpoint,
            options: options.clone(),
            traffic: Traffic::default(),
            server_model,
            sent_observer: std::sync::Mutex::new(None),
            codec: std::sync::Mutex::new(ClientCodec {
                // What the server's replies make the phone keep is bounded like a message.
                end: CodecEnd::new(options.limits.max_message_bytes, CLIENT_MAX_SLOTS),
                step: 0,
                up_slot: 0,
                down_slot: 0,
            }),
        })
    }

    /// Has `observer` told the encoded bytes of every message this backend sends from now on
    /// (None: stop). The view audit says what a server was sent from the runtime's side; this
    /// says it from the wire's (`veil_devtools::tap` keeps a copy for tests).
    pub fn observe_sent(&self, observer: Option<SentObserver>) {
        if let Ok(mut o) = self.sent_observer.lock() {
            *o = observer;
        }
    }

    /// The strip index of this server.
    pub fn index(&self) -> usize {
        self.who.server
    }
    pub fn address(&self) -> &str {
        &self.who.address
    }
    /// The model identity the server confirmed.
    pub fn server_model(&self) -> ModelId {
        self.server_model
    }
    /// Encoded bytes moved over this connection.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }
    /// The QUIC connection (for statistics).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Ends the session (the server forgets its handles) and waits briefly for the close to be
    /// sent (a shared endpoint goes on sending it by itself: waiting for it to be idle would
    /// wait for every other connection).
    pub async fn close(&self) {
        self.conn
            .close(VarInt::from_u32(close_code::DONE), b"session done");
        if !self.shared_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
    }

    /// The session is still open (no close from either side, no idle timeout).
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Sends one encoded message on a new stream and returns the decoded answer and its tensor
    /// payload bytes.
    pub async fn exchange(&self, bytes: &[u8]) -> Result<(Message, u64), TransportError> {
        let timeout = self.options.request_timeout;
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, self.exchange_inner(bytes)).await;
        self.traffic.busy_nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        match result {
            Ok(r) => r,
            Err(_) => {
                // The session's state is unknown now (the server may still run the request):
                // end it so later calls fail fast instead of using stale handles.
                self.conn
                    .close(VarInt::from_u32(close_code::TIMEOUT), b"request timeout");
                Err(self.who.timeout(timeout))
            }
        }
    }

    async fn exchange_inner(&self, bytes: &[u8]) -> Result<(Message, u64), TransportError> {
        let (send, mut recv) = self.conn.open_bi().await.map_err(|e| self.who.lost(&e))?;
        // If this future is dropped mid-write (another server failed, or the timeout fired),
        // the guard resets the stream instead of letting quinn finish a truncated message.
        let mut send = ResetOnDrop(Some(send));
        if let Some(s) = send.0.as_mut() {
            s.write_all(bytes).await.map_err(|e| self.write_error(e))?;
        }
        if let Some(mut s) = send.0.take() {
            // A stream fails to finish only when the connection is gone; the read below
            // reports the real cause then.
            let _ = s.finish();
        }
        self.traffic
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let buf = recv
            .read_to_end(self.options.limits.max_message_bytes)
            .await
            .map_err(|e| self.read_error(e))?;
        self.traffic
            .bytes_received
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        decode_counted(&buf, &self.options.limits)
            .map_err(|e| self.who.protocol(format!("undecodable reply: {e}")))
    }

    fn write_error(&self, e: WriteError) -> TransportError {
        match e {
            WriteError::ConnectionLost(c) => self.who.lost(&c),
            other => self.who.protocol(format!("request stream: {other}")),
        }
    }

    fn read_error(&self, e: ReadToEndError) -> TransportError {
        match e {
            ReadToEndError::TooLong => self.who.protocol(format!(
                "reply larger than {} bytes",
                self.options.limits.max_message_bytes
            )),
            ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => self.who.lost(&c),
            ReadToEndError::Read(quinn::ReadError::Reset(code)) => {
                // The server abandoned the request (it is going down, or its task died): the
                // session's state is unknown, so end it like a timeout does.
                self.conn
                    .close(VarInt::from_u32(close_code::TIMEOUT), b"reply abandoned");
                TransportError::ConnectionLost {
                    server: self.who.server,
                    address: self.who.address.clone(),
                    message: format!("the server abandoned the reply (stream reset, code {code})"),
                }
            }
            ReadToEndError::Read(other) => self.who.protocol(format!("reply stream: {other}")),
        }
    }

    async fn execute_wire(&self, request: &ShardRequest<Tensor>) -> Result<ShardReply<Tensor>> {
        let wanted = request.calls.iter().filter(|c| c.reply).count();
        let mut calls = request_to_wire(request, self.options.wire)?;
        let reply_coding = self.code_inputs(&mut calls, wanted)?;
        let msg = Message::Request {
            calls,
            reply_dtype: self.options.wire,
            compression: self.options.compression,
            reply_coding,
        };
        let (outputs, payload) = self.send_for_outputs(&msg, wanted).await?;
        // A reply may only keep or apply the reference of the slot the request gave it: a server
        // cannot make the phone hold references it did not ask for.
        for (j, t) in outputs.iter().enumerate() {
            let given = u32::try_from(j)
                .ok()
                .and_then(|j| reply_coding.first_slot.checked_add(j));
            if let RefMode::Keep(slot) | RefMode::Residual(slot) = t.coding.reference {
                if Some(slot) != given {
                    return Err(self
                        .who
                        .protocol(format!("reply {j} uses reference slot {slot}"))
                        .into());
                }
            }
        }
        let outputs = {
            let mut codec = self.lock_codec()?;
            outputs
                .into_iter()
                .map(|t| codec.end.decode(t))
                .collect::<Result<Vec<_>, WireError>>()
                .map_err(|e| self.who.protocol(format!("reply tensor: {e}")))?
        };
        Ok(ShardReply {
            outputs: self.to_tensors(&outputs)?,
            payload: Some(payload),
        })
    }

    fn lock_codec(&self) -> Result<std::sync::MutexGuard<'_, ClientCodec>> {
        self.codec
            .lock()
            .map_err(|_| Error::Internal("the codec state was poisoned".into()))
    }

    /// Codes the inline tensors of `calls` in place under this session's codec and returns how
    /// the server is to code the `wanted` replies.
    fn code_inputs(
        &self,
        calls: &mut [crate::wire::WireCall],
        wanted: usize,
    ) -> Result<ReplyCoding> {
        let codec = self.options.codec;
        let mut c = self.lock_codec()?;
        let exact = c.step < self.options.exact_steps;
        if codec != ShardCodec::None {
            for t in coded_inputs(calls) {
                let slot = c.up_slot;
                c.up_slot = c.up_slot.saturating_add(1);
                let raw = std::mem::replace(t, WireTensor::raw(WireDtype::F32, vec![], vec![]));
                *t = c.end.encode(raw, SendAs { codec, exact, slot })?;
            }
        }
        let first_slot = c.down_slot;
        c.down_slot = c
            .down_slot
            .saturating_add(u32::try_from(wanted).unwrap_or(u32::MAX));
        Ok(ReplyCoding {
            codec,
            exact,
            first_slot,
        })
    }

    fn to_tensors(&self, outputs: &[WireTensor]) -> Result<Vec<Tensor>> {
        Ok(outputs
            .iter()
            .map(|t| t.to_tensor(&self.options.device))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| self.who.protocol(format!("reply tensor: {e}")))?)
    }

    /// Sends one message and waits for a `Reply` of exactly `wanted` tensors (still coded).
    async fn send_for_outputs(
        &self,
        msg: &Message,
        wanted: usize,
    ) -> Result<(Vec<WireTensor>, PayloadBytes)> {
        let (bytes, up) = encode_counted(msg, self.options.compression)?;
        let observer = self.sent_observer.lock().ok().and_then(|o| o.clone());
        if let Some(observe) = observer {
            observe(&bytes);
        }
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        let (outputs, down) = match self.exchange(&bytes).await? {
            (Message::Reply { outputs }, down) => (outputs, down),
            (Message::Error { code, message }, _) => {
                return Err(self.who.server_error(code, message).into())
            }
            (other, _) => {
                return Err(self
                    .who
                    .protocol(format!("expected a reply, got {}", kind_name(&other)))
                    .into())
            }
        };
        if outputs.len() != wanted {
            return Err(self
                .who
                .protocol(format!(
                    "reply carries {} tensors, the request asked for {wanted}",
                    outputs.len()
                ))
                .into());
        }
        Ok((outputs, PayloadBytes { up, down }))
    }
}

#[async_trait]
impl ShardBackend<Tensor> for QuicBackend {
    async fn execute(&self, request: ShardRequest<Tensor>) -> Result<ShardReply<Tensor>> {
        self.execute_wire(&request).await
    }

    fn begin_step(&self, step: u64) {
        if let Ok(mut c) = self.codec.lock() {
            if c.step != step {
                c.step = step;
                c.up_slot = 0;
                c.down_slot = 0;
            }
        }
    }

    async fn early_steps(&self, job: EarlySteps<Tensor>) -> Result<Tensor> {
        let msg = Message::EarlySteps {
            job: early_steps_to_wire(&job)?,
            reply_dtype: self.options.wire,
            compression: self.options.compression,
        };
        let (outputs, _) = self.send_for_outputs(&msg, 1).await?;
        self.to_tensors(&outputs)?
            .pop()
            .ok_or_else(|| Error::Internal("a checked one-tensor reply is empty".into()))
    }
}

/// Resets a send stream that was not finished.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.reset(VarInt::from_u32(0));
        }
    }
}

/// Connects to every server concurrently (strip order = `specs` order). On any failure every
/// connection already made is closed and the first failure in strip order is returned.
pub async fn connect_backends(
    specs: &[ServerSpec],
    model_id: ModelId,
    options: &ClientOptions,
) -> Result<Vec<Arc<QuicBackend>>, TransportError> {
    let started = Instant::now();
    let results = futures::future::join_all(
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| QuicBackend::connect(i, s, model_id, options)),
    )
    .await;
    let mut ok = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(b) => ok.push(Arc::new(b)),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        for b in &ok {
            b.conn
                .close(VarInt::from_u32(close_code::DONE), b"another server failed");
        }
        return Err(e);
    }
    tracing::debug!(
        servers = specs.len(),
        seconds = started.elapsed().as_secs_f64(),
        "connected to shard servers"
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_zstd_level_means_byte_split_zstd() {
        assert_eq!(compression_for(WireDtype::F32, 0), Compression::None);
        assert_eq!(
            compression_for(WireDtype::F32, 3),
            Compression::ZstdByteSplit(3)
        );
        assert_eq!(
            compression_for(WireDtype::F16, 3),
            Compression::ZstdByteSplit(3)
        );
    }
}
