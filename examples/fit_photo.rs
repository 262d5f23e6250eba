//! Fits one photo with the default models and writes the mesh (OBJ, and glTF animatable by
//! the expression blendshapes), its texture and renders: the library version of `ganfit fit`.
//!
//! ```sh
//! cargo run --release --example fit_photo -- examples/data/astronaut.png out/example
//! ```

use std::path::PathBuf;

use ganfit::Fitter;
use ganfit::losses::face::load_rgb;
use ganfit::morphable::export;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let photo = PathBuf::from(args.next().ok_or("usage: fit_photo PHOTO [OUT_DIR]")?);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "out/example".into()));

    let fitter = Fitter::builder().build()?;
    let image = load_rgb(&photo)?;
    let result = fitter.fit(&image)?;

    std::fs::create_dir_all(&out)?;
    result.uv_texture.save(out.join("texture.png"))?;
    result.mesh_texture.save(out.join("mesh_texture.png"))?;
    export::write_obj(
        &out.join("mesh.obj"),
        &result.mesh,
        Some("mesh_texture.png".as_ref()),
    )?;
    let (neutral, expressions) = fitter.head_with_expressions(&result)?;
    export::write_glb_with_targets(
        &out.join("mesh.glb"),
        &neutral,
        Some(&result.mesh_texture),
        &expressions,
    )?;
    result.render.save(out.join("render.png"))?;
    result.frontal_render.save(out.join("frontal.png"))?;
    if let Some(albedo) = &result.albedo {
        albedo.save(out.join("albedo.png"))?;
    }
    for (step, time) in &result.timings {
        println!("{step:>20}: {:.2} s", time.as_secs_f64());
    }
    for stage in &result.stages {
        println!(
            "{:>20}: loss {:.3e} after {} iterations",
            stage.name,
            stage.best_loss,
            stage.history.len()
        );
        for (record, when) in [
            (stage.history.first(), "first"),
            (stage.history.last(), "last"),
        ] {
            let terms: Vec<String> = record
                .into_iter()
                .flat_map(|r| &r.terms)
                .map(|(name, value)| format!("{name} {value:.2e}"))
                .collect();
            println!("{:>20}  {when}: {}", "", terms.join(", "));
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
