//! Kernel compilation: every `kernels/*.cu` file is compiled by NVRTC for the card found (`sm_90a` on
//! Hopper, `sm_XY` otherwise) into a CUBIN, and cached on disk under a key made of the source text, the
//! architecture, the NVRTC version and the compile options (with any `IRONLLM_KERNEL_DEFINES`), so a
//! second start compiles nothing.
//!
//! The kernel files include no CUDA headers (the runtime needs libnvrtc, not the toolkit): `common.cuh`
//! is prepended as text. The names of a file's kernels are read from the PTX NVRTC emits alongside the
//! CUBIN (`.entry` lines), so a file can export any set of `extern "C"` kernels without a registry here.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::CudaError;

/// `common.cuh`, prepended to every kernel file.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// A compiled kernel file.
#[derive(Debug, Clone)]
pub struct CompiledModule {
    pub file: String,
    pub cubin: Vec<u8>,
    pub kernel_names: Vec<String>,
    /// Whether it came from the disk cache.
    pub cached: bool,
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let rc = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Unavailable(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// FNV-1a 64 over the parts; a stable, dependency-free cache key (not a security boundary).
fn cache_key(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The cache folder: `$IRONLLM_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/ironllm/kernels`, else
/// `~/.cache/ironllm/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IRONLLM_CACHE_DIR") {
        return Some(PathBuf::from(d).join("kernels"));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ironllm").join("kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("ironllm").join("kernels"))
}

/// Compiles (or loads from the cache) one kernel file for `arch` (e.g. `sm_90a`).
pub fn compile_file(
    file: &str,
    source: &str,
    arch: &str,
    cache_dir: Option<&Path>,
) -> Result<CompiledModule, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let full = format!("{COMMON}\n#line 1 \"{file}\"\n{source}");
    let version = format!("{major}.{minor}");
    let defines = extra_defines();
    let key = cache_key(&[
        full.as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
        OPTIONS.join(" ").as_bytes(),
        defines.join(" ").as_bytes(),
    ]);
    let stem = format!("{}-{arch}-{key}", file.trim_end_matches(".cu"));
    if let Some(dir) = cache_dir {
        let (bin, names) = (dir.join(format!("{stem}.cubin")), dir.join(format!("{stem}.names")));
        if let (Ok(cubin), Ok(names)) = (std::fs::read(&bin), std::fs::read_to_string(&names)) {
            let kernel_names: Vec<String> = names.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
            // The names file is written before the cubin is renamed into place, so a cubin means whole
            // names; an empty list is a file that exports nothing on this architecture (the sm_90a-only
            // kernels elsewhere).
            if !cubin.is_empty() {
                return Ok(CompiledModule { file: file.to_string(), cubin, kernel_names, cached: true });
            }
        }
    }
    let (cubin, ptx) = nvrtc_compile(file, &full, arch, &defines)?;
    let kernel_names = entry_names(&ptx);
    if let Some(dir) = cache_dir {
        // A cache that cannot be written only costs the next start a compile.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!("{stem}.tmp{}", std::process::id()));
            std::fs::write(&tmp, &cubin)?;
            std::fs::write(dir.join(format!("{stem}.names")), kernel_names.join("\n"))?;
            std::fs::rename(&tmp, dir.join(format!("{stem}.cubin")))
        };
        if let Err(e) = write() {
            tracing::warn!("could not write the kernel cache in {}: {e}", dir.display());
        }
    }
    Ok(CompiledModule { file: file.to_string(), cubin, kernel_names, cached: false })
}

const OPTIONS: &[&str] = &["-std=c++17", "--fmad=true"];

/// Knobs that change a kernel's shared memory, which the host sizes from the defaults (`ops.rs`): setting
/// one for the runtime would launch the kernel with too little. (`FD_STAGES_HD128` is taken, 2-4 only:
/// `ops::flash_decode_smem` reads it back through [`stage_knob`].)
const LAUNCH_KNOBS: &[&str] = &["WG_STAGES", "WG2_STAGES", "GS_STAGES"];

/// The decode attention's stage count for head size 128 from `IRONLLM_KERNEL_DEFINES` (`FD_STAGES_HD128`,
/// a measurement knob; the host sizes the kernel's shared memory from it), if set to 2-4. Read once: every
/// decode attention launch asks.
pub fn stage_knob() -> Option<usize> {
    static KNOB: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *KNOB.get_or_init(|| stage_knob_of(&std::env::var("IRONLLM_KERNEL_DEFINES").unwrap_or_default()))
}

fn stage_knob_of(text: &str) -> Option<usize> {
    text.split_whitespace()
        .rev()
        .find_map(|d| d.strip_prefix("FD_STAGES_HD128="))
        .and_then(|v| v.parse().ok())
        .filter(|n| (2..=4).contains(n))
}

/// `-D` options from `IRONLLM_KERNEL_DEFINES` (whitespace-separated `NAME=VALUE`): a developer's A/B of a
/// kernel file's compile-time knobs without a rebuild, e.g. `WG_Q_REGS=0` (flash_prefill_sm90.cu). Read
/// and logged once; the knobs in `LAUNCH_KNOBS` are refused with a warning.
fn extra_defines() -> Vec<String> {
    static DEFINES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    DEFINES
        .get_or_init(|| {
            let text = std::env::var("IRONLLM_KERNEL_DEFINES").unwrap_or_default();
            let (options, refused) = define_options(&text);
            for name in refused {
                tracing::warn!("IRONLLM_KERNEL_DEFINES: ignoring {name}: it changes shared memory the host sizes");
            }
            if !options.is_empty() {
                tracing::info!("kernels compiled with IRONLLM_KERNEL_DEFINES: {}", options.join(" "));
            }
            options
        })
        .clone()
}

/// The `-D` options of `text`, and the names refused (`LAUNCH_KNOBS`).
fn define_options(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut options, mut refused) = (Vec::new(), Vec::new());
    for d in text.split_whitespace() {
        let name = d.split('=').next().unwrap_or(d);
        if LAUNCH_KNOBS.contains(&name) || (name == "FD_STAGES_HD128" && stage_knob_of(d).is_none()) {
            refused.push(name.to_string());
        } else {
            options.push(format!("-D{d}"));
        }
    }
    (options, refused)
}

fn nvrtc_compile(file: &str, source: &str, arch: &str, defines: &[String]) -> Result<(Vec<u8>, String), CudaError> {
    let fail = |log: String| CudaError::Compile { file: file.to_string(), arch: arch.to_string(), log };
    let src = CString::new(source).map_err(|_| fail("source holds a NUL byte".into()))?;
    let name = CString::new(file).map_err(|_| fail("file name holds a NUL byte".into()))?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    options.extend(defines.iter().cloned());
    // SAFETY: `prog` is a live program; the options outlive the call.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let result = (|| {
        if let Err(e) = compiled {
            // SAFETY: `prog` is live; the log is NUL-terminated by NVRTC.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(fail(format!("{e:?}\n{log}")));
        }
        // SAFETY: `prog` compiled; sizes come from NVRTC before each copy.
        let ptx = unsafe { nvrtc::get_ptx(prog) }.map_err(|e| fail(format!("nvrtcGetPTX: {e:?}")))?;
        let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }.to_string_lossy().into_owned();
        let mut size = 0usize;
        let rc = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) };
        if rc != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Err(fail(format!("nvrtcGetCUBINSize: {rc:?} (size {size})")));
        }
        let mut cubin = vec![0u8; size];
        let rc = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) };
        if rc != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail(format!("nvrtcGetCUBIN: {rc:?}")));
        }
        Ok((cubin, ptx))
    })();
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// Kernel names from PTX `.entry NAME(` lines.
fn entry_names(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry "))?;
            let end = rest.find(|c: char| c == '(' || c.is_whitespace()).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_read_from_ptx() {
        let ptx = ".version 8.0\n.visible .entry rms_norm_f32(\n .param .u64 a\n)\n.visible .entry k_bf16(\n";
        assert_eq!(entry_names(ptx), vec!["rms_norm_f32", "k_bf16"]);
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = cache_key(&[b"src", b"sm_90a", b"13.0"]);
        assert_ne!(a, cache_key(&[b"src", b"sm_89", b"13.0"]));
        assert_ne!(a, cache_key(&[b"src", b"sm_90a", b"13.1"]));
        assert_ne!(a, cache_key(&[b"srd", b"sm_90a", b"13.0"]));
        assert_eq!(a, cache_key(&[b"src", b"sm_90a", b"13.0"]));
    }

    #[test]
    fn kernel_defines_become_nvrtc_options() {
        let (options, refused) = define_options(" WG_Q_REGS=0\tFD_STAGES_HD128=3 X=1 WG2_STAGES=4 ");
        assert_eq!(options, vec!["-DWG_Q_REGS=0", "-DFD_STAGES_HD128=3", "-DX=1"]);
        assert_eq!(refused, vec!["WG2_STAGES"]);
        assert_eq!(define_options("  "), (vec![], vec![]));
        // The decode stage count only where the host can size its shared memory.
        assert_eq!(define_options("FD_STAGES_HD128=1 FD_STAGES_HD128=x").1, vec!["FD_STAGES_HD128"; 2]);
        assert_eq!(stage_knob_of("X=1 FD_STAGES_HD128=4"), Some(4));
        assert_eq!(stage_knob_of("FD_STAGES_HD128=5"), None);
        assert_eq!(stage_knob_of(""), None);
    }

    /// Compiles every kernel file when libnvrtc is present (no GPU needed); skipped otherwise.
    #[test]
    fn every_kernel_file_compiles_with_nvrtc_when_available() {
        // SAFETY: only probes whether the library can be loaded.
        if !unsafe { nvrtc_sys::is_culib_present() } {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        for (file, src) in SOURCES {
            let m = compile_file(file, src, "sm_90a", None).unwrap_or_else(|e| panic!("{e}"));
            assert!(!m.kernel_names.is_empty(), "{file} exports no kernels");
        }
    }
}
