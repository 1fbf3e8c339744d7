"""The resumable ``lrponnx explain`` job in one output folder: refusals before any write, the
journal in ``OUT/.lrponnx-explain/`` (one fsynced line per chunk), atomic outputs, the summary and
the overview (docs/scale.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrponnx.app.explain_chunks import ItemResult, png_bytes
from lrponnx.errors import LrpOnnxError

#: The job's state folder inside the output folder: job identity, journal, overview rows.
STATE_DIR = ".lrponnx-explain"
#: Rows of overview.png (the first inputs explained, in input order).
OVERVIEW_ROWS = 32
#: The format of the job identity (job.json); another format is another job.
JOB_FORMAT = 1
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def output_names(stem: str, save_raw: bool) -> list[str]:
    """The files one explained input gets in the output folder."""
    return [f"{stem}_heatmap.png"] + ([f"{stem}_relevance.npy"] if save_raw else [])


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
