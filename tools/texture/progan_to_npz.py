#!/usr/bin/env python3
"""Dump an official ProGAN generator's variables to an .npz for `ganfit texture import-progan`.

Usage:
  python progan_to_npz.py karras2018iclr-celebahq-1024x1024.pkl generator.npz [--net Gs]
  python progan_to_npz.py model.ckpt generator.npz [--scope G_paper]

Needs TensorFlow 1.x (tested versions: none -- this could not be run where it was written, which
has no TF 1.x) and, for .pkl files, the official repository
(github.com/tkarras/progressive_growing_of_gans) on PYTHONPATH, since the pickles reference its
`tfutil.Network` class. Keys are the TF variable names relative to the network (e.g.
`4x4/Dense/weight`, `8x8/Conv0_up/weight`, `ToRGB_lod0/bias`); the Rust importer maps names
and layouts (see `ganfit_texture::import_progan_npz`).
"""
import argparse
import pickle

import numpy as np
import tensorflow as tf  # TF 1.x


def from_pickle(path, net):
    tf.InteractiveSession()
    with open(path, "rb") as f:
        networks = dict(zip(("G", "D", "Gs"), pickle.load(f)))
    vars_ = networks[net].vars  # OrderedDict: relative name -> tf.Variable
    return dict(zip(vars_.keys(), tf.get_default_session().run(list(vars_.values()))))


def from_checkpoint(path, scope):
    reader = tf.train.load_checkpoint(path)
    prefix = scope.rstrip("/") + "/"
    return {name[len(prefix):]: reader.get_tensor(name)
            for name, _ in tf.train.list_variables(path) if name.startswith(prefix)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help=".pkl snapshot or TF checkpoint prefix")
    p.add_argument("out", help="output .npz")
    p.add_argument("--net", default="Gs", help="network in a .pkl: G or Gs (the averaged one)")
    p.add_argument("--scope", default="G_paper", help="generator scope in a checkpoint")
    a = p.parse_args()
    arrays = from_pickle(a.source, a.net) if a.source.endswith(".pkl") else from_checkpoint(a.source, a.scope)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items() if k != "lod"}
    np.savez(a.out, **arrays)
    print(f"wrote {len(arrays)} arrays to {a.out}")


if __name__ == "__main__":
    main()
