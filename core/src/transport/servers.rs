//! `servers.toml`: which shard servers to use, in strip order.
//!
//! ```toml
//! [[server]]
//! address = "shard-a.example.net:4433"
//! fingerprint = "sha256:<64 hex digits>"   # printed by `veil-server` at start
//! token = "tenant token"                    # or: token_file = "tokens/a.txt"
//! tenant = "a"                              # optional: entries sharing it are replicas
//! ```
//!
//! The same schema as JSON: `{"server": [{"address": "…", "fingerprint": "…", "token": "…"}]}`
//! (a list that starts with `{`).
//!
//! The order of the `[[server]]` tables is the order of the strips; entries with the same
//! `tenant` are replicas of one strip (at the place of the first), of which a session uses one
//! and fails over to another (`replicas`). A relative `token_file` is
//! resolved against the folder of `servers.toml`; its first non-empty line is the token.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::transport::tls::Fingerprint;
use crate::vocab::error::{Error, Result};

/// One shard server as the client sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// `host:port` (a name is resolved at connect time).
    pub address: String,
    /// The pinned certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// The tenant's bearer token.
    pub token: String,
    /// The tenant running it: servers with the same tenant are replicas of one strip.
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ServerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSpec")
            .field("address", &self.address)
            .field("fingerprint", &self.fingerprint)
            .field("token", &"<redacted>")
            .field("tenant", &self.tenant)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerList {
    #[serde(default)]
    server: Vec<ServerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerEntry {
    address: String,
    fingerprint: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    tenant: Option<String>,
}

/// Parses a server list: `servers.toml` text, or the same schema as JSON
/// (`{"server": [{"address": …, "fingerprint": …, "token": …, "tenant": …}]}`) when the text
/// starts with `{`. `base` resolves relative `token_file`s; `path` names the file in errors.
pub fn parse_server_list(text: &str, base: &Path, path: &Path) -> Result<Vec<ServerSpec>> {
    let err = |message: String| Error::Config {
        path: path.to_path_buf(),
        message,
    };
    let list: ServerList = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| err(format!("JSON server list: {e}")))?
    } else {
        toml::from_str(text).map_err(|e| err(e.to_string()))?
    };
    if list.server.is_empty() {
        return Err(err("no [[server]] tables".into()));
    }
    list.server
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let fingerprint: Fingerprint = e
                .fingerprint
                .parse()
                .map_err(|b| err(format!("server {i}: {b}")))?;
            if e.address.trim().is_empty() {
                return Err(err(format!("server {i}: empty address")));
            }
            let token = match (e.token, e.token_file) {
                (Some(t), None) => t,
                (None, Some(f)) => {
                    let f = if f.is_absolute() { f } else { base.join(f) };
                    read_token_file(&f)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| err(format!("server {i}: {} holds no token", f.display())))?
                }
                (Some(_), Some(_)) => {
                    return Err(err(format!(
                        "server {i}: give either token or token_file, not both"
                    )))
                }
                (None, None) => return Err(err(format!("server {i}: no token or token_file"))),
            };
            Ok(ServerSpec {
                address: e.address.trim().to_string(),
                fingerprint,
                token,
                tenant: e
                    .tenant
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()),
            })
        })
        .collect()
}

/// Reads `servers.toml`.
pub fn load_server_list(path: &Path) -> Result<Vec<ServerSpec>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_server_list(&text, &base, path)
}

/// The tokens of a token file: one per line, surrounding whitespace trimmed, empty lines and
/// lines starting with `#` skipped.
pub fn read_token_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn server_lists_keep_order_and_read_token_files() {
        let dir = std::env::temp_dir().join(format!("veil-servers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("b.token"), "# tenant b\n\n  secret-b  \n").expect("token");
        let text = format!(
            "[[server]]\naddress = \"10.0.0.1:4433\"\nfingerprint = \"{FP}\"\ntoken = \"a\"\n\
             [[server]]\naddress = \"shard-b:4433\"\nfingerprint = \"{FP}\"\ntoken_file = \"b.token\"\n\
             tenant = \" b \"\n"
        );
        let specs = parse_server_list(&text, &dir, Path::new("servers.toml")).expect("parse");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].address, "10.0.0.1:4433");
        assert_eq!(specs[0].token, "a");
        assert_eq!(specs[1].address, "shard-b:4433");
        assert_eq!(specs[1].token, "secret-b");
        assert_eq!(specs[1].fingerprint.to_string(), FP);
        assert_eq!(specs[0].tenant, None);
        assert_eq!(specs[1].tenant.as_deref(), Some("b"));
        assert!(!format!("{:?}", specs[1]).contains("secret"));
        // The same list as JSON.
        let json = format!(
            r#"{{"server": [{{"address": "10.0.0.1:4433", "fingerprint": "{FP}", "token": "a"}},
                {{"address": "shard-b:4433", "fingerprint": "{FP}", "token_file": "b.token",
                  "tenant": " b "}}]}}"#
        );
        let from_json = parse_server_list(&json, &dir, Path::new("servers.json")).expect("json");
        assert_eq!(from_json, specs);
        let _ = std::fs::remove_dir_all(&dir);

        for bad in [
            String::new(),
            format!("[[server]]\naddress = \"a:1\"\nfingerprint = \"{FP}\"\n"),
            "[[server]]\naddress = \"a:1\"\nfingerprint = \"sha256:00\"\ntoken = \"t\"\n".into(),
            format!(
                "[[server]]\naddress = \"a:1\"\nfingerprint = \"{FP}\"\ntoken = \"t\"\nport = 1\n"
            ),
        ] {
            let e = parse_server_list(&bad, &dir, Path::new("servers.toml"));
            assert!(matches!(e, Err(Error::Config { .. })), "{bad}");
        }
    }
}
