//! PNG charts of runs from their `metrics.jsonl`: train and val loss, val perplexity,
//! learning rate, tokens/s. One run (`<run>/plots.png`, refreshed at each evaluation and
//! at the end) or several overlaid (`algpt2-ddp plot`), as the studies compared variants.
//! Text uses the DejaVu Sans shipped in `assets/`, so no system font is needed.

use anyhow::{anyhow, bail};
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (1400, 900);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One chart: a title and the metrics drawn in it (each as step → value).
struct Panel {
    title: &'static str,
    metrics: &'static [&'static str],
}

const PANELS: [Panel; 4] = [
    Panel { title: "loss", metrics: &["train/loss", "val/loss"] },
    Panel { title: "validation perplexity", metrics: &["val/ppl"] },
    Panel { title: "learning rate", metrics: &["train/lr"] },
    Panel { title: "tokens/s", metrics: &["train/tokens_per_sec"] },
];

/// A run's label and its metric rows.
struct Run {
    label: String,
    rows: Vec<Value>,
}

fn read_run(dir: &Path) -> anyhow::Result<Run> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound if !dir.exists() => format!("the run directory {} does not exist", dir.display()),
            std::io::ErrorKind::NotFound if !dir.is_dir() => format!("{} is not a directory", dir.display()),
            std::io::ErrorKind::NotFound => format!("{} is not a run directory (it has no metrics.jsonl)", dir.display()),
            _ => e.to_string(),
        };
        anyhow!("cannot read {}: {why}", path.display())
    })?;
    let rows = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let label = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Run { label, rows })
}

fn series(run: &Run, metric: &str) -> Vec<(f64, f64)> {
    run.rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[metric].as_f64()?))).filter(|(_, y)| y.is_finite()).collect()
}

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("cannot load the embedded font"))
    }
}

/// One line of a panel: its legend, (run, metric) for its colour, its (step, value) points.
type Line = (String, (usize, usize), Vec<(f64, f64)>);

/// Refuses an `out` that cannot be written before anything is drawn.
fn check_out(out: &Path) -> anyhow::Result<()> {
    let shown = out.display();
    if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        bail!("cannot write {shown}: plots are PNG images, the file name must end in .png");
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("cannot write {shown}: {} is not a directory", parent.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot write {shown}: the directory {} does not exist", parent.display())
        }
        Err(e) => bail!("cannot write {shown}: {e}"),
    }
    if out.is_dir() {
        bail!("cannot write {shown}: it is a directory");
    }
    Ok(())
}

/// The pixels as a PNG file's bytes.
fn encode_png(pixels: &[u8], out: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // What plotters' own encoder (the image crate's defaults) used.
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::FilterType::Sub);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder
        .write_header()
        .and_then(|mut w| {
            w.write_image_data(pixels)?;
            w.finish()
        })
        .map_err(|e| anyhow!("cannot encode {} as PNG: {e}", out.display()))?;
    Ok(bytes)
}

/// Writes `bytes` to a hidden sibling and renames it over `out`, so that a reader (or the
/// refresh at the next evaluation) never sees half an image. Every failure names `out`
/// and the OS's reason.
fn write_png(out: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let name = out.file_name().map_or_else(|| "plots.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes)).and_then(|()| std::fs::rename(&tmp, out));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("cannot write {}: {e}", out.display())
    })
}

/// Draws the runs in `dirs` over each other into `out`.
pub fn render(dirs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let runs: Vec<Run> = dirs.iter().map(|d| read_run(d)).collect::<anyhow::Result<_>>()?;
    check_out(out)?;
    // Drawn in memory and written by us: plotters' own file output reports a failed
    // write as Rust debug text (`ImageError(IoError(Os { code: 30, .. }))`).
    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw(&runs, &mut pixels).map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))?;
    write_png(out, &encode_png(&pixels, out)?)
}

/// Draws the four panels of `runs` into `pixels` (RGB, `SIZE`).
fn draw(runs: &[Run], pixels: &mut [u8]) -> Result<(), DrawingAreaErrorKind<impl std::error::Error + Send + Sync>> {
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let several = runs.len() > 1;
    for (area, panel) in root.split_evenly((2, 2)).iter().zip(PANELS.iter()) {
        // A run keeps its colour in every panel; its second metric (val) is paler.
        let lines: Vec<Line> = runs
            .iter()
            .enumerate()
            .flat_map(|(i, run)| {
                panel.metrics.iter().enumerate().map(move |(j, m)| {
                    let name = if several { format!("{} {m}", run.label) } else { m.to_string() };
                    (name, (i, j), series(run, m))
                })
            })
            .filter(|(_, _, points)| !points.is_empty())
            .collect();
        let points = lines.iter().flat_map(|(_, _, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if lines.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-12);
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart.configure_mesh().x_desc("step").x_label_formatter(&|x| format!("{x:.0}")).label_style(("sans-serif", 14)).draw()?;
        for (name, (run_index, metric_index), points) in &lines {
            let base = COLORS[run_index % COLORS.len()];
            let color = if *metric_index == 0 { base.to_rgba() } else { base.mix(0.45).to_rgba() };
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
        }
        if !lines.is_empty() {
            chart.configure_series_labels().label_font(("sans-serif", 14)).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// `<run>/plots.png` of one run.
pub fn render_run(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let out = run_dir.join("plots.png");
    render(&[run_dir.to_path_buf()], &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(dir: &Path, name: &str, scale: f64) -> PathBuf {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let rows: String = (1..=50)
            .map(|s| {
                let mut r = serde_json::json!({"step": s, "train/loss": scale * 6.0 / (s as f64).sqrt(), "train/lr": 1e-3, "train/tokens_per_sec": 1000.0 + s as f64});
                if s % 10 == 0 {
                    r["val/loss"] = (scale * 6.5 / (s as f64).sqrt()).into();
                    r["val/ppl"] = (scale * 6.5 / (s as f64).sqrt()).exp().into();
                }
                r.to_string() + "\n"
            })
            .collect();
        std::fs::write(run.join("metrics.jsonl"), rows).unwrap();
        run
    }

    #[test]
    fn renders_one_run_and_an_overlay_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let a = fake_run(dir.path(), "gpt2", 1.0);
        let b = fake_run(dir.path(), "algpt2", 1.2);
        let png = render_run(&a).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height as drawn.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), SIZE.0);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), SIZE.1);
        let overlay = dir.path().join("compare.png");
        render(&[a, b], &overlay).unwrap();
        // Two runs draw more than one: the overlay holds more ink, so it compresses larger.
        assert!(std::fs::metadata(&overlay).unwrap().len() > bytes.len() as u64);
    }

    #[test]
    fn a_missing_run_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = render(&[dir.path().join("nope")], &dir.path().join("x.png")).unwrap_err();
        assert!(err.to_string().contains("nope/metrics.jsonl"), "{err}");
    }
}
