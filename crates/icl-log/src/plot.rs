//! PNG line plots of metrics against the training step, drawn without any system font.
//!
//! Text uses the public-domain 8x8 bitmap font of the `font8x8` crate, so a plot renders the same on a
//! bare machine. Lines are anti-aliased by pen coverage; axes get "nice" ticks (1, 2, 5 x 10^k), and a
//! positive series spanning more than two decades (perplexity early in training) is drawn on a log
//! scale, which the axis label says.

use crate::{Error, Result};
use std::path::Path;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];
const LINE: Rgb = [31, 119, 180];

/// What a plot shows and how large it is.
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// Pixels of one panel.
    pub width: u32,
    pub height: u32,
    pub x_label: String,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self { width: 640, height: 400, x_label: "step".to_owned() }
    }
}

/// One panel: a title and `(step, value)` points, with optional `(step, standard error)` drawn as
/// error bars `value ± se` at the points of the same step (empty: none). Non-finite values are left
/// out of the drawing.
#[derive(Debug, Clone, Copy)]
pub struct Panel<'a> {
    pub title: &'a str,
    pub points: &'a [(i64, f64)],
    pub errors: &'a [(i64, f64)],
}

impl<'a> Panel<'a> {
    /// A panel without error bars.
    pub fn new(title: &'a str, points: &'a [(i64, f64)]) -> Self {
        Self { title, points, errors: &[] }
    }
}

/// Writes one panel as a PNG.
pub fn plot_png(path: &Path, panel: Panel<'_>, options: &PlotOptions) -> Result<()> {
    plot_grid_png(path, &[panel], 1, options)
}

/// Writes several panels side by side, `columns` per row, as one PNG.
pub fn plot_grid_png(path: &Path, panels: &[Panel<'_>], columns: usize, options: &PlotOptions) -> Result<()> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (w, h) = (options.width as usize, options.height as usize);
    if w < 200 || h < 150 {
        return Err(Error::Plot { path: path.to_owned(), message: format!("panel {w}x{h} is below 200x150 pixels") });
    }
    let mut canvas = Canvas::new(w * columns, h * rows);
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut canvas, (i % columns) * w, (i / columns) * h, w, h, panel, &options.x_label);
    }
    canvas.write_png(path)
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: vec![WHITE; width * height] }
    }

    /// Mixes `color` into pixel (x, y) with opacity `alpha` in [0, 1]; outside the canvas is ignored.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height || alpha <= 0.0 {
            return;
        }
        let pixel = &mut self.pixels[y as usize * self.width + x as usize];
        let a = alpha.min(1.0);
        for (channel, &target) in pixel.iter_mut().zip(&color) {
            *channel = (f64::from(*channel) * (1.0 - a) + f64::from(target) * a).round() as u8;
        }
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.blend(xx, yy, color, 1.0);
            }
        }
    }

    /// A segment drawn with a round pen of `radius` pixels: each pixel takes the pen's coverage at its
    /// nearest point of the segment, so joints and slopes come out smooth.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), radius: f64, color: Rgb) {
        let (dx, dy) = (x1 - x0, y1 - y0);
        let length_sq = dx * dx + dy * dy;
        let pad = radius + 1.0;
        let (left, right) = ((x0.min(x1) - pad).floor() as i64, (x0.max(x1) + pad).ceil() as i64);
        let (top, bottom) = ((y0.min(y1) - pad).floor() as i64, (y0.max(y1) + pad).ceil() as i64);
        for y in top..=bottom {
            for x in left..=right {
                let (px, py) = (x as f64, y as f64);
                let t = if length_sq == 0.0 {
                    0.0
                } else {
                    (((px - x0) * dx + (py - y0) * dy) / length_sq).clamp(0.0, 1.0)
                };
                let distance = ((px - x0 - t * dx).powi(2) + (py - y0 - t * dy).powi(2)).sqrt();
                let coverage = (radius + 0.5 - distance).clamp(0.0, 1.0);
                self.blend(x, y, color, coverage);
            }
        }
    }

    /// Text with its top-left corner at (x, y); `scale` multiplies the 8x8 glyphs.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let glyph = glyph(c);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let gx = x + (i as i64 * 8 + col) * scale;
                        self.fill_rect(gx, y + row as i64 * scale, scale, scale, color);
                    }
                }
            }
        }
    }

    /// Text turned 90 degrees counter-clockwise (reading bottom to top), its bottom-left corner at (x, y).
    fn text_vertical(&mut self, x: i64, y: i64, text: &str, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..8i64 {
                    if bits & (1 << col) != 0 {
                        self.blend(x + row as i64, y - i as i64 * 8 - col, color, 1.0);
                    }
                }
            }
        }
    }

    fn write_png(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let encoding = |e: png::EncodingError| Error::Plot { path: path.to_owned(), message: e.to_string() };
        // Written next to the target and renamed, so a reader never sees half a PNG.
        let partial = path.with_extension("png.partial");
        let file = std::fs::File::create(&partial).map_err(io)?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encoding)?;
        let data: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        writer.write_image_data(&data).map_err(encoding)?;
        writer.finish().map_err(encoding)?;
        std::fs::rename(&partial, path).map_err(io)
    }
}

fn glyph(c: char) -> [u8; 8] {
    let code = c as usize;
    if code < 128 {
        font8x8::legacy::BASIC_LEGACY[code]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 8 * scale
}

/// A value axis: linear or base-10 logarithmic.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn fraction(&self, value: f64) -> f64 {
        let (v, lo, hi) =
            if self.log { (value.log10(), self.lo.log10(), self.hi.log10()) } else { (value, self.lo, self.hi) };
        (v - lo) / (hi - lo)
    }

    /// Tick values inside the axis, about `target` of them.
    fn ticks(&self, target: usize) -> Vec<f64> {
        if self.log {
            let (lo, hi) = (self.lo.log10().floor() as i32, self.hi.log10().ceil() as i32);
            let decades = (hi - lo).max(1) as usize;
            // 1, 2, 5 per decade while that stays near `target` ticks; powers of ten alone beyond.
            let multipliers: &[f64] = if decades * 3 <= target + 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
            let mut ticks = Vec::new();
            for e in lo..=hi {
                for m in multipliers {
                    let v = m * 10f64.powi(e);
                    if v >= self.lo * (1.0 - 1e-9) && v <= self.hi * (1.0 + 1e-9) {
                        ticks.push(v);
                    }
                }
            }
            return ticks;
        }
        let step = nice_step((self.hi - self.lo) / target.max(1) as f64);
        let first = (self.lo / step).ceil() as i64;
        let last = (self.hi / step).floor() as i64;
        (first..=last).map(|k| k as f64 * step).collect()
    }
}

/// The smallest 1, 2 or 5 x 10^k at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&s| s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * magnitude)
}

/// Tick label: as few decimals as the spacing needs, or scientific when the axis reaches very large
/// or very small values (`scientific`, decided once per axis so its labels share one style).
fn format_tick(value: f64, spacing: f64, scientific: bool) -> String {
    if scientific {
        return if value == 0.0 { "0".to_owned() } else { format!("{value:.1e}") };
    }
    let decimals = if spacing > 0.0 { (-spacing.log10().floor()).clamp(0.0, 6.0) as usize } else { 2 };
    format!("{value:.decimals$}")
}

/// Whether an axis with these ticks is labelled in scientific notation.
fn needs_scientific(ticks: &[f64]) -> bool {
    ticks.iter().any(|t| *t != 0.0 && !(1e-3..1e5).contains(&t.abs()))
}

/// Lower and upper bounds that include every value, with a margin; never an empty range.
fn range(values: impl Iterator<Item = f64> + Clone) -> Option<(f64, f64)> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    if hi > lo {
        Some((lo, hi))
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        Some((lo - pad, hi + pad))
    }
}

fn draw_panel(canvas: &mut Canvas, x0: usize, y0: usize, w: usize, h: usize, panel: &Panel<'_>, x_label: &str) {
    let (x0, y0, w, h) = (x0 as i64, y0 as i64, w as i64, h as i64);
    let title_scale = if text_width(panel.title, 2) <= w - 20 { 2 } else { 1 };
    canvas.text(x0 + (w - text_width(panel.title, title_scale)) / 2, y0 + 8, panel.title, title_scale, INK);
    // Plot area: room for y tick labels and the vertical y label on the left, x ticks and label below.
    let (left, right, top, bottom) = (x0 + 92, x0 + w - 20, y0 + 36, y0 + h - 44);
    let points: Vec<(f64, f64)> =
        panel.points.iter().filter(|(_, v)| v.is_finite()).map(|&(s, v)| (s as f64, v)).collect();
    // Error bars `(step, low, high)` where a point of the same step has a finite standard error; a
    // bar reaching zero or below on a positive series is cut at its lowest value.
    let positive = points.iter().all(|p| p.1 > 0.0);
    let bars: Vec<(f64, f64, f64)> = panel
        .errors
        .iter()
        .filter(|(_, se)| se.is_finite() && *se > 0.0)
        .filter_map(|&(step, se)| {
            let &(x, v) = points.iter().find(|p| p.0 == step as f64)?;
            let low = if positive && v - se <= 0.0 { v } else { v - se };
            Some((x, low, v + se))
        })
        .collect();
    let y_values = points.iter().map(|p| p.1).chain(bars.iter().flat_map(|b| [b.1, b.2]));
    let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (range(points.iter().map(|p| p.0)), range(y_values)) else {
        canvas.text(x0 + w / 2 - 28, y0 + h / 2, "no data", 1, INK);
        return;
    };
    let log = y_lo > 0.0 && y_hi / y_lo > 100.0;
    let y_axis = if log {
        Axis { lo: y_lo, hi: y_hi, log }
    } else {
        let pad = (y_hi - y_lo) * 0.05;
        Axis { lo: y_lo - pad, hi: y_hi + pad, log }
    };
    let x_axis = Axis { lo: x_lo, hi: x_hi, log: false };
    let to_px = |x: f64, y: f64| -> (f64, f64) {
        (
            left as f64 + x_axis.fraction(x) * (right - left) as f64,
            bottom as f64 - y_axis.fraction(y) * (bottom - top) as f64,
        )
    };

    let y_ticks = y_axis.ticks(6);
    let y_spacing = if y_ticks.len() > 1 { y_ticks[1] - y_ticks[0] } else { y_axis.hi - y_axis.lo };
    let y_scientific = needs_scientific(&y_ticks);
    for &tick in &y_ticks {
        let y = to_px(x_lo, tick).1.round() as i64;
        canvas.fill_rect(left, y, right - left, 1, GRID);
        let label = format_tick(tick, if log { tick } else { y_spacing }, y_scientific);
        canvas.text(left - 6 - text_width(&label, 1), y - 4, &label, 1, INK);
    }
    let x_ticks = x_axis.ticks(((right - left) / 70).max(2) as usize);
    let x_scientific = needs_scientific(&x_ticks);
    let x_spacing = if x_ticks.len() > 1 { x_ticks[1] - x_ticks[0] } else { 1.0 };
    for &tick in &x_ticks {
        let x = to_px(tick, y_axis.lo).0.round() as i64;
        canvas.fill_rect(x, top, 1, bottom - top, GRID);
        canvas.fill_rect(x, bottom, 1, 5, INK);
        let label = format_tick(tick, x_spacing.max(1.0), x_scientific);
        canvas.text(x - text_width(&label, 1) / 2, bottom + 9, &label, 1, INK);
    }
    canvas.fill_rect(left, top, 1, bottom - top + 1, INK);
    canvas.fill_rect(left, bottom, right - left + 1, 1, INK);
    canvas.text(left + (right - left - text_width(x_label, 1)) / 2, bottom + 26, x_label, 1, INK);
    let y_label = if log { "value (log scale)" } else { "value" };
    canvas.text_vertical(x0 + 8, (top + bottom) / 2 + text_width(y_label, 1) / 2, y_label, INK);

    for &(x, low, high) in &bars {
        let ((px, top_px), (_, bottom_px)) = (to_px(x, high), to_px(x, low));
        canvas.line((px, top_px), (px, bottom_px), 0.6, LINE);
        canvas.line((px - 3.0, top_px), (px + 3.0, top_px), 0.6, LINE);
        canvas.line((px - 3.0, bottom_px), (px + 3.0, bottom_px), 0.6, LINE);
    }
    let pixels: Vec<(f64, f64)> = points.iter().map(|&(x, y)| to_px(x, y)).collect();
    for pair in pixels.windows(2) {
        canvas.line(pair[0], pair[1], 1.0, LINE);
    }
    // Markers where points are sparse enough to be told apart (evaluations every N steps).
    if pixels.len() == 1 || (right - left) as f64 / pixels.len() as f64 >= 8.0 {
        for &p in &pixels {
            canvas.line(p, p, 2.5, LINE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_five() {
        assert_eq!(nice_step(0.13), 0.2);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(100.0), 100.0);
        let axis = Axis { lo: 0.0, hi: 1.0, log: false };
        assert_eq!(axis.ticks(5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
    }

    #[test]
    fn log_axis_ticks_are_powers_of_ten() {
        let axis = Axis { lo: 3.0, hi: 40_000.0, log: true };
        assert_eq!(axis.ticks(6), vec![10.0, 100.0, 1000.0, 10000.0]);
        assert!((axis.fraction(3.0)).abs() < 1e-12 && (axis.fraction(40_000.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn tick_labels_use_the_decimals_the_spacing_needs() {
        assert_eq!(format_tick(0.25, 0.05, false), "0.25");
        assert_eq!(format_tick(400.0, 100.0, false), "400");
        assert_eq!(format_tick(2.5e7, 1e7, true), "2.5e7");
        assert_eq!(format_tick(0.0, 1e7, true), "0");
        // One style per axis: 500000 next to 1.0e6 would read as a different scale.
        assert!(needs_scientific(&[5e5, 1e6, 1.5e6]) && !needs_scientific(&[0.0, 200.0, 400.0]));
    }

    #[test]
    fn a_constant_series_gets_a_non_empty_range() {
        assert_eq!(range([2.0, 2.0].into_iter()), Some((1.9, 2.1)));
        assert_eq!(range(std::iter::empty()), None);
    }

    #[test]
    fn error_bars_are_drawn_and_widen_the_range() {
        let points = [(0i64, 0.5), (100, 0.6), (200, 0.55)];
        let errors = [(0i64, 0.05), (100, 0.04), (200, f64::NAN), (300, 0.1)];
        let blue = |panel: &Panel<'_>| {
            let mut canvas = Canvas::new(400, 300);
            draw_panel(&mut canvas, 0, 0, 400, 300, panel, "step");
            canvas.pixels.iter().filter(|p| p[2] > 150 && p[0] < 80).count()
        };
        let plain = blue(&Panel::new("acc", &points));
        let with_bars = blue(&Panel { title: "acc", points: &points, errors: &errors });
        // Two bars (the NaN one and the one without a point are left out), each about 60 px tall.
        assert!(with_bars > plain + 60, "{plain} curve pixels, {with_bars} with error bars");
    }
}
