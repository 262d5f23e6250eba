//! Expression transfer: fits two photos, then renders person A from the front with person B's
//! expression, and with a neutral one. Shows that identity and expression are separate
//! parameters of the fitted model.
//!
//! ```sh
//! cargo run --release --example expression_transfer -- \
//!     ../shared/data/faces/frl_london/002_neutral.jpg \
//!     ../shared/data/faces/frl_london/001_smiling.jpg out/transfer
//! ```

use std::path::PathBuf;

use ganfit::Fitter;
use ganfit::losses::face::load_rgb;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [person, expression_source, rest @ ..] = args.as_slice() else {
        return Err("usage: expression_transfer PERSON_PHOTO EXPRESSION_PHOTO [OUT_DIR]".into());
    };
    let out = rest
        .first()
        .cloned()
        .unwrap_or_else(|| "out/transfer".into());

    let fitter = Fitter::builder().build()?;
    let a = fitter.fit(&load_rgb(person)?)?;
    let b = fitter.fit(&load_rgb(expression_source)?)?;

    std::fs::create_dir_all(&out)?;
    let neutral = a.params.expression.zeros_like()?;
    fitter
        .render_frontal(&a, &neutral, 512)?
        .save(out.join("a_neutral.png"))?;
    fitter
        .render_frontal(&a, &a.params.expression, 512)?
        .save(out.join("a_own_expression.png"))?;
    fitter
        .render_frontal(&a, &b.params.expression, 512)?
        .save(out.join("a_with_b_expression.png"))?;

    let names = fitter.model().expression_names();
    let weights: Vec<f32> = b.params.expression.to_vec1()?;
    let mut strongest: Vec<(&String, f32)> = names.iter().zip(weights).collect();
    strongest.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
    println!("B's strongest blendshapes, now on A:");
    for (name, weight) in strongest.iter().take(5) {
        println!("  {name:>24}: {weight:+.2}");
    }
    println!("wrote {}", out.display());
    Ok(())
}
