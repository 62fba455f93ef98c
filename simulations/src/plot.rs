//! PNG figures: every variant of a scenario on one chart, against rounds and against virtual
//! time, for the consensus error (log scale) and, when learning, the mean Dice.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;

use crate::engine::VariantResult;
use crate::scenario::{Mode, Scenario};

/// Where a sans-serif font is looked for (Debian's fonts-dejavu-core first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

type PlotResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Loads the plot font, once; an error names the files looked for. `run_to_dir` calls it
/// before simulating, so a missing font stops a run at its start, not after it.
pub fn ensure_font() -> PlotResult {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = FONTS
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!(
                        "plots need a TrueType font and none was found at {FONTS:?}; install Debian's fonts-dejavu-core, or pass --no-plots"
                    )
                })?;
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "the font file is not a usable TrueType font".to_string())
        })
        .clone()
        .map_err(Into::into)
}

/// Writes `<scenario>-consensus-rounds.png`, `-consensus-time.png` and, in learning mode,
/// `-dice-rounds.png`, `-dice-time.png`.
pub fn write_all(dir: &Path, s: &Scenario, results: &[VariantResult]) -> PlotResult {
    ensure_font()?;
    for by_time in [false, true] {
        let x_label = if by_time { "virtual time (s)" } else { "round" };
        let suffix = if by_time { "time" } else { "rounds" };
        let series = |f: &dyn Fn(&crate::engine::RoundRow) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            results
                .iter()
                .map(|v| {
                    let points = v
                        .rows
                        .iter()
                        .filter_map(|r| {
                            let x = if by_time { r.virtual_time_s } else { f64::from(r.round) };
                            f(r).map(|y| (x, y))
                        })
                        .collect();
                    (v.name.clone(), points)
                })
                .collect()
        };
        let consensus = series(&|r| (r.consensus_error > 0.0).then_some(r.consensus_error));
        chart(
            &dir.join(format!("{}-consensus-{suffix}.png", s.name)),
            &format!("{}: consensus error", s.name),
            x_label,
            "max relative distance to the mean",
            &consensus,
            true,
        )?;
        if s.mode == Mode::Learning {
            let dice = series(&|r| r.mean_dice);
            chart(
                &dir.join(format!("{}-dice-{suffix}.png", s.name)),
                &format!("{}: mean validation Dice", s.name),
                x_label,
                "Dice",
                &dice,
                false,
            )?;
        }
    }
    Ok(())
}

fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
) -> PlotResult {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (if log_y { 1e-6 } else { 0.0 }, 1.0);
    }
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    if log_y {
        let lo = (y_min.max(1e-12)) / 2.0;
        let hi = y_max.max(lo * 10.0) * 2.0;
        let mut c = builder.build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
        c.configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        lines(&mut c, series, SeriesLabelPosition::UpperRight)?;
    } else {
        let mut c = builder.build_cartesian_2d(0.0..x_max, (y_min.min(0.0))..(y_max.max(1.0)))?;
        c.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
        lines(&mut c, series, SeriesLabelPosition::LowerRight)?;
    }
    root.present()?;
    Ok(())
}

/// One line per series, in palette order, with a legend at `legend`.
fn lines<'a, X, Y>(
    c: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    series: &[(String, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> PlotResult
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    c.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
