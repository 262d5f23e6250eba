//! The rotated square regions that MediaPipe's networks look at, and resampling them into
//! network input tensors.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::{FaceError, Result};

/// A square region of an image, rotated about its centre: what one network input tensor sees.
///
/// Tensor pixel `(u, v)` of an `n`×`n` input samples the image at
/// `center + R(rotation) · ((u/n − ½)·side, (v/n − ½)·side)`, where pixel centres sit on integer
/// coordinates. This is MediaPipe's `ImageToTensorCalculator` convention (an OpenCV perspective
/// warp of the region's corners onto the tensor's corners).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaceRoi {
    /// Centre in image pixels (x, y).
    pub center: [f32; 2],
    /// Side length in image pixels.
    pub side: f32,
    /// Clockwise rotation in radians (image y points down).
    pub rotation: f32,
}

/// What a tensor sample outside the image reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Border {
    /// Black, as the detector's letterbox bars.
    Zero,
    /// The nearest edge pixel, as the landmark crop.
    Replicate,
}

impl FaceRoi {
    /// The whole image, letterboxed into a square (the detector's view).
    pub fn letterbox(width: u32, height: u32) -> Self {
        Self {
            center: [width as f32 / 2.0, height as f32 / 2.0],
            side: width.max(height) as f32,
            rotation: 0.0,
        }
    }

    /// Maps a point in the pixels of an `n`×`n` tensor of this region to image pixels.
    pub fn tensor_to_image(&self, point: [f32; 2], n: f32) -> [f32; 2] {
        let du = (point[0] / n - 0.5) * self.side;
        let dv = (point[1] / n - 0.5) * self.side;
        let (sin, cos) = self.rotation.sin_cos();
        [
            self.center[0] + cos * du - sin * dv,
            self.center[1] + sin * du + cos * dv,
        ]
    }

    /// Resamples the region into a `[1, 3, n, n]` tensor.
    ///
    /// Bilinear sampling, rounded to 8 bits as MediaPipe's OpenCV warp does, then mapped
    /// linearly from `[0, 255]` to `range`.
    pub(crate) fn sample(
        &self,
        image: &RgbImage,
        n: usize,
        border: Border,
        range: (f32, f32),
        device: &Device,
    ) -> Result<Tensor> {
        if image.width() == 0 || image.height() == 0 {
            return Err(FaceError::EmptyImage {
                width: image.width(),
                height: image.height(),
            });
        }
        let (width, height) = (i64::from(image.width()), i64::from(image.height()));
        let raw = image.as_raw();
        let (sin, cos) = (
            f64::from(self.rotation).sin(),
            f64::from(self.rotation).cos(),
        );
        let side = f64::from(self.side);
        let scale = f64::from(range.1 - range.0) / 255.0;
        let plane = n * n;
        let mut out = vec![0f32; 3 * plane];
        let texel = |x: i64, y: i64, c: usize| -> f64 {
            let inside = (0..width).contains(&x) && (0..height).contains(&y);
            if !inside && border == Border::Zero {
                return 0.0;
            }
            let (x, y) = (x.clamp(0, width - 1), y.clamp(0, height - 1));
            f64::from(raw[((y * width + x) * 3) as usize + c])
        };
        for v in 0..n {
            let dv = (v as f64 / n as f64 - 0.5) * side;
            for u in 0..n {
                let du = (u as f64 / n as f64 - 0.5) * side;
                let x = f64::from(self.center[0]) + cos * du - sin * dv;
                let y = f64::from(self.center[1]) + sin * du + cos * dv;
                let (x0, y0) = (x.floor(), y.floor());
                let (fx, fy) = (x - x0, y - y0);
                let (x0, y0) = (x0 as i64, y0 as i64);
                for c in 0..3 {
                    let value = texel(x0, y0, c) * (1.0 - fx) * (1.0 - fy)
                        + texel(x0 + 1, y0, c) * fx * (1.0 - fy)
                        + texel(x0, y0 + 1, c) * (1.0 - fx) * fy
                        + texel(x0 + 1, y0 + 1, c) * fx * fy;
                    let quantised = (value + 0.5).floor().clamp(0.0, 255.0);
                    out[c * plane + v * n + u] = (quantised * scale + f64::from(range.0)) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, (1, 3, n, n), device)?)
    }
}
