//! The file hashes A1111 writes into infotext and lists in its API, so PNGs made here re-import on
//! civitai and in A1111: `Model hash` (first 10 hex digits of the file's SHA-256), `Lora hashes` (first 12
//! hex digits of the SHA-256 of a safetensors file's bytes after its header, kohya's "addnet" hash) and the
//! full SHA-256. Hashes are cached by (path, size, modification time), so a multi-GB checkpoint is read
//! once per change.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Whole,
    AfterSafetensorsHeader,
}

type Key = (PathBuf, u64, Option<SystemTime>, Kind);

fn cache() -> &'static Mutex<HashMap<Key, String>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn hashed(path: &Path, kind: Kind) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok(), kind);
    if let Some(h) = cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(h);
    }
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io(path))?);
    if kind == Kind::AfterSafetensorsHeader {
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io(path))?;
        let header = u64::from_le_bytes(len);
        if header.saturating_add(8) > meta.len() {
            return Err(Error::InvalidSafetensors { path: path.to_path_buf(), reason: format!("header length {header} exceeds the file") });
        }
        std::io::copy(&mut (&mut file).take(header), &mut std::io::sink()).map_err(io(path))?;
    }
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    let hex: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Ok(mut c) = cache().lock() {
        c.insert(key, hex.clone());
    }
    Ok(hex)
}

/// The SHA-256 of the whole file, lower-case hex (A1111's `sha256`).
pub fn sha256(path: &Path) -> Result<String> {
    hashed(path, Kind::Whole)
}

/// The whole file's SHA-256 if it was computed before and the file has not changed since (no reading).
pub fn cached_sha256(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok(), Kind::Whole);
    cache().lock().ok()?.get(&key).cloned()
}

/// A1111's `Model hash`: the first 10 hex digits of the file's SHA-256.
pub fn model_hash(path: &Path) -> Result<String> {
    Ok(sha256(path)?[..10].to_string())
}

/// A1111's `Lora hashes` entry: the first 12 hex digits of the SHA-256 of a safetensors file's bytes
/// after its header (kohya's "addnet" hash, which metadata edits do not change).
pub fn lora_hash(path: &Path) -> Result<String> {
    Ok(hashed(path, Kind::AfterSafetensorsHeader)?[..12].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed with Python's hashlib on fixtures/lora/sd15_kohya.safetensors:
    // `hashlib.sha256(data[8 + header_len:]).hexdigest()[:12]` and `hashlib.sha256(data).hexdigest()`.
    const EXPECTED_LORA_ADDNET: &str = "5f59d4c77694";
    const EXPECTED_LORA_SHA256: &str = "ba747551045bee03f8ea4fd005996066c730f0f206b84c9387d17dfaadaa317f";

    #[test]
    fn hashes_match_python_hashlib() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let lora = root.join("lora/sd15_kohya.safetensors");
        assert_eq!(lora_hash(&lora)?, EXPECTED_LORA_ADDNET);
        assert_eq!(sha256(&lora)?, EXPECTED_LORA_SHA256);
        assert_eq!(model_hash(&lora)?, &EXPECTED_LORA_SHA256[..10]);
        // Cached: same answer without reading again; a truncated header is refused.
        assert_eq!(lora_hash(&lora)?, EXPECTED_LORA_ADDNET);
        let bad = std::env::temp_dir().join(format!("sd-models-hash-{}.safetensors", std::process::id()));
        std::fs::write(&bad, [255u8, 255, 255, 255, 0, 0, 0, 0, b'{']).map_err(io(&bad))?;
        assert!(lora_hash(&bad).is_err());
        let _ = std::fs::remove_file(bad);
        Ok(())
    }
}
