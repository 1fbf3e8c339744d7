"""Build the VGG16-sized convert benchmark model once: torchvision's VGG16 with random weights
(seed 0, ~138 M parameters) exported to ONNX with its weights in an external data file.

    python bench/make_vgg16.py [OUT_DIR]     # default bench/_work/vgg16 -> vgg16.onnx + vgg16.onnx.data

Input ``input`` [N, 3, 224, 224] in torchvision's normalised units; the zbox bounds for
``epsilon-gamma-box`` are ((0 - mean) / std, (1 - mean) / std) per channel: see ``BOUNDS``.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BOUNDS = ([(0.0 - m) / s for m, s in zip(MEAN, STD)], [(1.0 - m) / s for m, s in zip(MEAN, STD)])
DEFAULT_DIR = Path(__file__).resolve().parent / "_work" / "vgg16"


def build(out_dir: Path = DEFAULT_DIR) -> Path:
    import onnx
    import torch
    import torchvision

    out_dir = Path(out_dir)
    out = out_dir / "vgg16.onnx"
    if out.exists() and (out_dir / "vgg16.onnx.data").exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    del model
    m = onnx.load_from_string(buf.getvalue())
    del buf
    tmp = out_dir / ".vgg16.onnx.tmp"
    onnx.save_model(m, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vgg16.onnx.data", size_threshold=1024)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
