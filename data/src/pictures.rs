//! Pictures of samples and of what the router does, as PNG files: a sample
//! grid ([`save_grid_png`]), the chunking visualisation ([`save_chunking_viz`])
//! and the per-step compression / time / FLOPs plot ([`save_compression_plot`]).
//!
//! Images are f32 in [-1, 1] (values outside are clamped), `(N, C, H, W)`:
//! one channel is drawn grey, three or more as RGB from the first three.
//! Text and plots are drawn with `plotters` (bitmap backend, the bundled
//! DejaVu Sans font through `ab_glyph`); files are encoded with `png`.
//!
//! ```
//! use dcdit_data::pictures::save_grid_png;
//! let path = std::env::temp_dir().join(format!("grid_doc_{}.png", std::process::id()));
//! // Two 4x4 greyscale images, one black, one white, 3 columns, upscaled 2x.
//! let mut x = vec![-1.0f32; 16];
//! x.extend([1.0f32; 16]);
//! save_grid_png(&path, &x, 2, 1, 4, 4, 3, 2).unwrap();
//! # std::fs::remove_file(&path).unwrap();
//! ```

use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (Bitstream Vera licence + public-domain DejaVu changes; see
/// `data/fonts/LICENSE`), registered with plotters as `sans-serif`.
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const GAP: usize = 2;
const GAP_COLOUR: [u8; 3] = [128, 128, 128];
/// Largest picture written, in pixels (guards against absurd arguments).
const MAX_PIXELS: usize = 1 << 27;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is bundled and known good; a failure would only lose text.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// An RGB8 image in memory.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, fill: [u8; 3]) -> Result<Canvas> {
        if w == 0 || h == 0 || w.saturating_mul(h) > MAX_PIXELS {
            return Err(Error::input(format!(
                "picture of {w}x{h} pixels is empty or too large"
            )));
        }
        let mut px = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            px.extend_from_slice(&fill);
        }
        Ok(Canvas { w, h, px })
    }

    fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.w && y < self.h {
            let o = (y * self.w + x) * 3;
            self.px[o..o + 3].copy_from_slice(&rgb);
        }
    }

    /// Draws a `(th, tw)` tile given by `colour(row, col)` at `(x0, y0)`, each
    /// source pixel as a `scale x scale` block.
    fn blit(
        &mut self,
        x0: usize,
        y0: usize,
        th: usize,
        tw: usize,
        scale: usize,
        colour: impl Fn(usize, usize) -> [u8; 3],
    ) {
        for r in 0..th {
            for c in 0..tw {
                let rgb = colour(r, c);
                for dy in 0..scale {
                    for dx in 0..scale {
                        self.put(x0 + c * scale + dx, y0 + r * scale + dy, rgb);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        write_png_rgb(path, &self.px, self.w as u32, self.h as u32)
    }
}

/// Writes an RGB8 buffer (`w * h * 3` bytes) as a PNG file.
pub fn write_png_rgb(path: impl AsRef<Path>, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    let path = path.as_ref();
    if rgb.len() != w as usize * h as usize * 3 {
        return Err(Error::input(format!(
            "{} bytes are not a {w}x{h} RGB image",
            rgb.len()
        )));
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, "create", e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let werr = |e: png::EncodingError| Error::Draw {
        path: path.to_path_buf(),
        msg: format!("png encoding: {e}"),
    };
    let mut writer = enc.write_header().map_err(werr)?;
    writer.write_image_data(rgb).map_err(werr)?;
    writer.finish().map_err(werr)
}

/// Maps [-1, 1] to 0..=255 (clamped; NaN becomes 0).
fn to_u8(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// The colour of pixel `(r, col)` of one `(C, H, W)` image.
fn pixel(img: &[f32], c: usize, h: usize, w: usize, r: usize, col: usize) -> [u8; 3] {
    let at = |ch: usize| to_u8(img[ch * h * w + r * w + col]);
    if c >= 3 {
        [at(0), at(1), at(2)]
    } else {
        let g = at(0);
        [g, g, g]
    }
}

fn check_channels(c: usize) -> Result<()> {
    if c == 1 || c >= 3 {
        Ok(())
    } else {
        Err(Error::input(format!(
            "{c} channels: pictures need 1 (grey) or at least 3 (RGB from the first 3)"
        )))
    }
}

/// Saves a grid of `n` images `(N, C, H, W)` in [-1, 1] as a PNG: `cols`
/// images per row, each upscaled `scale` times by nearest neighbour, with
/// 2-pixel grey gaps between and around them. `C` is 1 (grey) or at least 3
/// (the first three channels as RGB). The picture is
/// `cols' * (w * scale + 2) + 2` pixels wide, with `cols' = min(cols, n)`,
/// and `rows * (h * scale + 2) + 2` high, `rows = ceil(n / cols')`.
///
/// Errors when `images.len() != n * c * h * w`, a size is zero, `c == 2`, or
/// the file cannot be written.
#[allow(clippy::too_many_arguments)]
pub fn save_grid_png(
    path: impl AsRef<Path>,
    images: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cols: usize,
    scale: usize,
) -> Result<()> {
    let path = path.as_ref();
    if n == 0 || c == 0 || h == 0 || w == 0 || cols == 0 || scale == 0 {
        return Err(Error::input(format!(
            "grid of n={n} images c={c} h={h} w={w}, cols={cols}, scale={scale}: every size must be positive"
        )));
    }
    check_channels(c)?;
    let per = c * h * w;
    if Some(images.len()) != n.checked_mul(per) {
        return Err(Error::input(format!(
            "{} values are not {n} images of shape ({c}, {h}, {w})",
            images.len()
        )));
    }
    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    let (tw, th) = (w.saturating_mul(scale), h.saturating_mul(scale));
    let width = cols.saturating_mul(tw + GAP).saturating_add(GAP);
    let height = rows.saturating_mul(th + GAP).saturating_add(GAP);
    let mut canvas = Canvas::new(width, height, GAP_COLOUR)?;
    for i in 0..n {
        let img = &images[i * per..(i + 1) * per];
        let (gr, gc) = (i / cols, i % cols);
        canvas.blit(
            GAP + gc * (tw + GAP),
            GAP + gr * (th + GAP),
            h,
            w,
            scale,
            |r, col| pixel(img, c, h, w, r, col),
        );
    }
    canvas.save(path)
}

/// One column of the chunking visualisation: the noisy sample at a timestep
/// and the router's boundary probabilities for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkFrame {
    /// The timestep (0..=999).
    pub t: usize,
    /// `x_t` of one sample, `(C, H, W)`, in [-1, 1] (clamped when drawn).
    pub x_t: Vec<f32>,
    /// Height of `x_t`.
    pub h: usize,
    /// Width of `x_t`.
    pub w: usize,
    /// Channels of `x_t` (1, or at least 3).
    pub c: usize,
    /// Boundary probability per token, raster order, `H * W` values (or
    /// `(H / s) * (W / s)` for a router grid `s` times coarser), in [0, 1].
    pub prob: Vec<f32>,
    /// Fraction of tokens kept (M / L), printed under the column.
    pub kept_fraction: f32,
}

/// One point of the diverging colour map (RdBu reversed, ColorBrewer): 0
/// dark blue, 0.5 white, 1 dark red. NaN maps to black.
pub fn diverging_colour(p: f32) -> [u8; 3] {
    const STOPS: [[u8; 3]; 11] = [
        [5, 48, 97],
        [33, 102, 172],
        [67, 147, 195],
        [146, 197, 222],
        [209, 229, 240],
        [255, 255, 255],
        [253, 219, 199],
        [244, 165, 130],
        [214, 96, 77],
        [178, 24, 43],
        [103, 0, 31],
    ];
    if p.is_nan() {
        return [0, 0, 0];
    }
    let x = p.clamp(0.0, 1.0) * 10.0;
    let i = (x.floor() as usize).min(9);
    let f = x - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |k: usize| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

fn draw_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::Draw {
        path: path.to_path_buf(),
        msg,
    }
}

/// Draws text with plotters on a canvas (`anchor` = where `(x, y)` sits on
/// the text box).
fn draw_texts(
    canvas: &mut Canvas,
    path: &Path,
    texts: &[(String, i32, i32, u32, Pos)],
) -> Result<()> {
    register_font();
    let (w, h) = (canvas.w as u32, canvas.h as u32);
    let root = BitMapBackend::with_buffer(&mut canvas.px, (w, h)).into_drawing_area();
    for (s, x, y, size, pos) in texts {
        let style = TextStyle::from((FAMILY, *size as f64).into_font())
            .color(&BLACK)
            .pos(*pos);
        root.draw(&Text::new(s.as_str(), (*x, *y), style))
            .map_err(|e| draw_err(path)(e.to_string()))?;
    }
    root.present().map_err(|e| draw_err(path)(e.to_string()))
}

/// Saves the chunking visualisation as a PNG: for each frame (one column,
/// up to 8; more are thinned to 8 evenly spaced ones) `t=...` on top, the
/// sample `x_t`, the boundary-probability map under it in a diverging colour
/// map (blue 0, white 0.5, red 1; colour bar on the right) and `kept 23.4%`
/// under it. Images are upscaled by nearest neighbour to about 168 pixels
/// (6x for 28x28).
///
/// Errors on no frame, a frame whose buffers do not fit its `c, h, w`,
/// frames of different sizes, or an unwritable file.
pub fn save_chunking_viz(path: impl AsRef<Path>, frames: &[ChunkFrame]) -> Result<()> {
    let path = path.as_ref();
    let first = frames
        .first()
        .ok_or_else(|| Error::input("chunking visualisation: no frame"))?;
    let (h, w, c) = (first.h, first.w, first.c);
    if h == 0 || w == 0 {
        return Err(Error::input(format!("chunking frame of size {h}x{w}")));
    }
    check_channels(c)?;
    let mut grids = Vec::with_capacity(frames.len());
    for (k, f) in frames.iter().enumerate() {
        if (f.h, f.w, f.c) != (h, w, c) {
            return Err(Error::input(format!(
                "chunking frame {k} is ({}, {}, {}), frame 0 is ({c}, {h}, {w})",
                f.c, f.h, f.w
            )));
        }
        if Some(f.x_t.len()) != c.checked_mul(h).and_then(|v| v.checked_mul(w)) {
            return Err(Error::input(format!(
                "chunking frame {k}: x_t has {} values, want {c}*{h}*{w}",
                f.x_t.len()
            )));
        }
        // The router grid: H x W, or s times coarser.
        let grid = (1..=h.min(w))
            .filter(|s| h.is_multiple_of(*s) && w.is_multiple_of(*s))
            .map(|s| (h / s, w / s))
            .find(|(gh, gw)| gh * gw == f.prob.len())
            .ok_or_else(|| {
                Error::input(format!(
                    "chunking frame {k}: {} probabilities do not tile a {h}x{w} image",
                    f.prob.len()
                ))
            })?;
        grids.push(grid);
    }
    // Thin to at most 8 evenly spaced frames.
    let picks: Vec<usize> = if frames.len() <= 8 {
        (0..frames.len()).collect()
    } else {
        (0..8).map(|i| i * (frames.len() - 1) / 7).collect()
    };

    let scale = (168 / h.max(w)).max(1);
    let (pw, ph) = (w * scale, h * scale);
    let n = picks.len();
    let col_gap = 14usize;
    let left = 118usize;
    let title_h = 40usize;
    let t_h = 26usize;
    let row_gap = 10usize;
    let kept_h = 34usize;
    let bar_w = 120usize;
    let width = left + n * pw + (n - 1) * col_gap + 24 + bar_w;
    let y_img = title_h + t_h;
    let y_prob = y_img + ph + row_gap;
    let height = y_prob + ph + kept_h + 10;
    let mut canvas = Canvas::new(width, height, [255, 255, 255])?;
    let mut texts: Vec<(String, i32, i32, u32, Pos)> = Vec::new();
    let centre_top = Pos::new(HPos::Center, VPos::Top);
    let right_mid = Pos::new(HPos::Right, VPos::Center);
    let left_mid = Pos::new(HPos::Left, VPos::Center);
    texts.push((
        "Dynamic chunking along the sampling trajectory".into(),
        (width / 2) as i32,
        10,
        20,
        centre_top,
    ));
    texts.push((
        "x_t".into(),
        (left - 12) as i32,
        (y_img + ph / 2) as i32,
        17,
        right_mid,
    ));
    texts.push((
        "boundary p".into(),
        (left - 12) as i32,
        (y_prob + ph / 2) as i32,
        17,
        right_mid,
    ));
    for (col, &k) in picks.iter().enumerate() {
        let f = &frames[k];
        let x0 = left + col * (pw + col_gap);
        canvas.blit(x0, y_img, h, w, scale, |r, cc| {
            pixel(&f.x_t, c, h, w, r, cc)
        });
        let (gh, gw) = grids[k];
        let (sy, sx) = (h / gh, w / gw);
        canvas.blit(x0, y_prob, h, w, scale, |r, cc| {
            diverging_colour(f.prob[(r / sy) * gw + cc / sx])
        });
        frame_rect(&mut canvas, x0, y_prob, pw, ph, [60, 60, 60]);
        let cx = (x0 + pw / 2) as i32;
        texts.push((
            format!("t={}", f.t),
            cx,
            (title_h + 2) as i32,
            17,
            centre_top,
        ));
        texts.push((
            format!("kept {:.1}%", 100.0 * f.kept_fraction),
            cx,
            (y_prob + ph + 11) as i32,
            17,
            centre_top,
        ));
    }
    // Colour bar beside the probability row: 1 at the top, 0 at the bottom.
    let bx = left + n * pw + (n - 1) * col_gap + 24;
    let bw = 18usize;
    for y in 0..ph {
        let p = 1.0 - y as f32 / (ph - 1).max(1) as f32;
        let rgb = diverging_colour(p);
        for x in 0..bw {
            canvas.put(bx + x, y_prob + y, rgb);
        }
    }
    frame_rect(&mut canvas, bx, y_prob, bw, ph, [60, 60, 60]);
    for (v, label) in [(1.0f32, "1"), (0.5, "0.5"), (0.0, "0")] {
        let y = y_prob + ((1.0 - v) * (ph - 1) as f32).round() as usize;
        for x in bw..bw + 4 {
            canvas.put(bx + x, y, [60, 60, 60]);
        }
        texts.push((label.into(), (bx + bw + 7) as i32, y as i32, 14, left_mid));
    }
    texts.push((
        "p".into(),
        (bx + bw / 2) as i32,
        (y_img + ph - 22) as i32,
        16,
        centre_top,
    ));
    draw_texts(&mut canvas, path, &texts)?;
    canvas.save(path)
}

/// A one-pixel rectangle outline.
fn frame_rect(canvas: &mut Canvas, x0: usize, y0: usize, w: usize, h: usize, rgb: [u8; 3]) {
    let (x1, y1) = (x0 + w, y0 + h);
    for x in x0.saturating_sub(1)..=x1 {
        canvas.put(x, y0.saturating_sub(1), rgb);
        canvas.put(x, y1, rgb);
    }
    for y in y0.saturating_sub(1)..=y1 {
        canvas.put(x0.saturating_sub(1), y, rgb);
        canvas.put(x1, y, rgb);
    }
}

/// Per-step statistics of one sampling run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The timestep (999 first, 0 last).
    pub t: usize,
    /// Compression ratio L / M of the conditional path.
    pub ratio_cond: f32,
    /// Compression ratio of the unconditional (CFG) path, if there is one.
    pub ratio_uncond: Option<f32>,
    /// Wall time of the step in seconds.
    pub seconds: f64,
    /// GFLOPs of the step.
    pub gflops: f64,
}

/// Range of the finite values, padded a little; `0..1` when there are none.
fn y_range(vals: impl Iterator<Item = f64>, from_zero: bool) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = if hi > lo {
        0.08 * (hi - lo)
    } else {
        0.5 * hi.abs().max(1.0)
    };
    (if from_zero && lo >= 0.0 {
        0.0
    } else {
        lo - pad
    })..hi + pad
}

type Panel<'a, 'b> = DrawingArea<BitMapBackend<'a>, Shift>;

/// One panel: lines over x = -t (so 999 sits on the left and the axis reads
/// 999 -> 0 as sampling proceeds).
#[allow(clippy::type_complexity)]
fn draw_panel(
    area: &Panel<'_, '_>,
    title: &str,
    ylabel: &str,
    x_range: std::ops::Range<f64>,
    series: &[(&str, RGBColor, Vec<(f64, f64)>)],
    from_zero: bool,
) -> std::result::Result<(), String> {
    let yr = y_range(
        series.iter().flat_map(|s| s.2.iter().map(|p| p.1)),
        from_zero,
    );
    // Enough decimals for ticks about a tenth of the range apart.
    let decimals = (-((yr.end - yr.start) / 10.0).log10().floor()).clamp(0.0, 6.0) as usize;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 19))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, yr)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("timestep t (sampling runs left to right)")
        .y_desc(ylabel)
        .x_label_formatter(&|x| format!("{}", (-x).round() as i64))
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut with_legend = false;
    for (name, colour, pts) in series {
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
        let colour = *colour;
        let single = pts.len() == 1;
        let s = chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if !name.is_empty() {
            with_legend = true;
            s.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
        if single {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if with_legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Saves the per-step summary of a sampling run as a PNG (1000x1050): three
/// stacked panels over the timestep, 999 on the left down to 0 on the right
/// (the order sampling runs in): the compression ratio L/M (cond and, when
/// present, uncond lines with a legend), the wall time per step, and GFLOPs
/// per step (captions give the means and totals). Non-finite values are
/// skipped.
///
/// Errors on no step or an unwritable file.
pub fn save_compression_plot(path: impl AsRef<Path>, steps: &[StepStats]) -> Result<()> {
    let path = path.as_ref();
    if steps.is_empty() {
        return Err(Error::input("compression plot: no step"));
    }
    register_font();
    let (w, h) = (1000usize, 1050usize);
    let mut canvas = Canvas::new(w, h, [255, 255, 255])?;
    let t_max = steps.iter().map(|s| s.t).max().unwrap_or(0) as f64;
    let t_min = steps.iter().map(|s| s.t).min().unwrap_or(0) as f64;
    let x_range = if t_max > t_min {
        -t_max..-t_min
    } else {
        -t_max - 1.0..-t_min + 1.0
    };
    let x = |s: &StepStats| -(s.t as f64);
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (mut sum, mut n) = (0.0, 0usize);
        for x in v.filter(|x| x.is_finite()) {
            sum += x;
            n += 1;
        }
        if n > 0 {
            sum / n as f64
        } else {
            f64::NAN
        }
    };
    let blue = RGBColor(33, 102, 172);
    let orange = RGBColor(230, 120, 20);
    let green = RGBColor(40, 140, 70);
    let purple = RGBColor(120, 60, 160);
    let cond: Vec<(f64, f64)> = steps.iter().map(|s| (x(s), s.ratio_cond as f64)).collect();
    let uncond: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|s| s.ratio_uncond.map(|r| (x(s), r as f64)))
        .collect();
    let mean_c = mean(&mut cond.iter().map(|p| p.1));
    let mut ratio_series = vec![("cond", blue, cond)];
    let mut title = format!("Compression ratio L/M (mean cond {mean_c:.2}");
    if !uncond.is_empty() {
        let mean_u = mean(&mut uncond.iter().map(|p| p.1));
        title.push_str(&format!(", uncond {mean_u:.2}"));
        ratio_series.push(("uncond", orange, uncond));
    }
    title.push(')');
    let secs: Vec<(f64, f64)> = steps.iter().map(|s| (x(s), s.seconds)).collect();
    let flops: Vec<(f64, f64)> = steps.iter().map(|s| (x(s), s.gflops)).collect();
    let total_s: f64 = secs.iter().map(|p| p.1).filter(|v| v.is_finite()).sum();
    let total_g: f64 = flops.iter().map(|p| p.1).filter(|v| v.is_finite()).sum();
    let n = steps.len();
    {
        let root =
            BitMapBackend::with_buffer(&mut canvas.px, (w as u32, h as u32)).into_drawing_area();
        let panels = root.split_evenly((3, 1));
        let res = draw_panel(
            &panels[0],
            &title,
            "L / M",
            x_range.clone(),
            &ratio_series,
            false,
        )
        .and_then(|_| {
            draw_panel(
                &panels[1],
                &format!(
                    "Wall time per step (mean {:.3} s, total {total_s:.2} s over {n} steps)",
                    total_s / n as f64
                ),
                "seconds",
                x_range.clone(),
                &[("", green, secs)],
                true,
            )
        })
        .and_then(|_| {
            draw_panel(
                &panels[2],
                &format!(
                    "GFLOPs per step (mean {:.2}, total {:.3} TFLOPs)",
                    total_g / n as f64,
                    total_g / 1000.0
                ),
                "GFLOPs",
                x_range.clone(),
                &[("", purple, flops)],
                true,
            )
        });
        res.map_err(draw_err(path))?;
        root.present().map_err(|e| draw_err(path)(e.to_string()))?;
    }
    canvas.save(path)
}
