"""The model zoo: named recipes that produce ONNX models for lrponnx.

    >>> from lrponnx.model_zoo import registry
    >>> [e.name for e in registry.list_models()]
    ['cifar10-lrn', 'cifar10-full-caffe', 'bvlc-alexnet', 'bvlc-caffenet', 'bvlc-googlenet', 'vit-cifar10']
    >>> registry.build("cifar10-lrn", "out")          # copies the bundled, checksum-verified file
    PosixPath('out/cifar10-lrn.onnx')

``cifar10-lrn`` and ``vit-cifar10`` are bundled (``model_zoo/cifar10_lrn.onnx``, ``model_zoo/vit_cifar10.onnx``,
a small ViT for the ``attnlrp`` composite); the other recipes need the shared
data folder (``../shared/data``, or ``$LRPONNX_SHARED_DATA``) and the Caffe converter.
"""
from __future__ import annotations

import importlib
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lrponnx.errors import LrpOnnxError

from lrponnx.model_zoo._shared import sha256_of

HERE = Path(__file__).resolve().parent
CARDS = HERE / "cards"
CHECKSUMS = HERE / "checksums.json"
BUNDLED = "cifar10_lrn.onnx"
VIT_BUNDLED = "vit_cifar10.onnx"  # issue 14: a small ViT, explained with the attnlrp composite


class UnknownModelError(LrpOnnxError):
    """No zoo entry has that name."""


class ChecksumError(LrpOnnxError):
    """A bundled model file does not match its recorded sha256."""


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    trained: bool                # real trained weights (False: deterministic random weights)
    bundled: bool                # the ONNX file ships inside the package
    needs_shared_data: bool      # build() reads ../shared/data
    needs_converter: bool        # build() calls lrponnx.converters.caffe.convert
    builder: Callable[..., Path]

    @property
    def card_path(self) -> Path:
        return CARDS / f"{self.name}.md"

    def card(self) -> str:
        return self.card_path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- builders

def default_model_path() -> Path:
    """The bundled, trained ``cifar10-lrn`` ONNX file inside the package."""
    return HERE / BUNDLED


def expected_sha256(filename: str = BUNDLED) -> str:
    return json.loads(CHECKSUMS.read_text())[filename]


def verify_bundled(path: Path | None = None) -> Path:
    """Check the bundled file against ``checksums.json``; return its path or raise :class:`ChecksumError`."""
    path = path or default_model_path()
    if not path.is_file():
        raise ChecksumError(f"the bundled model {path} is missing from the package")
    got, want = sha256_of(path), expected_sha256(path.name)
    if got != want:
        raise ChecksumError(f"{path} has sha256 {got}, but checksums.json records {want}")
    return path


def bundled_path(name: str) -> Path:
    """The checksum-verified bundled ONNX file of zoo model ``name``."""
    paths = {"cifar10-lrn": default_model_path(), "vit-cifar10": HERE / VIT_BUNDLED}
    if name not in paths:
        raise UnknownModelError(f"{name!r} is not bundled; bundled: {', '.join(paths)}")
    return verify_bundled(paths[name])


def _build_trained(name: str, recipe: str) -> Callable[..., Path]:
    """The builder of a bundled, trained entry: copy the checksum-verified file, or with ``retrain=True``
    run the recipe module ``lrponnx.model_zoo.<recipe>`` (its ``TrainConfig`` and ``train``) with
    ``seed``/``epochs`` (defaults: the recipe's) and write ``<name>.train.json`` beside the model."""
    def build(out_dir: Path, *, retrain: bool = False, seed: int | None = None, epochs: int | None = None,
              log=print) -> Path:
        out = Path(out_dir) / f"{name}.onnx"
        if not retrain:
            if seed is not None or epochs is not None:
                raise LrpOnnxError("seed/epochs only apply with retrain=True (--retrain)")
            src = bundled_path(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.resolve() != out.resolve():
                shutil.copyfile(src, out)
            return out
        module = importlib.import_module(f"lrponnx.model_zoo.{recipe}")
        defaults = module.TrainConfig()
        cfg = module.TrainConfig(seed=defaults.seed if seed is None else seed,
                                 epochs=defaults.epochs if epochs is None else epochs)
        _, report = module.train(config=cfg, out=out, log=log)
        (Path(out_dir) / f"{name}.train.json").write_text(json.dumps(report, indent=1))
        return out

    return build


def _build_bvlc(name: str) -> Callable[..., Path]:
    def build(out_dir: Path, *, seed: int | None = None, log=print) -> Path:
        from lrponnx.model_zoo.caffe_recipes import DEFAULT_SEED, build_bvlc

        return build_bvlc(name, out_dir, seed=DEFAULT_SEED if seed is None else seed)

    return build


def _build_cifar10_full_caffe(out_dir: Path, *, log=print) -> Path:
    from lrponnx.model_zoo.caffe_recipes import build_cifar10_full_caffe

    return build_cifar10_full_caffe(out_dir)


_ENTRIES = [
    Entry("cifar10-lrn", "CIFAR-10 CNN, LRN across + within channel, trained by our recipe (bundled)",
          trained=True, bundled=True, needs_shared_data=False, needs_converter=False, builder=_build_trained("cifar10-lrn", "cifar10_lrn")),
    Entry("cifar10-full-caffe", "Caffe's trained cifar10_full (WITHIN_CHANNEL LRN), converted",
          trained=True, bundled=False, needs_shared_data=True, needs_converter=True,
          builder=_build_cifar10_full_caffe),
    Entry("bvlc-alexnet", "BVLC AlexNet architecture (ACROSS_CHANNELS LRN), UNTRAINED random weights",
          trained=False, bundled=False, needs_shared_data=True, needs_converter=True,
          builder=_build_bvlc("bvlc-alexnet")),
    Entry("bvlc-caffenet", "BVLC reference CaffeNet architecture (ACROSS_CHANNELS LRN), UNTRAINED random weights",
          trained=False, bundled=False, needs_shared_data=True, needs_converter=True,
          builder=_build_bvlc("bvlc-caffenet")),
    Entry("bvlc-googlenet", "BVLC GoogLeNet architecture (ACROSS_CHANNELS LRN), UNTRAINED random weights",
          trained=False, bundled=False, needs_shared_data=True, needs_converter=True,
          builder=_build_bvlc("bvlc-googlenet")),
    Entry("vit-cifar10", "CIFAR-10 Vision Transformer (3 blocks, 4x4 patches), trained by our recipe (bundled; attnlrp)",
          trained=True, bundled=True, needs_shared_data=False, needs_converter=False, builder=_build_trained("vit-cifar10", "vit_cifar10")),
]


def list_models() -> list[Entry]:
    return list(_ENTRIES)


def get(name: str) -> Entry:
    for e in _ENTRIES:
        if e.name == name:
            return e
    raise UnknownModelError(f"no zoo model named {name!r}; known: {', '.join(e.name for e in _ENTRIES)}")


def build_options(entry: Entry) -> set[str]:
    """The options ``build`` takes for ``entry``: its builder's keyword-only parameters (``log`` aside)."""
    params = inspect.signature(entry.builder).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "log"}


def build(name: str, out_dir: str | Path = ".", **options) -> Path:
    """Build zoo model ``name`` into ``out_dir``; return the ONNX path (``<out_dir>/<name>.onnx``).

    Options: ``cifar10-lrn`` and ``vit-cifar10`` take ``retrain=True`` with ``seed``/``epochs``; ``bvlc-*`` take ``seed``
    (of the random weights). Recipes needing ../shared/data raise ``SharedDataMissingError`` without it.
    """
    return get(name).builder(Path(out_dir), **options)
