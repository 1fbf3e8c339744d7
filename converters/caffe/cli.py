"""``lrponnx caffe2onnx``: the command-line face of :func:`lrponnx.converters.caffe.convert`.

    lrponnx caffe2onnx deploy.prototxt [weights.caffemodel] -o model.onnx
            [--mean 104,117,123 | --mean-file mean.binaryproto|.npy] [--scale 1.0]
            [--channel-order bgr|rgb] [--input-shape 1,3,227,227] [--opset N]
            [--random-weights SEED] [--embed-preprocessing]

``register(subparsers)`` adds the subcommand to the main ``lrponnx`` parser; ``run(args)`` executes
it and returns the exit code (0, or 2 with one clear message for a user error). The output is
written to a temporary file in the same folder and moved into place with ``os.replace``, so a
failed or interrupted run never leaves a half-written model. ``python -m
lrponnx.converters.caffe.cli ...`` runs it stand-alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from lrponnx.errors import InvalidModelError, LrpOnnxError

PROG = "lrponnx caffe2onnx"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("prototxt", help="the net definition (deploy.prototxt; V1 'layers' or V2 'layer' format)")
    p.add_argument("caffemodel", nargs="?", default=None,
                   help="trained weights (.caffemodel); omit with --random-weights")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    mean = p.add_mutually_exclusive_group()
    mean.add_argument("--mean", default=None, metavar="V[,V...]",
                      help="per-channel mean in the graph's channel order, 0-255 units (e.g. 104,117,123)")
    mean.add_argument("--mean-file", default=None, metavar="PATH",
                      help="mean image: .npy (C x H x W, or C) or Caffe .binaryproto")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplier applied after mean subtraction (Caffe's transform_param.scale; default 1)")
    p.add_argument("--channel-order", choices=["bgr", "rgb", "gray"], default=None,
                   help="channel order the net expects (default: bgr for 3-channel inputs, as Caffe's ImageNet "
                        "nets; gray for 1-channel ones)")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="override the input shape; a number as first dim fixes the batch ('N' keeps it symbolic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="deterministic untrained weights from this seed (when there is no caffemodel)")
    p.add_argument("--embed-preprocessing", action="store_true",
                   help="put the mean subtraction and scaling into the graph (it then takes pixels * 255)")
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``caffe2onnx`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "caffe2onnx", help="convert a Caffe model (.prototxt + .caffemodel) to ONNX, without Caffe",
        description="Convert a Caffe model to ONNX without Caffe. The preprocessing the net expects is "
                    "stored in the ONNX metadata (key lrponnx.preprocessing).")
    add_arguments(p)
    p.set_defaults(func=run, handler=run)
    return p


def write_atomic(data: bytes, path: str | os.PathLike, inputs=()) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    after lrponnx's one output guard (:func:`lrponnx.files.check_output`: never an input file,
    a device, a folder, or into a missing folder)."""
    from lrponnx.files import atomic_path

    try:
        with atomic_path(path, inputs) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise InvalidModelError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    """Execute ``caffe2onnx``; returns 0, or 2 after printing one clear message for a user error."""
    from lrponnx.converters.caffe import convert

    from lrponnx.files import check_output

    out = Path(args.output)
    inputs = [args.prototxt, args.caffemodel, args.mean_file]
    try:
        check_output(out, inputs)  # before the work
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = convert(args.prototxt, args.caffemodel, mean=args.mean, mean_file=args.mean_file,
                            scale=args.scale, channel_order=args.channel_order, input_shape=args.input_shape,
                            opset=args.opset, random_weights=args.random_weights,
                            embed_preprocessing=args.embed_preprocessing)
        for w in caught:
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        try:
            data = model.SerializeToString()
        except ValueError as e:  # protobuf refuses messages over 2 GiB
            raise InvalidModelError(f"the converted model is too large for a single ONNX file: {e}") from None
        write_atomic(data, out, inputs)
    except LrpOnnxError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    n_params = sum(int(_numel(t)) for t in model.graph.initializer)
    outs = ", ".join(o.name for o in model.graph.output)
    print(f"wrote {out} ({len(model.graph.node)} nodes, {n_params:,} parameters; outputs: {outs})")
    return 0


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog=PROG, description=register.__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
