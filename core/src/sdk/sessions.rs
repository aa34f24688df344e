//! The sessions a `Veil` keeps with its shard servers between generations: one client endpoint
//! (one UDP socket) for every connection, and the strips' sessions of the last generation,
//! kept open so that the next image does not pay a QUIC and Veil handshake per server. A
//! session that died in between (the server restarted, the link idled out) is reconnected, that
//! strip only. A generation takes the kept sessions for itself (a concurrent one connects its
//! own); after it, the server is told to release every handle still held and the sessions are
//! kept for the next one — unless it failed, when they are closed.

use std::sync::{Arc, Mutex};

use quinn::Endpoint;

use crate::transport::{
    client_endpoint, connect_strips, group_strips, ClientOptions, ReplicaSet, ServerSpec,
    TransportError,
};
use crate::wire::ModelId;

#[derive(Default)]
pub(super) struct Sessions {
    endpoint: Mutex<Option<Endpoint>>,
    idle: Mutex<Option<Vec<Arc<ReplicaSet>>>>,
}

impl Sessions {
    /// The client's endpoint, opened on first use (inside the runtime); None if no UDP socket
    /// could be opened (each connection then tries its own).
    pub(super) fn endpoint(&self) -> Option<Endpoint> {
        let mut e = self.endpoint.lock().ok()?;
        if e.is_none() {
            match client_endpoint(true) {
                Ok(ep) => *e = Some(ep),
                Err(err) => tracing::warn!("no shared client endpoint: {err}"),
            }
        }
        e.clone()
    }

    /// Sessions for one generation: the kept ones (a dead strip reconnected), or new ones.
    pub(super) async fn checkout(
        &self,
        specs: &[ServerSpec],
        model_id: ModelId,
        options: &ClientOptions,
    ) -> Result<Vec<Arc<ReplicaSet>>, TransportError> {
        let kept = self.idle.lock().ok().and_then(|mut i| i.take());
        let groups = group_strips(specs);
        let Some(mut strips) = kept.filter(|s| s.len() == groups.len()) else {
            return connect_strips(specs, model_id, options).await;
        };
        for (i, replicas) in groups.into_iter().enumerate() {
            if strips[i].is_open() {
                continue;
            }
            tracing::info!(strip = i, "the kept session ended; reconnecting");
            strips[i].close().await;
            let first = rand::random::<u32>() as usize % replicas.len().max(1);
            match ReplicaSet::connect(i, replicas, first, model_id, options).await {
                Ok(s) => strips[i] = Arc::new(s),
                Err(e) => {
                    futures::future::join_all(strips.iter().map(|s| s.close())).await;
                    return Err(e);
                }
            }
        }
        Ok(strips)
    }

    /// Gives the sessions back after a generation; `reusable`: it ended without a transport
    /// or server error (finished or cancelled between steps), so the sessions are consistent.
    pub(super) async fn checkin(&self, strips: Vec<Arc<ReplicaSet>>, reusable: bool) {
        if strips.is_empty() {
            return;
        }
        if reusable {
            let released =
                futures::future::join_all(strips.iter().map(|s| s.end_generation())).await;
            if released.iter().all(Result::is_ok) {
                if let Ok(mut idle) = self.idle.lock() {
                    if idle.is_none() {
                        *idle = Some(strips);
                        return;
                    }
                }
            }
        }
        futures::future::join_all(strips.iter().map(|s| s.close())).await;
    }

    /// Ends the kept sessions (the servers drop their handles at once).
    pub(super) async fn close(&self) {
        let kept = self.idle.lock().ok().and_then(|mut i| i.take());
        if let Some(strips) = kept {
            futures::future::join_all(strips.iter().map(|s| s.close())).await;
        }
    }
}
