//! The one raw-pointer wrapper the parallel kernels share: rayon tasks that each write their own
//! disjoint elements of one output buffer.

/// A raw output pointer shared by tasks that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);

// SAFETY: every user writes only task-disjoint, in-bounds elements of a buffer that stays mutably
// borrowed (and so alive and otherwise unaliased) until all its tasks have finished; tasks never read
// through it. Each call site states why its writes are disjoint.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> OutPtr {
        OutPtr(out.as_mut_ptr())
    }

    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
