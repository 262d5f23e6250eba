//! The iBUG 68 subset lands on the right features of real faces: checked on MediaPipe's own
//! 468 points for the public-domain photos in the parity fixture.

use ganfit_losses::face::{
    FaceRoi, IBUG68_FROM_MESH, ICT_VERTEX_FROM_MESH, Landmarks468, MESH_POINTS,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    images: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    file: String,
    mediapipe: MediaPipe,
}

#[derive(Deserialize)]
struct MediaPipe {
    landmarks: Vec<[f32; 2]>,
}

fn faces() -> Vec<(String, [[f32; 2]; 68])> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/face/mediapipe_parity.json"
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fixture
        .images
        .into_iter()
        .map(|record| {
            let landmarks = Landmarks468 {
                points: record
                    .mediapipe
                    .landmarks
                    .iter()
                    .map(|p| [p[0], p[1], 0.0])
                    .collect(),
                presence: 1.0,
                roi: FaceRoi {
                    center: [0.0, 0.0],
                    side: 1.0,
                    rotation: 0.0,
                },
            };
            (record.file, landmarks.to_ibug68())
        })
        .collect()
}

#[test]
fn the_table_holds_68_distinct_mesh_points() {
    let mut ids = IBUG68_FROM_MESH.to_vec();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 68);
    assert!(ids.iter().all(|&i| i < MESH_POINTS));
}

#[test]
fn ibug_points_follow_the_ibug_layout_on_frontal_photos() {
    for (file, p) in faces() {
        let x = |i: usize| p[i][0];
        let y = |i: usize| p[i][1];
        // Left to right across the image, as iBUG numbers a frontal face.
        for row in [
            &[0, 4, 8, 12, 16][..],
            &[17, 21, 22, 26],
            &[36, 39, 42, 45],
            &[31, 33, 35],
            &[48, 51, 54],
            &[60, 62, 64],
        ] {
            for pair in row.windows(2) {
                assert!(
                    x(pair[0]) < x(pair[1]),
                    "{file}: point {} not left of {}",
                    pair[0],
                    pair[1]
                );
            }
        }
        // Top to bottom: brows, eyes, nose bridge to tip, lips, chin.
        let eyes = (y(37) + y(44)) / 2.0;
        assert!((y(19) + y(24)) / 2.0 < eyes, "{file}: brows below eyes");
        for column in [&[27, 28, 29, 30][..], &[30, 33, 51, 62, 66, 57, 8]] {
            for pair in column.windows(2) {
                assert!(
                    y(pair[0]) < y(pair[1]),
                    "{file}: point {} not above {}",
                    pair[0],
                    pair[1]
                );
            }
        }
        assert!(eyes < y(30));
        // Eyelids: upper above lower.
        for (upper, lower) in [(37, 41), (38, 40), (43, 47), (44, 46)] {
            assert!(y(upper) < y(lower), "{file}: eyelid {upper}/{lower}");
        }
        // The chin is the jaw's lowest point.
        assert!((0..17).all(|i| y(i) <= y(8)), "{file}: chin is not lowest");
    }
}

#[test]
fn ict_correspondence_points_into_ict_skin() {
    // ICT-FaceKit's geometry #0 (the face skin) is vertices 0..9409.
    assert!(ICT_VERTEX_FROM_MESH.iter().all(|&v| v < 9409));
    // Distinct points of the iBUG subset land on distinct vertices.
    let mut ibug: Vec<u32> = IBUG68_FROM_MESH
        .iter()
        .map(|&p| ICT_VERTEX_FROM_MESH[p])
        .collect();
    ibug.sort_unstable();
    ibug.dedup();
    assert_eq!(ibug.len(), 68);
}
