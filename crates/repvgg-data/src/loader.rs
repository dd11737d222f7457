//! Batches made ahead on a background thread, so the model never waits for augmentation.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::transform::{Batch, Pipeline, epoch_order, mix_seed};
use crate::{DataError, DataErrorKind, Samples};

/// One epoch's batches, in a fixed order determined by (seed, epoch).
pub struct Loader {
    batches: Receiver<Result<Batch, DataError>>,
    worker: Option<JoinHandle<()>>,
    /// Time the consumer spent waiting for the next batch: the measure of data starvation.
    pub waited: Duration,
}

/// Which batches an epoch has and how they are drawn.
#[derive(Clone, Copy, Debug)]
pub struct EpochPlan {
    pub batch_size: usize,
    pub seed: u64,
    pub epoch: usize,
    /// Batches to skip (a run resumed in the middle of an epoch).
    pub first_step: usize,
    /// Shuffle and drop the last partial batch (training) or keep the stored order (evaluation).
    pub training: bool,
}

impl EpochPlan {
    pub fn steps(&self, samples: usize) -> usize {
        if self.training {
            samples / self.batch_size
        } else {
            samples.div_ceil(self.batch_size)
        }
    }
}

impl Loader {
    pub fn new(samples: Arc<dyn Samples>, pipeline: Pipeline, plan: EpochPlan) -> Loader {
        let (tx, rx) = sync_channel(3);
        let worker = std::thread::spawn(move || {
            let n = samples.len();
            let order = if plan.training {
                epoch_order(n, plan.seed, plan.epoch)
            } else {
                (0..n).collect()
            };
            for step in plan.first_step..plan.steps(n) {
                let end = ((step + 1) * plan.batch_size).min(n);
                let indices = &order[step * plan.batch_size..end];
                let seed = mix_seed(&[plan.seed, plan.epoch as u64, step as u64]);
                let batch = pipeline.batch(samples.as_ref(), indices, seed);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        Loader {
            batches: rx,
            worker: Some(worker),
            waited: Duration::ZERO,
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = Instant::now();
        let next = self.batches.recv().ok();
        self.waited += start.elapsed();
        if next.is_none() {
            // The worker is done: after its last batch, or because it panicked, which must
            // not pass for the end of the epoch.
            if let Some(Err(panic)) = self.worker.take().map(JoinHandle::join) {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                return Some(Err(DataError {
                    path: "data loader".into(),
                    kind: DataErrorKind::Loader,
                    problem: format!("preparing a batch failed unexpectedly: {message}"),
                }));
            }
        }
        next
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock the worker (its sends fail once the receiver is gone), then reap it.
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.batches, rx));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
