#!/usr/bin/env python3
"""The eos peer of `ganfit bench accuracy`: landmark-based shape, expression and pose fitting
with eos (github.com/patrikhuber/eos) and the Surrey Face Model, on the same 68 detected
landmarks our fit uses.

    python3 eos_peer.py INPUT.json OUTPUT.json SFM_DIR

INPUT.json (written by the Rust bench):
    {"images": [{"id": "000", "width": 512, "height": 512,
                 "landmarks": [[x, y] or null, ... 68 entries, iBUG order]}, ...]}
OUTPUT.json:
    {"generator": "...", "triangles": [[i, j, k], ...],
     "mean": {"vertices": ..., "landmarks": ...} (the model's mean face),
     "results": [{"id": "000", "vertices": [[x, y, z], ...] (model coordinates, millimetres),
                  "landmarks": [[x, y, z] or null, ... 68] (null: no fixed vertex, the jaw contour),
                  "seconds": fit time, "error": null or a message}, ...]}

SFM_DIR holds sfm_shape_3448.bin, expression_blendshapes_3448.bin, ibug_to_sfm.txt,
sfm_3448_edge_topology.json and sfm_model_contours.json (../shared/assets/eos-sfm).
Versions: tools/bench/eos_requirements.txt (eos-py 1.5.0, numpy 2.4.6; Python 3.11.7).
eos fits a scaled orthographic camera, 5 iterations of pose / contour / expression / shape with
its default regularisation (lambda_identity 30) and all 63 identity modes: the settings of
eos's own fit-model example.
"""
import json
import pathlib
import sys
import time

import eos
import numpy as np


def load_model(sfm: pathlib.Path):
    shape = eos.morphablemodel.load_model(str(sfm / "sfm_shape_3448.bin"))
    blendshapes = eos.morphablemodel.load_blendshapes(str(sfm / "expression_blendshapes_3448.bin"))
    model = eos.morphablemodel.MorphableModel(
        shape.get_shape_model(),
        blendshapes,
        color_model=eos.morphablemodel.PcaModel(),
        vertex_definitions=None,
        texture_coordinates=shape.get_texture_coordinates(),
    )
    mapping = str(sfm / "ibug_to_sfm.txt")
    return (
        model,
        eos.core.LandmarkMapper(mapping),
        eos.morphablemodel.load_edge_topology(str(sfm / "sfm_3448_edge_topology.json")),
        eos.fitting.ContourLandmarks.load(mapping),
        eos.fitting.ModelContour.load(str(sfm / "sfm_model_contours.json")),
    )


def landmarks_3d(mapper, vertices):
    """The 68 iBUG landmarks' 3D positions: the mapped SFM vertex, None for the jaw contour."""
    points = []
    for i in range(68):
        vertex = mapper.convert(str(i + 1))
        points.append(None if vertex is None else vertices[int(vertex)].round(4).tolist())
    return points


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    source, target, sfm = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    request = json.loads(source.read_text())
    model, mapper, edges, contour_landmarks, model_contour = load_model(sfm)
    triangles = None
    results = []
    for image in request["images"]:
        landmarks = [
            eos.core.Landmark(str(i + 1), np.array(p, dtype=np.float32).reshape(2, 1))
            for i, p in enumerate(image["landmarks"])
            if p is not None
        ]
        start = time.perf_counter()
        try:
            mesh, _pose, _shape, _expression = eos.fitting.fit_shape_and_pose(
                model, landmarks, mapper, image["width"], image["height"],
                edges, contour_landmarks, model_contour,
            )
        except Exception as err:  # eos raises RuntimeError on degenerate input; report, go on
            results.append({"id": image["id"], "error": str(err)})
            continue
        seconds = time.perf_counter() - start
        vertices = np.asarray(mesh.vertices, dtype=np.float64)
        if triangles is None:
            triangles = np.asarray(mesh.tvi, dtype=np.int64).tolist()
        results.append({
            "id": image["id"],
            "vertices": vertices.round(4).tolist(),
            "landmarks": landmarks_3d(mapper, vertices),
            "seconds": seconds,
            "error": None,
        })
    mean = np.asarray(model.get_shape_model().get_mean(), dtype=np.float64).reshape(-1, 3)
    target.write_text(json.dumps({
        # The model's mean face, the reference a fit has to improve on.
        "mean": {"vertices": mean.round(4).tolist(), "landmarks": landmarks_3d(mapper, mean)},
        "generator": "eos-py 1.5.0 fit_shape_and_pose (defaults: 5 iterations, lambda_identity 30)",
        "triangles": triangles or [],
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
