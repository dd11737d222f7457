//! The learning rate over a run: linear warm-up, then cosine decay to zero.

/// `lr(step)`: `base * (step + 1) / warmup` during warm-up, then
/// `base * (1 + cos(pi * t)) / 2` with `t` running from 0 to 1 over the remaining steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineWithWarmup {
    pub base: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl CosineWithWarmup {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_zero() {
        let s = CosineWithWarmup {
            base: 0.1,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-12);
        assert!(s.lr(109) < 1e-4 && s.lr(109) > 0.0);
        assert!((1..110).all(|k| k <= 10 || s.lr(k) <= s.lr(k - 1)));
    }
}
