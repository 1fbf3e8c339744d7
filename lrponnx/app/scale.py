"""Explaining data sets on a Ray cluster: a Ray Dataset mapped through a pool of Explainer actors.

Two entry points (``pip install 'lrponnx[ray]'``; docs/scale.md says how to run them on a cluster):

- :func:`explain_dataset`: a Ray Dataset of images (an ``image`` column, as ``ray.data.read_images``
  gives), model tensors (``tensor``) or file paths (``path``) in, the same Dataset out with
  ``relevance``, ``prediction``, ``target``, ``relevance_sum`` and ``error`` columns added. Lazy, as
  Ray Datasets are: write it out with any Ray sink, or iterate it.
- :func:`run_chunks`: what ``lrponnx explain ... --ray ADDRESS`` runs. It explains the very chunks
  the single-process run would (one chunk is one batch, so the relevance has the same bits) and
  hands the results back to the driver, which writes the same files (names and bytes) as a run
  without Ray, resumably.

Each actor holds one ONNX Runtime session with ``cpus_per_actor`` intra-op threads and asks Ray for
that many CPUs, so the actors of a node share its cores without oversubscribing them.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lrponnx.errors import LrpOnnxError

__all__ = ["explain_dataset", "run_chunks", "connect"]


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LrpOnnxError("Ray is not installed: pip install 'lrponnx[ray]' (or pip install 'ray[data]')") from None
    return ray


def connect(address: str | None = "auto") -> bool:
    """Join the Ray cluster at ``address`` ('auto': the one running here; 'local': start one on this
    machine, loopback only, no dashboard). Does nothing when Ray is already initialised in this
    process. Returns True when this call started Ray (the caller then shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines would cut the progress bar
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would report usage over the network
    _reachable(address)
    try:
        if address in (None, "local"):
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", logging_level="ERROR")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        raise LrpOnnxError(f"Ray at {address!r}: no cluster found ({str(e).splitlines()[0] if str(e) else e}); "
                           "start one with `ray start --head`, call ray.init() first, or use --ray local") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return True


def _reachable(address: str | None, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that does not answer is refused at once: Ray itself would
    retry for minutes, deaf to Ctrl-C."""
    import socket

    if address in (None, "auto", "local"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise LrpOnnxError(f"Ray address {address!r}: give HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise LrpOnnxError(f"Ray at {address!r} does not answer ({e.strerror or e}); is the cluster running "
                           "(`ray start --head`)?") from None


@dataclass
class _Spec:
    """What every actor needs: the explainer (serialised ONNX) and the run's options."""

    model: bytes
    preprocessing: object
    target: int | None
    cmap: str
    threads: int
    render: bool = True


def _model_bytes(explainer) -> bytes:
    try:
        return explainer.model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GiB limit
        raise LrpOnnxError(f"the explainer is too large to ship to Ray actors in one piece ({e})") from None


def _engine(spec: _Spec):
    import onnx

    from lrponnx.app.explain_chunks import ChunkEngine
    from lrponnx.app.runtime import Explainer

    explainer = Explainer(onnx.load_from_string(spec.model), providers=["CPUExecutionProvider"],
                          threads=spec.threads)
    return ChunkEngine(explainer, spec.preprocessing, target=spec.target, cmap=spec.cmap, render=spec.render)


def _unbox(box):
    import ray

    value = box[0]
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class _ChunkActor:
    """One Explainer session; each call explains whole chunks (pickled lists of (position, InputRef))."""

    def __init__(self, spec_box, save_raw: bool = True, arrays_below: int | None = None):
        self.engine = _engine(_unbox(spec_box))
        self.save_raw = save_raw
        self.arrays_below = arrays_below

    def _slim(self, results: list) -> list:
        """Drop what the driver will not use (relevance without --save-raw, display images) past
        ``arrays_below``: the heatmap itself travels as PNG bytes."""
        if self.arrays_below is None:
            return results
        for r in results:
            if r.position >= self.arrays_below:
                r.display = None
                if not self.save_raw:
                    r.relevance = None
        return results

    def __call__(self, batch: dict) -> dict:
        results = [pickle.dumps(self._slim(self.engine.run(pickle.loads(p)))) for p in batch["payload"]]
        return {"chunk": np.asarray(batch["chunk"]), "results": np.array(results, dtype=object)}


def _actors(actors: int | None, cpus_per_actor: int, work: int) -> int:
    import ray

    if actors is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, cpus // max(1, cpus_per_actor))
    return max(1, min(int(actors), work))


def run_chunks(chunks: Iterable, explainer, preprocessing, *, address: str | None = "auto",
               target: int | None = None, cmap: str = "coldnhot", actors: int | None = None,
               cpus_per_actor: int = 1, save_raw: bool = True, arrays_below: int | None = None) -> Iterator[list]:
    """Explain ``chunks`` (lists of (position, InputRef)) on Ray; yield each chunk's list of
    :class:`~lrponnx.app.explain_chunks.ItemResult` as it comes back (in any order). Past position
    ``arrays_below`` the results carry no display image, and no relevance unless ``save_raw``.

    The actors read the inputs themselves: on a cluster the input paths must be readable on every
    node (a shared file system). The driver writes the outputs."""
    ray = _ray()
    cpus_per_actor = max(1, int(cpus_per_actor))
    todo = list(chunks)
    if not todo:  # nothing left to do: no cluster needed
        return
    started = connect(address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        spec = _Spec(_model_bytes(explainer), preprocessing, target, cmap, threads=cpus_per_actor)
        rows = [{"chunk": i, "payload": pickle.dumps(c)} for i, c in enumerate(todo)]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 10_000))
        del rows
        out = ds.map_batches(_ChunkActor, fn_constructor_args=([spec], save_raw, arrays_below), batch_size=1,
                             batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=_actors(actors, cpus_per_actor, len(todo))),
                             num_cpus=cpus_per_actor)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for payload in batch["results"]:
                yield pickle.loads(payload)
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------------
# a Ray Dataset in, a Ray Dataset with relevance out
# --------------------------------------------------------------------------------------------------
class _RowActor:
    """One Explainer session mapping batches of rows (``image``, ``tensor`` or ``path``) to relevance."""

    def __init__(self, spec_box):
        self.engine = _engine(_unbox(spec_box))

    def _load(self, batch: dict, i: int):
        from lrponnx.app.inputs import InputItem, InputRef, check_tensor, load_ref

        pre = self.engine.pre
        path = str(batch["path"][i]) if "path" in batch else f"row {i}"
        name = Path(path).name
        if "tensor" in batch:
            t = np.asarray(batch["tensor"][i])
            check_tensor(t, f"{path!r}")
            t = np.ascontiguousarray(t, dtype=np.float32)
            return InputItem(name, Path(path), t, pre.to_display(t) if pre is not None else None)
        if "image" in batch:
            if pre is None:
                raise LrpOnnxError("an 'image' column needs the model's preprocessing metadata "
                                   "(or give model tensors in a 'tensor' column)")
            img = np.asarray(batch["image"][i])
            if img.dtype != np.uint8:
                raise LrpOnnxError(f"{path!r}: image must be uint8 [H,W,3]; got {img.dtype}")
            display = pre.resize(img)
            return InputItem(name, Path(path), pre.apply(display, resize=False), display)
        return load_ref(InputRef(name=name, source=Path(path)), pre)

    def __call__(self, batch: dict) -> dict:
        from lrponnx.app.inputs import InputRef

        if not {"image", "tensor", "path"} & set(batch):
            raise LrpOnnxError(f"the dataset needs an 'image', 'tensor' or 'path' column; it has {sorted(batch)}")
        n = len(next(iter(batch.values())))
        loaded = []
        for i in range(n):
            try:
                loaded.append((i, self._load(batch, i), None))
            except LrpOnnxError as e:
                src = str(batch["path"][i]) if "path" in batch else f"row {i}"
                loaded.append((i, InputRef(name=Path(src).name, source=Path(src)), str(e)))
        results = self.engine.run_items(loaded)
        shapes = [r.relevance.shape for r in results if r.ok]
        fallback = shapes[0] if shapes else tuple(d or 0 for d in self.engine.sample_shape)
        rel = np.empty(n, dtype=object)
        for i, r in enumerate(results):
            rel[i] = r.relevance if r.ok else np.full(fallback, np.nan, np.float32)
        out = dict(batch)
        out["relevance"] = np.stack(list(rel)) if len({a.shape for a in rel}) == 1 else rel
        out["prediction"] = np.array([r.prediction if r.ok else -1 for r in results], np.int64)
        out["target"] = np.array([r.target if r.ok else -1 for r in results], np.int64)
        out["relevance_sum"] = np.array([r.relevance_sum if r.ok else np.nan for r in results], np.float64)
        out["error"] = np.array([r.error or "" for r in results], dtype=object)
        return out


def explain_dataset(ds, explainer, *, batch_size: int = 16, target: int | None = None,
                    actors: int | None = None, cpus_per_actor: int = 1, preprocessing="model",
                    **convert_options):
    """Map a Ray Dataset to relevance with a pool of Explainer actors; returns a (lazy) Dataset.

    ``ds`` rows hold one of: ``image`` (RGB uint8 [H,W,3], e.g. from ``ray.data.read_images``),
    resized and normalised with ``preprocessing``; ``tensor`` (the model input [C,H,W] as is); or
    ``path`` (an image or .npy file, read on the actor). Added columns: ``relevance`` (float32,
    the input's shape; NaN where ``error`` is set), ``prediction``, ``target`` (-1 where failed),
    ``relevance_sum``, ``error`` ("" or why the row could not be explained: unreadable, non-finite
    input or relevance).

    ``explainer``: an explainer (or a plain model, compiled once here with ``convert_options``) as a
    path, ModelProto or :class:`~lrponnx.app.runtime.Explainer`. ``preprocessing``: "model" (the
    explainer's metadata), None, or a :class:`~lrponnx.app.preprocess.Preprocessing`. ``actors``: the
    pool's size (default: the cluster's CPUs / ``cpus_per_actor``); each actor runs ONNX Runtime
    with ``cpus_per_actor`` threads. Ray must be initialised (``ray.init``) or reachable at 'auto'.

    Ray decides which rows share a batch, and a batch decides the relevance's last bits (float
    rounding, ~1e-9 relative); ``lrponnx explain --ray`` fixes the batches and so gives the
    single-process run's bytes.
    """
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.runtime import Explainer

    ray = _ray()
    if int(batch_size) < 1:
        raise LrpOnnxError(f"batch_size must be >= 1; got {batch_size}")
    connect("auto")
    ex = explainer if isinstance(explainer, Explainer) else Explainer(explainer, providers=["CPUExecutionProvider"],
                                                                       **convert_options)
    pre = Preprocessing.from_model(ex.model) if preprocessing == "model" else preprocessing
    spec = _Spec(_model_bytes(ex), pre, target, "coldnhot", threads=max(1, int(cpus_per_actor)), render=False)
    box = [ray.put(spec)]
    return ds.map_batches(_RowActor, fn_constructor_args=(box,), batch_size=int(batch_size), batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=_actors(actors, cpus_per_actor, 1 << 30)),
                          num_cpus=max(1, int(cpus_per_actor)))
