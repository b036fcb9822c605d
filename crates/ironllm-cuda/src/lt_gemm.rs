//! Half-precision GEMMs (`y[m, n] = x[m, k] w[n, k]^T`, f32 accumulation) through cuBLASLt, with the
//! algorithm chosen per shape.
//!
//! For a new shape cuBLASLt's heuristic proposes its candidates; `tune` (run by the model runner at
//! start-up, on the model's own weights, at the batch sizes it will run: the decode graphs' sizes and a
//! ladder of prefill sizes) times them, each from a cold L2 as in a step, and keeps the fastest for that
//! (n, k). A later GEMM of m rows uses the winner of the nearest timed size at or above m, once cuBLASLt
//! confirms that algorithm supports the exact shape; otherwise, and for shapes never timed, the
//! heuristic's first choice (what cublasGemmEx would run). Descriptors are built once per exact shape and
//! kept, so a GEMM costs one cuBLASLt call on the host. `IRONLLM_GEMM_TUNING=0` skips the timing, for
//! side-by-side measurements. The winners are kept on disk (`gemm_cache`), so a restart on the same card
//! and library reuses them instead of timing again (`IRONLLM_GEMM_TUNING_CACHE=0` times afresh).
//!
//! A GEMM may also accumulate into its output (`y += x w^T`: beta = 1 with C = D = y, see `Output`),
//! which lets the decoder add a projection into the residual stream in the GEMM's epilogue. Plans,
//! heuristic choices and timed winners are shared by both forms: see `Output::Accumulate` for why an
//! algorithm chosen for beta = 0 is valid for beta = 1.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{CudaError, DriverContext};
use crate::gemm_cache::{CachedAlgo, ShapeKey, TuneCache};
use crate::tensor::GpuDType;

/// Workspace for split-K and stream-K algorithms (cuBLAS's own default on Hopper is 32 MiB).
const WORKSPACE_BYTES: usize = 64 << 20;
/// Candidates asked of the heuristic when tuning (`IRONLLM_GEMM_CANDIDATES` overrides it, 1-64, for
/// side-by-side runs: more candidates can find better algorithms for the decode graphs' few-hundred-row
/// GEMMs, at more start-up time).
const CANDIDATES: usize = 8;

fn candidates() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("IRONLLM_GEMM_CANDIDATES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(CANDIDATES, |n| n.clamp(1, 64))
    })
}
/// A candidate replaces the heuristic's first choice only when this much faster (timing noise is ~1%).
const MIN_GAIN: f64 = 0.02;
/// Plans kept before the cache starts over (each is three layouts and a descriptor, host memory only).
const MAX_PLANS: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    input: GpuDType,
    output: GpuDType,
}

/// The (n, k, dtypes) of a weight, whose timed winners are looked up by m.
type WeightKey = (usize, usize, GpuDType, GpuDType);

fn data_type(d: GpuDType) -> sys::cudaDataType {
    match d {
        GpuDType::F32 => sys::cudaDataType::CUDA_R_32F,
        GpuDType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        GpuDType::F16 => sys::cudaDataType::CUDA_R_16F,
    }
}

fn lt(what: impl FnOnce() -> String, status: sys::cublasStatus_t) -> Result<(), CudaError> {
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Cublas { what: what(), message: format!("{status:?}") })
    }
}

/// What a GEMM does with what its output held before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// `y = x w^T` (beta = 0: cuBLASLt does not read y).
    Overwrite,
    /// `y += x w^T` in place (beta = 1, C and D both y with one layout, which cublasLtMatmul documents
    /// as its in-place form: C == D with Cdesc == Ddesc). No plan or algorithm of its own: the
    /// heuristic (`cublasLtMatmulAlgoGetHeuristic`) and the check (`cublasLtMatmulAlgoCheck`) see the
    /// descriptors, never alpha, beta or the data pointers, so an algorithm they accept for a shape is
    /// one cuBLASLt runs for any beta, and a second check at beta = 1 would ask the same question. The
    /// C pointer's alignment, which the heuristic does assume (256 bytes by default), is the output's
    /// own either way. Reading C costs an extra pass over y, small beside a compute-bound GEMM; timed
    /// winners were timed at beta = 0.
    Accumulate,
}

impl Output {
    fn beta(self) -> f32 {
        match self {
            Output::Overwrite => 0.0,
            Output::Accumulate => 1.0,
        }
    }
}

/// The descriptors of one exact shape and the algorithm it runs.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// w as column-major [k, n] (transposed by the op), x as column-major [k, m], y as column-major [n, m].
    w: sys::cublasLtMatrixLayout_t,
    x: sys::cublasLtMatrixLayout_t,
    y: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side objects owned by this plan alone and only used under the cache's
// mutex.
unsafe impl Send for Plan {}

impl Plan {
    fn new(s: &Shape) -> Result<Plan, CudaError> {
        let what = || format!("describing gemm m={} n={} k={}", s.m, s.n, s.k);
        let mut desc = MaybeUninit::uninit();
        // SAFETY: out-pointers to locals; every created object is owned by the returned plan (or destroyed
        // by its Drop when a later step fails).
        unsafe {
            lt(
                what,
                sys::cublasLtMatmulDescCreate(
                    desc.as_mut_ptr(),
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType::CUDA_R_32F,
                ),
            )?;
            let mut plan = Plan {
                desc: desc.assume_init(),
                w: std::ptr::null_mut(),
                x: std::ptr::null_mut(),
                y: std::ptr::null_mut(),
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            };
            // cublasOperation_t is an int32 attribute; CUBLAS_OP_T = 1 (cublas_api.h).
            let trans_a: i32 = 1;
            lt(
                what,
                sys::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&trans_a) as *const _ as *const c_void,
                    std::mem::size_of_val(&trans_a),
                ),
            )?;
            let layout = |out: &mut sys::cublasLtMatrixLayout_t, d: GpuDType, rows: usize, cols: usize| {
                let mut l = MaybeUninit::uninit();
                lt(
                    what,
                    sys::cublasLtMatrixLayoutCreate(
                        l.as_mut_ptr(),
                        data_type(d),
                        rows as u64,
                        cols as u64,
                        rows as i64,
                    ),
                )?;
                *out = l.assume_init();
                Ok::<(), CudaError>(())
            };
            layout(&mut plan.w, s.input, s.k, s.n)?;
            layout(&mut plan.x, s.input, s.k, s.m)?;
            layout(&mut plan.y, s.output, s.n, s.m)?;
            Ok(plan)
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in Plan::new and destroyed only here; null members were never created.
        unsafe {
            for l in [self.w, self.x, self.y] {
                if !l.is_null() {
                    sys::cublasLtMatrixLayoutDestroy(l);
                }
            }
            sys::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

/// What `tune` found for one shape.
#[derive(Debug, Clone, Copy)]
pub struct TuneResult {
    /// Candidates that ran (the heuristic's list, less those that failed).
    pub candidates: usize,
    /// Time of the heuristic's first choice and of the kept algorithm, ms per GEMM.
    pub first_ms: f64,
    pub best_ms: f64,
    /// Read from the disk cache (the times are the earlier start's), not timed now.
    pub cached: bool,
}

/// The cuBLASLt handle, its workspace and the per-shape plans.
pub(crate) struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Shape, Plan>>,
    /// Timed winners per weight shape, by the m they were timed at.
    tuned: Mutex<HashMap<WeightKey, BTreeMap<usize, sys::cublasLtMatmulAlgo_t>>>,
    /// Winners of earlier starts on this card and library (`gemm_cache`).
    disk: Mutex<TuneCache>,
}

// SAFETY: the handle is only used with our one stream, and every mutable state sits behind a mutex.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here (the plans' descriptors do not belong to it).
        unsafe { sys::cublasLtDestroy(self.handle) };
    }
}

/// What names a tuning file's context: the card, the library and the tuning's own settings.
pub(crate) fn tuning_context(device_name: &str, cc: (i32, i32)) -> String {
    // SAFETY: a plain query of the loaded library.
    let version = unsafe { sys::cublasLtGetVersion() };
    format!(
        "{device_name}|sm_{}{}|cublasLt {version}|candidates {}|workspace {WORKSPACE_BYTES}|min gain {MIN_GAIN}",
        cc.0,
        cc.1,
        candidates()
    )
}

impl LtGemm {
    /// A handle whose tuning reads and extends `disk` (`IRONLLM_GEMM_TUNING_CACHE=0`: pass an in-memory
    /// cache to time every shape afresh).
    pub(crate) fn new(stream: &Arc<CudaStream>, disk: TuneCache) -> Result<LtGemm, CudaError> {
        let mut handle = MaybeUninit::uninit();
        // SAFETY: out-pointer to a local.
        let handle = unsafe {
            lt(|| "creating the cuBLASLt handle".into(), sys::cublasLtCreate(handle.as_mut_ptr()))?;
            handle.assume_init()
        };
        let workspace = match stream.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created above, not used elsewhere.
                unsafe { sys::cublasLtDestroy(handle) };
                return Err(e).at(|| "allocating the cuBLASLt workspace".into());
            }
        };
        Ok(LtGemm {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            tuned: Mutex::new(HashMap::new()),
            disk: Mutex::new(disk),
        })
    }

    /// The heuristic's candidates for a plan's shape, best first, within the workspace.
    fn heuristic(&self, plan: &Plan, count: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, CudaError> {
        let what = || "asking cuBLASLt for algorithms".to_string();
        let mut found = 0i32;
        let mut results = vec![
            sys::cublasLtMatmulHeuristicResult_t {
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                wavesCount: 0.0,
                reserved: [0; 4],
            };
            count
        ];
        // SAFETY: the preference is created and destroyed here; `results` holds `count` entries.
        unsafe {
            let mut pref = MaybeUninit::uninit();
            lt(what, sys::cublasLtMatmulPreferenceCreate(pref.as_mut_ptr()))?;
            let pref = pref.assume_init();
            let ws = WORKSPACE_BYTES as u64;
            let status = sys::cublasLtMatmulPreferenceSetAttribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            );
            let status = if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.w,
                    plan.x,
                    plan.y,
                    plan.y,
                    pref,
                    count as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
            } else {
                status
            };
            sys::cublasLtMatmulPreferenceDestroy(pref);
            lt(what, status)?;
        }
        Ok(results
            .into_iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE_BYTES)
            .map(|r| r.algo)
            .collect())
    }

    /// Whether `algo` runs the plan's exact shape within the workspace.
    fn supports(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
        let mut result = MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::uninit();
        // SAFETY: live descriptors; `result` is an out-parameter read only on success.
        unsafe {
            let status = sys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.w,
                plan.x,
                plan.y,
                plan.y,
                algo,
                result.as_mut_ptr(),
            );
            status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.assume_init().workspaceSize <= WORKSPACE_BYTES
        }
    }

    /// A new plan: the timed winner nearest at or above m if it supports the shape, else the heuristic's
    /// first choice.
    fn make_plan(&self, s: &Shape) -> Result<Plan, CudaError> {
        let mut plan = Plan::new(s)?;
        let timed = {
            let tuned = self.tuned.lock().map_err(|_| CudaError::Invalid("gemm tuning table poisoned".into()))?;
            tuned
                .get(&(s.n, s.k, s.input, s.output))
                .and_then(|by_m| by_m.range(s.m..).next().or_else(|| by_m.iter().next_back()).map(|(_, a)| *a))
        };
        if let Some(algo) = timed.filter(|a| self.supports(&plan, a)) {
            plan.algo = algo;
            return Ok(plan);
        }
        plan.algo = *self.heuristic(&plan, 1)?.first().ok_or_else(|| CudaError::Cublas {
            what: format!("gemm m={} n={} k={}", s.m, s.n, s.k),
            message: "cuBLASLt has no algorithm for this shape".into(),
        })?;
        Ok(plan)
    }

    /// Launches one GEMM with a given algorithm. Pointers: y [m, n], x [m, k], w [n, k], row-major; y is
    /// both C and D (read only for [`Output::Accumulate`]).
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        stream: &CudaStream,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        y: u64,
        x: u64,
        w: u64,
        s: &Shape,
        into: Output,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, into.beta());
        let (ws, _guard) = self.workspace.device_ptr(stream);
        // SAFETY: the caller passes live device buffers of the plan's shape; the workspace lives with self;
        // cuBLASLt runs on our stream; C and D are one buffer with one layout (its in-place form).
        let status = unsafe {
            sys::cublasLtMatmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                w as *const c_void,
                plan.w,
                x as *const c_void,
                plan.x,
                (&beta) as *const f32 as *const c_void,
                y as *const c_void,
                plan.y,
                y as *mut c_void,
                plan.y,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        lt(|| format!("gemm m={} n={} k={}", s.m, s.n, s.k), status)
    }

    /// `y = x w^T`, or `y += x w^T` for [`Output::Accumulate`], for row-major device pointers (sizes
    /// checked by the caller). Both forms share the shape's plan.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        stream: &CudaStream,
        y: u64,
        x: u64,
        w: u64,
        (m, n, k): (usize, usize, usize),
        input: GpuDType,
        output: GpuDType,
        into: Output,
    ) -> Result<(), CudaError> {
        let s = Shape { m, n, k, input, output };
        let mut plans = self.plans.lock().map_err(|_| CudaError::Invalid("gemm plan cache poisoned".into()))?;
        if !plans.contains_key(&s) {
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let plan = self.make_plan(&s)?;
            plans.insert(s, plan);
        }
        let plan = &plans[&s];
        self.launch(stream, plan, &plan.algo, y, x, w, &s, into)
    }

    /// Times the heuristic's candidates for one shape on the given buffers (their contents are
    /// overwritten in y only) and keeps the fastest for later GEMMs of this weight shape at sizes up to m.
    /// Before each timed GEMM the stream writes `flush` (at least twice the L2 cache): in a step each
    /// weight is read once, from memory, and a GEMM timed right after itself finds its weights in L2,
    /// which flatters the algorithms that re-read them (split-K and small tiles at decode sizes).
    /// Synchronizes the stream; not for use during a graph capture.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tune(
        &self,
        stream: &Arc<CudaStream>,
        y: u64,
        x: u64,
        w: u64,
        (m, n, k): (usize, usize, usize),
        input: GpuDType,
        output: GpuDType,
        flush: &mut CudaSlice<u8>,
    ) -> Result<TuneResult, CudaError> {
        const ROUNDS: usize = 5;
        let s = Shape { m, n, k, input, output };
        let plan = Plan::new(&s)?;
        let key = ShapeKey::new(m, n, k, input, output);
        let earlier =
            self.disk.lock().map_err(|_| CudaError::Invalid("gemm tuning cache poisoned".into()))?.get(&key).copied();
        if let Some(hit) = earlier {
            let algo = sys::cublasLtMatmulAlgo_t { data: hit.algo };
            if self.supports(&plan, &algo) {
                self.keep(s, algo)?;
                return Ok(TuneResult {
                    candidates: hit.candidates,
                    first_ms: hit.first_ms,
                    best_ms: hit.best_ms,
                    cached: true,
                });
            }
        }
        let candidates = self.heuristic(&plan, candidates())?;
        let mut ok = Vec::new();
        for algo in candidates {
            // A candidate that fails to launch (it happens for some split-K configurations) is skipped.
            if self.launch(stream, &plan, &algo, y, x, w, &s, Output::Overwrite).is_ok() {
                ok.push((algo, f64::INFINITY));
            }
        }
        if ok.is_empty() {
            return Err(CudaError::Cublas {
                what: format!("tuning gemm m={m} n={n} k={k}"),
                message: "no cuBLASLt algorithm ran".into(),
            });
        }
        let event =
            || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).at(|| "recording a tuning event".into());
        // Rounds interleave the candidates, so a clock change mid-way does not favour one of them.
        for _ in 0..ROUNDS {
            for (algo, best) in ok.iter_mut() {
                stream.memset_zeros(flush).at(|| "flushing the L2 cache".into())?;
                let start = event()?;
                self.launch(stream, &plan, algo, y, x, w, &s, Output::Overwrite)?;
                let end = event()?;
                end.synchronize().at(|| "waiting for a tuning run".into())?;
                let ms = f64::from(start.elapsed_ms(&end).at(|| "reading a tuning time".into())?);
                *best = best.min(ms);
            }
        }
        let first_ms = ok[0].1;
        let (mut algo, mut best_ms) = ok[0];
        for &(a, t) in &ok[1..] {
            if t < best_ms && t < first_ms * (1.0 - MIN_GAIN) {
                (algo, best_ms) = (a, t);
            }
        }
        self.keep(s, algo)?;
        let found = CachedAlgo { algo: algo.data, candidates: ok.len(), first_ms, best_ms };
        self.disk.lock().map_err(|_| CudaError::Invalid("gemm tuning cache poisoned".into()))?.insert(key, found);
        Ok(TuneResult { candidates: ok.len(), first_ms, best_ms, cached: false })
    }

    /// Makes `algo` the winner for GEMMs of this weight shape at sizes up to `s.m`.
    fn keep(&self, s: Shape, algo: sys::cublasLtMatmulAlgo_t) -> Result<(), CudaError> {
        self.tuned
            .lock()
            .map_err(|_| CudaError::Invalid("gemm tuning table poisoned".into()))?
            .entry((s.n, s.k, s.input, s.output))
            .or_default()
            .insert(s.m, algo);
        // Plans made before this timing keep their algorithm otherwise.
        self.plans.lock().map_err(|_| CudaError::Invalid("gemm plan cache poisoned".into()))?.clear();
        Ok(())
    }

    /// Writes what tuning added to the disk cache; a failure only costs the next start the timing.
    pub(crate) fn save_tuning(&self) {
        let Ok(mut disk) = self.disk.lock() else { return };
        if let Err(e) = disk.save() {
            tracing::warn!("could not write the GEMM tuning cache: {e}");
        }
    }
}
