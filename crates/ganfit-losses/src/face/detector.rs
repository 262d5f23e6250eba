//! MediaPipe's BlazeFace short-range face detector: network, SSD anchors, decoding and weighted
//! non-maximum suppression, following `face_detection_short_range.pbtxt` of MediaPipe 0.10.21.

use std::path::Path;

use candle_core::{D, Device, Tensor};
use ganfit_assets::Resolver;
use image::RgbImage;

use super::crop::{Border, FaceRoi};
use super::layers::{Activation, Conv, Padding, Residual, Weights};
use super::{FaceError, Result};

/// Asset id of the converted detector weights in `weights-manifest.toml`.
pub const DETECTOR_ASSET: &str = "mediapipe-face-detection-short-range";

/// Side of the detector's square input tensor.
pub const DETECTOR_INPUT: usize = 128;

const KEYPOINTS: usize = 6;

/// A detected face in image pixels (or, from [`FaceDetector::detect_in_tensor`], in the pixels
/// of the 128×128 input tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Probability that this is a face, in `[0, 1]`.
    pub score: f32,
    /// Axis-aligned box `[xmin, ymin, xmax, ymax]`.
    pub bbox: [f32; 4],
    /// Six points (x, y): the subject's right eye, left eye, nose tip, mouth centre, right ear
    /// tragion, left ear tragion — "right" as the subject sees it, so the right eye appears on
    /// the left of a frontal photo.
    pub keypoints: [[f32; 2]; KEYPOINTS],
}

impl Detection {
    /// The longer side of the bounding box.
    pub fn size(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(self.bbox[3] - self.bbox[1])
    }

    fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }

    fn iou(&self, other: &Self) -> f32 {
        let w = self.bbox[2].min(other.bbox[2]) - self.bbox[0].max(other.bbox[0]);
        let h = self.bbox[3].min(other.bbox[3]) - self.bbox[1].max(other.bbox[1]);
        if w <= 0.0 || h <= 0.0 {
            return 0.0;
        }
        let intersection = w * h;
        intersection / (self.area() + other.area() - intersection)
    }

    /// The same detection with every point mapped through `f`.
    fn map(&self, f: impl Fn([f32; 2]) -> [f32; 2]) -> Self {
        let [x0, y0] = f([self.bbox[0], self.bbox[1]]);
        let [x1, y1] = f([self.bbox[2], self.bbox[3]]);
        Self {
            score: self.score,
            bbox: [x0, y0, x1, y1],
            keypoints: self.keypoints.map(f),
        }
    }
}

/// Which face [`FaceDetector::detect_face`] returns when there are several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaceChoice {
    /// The one with the largest bounding box.
    #[default]
    Largest,
    /// The one the detector is most confident about.
    MostConfident,
    /// The n-th in the order [`FaceDetector::detect`] returns (by decreasing confidence).
    Index(usize),
    /// The n-th from the left of the photo by the centre of its box, 0 the leftmost: how a
    /// person counts the faces of a group photo.
    FromLeft(usize),
}

/// Thresholds of the detector; the defaults are MediaPipe's plus ganfit's minimum face size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorOptions {
    /// Minimum face probability.
    pub min_score: f32,
    /// Boxes overlapping more than this (intersection over union) are merged.
    pub nms_threshold: f32,
    /// [`FaceDetector::detect_face`] rejects faces whose box is smaller than this, in pixels.
    pub min_face_px: f32,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            min_score: 0.5,
            nms_threshold: 0.3,
            min_face_px: 40.0,
        }
    }
}

/// The least score a detection in one of [`FaceDetector::detect`]'s windows must have.
const WINDOW_MIN_SCORE: f32 = 0.75;

struct BlazeFace {
    stem: Conv,
    /// Blocks up to the 16×16 feature map that feeds the first head.
    fine: Vec<Residual>,
    /// Blocks from there down to 8×8.
    coarse: Vec<Residual>,
    classifier_16: Conv,
    regressor_16: Conv,
    classifier_8: Conv,
    regressor_8: Conv,
}

/// Residual blocks, named `depthwise_conv2d[_i]` + `conv2d_{i+1}`; they widen from 24 to 96
/// channels, and those listed in `STRIDE_2` halve the resolution: 64→32, 32→16, 16→8.
const BLOCKS: usize = 16;
const STRIDE_2: [usize; 3] = [2, 5, 11];
/// Blocks before this index run at or above 16×16 and feed the stride-8 head.
const FINE_BLOCKS: usize = 11;

impl BlazeFace {
    fn load(w: &Weights) -> Result<Self> {
        let mut blocks = (0..BLOCKS)
            .map(|i| {
                let depthwise = match i {
                    0 => "depthwise_conv2d".to_string(),
                    i => format!("depthwise_conv2d_{i}"),
                };
                let stride = if STRIDE_2.contains(&i) { 2 } else { 1 };
                let block = Residual::new(
                    w,
                    &depthwise,
                    &format!("conv2d_{}", i + 1),
                    stride,
                    Activation::Relu,
                )?;
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let coarse = blocks.split_off(FINE_BLOCKS);
        Ok(Self {
            stem: Conv::new(w, "conv2d", 2, Padding::Same)?,
            fine: blocks,
            coarse,
            classifier_8: Conv::new(w, "classificator_8", 1, Padding::Valid)?,
            regressor_8: Conv::new(w, "regressor_8", 1, Padding::Valid)?,
            classifier_16: Conv::new(w, "classificator_16", 1, Padding::Valid)?,
            regressor_16: Conv::new(w, "regressor_16", 1, Padding::Valid)?,
        })
    }

    /// `[1, 3, 128, 128]` in `[-1, 1]` → (regressors `[896, 16]`, logits `[896]`), anchors in
    /// the order of [`anchors`].
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.stem.forward(x)?.relu()?;
        for block in &self.fine {
            x = block.forward(&x)?;
        }
        let fine = x.clone();
        for block in &self.coarse {
            x = block.forward(&x)?;
        }
        // tflite reshapes NHWC maps, so anchors run over (row, column, anchor-in-cell).
        let flatten = |conv: &Conv, map: &Tensor, values: usize| -> Result<Tensor> {
            let y = conv.forward(map)?.permute((0, 2, 3, 1))?;
            Ok(y.contiguous()?.reshape(((), values))?)
        };
        let regressors = Tensor::cat(
            &[
                flatten(&self.regressor_8, &fine, 16)?,
                flatten(&self.regressor_16, &x, 16)?,
            ],
            0,
        )?;
        let logits = Tensor::cat(
            &[
                flatten(&self.classifier_8, &fine, 1)?,
                flatten(&self.classifier_16, &x, 1)?,
            ],
            0,
        )?
        .squeeze(D::Minus1)?;
        Ok((regressors, logits))
    }
}

/// Anchor centres in tensor pixels: MediaPipe's SSD anchors for 4 layers with strides
/// 8, 16, 16, 16, one aspect ratio plus the interpolated one, and fixed unit size — which gives
/// 2 anchors per cell of the 16×16 grid, then 6 per cell of the 8×8 grid.
fn anchors() -> Vec<[f32; 2]> {
    let mut out = Vec::with_capacity(896);
    for (grid, per_cell) in [(16usize, 2usize), (8, 6)] {
        for y in 0..grid {
            for x in 0..grid {
                let cell = DETECTOR_INPUT as f32 / grid as f32;
                let centre = [(x as f32 + 0.5) * cell, (y as f32 + 0.5) * cell];
                out.extend(std::iter::repeat_n(centre, per_cell));
            }
        }
    }
    out
}

/// MediaPipe's weighted NMS: repeatedly takes the most confident remaining detection, and
/// replaces it with the score-weighted mean of every remaining detection that overlaps it by
/// more than `threshold` (itself included), keeping its score.
fn weighted_nms(mut detections: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    detections.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out = Vec::new();
    while let Some(top) = detections.first().cloned() {
        let (group, rest): (Vec<_>, Vec<_>) = detections
            .into_iter()
            .partition(|d| d.iou(&top) > threshold);
        detections = rest;
        let total: f32 = group.iter().map(|d| d.score).sum();
        let mut merged = top.clone();
        merged.bbox =
            std::array::from_fn(|j| group.iter().map(|d| d.bbox[j] * d.score).sum::<f32>() / total);
        merged.keypoints = std::array::from_fn(|k| {
            std::array::from_fn(|j| {
                group
                    .iter()
                    .map(|d| d.keypoints[k][j] * d.score)
                    .sum::<f32>()
                    / total
            })
        });
        out.push(merged);
    }
    out
}

/// Finds faces with MediaPipe's BlazeFace short-range model, made for faces within about 2 m
/// of the camera (portraits); [`FaceDetector::detect`] also searches windows of the image for
/// faces further away or in large photos.
pub struct FaceDetector {
    net: BlazeFace,
    anchors: Vec<[f32; 2]>,
    options: DetectorOptions,
    device: Device,
}

impl std::fmt::Debug for FaceDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceDetector")
            .field("options", &self.options)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl FaceDetector {
    /// Loads the embedded default weights through the asset resolver
    /// (id [`DETECTOR_ASSET`]), verifying their checksum.
    pub fn new(device: &Device) -> Result<Self> {
        Self::from_resolver(&Resolver::new(), device)
    }

    /// Loads the weights that `resolver` finds for [`DETECTOR_ASSET`].
    pub fn from_resolver(resolver: &Resolver, device: &Device) -> Result<Self> {
        Self::from_file(resolver.resolve(DETECTOR_ASSET)?, device)
    }

    /// Loads converted weights from a safetensors file, without checksum verification.
    pub fn from_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let weights = Weights::load(path.as_ref(), device)?;
        Ok(Self {
            net: BlazeFace::load(&weights)?,
            anchors: anchors(),
            options: DetectorOptions::default(),
            device: device.clone(),
        })
    }

    /// Replaces the thresholds.
    pub fn with_options(mut self, options: DetectorOptions) -> Self {
        self.options = options;
        self
    }

    /// The thresholds in use.
    pub fn options(&self) -> DetectorOptions {
        self.options
    }

    /// The network input for `image`: the whole image letterboxed into 128×128, black bars,
    /// values in `[-1, 1]`; returns the tensor `[1, 3, 128, 128]` and the region it shows.
    pub fn input_tensor(&self, image: &RgbImage) -> Result<(Tensor, FaceRoi)> {
        let roi = FaceRoi::letterbox(image.width(), image.height());
        let tensor = roi.sample(
            image,
            DETECTOR_INPUT,
            Border::Zero,
            (-1.0, 1.0),
            &self.device,
        )?;
        Ok((tensor, roi))
    }

    /// Runs the network on a prepared `[1, 3, 128, 128]` input and returns the merged
    /// detections in tensor pixels, most confident first.
    pub fn detect_in_tensor(&self, input: &Tensor) -> Result<Vec<Detection>> {
        self.detect_in_tensor_above(input, self.options.min_score)
    }

    /// [`Self::detect_in_tensor`] with another minimum score.
    fn detect_in_tensor_above(&self, input: &Tensor, min_score: f32) -> Result<Vec<Detection>> {
        let (regressors, logits) = self.net.forward(input)?;
        let regressors = regressors.to_vec2::<f32>()?;
        let logits = logits.to_vec1::<f32>()?;
        let candidates = self
            .anchors
            .iter()
            .zip(regressors.iter().zip(&logits))
            .filter_map(|(anchor, (r, &logit))| {
                let score = 1.0 / (1.0 + (-logit.clamp(-100.0, 100.0)).exp());
                if score < min_score {
                    return None;
                }
                let (cx, cy) = (r[0] + anchor[0], r[1] + anchor[1]);
                Some(Detection {
                    score,
                    bbox: [
                        cx - r[2] / 2.0,
                        cy - r[3] / 2.0,
                        cx + r[2] / 2.0,
                        cy + r[3] / 2.0,
                    ],
                    keypoints: std::array::from_fn(|k| {
                        [r[4 + 2 * k] + anchor[0], r[5 + 2 * k] + anchor[1]]
                    }),
                })
            })
            .collect();
        Ok(weighted_nms(candidates, self.options.nms_threshold))
    }

    /// Every face in `image`, in image pixels, most confident first (possibly none).
    ///
    /// The whole image is searched first, as MediaPipe does. The short-range model finds faces
    /// that fill at least a fifth or so of its view, so when that finds none (a person further
    /// away, a group, a high-resolution photo) overlapping windows of half, a quarter and an
    /// eighth of the image's shorter side are searched in turn (first as wide as the shorter
    /// side, in an image at least twice as long as it is wide or the other way round), down to
    /// windows three times [`DetectorOptions::min_face_px`]; the first window size that finds a
    /// face is kept.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        let (input, roi) = self.input_tensor(image)?;
        let n = DETECTOR_INPUT as f32;
        let whole: Vec<Detection> = self
            .detect_in_tensor(&input)?
            .iter()
            .map(|d| d.map(|p| roi.tensor_to_image(p, n)))
            .collect();
        if !whole.is_empty() {
            return Ok(whole);
        }
        let shorter = image.width().min(image.height()) as f32;
        let longer = image.width().max(image.height()) as f32;
        // A long strip letterboxed whole shrinks its faces by its length: squares as wide as
        // the strip see them at the size a square photo would.
        let strip = (longer >= 2.0 * shorter).then_some(1.0);
        for fraction in strip.into_iter().chain([0.5, 0.25, 0.125]) {
            let window = shorter * fraction;
            if window < 3.0 * self.options.min_face_px {
                break;
            }
            let found = self.detect_in_windows(image, window)?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
        Ok(Vec::new())
    }

    /// Faces in square windows of side `window` pixels that overlap by half, each window seen
    /// through an image reduced (with a proper low-pass filter, unlike the whole-image pass's
    /// plain bilinear sampling) so that it is the network's 128 pixels wide. A face no wider
    /// than half a window lies wholly inside one of them; detections that touch a window's
    /// edge are dropped as cut off, the rest merged across windows.
    fn detect_in_windows(&self, image: &RgbImage, window: f32) -> Result<Vec<Detection>> {
        let n = DETECTOR_INPUT as f32;
        let scale = (n / window).min(1.0);
        let reduced;
        let view = if scale < 1.0 {
            let size = |side: u32| ((side as f32 * scale).round() as u32).max(1);
            reduced = image::imageops::resize(
                image,
                size(image.width()),
                size(image.height()),
                image::imageops::FilterType::Triangle,
            );
            &reduced
        } else {
            image
        };
        let side = window * scale;
        let centres = |length: u32| {
            let length = length as f32;
            let steps = ((length - side) / (side / 2.0)).ceil().max(0.0) as usize;
            (0..=steps).map(move |i| {
                if steps == 0 {
                    length / 2.0
                } else {
                    side / 2.0 + i as f32 * (length - side) / steps as f32
                }
            })
        };
        // Reduced pixel i covers the image's [i, i + 1) / scale; centres sit on integers.
        let to_image = |v: f32| (v + 0.5) / scale - 0.5;
        let margin = 0.02 * n;
        // Dozens of views give the network dozens of chances at a false positive (a patterned
        // shirt, a face-like badge): only confident detections count here.
        let min_score = self.options.min_score.max(WINDOW_MIN_SCORE);
        let keep = |d: &Detection| {
            d.score >= min_score && d.bbox.iter().all(|&c| c > margin && c < n - margin)
        };
        let mut found = Vec::new();
        for cy in centres(view.height()) {
            for cx in centres(view.width()) {
                let roi = FaceRoi {
                    center: [cx, cy],
                    side,
                    rotation: 0.0,
                };
                let input = roi.sample(
                    view,
                    DETECTOR_INPUT,
                    Border::Zero,
                    (-1.0, 1.0),
                    &self.device,
                )?;
                found.extend(
                    self.detect_in_tensor(&input)?
                        .iter()
                        .filter(|d| keep(d))
                        .map(|d| d.map(|p| roi.tensor_to_image(p, n).map(to_image))),
                );
            }
        }
        Ok(weighted_nms(found, self.options.nms_threshold))
    }

    /// The one face to work on: [`FaceError::NoFaceFound`] when there is none, the face chosen by
    /// `choice` when there are several, [`FaceError::FaceTooSmall`] when it is smaller than
    /// [`DetectorOptions::min_face_px`].
    pub fn detect_face(&self, image: &RgbImage, choice: FaceChoice) -> Result<Detection> {
        Ok(self.faces_by_preference(image, choice)?.remove(0))
    }

    /// The faces `choice` would pick, in order of preference: [`FaceDetector::detect_face`]'s
    /// face (with its errors), then, unless `choice` names one face by its place, every other face
    /// at least [`DetectorOptions::min_face_px`] wide, in the order `choice` ranks them.
    pub fn faces_by_preference(
        &self,
        image: &RgbImage,
        choice: FaceChoice,
    ) -> Result<Vec<Detection>> {
        let mut faces = self.detect(image)?;
        if faces.is_empty() {
            return Err(FaceError::NoFaceFound {
                width: image.width(),
                height: image.height(),
            });
        }
        rank(&mut faces, choice)?;
        if faces[0].size() < self.options.min_face_px {
            return Err(FaceError::FaceTooSmall {
                size: faces[0].size(),
                min: self.options.min_face_px,
            });
        }
        faces.retain(|face| face.size() >= self.options.min_face_px);
        Ok(faces)
    }

    /// What the whole-image pass scores below [`DetectorOptions::min_score`] but at least
    /// `min_score`, at least [`DetectorOptions::min_face_px`] wide, in the order `choice`
    /// ranks faces (none when `choice` names a face by its place: places count sure faces). For
    /// a second opinion where [`Self::faces_by_preference`] finds no face: the short-range
    /// model scores some real faces low (looking down, flat lighting), and the landmark
    /// network can confirm them.
    pub fn unsure_faces(
        &self,
        image: &RgbImage,
        choice: FaceChoice,
        min_score: f32,
    ) -> Result<Vec<Detection>> {
        if matches!(choice, FaceChoice::Index(_) | FaceChoice::FromLeft(_)) {
            return Ok(Vec::new());
        }
        let (input, roi) = self.input_tensor(image)?;
        let n = DETECTOR_INPUT as f32;
        let mut faces: Vec<Detection> = self
            .detect_in_tensor_above(&input, min_score)?
            .iter()
            .filter(|d| d.score < self.options.min_score)
            .map(|d| d.map(|p| roi.tensor_to_image(p, n)))
            .filter(|d| d.size() >= self.options.min_face_px)
            .collect();
        rank(&mut faces, choice)?;
        Ok(faces)
    }
}

/// Orders `faces` (most confident first) as `choice` prefers them; for a face named by its
/// place, keeps only that face.
fn rank(faces: &mut Vec<Detection>, choice: FaceChoice) -> Result<()> {
    let keep_only = |faces: &mut Vec<Detection>, index: usize| -> Result<()> {
        let count = faces.len();
        let chosen = faces
            .get(index)
            .cloned()
            .ok_or(FaceError::FaceIndexOutOfRange { index, count })?;
        *faces = vec![chosen];
        Ok(())
    };
    match choice {
        FaceChoice::Largest => faces.sort_by(|a, b| b.area().total_cmp(&a.area())),
        FaceChoice::MostConfident => {}
        FaceChoice::Index(index) => keep_only(faces, index)?,
        FaceChoice::FromLeft(index) => {
            let centre_x = |face: &Detection| (face.bbox[0] + face.bbox[2]) / 2.0;
            faces.sort_by(|a, b| centre_x(a).total_cmp(&centre_x(b)));
            keep_only(faces, index)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection(score: f32, bbox: [f32; 4]) -> Detection {
        Detection {
            score,
            bbox,
            keypoints: [[bbox[0], bbox[1]]; KEYPOINTS],
        }
    }

    #[test]
    fn anchors_match_the_model_outputs() {
        let a = anchors();
        assert_eq!(a.len(), 896);
        assert_eq!(a[0], [4.0, 4.0]);
        assert_eq!(a[1], [4.0, 4.0]);
        assert_eq!(a[2], [12.0, 4.0]);
        assert_eq!(a[511], [124.0, 124.0]);
        assert_eq!(a[512], [8.0, 8.0]);
        assert_eq!(a[895], [120.0, 120.0]);
    }

    #[test]
    fn weighted_nms_averages_overlapping_boxes_by_score() {
        let merged = weighted_nms(
            vec![
                detection(0.6, [2.0, 0.0, 12.0, 10.0]),
                detection(0.9, [0.0, 0.0, 10.0, 10.0]),
                detection(0.8, [50.0, 50.0, 60.0, 60.0]),
            ],
            0.3,
        );
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].score, 0.9);
        assert!((merged[0].bbox[0] - 1.2 / 1.5).abs() < 1e-6);
        assert!((merged[0].bbox[2] - (9.0 + 7.2) / 1.5).abs() < 1e-5);
        assert_eq!(merged[1].bbox, [50.0, 50.0, 60.0, 60.0]);
    }

    #[test]
    fn faces_are_chosen_by_size_confidence_or_place() {
        // Most confident first, as `detect` returns them.
        let faces = vec![
            detection(0.9, [300.0, 0.0, 340.0, 40.0]),
            detection(0.8, [0.0, 0.0, 100.0, 100.0]),
            detection(0.7, [150.0, 0.0, 210.0, 60.0]),
        ];
        let chosen = |choice| -> Result<Vec<f32>> {
            let mut ranked = faces.clone();
            rank(&mut ranked, choice)?;
            Ok(ranked.iter().map(|face| face.score).collect())
        };
        assert_eq!(chosen(FaceChoice::Largest).unwrap(), [0.8, 0.7, 0.9]);
        assert_eq!(chosen(FaceChoice::MostConfident).unwrap(), [0.9, 0.8, 0.7]);
        assert_eq!(chosen(FaceChoice::Index(1)).unwrap(), [0.8]);
        assert_eq!(chosen(FaceChoice::FromLeft(0)).unwrap(), [0.8]);
        assert_eq!(chosen(FaceChoice::FromLeft(1)).unwrap(), [0.7]);
        assert_eq!(chosen(FaceChoice::FromLeft(2)).unwrap(), [0.9]);
        assert!(matches!(
            chosen(FaceChoice::FromLeft(3)),
            Err(FaceError::FaceIndexOutOfRange { index: 3, count: 3 })
        ));
    }
}
