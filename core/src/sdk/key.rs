//! The device's persistent `ObfuscationKey` in a file: created with a fresh CSPRNG key on first
//! use, read at every later start.
//!
//! The `obfuscated` policy chooses which K candidates a request sends with this key
//! (`crate::obfuscation`, `partition.rs`): the same key gives the same set at every repeat of
//! the same real values, so a server that links a user's requests cannot intersect them. The
//! guarantee holds for as long as the key does: a new key (a deleted file, a per-process key)
//! starts a new partition, and a server that saw requests under both can intersect the two.
//!
//! **The file.** Two lines of text, `veil-obfuscation-key-v1` and the 32 key bytes as 64 hex
//! digits. It is created atomically (written under a temporary name beside it, then linked to
//! its name only if nothing is there yet, so two processes starting at once read the same key)
//! with mode 0600 on unix. Anything else at the path (another format, a short or truncated key,
//! a folder) is a `KeyFileError`, never replaced: the file is the user's secret, and silently
//! replacing it would silently weaken every later request.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::obfuscation::ObfuscationKey;

/// The first line of a key file.
const HEADER: &str = "veil-obfuscation-key-v1";
/// More than a key file ever holds: a larger file is refused without being read whole.
const MAX_FILE_BYTES: u64 = 1024;

/// Why a key file could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or creating the file failed (a missing folder, no permission, a full disk).
    #[error("obfuscation key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something is at the path but it is not a key file of this format.
    #[error("{} is not a Veil obfuscation key file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
}

impl KeyFileError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn malformed(path: &Path, reason: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The key file's text for `key`.
fn encode(key: &ObfuscationKey) -> String {
    format!("{HEADER}\n{}\n", hex::encode(key.to_bytes()))
}

/// Parses a key file's bytes.
fn decode(path: &Path, bytes: &[u8]) -> Result<ObfuscationKey, KeyFileError> {
    let text = std::str::from_utf8(bytes).map_err(|_| KeyFileError::malformed(path, "not text"))?;
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(HEADER) {
        return Err(KeyFileError::malformed(
            path,
            format!("its first line is not `{HEADER}`"),
        ));
    }
    let digits = lines.next().map(str::trim).unwrap_or_default();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(KeyFileError::malformed(path, "text after the key"));
    }
    if digits.len() != 64 {
        return Err(KeyFileError::malformed(
            path,
            format!("the key has {} hex digits, expected 64", digits.len()),
        ));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(digits, &mut key)
        .map_err(|e| KeyFileError::malformed(path, format!("the key is not hex: {e}")))?;
    Ok(ObfuscationKey::from_bytes(key))
}

/// Reads the key file at `path` (it must exist).
pub fn read_obfuscation_key(path: &Path) -> Result<ObfuscationKey, KeyFileError> {
    let file = std::fs::File::open(path).map_err(|e| KeyFileError::io(path, e))?;
    let meta = file.metadata().map_err(|e| KeyFileError::io(path, e))?;
    if !meta.is_file() {
        return Err(KeyFileError::malformed(path, "not a regular file"));
    }
    warn_if_shared(path, &meta);
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| KeyFileError::io(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(KeyFileError::malformed(
            path,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    decode(path, &bytes)
}

/// The key file at `path`: read if it exists, else created with a fresh key from the OS-seeded
/// CSPRNG (module docs). The folder must exist.
pub fn load_or_create_obfuscation_key(path: &Path) -> Result<ObfuscationKey, KeyFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return read_obfuscation_key(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KeyFileError::io(path, e)),
    }
    let key = ObfuscationKey::generate(&mut rand::rng());
    match create(path, &key) {
        Ok(()) => Ok(key),
        // Another process created it first: its key is the one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_obfuscation_key(path),
        Err(e) => Err(KeyFileError::io(path, e)),
    }
}

/// Creates `path` holding `key` (0600 on unix); `AlreadyExists` if something is there. The
/// whole file is written and synced under a temporary name first, then hard-linked to `path`,
/// so no reader ever sees a partial key; where the file system has no hard links, it is
/// created in place with `create_new`.
fn create(path: &Path, key: &ObfuscationKey) -> std::io::Result<()> {
    let text = encode(key);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let suffix: u64 = rand::random();
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{suffix:016x}"));
    let tmp = path.with_file_name(tmp_name);
    write_new(&tmp, &text)?;
    let linked = std::fs::hard_link(&tmp, path);
    // Best effort: a stale temporary file holds the key, but under the same 0600 mode.
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
        // No hard links here (FAT, some FUSE mounts): create it in place.
        Err(_) => write_new(path, &text)?,
    }
    sync_parent(path);
    Ok(())
}

/// Writes `text` to a new file at `path` (never an existing one), 0600 on unix, synced.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Syncs the folder of `path` so the new name survives a crash (best effort; unix only).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Warns when others than the owner may read the key (unix).
fn warn_if_shared(path: &Path, meta: &std::fs::Metadata) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the obfuscation key file is readable by others than its owner (want 0600)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, meta);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "veil-key-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn created_once_then_read_back() {
        let d = dir("create");
        let path = d.join("obfuscation.key");
        let first = load_or_create_obfuscation_key(&path).unwrap();
        assert!(path.is_file());
        let again = load_or_create_obfuscation_key(&path).unwrap();
        assert_eq!(first, again);
        assert_eq!(read_obfuscation_key(&path).unwrap(), first);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("veil-obfuscation-key-v1\n") && text.len() == 24 + 65);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another file gets another key.
        let other = load_or_create_obfuscation_key(&d.join("other.key")).unwrap();
        assert_ne!(other, first);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_first_uses_agree() {
        let d = dir("race");
        let path = d.join("k");
        let keys: Vec<ObfuscationKey> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create_obfuscation_key(&path)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        assert_eq!(read_obfuscation_key(&path).unwrap(), keys[0]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_files_are_typed_errors_and_never_replaced() {
        let d = dir("bad");
        let good = format!("{HEADER}\n{}\n", "ab".repeat(32));
        let cases: [(&str, Vec<u8>, &str); 7] = [
            ("empty", Vec::new(), "first line"),
            (
                "short",
                format!("{HEADER}\nabcd\n").into_bytes(),
                "4 hex digits",
            ),
            ("truncated", good.as_bytes()[..40].to_vec(), "hex digits"),
            ("raw", vec![0xff; 32], "not text"),
            (
                "nothex",
                format!("{HEADER}\n{}\n", "zz".repeat(32)).into_bytes(),
                "not hex",
            ),
            (
                "extra",
                format!("{good}more\n").into_bytes(),
                "after the key",
            ),
            ("huge", vec![b'a'; 4096], "larger than"),
        ];
        for (name, bytes, want) in cases {
            let path = d.join(name);
            std::fs::write(&path, &bytes).unwrap();
            match load_or_create_obfuscation_key(&path) {
                Err(e @ KeyFileError::Malformed { .. }) => {
                    assert!(e.to_string().contains(want), "{name}: {e}")
                }
                other => panic!("{name}: expected Malformed, got {other:?}"),
            }
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was rewritten");
        }
        // Windows line ends and surrounding blanks are fine.
        let path = d.join("crlf");
        std::fs::write(&path, good.replace('\n', "\r\n")).unwrap();
        assert_eq!(
            read_obfuscation_key(&path).unwrap(),
            ObfuscationKey::from_bytes([0xab; 32])
        );
        // A folder at the path, a missing folder above it, a missing file when only reading.
        assert!(matches!(
            load_or_create_obfuscation_key(&d),
            Err(KeyFileError::Malformed { .. })
        ));
        assert!(matches!(
            load_or_create_obfuscation_key(&d.join("no/such/dir/k")),
            Err(KeyFileError::Io { .. })
        ));
        assert!(matches!(
            read_obfuscation_key(&d.join("absent")),
            Err(KeyFileError::Io { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
