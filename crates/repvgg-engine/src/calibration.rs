//! Activation ranges for INT8: the float engine runs calibration images and every block's
//! output is observed. `MinMax` keeps the largest value seen; `Percentile` keeps a histogram
//! and cuts its far tail, so that a few outliers do not stretch the scale over values that
//! never occur (what makes post-training INT8 of ImageNet RepVGGs collapse with min/max).

use repvgg_checkpoint::quantized::ActivationQuant;

use crate::{Engine, EngineError, Workspace};

/// How a range is chosen from the values observed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Calibration {
    MinMax,
    /// The given percentile of the values (99.99 is the usual choice).
    Percentile(f64),
    /// The range whose 8-bit quantization loses least information: the threshold minimising
    /// the KL divergence between the values' histogram and its quantized copy (TensorRT's
    /// entropy calibration, with the 256 levels of an unsigned post-ReLU activation).
    Entropy,
}

const BINS: usize = 2048;

/// Non-negative values seen so far: their maximum and a histogram over `[0, top)`, whose
/// range doubles (merging bins pairwise) when a larger value arrives.
#[derive(Clone, Debug)]
struct Histogram {
    top: f32,
    counts: Vec<u64>,
    max: f32,
    /// Values exactly zero (ReLU's floor: often half of them), inside `counts[0]`.
    zeros: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            top: 0.0,
            counts: vec![0; BINS],
            max: 0.0,
            zeros: 0,
        }
    }

    fn add(&mut self, values: &[f32]) {
        let max = values.iter().fold(0f32, |m, &v| m.max(v));
        self.max = self.max.max(max);
        if self.top == 0.0 {
            self.top = max.max(1e-6);
        }
        while max >= self.top {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.top *= 2.0;
        }
        let per_bin = BINS as f32 / self.top;
        self.zeros += values.iter().filter(|&&v| v <= 0.0).count() as u64;
        for &v in values {
            let bin = ((v.max(0.0) * per_bin) as usize).min(BINS - 1);
            self.counts[bin] += 1;
        }
    }

    /// The threshold whose quantization to `levels` levels keeps the histogram closest (least
    /// KL divergence) to the clipped original.
    ///
    /// Exact zeros are left out: they quantize exactly whatever the range, and their spike
    /// would otherwise make every coarse range look bad, so that entropy clipped ReLU outputs
    /// to a quarter of their range (26% RMS error on the demo model).
    fn entropy(&self, levels: usize) -> f32 {
        let mut counts = self.counts.clone();
        counts[0] -= self.zeros.min(counts[0]);
        let total: u64 = counts.iter().sum();
        if total == 0 || self.top == 0.0 {
            return self.max;
        }
        let bin = self.top / BINS as f32;
        let mut best = (f64::INFINITY, BINS);
        for end in (levels..=BINS).step_by(8) {
            // P: the first `end` bins, everything beyond folded into the last.
            let mut p: Vec<f64> = counts[..end].iter().map(|&c| c as f64).collect();
            p[end - 1] += counts[end..].iter().sum::<u64>() as f64;
            // Q: the clipped bins merged into `levels` groups, each group's mass spread over
            // its non-empty bins (an empty bin stays empty: quantization puts nothing there).
            let mut q = vec![0f64; end];
            for level in 0..levels {
                let (lo, hi) = (
                    level * end / levels,
                    ((level + 1) * end / levels).max(level * end / levels + 1),
                );
                let hi = hi.min(end);
                // From the clipped histogram, without the folded tail: what quantizing to
                // this range keeps, so that clipping a heavy tail costs divergence.
                let mass: f64 = counts[lo..hi].iter().map(|&c| c as f64).sum();
                let used = (lo..hi).filter(|&i| p[i] > 0.0).count();
                if used > 0 {
                    for i in lo..hi {
                        if p[i] > 0.0 {
                            q[i] = mass / used as f64;
                        }
                    }
                }
            }
            let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
            let kl: f64 = p
                .iter()
                .zip(&q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| {
                    let (p, q) = (p / sp, (q / sq).max(1e-12));
                    p * (p / q).ln()
                })
                .sum();
            if kl < best.0 {
                best = (kl, end);
            }
        }
        (best.1 as f32 * bin).min(self.max)
    }

    /// The value below which `percentile`% of the observations fall (bin upper edge).
    fn percentile(&self, percentile: f64) -> f32 {
        let total: u64 = self.counts.iter().sum();
        let wanted = (total as f64 * percentile / 100.0).ceil() as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= wanted {
                return ((i + 1) as f32 * self.top / BINS as f32).min(self.max);
            }
        }
        self.max
    }
}

/// Collects the ranges of a model's activations over calibration batches.
pub struct Calibrator {
    method: Calibration,
    input: (f32, f32),
    outputs: Vec<Histogram>,
    images: usize,
}

impl Calibrator {
    pub fn new(method: Calibration, engine: &Engine) -> Calibrator {
        Calibrator {
            method,
            input: (0.0, 0.0),
            outputs: vec![Histogram::new(); engine.spec().blocks().len()],
            images: 0,
        }
    }

    /// Runs one NCHW batch through the float engine and records what every block produces.
    /// A NaN or infinite value (in the batch, or produced by the model) is an error naming
    /// where it appeared: no range can cover it.
    pub fn observe(
        &mut self,
        engine: &Engine,
        batch: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(), EngineError> {
        if batch.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite(
                "the calibration images hold NaN or infinite values".into(),
            ));
        }
        let (lo, hi) = batch
            .iter()
            .fold(self.input, |(lo, hi), &v| (lo.min(v), hi.max(v)));
        self.input = (lo, hi);
        let outputs = &mut self.outputs;
        let mut broken = None;
        engine.forward_with(
            batch,
            n,
            h,
            w,
            &mut Workspace::default(),
            |i, _, _, nhwc| {
                if broken.is_some() || nhwc.iter().any(|v| !v.is_finite()) {
                    broken.get_or_insert(i);
                } else {
                    outputs[i].add(nhwc)
                }
            },
        )?;
        if let Some(i) = broken {
            let name = engine.spec().blocks()[i].name();
            return Err(EngineError::NonFinite(format!(
                "block {name} produces NaN or infinite values on the calibration images: the float model itself is broken there"
            )));
        }
        self.images += n;
        Ok(())
    }

    pub fn images(&self) -> usize {
        self.images
    }

    /// The quantization of each block's input and of the last block's output. The input
    /// (a normalised image, of either sign) takes its whole range; block outputs (after
    /// ReLU) start at zero.
    pub fn activations(&self) -> Vec<ActivationQuant> {
        let mut out = vec![ActivationQuant::covering(self.input.0, self.input.1)];
        for h in &self.outputs {
            let top = match self.method {
                Calibration::MinMax => h.max,
                Calibration::Percentile(p) => h.percentile(p),
                Calibration::Entropy => h.entropy(256),
            };
            out.push(ActivationQuant::covering(0.0, top));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Post-ReLU activations are roughly exponential: a bulk near zero whose density falls
    /// steeply. With a few far outliers, min/max spreads the 256 levels up to the outliers;
    /// entropy clips them and keeps resolution where the values are.
    #[test]
    fn entropy_clips_a_thin_tail() {
        let n = 100_000;
        let bulk: Vec<f32> = (0..n)
            .map(|i| -(1.0 - (i as f64 + 0.5) / n as f64).ln() as f32)
            .collect();
        let mut h = Histogram::new();
        h.add(&bulk);
        h.add(&[200.0, 190.0, 150.0]);
        let t = h.entropy(256);
        assert!((3.0..60.0).contains(&t), "{t}");
        // Values spread evenly up to the top keep the whole range.
        let mut even = Histogram::new();
        even.add(&(0..n).map(|i| i as f32 / 1000.0).collect::<Vec<_>>());
        assert!(even.entropy(256) > 80.0, "{}", even.entropy(256));
    }

    #[test]
    fn the_histogram_keeps_its_counts_as_its_range_grows() {
        let mut h = Histogram::new();
        let small: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        h.add(&small);
        h.add(&[100.0]);
        assert_eq!(h.counts.iter().sum::<u64>(), 10_001);
        assert_eq!(h.max, 100.0);
        // 99.9% of the values are below 1; the outlier does not set the range.
        let p = h.percentile(99.9);
        assert!((0.99..=1.2).contains(&p), "{p}");
        assert_eq!(h.percentile(100.0), 100.0);
    }
}
