//! MediaPipe's Face Mesh landmark network (468 points from a 192×192 face crop) and the crop
//! it expects, following `face_landmark_front_cpu.pbtxt` of MediaPipe 0.10.21.

use std::path::Path;

use candle_core::{Device, Tensor};
use ganfit_assets::Resolver;
use image::RgbImage;

use super::crop::{Border, FaceRoi};
use super::detector::{Detection, FaceChoice, FaceDetector};
use super::layers::{Activation, Conv, Padding, Residual, Weights};
use super::mirror::MESH_MIRROR;
use super::{FaceError, Result};

/// Asset id of the converted landmark-network weights in `weights-manifest.toml`.
pub const LANDMARKER_ASSET: &str = "mediapipe-face-landmark";

/// Side of the landmark network's square input tensor.
pub const LANDMARKER_INPUT: usize = 192;

/// Number of Face Mesh points.
pub const MESH_POINTS: usize = 468;

/// MediaPipe drops landmarks whose face-presence probability is below this.
const MIN_PRESENCE: f32 = 0.1;

/// A face-presence logit (probability 0.9) that a crop turned from the detector's must reach to
/// be taken, and below which [`FaceLandmarker::landmarks`] also tries the crops between the
/// quarter turns: on nine photos turned in steps of 30° the crop nearest upright scored 11 to
/// 40, the others at most 10.7, and a face between two quarter turns (a crop 45° off either
/// way) below 0.
const CLEAR_FACE_LOGIT: f32 = 2.2;

/// A face-presence logit at which [`FaceLandmarker::landmarks`] takes the detector's crop
/// without trying its turns: on nine photos turned in steps of 30°, crops turned 45° or more
/// from a face scored at most 10.7, and the crops nearest upright 11 to 40.
const UPRIGHT_FACE_LOGIT: f32 = 16.0;

/// Where the detector finds no face at its own threshold, [`FaceLandmarker::locate`] looks at
/// what it scores at least this much ...
const UNSURE_MIN_SCORE: f32 = 0.25;

/// ... and takes a face the landmark network is at least this sure of. On 60 of the shared
/// photos every detected face had a presence of 1.000 and every candidate the detector scored
/// 0.2–0.31 elsewhere in the photos (their faces painted over) fell below
/// [`MIN_PRESENCE`].
const UNSURE_MIN_PRESENCE: f32 = 0.9;

/// Passes of [`FaceLandmarker::refine`]. Measured with `ganfit bench landmark-map` (mean error
/// of the 68 iBUG points on 60 held-out synthetic faces turned up to ±45°, % of the
/// inter-ocular distance, each variant with its own correspondence table): 4.95 for
/// MediaPipe's single pass, 4.41 after one pass on the points' own crop, 4.30 with the passes
/// also averaged with their mirror images, 4.19 after two such passes, 4.18 after three.
const REFINE_PASSES: usize = 2;

/// The crop MediaPipe feeds the landmark network for a detection: the detection box's centre,
/// 1.5 × its longer side, rotated so the eyes (keypoints 0 and 1) lie on a horizontal line.
pub fn roi_from_detection(detection: &Detection) -> FaceRoi {
    let [x0, y0, x1, y1] = detection.bbox;
    let ([ex0, ey0], [ex1, ey1]) = (detection.keypoints[0], detection.keypoints[1]);
    let angle = -(-(ey1 - ey0)).atan2(ex1 - ex0);
    let two_pi = 2.0 * std::f32::consts::PI;
    let rotation = angle - two_pi * ((angle + std::f32::consts::PI) / two_pi).floor();
    FaceRoi {
        center: [(x0 + x1) / 2.0, (y0 + y1) / 2.0],
        side: 1.5 * (x1 - x0).max(y1 - y0),
        rotation,
    }
}

/// The crop MediaPipe's tracking feeds the landmark network once it has a face's points:
/// centred on the points' extent, 1.5 × its longer side, rotated so the outer eye corners
/// (points 33 and 263) lie on a horizontal line. The extent is measured along the rotated axes,
/// so a tilted face gets a crop as tight as an upright one.
pub fn roi_from_landmarks(landmarks: &Landmarks468) -> FaceRoi {
    let ([ax, ay], [bx, by]) = (landmarks.xy(33), landmarks.xy(263));
    let rotation = (by - ay).atan2(bx - ax);
    let (sin, cos) = rotation.sin_cos();
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for &[x, y, _] in &landmarks.points {
        let (u, v) = (cos * x + sin * y, cos * y - sin * x);
        lo = [lo[0].min(u), lo[1].min(v)];
        hi = [hi[0].max(u), hi[1].max(v)];
    }
    let (u, v) = ((lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0);
    FaceRoi {
        center: [cos * u - sin * v, sin * u + cos * v],
        side: 1.5 * (hi[0] - lo[0]).max(hi[1] - lo[1]),
        rotation,
    }
}

/// 468 Face Mesh points of one face.
#[derive(Debug, Clone, PartialEq)]
pub struct Landmarks468 {
    /// (x, y, z) per point. x and y are image pixels; z is depth relative to the face's centre
    /// in the same pixel scale, smaller is closer to the camera.
    pub points: Vec<[f32; 3]>,
    /// The network's probability that the crop holds a face.
    pub presence: f32,
    /// The crop the network saw.
    pub roi: FaceRoi,
}

impl Landmarks468 {
    /// The (x, y) image position of point `index`.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`MESH_POINTS`].
    pub fn xy(&self, index: usize) -> [f32; 2] {
        [self.points[index][0], self.points[index][1]]
    }
}

struct FaceMeshNet {
    stem: Conv,
    stem_activation: Activation,
    trunk: Vec<Residual>,
    mesh_blocks: Vec<Residual>,
    mesh_narrow: Conv,
    mesh_narrow_activation: Activation,
    mesh_last_block: Residual,
    mesh_out: Conv,
    flag_block: Residual,
    flag_narrow: Conv,
    flag_narrow_activation: Activation,
    flag_last_block: Residual,
    flag_out: Conv,
}

/// Strided trunk blocks (1-based, as `depthwise_conv2d_<i>`): 96→48, 48→24, 24→12, 12→6.
const TRUNK_STRIDE_2: [usize; 4] = [3, 6, 9, 12];
const TRUNK_BLOCKS: usize = 14;

impl FaceMeshNet {
    /// Block `depthwise_conv2d_<dw>` + `conv2d_<pw>` + `p_re_lu_<act>`.
    fn block(w: &Weights, dw: usize, pw: usize, act: usize, stride: usize) -> Result<Residual> {
        Residual::new(
            w,
            &format!("depthwise_conv2d_{dw}"),
            &format!("conv2d_{pw}"),
            stride,
            Activation::prelu(w, &format!("p_re_lu_{act}"))?,
        )
    }

    fn load(w: &Weights) -> Result<Self> {
        let trunk = (1..=TRUNK_BLOCKS)
            .map(|i| {
                let stride = if TRUNK_STRIDE_2.contains(&i) { 2 } else { 1 };
                Self::block(w, i, i + 1, i + 1, stride)
            })
            .collect::<Result<Vec<_>>>()?;
        let mesh_blocks = vec![
            Self::block(w, 15, 16, 16, 2)?,
            Self::block(w, 16, 17, 17, 1)?,
            Self::block(w, 17, 18, 18, 1)?,
        ];
        Ok(Self {
            stem: Conv::new(w, "conv2d_1", 2, Padding::Same)?,
            stem_activation: Activation::prelu(w, "p_re_lu_1")?,
            trunk,
            mesh_blocks,
            mesh_narrow: Conv::new(w, "conv2d_19", 1, Padding::Valid)?,
            mesh_narrow_activation: Activation::prelu(w, "p_re_lu_19")?,
            mesh_last_block: Self::block(w, 18, 20, 20, 1)?,
            mesh_out: Conv::new(w, "conv2d_21", 3, Padding::Valid)?,
            flag_block: Self::block(w, 23, 28, 26, 2)?,
            flag_narrow: Conv::new(w, "conv2d_29", 1, Padding::Valid)?,
            flag_narrow_activation: Activation::prelu(w, "p_re_lu_27")?,
            flag_last_block: Self::block(w, 24, 30, 28, 1)?,
            flag_out: Conv::new(w, "conv2d_31", 3, Padding::Valid)?,
        })
    }

    /// `[1, 3, 192, 192]` in `[0, 1]` → (points `[468, 3]` in input pixels, face logit).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, f32)> {
        let x = self.trunk(x)?;
        let mut mesh = x.clone();
        for block in &self.mesh_blocks {
            mesh = block.forward(&mesh)?;
        }
        let mesh = self
            .mesh_narrow_activation
            .forward(&self.mesh_narrow.forward(&mesh)?)?;
        let mesh = self.mesh_last_block.forward(&mesh)?;
        let points = self.mesh_out.forward(&mesh)?.reshape((MESH_POINTS, 3))?;
        let logit = self.face_logits_of_trunk(&x)?[0];
        Ok((points, logit))
    }

    /// The face logits of a batch of inputs `[B, 3, 192, 192]`, without their points.
    fn face_logits(&self, x: &Tensor) -> Result<Vec<f32>> {
        self.face_logits_of_trunk(&self.trunk(x)?)
    }

    /// The stem and the trunk, which the points and the face flag share.
    fn trunk(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.stem_activation.forward(&self.stem.forward(x)?)?;
        for block in &self.trunk {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    /// The face flag's branch: one logit per input of the batch.
    fn face_logits_of_trunk(&self, trunk: &Tensor) -> Result<Vec<f32>> {
        let flag = self.flag_block.forward(trunk)?;
        let flag = self
            .flag_narrow_activation
            .forward(&self.flag_narrow.forward(&flag)?)?;
        let flag = self.flag_last_block.forward(&flag)?;
        Ok(self
            .flag_out
            .forward(&flag)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// Raw output of the landmark network for one input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshOutput {
    /// (x, y, z) per point in the pixels of the 192×192 input.
    pub points: Vec<[f32; 3]>,
    /// Face-presence logit (apply a sigmoid for the probability).
    pub face_logit: f32,
}

/// Finds the 468 Face Mesh points of a detected face.
pub struct FaceLandmarker {
    net: FaceMeshNet,
    device: Device,
}

impl std::fmt::Debug for FaceLandmarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceLandmarker")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl FaceLandmarker {
    /// Loads the embedded default weights through the asset resolver
    /// (id [`LANDMARKER_ASSET`]), verifying their checksum.
    pub fn new(device: &Device) -> Result<Self> {
        Self::from_resolver(&Resolver::new(), device)
    }

    /// Loads the weights that `resolver` finds for [`LANDMARKER_ASSET`].
    pub fn from_resolver(resolver: &Resolver, device: &Device) -> Result<Self> {
        Self::from_file(resolver.resolve(LANDMARKER_ASSET)?, device)
    }

    /// Loads converted weights from a safetensors file, without checksum verification.
    pub fn from_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let weights = Weights::load(path.as_ref(), device)?;
        Ok(Self {
            net: FaceMeshNet::load(&weights)?,
            device: device.clone(),
        })
    }

    /// The network input for the region `roi` of `image`: `[1, 3, 192, 192]`, values in
    /// `[0, 1]`, edge pixels repeated outside the image.
    pub fn input_tensor(&self, image: &RgbImage, roi: &FaceRoi) -> Result<Tensor> {
        roi.sample(
            image,
            LANDMARKER_INPUT,
            Border::Replicate,
            (0.0, 1.0),
            &self.device,
        )
    }

    /// Runs the network on a prepared `[1, 3, 192, 192]` input.
    pub fn run_tensor(&self, input: &Tensor) -> Result<MeshOutput> {
        let (points, face_logit) = self.net.forward(input)?;
        let points = points
            .to_vec2::<f32>()?
            .into_iter()
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(MeshOutput { points, face_logit })
    }

    /// The 468 points of the face in `roi`, in image pixels; fails with
    /// [`FaceError::LandmarksNotConfident`] when the network sees no face there.
    pub fn landmarks_in_roi(&self, image: &RgbImage, roi: &FaceRoi) -> Result<Landmarks468> {
        self.landmarks_of_input(&self.input_tensor(image, roi)?, roi)
    }

    /// [`Self::landmarks_in_roi`] for the crop's prepared network input.
    fn landmarks_of_input(&self, input: &Tensor, roi: &FaceRoi) -> Result<Landmarks468> {
        points_in_image(&self.run_tensor(input)?, roi)
    }

    /// The 468 points in `roi`, averaged with the points the network finds in the crop's
    /// mirror image (each mirrored point standing for its counterpart on the other side of the
    /// face): the two views' errors are partly independent, and a left–right bias of the
    /// network cancels.
    pub fn landmarks_in_roi_and_mirror(
        &self,
        image: &RgbImage,
        roi: &FaceRoi,
    ) -> Result<Landmarks468> {
        let input = self.input_tensor(image, roi)?;
        let direct = self.landmarks_of_input(&input, roi)?;
        let n = LANDMARKER_INPUT as u32;
        let reversed_columns = Tensor::from_vec((0..n).rev().collect(), n as usize, &self.device)?;
        let mirrored = self.run_tensor(&input.index_select(&reversed_columns, 3)?)?;
        let n = n as f32;
        let points = direct
            .points
            .iter()
            .zip(MESH_MIRROR)
            .map(|(&[x, y, z], counterpart)| {
                let [mx, my, mz] = mirrored.points[usize::from(counterpart)];
                // Column u of the mirrored crop is column n − 1 − u of the crop.
                let [ix, iy] = roi.tensor_to_image([n - 1.0 - mx, my], n);
                [
                    (x + ix) / 2.0,
                    (y + iy) / 2.0,
                    (z + mz * roi.side / n) / 2.0,
                ]
            })
            .collect();
        Ok(Landmarks468 { points, ..direct })
    }

    /// `landmarks` measured again, more precisely: the network runs on the crop its own points
    /// give ([`roi_from_landmarks`], centred on the face where a detection box of a turned
    /// head is not) and on that crop's mirror image ([`Self::landmarks_in_roi_and_mirror`]),
    /// twice. Four more network runs (about 80 ms on one core).
    pub fn refine(&self, image: &RgbImage, landmarks: &Landmarks468) -> Result<Landmarks468> {
        let mut refined =
            self.landmarks_in_roi_and_mirror(image, &roi_from_landmarks(landmarks))?;
        for _ in 1..REFINE_PASSES {
            refined = self.landmarks_in_roi_and_mirror(image, &roi_from_landmarks(&refined))?;
        }
        Ok(refined)
    }

    /// The 468 points of a detected face, in image pixels, cropping as MediaPipe does
    /// ([`roi_from_detection`]) or, where the network is clearly surer of a face there, turned
    /// from that crop by a whole number of quarter turns (by eighth turns too where no crop
    /// holds a face clearly). The detector finds faces turned by up to a half turn (a sideways
    /// or upside-down photo whose file does not say so) but places their eyes as if they were
    /// nearly upright, and the network then finds an upright face's points in an upside-down
    /// one with a presence near 1 too (though with a logit ten or more below the upright
    /// crop's, on nine photos turned in steps of 30°). A turned crop must be clearly a face
    /// (a presence of 0.9 or more): of eight tries, one can find some face in a box that holds
    /// none, which the upright crop rejects. A crop the network is very sure of is taken as it
    /// is; otherwise the turned crops go through the network's trunk and face flag only, three
    /// (or seven) in one batch: about 50 ms more on two cores.
    pub fn landmarks(&self, image: &RgbImage, detection: &Detection) -> Result<Landmarks468> {
        let upright = roi_from_detection(detection);
        let output = self.run_tensor(&self.input_tensor(image, &upright)?)?;
        if output.face_logit >= UPRIGHT_FACE_LOGIT {
            return points_in_image(&output, &upright);
        }
        let quarter = std::f32::consts::FRAC_PI_2;
        let mut surest = (upright, output.face_logit);
        let quarters = self.surest_turn(image, &upright, (1..4).map(|k| k as f32 * quarter))?;
        let clearer = |turned: (FaceRoi, f32), than: (FaceRoi, f32)| {
            turned.1 >= CLEAR_FACE_LOGIT && turned.1 > than.1
        };
        if clearer(quarters, surest) {
            surest = quarters;
        }
        if surest.1 < CLEAR_FACE_LOGIT {
            let eighths =
                self.surest_turn(image, &upright, (0..4).map(|k| (k as f32 + 0.5) * quarter))?;
            if clearer(eighths, surest) {
                surest = eighths;
            }
        }
        if surest.0 == upright {
            points_in_image(&output, &upright)
        } else {
            self.landmarks_in_roi(image, &surest.0)
        }
    }

    /// Of the crops `upright` turned by each of `turns` (radians, clockwise), the one with the
    /// highest face-presence logit, and that logit (the network's face flag only, for all the
    /// crops at once).
    fn surest_turn(
        &self,
        image: &RgbImage,
        upright: &FaceRoi,
        turns: impl Iterator<Item = f32>,
    ) -> Result<(FaceRoi, f32)> {
        let crops: Vec<FaceRoi> = turns
            .map(|turn| FaceRoi {
                rotation: upright.rotation + turn,
                ..*upright
            })
            .collect();
        let inputs = crops
            .iter()
            .map(|roi| self.input_tensor(image, roi))
            .collect::<Result<Vec<_>>>()?;
        let logits = self.net.face_logits(&Tensor::cat(&inputs, 0)?)?;
        Ok(crops
            .into_iter()
            .zip(logits)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one turn"))
    }

    /// The face `choice` picks in `image` with its 468 points, [refined](Self::refine). Where
    /// the landmark network does not confirm that face ([`FaceError::LandmarksNotConfident`]:
    /// the detector can mistake a patterned shirt or a badge for a face, often larger than the
    /// real one) the next face in [`FaceDetector::faces_by_preference`]'s order is tried; the
    /// first error is returned when none is confirmed. Where the detector finds no face at
    /// all, the faces it was unsure of ([`FaceDetector::unsure_faces`], score at least 0.25)
    /// are tried, and one is taken only where the landmark network is sure of it (presence at
    /// least 0.9); otherwise the error stays [`FaceError::NoFaceFound`].
    pub fn locate(
        &self,
        detector: &FaceDetector,
        image: &RgbImage,
        choice: FaceChoice,
    ) -> Result<(Detection, Landmarks468)> {
        let faces = match detector.faces_by_preference(image, choice) {
            Err(no_face @ FaceError::NoFaceFound { .. }) => {
                for face in detector.unsure_faces(image, choice, UNSURE_MIN_SCORE)? {
                    match self.landmarks(image, &face) {
                        Ok(points) if points.presence >= UNSURE_MIN_PRESENCE => {
                            return Ok((face, self.refined(image, points)?));
                        }
                        Ok(_) | Err(FaceError::LandmarksNotConfident { .. }) => {}
                        Err(error) => return Err(error),
                    }
                }
                return Err(no_face);
            }
            faces => faces?,
        };
        let mut first_error = None;
        for face in faces {
            match self.landmarks(image, &face) {
                Ok(points) => return Ok((face, self.refined(image, points)?)),
                Err(error @ FaceError::LandmarksNotConfident { .. }) => {
                    first_error.get_or_insert(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(first_error.unwrap_or(FaceError::NoFaceFound {
            width: image.width(),
            height: image.height(),
        }))
    }

    /// `points` [refined](Self::refine); where the network doubts a refined crop (it has not
    /// been seen to) the confirmed single-pass points stand.
    fn refined(&self, image: &RgbImage, points: Landmarks468) -> Result<Landmarks468> {
        match self.refine(image, &points) {
            Err(FaceError::LandmarksNotConfident { .. }) => Ok(points),
            refined => refined,
        }
    }
}

/// The network's `output` for the crop `roi` as points in image pixels; fails with
/// [`FaceError::LandmarksNotConfident`] when the network sees no face there.
fn points_in_image(output: &MeshOutput, roi: &FaceRoi) -> Result<Landmarks468> {
    let presence = 1.0 / (1.0 + (-output.face_logit).exp());
    if presence < MIN_PRESENCE {
        return Err(FaceError::LandmarksNotConfident {
            confidence: presence,
        });
    }
    let n = LANDMARKER_INPUT as f32;
    let points = output
        .points
        .iter()
        .map(|&[x, y, z]| {
            let [px, py] = roi.tensor_to_image([x, y], n);
            [px, py, z * roi.side / n]
        })
        .collect();
    Ok(Landmarks468 {
        points,
        presence,
        roi: *roi,
    })
}
