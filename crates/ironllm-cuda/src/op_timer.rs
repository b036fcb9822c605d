//! `IRONLLM_OP_TIMING=1`: where the GPU time of served steps goes, op by op. An eager forward records a
//! CUDA event after each of its ops (every layer's GEMMs, norms, RoPE + KV write, decode and prefill
//! attention, SiLU-and-mul, then the LM head), a replayed decode graph one after the replay, and the
//! sampler one after itself; once the step is finished the runner reads the intervals and adds them to
//! per-op sums together with the work each op did (FLOPs of GEMMs and prefill attention, bytes of the
//! memory-bound ops), so the log shows each op's share and achieved rate over a whole run — a mixed
//! prefill + decode workload included, which per-kernel profilers cannot replay in reasonable time.
//! A measurement aid (hundreds of events a step), off by default. The value is how many steps go between
//! cumulative reports (a number; anything else: 50).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};

/// Steps between cumulative reports unless the variable names another count.
const REPORT_EVERY: u64 = 50;

/// What a timed interval did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Embed,
    Norm,
    QkvGemm,
    RopeKv,
    /// The paged attention launch: the decode rows (every row where the dtype has no tensor-core prefill
    /// kernel, as float32; its bytes then count the decode rows' keys only).
    AttnDecode,
    AttnPrefill,
    OGemm,
    GateUpGemm,
    SiluMul,
    DownGemm,
    Head,
    Graph,
    Sampler,
}

const OPS: [Op; 13] = [
    Op::Embed,
    Op::Norm,
    Op::QkvGemm,
    Op::RopeKv,
    Op::AttnDecode,
    Op::AttnPrefill,
    Op::OGemm,
    Op::GateUpGemm,
    Op::SiluMul,
    Op::DownGemm,
    Op::Head,
    Op::Graph,
    Op::Sampler,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Embed => "embedding",
            Op::Norm => "(add +) RMSNorm",
            Op::QkvGemm => "QKV GEMM",
            Op::RopeKv => "RoPE + KV write",
            Op::AttnDecode => "decode attention",
            Op::AttnPrefill => "prefill attention",
            Op::OGemm => "o_proj GEMM",
            Op::GateUpGemm => "gate/up GEMM",
            Op::SiluMul => "SiLU-and-mul",
            Op::DownGemm => "down GEMM",
            Op::Head => "final norm + LM head",
            Op::Graph => "decode graph replay",
            Op::Sampler => "sampler + copy",
        }
    }

    /// Its slot in the sums (`OPS` lists the variants in declaration order).
    fn index(self) -> usize {
        self as usize
    }
}

/// The work an interval did, for its achieved rate.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Work {
    Flops(f64),
    Bytes(f64),
    Unknown,
}

/// Host-side facts of a step the model cannot see on the device.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StepWork {
    /// Sum of the decode rows' context lengths (keys each layer's decode attention reads).
    pub decode_keys: f64,
    /// (query, key) pairs the prefill rows attend over in one layer and one head, causal mask counted.
    pub prefill_pairs: f64,
}

/// The events of one step, in stream order, each closing the interval of its op.
pub(crate) struct OpMarks {
    pub(crate) work: StepWork,
    tokens: usize,
    eager: bool,
    start: CudaEvent,
    marks: Vec<(Op, Work, CudaEvent)>,
}

fn record(gpu: &Gpu) -> Result<CudaEvent, CudaError> {
    gpu.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).at(|| "recording an op-timing event".into())
}

impl OpMarks {
    /// Marks the start of a step's forward.
    pub(crate) fn begin(gpu: &Gpu, tokens: usize, eager: bool, work: StepWork) -> Result<OpMarks, CudaError> {
        Ok(OpMarks { work, tokens, eager, start: record(gpu)?, marks: Vec::with_capacity(if eager { 400 } else { 2 }) })
    }

    /// Closes the interval since the previous mark as `op`'s.
    pub(crate) fn mark(&mut self, gpu: &Gpu, op: Op, work: Work) -> Result<(), CudaError> {
        let event = record(gpu)?;
        self.marks.push((op, work, event));
        Ok(())
    }
}

/// Marks `op` when timing is on (the model's forward takes an optional `OpMarks`).
pub(crate) fn mark(marks: &mut Option<&mut OpMarks>, gpu: &Gpu, op: Op, work: Work) -> Result<(), CudaError> {
    match marks {
        Some(m) => m.mark(gpu, op, work),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, Default)]
struct Sum {
    ms: f64,
    flops: f64,
    bytes: f64,
    count: u64,
}

/// Sums over all steps since start-up.
#[derive(Default)]
pub(crate) struct OpTimer {
    report_every: u64,
    sums: [Sum; OPS.len()],
    eager_steps: u64,
    graph_steps: u64,
    eager_tokens: u64,
    graph_tokens: u64,
}

impl OpTimer {
    /// `Some` when `IRONLLM_OP_TIMING` is set.
    pub(crate) fn from_env() -> Option<OpTimer> {
        let v = std::env::var("IRONLLM_OP_TIMING").ok()?;
        let report_every = v.trim().parse::<u64>().ok().filter(|&n| n > 0).unwrap_or(REPORT_EVERY);
        Some(OpTimer { report_every, ..OpTimer::default() })
    }

    /// Adds a finished step (its events completed).
    pub(crate) fn add(&mut self, marks: OpMarks) -> Result<(), CudaError> {
        let mut prev = &marks.start;
        for (op, work, event) in &marks.marks {
            let ms = prev.elapsed_ms(event).at(|| "reading an op-timing event".into())?;
            let s = &mut self.sums[op.index()];
            s.ms += f64::from(ms);
            s.count += 1;
            match work {
                Work::Flops(f) => s.flops += f,
                Work::Bytes(b) => s.bytes += b,
                Work::Unknown => {}
            }
            prev = event;
        }
        if marks.eager {
            self.eager_steps += 1;
            self.eager_tokens += marks.tokens as u64;
        } else {
            self.graph_steps += 1;
            self.graph_tokens += marks.tokens as u64;
        }
        if (self.eager_steps + self.graph_steps).is_multiple_of(self.report_every.max(1)) {
            tracing::info!("{}", self.report());
        }
        Ok(())
    }

    /// One line: totals since start-up, each op's time, share and achieved rate.
    pub(crate) fn report(&self) -> String {
        let total: f64 = self.sums.iter().map(|s| s.ms).sum();
        let mut line = format!(
            "op timing (GPU, since start): {} eager steps ({} tokens), {} graph steps ({} tokens), {:.1} ms in all;",
            self.eager_steps, self.eager_tokens, self.graph_steps, self.graph_tokens, total
        );
        for (op, s) in OPS.iter().zip(&self.sums) {
            if s.count == 0 {
                continue;
            }
            let rate = if s.flops > 0.0 && s.ms > 0.0 {
                format!(", {:.0} TFLOP/s", s.flops / (s.ms * 1e-3) / 1e12)
            } else if s.bytes > 0.0 && s.ms > 0.0 {
                format!(", {:.0} GB/s", s.bytes / (s.ms * 1e-3) / 1e9)
            } else {
                String::new()
            };
            line.push_str(&format!(" {} {:.1} ms ({:.1}%{rate});", op.name(), s.ms, 100.0 * s.ms / total.max(1e-9)));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_its_own_slot_and_name() {
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(op.index(), i);
        }
        let names: std::collections::HashSet<_> = OPS.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), OPS.len());
    }

    #[test]
    fn report_gives_shares_and_rates() {
        let mut t = OpTimer::default();
        t.sums[Op::QkvGemm.index()] = Sum { ms: 30.0, flops: 3e13, bytes: 0.0, count: 1 };
        t.sums[Op::SiluMul.index()] = Sum { ms: 10.0, flops: 0.0, bytes: 2e10, count: 1 };
        t.eager_steps = 1;
        t.eager_tokens = 8;
        let r = t.report();
        assert!(r.contains("QKV GEMM 30.0 ms (75.0%, 1000 TFLOP/s)"), "{r}");
        assert!(r.contains("SiLU-and-mul 10.0 ms (25.0%, 2000 GB/s)"), "{r}");
        assert!(!r.contains("down GEMM"), "{r}");
    }
}
