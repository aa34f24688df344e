//! The operator's HTTP endpoint (`--metrics-listen ADDR`): `GET /metrics` answers the
//! Prometheus text of the server's counters and gauges, `GET /healthz` answers `ok` while the
//! server accepts sessions. Plain HTTP/1.1, one request per connection, a 4 KiB request head
//! read within 2 s: it is meant for a private scrape network, not for the clients' port.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest request head read.
const MAX_HEAD: usize = 4096;
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `listener` until `stop` turns true; `render` gives the metrics text.
pub(crate) async fn serve(
    listener: TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, render.as_ref()).await {
                tracing::debug!("metrics endpoint: {e}");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(READ_DEADLINE, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, kind, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (Some("GET"), Some("/healthz")) => ("200 OK", "text/plain", "ok\n".to_string()),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
