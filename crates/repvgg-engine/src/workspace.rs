//! Memory reused across calls, so that steady-state inference allocates nothing.
//!
//! A [`Workspace`] belongs to a call: the batch's activations, pooled features and logits.
//! What a task needs while it runs (im2col patches, Winograd's transformed tiles, SE's
//! vectors) belongs to the thread that runs it, since tasks run on the pool's threads in any
//! order: one [`TaskScratch`] per thread, grown to the largest layer once.

use std::cell::RefCell;

/// Buffers reused across calls (activations, pooled features, logits), so that steady-state
/// inference through [`crate::Engine::infer`] does not allocate.
#[derive(Default)]
pub struct Workspace {
    pub(crate) a: Vec<f32>,
    pub(crate) b: Vec<f32>,
    /// One image's maps, for the leading layers that run image by image.
    pub(crate) image_a: Vec<f32>,
    pub(crate) image_b: Vec<f32>,
    pub(crate) pooled: Vec<f32>,
    pub(crate) logits: Vec<f32>,
}

/// A thread's scratch for the tasks it runs.
#[derive(Default)]
pub(crate) struct TaskScratch {
    /// im2col: the task's patches, one row of `9 cin/g` values per output position.
    pub patches: Vec<f32>,
    /// Implicit GEMM: per output position, (image row offset, top tap row, left tap column).
    pub origins: Vec<(usize, isize, isize)>,
    /// Winograd: the task's transformed tiles.
    pub ring: Vec<f32>,
    /// SE: the pooled means, the bottleneck and the gate.
    pub se: (Vec<f32>, Vec<f32>, Vec<f32>),
}

thread_local! {
    static TASK_SCRATCH: RefCell<TaskScratch> = RefCell::new(TaskScratch::default());
    /// Throughput mode: each thread's workspace for the whole images it runs.
    static THREAD_WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Runs `f` with this thread's task scratch. Not re-entrant: `f` must not call it again.
pub(crate) fn with_task_scratch<T>(f: impl FnOnce(&mut TaskScratch) -> T) -> T {
    TASK_SCRATCH.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// Runs `f` with this thread's workspace for whole images (throughput mode).
pub(crate) fn with_thread_workspace<T>(f: impl FnOnce(&mut Workspace) -> T) -> T {
    THREAD_WORKSPACE.with(|ws| f(&mut ws.borrow_mut()))
}
