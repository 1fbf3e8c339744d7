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
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lrponnx.errors import LrpOnnxError

#: Exit code of a run that finished with some inputs failed (they are listed in summary.json).
EXIT_SOME_FAILED = 3
#: The job's state folder inside the output folder: job identity, journal, overview rows.
STATE_DIR = ".lrponnx-explain"
#: Rows of overview.png (the first inputs explained, in input order).
OVERVIEW_ROWS = 32
JOB_FORMAT = 1
#: On Ray, actors send relevance and display images back only for inputs before this position (and
#: relevance for all with --save-raw): the overview needs 32 rows, heatmaps travel as PNG. A row
#: still missing at the end (many early failures) is recomputed locally (ExplainJob.complete_rows).
RAY_ARRAYS_BELOW = 2 * OVERVIEW_ROWS
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _providers(name: str | None):
    if name is None:
        return None
    if name == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LrpOnnxError("--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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


def output_names(stem: str, save_raw: bool) -> list[str]:
    """The files one explained input gets in the output folder."""
    return [f"{stem}_heatmap.png"] + ([f"{stem}_relevance.npy"] if save_raw else [])


# --------------------------------------------------------------------------------------------------
# explaining one batch ("chunk") of inputs: shared by the single-process run and Ray's actors
# --------------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """What explaining one input gave: either the heatmap (PNG bytes) and relevance, or an error."""

    position: int
    name: str
    source: str
    index: int | None
    error: str | None = None
    prediction: int | None = None
    target: int | None = None
    label: str | None = None
    prediction_label: str | None = None
    relevance_sum: float | None = None
    png: bytes | None = None
    relevance: np.ndarray | None = None
    display: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _ort_errors() -> tuple[type[BaseException], ...]:
    try:
        import onnxruntime.capi.onnxruntime_pybind11_state as C
    except ImportError:  # pragma: no cover
        return ()
    names = ("Fail", "InvalidArgument", "RuntimeException", "EPFail", "EngineError", "NotImplemented")
    return tuple(getattr(C, n) for n in names if isinstance(getattr(C, n, None), type))


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ChunkEngine:
    """Reads, explains and renders one chunk of inputs with one :class:`~lrponnx.app.runtime.Explainer`.

    A chunk is explained as one batch (inputs of another shape in their own batch): the batch
    decides the last bits of the relevance, so a resumed or distributed run that explains the same
    chunks gets the same bytes.
    """

    def __init__(self, explainer, preprocessing, *, target: int | None, cmap: str, render: bool = True):
        self.explainer = explainer
        self.render = render
        self.pre = preprocessing
        self.target = target
        self.cmap = cmap
        self.classes = explainer.classes
        shape = explainer.session.get_inputs()
        shape = next(i.shape for i in shape if i.name == explainer.input_names[0])
        self.sample_shape = [d if isinstance(d, int) else None for d in shape[1:]]

    def _check_shape(self, t: np.ndarray, what: str) -> None:
        want = self.sample_shape
        if t.ndim != len(want) or any(w is not None and w != n for w, n in zip(want, t.shape)):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
            from lrponnx.app.preprocess import InputError

            raise InputError(f"{what} has shape {list(t.shape)}; the model expects {shown}")

    def run(self, entries) -> list[ItemResult]:
        """``entries``: (position, :class:`~lrponnx.app.preprocess.InputRef`) pairs. Reads each input."""
        from lrponnx.app.preprocess import InputError, load_ref

        loaded = []
        for pos, ref in entries:
            try:
                item = load_ref(ref, self.pre)
                loaded.append((pos, item, None))
            except InputError as e:
                loaded.append((pos, ref, str(e)))
        return self.run_items(loaded)

    def run_items(self, loaded) -> list[ItemResult]:
        """``loaded``: (position, InputItem or InputRef, error or None) triples, in chunk order."""
        out: dict[int, ItemResult] = {}
        groups: dict[tuple, list] = {}
        for pos, item, error in loaded:
            base = ItemResult(position=pos, name=item.name, source=str(item.source), index=item.index)
            if error is None:
                try:
                    self._check_shape(item.tensor, repr(str(item.source)) + (
                        f" sample {item.index}" if item.index is not None else ""))
                except LrpOnnxError as e:
                    error = str(e)
            if error is not None:
                base.error = error
                out[pos] = base
                continue
            groups.setdefault(item.tensor.shape, []).append((base, item))
        for group in groups.values():
            self._explain(group)
            for base, _ in group:
                out[base.position] = base
        return [out[pos] for pos, _, _ in loaded]

    def _explain(self, group) -> None:
        from lrponnx.app.render import render

        x = np.stack([item.tensor for _, item in group])
        try:
            with warnings.catch_warnings():  # non-finite relevance is reported per input below
                warnings.simplefilter("ignore", RuntimeWarning)
                res = self.explainer.explain(x, target=self.target)
        except (LrpOnnxError, *_ort_errors()) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for base, _ in group:
                base.error = f"{base.source!r}: explaining failed: {msg}"
            return
        logits = res.outputs[getattr(self.explainer, "scores_output", self.explainer.model_outputs[0])].reshape(
            len(group), -1)
        for k, (base, item) in enumerate(group):
            rel = np.array(res.relevance[k])  # its own copy: the batch is let go
            if not (np.isfinite(rel).all() and np.isfinite(logits[k]).all()):
                base.error = (f"{base.source!r}" + (f" sample {base.index}" if base.index is not None else "")
                              + ": the explanation is not finite (NaN or Inf in the relevance or logits); "
                              "the input is probably far outside the model's range")
                continue
            t = int(res.target[k])
            base.prediction = int(np.argmax(logits[k]))
            base.target = t
            classes = self.classes
            name = lambda c: classes[c] if classes and 0 <= c < len(classes) else str(c)  # noqa: E731
            base.label, base.prediction_label = name(t), name(base.prediction)
            base.relevance_sum = float(rel.sum())
            base.png = png_bytes(render(rel, self.cmap)) if self.render else None
            base.relevance = rel
            base.display = item.display


# --------------------------------------------------------------------------------------------------
# the job: output folder, journal, summary, overview
# --------------------------------------------------------------------------------------------------
def _write_file(path: Path, write) -> None:
    """Write through a temporary file beside ``path`` (fsynced), then rename it over ``path``."""
    from lrponnx.files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def _fsync_path(path) -> None:
    """fsync a file or folder by name (Linux allows it on a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _item_key(ref) -> list:
    """What identifies an input's content for the journal: its absolute path, sample index, size and
    modification time (nanoseconds)."""
    p = os.path.abspath(ref.source)
    try:
        st = os.stat(p)
        return [p, ref.index, st.st_size, st.st_mtime_ns]
    except OSError:
        return [p, ref.index, None, None]


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Row:
    position: int
    label: str
    display: np.ndarray
    relevance: np.ndarray


@dataclass
class ExplainJob:
    """One ``explain`` job in one output folder (see the module docstring and docs/scale.md)."""

    out_dir: Path
    refs: list
    stems: list[str]
    identity: dict
    save_raw: bool
    overwrite: bool = False
    echo: bool = False
    has_display: bool = True  # inputs come with a display image (the model has preprocessing)
    keys: list = field(default_factory=list)
    records: dict = field(default_factory=dict)
    done: bytearray = field(default_factory=bytearray)
    rows: dict = field(default_factory=dict)
    failed_now: int = 0
    _pool: object = None

    @property
    def state(self) -> Path:
        return self.out_dir / STATE_DIR

    # -- opening: every refusal comes before anything is written ------------------------------------
    def check(self) -> None:
        """Refuse (LrpOnnxError) what cannot or must not be done; writes nothing."""
        out = self.out_dir
        if os.path.lexists(out) and not out.is_dir():
            raise LrpOnnxError(f"output {str(out)!r} exists and is not a folder (explain writes a folder "
                               "of heatmaps; choose another -o)")
        parent = next((p for p in [out, *out.parents] if os.path.lexists(p)), None)
        if parent is not None and not parent.is_dir():
            raise LrpOnnxError(f"cannot create folder {str(out)!r}: {str(parent)!r} is a file")
        # an input inside the output folder must never be one of our outputs
        if out.is_dir():
            real = out.resolve()
            inside = {Path(r.source).resolve().name for r in self.refs if Path(r.source).resolve().parent == real}
            if inside:
                ours = {"summary.json", "overview.png"}
                for s in self.stems:
                    ours.update(output_names(s, self.save_raw))
                clash = sorted(inside & ours)
                if clash:
                    raise LrpOnnxError(f"output {str(out / clash[0])!r} would replace an input file; "
                                       "choose another output folder")
        if self.overwrite or not out.is_dir():
            return
        if self.state.is_dir():
            old = self._read_identity()
            if old != self.identity:
                diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
                shown = ", ".join(diff[:4]) or "its state is unreadable"
                raise LrpOnnxError(f"{str(out)!r} holds another explain job's results (differs in: {shown}); "
                                   "run the same command to resume it, pass --overwrite to start over, or "
                                   "choose another output folder")
            return
        names = ["summary.json", "overview.png"] + [n for s in self.stems for n in output_names(s, self.save_raw)]
        existing = [n for n in names if os.path.lexists(out / n)]
        if existing:
            raise LrpOnnxError(f"{str(out)!r} already holds {existing[0]!r}" +
                               (f" and {len(existing) - 1} more output(s)" if len(existing) > 1 else "") +
                               " not made by this job (no journal); pass --overwrite to replace them, or "
                               "choose another output folder")

    def _read_identity(self) -> dict:
        try:
            data = json.loads((self.state / "job.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def open(self) -> None:
        """Create the folders, clear stale temporary files, read the journal. Call after :meth:`check`."""
        out = self.out_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LrpOnnxError(f"cannot create folder {str(out)!r}: {e.strerror or e}") from None
        if self.overwrite and self.state.exists():
            shutil.rmtree(self.state)
        (self.state / "rows").mkdir(parents=True, exist_ok=True)
        if self._read_identity() != self.identity:
            _write_file(self.state / "job.json",
                        lambda f: f.write((json.dumps(self.identity, indent=1, sort_keys=True) + "\n").encode()))
            for p in (self.state / "journal.jsonl", *(self.state / "rows").iterdir()):
                if p.exists():
                    p.unlink()
        self._clear_temporaries()
        self.keys = [_item_key(r) for r in self.refs]
        self.done = bytearray(len(self.refs))
        entries = self._read_journal()
        for i, key in enumerate(self.keys):
            e = entries.get((tuple(key), self.stems[i]))
            if e is None or not e.get("ok"):
                continue
            if all(os.path.exists(out / n) for n in output_names(self.stems[i], self.save_raw)):
                self.done[i] = 1
                self.records[i] = e["record"]
        self._read_rows()

    def _clear_temporaries(self) -> None:
        """Temporary files a killed run left (``.NAME.XXXXXXXX.tmp`` beside our outputs)."""
        for folder, ours in ((self.out_dir, self._is_our_output), (self.state, lambda n: True),
                             (self.state / "rows", lambda n: True)):
            for entry in os.scandir(folder):
                m = _TMP.match(entry.name)
                if m and entry.is_file(follow_symlinks=False) and ours(m["name"]):
                    os.unlink(entry.path)

    @staticmethod
    def _is_our_output(name: str) -> bool:
        return name in ("summary.json", "overview.png") or name.endswith(("_heatmap.png", "_relevance.npy"))

    def _read_journal(self) -> dict:
        """(key, stem) -> last entry. A line cut short by a kill is dropped (and cut from the file)."""
        path = self.state / "journal.jsonl"
        entries: dict = {}
        if not path.exists():
            return entries
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            try:
                obj = json.loads(line)
                for e in obj["items"]:
                    entries[(tuple(e["key"]), e["stem"])] = e
            except (ValueError, KeyError, TypeError):
                continue
        return entries

    def _read_rows(self) -> None:
        """The overview rows a previous run kept, matched to the inputs by key and output stem (so a
        changed input list keeps them), for inputs that are still done."""
        folder = self.state / "rows"
        position = {}
        for i, key in enumerate(self.keys):
            position.setdefault(json.dumps([key, self.stems[i]]), i)
        moved = []
        for p in sorted(folder.glob("*.npz")):
            pos = None
            try:
                with np.load(p, allow_pickle=False) as z:
                    pos = position.get(str(z["key"]))
                    if pos is not None and self.done[pos] and pos not in self.rows:
                        self.rows[pos] = _Row(pos, str(z["label"]), z["display"], z["relevance"])
                        if p.name != f"{pos}.npz":
                            moved.append(pos)
            except (ValueError, OSError, KeyError, zipfile.BadZipFile):
                pass
            if pos is None or p.name != f"{pos}.npz" or pos not in self.rows:
                p.unlink()
        for pos in moved:  # the input list changed: the row's file follows its input's position
            self._save_row(self.rows[pos], json.dumps([self.keys[pos], self.stems[pos]]))
        self._prune_rows()

    def _prune_rows(self) -> None:
        while len(self.rows) > OVERVIEW_ROWS:
            last = max(self.rows)
            del self.rows[last]
            try:
                (self.state / "rows" / f"{last}.npz").unlink()
            except FileNotFoundError:
                pass

    # -- running -----------------------------------------------------------------------------------
    @property
    def n_done(self) -> int:
        return sum(self.done)

    def pending_chunks(self, batch: int):
        """The inputs still to do, in chunks of the fixed positions [k*batch, (k+1)*batch)."""
        n = len(self.refs)
        for start in range(0, n, batch):
            chunk = [(p, self.refs[p]) for p in range(start, min(start + batch, n)) if not self.done[p]]
            if chunk:
                yield chunk

    def commit(self, results: list[ItemResult], say=print) -> None:
        """Write one chunk's files, then its journal line: after a kill the chunk is either done as a
        whole or redone as a whole.

        Each file goes to a temporary file beside it (:func:`lrponnx.files.atomic_path`); the chunk's
        temporary files are fsynced together (one journal commit of the file system rather than one
        per file), renamed, the folder fsynced, and only then the journal line written and fsynced.
        """
        from lrponnx.files import atomic_path

        lines, temps = [], []
        with contextlib.ExitStack() as stack:
            def put(path: Path, write) -> None:
                tmp = stack.enter_context(atomic_path(path))
                with open(tmp, "wb") as f:
                    write(f)
                temps.append(tmp)

            for r in results:
                p, stem = r.position, self.stems[r.position]
                record = {"input": r.source}
                if r.index is not None:
                    record["index"] = r.index
                if r.ok:
                    heat, *raw = output_names(stem, self.save_raw)
                    put(self.out_dir / heat, lambda f: f.write(r.png))
                    if raw:
                        put(self.out_dir / raw[0], lambda f: np.save(f, r.relevance, allow_pickle=False))
                        record["relevance"] = raw[0]
                    record.update(heatmap=heat, prediction=r.prediction, target=r.target,
                                  relevance_sum=r.relevance_sum)
                    if self.echo:
                        say(f"{r.name}: predicted {r.prediction_label}, explained {r.label}")
                else:
                    record["error"] = r.error
                    say(f"lrponnx: warning: skipped {r.name}: {r.error}", "error")
                lines.append({"key": self.keys[p], "stem": stem, "ok": r.ok, "record": record})
            self._fsync_all(temps)
        # renamed (the stack's exits): make the names durable, then say the chunk is done
        if temps:
            _fsync_path(self.out_dir)
        for r in results:
            if r.ok:
                self._offer_row(r)
        data = (json.dumps({"items": lines}, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.state / "journal.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        for r, line in zip(results, lines):
            self.records[r.position] = line["record"]
            self.done[r.position] = 1 if r.ok else 0
            self.failed_now += 0 if r.ok else 1

    def _fsync_all(self, paths) -> None:
        if len(paths) <= 1:
            for p in paths:
                _fsync_path(p)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lrponnx-fsync")
        list(self._pool.map(_fsync_path, paths))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _offer_row(self, r: ItemResult) -> None:
        if r.display is None:
            return
        if len(self.rows) >= OVERVIEW_ROWS and r.position > max(self.rows):
            return
        row = _Row(r.position, f"{r.name}: {r.label}", r.display, r.relevance)
        self._save_row(row, json.dumps([self.keys[r.position], self.stems[r.position]]))
        self.rows[r.position] = row
        self._prune_rows()

    def _save_row(self, row: _Row, key: str) -> None:
        def write(f):
            np.savez_compressed(f, key=np.array(key), label=np.array(row.label), display=row.display,
                                relevance=row.relevance)

        _write_file(self.state / "rows" / f"{row.position}.npz", write)

    def complete_rows(self, batch: int, recompute) -> None:
        """Rows the overview needs but does not have (Ray sends arrays back only for the first
        inputs; or the state's rows/ was deleted): explain their batches again with
        ``recompute(entries) -> [ItemResult]``, the same batches as before, so the same bytes."""
        if not self.has_display:
            return
        needed = [p for p in range(len(self.refs)) if self.done[p]][:OVERVIEW_ROWS]
        missing = [p for p in needed if p not in self.rows]
        for start in sorted({p // batch * batch for p in missing}):
            entries = [(q, self.refs[q]) for q in range(start, min(start + batch, len(self.refs)))]
            for r in recompute(entries):
                if r.position in missing and r.ok and r.display is not None:
                    self._offer_row(r)

    def finish(self, cmap: str) -> tuple[int, int]:
        """Write summary.json and overview.png from the journal's records; (done, failed)."""
        from lrponnx.app.render import overview

        done, failed = [], []
        for p in sorted(self.records):
            (failed if "error" in self.records[p] else done).append(self.records[p])
        summary = {"inputs": len(self.refs), "done": done, "failed": failed}
        text = json.dumps(summary, indent=1) + "\n"
        if self.rows:
            rows = [self.rows[p] for p in sorted(self.rows)]
            scale = max(1, 96 // max(rows[0].display.shape[:2]))
            image = overview([(r.label, r.display, r.relevance) for r in rows], cmap=cmap, scale=scale)
            data = png_bytes(image)
            _write_file(self.out_dir / "overview.png", lambda f: f.write(data))
        _write_file(self.out_dir / "summary.json", lambda f: f.write(text.encode()))
        return len(done), len(failed)


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
    from lrponnx.app.preprocess import list_inputs
    from lrponnx.app.runtime import Explainer, is_explainer

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
        explainer = Explainer(model, providers=_providers(args.provider), **options)
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
