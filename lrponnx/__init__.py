"""lrponnx: compile an ONNX network into an explainer ONNX model that returns the prediction
and its Layer-wise Relevance Propagation heatmap, including the LRN rule of Binder et al. (2016)."""
from lrponnx.version import __version__  # noqa: E402

from lrponnx.errors import InvalidModelError, LrpOnnxError, RuleError, UnsupportedModelError  # noqa: E402

__all__ = ["convert", "plan", "Explainer", "Explanation", "LrpOnnxError", "InvalidModelError",
           "UnsupportedModelError", "RuleError", "__version__"]


def __getattr__(name):  # keep `import lrponnx` light: onnxruntime loads on first use
    if name in ("convert", "plan"):
        from lrponnx.compiler import emit
        return getattr(emit, name)
    if name in ("Explainer", "Explanation"):
        from lrponnx.app import runtime
        return getattr(runtime, name)
    raise AttributeError(name)
