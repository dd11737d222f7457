//! Cutting a range of work into pieces for threads: shared by the training convolutions and
//! the deploy engine's layer planner.

use std::ops::Range;

/// `n` rounded up to a multiple of `to`.
pub fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// `0..total` in at most `parts` non-empty ranges, each but the last a multiple of `align`.
pub fn split(total: usize, parts: usize, align: usize) -> Vec<Range<usize>> {
    if total == 0 {
        return Vec::new();
    }
    let size = round_up(total.div_ceil(parts.max(1)), align.max(1));
    (0..total)
        .step_by(size)
        .map(|start| start..(start + size).min(total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_range_in_aligned_pieces() {
        assert_eq!(split(10, 3, 1), vec![0..4, 4..8, 8..10]);
        assert_eq!(split(100, 3, 16), vec![0..48, 48..96, 96..100]);
        assert_eq!(split(5, 8, 1).len(), 5);
        assert!(split(0, 4, 1).is_empty());
        assert_eq!(round_up(17, 16), 32);
    }
}
