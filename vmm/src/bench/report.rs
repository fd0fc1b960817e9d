//! The benchmark chart: per case, the busy tasks' ops rate relative to the baseline (top)
//! and the pager's fault service latency, p50 and p99 (bottom).

use std::path::Path;

use plotters::prelude::*;

use super::CaseResult;

fn colour(mode: &str) -> RGBColor {
    match mode {
        "baseline" => RGBColor(120, 120, 120),
        "apf-off" => RGBColor(200, 60, 50),
        _ => RGBColor(40, 120, 200),
    }
}

pub fn draw_chart(path: &Path, results: &[CaseResult]) -> Result<(), String> {
    let e = |err: &dyn std::fmt::Display| err.to_string();
    let n = results.len().max(1);
    let root = SVGBackend::new(path, (160 + 70 * n as u32, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(380);

    let max_ratio = results
        .iter()
        .map(|r| r.ratio_to_baseline)
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "busy tasks' ops rate / baseline (1.0 = no stall)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(90)
        .y_label_area_size(50)
        .build_cartesian_2d(0..n, 0f64..max_ratio)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|i| results.get(*i).map_or(String::new(), |r| r.label.clone()))
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(results.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(i, 0.0), (i + 1, r.ratio_to_baseline)],
                colour(r.mode).filled(),
            )
        }))
        .map_err(|x| e(&x))?;

    let latency = |r: &CaseResult, q: &str| r.service[q].as_f64().unwrap_or(0.0);
    let max_us = results
        .iter()
        .map(|r| latency(r, "p99_us"))
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "fault service latency, µs (bar: p50, line: p99)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(0..n, (1f64..max_us).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|i| results.get(*i).map_or(String::new(), |r| r.label.clone()))
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .draw()
        .map_err(|x| e(&x))?;
    let with_faults = || {
        results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.service.is_null())
    };
    chart
        .draw_series(with_faults().map(|(i, r)| {
            Rectangle::new(
                [(i, 1.0), (i + 1, latency(r, "p50_us").max(1.0))],
                colour(r.mode).filled(),
            )
        }))
        .map_err(|x| e(&x))?;
    chart
        .draw_series(with_faults().map(|(i, r)| {
            let y = latency(r, "p99_us").max(1.0);
            PathElement::new(vec![(i, y), (i + 1, y)], BLACK.stroke_width(3))
        }))
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}
