//! `report.html`: one self-contained page per fit (images inlined, no scripts, opens offline).

use std::fmt::Write as _;

use base64::Engine as _;
use ganfit::FitResult;
use image::{DynamicImage, ImageFormat, RgbImage};

/// The longest side an inlined image keeps: the page shows them 320 px wide, and a phone
/// photo inlined at full size made a 30 MB page (the full-size files lie beside it).
const INLINE_MAX_SIDE: u32 = 1024;

/// How an image is inlined: photographs compress far better as JPEG, renders and textures
/// (flat backgrounds, transparency) stay lossless.
#[derive(Debug, Clone, Copy)]
enum Inline {
    Photograph,
    Render,
}

/// An `<img>` holding `image` inline, scaled down to [`INLINE_MAX_SIDE`].
fn inline_image(image: &DynamicImage, alt: &str, kind: Inline) -> anyhow::Result<String> {
    let scaled;
    let (image, caption) = if image.width().max(image.height()) > INLINE_MAX_SIDE {
        scaled = image.resize(
            INLINE_MAX_SIDE,
            INLINE_MAX_SIDE,
            image::imageops::FilterType::Triangle,
        );
        let caption = format!(
            "{alt} (shown at {}×{} of {}×{})",
            scaled.width(),
            scaled.height(),
            image.width(),
            image.height()
        );
        (&scaled, caption)
    } else {
        (image, alt.to_string())
    };
    let mut bytes = Vec::new();
    let mime = match kind {
        Inline::Photograph => {
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90);
            image.to_rgb8().write_with_encoder(encoder)?;
            "image/jpeg"
        }
        Inline::Render => {
            image.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)?;
            "image/png"
        }
    };
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(format!(
        r#"<figure><img alt="{alt}" src="data:{mime};base64,{data}"><figcaption>{caption}</figcaption></figure>"#
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
    views: &image::RgbaImage,
    result: &FitResult,
) -> anyhow::Result<()> {
    let mut html = String::new();
    writeln!(
        html,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>ganfit: {photo_name}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}img{{max-width:320px;height:auto;border:1px solid #ccc}}.wide img{{max-width:100%}}table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}</style></head><body><h1>ganfit fit of {photo_name}</h1>"#
    )?;
    html.push_str("<h2>Images</h2>");
    let images: [(DynamicImage, &str, Inline); 4] = [
        (photo.clone().into(), "photo", Inline::Photograph),
        (
            overlay.clone().into(),
            "fitted geometry over the photo",
            Inline::Photograph,
        ),
        (
            result.frontal_render.clone().into(),
            "frontal, neutral render",
            Inline::Render,
        ),
        (
            result.uv_texture.clone().into(),
            "UV texture",
            Inline::Render,
        ),
    ];
    for (image, alt, kind) in &images {
        html.push_str(&inline_image(image, alt, *kind)?);
    }
    html.push_str(r#"<div class="wide">"#);
    html.push_str(&inline_image(
        &views.clone().into(),
        "neutral face turned 45° each way and from the front, textured and as shaded shape",
        Inline::Render,
    )?);
    html.push_str("</div>");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The inlined image's bytes, decoded back.
    fn inlined(html: &str) -> DynamicImage {
        let data = html
            .split(";base64,")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        image::load_from_memory(&bytes).unwrap()
    }

    #[test]
    fn large_photos_are_inlined_scaled_down_as_jpeg() {
        let photo = DynamicImage::ImageRgb8(RgbImage::from_fn(3000, 2000, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        }));
        let html = inline_image(&photo, "photo", Inline::Photograph).unwrap();
        assert!(html.contains("data:image/jpeg;base64,"));
        assert!(
            html.contains("shown at 1024×683 of 3000×2000"),
            "{html:.300}"
        );
        let shown = inlined(&html);
        assert_eq!((shown.width(), shown.height()), (1024, 683));
    }

    #[test]
    fn small_renders_are_inlined_losslessly_at_their_size() {
        let render = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(300, 200, |x, y| {
            image::Rgba([x as u8, y as u8, 7, if x < 150 { 0 } else { 255 }])
        }));
        let html = inline_image(&render, "frontal", Inline::Render).unwrap();
        assert!(html.contains("data:image/png;base64,") && !html.contains("shown at"));
        assert_eq!(inlined(&html), render);
    }
}
