//! Classification metrics from logits: framework-free, shared by training and `repvgg eval`.

/// Everything `repvgg eval` reports about one pass over a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub classes: usize,
    pub count: usize,
    /// Mean cross-entropy (no smoothing).
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub predictions: Vec<usize>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// From row-major logits `(n, classes)` and the true labels.
    pub fn from_logits(logits: &[f32], labels: &[usize], classes: usize) -> Evaluation {
        let n = labels.len();
        assert_eq!(logits.len(), n * classes, "logits and labels disagree");
        let mut loss = 0.0;
        let (mut top1, mut top5) = (0usize, 0usize);
        let mut predictions = Vec::with_capacity(n);
        let mut confusion = vec![vec![0usize; classes]; classes];
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_sum = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            loss += log_sum - row[label] as f64;
            let predicted = argmax(row);
            predictions.push(predicted);
            confusion[label][predicted] += 1;
            top1 += (predicted == label) as usize;
            // Rank of the true class: how many classes score strictly higher.
            let higher = row.iter().filter(|&&v| v > row[label]).count();
            top5 += (higher < 5) as usize;
        }
        let per = |k: usize| k as f64 / n.max(1) as f64;
        Evaluation {
            classes,
            count: n,
            loss: loss / n.max(1) as f64,
            top1: per(top1),
            top5: per(top5),
            predictions,
            confusion,
        }
    }

    /// Accuracy of each class (NaN for a class with no samples).
    pub fn per_class(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(k, row)| row[k] as f64 / row.iter().sum::<usize>() as f64)
            .collect()
    }
}

/// Index of the largest value (the first, on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (k, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = k;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top1_top5_and_confusion() {
        // Three samples, 6 classes: right, second-best, sixth-best.
        let logits = [
            [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 5.0, 0.5, 0.0, 0.0, 0.0],
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        ]
        .concat();
        let e = Evaluation::from_logits(&logits, &[0, 2, 0], 6);
        assert_eq!(e.predictions, vec![0, 1, 5]);
        assert!((e.top1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((e.top5 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.confusion[2][1], 1);
        assert_eq!(e.per_class()[0], 0.5);
        let ce0 = (5f64.exp() + 1f64.exp() + 4.0).ln() - 5.0;
        assert!(e.loss > ce0 / 3.0);
    }
}
