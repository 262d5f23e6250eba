#!/usr/bin/env python3
"""Derive the iBUG 68-point subset of MediaPipe's 468 Face Mesh points (IBUG68_FROM_MESH in
crates/ganfit-losses/src/face/ibug.rs) from two permissively licensed 3D sources:

  * ICT-FaceKit's neutral mesh and its 68 Multi-PIE landmark vertex ids (MIT; the Multi-PIE 68
    markup is the iBUG 300-W markup), from ../shared/assets/ICT-FaceKit;
  * MediaPipe's canonical face mesh, whose vertex i is Face Mesh point i (Apache-2.0), from
    ../shared/assets/mediapipe-geometry/canonical_face_model.obj.

Method: a similarity transform (Umeyama, least squares) takes ICT's landmarks onto the canonical
mesh using eight unambiguous points whose Face Mesh ids are well established (nose tip 1,
chin 152, outer/inner eye corners 33/133 and 263/362, mouth corners 61/291); each of the 68
transformed ICT landmarks then picks its nearest canonical vertex in 3D. Inner-lip points
(60-67) only choose among Face Mesh's inner-lip ring, because the two meshes' lips differ in
thickness and a plain nearest vertex can land on the outer lip. The residual (distance from each
transformed ICT landmark to its chosen vertex, in the canonical mesh's centimetres) is printed.

Pinned environment: Python 3.11, mediapipe==0.10.21, "numpy<2". Run from the repository root; it
reads ICT's mesh from FaceXModel.tar.xz, or from the unpacked
ICT-FaceKit mesh (FaceXModel.tar.xz, only generic_neutral_mesh.obj is read):
  python tools/convert/derive_ibug68_from_mediapipe_mesh.py [--ict-dir DIR]
"""
import argparse
import os
import tarfile

import numpy as np
from mediapipe.python.solutions import face_mesh_connections as contours

SHARED = os.path.join(os.path.dirname(__file__), "../../../shared/assets")
# iBUG index -> canonical Face Mesh vertex for the alignment anchors.
ANCHORS = {30: 1, 8: 152, 36: 33, 39: 133, 45: 263, 42: 362, 48: 61, 54: 291}


def vertices(edges):
    return {v for edge in edges for v in edge}


def path(edges, start, via, end):
    """Vertices on the arc of a ring from start to end that passes through via."""
    neighbours = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    for first in neighbours[start]:
        arc, prev = [start, first], start
        while arc[-1] != end:
            nxt = [n for n in neighbours[arc[-1]] if n != prev][0]
            prev = arc[-1]
            arc.append(nxt)
        if via in arc:
            return arc
    raise ValueError("no such arc")


def pools():
    """Face Mesh candidates for each iBUG point, by facial feature."""
    lips = contours.FACEMESH_LIPS
    inner = [e for e in lips if set(e) <= set(path(lips, 78, 13, 308)) | set(path(lips, 78, 14, 308))]
    outer = vertices(lips) - vertices(inner)
    upper, lower = path(lips, 78, 13, 308), path(lips, 78, 14, 308)
    out = {}
    for i in range(68):
        if i <= 16:
            out[i] = vertices(contours.FACEMESH_FACE_OVAL)
        elif i <= 26:
            out[i] = vertices(contours.FACEMESH_LEFT_EYEBROW | contours.FACEMESH_RIGHT_EYEBROW)
        elif i <= 35:
            out[i] = vertices(contours.FACEMESH_NOSE)
        elif i <= 47:
            out[i] = vertices(contours.FACEMESH_LEFT_EYE | contours.FACEMESH_RIGHT_EYE)
        elif i <= 59:
            out[i] = outer
        elif i in (60, 64):
            out[i] = {78, 308}
        else:
            out[i] = set(upper if i < 64 else lower) - {78, 308}
    return out


def read_vertices(lines):
    return np.array([[float(t) for t in l.split()[1:4]] for l in lines if l.startswith("v ")])


def ict_landmarks():
    text = open(os.path.join(SHARED, "ICT-FaceKit/README.md")).read()
    block = text.split("Multi-PIE 68 point facial landmarks indices:")[1].strip().split("\n")[0]
    return [int(t) for t in block.split(",")]


def ict_neutral(ict_dir):
    if ict_dir:
        return read_vertices(open(os.path.join(ict_dir, "generic_neutral_mesh.obj")))
    with tarfile.open(os.path.join(SHARED, "ICT-FaceKit/FaceXModel.tar.xz")) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("generic_neutral_mesh.obj"))
        return read_vertices(tar.extractfile(member).read().decode().splitlines())


def umeyama(src, dst):
    """Scale s, rotation R, translation t minimising |s R src + t - dst|^2."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.eye(3)
    d[2, 2] = np.sign(np.linalg.det(u @ vt))
    rot = u @ d @ vt
    scale = np.trace(np.diag(sig) @ d) / (a ** 2).sum(1).mean()
    return scale, rot, mu_d - scale * rot @ mu_s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ict-dir", help="folder with the unpacked generic_neutral_mesh.obj")
    args = parser.parse_args()
    mesh = read_vertices(open(os.path.join(SHARED, "mediapipe-geometry/canonical_face_model.obj")))
    assert len(mesh) == 468
    ict = ict_neutral(args.ict_dir)[ict_landmarks()]
    ids = sorted(ANCHORS)
    scale, rot, t = umeyama(ict[ids], mesh[[ANCHORS[i] for i in ids]])
    aligned = (scale * (rot @ ict.T)).T + t
    anchor_residual = np.linalg.norm(aligned[ids] - mesh[[ANCHORS[i] for i in ids]], axis=1)
    print(f"alignment: scale {scale:.4f}, anchor residual mean {anchor_residual.mean():.3f} cm, "
          f"max {anchor_residual.max():.3f} cm")
    mapping, residual = [], []
    candidates = pools()
    for i, p in enumerate(aligned):
        best = ANCHORS.get(i) if i in ANCHORS else min(sorted(candidates[i]), key=lambda j: np.linalg.norm(mesh[j] - p))
        mapping.append(best)
        residual.append(np.linalg.norm(mesh[best] - p))
    residual = np.array(residual)
    print(f"nearest-vertex residual: mean {residual.mean():.3f} cm, max {residual.max():.3f} cm "
          f"(iBUG {int(residual.argmax())})")
    duplicates = sorted({m for m in mapping if mapping.count(m) > 1})
    print(f"Face Mesh ids used more than once: {duplicates}")
    print("pub const IBUG68_FROM_MESH: [usize; 68] = [")
    for k in range(0, 68, 10):
        print("    " + ", ".join(str(m) for m in mapping[k:k + 10]) + ",")
    print("];")


if __name__ == "__main__":
    main()
