"""The subset of Caffe's ``caffe.proto`` that the converter reads, built in code (no protoc, no caffe).

Only the messages and fields we use are declared, each with Caffe's real field number, type and
default (from BVLC ``src/caffe/proto/caffe.proto``), plus the few fork fields we honour
(``ceil_mode`` of OpenCV's ``opencv-caffe.proto``, ``scale_train``, NVIDIA's ``raw_data``). Fields
that only matter for training (``param {}``, ``weight_filler {}``, ``engine``, ``blobs_lr``, ...) are
declared so that they parse; the converter ignores them. Nothing is dropped silently:

* text ``.prototxt``: :func:`scan_unknown_fields` walks the text against this schema and lists
  every field it does not declare (with the layer entry it sits in and its line);
  :func:`parse_prototxt_checked` returns them next to the parsed net, and the converter refuses
  those of the layers it converts, by name (``docs/caffe.md``, "Unknown fields");
* binary ``.caffemodel``: only layer names and blobs are read (Caffe's
  ``Net::CopyTrainedLayersFrom`` reads nothing else); :func:`unknown_field_numbers` tells the
  converter which fields of a ``BlobProto`` it did not understand, and it refuses those.

The descriptor lives in a private :class:`DescriptorPool`, so it never clashes with a real
``caffe_pb2`` that happens to be imported in the same process. Works with protobuf >= 4.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf import message as _message

try:  # protobuf >= 4.22
    from google.protobuf.message_factory import GetMessageClass as _get_message_class
except ImportError:  # pragma: no cover - protobuf 4.21
    from google.protobuf import message_factory as _mf

    def _get_message_class(desc):
        return _mf.MessageFactory(desc.file.pool).GetPrototype(desc)


_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
PACKAGE = "caffe"

# enum name -> [(value name, number)]; nested in the message named before the dot.
_ENUMS: dict[str, list[tuple[str, int]]] = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    # NVIDIA Caffe's storage type of BlobProto.raw_data (also in OpenCV's opencv-caffe.proto)
    "Type": [("DOUBLE", 0), ("FLOAT", 1), ("FLOAT16", 2), ("INT", 3), ("UINT", 4)],
    "ParamSpec.DimCheckMode": [("STRICT", 0), ("PERMISSIVE", 1)],
    "V1LayerParameter.DimCheckMode": [("STRICT", 0), ("PERMISSIVE", 1)],
    "FillerParameter.VarianceNorm": [("FAN_IN", 0), ("FAN_OUT", 1), ("AVERAGE", 2)],
    "ConvolutionParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "PoolingParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "LRNParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "ReLUParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "SigmoidParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "TanHParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "SoftmaxParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "PoolingParameter.PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "PoolingParameter.RoundMode": [("CEIL", 0), ("FLOOR", 1)],
    "LRNParameter.NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)],
    "EltwiseParameter.EltwiseOp": [("PROD", 0), ("SUM", 1), ("MAX", 2)],
    "V1LayerParameter.LayerType": [
        ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
        ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39), ("DROPOUT", 6),
        ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38), ("FLATTEN", 8),
        ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28), ("IM2COL", 11), ("IMAGE_DATA", 12),
        ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14), ("LRN", 15), ("MEMORY_DATA", 29),
        ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17), ("POWER", 26), ("RELU", 18),
        ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27), ("SILENCE", 36), ("SOFTMAX", 20),
        ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33), ("TANH", 23), ("WINDOW_DATA", 24),
        ("THRESHOLD", 31),
    ],
}

# message -> [(field name, number, type, label, default or None)]; label: "o" optional, "r" repeated,
# "p" repeated packed. Types are scalar names, message names or (nested) enum names.
_MESSAGES: dict[str, list[tuple]] = {
    "BlobShape": [("dim", 1, "int64", "p", None)],
    "BlobProto": [
        ("shape", 7, "BlobShape", "o", None),
        ("data", 5, "float", "p", None),
        ("double_data", 8, "double", "p", None),
        # NVIDIA Caffe (and OpenCV): the values as raw little-endian bytes of raw_data_type
        ("raw_data_type", 10, "Type", "o", None),
        ("raw_data", 12, "bytes", "o", None),
        # legacy 4-D dims (int32 in caffe.proto; int64 reads the same varints)
        ("num", 1, "int32", "o", "0"),
        ("channels", 2, "int32", "o", "0"),
        ("height", 3, "int32", "o", "0"),
        ("width", 4, "int32", "o", "0"),
    ],
    "NetState": [
        ("phase", 1, "Phase", "o", "TEST"),
        ("level", 2, "int32", "o", "0"),
        ("stage", 3, "string", "r", None),
    ],
    "NetStateRule": [
        ("phase", 1, "Phase", "o", None),
        ("min_level", 2, "int32", "o", None),
        ("max_level", 3, "int32", "o", None),
        ("stage", 4, "string", "r", None),
        ("not_stage", 5, "string", "r", None),
    ],
    "ParamSpec": [  # training only: learning-rate multipliers and weight sharing names
        ("name", 1, "string", "o", None),
        ("share_mode", 2, "ParamSpec.DimCheckMode", "o", None),
        ("lr_mult", 3, "float", "o", "1"),
        ("decay_mult", 4, "float", "o", "1"),
    ],
    "FillerParameter": [  # training only: how Caffe initialises a parameter
        ("type", 1, "string", "o", "constant"),
        ("value", 2, "float", "o", "0"),
        ("min", 3, "float", "o", "0"),
        ("max", 4, "float", "o", "1"),
        ("mean", 5, "float", "o", "0"),
        ("std", 6, "float", "o", "1"),
        ("sparse", 7, "int32", "o", "-1"),
        ("variance_norm", 8, "FillerParameter.VarianceNorm", "o", "FAN_IN"),
    ],
    "NetParameter": [
        ("name", 1, "string", "o", None),
        ("force_backward", 5, "bool", "o", "false"),  # training / debugging only
        ("debug_info", 7, "bool", "o", "false"),
        ("input", 3, "string", "r", None),
        ("input_shape", 8, "BlobShape", "r", None),
        ("input_dim", 4, "int32", "r", None),
        ("state", 6, "NetState", "o", None),
        ("layer", 100, "LayerParameter", "r", None),
        ("layers", 2, "V1LayerParameter", "r", None),
    ],
    "ConvolutionParameter": [
        ("num_output", 1, "uint32", "o", None),
        ("bias_term", 2, "bool", "o", "true"),
        ("pad", 3, "uint32", "r", None),
        ("kernel_size", 4, "uint32", "r", None),
        ("stride", 6, "uint32", "r", None),
        ("dilation", 18, "uint32", "r", None),
        ("pad_h", 9, "uint32", "o", "0"),
        ("pad_w", 10, "uint32", "o", "0"),
        ("kernel_h", 11, "uint32", "o", None),
        ("kernel_w", 12, "uint32", "o", None),
        ("stride_h", 13, "uint32", "o", None),
        ("stride_w", 14, "uint32", "o", None),
        ("group", 5, "uint32", "o", "1"),
        ("weight_filler", 7, "FillerParameter", "o", None),
        ("bias_filler", 8, "FillerParameter", "o", None),
        ("engine", 15, "ConvolutionParameter.Engine", "o", "DEFAULT"),
        ("axis", 16, "int32", "o", "1"),
        ("force_nd_im2col", 17, "bool", "o", "false"),
    ],
    "PoolingParameter": [
        ("pool", 1, "PoolingParameter.PoolMethod", "o", "MAX"),
        ("pad", 4, "uint32", "o", "0"),
        ("pad_h", 9, "uint32", "o", "0"),
        ("pad_w", 10, "uint32", "o", "0"),
        ("kernel_size", 2, "uint32", "o", None),
        ("kernel_h", 5, "uint32", "o", None),
        ("kernel_w", 6, "uint32", "o", None),
        ("stride", 3, "uint32", "o", "1"),
        ("stride_h", 7, "uint32", "o", None),
        ("stride_w", 8, "uint32", "o", None),
        ("engine", 11, "PoolingParameter.Engine", "o", "DEFAULT"),
        ("global_pooling", 12, "bool", "o", "false"),
        ("round_mode", 13, "PoolingParameter.RoundMode", "o", "CEIL"),
        # Caffe forks (BVLC PR #3057, OpenCV's opencv-caffe.proto) spell the rounding
        # ``ceil_mode: false``, also as field 13 (a bool, so its 0 means FLOOR where round_mode's
        # 0 means CEIL). Prototxt text is read by name, and a caffemodel's layer parameters are
        # never read, so it is declared here under a free number: only its name matters.
        ("ceil_mode", 1013, "bool", "o", "true"),
    ],
    "LRNParameter": [
        ("local_size", 1, "uint32", "o", "5"),
        ("alpha", 2, "float", "o", "1"),
        ("beta", 3, "float", "o", "0.75"),
        ("norm_region", 4, "LRNParameter.NormRegion", "o", "ACROSS_CHANNELS"),
        ("k", 5, "float", "o", "1"),
        ("engine", 6, "LRNParameter.Engine", "o", "DEFAULT"),
    ],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", "o", None),
        ("bias_term", 2, "bool", "o", "true"),
        ("weight_filler", 3, "FillerParameter", "o", None),
        ("bias_filler", 4, "FillerParameter", "o", None),
        ("axis", 5, "int32", "o", "1"),
        ("transpose", 6, "bool", "o", "false"),
    ],
    "ReLUParameter": [("negative_slope", 1, "float", "o", "0"),
                      ("engine", 2, "ReLUParameter.Engine", "o", "DEFAULT")],
    "ELUParameter": [("alpha", 1, "float", "o", "1")],
    "PReLUParameter": [("filler", 1, "FillerParameter", "o", None),
                       ("channel_shared", 2, "bool", "o", "false")],
    "SigmoidParameter": [("engine", 1, "SigmoidParameter.Engine", "o", "DEFAULT")],
    "TanHParameter": [("engine", 1, "TanHParameter.Engine", "o", "DEFAULT")],
    "DropoutParameter": [
        ("dropout_ratio", 1, "float", "o", "0.5"),
        ("scale_train", 2, "bool", "o", "true"),
    ],
    "SoftmaxParameter": [("engine", 1, "SoftmaxParameter.Engine", "o", "DEFAULT"),
                         ("axis", 2, "int32", "o", "1")],
    "ConcatParameter": [
        ("axis", 2, "int32", "o", "1"),
        ("concat_dim", 1, "uint32", "o", "1"),
    ],
    "EltwiseParameter": [
        ("operation", 1, "EltwiseParameter.EltwiseOp", "o", "SUM"),
        ("coeff", 2, "float", "r", None),
        ("stable_prod_grad", 3, "bool", "o", "true"),  # backward only
    ],
    "CropParameter": [
        ("axis", 1, "int32", "o", "2"),
        ("offset", 2, "uint32", "r", None),
    ],
    "SliceParameter": [
        ("axis", 3, "int32", "o", "1"),
        ("slice_point", 2, "uint32", "r", None),
        ("slice_dim", 1, "uint32", "o", "1"),  # deprecated alias of axis
    ],
    "FlattenParameter": [
        ("axis", 1, "int32", "o", "1"),
        ("end_axis", 2, "int32", "o", "-1"),
    ],
    "ReshapeParameter": [
        ("shape", 1, "BlobShape", "o", None),
        ("axis", 2, "int32", "o", "0"),
        ("num_axes", 3, "int32", "o", "-1"),
    ],
    "BatchNormParameter": [
        ("use_global_stats", 1, "bool", "o", None),
        ("moving_average_fraction", 2, "float", "o", "0.999"),
        ("eps", 3, "float", "o", "1e-05"),
    ],
    "ScaleParameter": [
        ("axis", 1, "int32", "o", "1"),
        ("num_axes", 2, "int32", "o", "1"),
        ("filler", 3, "FillerParameter", "o", None),
        ("bias_term", 4, "bool", "o", "false"),
        ("bias_filler", 5, "FillerParameter", "o", None),
    ],
    "BiasParameter": [
        ("axis", 1, "int32", "o", "1"),
        ("num_axes", 2, "int32", "o", "1"),
        ("filler", 3, "FillerParameter", "o", None),
    ],
    "PowerParameter": [
        ("power", 1, "float", "o", "1"),
        ("scale", 2, "float", "o", "1"),
        ("shift", 3, "float", "o", "0"),
    ],
    "InputParameter": [("shape", 1, "BlobShape", "r", None)],
    "MemoryDataParameter": [
        ("batch_size", 1, "uint32", "o", None),
        ("channels", 2, "uint32", "o", None),
        ("height", 3, "uint32", "o", None),
        ("width", 4, "uint32", "o", None),
    ],
    "LayerParameter": [
        ("name", 1, "string", "o", None),
        ("type", 2, "string", "o", None),
        ("bottom", 3, "string", "r", None),
        ("top", 4, "string", "r", None),
        ("phase", 10, "Phase", "o", None),
        ("loss_weight", 5, "float", "r", None),       # training only
        ("param", 6, "ParamSpec", "r", None),          # training only
        ("blobs", 7, "BlobProto", "r", None),
        ("propagate_down", 11, "bool", "r", None),    # training only
        ("include", 8, "NetStateRule", "r", None),
        ("exclude", 9, "NetStateRule", "r", None),
        ("batch_norm_param", 139, "BatchNormParameter", "o", None),
        ("bias_param", 141, "BiasParameter", "o", None),
        ("concat_param", 104, "ConcatParameter", "o", None),
        ("convolution_param", 106, "ConvolutionParameter", "o", None),
        ("crop_param", 144, "CropParameter", "o", None),
        ("dropout_param", 108, "DropoutParameter", "o", None),
        ("eltwise_param", 110, "EltwiseParameter", "o", None),
        ("elu_param", 140, "ELUParameter", "o", None),
        ("flatten_param", 135, "FlattenParameter", "o", None),
        ("inner_product_param", 117, "InnerProductParameter", "o", None),
        ("input_param", 143, "InputParameter", "o", None),
        ("lrn_param", 118, "LRNParameter", "o", None),
        ("memory_data_param", 119, "MemoryDataParameter", "o", None),
        ("pooling_param", 121, "PoolingParameter", "o", None),
        ("power_param", 122, "PowerParameter", "o", None),
        ("prelu_param", 131, "PReLUParameter", "o", None),
        ("relu_param", 123, "ReLUParameter", "o", None),
        ("reshape_param", 133, "ReshapeParameter", "o", None),
        ("scale_param", 142, "ScaleParameter", "o", None),
        ("sigmoid_param", 124, "SigmoidParameter", "o", None),
        ("slice_param", 126, "SliceParameter", "o", None),
        ("softmax_param", 125, "SoftmaxParameter", "o", None),
        ("tanh_param", 127, "TanHParameter", "o", None),
    ],
    "V1LayerParameter": [
        ("bottom", 2, "string", "r", None),
        ("top", 3, "string", "r", None),
        ("name", 4, "string", "o", None),
        ("include", 32, "NetStateRule", "r", None),
        ("exclude", 33, "NetStateRule", "r", None),
        ("type", 5, "V1LayerParameter.LayerType", "o", None),
        ("blobs", 6, "BlobProto", "r", None),
        ("param", 1001, "string", "r", None),                                  # training only
        ("blob_share_mode", 1002, "V1LayerParameter.DimCheckMode", "r", None),  # training only
        ("blobs_lr", 7, "float", "r", None),                                  # training only
        ("weight_decay", 8, "float", "r", None),                              # training only
        ("loss_weight", 35, "float", "r", None),                              # training only
        ("concat_param", 9, "ConcatParameter", "o", None),
        ("convolution_param", 10, "ConvolutionParameter", "o", None),
        ("dropout_param", 12, "DropoutParameter", "o", None),
        ("eltwise_param", 24, "EltwiseParameter", "o", None),
        ("inner_product_param", 17, "InnerProductParameter", "o", None),
        ("lrn_param", 18, "LRNParameter", "o", None),
        ("memory_data_param", 22, "MemoryDataParameter", "o", None),
        ("pooling_param", 19, "PoolingParameter", "o", None),
        ("power_param", 21, "PowerParameter", "o", None),
        ("relu_param", 30, "ReLUParameter", "o", None),
        ("sigmoid_param", 38, "SigmoidParameter", "o", None),
        ("slice_param", 31, "SliceParameter", "o", None),
        ("softmax_param", 39, "SoftmaxParameter", "o", None),
        ("tanh_param", 37, "TanHParameter", "o", None),
    ],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="lrponnx/converters/caffe/caffe_subset.proto", package=PACKAGE, syntax="proto2")
    msgs: dict[str, descriptor_pb2.DescriptorProto] = {}
    for mname in _MESSAGES:
        msgs[mname] = fdp.message_type.add(name=mname)
        # an extension range (above every field number any Caffe fork uses) lets protobuf's text
        # parser step over `[some.extension]: ...`; scan_unknown_fields reports it like any unknown
        msgs[mname].extension_range.add(start=100_000_000, end=536_870_912)
    for ename, values in _ENUMS.items():
        if "." in ename:
            owner, short = ename.split(".")
            enum = msgs[owner].enum_type.add(name=short)
        else:
            enum = fdp.enum_type.add(name=ename)
        for vname, num in values:
            enum.value.add(name=vname, number=num)
    for mname, fields in _MESSAGES.items():
        for fname, num, ftype, label, default in fields:
            f = msgs[mname].field.add(name=fname, number=num)
            f.label = _F.LABEL_OPTIONAL if label == "o" else _F.LABEL_REPEATED
            if label == "p":
                f.options.packed = True
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
            elif ftype in _ENUMS:
                f.type = _F.TYPE_ENUM
                f.type_name = f".{PACKAGE}.{ftype}"
            elif ftype in _MESSAGES:
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}.{ftype}"
            else:  # pragma: no cover - a typo in the tables above
                raise AssertionError(f"unknown type {ftype!r} for {mname}.{fname}")
            if default is not None:
                f.default_value = default
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def _cls(name: str):
    return _get_message_class(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


NetParameter = _cls("NetParameter")
LayerParameter = _cls("LayerParameter")
V1LayerParameter = _cls("V1LayerParameter")
BlobProto = _cls("BlobProto")
BlobShape = _cls("BlobShape")

# V1 enum number -> V2 type string (names as in Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES = {
    0: "", 35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 5: "Data", 39: "Deconvolution", 6: "Dropout", 32: "DummyData", 7: "EuclideanLoss",
    25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 28: "HingeLoss",
    11: "Im2col", 12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 29: "MemoryData",
    16: "MultinomialLogisticLoss", 34: "MVN", 17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid",
    27: "SigmoidCrossEntropyLoss", 36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split",
    33: "Slice", 23: "TanH", 24: "WindowData", 31: "Threshold",
}


class ProtoError(ValueError):
    """The bytes or text are not a message of the expected kind (caller turns it into a user error)."""


def parse_prototxt(text: str):
    """A :class:`NetParameter` from prototxt text; unknown fields and extensions are skipped here
    (:func:`parse_prototxt_checked` lists them)."""
    net = NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_extension=True, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ProtoError(str(e)) from None
    except RecursionError:  # protobuf's text parser recurses once per nested message
        raise ProtoError(f"messages are nested too deeply (more than about {sys.getrecursionlimit()} "
                         "levels; a real net needs a handful)") from None
    return net


@dataclass(frozen=True)
class UnknownField:
    """A field of a prototxt that the schema does not declare.

    ``entry`` is ``"layer"`` or ``"layers"`` with ``index`` the position of that entry in the net (as
    in ``net.layer[index]``), or ``None`` for a field outside any layer; ``path`` is dotted from
    there (``"pooling_param.ceil_mod"``); ``line`` is 1-based."""
    entry: str | None
    index: int | None
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path} (line {self.line})"


_LAYER_ENTRIES = ("layer", "layers")


def scan_unknown_fields(text: str) -> list[UnknownField]:
    """Every field of ``text`` that :class:`NetParameter`'s schema does not declare, in file order.

    Walks the text format with protobuf's own tokenizer (comments, lists ``[a, b]``, ``<...>``
    blocks, adjacent strings, extensions ``[x.y]``). The contents of an unknown message are not
    listed (the message is). Raises :class:`ProtoError` for text it cannot walk: the caller
    then relies on protobuf's strict parser, which names the first unknown field itself."""
    tok = text_format.Tokenizer(text.splitlines())
    out: list[UnknownField] = []
    counts = {e: 0 for e in _LAYER_ENTRIES}

    def value(desc, fd, entry, index, prefix):
        if tok.TryConsume("{"):
            block(fd.message_type if fd is not None and fd.message_type is not None else None,
                  entry, index, prefix, "}")
        elif tok.TryConsume("<"):
            block(fd.message_type if fd is not None and fd.message_type is not None else None,
                  entry, index, prefix, ">")
        elif tok.token[:1] in ("'", '"'):
            tok.ConsumeByteString()  # also eats adjacent strings: "a" "b"
        else:
            if tok.token in ("", "}", ">", "]", ":", ",", ";", "[", "{", "<"):
                raise ProtoError(f"unexpected {tok.token!r}")
            tok.NextToken()

    def block(desc, entry, index, prefix, end):
        top = desc is not None and desc.full_name == f"{PACKAGE}.NetParameter"
        while True:
            if end is None:
                if tok.AtEnd():
                    return
            elif tok.TryConsume(end):
                return
            elif tok.AtEnd():
                raise ProtoError(f"missing {end!r}")
            line = getattr(tok, "_line", -1) + 1
            if tok.TryConsume("["):
                parts = []
                while not tok.TryConsume("]"):
                    if tok.AtEnd():
                        raise ProtoError("unterminated extension name")
                    parts.append(tok.token)
                    tok.NextToken()
                name, fd = "[" + "".join(parts) + "]", None
            else:
                name = tok.ConsumeIdentifierOrNumber()
                fd = desc.fields_by_name.get(name) if desc is not None else None
            path = f"{prefix}.{name}" if prefix else name
            if fd is None and desc is not None:
                out.append(UnknownField(entry, index, path, line))
            tok.TryConsume(":")
            values_in_list = tok.TryConsume("[")
            while True:
                if values_in_list and tok.TryConsume("]"):
                    break
                if top and name in _LAYER_ENTRIES:
                    value(desc, fd, name, counts[name], "")
                    counts[name] += 1
                else:
                    value(desc, fd, entry, index, path if not (top and fd is not None) else "")
                if not values_in_list:
                    break
                tok.TryConsume(",")
            if not tok.TryConsume(";"):
                tok.TryConsume(",")

    try:
        block(NetParameter.DESCRIPTOR, None, None, "", None)
    except RecursionError:
        raise ProtoError(f"messages are nested too deeply (more than about {sys.getrecursionlimit()} "
                         "levels; a real net needs a handful)") from None
    except text_format.ParseError as e:
        raise ProtoError(str(e)) from None
    return out


def parse_prototxt_checked(text: str):
    """``(net, unknown)``: the :class:`NetParameter` and :func:`scan_unknown_fields`'s list.

    When the text cannot be walked but protobuf can parse it (a bug of the walker), the strict
    parser is used, so an unknown field is never dropped: it becomes a :class:`ProtoError`."""
    try:
        unknown = scan_unknown_fields(text)
    except Exception:  # noqa: BLE001 - whatever stops the walker, the strict parser below decides
        unknown = None
    net = parse_prototxt(text)
    if unknown is None:
        strict = NetParameter()
        try:
            text_format.Parse(text, strict)
        except text_format.ParseError as e:
            raise ProtoError(str(e)) from None
        except RecursionError:  # pragma: no cover - parse_prototxt raised it already
            raise ProtoError("messages are nested too deeply") from None
        unknown = []
    return net, unknown


def unknown_field_numbers(msg) -> list[int]:
    """Field numbers that protobuf kept aside as unknown while parsing ``msg`` (binary input)."""
    try:
        from google.protobuf import unknown_fields as _uf
        return sorted({f.field_number for f in _uf.UnknownFieldSet(msg)})
    except ImportError:  # pragma: no cover - protobuf < 4.23
        return sorted({num for num, _ in msg.UnknownFields()}) if hasattr(msg, "UnknownFields") else []


def parse_binary_net(data: bytes):
    """A :class:`NetParameter` from the bytes of a ``.caffemodel``."""
    net = NetParameter()
    try:
        net.ParseFromString(data)
    except (_message.DecodeError, RecursionError, ValueError) as e:
        raise ProtoError(str(e) or type(e).__name__) from None
    return net


def parse_binary_blob(data: bytes):
    """A :class:`BlobProto` from the bytes of a ``.binaryproto`` (e.g. Caffe's mean file)."""
    blob = BlobProto()
    try:
        blob.ParseFromString(data)
    except (_message.DecodeError, RecursionError, ValueError) as e:
        raise ProtoError(str(e) or type(e).__name__) from None
    return blob
