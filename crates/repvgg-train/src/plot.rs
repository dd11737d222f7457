//! The loss and accuracy curves as a PNG, drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

use crate::{EpochRecord, TrainError};

/// Finds a TrueType font on this machine for plotters' `ab_glyph` text. Without one the
/// curves are still drawn, unlabelled.
fn register_font() -> bool {
    use std::sync::OnceLock;
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        candidates.iter().any(|path| {
            std::fs::read(path).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// Epochs are whole: a tick between two of them gets no label, a tick on one its number.
pub fn epoch_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 && x >= 1.0 {
        format!("{}", x.round() as u64)
    } else {
        String::new()
    }
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    epochs: f64,
    text: bool,
) -> Result<(), DrawingError> {
    let err = |e: &dyn std::fmt::Display| DrawingError(e.to_string());
    let points = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(12)
        .x_label_area_size(if text { 35 } else { 5 });
    builder.y_label_area_size(if text { 55 } else { 5 });
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0.5..epochs.max(1.0) + 0.5, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    {
        let mut mesh = chart.configure_mesh();
        let label = |x: &f64| epoch_label(*x);
        mesh.x_desc("epoch")
            .x_labels((epochs as usize).clamp(1, 10) + 1)
            .x_label_formatter(&label);
        if !text {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| err(&e))?;
    }
    for (name, color, data) in series {
        chart
            .draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
        let drawn = chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if text {
            let color = *color;
            drawn
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    Ok(())
}

/// Loss (left) and accuracy (right) per epoch, train and validation, written atomically.
pub fn draw_curves(path: &Path, history: &[EpochRecord]) -> Result<(), TrainError> {
    let fail = |problem: String| crate::trainer::file_error(path, problem);
    const SIZE: (u32, u32) = (1100, 450);
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw(&mut pixels, SIZE, history).map_err(|e| fail(e.to_string()))?;
    let mut png = Vec::new();
    image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels)
        .expect("buffer matches the size")
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(format!("cannot encode the plot: {e}")))?;
    Ok(repvgg_checkpoint::write_atomically(path, &png)?)
}

/// What plotters reports, as text: its error types are generic over the backend.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the plot: {0}")]
struct DrawingError(String);

fn draw(pixels: &mut [u8], size: (u32, u32), history: &[EpochRecord]) -> Result<(), DrawingError> {
    let text = register_font();
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| DrawingError(e.to_string()))?;
    let (left, right) = root.split_horizontally(size.0 / 2);
    let at = |f: fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        history.iter().map(|r| (r.epoch as f64, f(r))).collect()
    };
    let epochs = history.last().map_or(1.0, |r| r.epoch as f64);
    panel(
        &left,
        "loss",
        &[
            ("train (smoothed targets)", BLUE, at(|r| r.train_loss)),
            ("validation", RED, at(|r| r.val_loss)),
        ],
        epochs,
        text,
    )?;
    panel(
        &right,
        "top-1 accuracy",
        &[
            ("train", BLUE, at(|r| r.train_acc)),
            ("validation", RED, at(|r| r.val_acc)),
        ],
        epochs,
        text,
    )?;
    root.present().map_err(|e| DrawingError(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn epoch_ticks_are_whole_numbers() {
        assert_eq!(super::epoch_label(3.0), "3");
        assert_eq!(super::epoch_label(2.5), "");
        assert_eq!(super::epoch_label(0.5), "");
        assert_eq!(super::epoch_label(12.000000000001), "12");
    }
}
