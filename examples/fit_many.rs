//! Several photos of one person fitted together: they share one identity (shape) and one
//! texture, while each photo keeps its own expression, camera and light. Writes a mesh and
//! the renders per photo, prints how the expressions differ, and checks with dlib's
//! descriptors that the photos do show one person.
//!
//! ```sh
//! cargo run --release --example fit_many -- out/many \
//!     ../shared/data/faces/frl_london/001_neutral.jpg \
//!     ../shared/data/faces/frl_london/001_smiling.jpg
//! ```

use std::path::PathBuf;

use ganfit::losses::face::load_rgb;
use ganfit::morphable::export;
use ganfit::{Fitter, Progress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let out = args
        .next()
        .ok_or("usage: fit_many OUT_DIR PHOTO PHOTO...")?;
    let photos: Vec<PathBuf> = args.collect();
    if photos.len() < 2 {
        return Err("give at least two photos of one person".into());
    }
    let images = photos.iter().map(load_rgb).collect::<Result<Vec<_>, _>>()?;

    let fitter = Fitter::builder().build()?;
    let results = fitter.fit_many_with_progress(&images, |progress| {
        if let Progress::Iteration {
            iteration,
            of,
            loss,
        } = progress
            && (iteration + 1) % 10 == 0
        {
            println!("  iteration {}/{of}: loss {loss:.4}", iteration + 1);
        }
    })?;

    let names = fitter.model().expression_names();
    for (photo, result) in photos.iter().zip(&results) {
        let dir = out.join(photo.file_stem().unwrap_or_default());
        std::fs::create_dir_all(&dir)?;
        result.uv_texture.save(dir.join("texture.png"))?;
        result.mesh_texture.save(dir.join("mesh_texture.png"))?;
        export::write_obj(
            &dir.join("mesh.obj"),
            &result.mesh,
            Some("mesh_texture.png".as_ref()),
        )?;
        result.render.save(dir.join("render.png"))?;
        result.frontal_render.save(dir.join("frontal.png"))?;
        let weights: Vec<f32> = result.params.expression.to_vec1()?;
        let mut strongest: Vec<(&String, f32)> = names.iter().zip(weights).collect();
        strongest.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
        let top: Vec<String> = strongest
            .iter()
            .take(3)
            .map(|(name, weight)| format!("{name} {weight:+.2}"))
            .collect();
        println!(
            "{} -> {}: {}",
            photo.display(),
            dir.display(),
            top.join(", ")
        );
    }
    // The fit trusts that the photos show one person; dlib can tell (under 0.6: one person).
    let faces: Vec<_> = images
        .iter()
        .zip(&results)
        .map(|(image, result)| (image, result.detected_landmarks.as_slice()))
        .collect();
    for (i, &a) in faces.iter().enumerate() {
        for (j, &b) in faces.iter().enumerate().skip(i + 1) {
            if let Some(distance) = fitter.identity_distance(a, b)? {
                let (a, b) = (photos[i].display(), photos[j].display());
                println!("{a} vs {b}: dlib distance {distance:.2}");
            }
        }
    }
    // Shared by construction: every result holds the same identity coefficients.
    let shape: Vec<f32> = results[0].params.shape.to_vec1()?;
    let norm = shape.iter().map(|v| v * v).sum::<f32>().sqrt();
    println!(
        "shared identity: {} coefficients, norm {norm:.2} standard deviations",
        shape.len()
    );
    Ok(())
}
