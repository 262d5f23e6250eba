#!/usr/bin/env python3
"""Times dlib's face-recognition ResNet in PyTorch (CPU) for comparison with
`cargo bench -p ganfit-losses --bench identity`.

The network is built from weights/dlib_face_recognition_resnet_model_v1.safetensors exactly as
crates/ganfit-losses builds it (each convolution fused with its affine layer; weights frozen so
only input gradients are computed) and checked against the dlib fixture descriptors before
timing. Timed: forward of a [2, 3, 150, 150] batch, and forward + identity/content loss +
backward to the input, both as medians over --iters runs.

Environment (Python 3.11): python3 -m venv /tmp/torchvenv &&
    /tmp/torchvenv/bin/pip install torch==2.15.0 safetensors==0.7.0 numpy==2.4.6 pillow==13.0.0
Run from the repository root: /tmp/torchvenv/bin/python tools/bench/identity_torch.py
"""

import argparse
import json
import pathlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "weights" / "dlib_face_recognition_resnet_model_v1.safetensors"
FIXTURES = REPO / "crates" / "ganfit-losses" / "tests" / "fixtures" / "dlib"
# (channels, blocks, first block downsamples) of stages 0..4, as in identity/arch.rs.
STAGES = [(32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True)]


class DlibResnet:
    def __init__(self, path):
        t = load_file(str(path))
        self.mean = t["input.mean_rgb"].view(1, 3, 1, 1)
        self.stem = self.fuse(t, "stem.conv", "stem.affine", 2)
        self.stages = []
        for s, (_, blocks, down) in enumerate(STAGES):
            stage = []
            for b in range(blocks):
                p = f"stage{s}.block{b}"
                is_down = down and b == 0
                stage.append((self.fuse(t, p + ".conv1", p + ".affine1", 2 if is_down else 1),
                              self.fuse(t, p + ".conv2", p + ".affine2", 1), is_down))
            self.stages.append(stage)
        self.fc = t["fc.weight"]

    @staticmethod
    def fuse(t, conv, affine, stride):
        w, gamma, beta = t[conv + ".weight"], t[affine + ".gamma"], t[affine + ".beta"]
        b = t.get(conv + ".bias", torch.zeros_like(gamma))
        pad = w.shape[-1] // 2 if stride == 1 else 0
        return (w * gamma.view(-1, 1, 1, 1)).contiguous(), b * gamma + beta, stride, pad

    @staticmethod
    def conv(x, p):
        w, b, stride, pad = p
        return F.conv2d(x, w, b, stride=stride, padding=pad)

    @staticmethod
    def add_padded(a, b):
        shape = [max(x, y) for x, y in zip(a.shape, b.shape)]
        pad = lambda t: F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2],
                                  0, shape[1] - t.shape[1]))
        return pad(a) + pad(b)

    def forward(self, images):
        x = (images - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.conv(x, self.stem)), 3, 2)
        maps = [x]
        for stage in self.stages:
            for conv1, conv2, down in stage:
                main = self.conv(F.relu(self.conv(x, conv1)), conv2)
                short = F.avg_pool2d(x, 2, 2) if down else x
                x = F.relu(self.add_padded(main, short))
            maps.append(x)
        return maps, x.mean(dim=(2, 3)) @ self.fc.t()


def losses(photo, render):
    (pm, pe), (rm, re) = photo, render
    identity = 1 - F.cosine_similarity(pe, re, dim=1)
    content = sum(torch.sqrt(((r - p) ** 2).flatten(1).sum(1) + 1e-12) / r[0].numel()
                  for p, r in zip(pm, rm))
    return identity + content


def median_ms(fn, iters):
    """Medians of the wall time and of the process's CPU time (all threads) per call, in ms."""
    for _ in range(3):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["forward_backward"],
                        help="print only the forward + backward medians in ms, wall then CPU "
                             "(for scripts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = DlibResnet(WEIGHTS)

    fixture = json.loads((FIXTURES / "descriptors.json").read_text())
    chips = np.stack([np.asarray(Image.open(FIXTURES / f["chip"]).convert("RGB"))
                      for f in fixture["faces"]])
    with torch.no_grad():
        _, emb = net.forward(torch.from_numpy(chips).permute(0, 3, 1, 2).float())
    err = np.abs(emb.numpy() - np.array([f["descriptor"] for f in fixture["faces"]])).max()
    assert err < 1e-4, f"parity with dlib: max abs {err:.2e}"

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 150, 150, generator=gen) * 255
    with torch.no_grad():
        photo = net.forward(torch.rand(1, 3, 150, 150, generator=gen) * 255)

    def forward():
        with torch.no_grad():
            net.forward(images)

    def forward_backward():
        x = images.clone().requires_grad_(True)
        losses(photo, net.forward(x)).sum().backward()
        return x.grad

    if args.only:
        print("%.3f %.3f" % median_ms(forward_backward, args.iters))
        return
    print(f"parity with dlib: max abs {err:.2e}")
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name, fn in (("forward b2", forward), ("forward+backward b2", forward_backward)):
        wall, cpu = median_ms(fn, args.iters)
        print(f"{name}: median {wall:.2f} ms (CPU {cpu:.2f} ms)")


if __name__ == "__main__":
    main()
