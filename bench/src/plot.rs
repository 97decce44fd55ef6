//! Line plots of the benchmarks, drawn with `plotters` into SVG files.
//!
//! Every plot carries the date its figures were taken (in the title) and one colour per
//! series (`Palette99`: no colour is reused below 99 series). A benchmark with a headline
//! ratio (USM / kernel) passes it as a [`Headline`]: it is drawn in a panel of its own under
//! the lines, with its goal as a grey line, so the figure the README quotes is on the plot.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One line of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points (x, y), in x order.
    pub points: Vec<(f64, f64)>,
}

/// The headline ratio of a benchmark, plotted under its lines.
#[derive(Debug, Clone)]
pub struct Headline {
    /// Y axis label, e.g. `"(c)/(a) CPU throughput"`.
    pub y_label: String,
    /// The ratio's lines (same x axis as the plot).
    pub series: Vec<Series>,
    /// The goal the issue sets (drawn as a grey line), if any.
    pub goal: Option<f64>,
}

/// A line plot.
#[derive(Debug, Clone)]
pub struct LinePlot {
    /// Title above the plot (the date is appended).
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// When the figures were taken, e.g. `2026-12-07 12:10 UTC` ([`crate::report::now_utc`]).
    pub date: String,
    /// The headline ratio, in a panel of its own.
    pub headline: Option<Headline>,
}

/// The bounds of every finite point: (x0, x1, y0, y1), never empty.
fn bounds(series: &[Series], extra_y: Option<f64>) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (0.0f64, f64::NEG_INFINITY);
    for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if let Some(g) = extra_y {
        y1 = y1.max(g);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if !y1.is_finite() || y1 <= y0 {
        y1 = y0 + 1.0;
    }
    (x0, x1, y0, y1 * 1.08)
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io("draw plot", path, std::io::Error::other(e.to_string()))
}

/// Draws `series` (colours from `first_colour` on) into `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    path: &Path,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    first_colour: usize,
    goal: Option<f64>,
) -> Result<()> {
    let (x0, x1, y0, y1) = bounds(series, goal);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    if let Some(g) = goal {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new([(x0, g), (x1, g)], grey.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?
            .label(format!("goal {g}×"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(2)));
    }
    for (i, s) in series.iter().enumerate() {
        let colour = Palette99::pick(first_colour + i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(path, e))?;
    Ok(())
}

impl LinePlot {
    /// Writes the plot as an SVG file to `path` (its directory is created if missing).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("mkdir", parent, e))?;
        }
        let height = if self.headline.is_some() { 820 } else { 520 };
        let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
        let title = format!("{} — {}", self.title, self.date);
        let root = root
            .titled(&title, ("sans-serif", 20))
            .map_err(|e| draw_err(path, e))?;
        match &self.headline {
            None => draw_panel(
                &root,
                path,
                &self.x_label,
                &self.y_label,
                &self.series,
                0,
                None,
            )?,
            Some(h) => {
                let (top, bottom) = root.split_vertically(height * 3 / 5);
                draw_panel(
                    &top,
                    path,
                    &self.x_label,
                    &self.y_label,
                    &self.series,
                    0,
                    None,
                )?;
                draw_panel(
                    &bottom,
                    path,
                    &self.x_label,
                    &h.y_label,
                    &h.series,
                    self.series.len(),
                    h.goal,
                )?;
            }
        }
        root.present().map_err(|e| draw_err(path, e))
    }
}
