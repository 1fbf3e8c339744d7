"""Every ``lrponnx.*`` metadata key an ONNX file written or read by lrponnx may carry, in one place.

Explainers (written by :func:`lrponnx.compiler.emit.convert`) and models (written by the Caffe
converter and the model zoo) record what a reader needs in ``metadata_props``; readers (the
runtime, the apps, the web viewer, the benchmarks) use these names instead of string literals.
"""
from __future__ import annotations

#: The explainer's input contract. "2": ``target`` is an ordinary required int64 input of shape
#: [N] (N = the first input's batch dimension), -1 = explain the argmax. Before "2" (no
#: ``lrponnx.format`` key) ``target`` was an optional input with a [-1] initializer, which
#: onnxruntime-node ignores and onnxruntime-web rejects; :mod:`lrponnx.app.runtime` upgrades those.
FORMAT = "2"
#: The name of the explainer's class-index input (recorded under :data:`TARGET_INPUT_KEY`).
TARGET_INPUT = "target"

# -- written by the compiler on every explainer ---------------------------------------------------
VERSION_KEY = "lrponnx.version"                    # the lrponnx that wrote it (marks a file as an explainer)
FORMAT_KEY = "lrponnx.format"                      # FORMAT above
COMPOSITE_KEY = "lrponnx.composite"                # the composite's name
SEED_KEY = "lrponnx.seed"                          # "logit" or "one"
LOGITS_KEY = "lrponnx.logits"                      # the tensor explained (the class scores)
OUTPUT_KEY = "lrponnx.output"                      # the graph output explained (logits or its Softmax)
TARGET_INPUT_KEY = "lrponnx.target_input"          # the class-index input's name
CLASS_COUNT_KEY = "lrponnx.class_count"            # K of the [N, K] scores
RELEVANCE_OUTPUTS_KEY = "lrponnx.relevance_outputs"  # JSON {model input: relevance output}
RULES_KEY = "lrponnx.rules"                        # JSON {unit name: rule}
FORWARD_RECOMPUTED_KEY = "lrponnx.forward_recomputed"  # JSON [forward tensors made by other ops]
TARGET_RUNTIME_KEY = "lrponnx.target_runtime"      # "any" or "webgpu"
CHECK_KEY = "lrponnx.check"                        # set when only onnx's structural check could pass

# -- written on models (Caffe converter, model zoo), copied into their explainers ------------------
PREPROCESSING_KEY = "lrponnx.preprocessing"        # JSON: how an image becomes the model's input
CLASSES_KEY = "lrponnx.classes"                    # JSON [class names]
WEIGHTS_KEY = "lrponnx.weights"                    # where the weights came from (Caffe converter)
SOURCE_KEY = "lrponnx.source"                      # the file converted (Caffe converter)
ZOO_KEY = "lrponnx.zoo"                            # the model-zoo entry that built it
PATCH_SIZE_KEY = "lrponnx.patch_size"              # a ViT's patch size (the token view)
ZOO_TRAINING_KEY = "lrponnx.zoo.training"          # JSON: how a zoo recipe trained it (seed, epochs, ...)

ALL_KEYS = (VERSION_KEY, FORMAT_KEY, COMPOSITE_KEY, SEED_KEY, LOGITS_KEY, OUTPUT_KEY, TARGET_INPUT_KEY,
            CLASS_COUNT_KEY, RELEVANCE_OUTPUTS_KEY, RULES_KEY, FORWARD_RECOMPUTED_KEY, TARGET_RUNTIME_KEY,
            CHECK_KEY, PREPROCESSING_KEY, CLASSES_KEY, WEIGHTS_KEY, SOURCE_KEY, ZOO_KEY, PATCH_SIZE_KEY,
            ZOO_TRAINING_KEY)
