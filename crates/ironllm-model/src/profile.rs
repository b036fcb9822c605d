//! Opt-in timing of the CPU decode step by operation (`IRONLLM_CPU_PROFILE=1`), for kernel work on
//! issue 4: the forward pass and the runner add wall time per [`Op`] to the current step, the runner
//! keeps the step's times only when every row is a decode (so prefills do not blur the picture), and
//! the totals are printed to stderr, per step and per batch size, when the runner is dropped.
//!
//! Off (the default), every call is one cached flag check and no clock is read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// What a stretch of the step was spent on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Embed,
    Norms,
    QkvProj,
    RopeKvWrite,
    Attention,
    OProj,
    GateUpProj,
    SiluMul,
    DownProj,
    LmHead,
    Sampling,
    /// The whole `execute_model` call; the rest of it is host and engine overhead.
    Step,
}

const NUM_OPS: usize = Op::Step as usize + 1;
const NAMES: [&str; NUM_OPS] = [
    "embed",
    "norms (rms, add+rms, final)",
    "qkv proj",
    "rope + kv write + qkv split",
    "attention",
    "o proj",
    "gate_up proj",
    "silu*mul",
    "down proj",
    "lm head",
    "sampling",
    "execute_model (total)",
];

pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("IRONLLM_CPU_PROFILE").is_some_and(|v| v != "0"))
}

static CURRENT: [AtomicU64; NUM_OPS] = [const { AtomicU64::new(0) }; NUM_OPS];

/// Per batch size: (decode steps, nanoseconds per op).
type Totals = Vec<(usize, u64, [u64; NUM_OPS])>;
static TOTALS: Mutex<Totals> = Mutex::new(Vec::new());

/// A running clock: `lap(op)` charges the time since the last lap (or start) to `op`.
pub(crate) struct Clock(Option<Instant>);

impl Clock {
    pub(crate) fn start() -> Clock {
        Clock(enabled().then(Instant::now))
    }

    pub(crate) fn lap(&mut self, op: Op) {
        if let Some(t) = self.0.as_mut() {
            let now = Instant::now();
            CURRENT[op as usize].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}

/// Ends a step: its times count when it was a pure decode step of `batch` rows.
pub(crate) fn end_step(pure_decode: bool, batch: usize) {
    if !enabled() {
        return;
    }
    let step: [u64; NUM_OPS] = std::array::from_fn(|i| CURRENT[i].swap(0, Ordering::Relaxed));
    if !pure_decode {
        return;
    }
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let i = match totals.iter().position(|(b, _, _)| *b == batch) {
        Some(i) => i,
        None => {
            totals.push((batch, 0, [0; NUM_OPS]));
            totals.len() - 1
        }
    };
    totals[i].1 += 1;
    for (acc, ns) in totals[i].2.iter_mut().zip(step) {
        *acc += ns;
    }
}

/// Prints the mean time per decode step and op, per batch size.
pub(crate) fn report() {
    if !enabled() {
        return;
    }
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    for (batch, steps, ns) in totals.iter().filter(|(_, s, _)| *s > 0) {
        let per = |i: usize| ns[i] as f64 / *steps as f64 / 1e6;
        let step = per(Op::Step as usize);
        eprintln!("cpu profile: batch {batch}, {steps} decode steps, {step:.3} ms per step");
        let mut inside = 0.0;
        for (i, name) in NAMES.iter().enumerate().take(NUM_OPS - 1) {
            inside += per(i);
            eprintln!("  {name:<30} {:8.3} ms  {:5.1}%", per(i), 100.0 * per(i) / step);
        }
        eprintln!("  {:<30} {:8.3} ms  {:5.1}%", "host/engine (rest)", step - inside, 100.0 * (step - inside) / step);
    }
}
