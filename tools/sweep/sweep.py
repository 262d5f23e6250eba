#!/usr/bin/env python3
"""Generalisation sweep: fit many shared photos that the tests and the accuracy bench do not
use, one at a time with the default settings, and tabulate how each fit went.

Per photo: exit status (and the one-line error), wall time, the fitted-vs-detected landmark
error in % of the detected outer-eye-corner distance (mean, max and per group), the fitted
head pose (yaw/pitch/roll from params.json's R) and the size of the shape and expression
coefficients, so gross misfits stand out. Outputs (never committed) go to --out.

Usage (numpy + Pillow, e.g. /tmp/venv; tested with Python 3.11, numpy 1.26/2.x):
    cargo build --release -p ganfit-cli
    /tmp/venv/bin/python tools/sweep/sweep.py --out /tmp/sweep            # the default sample
    /tmp/venv/bin/python tools/sweep/sweep.py --out /tmp/sweep PHOTO...   # chosen photos
It writes --out/sweep.md (table) and --out/sweep.json (every number).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

# Photos the tests (tests/fit.rs) and `ganfit bench accuracy` (first two of each folder) use:
# the sweep leaves them out so it measures faces the defaults were not tuned on.
SEEN = {
    "astronaut/astronaut.png",
    "frl_london/001_neutral.jpg",
    "frl_london/001_smiling.jpg",
    "frl_london/002_neutral.jpg",
    "frl_canada/003f.jpg",
    "frl_canada/008f.jpg",
    "frl_lisa/lisa1.jpg",
    "frl_lisa/lisa2.jpg",
    "us_congress_gpo_pd/A000014.jpg",
    "us_congress_gpo_pd/A000022.jpg",
    "us_congress_historical_pd/55th_000414.jpg",
    "us_congress_historical_pd/55th_000857.jpg",
}

# How many photos of each folder the default sample takes, evenly spaced through the
# sorted list of the folder's unseen photos.
SAMPLE = {
    "us_congress_gpo_pd": 14,
    "us_congress_historical_pd": 14,
    "frl_canada": 6,
    "frl_london": 10,
    "frl_lisa": 6,
}

# The face outline in the 189-point FRL template of the `.tem` files of frl_london (neutral)
# and frl_canada, from the left temple over the chin to the right temple (points read off a
# plot of the template on frl_canada/129m.jpg).
FRL_OUTLINE = [109, 185, 110, 186, 111, 125, 126, 127, 128, 129, 130, 131, 132, 133, 114,
               188, 113, 187, 112]

GROUPS = {
    "jaw": range(0, 17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "mouth": range(48, 68),
}


def shared_faces():
    for candidate in (ROOT.parent / "shared", ROOT / "shared", Path("/work/shared")):
        if (candidate / "data" / "faces").is_dir():
            return candidate / "data" / "faces"
    sys.exit("shared/data/faces not found beside the checkout")


def default_sample(faces):
    photos = []
    for folder, count in SAMPLE.items():
        unseen = sorted(
            p
            for p in (faces / folder).iterdir()
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            and f"{folder}/{p.name}" not in SEEN
        )
        if not unseen:
            continue
        step = len(unseen) / min(count, len(unseen))
        photos += [unseen[int(i * step)] for i in range(min(count, len(unseen)))]
    return photos


def euler_degrees(r):
    """Yaw (about y), pitch (about x) and roll (about z) of the head in the camera frame.

    The model's frame is y up, z towards the viewer; OpenCV's camera is y down, z forward,
    so the head's own rotation is R composed with the flip diag(1, -1, -1)."""
    m = np.asarray(r) @ np.diag([1.0, -1.0, -1.0])
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -m[2][0]))))
    pitch = math.degrees(math.atan2(m[2][1], m[2][2]))
    roll = math.degrees(math.atan2(m[1][0], m[0][0]))
    return yaw, pitch, roll


def read_tem(photo):
    """The 189 annotated points of an FRL photo, or None."""
    tem = photo.with_suffix(".tem")
    if not tem.is_file():
        return None
    lines = tem.read_text().split("\n")
    count = int(lines[0])
    points = np.array([[float(v) for v in line.split()[:2]] for line in lines[1:1 + count]])
    return points if count == 189 else None


def outline_distances(points, outline):
    """Signed distance of each point to the polyline `outline`: positive outside the face
    (the side away from the outline's centroid)."""
    centre = outline.mean(axis=0)
    distances = []
    for p in points:
        best = (math.inf, 0.0)
        for a, b in zip(outline[:-1], outline[1:]):
            ab = b - a
            t = min(1.0, max(0.0, float((p - a) @ ab / (ab @ ab))))
            foot = a + t * ab
            d = float(np.linalg.norm(p - foot))
            if d < best[0]:
                outward = np.array([ab[1], -ab[0]])
                if outward @ (foot - centre) < 0:
                    outward = -outward
                best = (d, math.copysign(d, float((p - foot) @ outward)))
        distances.append(best[1])
    return np.array(distances)


def measure(out_dir, photo):
    marks = json.loads((out_dir / "landmarks.json").read_text())
    detected = np.asarray(marks["detected"], dtype=float)
    fitted = np.asarray(marks["fitted"], dtype=float)
    iod = float(np.linalg.norm(detected[36] - detected[45]))
    error = np.linalg.norm(fitted - detected, axis=1) / iod * 100.0
    params = json.loads((out_dir / "params.json").read_text())
    yaw, pitch, roll = euler_degrees(params["camera"]["R"])
    row = {
        "iod_px": iod,
        "lmk_mean": float(error.mean()),
        "lmk_max": float(error.max()),
        "lmk_worst_point": int(error.argmax()),
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "shape_norm": float(np.linalg.norm(params["shape"])),
        "expr_norm": float(np.linalg.norm(params["expression"])),
        "focal_px": float(params["camera"]["K"][0][0]),
        "depth": float(params["camera"]["t"][2]),
    }
    for name, idx in GROUPS.items():
        row[f"lmk_{name}"] = float(error[list(idx)].mean())
    annotated = read_tem(photo)
    if annotated is not None:
        # Jaw points 0-16 against the annotated outline: where do the landmarker and the fit
        # put the face's edge? (% IOD, positive outside the annotated outline.)
        outline = annotated[FRL_OUTLINE]
        for key, points in (("detected", detected), ("fitted", fitted)):
            signed = outline_distances(points[:17], outline) / iod * 100.0
            row[f"outline_{key}_signed"] = float(signed.mean())
            row[f"outline_{key}_abs"] = float(np.abs(signed).mean())
            row[f"outline_{key}_per_point"] = signed.tolist()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sweep"))
    parser.add_argument("--binary", type=Path, default=ROOT / "target/release/ganfit")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--extra", default="", help="extra arguments for `ganfit fit`")
    parser.add_argument("--reuse", action="store_true",
                        help="measure the outputs already in --out instead of fitting again")
    args = parser.parse_args()
    faces = shared_faces()
    photos = args.photos or default_sample(faces)
    args.out.mkdir(parents=True, exist_ok=True)
    reused = []
    if args.reuse and (args.out / "sweep.json").is_file():
        reused = json.loads((args.out / "sweep.json").read_text())
    rows = []
    for photo in photos:
        name = f"{photo.parent.name}__{photo.stem}"
        out_dir = args.out / name
        command = [str(args.binary), "fit", str(photo), "--out", str(out_dir), "--quiet"]
        command += args.extra.split()
        start = time.monotonic()
        previous = {r["photo"]: r for r in reused}.get(f"{photo.parent.name}/{photo.name}")
        if previous is not None:
            status, stderr, seconds = previous["status"], previous["error"], previous["seconds"]
        else:
            try:
                done = subprocess.run(command, capture_output=True, text=True,
                                      timeout=args.timeout)
                status, stderr = done.returncode, done.stderr.strip()
            except subprocess.TimeoutExpired:
                status, stderr = "timeout", ""
            seconds = time.monotonic() - start
        row = {"photo": f"{photo.parent.name}/{photo.name}", "status": status,
               "seconds": seconds, "error": (stderr.splitlines()[-1:] or [""])[0]}
        if status == 0:
            try:
                row.update(measure(out_dir, photo))
            except (OSError, KeyError, ValueError) as err:
                row["error"] = f"outputs unreadable: {err}"
        rows.append(row)
        summary = (f"{row['lmk_mean']:.2f} % IOD (max {row['lmk_max']:.1f} at {row['lmk_worst_point']}),"
                   f" yaw {row['yaw']:+.0f}°" if "lmk_mean" in row else row["error"])
        print(f"{row['photo']:45s} {status!s:>7} {row['seconds']:5.1f} s  {summary}", flush=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    write_table(rows, args.out / "sweep.md")


def write_table(rows, path):
    head = ("| photo | status | time (s) | lmk mean (% IOD) | max | jaw | brows | nose | eyes | mouth"
            " | yaw | pitch | roll | ‖p_s‖ | ‖p_e‖ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "lmk_mean" not in r:
            lines.append(f"| {r['photo']} | {r['status']}: {r['error']} | {r['seconds']:.1f} |"
                         + " |" * 12)
            continue
        lines.append(
            f"| {r['photo']} | ok | {r['seconds']:.1f} | {r['lmk_mean']:.2f} | {r['lmk_max']:.1f}"
            + "".join(f" | {r['lmk_' + g]:.2f}" for g in GROUPS)
            + f" | {r['yaw']:+.0f} | {r['pitch']:+.0f} | {r['roll']:+.0f}"
            f" | {r['shape_norm']:.1f} | {r['expr_norm']:.2f} |")
    ok = [r for r in rows if "lmk_mean" in r]
    if ok:
        lines.append("")
        lines.append(
            f"{len(ok)}/{len(rows)} fitted; landmark error median {np.median([r['lmk_mean'] for r in ok]):.2f}"
            f" % IOD, mean {np.mean([r['lmk_mean'] for r in ok]):.2f}, worst {max(r['lmk_mean'] for r in ok):.2f};"
            f" median time {np.median([r['seconds'] for r in rows]):.1f} s")
    annotated = [r for r in ok if "outline_fitted_abs" in r]
    if annotated:
        lines.append("")
        lines.append(
            f"Jaw points 0-16 against the annotated FRL face outline ({len(annotated)} photos,"
            " mean over points and photos, % IOD; signed: + outside the outline):"
            f" detected |d| {np.mean([r['outline_detected_abs'] for r in annotated]):.2f}"
            f" signed {np.mean([r['outline_detected_signed'] for r in annotated]):+.2f};"
            f" fitted |d| {np.mean([r['outline_fitted_abs'] for r in annotated]):.2f}"
            f" signed {np.mean([r['outline_fitted_signed'] for r in annotated]):+.2f}")
        per_point = np.mean([r["outline_fitted_per_point"] for r in annotated], axis=0)
        detected = np.mean([r["outline_detected_per_point"] for r in annotated], axis=0)
        lines.append("")
        lines.append("per jaw point (detected / fitted, signed % IOD): " + ", ".join(
            f"{i}: {d:+.1f}/{f:+.1f}" for i, (d, f) in enumerate(zip(detected, per_point))))
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("|")))


if __name__ == "__main__":
    main()
