#!/usr/bin/env python3
"""Measure how well ganfit's iBUG 68 subset of the Face Mesh (IBUG68_FROM_MESH, read from
crates/ganfit-losses/src/face/ibug.rs) agrees with an independent 68-point detector, dlib's
shape_predictor_68_face_landmarks, on public-domain photos from ../shared/data/faces.

dlib's predictor is trained on iBUG 300-W, whose licence excludes commercial use; it serves here
only as a measuring stick and nothing derived from it is shipped. Errors are normalised by the
distance between the outer eye corners (iBUG 36 and 45), as 300-W's benchmark does.

Environment (Python 3.11): pip install mediapipe==0.10.21 "numpy<2" "protobuf>=4.25,<5"
dlib-bin==20.0.1.post1 pillow; the predictor file is in the sdist face-recognition-models==0.3.0.
Run from the repository root:
  python tools/convert/check_ibug68_against_dlib.py PATH/TO/shape_predictor_68_face_landmarks.dat [N_PHOTOS]
"""
import csv
import os
import re
import sys

import dlib
import mediapipe as mp
import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(__file__), "../..")
SHARED = os.path.join(ROOT, "../shared/data/faces")
REGIONS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
           "eyes": range(36, 48), "outer lip": range(48, 60), "inner lip": range(60, 68)}


def table():
    source = open(os.path.join(ROOT, "crates/ganfit-losses/src/face/ibug.rs")).read()
    body = source.split("IBUG68_FROM_MESH: [usize; 68] = [")[1].split("];")[0]
    ids = [int(t) for t in re.findall(r"\b\d+\b", re.sub(r"//[^\n]*", "", body))]
    assert len(ids) == 68
    return ids


def main():
    predictor = dlib.shape_predictor(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    detector = dlib.get_frontal_face_detector()
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1)
    ids = table()
    with open(os.path.join(SHARED, "us_congress_gpo_pd/manifest.csv")) as f:
        files = ["us_congress_gpo_pd/" + row["file"] for row in csv.DictReader(f)][:count]
    files.insert(0, "astronaut/astronaut.png")
    errors = []
    for rel in files:
        image = np.asarray(Image.open(os.path.join(SHARED, rel)).convert("RGB"))
        faces = detector(image, 1)
        result = mesh.process(image).multi_face_landmarks
        if len(faces) != 1 or not result:
            continue
        h, w, _ = image.shape
        ours = np.array([[result[0].landmark[i].x * w, result[0].landmark[i].y * h] for i in ids])
        shape = predictor(image, faces[0])
        theirs = np.array([[p.x, p.y] for p in shape.parts()], dtype=float)
        errors.append(np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs[36] - theirs[45]))
    errors = np.array(errors)
    print(f"{len(errors)} photos; error / outer-eye-corner distance, mean over photos:")
    print(f"  all 68: {errors.mean():.4f}")
    for name, r in REGIONS.items():
        print(f"  {name:9s}: {errors[:, list(r)].mean():.4f}")


if __name__ == "__main__":
    main()
