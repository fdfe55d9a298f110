//! What the CPU kernels share to split one output buffer across rayon
//! tasks.

/// A raw pointer to an output buffer that rayon tasks writing disjoint
/// parts of it may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

// SAFETY: every user hands each task a region of the buffer no other task
// touches, and the buffer outlives the tasks (a `scope` or a blocking
// `for_each` that returns only when all tasks are done).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so that closures capture the whole (Send) struct
    /// rather than its raw pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
