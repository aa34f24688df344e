//! Answers on request streams: the reply-stream guard that resets an unfinished reply, error
//! messages bounded for the wire, and the refusals that close a connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{ClosedStream, Connection, SendStream, VarInt, WriteError};
use veil_core::wire::codec::encode;
use veil_core::wire::{Compression, ErrorCode, Message};

/// Longest error message sent (the codec's string limit is 64 KiB).
pub(crate) const MAX_ERROR_MESSAGE: usize = 1024;
/// How long the server waits for an error answer to be acknowledged before closing.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// The code a reply stream is reset with when its answer was abandoned.
pub(crate) const ABANDONED: u32 = 1;

/// A request stream's sending half that is *reset*, not finished, if it is dropped before its
/// answer is complete. quinn finishes a dropped `SendStream`, so a task cancelled mid-reply
/// (a runtime shutting down, a crashed compute) would otherwise hand the client a truncated
/// message, which reads as a protocol error instead of a server that went away.
pub(crate) struct ReplyStream {
    send: SendStream,
    finished: bool,
}

impl ReplyStream {
    pub(crate) fn new(send: SendStream) -> Self {
        Self {
            send,
            finished: false,
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.send.write_all(bytes).await
    }

    /// Finishes the stream: the answer is complete and the guard stands down.
    pub(crate) fn finish(&mut self) -> Result<(), ClosedStream> {
        self.finished = true;
        self.send.finish()
    }

    /// Waits until the peer has the whole answer (or stopped the stream).
    pub(crate) async fn stopped(&mut self) {
        let _ = self.send.stopped().await;
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if !self.finished {
            // Fails only when the stream is already closed, which is what we want anyway.
            let _ = self.send.reset(VarInt::from_u32(ABANDONED));
        }
    }
}

/// Sends `msg` on `send` and finishes; the number of bytes sent, or None if the stream failed.
pub(crate) async fn answer(
    send: &mut ReplyStream,
    msg: &Message,
    compression: Compression,
) -> Option<usize> {
    let bytes = match encode(msg, compression) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("cannot encode an answer: {e}");
            encode(
                &error_msg(ErrorCode::Internal, format!("cannot encode the reply: {e}")),
                Compression::None,
            )
            .ok()?
        }
    };
    send.write_all(&bytes).await.ok()?;
    send.finish().ok()?;
    Some(bytes.len())
}

/// An error answer: the first line of `message` (candle errors may carry a backtrace, which
/// is the server's business, not the client's), at most `MAX_ERROR_MESSAGE` bytes.
pub(crate) fn error_msg(code: ErrorCode, message: impl std::fmt::Display) -> Message {
    let full = message.to_string();
    let mut message = full
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string();
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Message::Error { code, message }
}

/// Answers with an error, lets it reach the client, then closes the connection.
pub(crate) async fn refuse(
    conn: &Connection,
    mut send: ReplyStream,
    msg: Message,
    code: u32,
    why: &[u8],
) {
    if answer(&mut send, &msg, Compression::None).await.is_some() {
        let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
    }
    conn.close(VarInt::from_u32(code), why);
}

/// How fast a peer must take an answer: within `grace` plus one second per `min_rate` bytes
/// (the pace requests must arrive at, `ServerLimits::request_grace` / `min_request_rate`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub grace: Duration,
    pub min_rate: u64,
}

impl Pace {
    fn deadline(&self, bytes: usize) -> Duration {
        self.grace + Duration::from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64)
    }
}

/// Whether an answer went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    Done,
    /// The stream or the connection failed (the peer went away).
    Failed,
    /// The peer did not take the answer at the pace (`Pace`): the stream was reset.
    TooSlow,
}

/// Encodes (off the async workers: zstd on large replies is CPU work) and sends an answer;
/// only replies are compressed. Counts the bytes sent in `bytes_out`. A peer that does not read
/// its reply (flow control holds the write) cannot keep the reply's buffers past the pace's
/// deadline: the stream is reset and `TooSlow` returned.
pub(crate) async fn send_answer(
    mut send: ReplyStream,
    msg: Message,
    compression: Compression,
    bytes_out: &AtomicU64,
    pace: Pace,
) -> Sent {
    let compression = if matches!(msg, Message::Reply { .. }) {
        compression
    } else {
        Compression::None
    };
    let encoded = tokio::task::spawn_blocking(move || encode(&msg, compression)).await;
    let bytes = match encoded {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => match encode(&error_msg(ErrorCode::Internal, e), Compression::None) {
            Ok(b) => b,
            Err(_) => return Sent::Failed,
        },
        Err(_) => return Sent::Failed,
    };
    match tokio::time::timeout(pace.deadline(bytes.len()), send.write_all(&bytes)).await {
        Err(_) => Sent::TooSlow,
        Ok(Ok(())) if send.finish().is_ok() => {
            bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Sent::Done
        }
        Ok(_) => Sent::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_bounded() {
        let long = "é".repeat(4000);
        match error_msg(ErrorCode::BadRequest, long) {
            Message::Error { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE),
            _ => panic!("not an error"),
        }
        match error_msg(
            ErrorCode::BadRequest,
            "shape mismatch\n   0: backtrace frame",
        ) {
            Message::Error { message, .. } => assert_eq!(message, "shape mismatch"),
            _ => panic!("not an error"),
        }
    }

    /// A quinn pair on loopback: the client's connection and the server's.
    async fn pair() -> (quinn::Endpoint, Connection, Connection) {
        use veil_core::transport::tls::{client_config, server_config, TransportTuning};
        let id = crate::tls::TlsIdentity::generate().expect("certificate");
        let tuning = TransportTuning {
            max_incoming_streams: 4,
            ..TransportTuning::default()
        };
        let sc = server_config(id.cert.clone(), id.key.clone_key(), &tuning).expect("server tls");
        let server = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().expect("addr"))
            .expect("server endpoint");
        let addr = server.local_addr().expect("bound");
        let (cc, _) = client_config(id.fingerprint(), &tuning).expect("client tls");
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        client.set_default_client_config(cc);
        let connecting = client.connect(addr, "veil-shard").expect("connect");
        let (c, s) = tokio::join!(connecting, async {
            server.accept().await.expect("incoming").await
        });
        (server, c.expect("client side"), s.expect("server side"))
    }

    /// A reply dropped half-written reaches the client as a reset, never as a short message;
    /// a finished one arrives whole.
    #[tokio::test]
    async fn an_unfinished_reply_is_reset_not_truncated() {
        let (_server, client, server) = tokio::time::timeout(Duration::from_secs(10), pair())
            .await
            .expect("pair in time");
        for finish in [false, true] {
            let (mut cs, mut cr) = client.open_bi().await.expect("open");
            cs.write_all(b"request").await.expect("write");
            cs.finish().expect("finish");
            let (ss, _sr) = server.accept_bi().await.expect("accept");
            let mut reply = ReplyStream::new(ss);
            reply.write_all(&[7u8; 5000]).await.expect("partial reply");
            if finish {
                reply.finish().expect("finish");
            }
            drop(reply);
            match (finish, cr.read_to_end(1 << 20).await) {
                (false, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) => {
                    assert_eq!(code, VarInt::from_u32(ABANDONED));
                }
                (true, Ok(bytes)) => assert_eq!(bytes, vec![7u8; 5000]),
                (f, other) => panic!("finished {f}: {other:?}"),
            }
        }
    }
}
