"""A Caffe net as the converter sees it: its layers for the TEST phase, the layer categories the
driver handles itself (inputs, data, train-only), and the errors and warnings that speak Caffe."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

from lrponnx.errors import InvalidModelError, LrpOnnxError, Offender, UnsupportedModelError, shorten

from lrponnx.converters.caffe import proto as cpb


class CaffeConversionWarning(UserWarning):
    """Something was skipped or guessed during a Caffe conversion (the model is still produced)."""


class CaffeLayerError(UnsupportedModelError):
    """Layers the converter cannot convert, all of them, in Caffe's words and on one line:
    ``2 Caffe layer(s) cannot be converted: layer 'pool1' (Pooling): ...; layer 'x' (Foo): ...``.
    ``offenders`` keeps them as :class:`~lrponnx.errors.Offender` (layer name, type, why)."""

    def __init__(self, offenders: list[Offender]):
        self.offenders = list(offenders)
        parts = [f"layer {shorten(o.node)!r} ({shorten(o.op_type)}): {o.why}" for o in self.offenders]
        LrpOnnxError.__init__(self, f"{len(parts)} Caffe layer(s) cannot be converted: " + "; ".join(parts))


_INTERNAL = "lrponnx.converters.caffe."


def warn(msg: str) -> None:
    """A :class:`CaffeConversionWarning` reported at the converter's caller (the first frame
    outside the converter's modules; the CLI counts as a caller)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL) \
            and frame.f_globals.get("__name__") != _INTERNAL + "cli":
        level += 1
        frame = frame.f_back
    warnings.warn(msg, CaffeConversionWarning, stacklevel=level)


# Layers that only make sense while training (or feed data from a database): skipped with a warning.
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "AnnotatedData",
               "VideoData"}
TRAIN_ONLY = {"Accuracy", "HDF5Output"}


def is_data_layer(L: "Layer") -> bool:
    # a Python layer without bottoms feeds data (e.g. a custom input pipeline); with bottoms it computes
    return L.type in DATA_LAYERS or (L.type == "Python" and not L.bottoms)


def is_train_only(t: str) -> bool:
    return t in TRAIN_ONLY or t.endswith("Loss")


def prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def canon_axis(axis: int, ndim: int, layer: "Layer", what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < ndim:
        raise InvalidModelError(f"layer {shorten(layer.name)!r} ({layer.type}): {what} {axis} is out of range for a "
                                f"{ndim}-D blob")
    return a


@dataclass
class Layer:
    """One layer entry of the prototxt (V1 or V2) that takes part in the TEST phase."""
    index: int
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: object
    entry: int = -1  # position in net.layer / net.layers (what UnknownField.index refers to)

    def has(self, fld: str) -> bool:
        try:
            return self.msg.HasField(fld)
        except ValueError:  # the V1 message has no such field
            return False

    def param(self, fld: str):
        """The layer's ``<fld>`` sub-message (its defaults when unset or when the V1 format lacks it)."""
        try:
            return getattr(self.msg, fld)
        except AttributeError:
            return getattr(cpb.LayerParameter(), fld)

    def err(self, why: str) -> InvalidModelError:
        return InvalidModelError(f"layer {shorten(self.name)!r} ({self.type}): {why}")

    def unsupported(self, why: str) -> UnsupportedModelError:
        return CaffeLayerError([Offender(self.name, self.type, why)])


def _rule_met(rule, phase: int, level: int, stages: set[str]) -> bool:
    # Caffe's Net::StateMeetsRule
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layers_of(net) -> list[Layer]:
    """The net's layers that Caffe instantiates in the TEST phase, in prototxt order."""
    phase = 1  # TEST
    level = net.state.level if net.HasField("state") else 0
    stages = set(net.state.stage) if net.HasField("state") else set()
    out: list[Layer] = []
    v1 = len(net.layers) > 0
    entries = net.layers if v1 else net.layer
    for i, lp in enumerate(entries):
        if lp.include and lp.exclude:
            name = lp.name or f"#{i}"
            raise InvalidModelError(f"layer {shorten(name)!r} specifies both include and exclude rules; Caffe refuses that")
        if lp.include and not any(_rule_met(r, phase, level, stages) for r in lp.include):
            continue
        if lp.exclude and any(_rule_met(r, phase, level, stages) for r in lp.exclude):
            continue
        if not v1 and lp.HasField("phase") and lp.phase != phase:
            continue
        if v1:
            if lp.type == 0:
                raise InvalidModelError(
                    f"layer #{i} ({lp.name or 'unnamed'}) has no type: a V0-format net (layers {{ layer {{...}} }})? "
                    "Upgrade it with Caffe's upgrade_net_proto_text first")
            ltype = cpb.V1_TYPE_NAMES.get(lp.type, f"V1 type {lp.type}")
        else:
            ltype = lp.type
            if not ltype:
                raise InvalidModelError(f"layer #{i} ({lp.name or 'unnamed'}) has no type")
        out.append(Layer(len(out), lp.name or f"layer{i}", ltype, list(lp.bottom), list(lp.top), lp, i))
    return out


#: Largest input dimension accepted (ONNX Runtime and most kernels index with 32-bit sizes per axis).
MAX_DIM = 2**31 - 1


def parse_input_shape(spec) -> tuple[list[int], bool]:
    """'1,3,227,227' or a sequence -> (dims, batch_is_symbolic). 'N', '?' or -1 as the first dim: symbolic."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items:
        raise InvalidModelError("--input-shape is empty; expected e.g. 1,3,227,227")
    dims: list[int] = []
    symbolic = False
    for i, it in enumerate(items):
        if i == 0 and (it in ("N", "n", "?", "-1") or it == -1 or it is None):
            symbolic = True
            dims.append(1)
            continue
        try:
            d = int(it)
        except (TypeError, ValueError, OverflowError):
            raise InvalidModelError(f"--input-shape {shorten(str(spec))!r}: {shorten(str(it))!r} is not a positive "
                                    "integer") from None
        if d <= 0:
            raise InvalidModelError(f"--input-shape {shorten(str(spec))!r}: dimensions must be positive")
        if d > MAX_DIM:
            raise InvalidModelError(f"--input-shape {shorten(str(spec))!r}: {shorten(str(d))} is too large "
                                    f"(at most {MAX_DIM:,} per dimension)")
        dims.append(d)
    return dims, symbolic


def unknown_list(fields: list[cpb.UnknownField], limit: int = 8) -> str:
    items = [f"{shorten(u.path)} (line {u.line})" for u in fields[:limit]]
    if len(fields) > limit:
        items.append(f"and {len(fields) - limit} more")
    return ", ".join(items)


def unknown_offender(L: Layer, fields: list[cpb.UnknownField]) -> Offender:
    return Offender(L.name, L.type, f"unknown field{'s' if len(fields) > 1 else ''} {unknown_list(fields)}: not in "
                                    "Caffe's caffe.proto nor a fork field lrponnx honours; refused rather than ignored")


def refuse_unknown_net_fields(unknown: list[cpb.UnknownField], name: str) -> None:
    """Fields outside any layer entry that the schema does not know: refused, all at once."""
    top = [u for u in unknown if u.entry is None]
    if top:
        raise InvalidModelError(f"{name}: unknown net-level field{'s' if len(top) > 1 else ''} {unknown_list(top)}: "
                                "not in Caffe's NetParameter; refused rather than ignored")
