#!/usr/bin/env python3
"""Convert MediaPipe's face detector / face mesh .tflite files into safetensors for ganfit.

Reads the flatbuffer with the `tflite` schema package (no TensorFlow needed), dequantises the
float16 weights that sit behind DEQUANTIZE ops to float32, and stores every convolution, depthwise
convolution and PReLU parameter in candle's layout:

  <layer>.weight   CONV_2D           [out, in, kh, kw]     (tflite: [out, kh, kw, in])
  <layer>.weight   DEPTHWISE_CONV_2D [channels, 1, kh, kw] (tflite: [1, kh, kw, channels])
  <layer>.bias     both              [out]
  <layer>.alpha    PRELU             [channels]            (tflite: [1, 1, channels])

`<layer>` is the tflite tensor name before its first '/', e.g. `conv2d_1`, `depthwise_conv2d_3`,
`p_re_lu_4`, `classificator_8`: the Rust port (crates/ganfit-losses/src/face/) names its layers
the same way. The only other ops the two graphs use (ADD, RELU, MAX_POOL_2D, RESHAPE,
CONCATENATION, and PAD that zero-pads channels at the end) carry no weights; PAD is checked to be
exactly that. The output is deterministic: tensors sorted by name, one metadata key (`source`).

Pinned environment (Python 3.11):
  pip install mediapipe==0.10.21 "numpy<2" tflite==2.18.0 flatbuffers==25.12.19 safetensors==0.5.3

Usage (from the repository root):
  python tools/convert/mediapipe_tflite_to_safetensors.py detector  weights/mediapipe_face_detection_short_range.safetensors
  python tools/convert/mediapipe_tflite_to_safetensors.py landmarks weights/mediapipe_face_landmark.safetensors
The tflite file is read from the installed mediapipe wheel unless --tflite PATH is given.
"""
import argparse
import os
import sys

import numpy as np
import tflite
from safetensors.numpy import save_file

MODELS = {
    "detector": "modules/face_detection/face_detection_short_range.tflite",
    "landmarks": "modules/face_landmark/face_landmark.tflite",
}
MEDIAPIPE_VERSION = "0.10.21"

OPNAMES = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}
NUMPY_DTYPE = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
               tflite.TensorType.INT32: np.int32}


def op_name(model, op):
    code = model.OperatorCodes(op.OpcodeIndex())
    return OPNAMES[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]


def convert(path):
    buf = open(path, "rb").read()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)

    def raw(index):
        tensor = graph.Tensors(index)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        shape = tuple(tensor.ShapeAsNumpy())
        return np.frombuffer(data.tobytes(), dtype=NUMPY_DTYPE[tensor.Type()]).reshape(shape)

    dequantized_from = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        if op_name(model, op) == "DEQUANTIZE":
            dequantized_from[op.Outputs(0)] = op.Inputs(0)

    def value(index):
        """The float32 value of a constant tensor, dequantising float16 where needed."""
        return raw(dequantized_from.get(index, index)).astype(np.float32)

    def layer(index):
        return graph.Tensors(index).Name().decode().split("/")[0]

    out = {}

    def put(name, array):
        if name in out:
            sys.exit(f"duplicate tensor name {name}")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)

    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        name = op_name(model, op)
        if name == "CONV_2D":
            weight = value(op.Inputs(1))
            put(layer(op.Inputs(1)) + ".weight", weight.transpose(0, 3, 1, 2))
            put(layer(op.Inputs(1)) + ".bias", value(op.Inputs(2)))
        elif name == "DEPTHWISE_CONV_2D":
            weight = value(op.Inputs(1))
            put(layer(op.Inputs(1)) + ".weight", weight.transpose(3, 0, 1, 2))
            put(layer(op.Inputs(1)) + ".bias", value(op.Inputs(2)))
        elif name == "PRELU":
            put(layer(op.Inputs(1)) + ".alpha", value(op.Inputs(1)).reshape(-1))
        elif name == "PAD":
            pads = raw(op.Inputs(1))
            if pads[:3].any() or pads[3, 0] != 0:
                sys.exit(f"PAD op {k} pads more than trailing channels: {pads.tolist()}")
        elif name not in ("DEQUANTIZE", "ADD", "RELU", "MAX_POOL_2D", "RESHAPE", "CONCATENATION"):
            sys.exit(f"unsupported op {name} (#{k}); the Rust port would not match this graph")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out")
    parser.add_argument("--tflite", help="tflite file to read instead of the installed mediapipe wheel's")
    args = parser.parse_args()
    if args.tflite:
        path = args.tflite
    else:
        import mediapipe

        if mediapipe.__version__ != MEDIAPIPE_VERSION:
            sys.exit(f"need mediapipe=={MEDIAPIPE_VERSION}, found {mediapipe.__version__}")
        path = os.path.join(os.path.dirname(mediapipe.__file__), MODELS[args.model])
    tensors = convert(path)
    source = f"mediapipe=={MEDIAPIPE_VERSION}:mediapipe/{MODELS[args.model]}"
    save_file(dict(sorted(tensors.items())), args.out, metadata={"source": source})
    print(f"{args.out}: {len(tensors)} tensors, {sum(t.size for t in tensors.values())} parameters")


if __name__ == "__main__":
    main()
