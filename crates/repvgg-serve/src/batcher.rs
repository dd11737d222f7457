//! Dynamic batching: requests wait in a bounded queue and one engine thread packs those of the
//! same image size into a single call, up to `max_batch` images or `max_wait` after the first
//! arrived. The engine's own parallelism runs on a rayon pool of its own, so the async runtime
//! only ever moves bytes. The batching loop itself runs on one of that pool's threads: a
//! batch then starts without handing it to the pool and ends without handing it back (each
//! handoff a thread wake-up, tens to hundreds of microseconds on a virtual machine).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use repvgg_engine::Runner;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Requests that may wait; more are refused (503) rather than queued without bound.
    pub queue: usize,
}

/// One request's images, `(n, c, h, w)` flattened, and where its logits go.
pub struct Job {
    pub input: Vec<f32>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Vec<f32>, JobError>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("the request's deadline passed before the engine reached it")]
    Expired,
    #[error("the engine failed on this batch: {0}")]
    Engine(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
    /// Checked here so that one malformed job cannot fail the batch it would join.
    #[error(transparent)]
    Input(repvgg_engine::EngineError),
}

/// The submitting side; cheap to share between request handlers.
pub struct Batcher {
    queue: SyncSender<Job>,
    /// The model's input channels.
    channels: usize,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

/// A request on its way to the queue (its body being read or parsed): while any is, the engine
/// thread holds a batch open for it, up to `max_wait`. While none is and the batch is as large
/// as the last one, waiting gains nothing and it runs at once (a lone client pays no delay).
pub struct Arrival(Arc<AtomicUsize>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the engine thread. It ends once every `Batcher` is dropped and the queue is
    /// drained, which is how shutdown finishes the requests already accepted.
    pub fn start(
        runner: Runner,
        threads: usize,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Batcher, JoinHandle<()>)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("repvgg-engine-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let (queue, jobs) = sync_channel(policy.queue);
        let channels = runner.spec().in_channels;
        let depth = Arc::new(AtomicUsize::new(0));
        let arriving = Arc::new(AtomicUsize::new(0));
        let worker = EngineWorker {
            arriving: arriving.clone(),
            last_batch: 1,
            runner,
            policy,
            jobs,
            waiting: VecDeque::new(),
            depth: depth.clone(),
            metrics: metrics.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("repvgg-batcher".into())
            // The loop holds one pool thread for as long as the server runs (blocked on the
            // queue between batches); the forward's parallel parts take the others.
            .spawn(move || pool.install(move || worker.run()))?;
        Ok((
            Batcher {
                queue,
                channels,
                depth,
                arriving,
                metrics,
            },
            handle,
        ))
    }

    /// Marks a request as on its way; the mark ends when the returned value is dropped, which
    /// [`Batcher::submit`] does once the job is queued.
    pub fn arriving(&self) -> Arrival {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arrival(self.arriving.clone())
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job, arrival: Arrival) -> Result<(), SubmitError> {
        repvgg_engine::check_input(&job.input, job.n, self.channels, job.h, job.w)
            .map_err(SubmitError::Input)?;
        // No longer on its way before it is sent: the engine thread, woken by the send, must
        // not hold its batch open for this very job (a lone client waited out a poll each
        // time). Should it look in between, the job simply joins the next batch.
        drop(arrival);
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .set(self.depth.load(Ordering::SeqCst) as i64);
                Ok(())
            }
            Err(e) => {
                let waiting = self.depth.fetch_sub(1, Ordering::SeqCst) - 1;
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full(waiting),
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }
}

struct EngineWorker {
    runner: Runner,
    policy: BatchPolicy,
    jobs: Receiver<Job>,
    /// Jobs taken from the queue that did not fit the batch being formed (another size, or
    /// too many images): first in line for the next one.
    waiting: VecDeque<Job>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    /// Images in the last batch: under steady load about as many come again, so a batch is
    /// held open (up to `max_wait`) until it has as many.
    last_batch: usize,
    metrics: Arc<Metrics>,
}

/// How often the engine thread looks again while a batch is held open.
const POLL: Duration = Duration::from_micros(200);

impl EngineWorker {
    fn take(&mut self, job: Option<Job>) -> Option<Job> {
        if job.is_some() {
            let left = self.depth.fetch_sub(1, Ordering::SeqCst) - 1;
            self.metrics.queue_depth.set(left as i64);
        }
        job
    }

    fn run(mut self) {
        loop {
            let first = match self.waiting.pop_front() {
                Some(job) => job,
                None => match self.jobs.recv() {
                    Ok(job) => self.take(Some(job)).expect("a job"),
                    Err(_) => return,
                },
            };
            let Some(first) = live(first) else { continue };
            let (h, w) = (first.h, first.w);
            let mut images = first.n;
            let mut batch = vec![first];
            // Jobs set aside earlier that fit now.
            let mut i = 0;
            while i < self.waiting.len() && images < self.policy.max_batch {
                let job = &self.waiting[i];
                if (job.h, job.w) == (h, w) && images + job.n <= self.policy.max_batch {
                    let job = self.waiting.remove(i).expect("index in range");
                    if let Some(job) = live(job) {
                        images += job.n;
                        batch.push(job);
                    }
                } else {
                    i += 1;
                }
            }
            let until = Instant::now() + self.policy.max_wait;
            while images < self.policy.max_batch {
                let next = match self.jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(_) => {
                        let left = until.saturating_duration_since(Instant::now());
                        let expected =
                            self.arriving.load(Ordering::SeqCst) > 0 || images < self.last_batch;
                        if left.is_zero() || !expected {
                            None
                        } else {
                            match self.jobs.recv_timeout(left.min(POLL)) {
                                Ok(job) => Some(job),
                                Err(_) => continue,
                            }
                        }
                    }
                };
                let Some(job) = self.take(next) else { break };
                let Some(job) = live(job) else { continue };
                if (job.h, job.w) == (h, w) && images + job.n <= self.policy.max_batch {
                    images += job.n;
                    batch.push(job);
                } else {
                    self.waiting.push_back(job);
                    break;
                }
            }
            self.last_batch = images;
            self.execute(batch, images, h, w);
        }
    }

    fn execute(&mut self, batch: Vec<Job>, images: usize, h: usize, w: usize) {
        let input: Vec<f32> = if batch.len() == 1 {
            Vec::new()
        } else {
            // Whole requests copied at once, not value by value through an iterator chain.
            let mut input = Vec::with_capacity(batch.iter().map(|j| j.input.len()).sum());
            for job in &batch {
                input.extend_from_slice(&job.input);
            }
            input
        };
        let input = if batch.len() == 1 {
            &batch[0].input
        } else {
            &input
        };
        self.metrics.batch_size.observe(images as f64);
        let started = Instant::now();
        let runner = &mut self.runner;
        // The server answers even if the engine fails or has a bug: the batch's requests get
        // a 500 and the thread goes on with the next batch.
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| runner.forward(input, images, h, w)))
                .map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into())
                })
                .and_then(|logits| logits.map_err(|e| e.to_string()));
        self.metrics
            .engine_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(logits) => {
                let width = logits.len() / images;
                let mut offset = 0;
                for job in batch {
                    let part = logits[offset * width..(offset + job.n) * width].to_vec();
                    offset += job.n;
                    // A client that went away no longer waits for its answer.
                    let _ = job.reply.send(Ok(part));
                }
            }
            Err(message) => {
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Engine(message.clone())));
                }
            }
        }
    }
}

/// The job if someone still waits for it: a client that disconnected or whose deadline
/// passed costs no engine time.
fn live(job: Job) -> Option<Job> {
    if job.reply.is_closed() {
        return None;
    }
    if Instant::now() >= job.deadline {
        let _ = job.reply.send(Err(JobError::Expired));
        return None;
    }
    Some(job)
}
