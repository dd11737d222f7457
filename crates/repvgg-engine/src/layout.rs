//! Conversions between the callers' NCHW and the engine's NHWC, and per-channel means.

/// NCHW input -> NHWC, into `out` (grown if needed).
pub(crate) fn nchw_to_nhwc(
    input: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out: &mut Vec<f32>,
) {
    if out.len() < n * c * h * w {
        out.resize(n * c * h * w, 0.0);
    }
    // Pixel by pixel, so that the output is written once, in order (channel by channel, an
    // RGB image's output would be rewritten three times, at a stride of three values).
    let plane = h * w;
    for (image, pixels) in out[..n * c * plane].chunks_exact_mut(c * plane).enumerate() {
        let planes = &input[image * c * plane..(image + 1) * c * plane];
        for (p, pixel) in pixels.chunks_exact_mut(c).enumerate() {
            for (ch, value) in pixel.iter_mut().enumerate() {
                *value = planes[ch * plane + p];
            }
        }
    }
}

/// NHWC block output -> NCHW, for callers that compare with framework tensors.
pub fn nhwc_to_nchw(data: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let c = data.len().checked_div(n * h * w).unwrap_or(0);
    let mut out = vec![0.0; data.len()];
    for image in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                out[(image * c + ch) * h * w + p] = data[(image * h * w + p) * c + ch];
            }
        }
    }
    out
}

/// Per-channel means of one NHWC image, into `means` (one per channel).
pub(crate) fn channel_means_into(image: &[f32], means: &mut [f32]) {
    let c = means.len();
    let positions = image.len() / c;
    means.fill(0.0);
    for pixel in image.chunks_exact(c) {
        means.iter_mut().zip(pixel).for_each(|(s, v)| *s += v);
    }
    means.iter_mut().for_each(|s| *s /= positions as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_and_means_are_per_channel() {
        let (n, c, h, w) = (2, 3, 2, 5);
        let nchw: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
        let mut nhwc = Vec::new();
        nchw_to_nhwc(&nchw, n, c, h, w, &mut nhwc);
        // Image 1, channel 2, pixel (1, 3) sits at ((1 * h + 1) * w + 3) * c + 2 in NHWC.
        assert_eq!(
            nhwc[((h + 1) * w + 3) * c + 2],
            nchw[((c + 2) * h + 1) * w + 3]
        );
        assert_eq!(nhwc_to_nchw(&nhwc, n, h, w), nchw);
        let mut means = vec![0.0; c];
        channel_means_into(&nhwc[..c * h * w], &mut means);
        let want: Vec<f32> = (0..c)
            .map(|ch| (0..h * w).map(|p| nchw[ch * h * w + p]).sum::<f32>() / (h * w) as f32)
            .collect();
        assert_eq!(means, want);
    }
}
