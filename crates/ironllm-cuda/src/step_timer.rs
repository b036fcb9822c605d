//! `IRONLLM_STEP_TIMING=1`: where a step's GPU time goes, measured on the stream itself. CUDA events are
//! recorded at the start of a step's inputs, before its forward, after its forward and after the
//! sampler's copy to the host; once the step is finished the runner reads the intervals between them,
//! and the interval from the previous step's last event to this step's first (the GPU idle between
//! steps, or ~0 when the step was already queued). Means are logged every `REPORT_EVERY` steps.
//! A measurement aid (the events cost a few microseconds a step), off by default.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};

const REPORT_EVERY: u32 = 64;

/// The events of one step, in stream order.
pub(crate) struct StepEvents {
    marks: Vec<CudaEvent>,
}

impl StepEvents {
    /// Records the next mark on the stream.
    pub(crate) fn mark(&mut self, gpu: &Gpu) -> Result<(), CudaError> {
        let event = gpu
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .at(|| "recording a step-timing event".into())?;
        self.marks.push(event);
        Ok(())
    }
}

/// Sums of the intervals over the steps since the last report.
#[derive(Default)]
pub(crate) struct StepTimer {
    /// Previous step's last mark (the end of its sampler copy).
    last_end: Option<CudaEvent>,
    /// [gap before the step, inputs (copies + feed), forward, sampler and copy]
    sums_ms: [f64; 4],
    steps: u32,
}

impl StepTimer {
    /// `Some` when `IRONLLM_STEP_TIMING` is set.
    pub(crate) fn from_env() -> Option<StepTimer> {
        std::env::var_os("IRONLLM_STEP_TIMING").map(|_| StepTimer::default())
    }

    /// The first mark of a step (before its inputs are copied).
    pub(crate) fn begin(gpu: &Gpu) -> Result<StepEvents, CudaError> {
        let mut events = StepEvents { marks: Vec::with_capacity(4) };
        events.mark(gpu)?;
        Ok(events)
    }

    /// Adds a finished step (its four marks recorded and completed).
    pub(crate) fn add(&mut self, events: StepEvents) -> Result<(), CudaError> {
        let m = &events.marks;
        if m.len() != 4 {
            return Ok(());
        }
        let ms = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).at(|| "reading a step-timing event".into());
        if let Some(prev) = &self.last_end {
            self.sums_ms[0] += f64::from(ms(prev, &m[0])?);
        }
        for i in 0..3 {
            self.sums_ms[i + 1] += f64::from(ms(&m[i], &m[i + 1])?);
        }
        self.steps += 1;
        self.last_end = events.marks.into_iter().last();
        if self.steps == REPORT_EVERY {
            let n = f64::from(self.steps);
            let [gap, inputs, forward, sampler] = self.sums_ms.map(|s| s / n);
            tracing::info!(
                "step timing (GPU, mean of {} steps): gap before {:.3} ms, inputs {:.3} ms, forward {:.3} ms, sampler + copy {:.3} ms",
                self.steps,
                gap,
                inputs,
                forward,
                sampler
            );
            self.sums_ms = [0.0; 4];
            self.steps = 0;
        }
        Ok(())
    }
}
