"""The ``lrponnx`` command line. User mistakes print one clear message and exit with code 2."""
from __future__ import annotations

import argparse
import os
import sys

from lrponnx import __version__
from lrponnx.app.rule_options import _floats, add_rule_flags, rule_kwargs
from lrponnx.app.termination import Terminated, on_sigterm as _on_sigterm
from lrponnx.errors import LrpOnnxError


# -- subcommands ---------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from lrponnx.compiler.emit import convert
    from lrponnx.files import check_output, save_model

    check_output(args.output, [args.model])  # before the work: never the input, a device, a folder
    # The weights stay on disk until save_model copies them: memory stays below twice the model.
    explainer = convert(args.model, layer_relevance=args.layer_relevance, lazy_weights=True,
                        exact_forward=args.exact_forward, **rule_kwargs(args))
    save_model(explainer, args.output, external_data=True if args.external_data else None, inputs=[args.model])
    print(f"wrote {args.output} ({args.composite}, LRN {args.lrn_rule})")
    return 0


def cmd_inspect(args) -> int:
    from lrponnx.compiler.emit import plan
    from lrponnx.errors import shorten

    kw = rule_kwargs(args)
    kw.pop("seed")
    kw.pop("target_runtime")
    p = plan(args.model, lazy_weights=True, **kw)
    on_path = {id(u) for u in _path(p)}
    rows = [("#", "node", "op", "rule", "notes")]
    for u in p.units:
        if id(u) not in on_path:
            continue
        rule = str(u.rule) if u.rule is not None else "-"
        notes = "; ".join(([("first layer")] if u.first else []) + u.notes)
        rows.append((str(u.index), shorten(u.name), shorten(u.op_type), rule, notes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else ""))
    shown = shorten(p.output or p.logits)
    print(f"\nexplained output: {shown}" + (f" (the scores {shorten(p.logits)!r} its Softmax is computed from)"
                                           if p.output and p.output != p.logits else ""))
    if p.offenders:
        print(f"\n{len(p.offenders)} node(s) cannot be explained:")
        for o in p.offenders:
            print(o)
        return EXIT_UNEXPLAINABLE
    print("every node on the relevance path has a rule")
    return 0


def _path(p):
    from lrponnx.compiler.emit import _relevance_path

    return _relevance_path(p.view, p.units, p.logits)


def cmd_explain(args) -> int:
    from lrponnx.app.explain import run_explain

    return run_explain(args)


def cmd_rules(args) -> int:
    from lrponnx.app.rule_options import describe_rules

    print(describe_rules())
    return 0


def cmd_demo(args) -> int:
    from lrponnx.app.demo import run_demo

    return run_demo(args.output, getattr(args, "model", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrponnx", description="Compile ONNX networks into LRP explainers.")
    parser.add_argument("--version", action="version", version=f"lrponnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="compile a model into an explainer ONNX model")
    p.add_argument("model", help="the ONNX model")
    p.add_argument("-o", "--output", required=True, help="where to write the explainer")
    p.add_argument("--layer-relevance", action="store_true",
                   help="also output the relevance at every explained node (debugging, conservation checks)")
    p.add_argument("--external-data", action="store_true", help="store weights in a side file")
    p.add_argument("--exact-forward", action="store_true",
                   help="keep the model's LRN nodes, so predictions are bit-identical to the model's "
                        "(by default LRN is recomputed with the rule's plain ops: ~2x faster in ORT, "
                        "equal to float rounding)")
    add_rule_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="show every node, its rule, and what cannot be explained",
                       description="Show every node on the relevance path and its rule. Exit code 0: every "
                                   "node can be explained; 3: the model has nodes that cannot be explained "
                                   "(listed); 2: the model or an option is invalid.")
    p.add_argument("model")
    add_rule_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("explain", help="explain images or .npy arrays and write heatmaps",
                       description="Explain inputs in batches, writing heatmaps as they are made. A bad input "
                       "is reported and skipped. Running the same command again after an interruption "
                       "finishes the job (state in OUT/.lrponnx-explain). Exit codes: 0 all explained, "
                       "3 some inputs failed (see OUT/summary.json), 2 nothing done (a usage error), "
                       "130/143 stopped by Ctrl-C/SIGTERM (run it again to finish). See docs/scale.md.")
    p.add_argument("model", help="an explainer, or a plain model (compiled on the fly)")
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or .npy arrays")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target", type=int, default=None,
                   help="class index to explain for every input (default: each input's predicted class)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None)
    p.add_argument("--cmap", default="coldnhot", help="colour map (coldnhot, bwr, seismic, hot, gray)")
    p.add_argument("--save-raw", action="store_true", help="also save the relevance as .npy")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output folder that holds another job's results")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="explain on a Ray cluster: its address, 'auto' (the running cluster) or 'local' "
                        "(start one on this machine); needs `pip install lrponnx[ray]`")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="Explainer sessions on the cluster (default: its CPUs / --ray-cpus-per-actor)")
    p.add_argument("--ray-cpus-per-actor", type=int, default=1,
                   help="CPUs (and ONNX Runtime threads) per session (default 1)")
    p.add_argument("--mean", type=_floats, default=None, help="preprocessing: mean (overrides metadata)")
    p.add_argument("--std", type=_floats, default=None, help="preprocessing: std (overrides metadata)")
    p.add_argument("--channel-order", choices=["rgb", "bgr"], default=None)
    p.add_argument("--pixel-scale", type=float, default=None, help="preprocessing: image in [0,1] times this")
    p.add_argument("--size", default=None, help="preprocessing: HxW, e.g. 224,224")
    add_rule_flags(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("rules", help="list every rule with its parameters and defaults, and the composites",
                       description="Every rule (its parameters, their defaults, the op kinds it applies to) "
                                   "and every composite, read from the rule classes.")
    p.set_defaults(func=cmd_rules)

    p = sub.add_parser("demo", help="explain bundled sample photos with the bundled model")
    p.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--model", default=None, help="a bundled zoo model explained beside the CNN "
                   "(vit-cifar10: AttnLRP heatmaps of a small ViT)")
    p.set_defaults(func=cmd_demo)

    for register in _plugins():
        register(sub)
    return parser


def _plugins():
    """Subcommands that live with their own modules (Caffe converter, model zoo, evaluation, web
    page). Each is part of the package: one that fails to import is a bug and fails loudly (a
    traceback), never a subcommand that silently disappears. Optional dependencies (matplotlib,
    Ray, ...) are imported when their subcommand runs, which names what is missing."""
    return [__import__(module, fromlist=["register"]).register for module in PLUGINS]


PLUGINS = ("lrponnx.converters.caffe.cli", "lrponnx.model_zoo.cli", "lrponnx.app.evaluate", "lrponnx.app.web")


#: Exit codes (docs/cli-guarantees.md): 0 done; 1 a bug of ours (traceback, please report);
#: 2 the input, an option or the environment is wrong (one line on stderr, nothing written);
#: 3 ``inspect``: the model has nodes that cannot be explained; 130 Ctrl-C; 141 stdout closed
#: (``| head``); 143 SIGTERM. Interrupted writes leave no temporary file behind.
EXIT_USAGE, EXIT_UNEXPLAINABLE, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_TERMINATED = 2, 3, 130, 141, 143


def main(argv=None) -> int:
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except LrpOnnxError as e:
        print(f"lrponnx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`lrponnx inspect m.onnx | head -1`): stop quietly, like other tools
        _silence_stdout()
        return EXIT_PIPE
    except OSError as e:  # a user path: missing, unreadable, disk full, ...
        print(f"lrponnx: error: {_os_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("lrponnx: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lrponnx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("lrponnx: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        except (OSError, ValueError):
            pass


def _os_message(e: OSError) -> str:
    from lrponnx.errors import shorten

    text = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        text += f": {shorten(os.fsdecode(e.filename))!r}"
    if getattr(e, "filename2", None) is not None:
        text += f" -> {shorten(os.fsdecode(e.filename2))!r}"
    return text


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
