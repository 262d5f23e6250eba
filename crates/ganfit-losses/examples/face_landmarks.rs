//! Finds the face in a photo and prints its detection, its 68 iBUG points and how long each
//! network took; with a second argument, also writes the photo with the 468 points drawn on it.
//!
//! ```text
//! cargo run --release -p ganfit-losses --example face_landmarks -- photo.jpg [marked.png]
//! ```

use std::time::Instant;

use candle_core::Device;
use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker, load_rgb};

const RUNS: usize = 11;

/// Median wall time of `RUNS` calls, in milliseconds.
fn median_ms<E>(mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let photo = args
        .next()
        .ok_or("usage: face_landmarks <photo> [marked.png]")?;
    let marked = args.next();

    let device = Device::Cpu;
    let mut image = load_rgb(&photo)?;
    let detector = FaceDetector::new(&device)?;
    let landmarker = FaceLandmarker::new(&device)?;

    let face = detector.detect_face(&image, FaceChoice::Largest)?;
    let landmarks = landmarker.landmarks(&image, &face)?;
    let detect_ms = median_ms(|| detector.detect(&image).map(drop))?;
    let landmark_ms = median_ms(|| landmarker.landmarks(&image, &face).map(drop))?;

    println!(
        "{photo}: {}x{}, face score {:.3}, box {:?}",
        image.width(),
        image.height(),
        face.score,
        face.bbox
    );
    println!("median of {RUNS}: detector {detect_ms:.1} ms, landmarks {landmark_ms:.1} ms (CPU)");
    for (i, [x, y]) in landmarks.to_ibug68().iter().enumerate() {
        println!("ibug {i:2}: {x:8.2} {y:8.2}");
    }
    if let Some(out) = marked {
        for point in &landmarks.points {
            let (x, y) = (point[0].round() as i64, point[1].round() as i64);
            if (0..i64::from(image.width())).contains(&x)
                && (0..i64::from(image.height())).contains(&y)
            {
                image.put_pixel(x as u32, y as u32, image::Rgb([0, 255, 0]));
            }
        }
        image.save(&out)?;
        println!("wrote {out}");
    }
    Ok(())
}
