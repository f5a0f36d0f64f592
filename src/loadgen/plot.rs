//! `--plot FILE.svg`: the latency-percentile plot of a run (plotters, SVG backend). The x axis
//! is the percentile on the log scale of 1/(1-p), so 90 %, 99 %, 99.9 % and 99.99 % are evenly
//! spaced and the tail gets the room it deserves; the y axis is milliseconds; one line per
//! operation (and one for the baseline when there is one).

use std::path::Path;

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// The x axis ends at 99.999 %: 1/(1-p) = 10^5.
const DECADES: f64 = 5.0;
/// Points per line.
const STEPS: u32 = 200;

/// The percentile label of an x position (`log10(1/(1-p))`).
fn percentile_label(x: f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as i64 - 2).max(0) as usize;
    format!("{percentile:.digits$}%")
}

/// Writes the plot of `series` (name, latencies in microseconds) to `path`.
pub fn write(path: &Path, series: &[(String, &Histogram<u64>)]) -> Result<()> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|(_, histogram)| !histogram.is_empty())
        .map(|(name, histogram)| {
            let points = (0..=STEPS)
                .map(|step| {
                    let x = DECADES * f64::from(step) / f64::from(STEPS);
                    let quantile = 1.0 - 10f64.powf(-x);
                    (x, histogram.value_at_quantile(quantile) as f64 / 1000.0)
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let draw = |error: &dyn std::fmt::Display| anyhow!("drawing {}: {error}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..DECADES, 0f64..top)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(DECADES as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(|e| draw(&e))?;
    for (index, (name, points)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_axis_labels_name_the_percentiles() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
    }
}
