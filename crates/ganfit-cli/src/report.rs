//! `report.html`: one self-contained page per fit (images inlined, no scripts, opens offline).

use std::fmt::Write as _;

use base64::Engine as _;
use ganfit::FitResult;
use image::{ImageFormat, RgbImage};

/// An `<img>` holding `image` inline as PNG.
fn inline_png(image: &image::DynamicImage, alt: &str) -> anyhow::Result<String> {
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)?;
    let data = base64::engine::general_purpose::STANDARD.encode(png);
    Ok(format!(
        r#"<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>"#
    ))
}

/// The total loss of a stage as an SVG polyline, log-scaled.
fn loss_curve(stage: &ganfit::optim::StageReport) -> String {
    let (width, height) = (420.0, 160.0);
    let logs: Vec<f64> = stage
        .history
        .iter()
        .map(|r| r.total.max(f64::MIN_POSITIVE).log10())
        .filter(|v| v.is_finite())
        .collect();
    if logs.len() < 2 {
        return String::new();
    }
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-9);
    let points: String = logs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = i as f64 / (logs.len() - 1) as f64 * width;
            let y = height - (v - lo) / span * height;
            format!("{x:.1},{y:.1} ")
        })
        .collect();
    format!(
        r##"<figure><svg viewBox="-40 -10 {w} {h}" width="{w}" height="{h}" role="img"><polyline fill="none" stroke="#c33" stroke-width="1.5" points="{points}"/><text x="-38" y="0" font-size="10">1e{hi:.1}</text><text x="-38" y="{height}" font-size="10">1e{lo:.1}</text></svg><figcaption>{name}: total loss per iteration (log scale), best {best:.3e}</figcaption></figure>"##,
        w = width + 50.0,
        h = height + 20.0,
        name = stage.name,
        best = stage.best_loss,
    )
}

/// Writes the page for one fitted photo.
pub fn write(
    path: &std::path::Path,
    photo_name: &str,
    photo: &RgbImage,
    overlay: &RgbImage,
    result: &FitResult,
) -> anyhow::Result<()> {
    let mut html = String::new();
    writeln!(
        html,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>ganfit: {photo_name}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}img{{max-width:320px;height:auto;border:1px solid #ccc}}table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}</style></head><body><h1>ganfit fit of {photo_name}</h1>"#
    )?;
    html.push_str("<h2>Images</h2>");
    html.push_str(&inline_png(&photo.clone().into(), "photo")?);
    html.push_str(&inline_png(
        &overlay.clone().into(),
        "fitted geometry over the photo",
    )?);
    html.push_str(&inline_png(
        &result.frontal_render.clone().into(),
        "frontal, neutral render",
    )?);
    html.push_str(&inline_png(
        &result.uv_texture.clone().into(),
        "UV texture",
    )?);
    html.push_str("<h2>Loss per stage</h2>");
    for stage in &result.stages {
        html.push_str(&loss_curve(stage));
    }
    html.push_str("<h2>Timings</h2><table><tr><th>step</th><th>seconds</th></tr>");
    for (step, time) in &result.timings {
        write!(
            html,
            "<tr><td>{step}</td><td>{:.3}</td></tr>",
            time.as_secs_f64()
        )?;
    }
    html.push_str("</table></body></html>\n");
    std::fs::write(path, html)?;
    Ok(())
}
