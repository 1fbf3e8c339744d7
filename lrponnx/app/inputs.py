"""Finding and reading the inputs of ``lrponnx explain``/``evaluate``: image files, folders of images
and ``.npy`` arrays (a sample [C,H,W] or a batch [N,C,H,W]), listed first without reading a pixel
(:func:`list_inputs`), then read one at a time (:func:`load_ref`) through a
:class:`~lrponnx.app.preprocess.Preprocessing`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lrponnx.app.preprocess import IMAGE_EXTENSIONS, METADATA_KEY, InputError, Preprocessing, PreprocessingError

__all__ = ["InputItem", "InputRef", "MAX_ABS_INPUT", "expand_inputs", "list_inputs", "check_tensor", "load_ref",
           "iter_inputs", "load_inputs"]


@dataclass(frozen=True, eq=False)
class InputItem:
    """One model input: ``tensor`` float32 [C,H,W]; ``display`` RGB uint8 [H,W,3] (None for a .npy input
    without preprocessing); ``index`` is the position inside a batched .npy file, else None."""

    name: str
    source: Path
    tensor: np.ndarray
    display: np.ndarray | None
    index: int | None = None


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def expand_inputs(paths) -> list[Path]:
    """Files stay as given (in order); a folder becomes its image files (not recursive, sorted by name,
    hidden files skipped). A missing path or a folder without images is an InputError."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted((c for c in p.iterdir() if _is_image_file(c)), key=lambda c: c.name)
            if not found:
                raise InputError(
                    f"folder {str(p)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise InputError(f"input {str(p)!r} is neither a file nor a folder")
        else:
            raise InputError(f"input {str(p)!r} does not exist")
    if not out:
        raise InputError("no inputs given")
    return out


#: Model tensors read from .npy files must hold finite values no larger than this in magnitude:
#: beyond it float32 products overflow and every heatmap becomes NaN.
MAX_ABS_INPUT = 1e30


@dataclass(frozen=True, eq=False)
class InputRef:
    """One input, not yet read: an image file, a .npy file, or sample ``index`` of a batched .npy.

    ``error`` is set when the file could not even be listed (an unreadable .npy, or one of the wrong
    shape); :func:`load_ref` then raises it, so the input fails on its own without stopping the others.
    """

    name: str
    source: Path
    index: int | None = None
    error: str | None = None


def _open_npy(p: Path):
    """The array of a .npy file, memory-mapped (nothing is read but the header), or InputError."""
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read array {str(p)!r}: {e}") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{str(p)!r} must hold a numeric array [C,H,W] or [N,C,H,W]")
    return arr


def _npy_refs(p: Path, pre: Preprocessing | None) -> list[InputRef]:
    try:
        arr = _open_npy(p)
        shape = arr.shape
        del arr
        if len(shape) not in (3, 4):
            raise InputError(f"{str(p)!r} holds shape {shape}; expected [C,H,W] or [N,C,H,W]")
        sample = shape[1:] if len(shape) == 4 else shape
        if pre is not None and (sample[0] != pre.channels or (pre.size is not None and tuple(sample[1:]) != pre.size)):
            c = pre.channels
            want = f"[{c},{pre.size[0]},{pre.size[1]}]" if pre.size else f"[{c},H,W]"
            raise InputError(f"{str(p)!r} holds samples of shape {list(sample)}; the model expects {want}")
    except InputError as e:
        return [InputRef(name=p.stem, source=p, error=str(e))]
    if len(shape) == 3:
        return [InputRef(name=p.stem, source=p)]
    return [InputRef(name=f"{p.stem}[{i}]", source=p, index=i) for i in range(shape[0])]


def list_inputs(paths, preprocessing: Preprocessing | None = None) -> list[InputRef]:
    """Every input, in order, without reading any pixel: folders expanded (:func:`expand_inputs`),
    batched .npy files split into one :class:`InputRef` per sample (only their header is read).

    A missing path or an empty folder raises InputError; an image file with no ``preprocessing``
    raises PreprocessingError (nothing could be done). A .npy file that cannot be read, or holds the
    wrong shape, becomes one ref with ``error`` set: only that input fails.
    """
    refs: list[InputRef] = []
    for p in expand_inputs(paths):
        if p.suffix.lower() == ".npy":
            refs.extend(_npy_refs(p, preprocessing))
            continue
        if preprocessing is None:
            raise PreprocessingError(
                f"cannot turn image {str(p)!r} into a tensor: the model has no {METADATA_KEY!r} metadata; "
                "give the preprocessing explicitly (channel order, pixel scale, mean, std, size)"
            )
        refs.append(InputRef(name=p.name, source=p))
    return refs


def check_tensor(t: np.ndarray, what: str) -> np.ndarray:
    """Raise InputError unless every value of ``t`` is finite and within +-:data:`MAX_ABS_INPUT`."""
    finite = np.isfinite(t)
    if not finite.all():
        bad = int(t.size - np.count_nonzero(finite))
        raise InputError(f"{what} holds {bad} non-finite value(s) (NaN or Inf): relevance is undefined there")
    peak = float(np.max(np.abs(t.astype(np.float64)))) if t.size else 0.0
    if peak > MAX_ABS_INPUT:
        raise InputError(f"{what} holds values up to {peak:.3g}, beyond +-{MAX_ABS_INPUT:g}: "
                         "not a model input (float32 overflows)")
    return t


def load_ref(ref: InputRef, preprocessing: Preprocessing | None = None) -> InputItem:
    """Read one input into an :class:`InputItem`; InputError (or ImageReadError) for a bad one.

    A .npy sample must be finite and within +-:data:`MAX_ABS_INPUT` (:func:`check_tensor`).
    """
    if ref.error is not None:
        raise InputError(ref.error)
    p = ref.source
    if p.suffix.lower() == ".npy":
        arr = _open_npy(p)
        what = f"{str(p)!r}" + (f" sample {ref.index}" if ref.index is not None else "")
        try:
            src = np.array(arr[ref.index] if ref.index is not None else arr)  # read: the mapping is let go
        except (OSError, ValueError, IndexError) as e:
            raise InputError(f"cannot read array {str(p)!r}: {e}") from None
        finally:
            del arr
        check_tensor(src, what)  # in the file's own dtype: a float64 1e300 is too large, not NaN
        t = np.ascontiguousarray(src, dtype=np.float32)
        disp = preprocessing.to_display(t) if preprocessing is not None else None
        return InputItem(name=ref.name, source=p, tensor=t, display=disp, index=ref.index)
    if preprocessing is None:
        raise PreprocessingError(
            f"cannot turn image {str(p)!r} into a tensor: the model has no {METADATA_KEY!r} metadata; "
            "give the preprocessing explicitly (channel order, pixel scale, mean, std, size)"
        )
    tensor, display = preprocessing.load_image(p)
    return InputItem(name=ref.name, source=p, tensor=tensor, display=display)


def iter_inputs(paths, preprocessing: Preprocessing | None = None) -> Iterator[InputItem]:
    """Yield one :class:`InputItem` per input, expanding folders (:func:`expand_inputs`), reading
    one input at a time (:func:`list_inputs`, then :func:`load_ref`).

    ``.npy`` files are model tensors already ([C,H,W] or a batch [N,C,H,W]; one item per sample);
    ``display`` is then ``preprocessing.to_display`` of it, or None without preprocessing.
    Any other file is read as an image, which needs ``preprocessing`` (PreprocessingError otherwise).
    The first bad input raises; ``lrponnx explain`` instead skips it (see :func:`load_ref`).
    """
    for ref in list_inputs(paths, preprocessing):
        yield load_ref(ref, preprocessing)


def load_inputs(paths: Iterable | str | Path, preprocessing: Preprocessing | None = None) -> list[InputItem]:
    """``list(iter_inputs(...))``."""
    return list(iter_inputs(paths, preprocessing))
