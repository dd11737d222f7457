//! Conversions between the callers' NCHW and the engine's NHWC, and per-channel means.

/// NCHW input -> NHWC, into `out` (`n * c * h * w` values).
pub(crate) fn nchw_to_nhwc(input: &[f32], c: usize, h: usize, w: usize, out: &mut [f32]) {
    let image = c * h * w;
    for (pixels, planes) in out.chunks_exact_mut(image).zip(input.chunks_exact(image)) {
        if c == 3 {
            // RGB, nearly every model's case: the three planes zipped, so that the loop has
            // no index to check and writes the output once, in order.
            let (red, rest) = planes.split_at(h * w);
            let (green, blue) = rest.split_at(h * w);
            let rgb = red.iter().zip(green).zip(blue);
            for (pixel, ((&r, &g), &b)) in pixels.chunks_exact_mut(3).zip(rgb) {
                pixel.copy_from_slice(&[r, g, b]);
            }
            continue;
        }
        for (ch, plane) in planes.chunks_exact(h * w).enumerate() {
            for (pixel, &value) in pixels.chunks_exact_mut(c).zip(plane) {
                pixel[ch] = value;
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
        // RGB (its own loop) and two other channel counts.
        for c in [3, 1, 4] {
            let (n, h, w) = (2, 2, 5);
            let nchw: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
            let mut nhwc = vec![f32::NAN; nchw.len()];
            nchw_to_nhwc(&nchw, c, h, w, &mut nhwc);
            // Image 1, channel c - 1, pixel (1, 3): ((1 * h + 1) * w + 3) * c + c - 1 in NHWC.
            assert_eq!(
                nhwc[((h + 1) * w + 3) * c + c - 1],
                nchw[((c + c - 1) * h + 1) * w + 3]
            );
            assert_eq!(nhwc_to_nchw(&nhwc, n, h, w), nchw);
        }
        let (c, h, w) = (3, 2, 5);
        let nchw: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let mut nhwc = vec![0.0; nchw.len()];
        nchw_to_nhwc(&nchw, c, h, w, &mut nhwc);
        let mut means = vec![0.0; c];
        channel_means_into(&nhwc[..c * h * w], &mut means);
        let want: Vec<f32> = (0..c)
            .map(|ch| (0..h * w).map(|p| nchw[ch * h * w + p]).sum::<f32>() / (h * w) as f32)
            .collect();
        assert_eq!(means, want);
    }
}
