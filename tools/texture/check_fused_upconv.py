#!/usr/bin/env python3
"""Checks the mapping of ProGAN's fused `Conv0_up` layer used by `import_progan_npz`.

TF's `upscale2d_conv2d` pads the 3x3 kernel K to 5x5, sums its four 1-texel shifts into a 4x4
kernel and applies `conv2d_transpose` with stride 2 and SAME padding, i.e. the adjoint of a
stride-2 SAME `conv2d` (padding 1 before). This script builds that adjoint literally (scatter)
and compares it with nearest 2x upsampling followed by a zero-padded 3x3 correlation with K
flipped in both axes (what ganfit-texture computes after import). Pure Python, no TF needed;
it checks the algebra, not TensorFlow itself. Prints the largest difference (about 1e-15).
"""
import random

random.seed(0)
H = 5
K = [[random.gauss(0, 1) for _ in range(3)] for _ in range(3)]
y = [[random.gauss(0, 1) for _ in range(H)] for _ in range(H)]


def padded(a, b):
    return K[a - 1][b - 1] if 1 <= a <= 3 and 1 <= b <= 3 else 0.0


w4 = [[padded(a + 1, b + 1) + padded(a, b + 1) + padded(a + 1, b) + padded(a, b)
       for b in range(4)] for a in range(4)]
transposed = [[0.0] * (2 * H) for _ in range(2 * H)]
for i in range(H):
    for j in range(H):
        for a in range(4):
            for b in range(4):
                p, q = 2 * i + a - 1, 2 * j + b - 1
                if 0 <= p < 2 * H and 0 <= q < 2 * H:
                    transposed[p][q] += w4[a][b] * y[i][j]


def upsampled(p, q):
    return y[p // 2][q // 2] if 0 <= p < 2 * H and 0 <= q < 2 * H else 0.0


ours = [[sum(K[2 - a][2 - b] * upsampled(p + a - 1, q + b - 1) for a in range(3) for b in range(3))
         for q in range(2 * H)] for p in range(2 * H)]
diff = max(abs(transposed[p][q] - ours[p][q]) for p in range(2 * H) for q in range(2 * H))
print(f"max |conv2d_transpose(fused) - conv(upsample, flip(K))| = {diff:.3g}")
assert diff < 1e-12
