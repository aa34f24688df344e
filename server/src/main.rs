//! veil-server: the shard server each cloud tenant runs. The QUIC transport, tenant tokens,
//! pinned certificates and sessions arrive with the server issue; until then shard work runs
//! in-process (`veil generate --policy ppidm --servers N`), through the same `ShardExecutor`
//! this binary will wrap.

fn main() {
    eprintln!(
        "veil-server {}: the QUIC shard server is not built yet (see README.md).\n\
         Shard backends currently run in-process: veil generate --policy ppidm --servers N",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
