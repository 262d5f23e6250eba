//! Random faces from the default morphable model: random identity and expression, a random
//! texture (UV maps unwrapped from the shared portraits), random spherical-harmonic light and
//! a random camera, each rendered over a photo background, tiled into one PNG grid.
//!
//! ```sh
//! cargo run --release --example render_random_faces -- 8 out/random_faces.png
//! ```

use std::path::PathBuf;

use ganfit::Fitter;
use ganfit::synthetic::{SyntheticAssets, SyntheticConfig, SyntheticGenerator, shared_dir};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u32 = args.next().map_or(Ok(8), |n| n.parse())?;
    let out = PathBuf::from(args.next().unwrap_or_else(|| "out/random_faces.png".into()));
    if count == 0 {
        return Err("ask for at least one face".into());
    }

    // The fitter only unwraps the portraits' textures (once; they are cached).
    let fitter = Fitter::builder().iterations(0).build()?;
    let shared = shared_dir()?;
    let cache = std::env::temp_dir().join("ganfit-random-faces");
    let assets = SyntheticAssets::from_shared(&shared, &fitter, &cache, 4)?;
    let config = SyntheticConfig {
        image_size: 256,
        noise_std: 0.0,
        jpeg_quality: None,
        ..SyntheticConfig::default()
    };
    let generator = SyntheticGenerator::new(fitter.model(), config, assets)?;

    let columns = count.min(4);
    let rows = count.div_ceil(columns);
    let mut grid = image::RgbImage::new(256 * columns, 256 * rows);
    for index in 0..count {
        let face = generator.generate(u64::from(index))?;
        let [yaw, pitch, _] = face.yaw_pitch_roll_deg;
        println!("face {index}: yaw {yaw:+.0}°, pitch {pitch:+.0}°");
        image::imageops::replace(
            &mut grid,
            &face.image,
            i64::from(256 * (index % columns)),
            i64::from(256 * (index / columns)),
        );
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    grid.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
