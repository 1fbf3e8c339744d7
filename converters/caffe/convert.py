"""Caffe (``deploy.prototxt`` + ``.caffemodel``) to ONNX, without Caffe: the driver.

The prototxt is read with :mod:`google.protobuf.text_format` and the weights with protobuf's binary
parser, both against the schema of :mod:`.proto` (:mod:`.reading`). Layers are translated one by
one, in prototxt order, following Caffe's TEST-phase semantics (see ``docs/caffe.md`` for the table).
Blob shapes are tracked in Python the way Caffe computes them, which is what lets us check the
caffemodel's blobs and reproduce Caffe's pooling rounding with plain ONNX pooling ops.

What each layer type takes, expects and emits is its declaration in :mod:`.layers`; this module
only walks the net: inputs, which layers convert, BatchNorm + Scale folding, the blobs' names,
the weights, the outputs, the model. Naming (:mod:`.graph`): the graph input keeps the Caffe
input blob's name; a blob's *final* value (what ``net.blobs[name]`` holds after a forward pass)
gets the blob's name; values that an in-place layer later overwrites are called
``<blob>@<layer that wrote them>``. Nodes are named after layers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrponnx.compiler.lrn_ops import ensure_lrn_function
from lrponnx.errors import InvalidModelError, Offender, shorten
from lrponnx.metadata import PREPROCESSING_KEY, SOURCE_KEY, WEIGHTS_KEY

from lrponnx.converters.caffe import proto as cpb
from lrponnx.converters.caffe.graph import CaffeGraph, LayerCtx
from lrponnx.converters.caffe.layers import LAYERS, supported_types
from lrponnx.converters.caffe.net import (CaffeConversionWarning, CaffeLayerError, Layer, is_data_layer,
                                          is_train_only, layers_of, parse_input_shape, refuse_unknown_net_fields,
                                          unknown_offender, warn)
from lrponnx.converters.caffe.preprocessing import preprocessing
from lrponnx.converters.caffe.reading import (load_caffemodel, load_mean_file, load_prototxt,
                                              load_prototxt_checked, parse_caffemodel)
from lrponnx.converters.caffe.weights import WeightSource, blob_bytes

__all__ = ["convert", "CaffeConversionWarning", "CaffeLayerError", "PREPROCESSING_KEY", "WEIGHTS_KEY",
           "SUPPORTED_TYPES", "load_caffemodel", "load_prototxt", "load_mean_file", "parse_caffemodel",
           "random_caffemodel"]

MIN_OPSET = 13
SUPPORTED_TYPES = supported_types()  # the built-in layer types (layers.supported_types() is live)


def convert(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None, *, mean=None,
            mean_file: str | os.PathLike | None = None, scale: float = 1.0, channel_order: str | None = None,
            input_shape=None, opset: int = 17, random_weights: int | None = None,
            embed_preprocessing: bool = False, _blobs_out: dict | None = None) -> onnx.ModelProto:
    """Convert a Caffe net to an ONNX model (see ``docs/caffe.md``).

    ``caffemodel`` holds the trained weights; without it, ``random_weights`` (a seed) builds
    deterministic untrained ones. Raises :class:`InvalidModelError` for unreadable, truncated or
    inconsistent files and :class:`UnsupportedModelError` listing every layer we cannot convert.
    """
    _check_arguments(opset, caffemodel, random_weights)
    net, layers, unknown = _read_net(prototxt)
    inputs, data_input = _declared_inputs(net, layers)
    fixed_batch = _fix_input_shape(inputs, input_shape)
    work = _layers_to_convert(layers, unknown, data_input)
    steps = _steps(work)
    weights = WeightSource(caffemodel, random_weights, work, _blobs_out)
    g = CaffeGraph(onnx.GraphProto(name=net.name or Path(prototxt).stem), fixed_batch, _blob_names(inputs, steps))
    blobs = _Blobs({nm for nm, _ in inputs}, _last_writers(steps))
    meta = _add_inputs(g, blobs, inputs, mean, mean_file, scale, channel_order, embed_preprocessing)
    for k, step in enumerate(steps):
        _emit_step(g, step, k, blobs, weights)
    weights.finish()
    _add_outputs(g, blobs)
    model = _model(g, opset, {PREPROCESSING_KEY: json.dumps(meta), WEIGHTS_KEY: weights.description(),
                              SOURCE_KEY: f"caffe: {Path(prototxt).name}"})
    if _blobs_out is None:  # random_caffemodel wants the weights only; its file is checked when read
        _check(model)
    return model


# --------------------------------------------------------------------------- the net and its inputs

def _check_arguments(opset, caffemodel, random_weights) -> None:
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise InvalidModelError(f"--opset must be between {MIN_OPSET} and {max_opset}, got {opset}")
    if caffemodel is None and random_weights is None:
        raise InvalidModelError("no weights: give a .caffemodel, or --random-weights SEED for an untrained model")


def _read_net(prototxt) -> tuple[object, list[Layer], dict[int, list[cpb.UnknownField]]]:
    """The NetParameter, its TEST-phase layers, and the unknown fields of each layer entry."""
    net, unknown = load_prototxt_checked(prototxt)
    layers = layers_of(net)
    refuse_unknown_net_fields(unknown, Path(prototxt).name)
    by_entry: dict[int, list[cpb.UnknownField]] = {}
    for u in unknown:
        if u.entry is not None:
            by_entry.setdefault(u.index, []).append(u)
    return net, layers, by_entry


def _declared_inputs(net, layers: list[Layer]) -> tuple[list[tuple[str, list[int]]], str | None]:
    """``[(blob, shape)]`` of the net's inputs (net-level ``input``, ``Input`` layers, else the first
    data layer's top) and the name of that data layer, if one stands in."""
    inputs: list[tuple[str, list[int]]] = []
    if len(net.input):
        if len(net.input_shape):
            if len(net.input_shape) != len(net.input):
                raise InvalidModelError(f"{len(net.input)} inputs but {len(net.input_shape)} input_shape entries")
            for nm, shp in zip(net.input, net.input_shape):
                inputs.append((nm, [int(d) for d in shp.dim]))
        elif len(net.input_dim):
            if len(net.input_dim) != 4 * len(net.input):
                raise InvalidModelError(f"{len(net.input)} inputs need {4 * len(net.input)} input_dim values, "
                                        f"got {len(net.input_dim)}")
            for i, nm in enumerate(net.input):
                inputs.append((nm, [int(d) for d in net.input_dim[4 * i:4 * i + 4]]))
        else:
            inputs.extend((nm, []) for nm in net.input)
    for L in layers:
        if L.type == "Input":
            shp = list(L.param("input_param").shape)
            if shp and len(shp) not in (1, len(L.tops)):
                raise L.err(f"{len(shp)} shapes for {len(L.tops)} tops")
            for j, top in enumerate(L.tops):
                dims = [int(d) for d in shp[j if len(shp) > 1 else 0].dim] if shp else []
                inputs.append((top, dims))
    data_input = None
    if not inputs:
        data_layers = [L for L in layers if is_data_layer(L) and L.tops]
        if data_layers:
            dl = data_layers[0]
            dims: list[int] = []
            if dl.type == "MemoryData":
                m = dl.param("memory_data_param")
                dims = [int(m.batch_size), int(m.channels), int(m.height), int(m.width)]
            inputs.append((dl.tops[0], dims))
            data_input = dl.name
    if not inputs:
        raise InvalidModelError("the net declares no input (no Input layer, no input/input_shape/input_dim)")
    return inputs, data_input


def _fix_input_shape(inputs: list[tuple[str, list[int]]], input_shape) -> bool:
    """Apply ``--input-shape`` to the first input (in place) and check every input's shape; returns
    whether the batch size is fixed."""
    fixed_batch = False
    if input_shape is not None:
        dims, symbolic = parse_input_shape(input_shape)
        if inputs[0][1] and len(dims) != len(inputs[0][1]):
            raise InvalidModelError(f"--input-shape has {len(dims)} dims, the prototxt's input "
                                    f"{inputs[0][0]!r} has {len(inputs[0][1])} ({inputs[0][1]})")
        inputs[0] = (inputs[0][0], dims)
        fixed_batch = not symbolic
    for nm, dims in inputs:
        if not dims:
            raise InvalidModelError(f"input {shorten(nm)!r} has no shape in the prototxt; give --input-shape")
        if any(d <= 0 for d in dims):
            raise InvalidModelError(f"input {shorten(nm)!r} has a non-positive dimension {dims}; give --input-shape")
    if len({nm for nm, _ in inputs}) != len(inputs):
        raise InvalidModelError("two inputs share a name")
    return fixed_batch


# --------------------------------------------------------------------------- which layers, in which steps

def _layers_to_convert(layers: list[Layer], unknown: dict[int, list], data_input: str | None) -> list[Layer]:
    """The layers to convert (and Silence); every one that cannot be converted, all at once, as a
    :class:`CaffeLayerError`. Data and train-only layers are skipped with a warning."""
    offenders: list[Offender] = []
    work: list[Layer] = []
    for L in layers:
        if L.type == "Input":
            if L.entry in unknown:
                offenders.append(unknown_offender(L, unknown[L.entry]))
            continue
        if is_data_layer(L):
            if L.name != data_input:
                warn(f"skipping data layer {shorten(L.name)!r} ({L.type})")
            else:
                warn(f"data layer {shorten(L.name)!r} ({L.type}): its top {L.tops[0]!r} becomes the graph input; "
                     "its transform_param (mean, scale, crop, mirror) is not applied: give --mean/--mean-file/"
                     "--scale and the input size")
            continue
        if L.type == "Silence":
            work.append(L)  # consumes its bottoms, emits nothing
            continue
        if is_train_only(L.type):
            warn(f"skipping train-only layer {shorten(L.name)!r} ({L.type})")
            continue
        decl = LAYERS.get(L.type)
        if decl is None:
            offenders.append(Offender(L.name, L.type, f"no ONNX conversion for Caffe layer type {L.type!r}"))
            continue
        if L.entry in unknown:
            offenders.append(unknown_offender(L, unknown[L.entry]))
            continue
        why = decl.static_check(L)
        if why:
            offenders.append(Offender(L.name, L.type, why))
            continue
        work.append(L)
    if offenders:
        raise CaffeLayerError(offenders)
    names = [L.name for L in work if L.type != "Silence"]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidModelError(f"duplicate layer names: {', '.join(map(repr, dup))}")
    return work


@dataclass
class _Step:
    """One conversion step: a layer, or a BatchNorm together with the Scale layer folded into it."""
    main: Layer
    scale: Layer | None

    @property
    def layers(self) -> list[Layer]:
        return [self.main] if self.scale is None else [self.main, self.scale]

    @property
    def tops(self) -> list[str]:
        return (self.scale or self.main).tops

    @property
    def writes(self) -> bool:
        """Whether the step computes new values (not Silence, not an alias such as Split)."""
        return self.main.type != "Silence" and not LAYERS[self.main.type].is_alias(self.main)


def _steps(work: list[Layer]) -> list[_Step]:
    steps: list[_Step] = []
    i = 0
    while i < len(work):
        L = work[i]
        S = work[i + 1] if i + 1 < len(work) else None
        if L.type == "BatchNorm" and S is not None and _scale_folds(L, S, work[i + 1:]):
            steps.append(_Step(L, S))
            i += 2
        else:
            steps.append(_Step(L, None))
            i += 1
    return steps


def _scale_folds(bn: Layer, sc: Layer, rest: list[Layer]) -> bool:
    """Whether Scale layer ``sc`` (right after BatchNorm ``bn``) can become BatchNormalization's gamma/beta."""
    if sc.type != "Scale" or len(sc.bottoms) != 1 or len(sc.tops) != 1 or sc.bottoms[0] != bn.tops[0]:
        return False
    p = sc.param("scale_param")
    if p.axis != 1 or p.num_axes != 1:
        return False
    blob = bn.tops[0]
    if sc.tops[0] == blob:
        return True
    if blob in bn.bottoms:  # BN in place, Scale not: the blob's final value (BN output) must stay visible
        return False
    readers = 0  # not in place: fold only if nothing else reads the BatchNorm output
    for M in rest:
        readers += M.bottoms.count(blob)
        if blob in M.tops:
            break
    return readers == 1


def _blob_names(inputs, steps: list[_Step]) -> set[str]:
    """Every Caffe blob name: reserved for the blobs' values."""
    names = {nm for nm, _ in inputs}
    for st in steps:
        for M in st.layers:
            names.update(M.tops)
            names.update(M.bottoms)
    return names


# --------------------------------------------------------------------------- emission

@dataclass
class _Blobs:
    """Where the walk stands: each Caffe blob's current ONNX tensor and Caffe shape."""
    inputs: set[str]
    last_writer: dict[str, int]  # blob -> the step that writes its final value
    tensor: dict[str, str] = field(default_factory=dict)
    shape: dict[str, list[int]] = field(default_factory=dict)
    available: dict[str, None] = field(default_factory=dict)  # Caffe's available_blobs (ordered)


def _last_writers(steps: list[_Step]) -> dict[str, int]:
    """Blob -> the step that writes its final value (which therefore gets the blob's name)."""
    last: dict[str, int] = {}
    for k, st in enumerate(steps):
        if st.writes:
            for t in st.tops:
                last[t] = k
    return last


def _add_inputs(g: CaffeGraph, blobs: _Blobs, inputs, mean, mean_file, scale, channel_order, embed: bool) -> dict:
    """Graph inputs (and the embedded preprocessing); returns the preprocessing metadata."""
    first_name, first_shape = inputs[0]
    meta, mean_arr = preprocessing(first_name, first_shape, mean, mean_file, scale, channel_order)
    for nm, dims in inputs:
        g.claim(nm)
        batch = dims[0] if g.fixed_batch else "N"
        g.graph.input.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, [batch] + list(dims[1:])))
        blobs.tensor[nm], blobs.shape[nm] = nm, list(dims)
    if embed:
        sub = g.fresh(f"{first_name}#centered", allow_reserved=True)
        g.op("Sub", first_name, g.const(mean_arr, f"{first_name}.mean"), output=sub, name="preprocess#mean")
        pre = g.fresh(f"{first_name}#preprocessed", allow_reserved=True)
        g.op("Mul", sub, g.const(np.array(float(scale)), f"{first_name}.scale"), output=pre, name="preprocess#scale")
        blobs.tensor[first_name] = pre
        meta["embedded"] = True
    return meta


def _emit_step(g: CaffeGraph, st: _Step, k: int, blobs: _Blobs, weights: WeightSource) -> None:
    """Convert one step: check its bottoms and tops, fetch its weights, name its tops, emit."""
    L = st.main
    for M in st.layers:
        for b in M.bottoms:
            if b not in blobs.tensor and not (M is st.scale and b == L.tops[0]):
                raise M.err(f"unknown bottom blob {b!r} (not an input and not produced by an earlier layer)")
            blobs.available.pop(b, None)
    if L.type == "Silence":
        return
    bshapes = [blobs.shape[b] for b in L.bottoms]
    xs = [blobs.tensor[b] for b in L.bottoms]
    for t in st.tops:
        if t in blobs.tensor and t not in L.bottoms:
            raise (st.scale or L).err(f"top blob {t!r} is produced by multiple sources")
    if not st.writes:  # an alias: the tops are the bottom
        for t in L.tops:
            blobs.tensor[t], blobs.shape[t] = xs[0], list(bshapes[0])
            blobs.available[t] = None
        return
    got = [weights.blobs_for(M, bshapes) for M in st.layers]
    extra = {"fold_scale": got[1], "fold_name": st.scale.name} if st.scale is not None else {}
    outs = [g.claim(t) if blobs.last_writer.get(t) == k and t not in blobs.inputs else g.fresh(f"{t}@{L.name}")
            for t in st.tops]
    out_shapes = LAYERS[L.type].convert(LayerCtx(g, L, xs, bshapes, outs, got[0], extra))
    for t, o, sh in zip(st.tops, outs, out_shapes):
        blobs.tensor[t], blobs.shape[t] = o, [int(d) for d in sh]
        blobs.available[t] = None


def _add_outputs(g: CaffeGraph, blobs: _Blobs) -> None:
    """Caffe's outputs: blobs produced and never consumed afterwards, in name order."""
    out_blobs = sorted(b for b in blobs.available if b not in blobs.inputs or blobs.tensor[b] != b)
    if not out_blobs:
        raise InvalidModelError("the net has no output blob (every blob is consumed)")
    for blob in out_blobs:
        name = blobs.tensor[blob]
        if blob not in blobs.inputs and name != blob:  # an alias (Split/Dropout top): expose it by its name
            g.op("Identity", name, output=g.claim(blob), name=f"{blob}#output")
            name = blob
        # (an input modified in place keeps its "<blob>@<layer>" name: the blob's name is the graph input)
        dims = list(blobs.shape[blob])
        if not g.fixed_batch and dims:
            dims = ["N"] + dims[1:]
        g.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))


def _model(g: CaffeGraph, opset: int, props: dict[str, str]) -> onnx.ModelProto:
    model = helper.make_model(g.graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lrponnx caffe2onnx")
    model.ir_version = max(8, helper.find_min_ir_version_for([helper.make_opsetid("", opset)], True))
    if g.needs_lrn_function:
        ensure_lrn_function(model)
    helper.set_model_props(model, props)
    return model


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InvalidModelError(f"the converted model fails ONNX's checker: {' '.join(str(e).split())[:500]}") from None


# --------------------------------------------------------------------------- writing weights

def random_caffemodel(prototxt: str | os.PathLike, seed: int, *, input_shape=None) -> bytes:
    """The bytes of a binary ``.caffemodel`` holding exactly the weights that
    ``convert(prototxt, random_weights=seed)`` builds: a V2 ``layer`` entry per converted layer
    (name, type, its shaped float blobs, if any), in Caffe's own layout (BatchNorm's three blobs,
    the Scale layer after it separately). OpenCV's dnn module and this converter read it (tested);
    converting with it equals converting with the seed."""
    blobs: dict[str, tuple[str, list[np.ndarray]]] = {}
    convert(prototxt, random_weights=seed, input_shape=input_shape, _blobs_out=blobs)
    net = cpb.NetParameter(name=Path(prototxt).stem)
    for lname, (ltype, arrs) in blobs.items():
        lp = net.layer.add(name=lname, type=ltype)
        for a in arrs:
            lp.blobs.add().ParseFromString(blob_bytes(a))
    return net.SerializeToString()
