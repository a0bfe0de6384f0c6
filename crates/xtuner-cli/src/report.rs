//! The loss-curve picture written at the end of `xtuner train`
//! (`work_dir/loss_curve.png`): loss per optimizer step, from the run's JSON Lines log.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;
const MARGIN: u32 = 40;

/// Reads `train_log.jsonl` in `work_dir` and writes `loss_curve.png` beside it.
/// Returns the picture's path, or `None` when the log has fewer than two steps.
pub fn loss_curve(work_dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let log = work_dir.join("train_log.jsonl");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let points: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .filter_map(|v| Some((v["iter"].as_f64()?, v["loss"].as_f64()?)))
        .filter(|(_, loss)| loss.is_finite())
        .collect();
    if points.len() < 2 {
        return Ok(None);
    }
    let (x0, x1) = (points[0].0, points[points.len() - 1].0);
    let (lo, hi) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &(_, y)| {
            (lo.min(y), hi.max(y))
        });
    let span = (hi - lo).max(1e-9);
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let grey = Rgb([160, 160, 160]);
    for x in MARGIN..WIDTH - MARGIN {
        img.put_pixel(x, HEIGHT - MARGIN, grey);
    }
    for y in MARGIN..HEIGHT - MARGIN {
        img.put_pixel(MARGIN, y, grey);
    }
    let to_px = |(x, y): (f64, f64)| -> (f64, f64) {
        let px = MARGIN as f64 + (x - x0) / (x1 - x0).max(1e-9) * f64::from(WIDTH - 2 * MARGIN);
        let py = f64::from(HEIGHT - MARGIN) - (y - lo) / span * f64::from(HEIGHT - 2 * MARGIN);
        (px, py)
    };
    for pair in points.windows(2) {
        let (a, b) = (to_px(pair[0]), to_px(pair[1]));
        let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            if x >= 0.0 && y >= 0.0 && (x as u32) < WIDTH && (y as u32) < HEIGHT {
                img.put_pixel(x as u32, y as u32, Rgb([20, 90, 200]));
            }
        }
    }
    let out = work_dir.join("loss_curve.png");
    img.save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(Some(out))
}
