"""Caffe -> ONNX converter that needs no Caffe: ``convert(prototxt, caffemodel, ...)``.

See ``docs/caffe.md`` for the supported layers, the preprocessing metadata and the decisions taken.
"""
from lrponnx.converters.caffe.convert import (PREPROCESSING_KEY, SUPPORTED_TYPES, WEIGHTS_KEY, CaffeConversionWarning, CaffeLayerError,
                      convert, load_caffemodel, load_prototxt, random_caffemodel)

__all__ = ["convert", "CaffeConversionWarning", "CaffeLayerError", "PREPROCESSING_KEY", "WEIGHTS_KEY",
           "SUPPORTED_TYPES", "load_caffemodel", "load_prototxt", "random_caffemodel"]
