//! `teal report`: PPL vs sparsity for each allocation method as a markdown table and a PNG plot,
//! and the activation distributions of a few layers with fitted Gaussian and Laplace curves (the
//! paper's figure 2).

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;
use teal::eval::sparse::SparseReport;
use teal::sparsity::histogram::{density, fit_gaussian, fit_laplace, gaussian_pdf, laplace_pdf};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

pub fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font could not be loaded"))
}

/// One line of the report: a method at one target.
pub struct Row {
    pub method: String,
    pub target: f64,
    pub report: SparseReport,
}

pub fn markdown(rows: &[Row], dense_ppl: f64) -> String {
    let mut s = String::new();
    s.push_str(
        "| method | target | realized model sparsity | PPL | PPL / dense | KL (nats) | top-1 |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    s.push_str(&format!(
        "| dense | 0 | 0 | {dense_ppl:.4} | 1.0000 | 0 | 1.0000 |\n"
    ));
    for r in rows {
        let p = &r.report;
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.5} | {:.4} |\n",
            r.method, r.target, p.model_sparsity, p.ppl, p.ppl_ratio, p.kl, p.top1
        ));
    }
    s
}

pub fn plot_ppl(rows: &[Row], dense_ppl: f64, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ppl = rows.iter().map(|r| r.report.ppl).fold(dense_ppl, f64::max) * 1.05;
    let max_s = rows
        .iter()
        .map(|r| r.report.model_sparsity)
        .fold(0.1, f64::max)
        + 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Perplexity vs realized model-wide sparsity",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        // Logarithmic: a collapsed model at 75 % (PPL in the thousands) would otherwise
        // flatten the informative range near dense into one line.
        .build_cartesian_2d(0.0..max_s, ((dense_ppl * 0.95)..max_ppl).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("parameter-weighted sparsity (realized)")
        .y_desc("PPL (log scale)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, dense_ppl), (max_s, dense_ppl)],
            BLACK.stroke_width(1),
        ))?
        .label("dense")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    let mut methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    methods.dedup();
    for (i, m) in methods.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = std::iter::once((0.0, dense_ppl))
            .chain(
                rows.iter()
                    .filter(|r| r.method == *m)
                    .map(|r| (r.report.model_sparsity, r.report.ppl)),
            )
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*m)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Four panels (the sites) of one layer: empirical density with Gaussian and Laplace fits.
pub fn plot_activations(layer: usize, sites: &[(&str, Vec<f32>)], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    for (panel, (name, v)) in panels.iter().zip(sites) {
        let (mu, sd) = fit_gaussian(v);
        let (loc, b) = fit_laplace(v);
        let half = (4.0 * sd) as f32;
        let (lo, hi) = ((mu as f32) - half, (mu as f32) + half);
        let dens = density(v, 200, lo, hi);
        let ymax = dens
            .iter()
            .map(|d| d.1)
            .fold(laplace_pdf(loc, loc, b), f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("layer {layer}: {name}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(lo as f64..hi as f64, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("activation value")
            .y_desc("density")
            .draw()?;
        chart
            .draw_series(dens.iter().map(|&(x, d)| {
                let w = (hi - lo) as f64 / 400.0;
                Rectangle::new(
                    [(x as f64 - w, 0.0), (x as f64 + w, d)],
                    BLUE.mix(0.35).filled(),
                )
            }))?
            .label("empirical")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 4), (x + 16, y + 4)], BLUE.mix(0.35).filled())
            });
        let xs: Vec<f64> = (0..=400)
            .map(|i| lo as f64 + (hi - lo) as f64 * i as f64 / 400.0)
            .collect();
        chart
            .draw_series(LineSeries::new(
                xs.iter().map(|&x| (x, gaussian_pdf(x, mu, sd))),
                RED.stroke_width(2),
            ))?
            .label(format!("Gaussian (σ={sd:.3})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                xs.iter().map(|&x| (x, laplace_pdf(x, loc, b))),
                GREEN.stroke_width(2),
            ))?
            .label(format!("Laplace (b={b:.3})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], GREEN.stroke_width(2)));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
