//! Projecting a photo onto the ICT face's UV layout with a mask of the pixels off the face:
//! the texels that land on them are flagged, grazing ones included, and left out of the
//! projection kept for views away from the photo. The distance between two posings of the
//! face on the same layout.

use candle_core::{DType, Device, Tensor};
use ganfit_morphable::MorphableModel;
use ganfit_optim::{FitParams, Intrinsics, project_photo_with_view, surface_distances};

const SIZE: usize = 160;
const TEXTURE: usize = 128;

/// The ICT mean face seen from the front, turned a little, filling much of a grey photo.
fn setup() -> (MorphableModel, FitParams, Tensor) {
    let device = Device::Cpu;
    let model = MorphableModel::ict(&ganfit_assets::Resolver::new(), &device).unwrap();
    let params = FitParams {
        shape: Tensor::zeros(model.shape_modes(), DType::F32, &device).unwrap(),
        expression: Tensor::zeros(model.expression_modes(), DType::F32, &device).unwrap(),
        // A half turn about x (model y up, camera y down) and a slight yaw.
        rotation: Tensor::new(&[3.1f32, 0.3, 0.0], &device).unwrap(),
        translation: Tensor::new(&[0.0f32, 10.0, 900.0], &device).unwrap(),
        intrinsics: Intrinsics {
            fx: 900.0,
            fy: 900.0,
            cx: 79.5,
            cy: 79.5,
        },
    };
    let photo = Tensor::full(0.5f32, (SIZE, SIZE, 3), &device).unwrap();
    (model, params, photo)
}

#[test]
fn texels_on_pixels_off_the_face_are_flagged_and_left_out_of_the_face_only_projection() {
    let (model, params, photo) = setup();
    let vertices = model.mean().clone();
    let project = |mask: Option<&(dyn Fn(usize, usize) -> bool + Sync)>| {
        project_photo_with_view(&model, &vertices, &params, &photo, TEXTURE, mask).unwrap()
    };
    let unmasked = project(None);
    assert!(!unmasked.off_face.contains(&true), "no mask flags nothing");

    // The photo's right half off the face.
    let masked = project(Some(&|column, _| column >= SIZE / 2));
    assert_eq!(
        masked.texture, unmasked.texture,
        "the mask changes no colour"
    );
    let seen = |t: usize| masked.texture.observed[t] > 0.0;
    let texels = 0..TEXTURE * TEXTURE;
    let seen_off = texels
        .clone()
        .filter(|&t| seen(t) && masked.off_face[t])
        .count();
    let seen_on = texels
        .clone()
        .filter(|&t| seen(t) && !masked.off_face[t])
        .count();
    let grazing_off = texels
        .clone()
        .filter(|&t| !seen(t) && masked.off_face[t])
        .count();
    eprintln!("seen off the face {seen_off}, on it {seen_on}, flagged unseen {grazing_off}");
    assert!(
        seen_off > 500 && seen_on > 500,
        "both halves of the face are seen"
    );
    assert!(
        grazing_off > 0,
        "texels too grazing to take colour from still show the pixels they cover"
    );

    let on_face = masked.on_face();
    for t in texels {
        let kept = on_face.texture.observed[t] > 0.0;
        assert_eq!(kept, seen(t) && !masked.off_face[t], "texel {t}");
        assert_eq!(on_face.pixels_per_mm[t] > 0.0, kept, "texel {t}'s detail");
    }
}

#[test]
fn surface_distances_measure_each_pair_of_posings_on_the_uv_layout() {
    let (model, _, _) = setup();
    let mean = model.mean().clone();
    let moved = Tensor::new(&[[3.0f32, 0.0, 4.0]], &Device::Cpu).unwrap();
    let shifted = mean.broadcast_add(&moved).unwrap();
    let pairs = [(&shifted, &mean), (&mean, &mean)];
    let distances = surface_distances(&model, &pairs, TEXTURE).unwrap();
    assert_eq!(distances.len(), 2);
    // 5 mm wherever the layout has the face's surface, which moved by (3, 0, 4) mm; 0 off
    // the layout and wherever the face stayed.
    let on_layout = distances[0].iter().filter(|&&d| d > 0.0).count();
    assert!(
        on_layout > TEXTURE * TEXTURE / 4 && on_layout < TEXTURE * TEXTURE,
        "{on_layout} texels on the layout"
    );
    for (&far, &still) in distances[0].iter().zip(&distances[1]) {
        assert!(far == 0.0 || (far - 5.0).abs() < 1e-3, "{far}");
        assert_eq!(still, 0.0);
    }
    assert!(surface_distances(&model, &[], TEXTURE).unwrap().is_empty());
}
