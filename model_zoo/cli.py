"""``lrponnx zoo list`` / ``lrponnx zoo build NAME [-o DIR]``.

The main CLI calls :func:`register` with its subparsers and :func:`run` with the parsed args.
Standalone: ``python -m lrponnx.model_zoo.cli zoo list``.
"""
from __future__ import annotations

import argparse
import sys

from lrponnx.errors import LrpOnnxError


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``zoo`` command (with ``list`` and ``build``) to an argparse subparsers object."""
    p = subparsers.add_parser("zoo", help="list or build the models of the model zoo",
                              description="Named recipes that produce ONNX models (see docs/model_zoo.md).")
    sub = p.add_subparsers(dest="zoo_command", metavar="{list,build}")
    sub.required = True
    pl = sub.add_parser("list", help="list the zoo models")
    pl.add_argument("-v", "--verbose", action="store_true", help="print each model's card")
    pb = sub.add_parser("build", help="build one zoo model into a folder")
    pb.add_argument("name", help="zoo model name (see `zoo list`)")
    pb.add_argument("-o", "--out-dir", default=".", help="output folder (default: current folder)")
    pb.add_argument("--retrain", action="store_true",
                    help="cifar10-lrn, vit-cifar10: train from scratch instead of copying the bundled file "
                         "(minutes on a CPU)")
    pb.add_argument("--seed", type=int, default=None,
                    help="with --retrain: training seed; bvlc-*: seed of the random weights")
    pb.add_argument("--epochs", type=int, default=None, help="with --retrain: number of epochs")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from lrponnx.model_zoo import registry

    try:
        if args.zoo_command == "list":
            for e in registry.list_models():
                flags = []
                flags.append("bundled" if e.bundled else "needs ../shared/data")
                if e.needs_converter:
                    flags.append("needs Caffe converter")
                if not e.trained:
                    flags.append("UNTRAINED")
                print(f"{e.name:20s} {e.summary}  [{', '.join(flags)}]")
                if getattr(args, "verbose", False):
                    print(e.card())
            return 0
        if args.zoo_command == "build":
            opts = {}
            if args.retrain:
                opts["retrain"] = True
            if args.seed is not None:
                opts["seed"] = args.seed
            if args.epochs is not None:
                opts["epochs"] = args.epochs
            entry = registry.get(args.name)
            bad = sorted(set(opts) - registry.build_options(entry))
            if bad:
                raise LrpOnnxError(f"{entry.name} does not take --{', --'.join(bad)}")
            from lrponnx.files import check_output, check_output_folder

            out_dir = check_output_folder(args.out_dir)  # an existing file there: one line
            check_output(out_dir / f"{entry.name}.onnx")  # nor a folder or device named like the model
            path = registry.build(entry.name, out_dir, **opts)
            print(path)
            return 0
        raise LrpOnnxError(f"unknown zoo command {args.zoo_command!r}")
    except LrpOnnxError as e:
        print(f"lrponnx: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrponnx.model_zoo.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
