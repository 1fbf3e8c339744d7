"""``lrponnx explain``: explain image files, folders or .npy arrays and write heatmaps.

The run streams: inputs are listed (paths only), then read, explained and written one batch at a
time, so memory does not grow with the number of inputs. Every file is written atomically. A bad
input is reported on stderr, listed in ``summary.json`` and skipped; the others finish. A journal in
``OUT/.lrponnx-explain/`` lets the same command, run again after an interruption, finish the job
without redoing finished inputs, with outputs byte-identical to an uninterrupted run
(docs/scale.md).

Exit codes: 0 every input explained; 2 a user mistake, nothing was done; 3 the run finished but some
inputs failed (listed in ``summary.json``); 130 / 143 interrupted by Ctrl-C / SIGTERM (run the same
command again to finish).

This module is the command (flags, identity, the loop); a chunk is explained by
:mod:`lrponnx.app.explain_chunks`, the output folder and journal are :mod:`lrponnx.app.explain_job`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from lrponnx.app.explain_chunks import ChunkEngine
from lrponnx.app.explain_job import JOB_FORMAT, OVERVIEW_ROWS, ExplainJob
from lrponnx.errors import LrpOnnxError

#: Exit code of a run that finished with some inputs failed (they are listed in summary.json).
EXIT_SOME_FAILED = 3
#: On Ray, actors send relevance and display images back only for inputs before this position (and
#: relevance for all with --save-raw): the overview needs 32 rows, heatmaps travel as PNG. A row
#: still missing at the end (many early failures) is recomputed locally (ExplainJob.complete_rows).
RAY_ARRAYS_BELOW = 2 * OVERVIEW_ROWS


def preprocessing_for(model, args):
    """The model's stored preprocessing, overridden by any flag the user gave."""
    from lrponnx.app.preprocess import Preprocessing

    base = Preprocessing.from_model(model)
    flags = dict(mean=args.mean, std=args.std, channel_order=args.channel_order,
                 pixel_scale=args.pixel_scale, size=args.size)
    if base is not None and all(v is None for v in flags.values()):
        return base
    if base is None and all(v is None for v in flags.values()):
        return None
    return Preprocessing.from_flags(base=base, **{k: v for k, v in flags.items() if v is not None})


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _unique_stems(items) -> list[str]:
    """File stems for the outputs; inputs with the same name in different folders keep apart."""
    def stem(it, with_parent: bool) -> str:
        base = Path(it.name).stem + (f"_{it.index}" if it.index is not None else "")
        return _safe_name(f"{Path(it.source).parent.name}_{base}" if with_parent else base)

    plain = [stem(it, False) for it in items]
    counts = Counter(plain)
    stems = [stem(it, counts[s] > 1) for it, s in zip(items, plain)]
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):  # still equal (same parent name): number them
        if s in seen:
            seen[s] += 1
            stems[i] = f"{s}_{seen[s]}"
        else:
            seen[s] = 0
    return stems


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def _check_flags(args) -> None:
    """Everything about the flags that can be refused before any work."""
    from lrponnx.app.render import check_cmap

    try:
        check_cmap(args.cmap)
    except ValueError as e:
        raise LrpOnnxError(f"--cmap: {e}") from None
    if args.batch_size < 1:
        raise LrpOnnxError(f"--batch-size must be a positive number of inputs per batch; got {args.batch_size}")
    if args.target is not None and args.target < 0:
        raise LrpOnnxError(f"--target must be a class index >= 0, got {args.target} (leave --target out to "
                           "explain each input's predicted class)")
    if args.target is not None and args.target >= 2 ** 63:
        raise LrpOnnxError(f"--target {args.target} is not a class index (too large)")
    for flag in ("ray_actors", "ray_cpus_per_actor"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise LrpOnnxError(f"--{flag.replace('_', '-')} must be >= 1; got {v}")


def _class_count(explainer) -> int | None:
    try:
        return explainer._class_count()
    except (AttributeError, TypeError, ValueError):
        return None


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _identity(model_bytes_sha: str, options: dict, pre, args) -> dict:
    from lrponnx import __version__

    pre_text = json.dumps(pre.to_dict(), sort_keys=True) if pre is not None else None
    return {
        "format": JOB_FORMAT,
        "lrponnx": __version__,
        "model_sha256": model_bytes_sha,
        "convert_options": json.loads(json.dumps(options, default=str)) if options else None,
        "preprocessing_sha256": _sha256_hex(pre_text.encode()) if pre_text else None,
        "target": args.target,
        "cmap": args.cmap,
        "save_raw": bool(args.save_raw),
        "batch_size": int(args.batch_size),
        "provider": args.provider or "default",
    }


def run_explain(args) -> int:
    from lrponnx.app.rule_options import rule_kwargs
    from lrponnx.compiler.load import read_model
    from lrponnx.app.inputs import list_inputs
    from lrponnx.app.runtime import Explainer, is_explainer, providers_for

    _check_flags(args)
    out_dir = Path(args.output)
    if os.path.lexists(out_dir) and not out_dir.is_dir():  # before any work
        raise LrpOnnxError(f"output {str(out_dir)!r} exists and is not a folder (explain writes a folder "
                           "of heatmaps; choose another -o)")
    model = read_model(args.model)
    model_sha = _sha256_hex(model.SerializeToString())
    options = {} if is_explainer(model) else rule_kwargs(args)
    with warnings.catch_warnings():  # said once below, as a note, not as a Python warning
        warnings.simplefilter("ignore", UserWarning)
        explainer = Explainer(model, providers=providers_for(args.provider), **options)
    for note in getattr(explainer, "notes", ()):
        print(f"lrponnx: note: {note}", file=sys.stderr)
    if len(explainer.input_names) != 1:
        raise LrpOnnxError(f"explain takes models with one input; this one has {len(explainer.input_names)} "
                           f"({', '.join(explainer.input_names)}): use the Python API (lrponnx.Explainer)")
    classes = _class_count(explainer)
    if args.target is not None and classes is not None and args.target >= classes:
        raise LrpOnnxError(f"--target {args.target} is out of range: the model has {classes} classes "
                           f"(0..{classes - 1})")
    pre = preprocessing_for(model, args)
    refs = list_inputs(args.inputs, pre)
    stems = _unique_stems(refs)
    job = ExplainJob(out_dir, refs, stems, _identity(model_sha, options, pre, args), bool(args.save_raw),
                     overwrite=bool(getattr(args, "overwrite", False)), echo=len(refs) <= 16,
                     has_display=pre is not None)
    job.check()
    engine = ChunkEngine(explainer, pre, target=args.target, cmap=args.cmap)
    ray_address = getattr(args, "ray", None)
    ray_started = False
    if ray_address:
        from lrponnx.app.scale import connect

        ray_started = connect(ray_address)  # before anything is written: no cluster is a usage error

    from lrponnx.app.termination import Terminated, on_sigterm as _on_sigterm

    previous = None
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # called outside `main`, which installs it
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)  # raises Terminated: files cleaned up
        except ValueError:  # not the main thread
            pass
    try:
        job.open()
        before = job.n_done
        if before:
            print(f"resuming: {before} of {len(refs)} input(s) already done in {out_dir}", file=sys.stderr)
        with tqdm(total=len(refs), initial=before, desc="explaining", unit="img", disable=len(refs) <= 4,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            def say(msg, kind=None):
                tqdm.write(msg, file=sys.stderr if kind == "error" else sys.stdout)

            if ray_address:
                from lrponnx.app.scale import run_chunks

                batches = run_chunks(job.pending_chunks(args.batch_size), explainer, pre, address=ray_address,
                                     target=args.target, cmap=args.cmap, actors=args.ray_actors,
                                     cpus_per_actor=args.ray_cpus_per_actor, save_raw=bool(args.save_raw),
                                     arrays_below=RAY_ARRAYS_BELOW)
            else:
                batches = map(engine.run, job.pending_chunks(args.batch_size))
            try:
                for results in batches:
                    try:
                        job.commit(results, say)
                    except (OSError, LrpOnnxError) as e:  # disk full, a folder made read-only meanwhile
                        why = (f"cannot write in {str(out_dir)!r}: {e.strerror or e}" if isinstance(e, OSError)
                               else str(e))
                        raise LrpOnnxError(f"{why}; {job.n_done} of {len(refs)} input(s) are done and kept: run "
                                           "the same command again to finish") from None
                    bar.update(len(results))
            finally:
                if hasattr(batches, "close"):  # Ray's generator: shut down what it started
                    batches.close()
    except OSError as e:  # the state folder cannot be made or read
        raise LrpOnnxError(f"cannot write in {str(out_dir)!r}: {e.strerror or e}") from None
    except BaseException as e:
        # by name too: under `python -m lrponnx.app.cli` the handler's class lives in __main__, not in lrponnx.app.cli
        if not (isinstance(e, (KeyboardInterrupt, Terminated)) or type(e).__name__ == "Terminated"):
            raise
        print(f"lrponnx: stopped with {job.n_done} of {len(refs)} input(s) done; run the same command "
              "again to finish", file=sys.stderr)
        raise
    finally:
        job.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if ray_started:
            import ray

            ray.shutdown()
    job.complete_rows(args.batch_size, engine.run)
    n_done, n_failed = job.finish(args.cmap)
    print(f"wrote {n_done} heatmap(s) to {out_dir}" +
          (f"; {n_failed} input(s) failed (listed in {out_dir / 'summary.json'})" if n_failed else ""))
    return EXIT_SOME_FAILED if n_failed else 0
