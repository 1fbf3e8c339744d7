"""The Caffe layer types the converter knows, one declaration each (see :mod:`.registry`).

Importing this package registers every built-in layer; a new layer type is one declaration in
one of these modules (or in a module of your own that you import)."""
from lrponnx.converters.caffe.layers import activation, conv, normalization, pooling, structure  # noqa: F401
from lrponnx.converters.caffe.layers.registry import (LAYERS, CaffeLayer, caffe_layer, register, supported_types,
                                                      unregister)

__all__ = ["LAYERS", "CaffeLayer", "caffe_layer", "register", "supported_types", "unregister"]
