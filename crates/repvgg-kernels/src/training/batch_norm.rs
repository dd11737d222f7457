//! Batch norm with batch statistics, and its gradients, over NCHW batches: the training
//! form's batch norms, which `repvgg-burn` runs as custom burn operations because burn's CPU
//! version (and its backward pass) permutes and copies its input several times.

use rayon::prelude::*;

use super::{ShapeError, check_len};

/// Per channel of an NCHW batch: mean and biased variance over (image, pixel), as
/// `[means..., variances...]`. Sums run in f64, so `E[x^2] - mean^2` loses nothing that
/// matters at f32.
pub fn channel_stats(input: &[f32], batch: usize, channels: usize) -> Result<Vec<f32>, ShapeError> {
    let plane = plane_len(input.len(), batch, channels)?;
    let count = (batch * plane) as f64;
    let sums: Vec<(f64, f64, f64)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            // Sums of x - shift, with shift one of the channel's values, so that the
            // variance does not come from the difference of two large numbers.
            let shift = input.get(c * plane).copied().unwrap_or(0.0);
            let (mut sum, mut squares) = (0.0f64, 0.0f64);
            for n in 0..batch {
                let x = &input[(n * channels + c) * plane..][..plane];
                let (s, q) = paired_sums(x, x, |v, _| v - shift, |v, _| (v - shift) * (v - shift));
                sum += s;
                squares += q;
            }
            (shift as f64, sum, squares)
        })
        .collect();
    let count = count.max(1.0);
    let mean = sums.iter().map(|&(shift, s, _)| shift + s / count);
    let var = sums
        .iter()
        .map(|&(_, s, q)| (q / count - (s / count).powi(2)).max(0.0));
    Ok(mean.chain(var).map(|v| v as f32).collect())
}

/// The gradients of a batch norm with respect to its input, gamma and beta.
pub type Gradients = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Batch norm with given batch statistics (from [`channel_stats`]):
/// `y = (x - mean) / sqrt(var + eps) * gamma + beta`, per channel.
pub fn batch_norm(
    input: &[f32],
    batch: usize,
    stats: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Result<Vec<f32>, ShapeError> {
    let channels = gamma.len();
    let plane = plane_len(input.len(), batch, channels)?;
    check_len("batch statistics", stats.len(), 2 * channels)?;
    check_len("beta", beta.len(), channels)?;
    let mut out = vec![0.0f32; input.len()];
    if plane == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(plane)
        .zip(input.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let c = i % channels;
            let inv_std = inv_std(stats, channels, c, eps);
            let scale = (gamma[c] as f64 * inv_std) as f32;
            let shift = (beta[c] as f64 - stats[c] as f64 * gamma[c] as f64 * inv_std) as f32;
            out.iter_mut()
                .zip(x)
                .for_each(|(o, &v)| *o = v * scale + shift);
        });
    Ok(out)
}

/// The gradients of [`batch_norm`] with respect to x, gamma and beta, the batch statistics'
/// dependence on x included: with `xhat = (x - mean) / std` and M values per channel,
/// `dbeta = sum dy`, `dgamma = sum dy xhat`,
/// `dx = gamma / std / M (M dy - dbeta - xhat dgamma)`.
pub fn batch_norm_grad(
    input: &[f32],
    batch: usize,
    stats: &[f32],
    gamma: &[f32],
    eps: f64,
    out_grad: &[f32],
) -> Result<Gradients, ShapeError> {
    let channels = gamma.len();
    let plane = plane_len(input.len(), batch, channels)?;
    check_len("batch statistics", stats.len(), 2 * channels)?;
    check_len("output gradient", out_grad.len(), input.len())?;
    let count = (batch * plane) as f64;
    let planes = |c: usize| {
        (0..batch).map(move |n| (n * channels + c) * plane..(n * channels + c + 1) * plane)
    };
    // Per channel: (sum dy, sum dy xhat).
    let sums: Vec<(f64, f64)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let (mean, inv_std) = (stats[c], inv_std(stats, channels, c, eps));
            let (mut dy_sum, mut dy_x) = (0.0f64, 0.0f64);
            for range in planes(c) {
                let (s, sx) = paired_sums(
                    &out_grad[range.clone()],
                    &input[range],
                    |dy, _| dy,
                    |dy, x| dy * (x - mean),
                );
                dy_sum += s;
                dy_x += sx;
            }
            (dy_sum, dy_x * inv_std)
        })
        .collect();
    let mut dx = vec![0.0f32; input.len()];
    if plane > 0 {
        dx.par_chunks_mut(plane).enumerate().for_each(|(i, dx)| {
            let c = i % channels;
            let (dbeta, dgamma) = sums[c];
            let inv_std = inv_std(stats, channels, c, eps);
            let scale = gamma[c] as f64 * inv_std / count;
            // dx = a dy + b x + d, per channel.
            let a = (scale * count) as f32;
            let b = (-scale * dgamma * inv_std) as f32;
            let d = (-scale * dbeta + scale * dgamma * inv_std * stats[c] as f64) as f32;
            let range = i * plane..(i + 1) * plane;
            for ((dx, &dy), &x) in dx
                .iter_mut()
                .zip(&out_grad[range.clone()])
                .zip(&input[range])
            {
                *dx = a * dy + b * x + d;
            }
        });
    }
    let dgamma = sums.iter().map(|&(_, g)| g as f32).collect();
    let dbeta = sums.iter().map(|&(b, _)| b as f32).collect();
    Ok((dx, dgamma, dbeta))
}

/// `1 / sqrt(var + eps)` of channel c, from [`channel_stats`]' `[means..., variances...]`.
fn inv_std(stats: &[f32], channels: usize, c: usize, eps: f64) -> f64 {
    1.0 / (stats[channels + c] as f64 + eps).sqrt()
}

/// Values per (image, channel) plane; 0 for an empty batch.
fn plane_len(len: usize, batch: usize, channels: usize) -> Result<usize, ShapeError> {
    let planes = batch.saturating_mul(channels);
    if planes == 0 {
        check_len("an empty batch", len, 0)?;
        return Ok(0);
    }
    if !len.is_multiple_of(planes) {
        return Err(ShapeError(format!(
            "{len} values do not make {batch} images of {channels} channels"
        )));
    }
    Ok(len / planes)
}

/// `(sum f(a, b), sum g(a, b))` over two equal-length slices, in 8 f32 lanes (so it
/// vectorises) added up in f64.
fn paired_sums(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32,
    g: impl Fn(f32, f32) -> f32,
) -> (f64, f64) {
    let (mut first, mut second) = ([0.0f32; 8], [0.0f32; 8]);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            first[i] += f(x[i], y[i]);
            second[i] += g(x[i], y[i]);
        }
    }
    let mut s: f64 = first.iter().map(|&v| v as f64).sum();
    let mut q: f64 = second.iter().map(|&v| v as f64).sum();
    for (&x, &y) in ta.iter().zip(tb) {
        s += f(x, y) as f64;
        q += g(x, y) as f64;
    }
    (s, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per channel, against the definitions in f64: mean, biased variance, the normalised
    /// output and its three gradients (the batch statistics' dependence on x included),
    /// within 1e-5 of each quantity's largest magnitude (f32 sums of a few hundred terms).
    #[test]
    fn matches_the_definitions_in_f64() {
        let (batch, channels, plane) = (3, 4, 37);
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 250.0 - 1.5;
        let x: Vec<f32> = (0..batch * channels * plane).map(value).collect();
        let dy: Vec<f32> = (0..x.len()).map(|i| value(i * 31 + 5)).collect();
        let gamma = [0.5f32, -1.25, 2.0, 1.0];
        let beta = [0.1f32, 0.0, -0.3, 2.0];
        let eps = 1e-5;
        let stats = channel_stats(&x, batch, channels).unwrap();
        let y = batch_norm(&x, batch, &stats, &gamma, &beta, eps).unwrap();
        let (dx, dgamma, dbeta) = batch_norm_grad(&x, batch, &stats, &gamma, eps, &dy).unwrap();
        let m = (batch * plane) as f64;
        for c in 0..channels {
            let at = |n: usize, p: usize| (n * channels + c) * plane + p;
            let all = || (0..batch).flat_map(|n| (0..plane).map(move |p| (n, p)));
            let mean = all().map(|(n, p)| x[at(n, p)] as f64).sum::<f64>() / m;
            let var = all()
                .map(|(n, p)| (x[at(n, p)] as f64 - mean).powi(2))
                .sum::<f64>()
                / m;
            let std = (var + eps).sqrt();
            let xhat = |n: usize, p: usize| (x[at(n, p)] as f64 - mean) / std;
            let want_dbeta: f64 = all().map(|(n, p)| dy[at(n, p)] as f64).sum();
            let want_dgamma: f64 = all().map(|(n, p)| dy[at(n, p)] as f64 * xhat(n, p)).sum();
            let close = |got: f32, want: f64, scale: f64| {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * scale.max(1.0),
                    "channel {c}: {got} against {want}"
                )
            };
            close(stats[c], mean, mean.abs());
            close(stats[channels + c], var, var);
            close(dbeta[c], want_dbeta, want_dbeta.abs());
            close(dgamma[c], want_dgamma, want_dgamma.abs());
            for (n, p) in all() {
                let g = gamma[c] as f64;
                close(y[at(n, p)], g * xhat(n, p) + beta[c] as f64, 4.0);
                let want_dx =
                    g / std / m * (m * dy[at(n, p)] as f64 - want_dbeta - xhat(n, p) * want_dgamma);
                close(dx[at(n, p)], want_dx, 4.0);
            }
        }
    }

    #[test]
    fn an_empty_batch_gives_no_outputs_and_zero_parameter_gradients() {
        let stats = channel_stats(&[], 0, 4).unwrap();
        let (gamma, beta) = (vec![1.0; 4], vec![0.0; 4]);
        assert!(
            batch_norm(&[], 0, &stats, &gamma, &beta, 1e-5)
                .unwrap()
                .is_empty()
        );
        let (dx, dgamma, dbeta) = batch_norm_grad(&[], 0, &stats, &gamma, 1e-5, &[]).unwrap();
        assert!(dx.is_empty());
        assert_eq!((dgamma, dbeta), (vec![0.0; 4], vec![0.0; 4]));
    }
}
