//! Loss curves drawn from runs' JSON Lines logs (`work_dir/train_log.jsonl`): the
//! picture a run leaves at each checkpoint and at its end (`loss_curve.png` and
//! `loss_curve.svg` in its work dir), and `xtuner plot WORK_DIR...`, which puts several
//! runs on one chart. Loss against step with labelled axes, the raw loss faint under a
//! smoothed line, the learning rate on a second axis, the runs' names and date on top.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// The picture's size in pixels (the SVG's in user units).
const SIZE: (u32, u32) = (1000, 560);

/// The runs' colours (matplotlib's "tab10", which most readers know).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One optimizer step of a run's log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Iterations done.
    pub iter: u64,
    /// The step's loss.
    pub loss: f64,
    /// The learning rate it used.
    pub lr: f64,
}

/// One run's curve, as its log gives it.
#[derive(Debug, Clone)]
pub struct Run {
    /// The work dir's name.
    pub name: String,
    /// Its steps by iteration: where a resumed run repeated steps, the later ones.
    pub points: Vec<Point>,
    /// When the log was last written.
    pub date: std::time::SystemTime,
}

impl Run {
    /// Reads `train_log.jsonl` in `work_dir`. Lines that are not a step with a finite
    /// loss (evaluations, a line cut short by a crash, a loss that overflowed) are
    /// passed over.
    ///
    /// # Errors
    /// An unreadable log.
    pub fn read(work_dir: &Path) -> Result<Self> {
        let log = work_dir.join("train_log.jsonl");
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        let mut steps = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["event"] != "step" {
                continue;
            }
            let (Some(iter), Some(loss)) = (v["iter"].as_u64(), v["loss"].as_f64()) else {
                continue;
            };
            if loss.is_finite() {
                let lr = v["lr"].as_f64().filter(|l| l.is_finite()).unwrap_or(0.0);
                steps.insert(iter, Point { iter, loss, lr });
            }
        }
        let name = std::fs::canonicalize(work_dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| work_dir.display().to_string());
        let date = std::fs::metadata(&log)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| std::time::SystemTime::now());
        Ok(Self {
            name,
            points: steps.into_values().collect(),
            date,
        })
    }
}

/// The loss smoothed as TensorBoard smooths it: an exponential moving average,
/// debiased at the start, over about a fortieth of the run (none for 40 steps or
/// fewer; weight 0.82 for 400 steps, at most 0.98).
pub fn smoothed(losses: &[f64]) -> Vec<f64> {
    let window = losses.len() as f64 / 40.0;
    let weight = (1.0 - 2.0 / (window + 1.0)).clamp(0.0, 0.98);
    let mut average = 0.0;
    let mut debias = 1.0;
    losses
        .iter()
        .map(|&loss| {
            average = weight * average + (1.0 - weight) * loss;
            debias *= weight;
            average / (1.0 - debias)
        })
        .collect()
}

/// Writes the loss curve of the run in `work_dir` beside its log (`loss_curve.png` and
/// `loss_curve.svg`). Returns the PNG's path, or `None` while the log has no step.
///
/// # Errors
/// An unreadable log, an unwritable work dir.
pub fn loss_curve(work_dir: &Path) -> Result<Option<PathBuf>> {
    let run = Run::read(work_dir)?;
    if run.points.is_empty() {
        return Ok(None);
    }
    let runs = [run];
    let png = work_dir.join("loss_curve.png");
    draw(&runs, &png)?;
    draw(&runs, &work_dir.join("loss_curve.svg"))?;
    Ok(Some(png))
}

/// `xtuner plot`: the curves of the runs in `work_dirs` on one chart, written to `out`
/// (PNG or SVG, by its extension).
///
/// # Errors
/// A work dir without a log or without a step in it; an output that is neither `.png`
/// nor `.svg`, or cannot be written.
pub fn plot(work_dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs = work_dirs
        .iter()
        .map(|dir| {
            let run = Run::read(dir)?;
            if run.points.is_empty() {
                bail!(
                    "{}: no training step with a finite loss",
                    dir.join("train_log.jsonl").display()
                );
            }
            Ok(run)
        })
        .collect::<Result<Vec<_>>>()?;
    draw(&runs, out)
}

/// Draws `runs` into `out`, through a file beside it renamed into place.
///
/// # Errors
/// An extension other than `png` or `svg`; a failed write.
pub fn draw(runs: &[Run], out: &Path) -> Result<()> {
    register_font();
    let extension = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let partial = out.with_extension("partial");
    let drawn = |e: DrawError| anyhow!("drawing {}: {e}", out.display());
    match extension.as_deref() {
        Some("png") => {
            let (w, h) = SIZE;
            let mut pixels = vec![255u8; (w * h * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
                chart(runs, &root).map_err(drawn)?;
                root.present().map_err(|e| drawn(e.to_string()))?;
            }
            let image = image::RgbImage::from_raw(w, h, pixels)
                .ok_or_else(|| anyhow!("drawing {}: a buffer of the wrong size", out.display()))?;
            image
                .save_with_format(&partial, image::ImageFormat::Png)
                .with_context(|| format!("writing {}", partial.display()))?;
        }
        Some("svg") => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
                chart(runs, &root).map_err(drawn)?;
                root.present().map_err(|e| drawn(e.to_string()))?;
            }
            std::fs::write(&partial, svg)
                .with_context(|| format!("writing {}", partial.display()))?;
        }
        _ => bail!("{}: a plot is written as .png or .svg", out.display()),
    }
    std::fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))
}

/// A drawing failure, in words (the backends' error types differ).
type DrawError = String;

/// The chart itself, on any backend.
fn chart<DB: DrawingBackend>(runs: &[Run], root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let points = runs.iter().flat_map(|r| &r.points);
    let (mut x0, mut x1) = (u64::MAX, 0);
    let (mut y0, mut y1, mut lr1) = (f64::MAX, f64::MIN, 0.0f64);
    for p in points {
        (x0, x1) = (x0.min(p.iter), x1.max(p.iter));
        (y0, y1) = (y0.min(p.loss), y1.max(p.loss));
        lr1 = lr1.max(p.lr);
    }
    // A single step (or a flat loss) still gets a readable range around it.
    let (x0, x1) = if x0 == x1 {
        (x0.saturating_sub(1), x1 + 1)
    } else {
        (x0, x1)
    };
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let lr1 = if lr1 > 0.0 { lr1 * 1.1 } else { 1.0 };

    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let date = runs
        .iter()
        .map(|r| r.date)
        .max()
        .unwrap_or(std::time::UNIX_EPOCH);
    let date = chrono::DateTime::<chrono::Utc>::from(date).format("%Y-%m-%d %H:%M UTC");
    let mut chart = ChartBuilder::on(root)
        .caption(format!("{} · {date}", names.join(", ")), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .right_y_label_area_size(84)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?
        .set_secondary_coord(x0..x1, 0.0..lr1);
    let decimals = decimals(y1 - y0);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .y_label_formatter(&|lr| {
            if *lr == 0.0 {
                "0".into()
            } else {
                format!("{lr:.1e}")
            }
        })
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;

    let one = runs.len() == 1;
    for (run, &colour) in runs.iter().zip(COLOURS.iter().cycle()) {
        let xs: Vec<u64> = run.points.iter().map(|p| p.iter).collect();
        let losses: Vec<f64> = run.points.iter().map(|p| p.loss).collect();
        let smooth = smoothed(&losses);
        if run.points.len() == 1 {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (xs[0], losses[0]),
                    4,
                    colour.filled(),
                )))
                .map_err(err)?;
        }
        let raw = chart
            .draw_series(LineSeries::new(
                xs.iter().copied().zip(losses.iter().copied()),
                colour.mix(0.3).stroke_width(1),
            ))
            .map_err(err)?;
        if one {
            raw.label("loss")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.mix(0.3)));
        }
        chart
            .draw_series(LineSeries::new(
                xs.iter().copied().zip(smooth),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(if one {
                "loss (smoothed)".to_string()
            } else {
                run.name.clone()
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2))
            });
        let lr_style = if one {
            BLACK.mix(0.55)
        } else {
            colour.mix(0.7)
        };
        chart
            .draw_secondary_series(DashedLineSeries::new(
                xs.iter().copied().zip(run.points.iter().map(|p| p.lr)),
                6,
                4,
                lr_style.stroke_width(1),
            ))
            .map_err(err)?
            .label(if one {
                "learning rate".to_string()
            } else {
                format!("{} learning rate", run.name)
            })
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], lr_style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Decimals that tell ticks `span` apart (a loss from 0.0012 to 0.0019 needs four).
fn decimals(span: f64) -> usize {
    if span <= 0.0 || !span.is_finite() {
        return 2;
    }
    (1.0 - span.log10()).ceil().clamp(0.0, 8.0) as usize
}

/// The font every label is drawn in: DejaVu Sans, carried in the binary, so a chart has
/// its text on any machine.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid font: this cannot fail.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, steps: usize) {
        let mut text = String::from("{\"event\":\"started\",\"total_iters\":1}\n");
        for i in 1..=steps {
            let loss = 2.0 * (-(i as f64) / 300.0).exp() + 0.1 * ((i * 7919) % 13) as f64 / 13.0;
            let lr = 2e-4 * (i as f64 / steps as f64).min(1.0);
            text.push_str(&format!(
                "{{\"event\":\"step\",\"iter\":{i},\"loss\":{loss},\"lr\":{lr},\"grad_norm\":1.0}}\n"
            ));
            if i % 500 == 0 {
                text.push_str(&format!(
                    "{{\"event\":\"eval\",\"iter\":{i},\"answers\":[]}}\n"
                ));
            }
        }
        std::fs::write(dir.join("train_log.jsonl"), text).unwrap();
    }

    /// The texts of an SVG, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    /// Pixels that are neither white nor near-white: lines, ticks and text.
    fn inked(png: &Path) -> (u32, u32, usize) {
        let image = image::open(png).unwrap().to_rgb8();
        let inked = image
            .pixels()
            .filter(|p| p.0.iter().any(|&c| c < 200))
            .count();
        (image.width(), image.height(), inked)
    }

    #[test]
    fn a_run_of_1_2_or_10000_steps_gets_a_chart_with_axes_and_labels() {
        for steps in [1, 2, 10_000] {
            let dir = tempfile::tempdir().unwrap();
            write_log(dir.path(), steps);
            let png = loss_curve(dir.path()).unwrap().unwrap();
            let (w, h, inked) = inked(&png);
            assert_eq!((w, h), SIZE);
            // Text, ticks and the curves: thousands of dark pixels, not a blank page.
            assert!(inked > 3_000, "{steps} steps: {inked} dark pixels");
            let svg = std::fs::read_to_string(dir.path().join("loss_curve.svg")).unwrap();
            let texts = texts(&svg);
            for text in ["step", "loss", "learning rate", "loss (smoothed)"] {
                assert!(
                    texts.iter().any(|t| t == text),
                    "{steps} steps: no {text} in {texts:?}"
                );
            }
            // Tick labels: numbers on both axes.
            let ticks = texts.iter().filter(|t| t.parse::<f64>().is_ok()).count();
            assert!(ticks >= 8, "{steps} steps: {texts:?}");
            assert!(!svg.contains("NaN"), "{steps} steps");
        }
    }

    #[test]
    fn the_text_is_drawn_into_the_png() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 50);
        let png = loss_curve(dir.path()).unwrap().unwrap();
        let image = image::open(&png).unwrap().to_rgb8();
        // The axis description "step" sits centred below the plot: some of its
        // pixels are dark.
        let (w, h) = SIZE;
        let band = (w / 2 - 40..w / 2 + 40, h - 30..h - 4);
        let dark = band
            .0
            .flat_map(|x| band.1.clone().map(move |y| (x, y)))
            .filter(|&(x, y)| image.get_pixel(x, y).0.iter().all(|&c| c < 128))
            .count();
        assert!(dark > 20, "{dark} dark pixels where the x axis's name is");
    }

    #[test]
    fn several_runs_share_one_chart_and_resumed_steps_count_once() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_log(a.path(), 30);
        write_log(b.path(), 60);
        // A resumed run appends steps 21..=30 again; the later ones are kept.
        let mut text = std::fs::read_to_string(a.path().join("train_log.jsonl")).unwrap();
        text.push_str("{\"event\":\"step\",\"iter\":21,\"loss\":9.5,\"lr\":1e-4}\n{\"event\":\"st");
        std::fs::write(a.path().join("train_log.jsonl"), text).unwrap();
        let run = Run::read(a.path()).unwrap();
        assert_eq!(run.points.len(), 30);
        assert_eq!(run.points[20].loss, 9.5);

        let out = a.path().join("both.svg");
        plot(&[a.path().to_path_buf(), b.path().to_path_buf()], &out).unwrap();
        let texts = texts(&std::fs::read_to_string(&out).unwrap());
        for r in [a.path(), b.path()] {
            let name = r.file_name().unwrap().to_string_lossy().into_owned();
            assert!(texts.contains(&name), "{name} not in the legend {texts:?}");
        }
        assert!(!out.with_extension("partial").exists());
    }

    #[test]
    fn bad_requests_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = plot(&[dir.path().to_path_buf()], &dir.path().join("x.png")).unwrap_err();
        assert!(format!("{e:#}").contains("train_log.jsonl"), "{e:#}");
        std::fs::write(dir.path().join("train_log.jsonl"), "{\"event\":\"eval\"}\n").unwrap();
        let e = plot(&[dir.path().to_path_buf()], &dir.path().join("x.png")).unwrap_err();
        assert!(format!("{e:#}").contains("no training step"), "{e:#}");
        write_log(dir.path(), 3);
        let e = plot(&[dir.path().to_path_buf()], &dir.path().join("x.pdf")).unwrap_err();
        assert!(format!("{e:#}").contains(".png or .svg"), "{e:#}");
        assert_eq!(loss_curve(tempfile::tempdir().unwrap().path()).ok(), None);
    }

    #[test]
    fn smoothing_keeps_short_runs_and_follows_long_ones() {
        assert_eq!(smoothed(&[3.0, 1.0]), vec![3.0, 1.0]);
        let flat = smoothed(&vec![2.0; 1000]);
        assert!(flat.iter().all(|v| (v - 2.0).abs() < 1e-9));
        assert_eq!(decimals(0.0007), 5);
        assert_eq!(decimals(3.0), 1);
    }
}
