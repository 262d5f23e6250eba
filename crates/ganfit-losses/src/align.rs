//! Alignment of faces to dlib's canonical 150×150 chip.
//!
//! [`chip_transform`] fits, as dlib's `get_face_chip_details` does, the least-squares similarity
//! transform from a canonical landmark template (dlib's 5-point or 68-point mean face, widened by
//! the padding) to the photo's landmarks. [`ChipWarp`] then samples any image through that
//! transform with ganfit-render's bilinear texture op, so gradients flow back to the image (on
//! the GPU too, scattered in parallel): a render warped with the photo's transform lands exactly
//! where the photo's chip does.

use candle_core::{DType, Device, Tensor};
use ganfit_render::WrapMode;

use crate::identity::INPUT_SIZE;
use crate::{LossError, Result};

/// Padding dlib's face recogniser expects around the face (`get_face_chip(..., padding=0.25)`).
pub const DLIB_CHIP_PADDING: f64 = 0.25;

/// dlib's template for its 5-point landmarks (`shape_predictor_5_face_landmarks`), in units of
/// the unpadded chip.
const TEMPLATE_5: [[f64; 2]; 5] = [
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
];

/// dlib's mean face for iBUG points 17–67, in units of the unpadded chip.
const MEAN_FACE_68_X: [f64; 51] = [
    0.000213256,
    0.0752622,
    0.18113,
    0.29077,
    0.393397,
    0.586856,
    0.689483,
    0.799124,
    0.904991,
    0.98004,
    0.490127,
    0.490127,
    0.490127,
    0.490127,
    0.36688,
    0.426036,
    0.490127,
    0.554217,
    0.613373,
    0.121737,
    0.187122,
    0.265825,
    0.334606,
    0.260918,
    0.182743,
    0.645647,
    0.714428,
    0.793132,
    0.858516,
    0.79751,
    0.719335,
    0.254149,
    0.340985,
    0.428858,
    0.490127,
    0.551395,
    0.639268,
    0.726104,
    0.642159,
    0.556721,
    0.490127,
    0.423532,
    0.338094,
    0.290379,
    0.428096,
    0.490127,
    0.552157,
    0.689874,
    0.553364,
    0.490127,
    0.42689,
];
const MEAN_FACE_68_Y: [f64; 51] = [
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
    0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345,
    0.587326, 0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852,
    0.178758, 0.216423, 0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388,
    0.745405, 0.780233, 0.864805, 0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746,
    0.785343, 0.778746, 0.784792, 0.824182, 0.831803, 0.824182,
];

/// A 2-D similarity transform `p ↦ [[a, −b], [b, a]]·p + t` (rotation, uniform scale,
/// translation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimilarityTransform {
    /// `scale·cos(angle)`.
    pub a: f64,
    /// `scale·sin(angle)`.
    pub b: f64,
    /// Translation.
    pub t: [f64; 2],
}

impl SimilarityTransform {
    /// The least-squares similarity transform taking each `from[i]` to `to[i]`.
    pub fn fit(from: &[[f64; 2]], to: &[[f64; 2]]) -> Result<Self> {
        if from.len() != to.len() || from.len() < 2 {
            return Err(LossError::Alignment {
                reason: format!(
                    "a similarity transform needs at least 2 point pairs, got {} and {}",
                    from.len(),
                    to.len()
                ),
            });
        }
        let n = from.len() as f64;
        let centroid = |pts: &[[f64; 2]]| {
            let s = pts
                .iter()
                .fold([0.0, 0.0], |acc, p| [acc[0] + p[0], acc[1] + p[1]]);
            [s[0] / n, s[1] / n]
        };
        let (cf, ct) = (centroid(from), centroid(to));
        let (mut dot, mut cross, mut spread) = (0.0, 0.0, 0.0);
        for (p, q) in from.iter().zip(to) {
            let (px, py) = (p[0] - cf[0], p[1] - cf[1]);
            let (qx, qy) = (q[0] - ct[0], q[1] - ct[1]);
            dot += px * qx + py * qy;
            cross += px * qy - py * qx;
            spread += px * px + py * py;
        }
        let finite = from.iter().chain(to).flatten().all(|v| v.is_finite());
        if !finite || spread.is_nan() || spread <= 1e-12 {
            return Err(LossError::Alignment {
                reason: "the landmarks are not finite or all coincide".into(),
            });
        }
        let (a, b) = (dot / spread, cross / spread);
        if a.hypot(b) < 1e-12 {
            return Err(LossError::Alignment {
                reason: "the landmarks all coincide".into(),
            });
        }
        Ok(Self {
            a,
            b,
            t: [
                ct[0] - (a * cf[0] - b * cf[1]),
                ct[1] - (b * cf[0] + a * cf[1]),
            ],
        })
    }

    /// Maps a point.
    pub fn apply(&self, p: [f64; 2]) -> [f64; 2] {
        [
            self.a * p[0] - self.b * p[1] + self.t[0],
            self.b * p[0] + self.a * p[1] + self.t[1],
        ]
    }

    /// The uniform scale factor.
    pub fn scale(&self) -> f64 {
        self.a.hypot(self.b)
    }

    /// The rotation angle in radians.
    pub fn angle(&self) -> f64 {
        self.b.atan2(self.a)
    }

    /// The pixel mapping dlib's `extract_image_chip` actually samples with for a `size`×`size`
    /// chip whose fitted transform is `self`.
    ///
    /// dlib turns the fit into a rectangle of `size·scale` pixels centred on the image of the chip
    /// centre (`self` applied to (size/2, size/2)) and maps the rectangle's corner pixels to the
    /// chip's corner pixels, so chip pixel `(size − 1)/2` lands on that centre and neighbouring
    /// chip pixels are `(size·scale − 1)/(size − 1)` image pixels apart instead of `scale`.
    pub fn dlib_chip_sampling(&self, size: usize) -> Self {
        let n = size as f64;
        let scale = self.scale();
        let k = (n * scale - 1.0) / ((n - 1.0) * scale);
        let (a, b) = (self.a * k, self.b * k);
        let centre = self.apply([n / 2.0; 2]);
        let c = (n - 1.0) / 2.0;
        Self {
            a,
            b,
            t: [centre[0] - (a * c - b * c), centre[1] - (b * c + a * c)],
        }
    }
}

/// The transform from pixel coordinates of a `size`×`size` chip to the photo, fitted to 5
/// (dlib's `shape_predictor_5_face_landmarks` order) or 68 (iBUG order) landmarks in photo
/// pixels, exactly as dlib's `get_face_chip_details(shape, size, padding)`. Like dlib, the 68-point
/// fit ignores the jaw, eyebrows and lower lip.
pub fn chip_transform(
    landmarks: &[[f64; 2]],
    size: usize,
    padding: f64,
) -> Result<SimilarityTransform> {
    let chip = |p: [f64; 2]| {
        let scale = size as f64 / (2.0 * padding + 1.0);
        [(padding + p[0]) * scale, (padding + p[1]) * scale]
    };
    let (from, to): (Vec<[f64; 2]>, Vec<[f64; 2]>) = match landmarks.len() {
        5 => TEMPLATE_5
            .iter()
            .map(|&p| chip(p))
            .zip(landmarks.iter().copied())
            .unzip(),
        68 => (17..68)
            .filter(|i| !((55..=59).contains(i) || (65..=67).contains(i) || (17..=26).contains(i)))
            .map(|i| {
                (
                    chip([MEAN_FACE_68_X[i - 17], MEAN_FACE_68_Y[i - 17]]),
                    landmarks[i],
                )
            })
            .unzip(),
        n => {
            return Err(LossError::Alignment {
                reason: format!("expected 5 or 68 landmarks, got {n}"),
            });
        }
    };
    SimilarityTransform::fit(&from, &to)
}

/// Bilinear resampling of images through a fixed chip → image transform, differentiable with
/// respect to the images.
///
/// Pixel centres sit at integer coordinates. As in dlib, a chip pixel whose 2×2 neighbourhood is
/// not entirely inside the image is black.
#[derive(Debug, Clone)]
pub struct ChipWarp {
    /// Where every chip pixel samples the image, as texture coordinates of
    /// [`ganfit_render::texture`] (`[1, size, size, 2]`).
    uv: Tensor,
    /// 1 where the pixel's 2×2 neighbourhood lies inside the image, 0 elsewhere
    /// (`[1, size, size, 1]`).
    inside: Tensor,
    source: (usize, usize),
    size: usize,
}

impl ChipWarp {
    /// A warp producing `size`×`size` chips from `height`×`width` images.
    pub fn new(
        transform: &SimilarityTransform,
        height: usize,
        width: usize,
        size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = size * size;
        let mut uv = Vec::with_capacity(2 * n);
        let mut inside = Vec::with_capacity(n);
        for r in 0..size {
            for c in 0..size {
                let [x, y] = transform.apply([c as f64, r as f64]);
                let within = x >= 0.0
                    && y >= 0.0
                    && x.floor() + 1.0 < width as f64
                    && y.floor() + 1.0 < height as f64;
                inside.push(if within { 1.0 } else { 0.0 });
                // The texture op puts texel centres at (i + 0.5) / extent.
                uv.extend([(x + 0.5) / width as f64, (y + 0.5) / height as f64]);
            }
        }
        Ok(Self {
            uv: Tensor::from_vec(uv, (1, size, size, 2), device)?.to_dtype(dtype)?,
            inside: Tensor::from_vec(inside, (1, size, size, 1), device)?.to_dtype(dtype)?,
            source: (height, width),
            size,
        })
    }

    /// The warp to dlib's 150×150 face-recognition chip (padding 0.25) for a photo with the
    /// given landmarks: [`chip_transform`] sampled as dlib's `get_face_chip` samples it
    /// ([`SimilarityTransform::dlib_chip_sampling`]).
    pub fn dlib_chip(
        landmarks: &[[f64; 2]],
        height: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let transform = chip_transform(landmarks, INPUT_SIZE, DLIB_CHIP_PADDING)?;
        let sampling = transform.dlib_chip_sampling(INPUT_SIZE);
        Self::new(&sampling, height, width, INPUT_SIZE, dtype, device)
    }

    /// Warps `[B, C, H, W]` images to `[B, C, size, size]` chips.
    pub fn apply(&self, images: &Tensor) -> Result<Tensor> {
        let (h, w) = self.source;
        self.check_source(images, [2, 3], format!("[B, C, {h}, {w}]"))?;
        self.apply_channels_last(&images.permute((0, 2, 3, 1))?)
    }

    /// Warps `[B, H, W, C]` images (channels last, as renders come) to `[B, C, size, size]`
    /// chips.
    pub fn apply_channels_last(&self, images: &Tensor) -> Result<Tensor> {
        let (h, w) = self.source;
        self.check_source(images, [1, 2], format!("[B, {h}, {w}, C]"))?;
        let batch = images.dim(0)?;
        let uv = self
            .uv
            .to_dtype(images.dtype())?
            .broadcast_as((batch, self.size, self.size, 2))?;
        let chips = ganfit_render::texture(&images.contiguous()?, &uv, WrapMode::Clamp)?
            .broadcast_mul(&self.inside.to_dtype(images.dtype())?)?;
        Ok(chips.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Checks that `images` are rank 4 with the source's height and width at `axes`.
    fn check_source(&self, images: &Tensor, axes: [usize; 2], expected: String) -> Result<()> {
        let dims = images.dims();
        if dims.len() != 4 || (dims[axes[0]], dims[axes[1]]) != self.source {
            return Err(LossError::InputShape {
                what: "images to warp",
                expected,
                actual: dims.to_vec(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_gradient, seeded_tensor};

    #[test]
    fn fit_recovers_an_exact_similarity() -> Result<()> {
        let truth = SimilarityTransform {
            a: 1.3 * 0.4f64.cos(),
            b: 1.3 * 0.4f64.sin(),
            t: [10.0, -4.0],
        };
        let from = [[0.0, 0.0], [5.0, 1.0], [2.0, 7.0], [-3.0, 2.0]];
        let to: Vec<[f64; 2]> = from.iter().map(|&p| truth.apply(p)).collect();
        let fit = SimilarityTransform::fit(&from, &to)?;
        assert!((fit.a - truth.a).abs() < 1e-12 && (fit.b - truth.b).abs() < 1e-12);
        assert!((fit.t[0] - truth.t[0]).abs() < 1e-12 && (fit.t[1] - truth.t[1]).abs() < 1e-12);
        assert!((fit.scale() - 1.3).abs() < 1e-12 && (fit.angle() - 0.4).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn dlib_sampling_maps_chip_corners_to_the_rectangle_corners() {
        let (scale, angle) = (2.5f64, 0.2f64);
        let fit = SimilarityTransform {
            a: scale * angle.cos(),
            b: scale * angle.sin(),
            t: [40.0, 30.0],
        };
        let sampling = fit.dlib_chip_sampling(150);
        // dlib's rectangle is 150·scale pixels wide (its corner pixels 150·scale − 1 apart),
        // centred on the fit's image of the chip centre, rotated by the fit's angle.
        let centre = fit.apply([75.0, 75.0]);
        let half = (150.0 * scale - 1.0) / 2.0;
        let (cos, sin) = (angle.cos(), angle.sin());
        for (chip, (dx, dy)) in [([0.0, 0.0], (-half, -half)), ([149.0, 149.0], (half, half))] {
            let expected = [
                centre[0] + cos * dx - sin * dy,
                centre[1] + sin * dx + cos * dy,
            ];
            let got = sampling.apply(chip);
            assert!((got[0] - expected[0]).abs() < 1e-9 && (got[1] - expected[1]).abs() < 1e-9);
        }
        assert!((sampling.angle() - angle).abs() < 1e-12);
    }

    #[test]
    fn degenerate_landmarks_are_errors() {
        assert!(chip_transform(&[[1.0, 1.0]; 5], 150, 0.25).is_err());
        assert!(chip_transform(&[[1.0, 1.0]; 7], 150, 0.25).is_err());
        assert!(chip_transform(&[[f64::NAN, 1.0]; 5], 150, 0.25).is_err());
    }

    #[test]
    fn identity_warp_copies_the_image_and_marks_the_border_black() -> Result<()> {
        let id = SimilarityTransform {
            a: 1.0,
            b: 0.0,
            t: [0.0, 0.0],
        };
        let img = seeded_tensor(&[1, 2, 5, 5], 3)?;
        let warp = ChipWarp::new(&id, 5, 5, 5, DType::F64, &Device::Cpu)?;
        let out = warp.apply(&img)?;
        let inner =
            (out.narrow(2, 0, 4)?.narrow(3, 0, 4)? - img.narrow(2, 0, 4)?.narrow(3, 0, 4)?)?;
        assert!(inner.abs()?.max_all()?.to_scalar::<f64>()? < 1e-15);
        // The last row and column have no right/bottom neighbour: black, as in dlib.
        assert_eq!(
            out.narrow(3, 4, 1)?.abs()?.sum_all()?.to_scalar::<f64>()?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn warp_interpolates_bilinearly_and_its_gradient_matches_finite_differences() -> Result<()> {
        let t = SimilarityTransform {
            a: 0.9 * 0.3f64.cos(),
            b: 0.9 * 0.3f64.sin(),
            t: [1.7, 0.4],
        };
        let img = seeded_tensor(&[2, 1, 6, 7], 5)?;
        let warp = ChipWarp::new(&t, 6, 7, 4, DType::F64, &Device::Cpu)?;
        let out: Vec<Vec<f64>> = warp.apply(&img)?.get(1)?.get(0)?.to_vec2()?;
        let src: Vec<Vec<f64>> = img.get(1)?.get(0)?.to_vec2()?;
        let [x, y] = t.apply([2.0, 1.0]);
        let (l, tp) = (x.floor() as usize, y.floor() as usize);
        let (fx, fy) = (x - x.floor(), y - y.floor());
        let expected = src[tp][l] * (1.0 - fx) * (1.0 - fy)
            + src[tp][l + 1] * fx * (1.0 - fy)
            + src[tp + 1][l] * (1.0 - fx) * fy
            + src[tp + 1][l + 1] * fx * fy;
        assert!((out[1][2] - expected).abs() < 1e-12);
        let channels_last = warp.apply_channels_last(&img.permute((0, 2, 3, 1))?)?;
        assert_eq!(
            (warp.apply(&img)? - channels_last)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?,
            0.0
        );
        Ok(check_input_gradient(
            &img,
            |x| warp.apply(x).map_err(candle_core::Error::wrap),
            1e-6,
        )?)
    }
}
