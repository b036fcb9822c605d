//! The cuBLASLt algorithms that start-up tuning chose, kept on disk between starts (beside the compiled
//! kernels), so a restart on the same card and library skips the timing (seconds for an 8B model).
//!
//! cuBLASLt documents `cublasLtMatmulAlgo_t` as trivially serializable for reuse with the same library
//! version, so an entry is its eight words, plus what the timing measured for the log. The file name
//! carries a hash of everything that could change the choice or its validity (card, compute capability,
//! cuBLASLt version, candidates timed, workspace), so another context simply reads another file. The
//! caller still checks each loaded algorithm with `cublasLtMatmulAlgoCheck` before using it, and falls
//! back to timing. A file that cannot be read or written costs only the timing; lines that do not parse
//! are skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::tensor::GpuDType;

/// One timed shape: `y[m, n] = x[m, k] w[n, k]^T` in the given dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShapeKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub input: &'static str,
    pub output: &'static str,
}

impl ShapeKey {
    pub fn new(m: usize, n: usize, k: usize, input: GpuDType, output: GpuDType) -> ShapeKey {
        ShapeKey { m, n, k, input: input.name(), output: output.name() }
    }
}

/// What the timing kept for one shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachedAlgo {
    /// The `cublasLtMatmulAlgo_t` words.
    pub algo: [u64; 8],
    pub candidates: usize,
    pub first_ms: f64,
    pub best_ms: f64,
}

/// The tuning file of one context, read at open and written back by [`TuneCache::save`].
#[derive(Debug, Default)]
pub struct TuneCache {
    path: Option<PathBuf>,
    context: String,
    entries: BTreeMap<ShapeKey, CachedAlgo>,
    dirty: bool,
}

const HEADER: &str = "# ironllm cuBLASLt tuning v1:";

fn dtype_name(s: &str) -> Option<&'static str> {
    [GpuDType::F32, GpuDType::BF16, GpuDType::F16].into_iter().map(GpuDType::name).find(|n| *n == s)
}

impl TuneCache {
    /// The cache of `context` in `dir` (`None`: in memory only, nothing read or written).
    pub fn open(dir: Option<&Path>, context: &str) -> TuneCache {
        let path = dir.map(|d| d.join(format!("gemm-tuning-{}.txt", fnv64(context.as_bytes()))));
        let mut cache = TuneCache { path, context: context.to_string(), ..TuneCache::default() };
        if let Some(text) = cache.path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            // A hash collision or a hand-edited file: the header must name this very context.
            let mut lines = text.lines();
            if lines.next() == Some(&format!("{HEADER} {context}")) {
                cache.entries = lines.filter_map(parse_line).collect();
            }
        }
        cache
    }

    pub fn get(&self, shape: &ShapeKey) -> Option<&CachedAlgo> {
        self.entries.get(shape)
    }

    pub fn insert(&mut self, shape: ShapeKey, algo: CachedAlgo) {
        if self.entries.insert(shape, algo) != Some(algo) {
            self.dirty = true;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the file if anything was added since it was read (through a temporary file and a rename,
    /// so a concurrent reader sees the old file or the new one).
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.as_ref().filter(|_| self.dirty) else {
            return Ok(());
        };
        let mut text = format!("{HEADER} {}\n", self.context);
        for (s, a) in &self.entries {
            let words: Vec<String> = a.algo.iter().map(|w| format!("{w:016x}")).collect();
            text.push_str(&format!(
                // Floats in Rust's shortest form, which reads back to the same value.
                "{} {} {} {} {} {} {} {} {}\n",
                s.m,
                s.n,
                s.k,
                s.input,
                s.output,
                a.candidates,
                a.first_ms,
                a.best_ms,
                words.join(" ")
            ));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
        self.dirty = false;
        Ok(())
    }
}

/// `m n k input output candidates first_ms best_ms w0 .. w7`.
fn parse_line(line: &str) -> Option<(ShapeKey, CachedAlgo)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 16 {
        return None;
    }
    let num = |i: usize| f[i].parse::<usize>().ok();
    let shape = ShapeKey { m: num(0)?, n: num(1)?, k: num(2)?, input: dtype_name(f[3])?, output: dtype_name(f[4])? };
    let mut algo = [0u64; 8];
    for (w, s) in algo.iter_mut().zip(&f[8..]) {
        *w = u64::from_str_radix(s, 16).ok()?;
    }
    let (first_ms, best_ms) = (f[6].parse::<f64>().ok()?, f[7].parse::<f64>().ok()?);
    Some((shape, CachedAlgo { algo, candidates: num(5)?, first_ms, best_ms }))
}

/// FNV-1a 64: a stable file name for a context (not a security boundary).
fn fnv64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn algo(seed: u64) -> CachedAlgo {
        CachedAlgo {
            algo: std::array::from_fn(|i| seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(i as u32 * 7)),
            candidates: 8,
            first_ms: 0.1 + seed as f64 / 3.0,
            best_ms: 0.07 / (seed as f64 + 1.0),
        }
    }

    #[test]
    fn entries_survive_a_save_and_reopen_of_the_same_context_only() {
        let dir = std::env::temp_dir().join(format!("ironllm-gemm-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ctx = "NVIDIA H100 80GB HBM3|sm_90|cublasLt 120904|candidates 8";
        let mut cache = TuneCache::open(Some(&dir), ctx);
        assert!(cache.is_empty());
        let a = ShapeKey::new(336, 28672, 4096, GpuDType::BF16, GpuDType::BF16);
        let b = ShapeKey::new(8192, 4096, 14336, GpuDType::F16, GpuDType::F32);
        cache.insert(a, algo(1));
        cache.insert(b, algo(2));
        cache.save().unwrap();
        let again = TuneCache::open(Some(&dir), ctx);
        assert_eq!((again.len(), again.get(&a), again.get(&b)), (2, Some(&algo(1)), Some(&algo(2))));
        // Another card, library or candidate count reads its own (here: no) file.
        assert!(TuneCache::open(Some(&dir), "NVIDIA H200|sm_90|cublasLt 120904|candidates 8").is_empty());
        // A file whose header names another context (a hash collision, an edit) is ignored; so are lines
        // that do not parse.
        let path = again.path.clone().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("candidates 8", "candidates 9", 1)).unwrap();
        assert!(TuneCache::open(Some(&dir), ctx).is_empty());
        std::fs::write(&path, format!("{text}garbage line\n1 2 3 bf16 bf16 x 0 0 0 0 0 0 0 0 0 0\n")).unwrap();
        assert_eq!(TuneCache::open(Some(&dir), ctx).len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_folder_nothing_is_read_or_written() {
        let mut cache = TuneCache::open(None, "ctx");
        cache.insert(ShapeKey::new(1, 2, 3, GpuDType::BF16, GpuDType::BF16), algo(3));
        assert!(cache.save().is_ok());
        assert_eq!(cache.len(), 1);
    }
}
