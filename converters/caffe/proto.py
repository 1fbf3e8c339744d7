"""The subset of Caffe's ``caffe.proto`` that the converter reads, built in code (no protoc, no caffe).

Only the messages and fields we use are declared, each with Caffe's real field number, type and
default (from BVLC ``src/caffe/proto/caffe.proto``). Everything else is left out on purpose:

* binary ``.caffemodel``: protobuf keeps fields it does not know as unknown fields, silently;
* text ``.prototxt``: :func:`parse_prototxt` passes ``allow_unknown_field`` so ``engine: CUDNN``,
  ``weight_filler {...}``, ``param {...}`` and the like are skipped.

The descriptor lives in a private :class:`DescriptorPool`, so it never clashes with a real
``caffe_pb2`` that happens to be imported in the same process. Works with protobuf >= 4.
"""
from __future__ import annotations

import sys

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
    "NetParameter": [
        ("name", 1, "string", "o", None),
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
        ("global_pooling", 12, "bool", "o", "false"),
        ("round_mode", 13, "PoolingParameter.RoundMode", "o", "CEIL"),
    ],
    "LRNParameter": [
        ("local_size", 1, "uint32", "o", "5"),
        ("alpha", 2, "float", "o", "1"),
        ("beta", 3, "float", "o", "0.75"),
        ("norm_region", 4, "LRNParameter.NormRegion", "o", "ACROSS_CHANNELS"),
        ("k", 5, "float", "o", "1"),
    ],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", "o", None),
        ("bias_term", 2, "bool", "o", "true"),
        ("axis", 5, "int32", "o", "1"),
        ("transpose", 6, "bool", "o", "false"),
    ],
    "ReLUParameter": [("negative_slope", 1, "float", "o", "0")],
    "ELUParameter": [("alpha", 1, "float", "o", "1")],
    "PReLUParameter": [("channel_shared", 2, "bool", "o", "false")],
    "SigmoidParameter": [],
    "TanHParameter": [],
    "DropoutParameter": [
        ("dropout_ratio", 1, "float", "o", "0.5"),
        ("scale_train", 2, "bool", "o", "true"),
    ],
    "SoftmaxParameter": [("axis", 2, "int32", "o", "1")],
    "ConcatParameter": [
        ("axis", 2, "int32", "o", "1"),
        ("concat_dim", 1, "uint32", "o", "1"),
    ],
    "EltwiseParameter": [
        ("operation", 1, "EltwiseParameter.EltwiseOp", "o", "SUM"),
        ("coeff", 2, "float", "r", None),
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
        ("bias_term", 4, "bool", "o", "false"),
    ],
    "BiasParameter": [
        ("axis", 1, "int32", "o", "1"),
        ("num_axes", 2, "int32", "o", "1"),
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
        ("blobs", 7, "BlobProto", "r", None),
        ("include", 8, "NetStateRule", "r", None),
        ("exclude", 9, "NetStateRule", "r", None),
        ("batch_norm_param", 139, "BatchNormParameter", "o", None),
        ("bias_param", 141, "BiasParameter", "o", None),
        ("concat_param", 104, "ConcatParameter", "o", None),
        ("convolution_param", 106, "ConvolutionParameter", "o", None),
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
    """A :class:`NetParameter` from prototxt text; unknown fields and extensions are skipped."""
    net = NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_extension=True, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ProtoError(str(e)) from None
    except RecursionError:  # protobuf's text parser recurses once per nested message
        raise ProtoError(f"messages are nested too deeply (more than about {sys.getrecursionlimit()} "
                         "levels; a real net needs a handful)") from None
    return net


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
