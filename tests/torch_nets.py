"""Small PyTorch test networks shared by the Zennit parity tests (and handy for benchmarks).

Every net takes ``[N, 3, H, W]`` images (H, W divisible by 8; 32 is the default), starts with
one ``conv0`` (the MLP: ``fc.0``) that reads the input (Zennit's "first layer" = the first Linear/Conv module in
module order, lrponnx's = each linear layer reached from an input without another linear layer:
here both are ``conv0``), and ends in ``nn.Linear`` logits.

- :class:`VGGBN`: conv-BN-ReLU blocks, max pools, a BatchNorm that does *not* follow a linear
  layer (after a max pool: Zennit's and lrponnx's ``pass``), and a Linear-BN1d-ReLU-Linear
  classifier.
- :class:`ResNetSmall`: a ResNet-style net with residual Adds (identity and 1x1-conv
  shortcuts), BN after every conv, global average pooling.
- :class:`InceptionSmall`: inception blocks (1x1, 1x1-3x3, 1x1-3x3-3x3 and AvgPool-1x1
  branches joined by Concat), a ceil-mode max pool, global average pooling.
- :class:`MixedOps`: strided, dilated depthwise, transposed (with BN) and stride-3 convolutions,
  a ceil-mode AvgPool without padding counted.
- :class:`MLP`: Linear layers only (the first layer is a Linear, named ``fc.0``).

Conv/Linear layers are followed by BatchNorm *inside the same* ``nn.Sequential`` (module order =
forward order), so Zennit's ``SequentialMergeBatchNorm`` merges exactly the pairs that ONNX
export / lrponnx fold. Activations are separate, non-inplace module instances (Zennit hooks
them one call each).

Residual Adds: :class:`Residual` computes ``a + b`` (what the ONNX export sees) by default; after
:func:`use_zennit_sum` it computes ``zennit.layer.Sum`` over ``torch.stack([a, b], -1)`` (the
same numbers, but a module Zennit can give its ``Norm`` rule). Same module, same weights.
"""
from __future__ import annotations

import functools
import io
import warnings

import torch
from torch import nn

__all__ = ["VGGBN", "ResNetSmall", "InceptionSmall", "NETS", "make_net", "randomize_batchnorm",
           "use_zennit_sum", "exact_merge_batchnorm", "export_onnx"]


class Residual(nn.Module):
    """``a + b``; with ``zennit_sum`` set, ``Sum(stack([a, b], -1))`` (Zennit's Norm applies)."""

    def __init__(self):
        super().__init__()
        self.zennit_sum = False
        self.sum = None  # created lazily so plain use needs no zennit

    def forward(self, a, b):
        if self.zennit_sum:
            return self.sum(torch.stack([a, b], dim=-1))
        return a + b


def use_zennit_sum(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every :class:`Residual` of ``model`` to ``zennit.layer.Sum`` (or back)."""
    for m in model.modules():
        if isinstance(m, Residual):
            if on and m.sum is None:
                from zennit.layer import Sum

                m.sum = Sum()
            m.zennit_sum = on
    return model


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv/ConvTranspose (``out_channels``) or Linear (``out_features``) layer:
    a transposed convolution's weight is [in, out / groups, ...], so not ``weight.shape[0]``."""
    return getattr(layer, "out_channels", None) or layer.out_features


@functools.cache
def exact_merge_batchnorm() -> type:
    """Zennit's ``SequentialMergeBatchNorm`` canonizer class, made exact, for the parity checks
    (tests/test_zennit_parity.py, bench/coverage.py). Zennit is imported only when asked for.

    - After merging, Zennit 0.5.1 sets the BN to ``mean 0, var 1, weight 1, bias 0`` but keeps its
      ``eps``, so it computes ``x / sqrt(1 + eps)`` (1 - 5e-6 for the default eps) instead of ``x``.
      Setting ``eps = 0`` while merged (restored by ``remove``) makes the canonized model equal to
      the model, which is what lrponnx folds and explains.
    - Zennit pairs every linear leaf with a BatchNorm leaf that follows it in module order; this one
      only where the BatchNorm has the linear layer's output channels. DenseNet's leaf order puts a
      layer's conv2 (32 channels) right before the next layer's norm1 (which reads the
      concatenation), which Zennit would merge. Where the channels match it pairs as Zennit does.
    """
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.core import collect_leaves

    class ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
        def register(self, linears, batch_norm):
            self.saved_eps = batch_norm.eps
            super().register(linears, batch_norm)
            batch_norm.eps = 0.0

        def remove(self):
            super().remove()
            self.batch_norm.eps = self.saved_eps

        def copy(self):
            return self.__class__()

        def apply(self, root_module):
            instances, last = [], None
            for leaf in collect_leaves(root_module):
                if isinstance(last, self.linear_type) and isinstance(leaf, self.batch_norm_type) \
                        and _out_channels(last) == leaf.num_features:
                    instance = self.copy()
                    instance.register((last,), leaf)
                    instances.append(instance)
                last = leaf
            return instances

    return ExactSequentialMergeBatchNorm


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None, relu: bool = True,
            bias: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VGGBN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, size: int = 32):
        super().__init__()
        w = width
        self.conv0 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=True), nn.BatchNorm2d(w), nn.ReLU())
        self.features = nn.Sequential(
            conv_bn(w, w, bias=True),
            nn.MaxPool2d(2),                                   # /2
            conv_bn(w, 2 * w),
            nn.MaxPool2d(3, stride=2, padding=1),              # /4, overlapping windows
            nn.BatchNorm2d(2 * w),                             # BN not after a linear layer: pass
            conv_bn(2 * w, 2 * w, bias=True),
            conv_bn(2 * w, 4 * w, k=5, padding=2),
            nn.MaxPool2d(2),                                   # /8
        )
        s = size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * s * s, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, 24), nn.ReLU(),
            nn.Linear(24, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.conv0(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(cin, cout, stride=stride), conv_bn(cout, cout, relu=False))
        self.shortcut = (conv_bn(cin, cout, k=1, stride=stride, relu=False)
                         if stride != 1 or cin != cout else None)
        self.add = Residual()
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.add(self.branch(x), identity))


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, size: int = 32):
        super().__init__()
        w = width
        self.conv0 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, stride=2), BasicBlock(2 * w, 2 * w))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.pool(self.conv0(x))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.gap(x)))


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int,
                 count_include_pad: bool = True):
        super().__init__()
        self.b1 = conv_bn(cin, c1, k=1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r, k=1), conv_bn(c3r, c3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r, k=1), conv_bn(c5r, c5), conv_bn(c5, c5))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad),
                                conv_bn(cin, cp, k=1, bias=True))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class InceptionSmall(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, size: int = 32):
        super().__init__()
        w = width
        self.conv0 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=True), nn.BatchNorm2d(w), nn.ReLU())
        self.pool0 = nn.MaxPool2d(3, stride=2, ceil_mode=True)            # 32 -> 16 (ceil)
        self.inc1 = InceptionBlock(w, w, w, 2 * w, w // 2, w, w // 2)     # -> 4.5 w channels
        c1 = w + 2 * w + w + w // 2
        self.pool1 = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(c1, 2 * w, w, 2 * w, w // 2, w, w, count_include_pad=False)
        c2 = 2 * w + 2 * w + w + w
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = self.pool0(self.conv0(x))
        x = self.inc2(self.pool1(self.inc1(x)))
        return self.fc(self.flatten(self.gap(x)))


class MixedOps(nn.Module):
    """Less common layer shapes: a strided first conv, a dilated depthwise conv, a ConvTranspose
    with BatchNorm, a stride-3 conv with a kernel that does not tile the input, and a ceil-mode
    AvgPool with ``count_include_pad=False`` before the classifier."""

    def __init__(self, num_classes: int = 10, width: int = 8, size: int = 32):
        super().__init__()
        w = width
        self.conv0 = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(w, w, 3, padding=2, dilation=2, groups=w), nn.BatchNorm2d(w),
                                       nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(w, 6, 3, stride=2, padding=1, output_padding=1),
                                nn.BatchNorm2d(6), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(6, 12, 4, stride=3, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False)
        with torch.no_grad():
            n = self.features(torch.zeros(1, 3, size, size)).numel()
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(n, 20), nn.ReLU(), nn.Linear(20, num_classes))

    def features(self, x):
        return self.pool(self.down(self.up(self.depthwise(self.conv0(x)))))

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class MLP(nn.Module):
    """Dense only: the first layer is a Linear (flat in the *-flat composites; epsilon-gamma-box,
    whose zbox is for convolutions only, gives it epsilon)."""

    def __init__(self, num_classes: int = 10, width: int = 8, size: int = 32):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(3 * size * size, 5 * width), nn.BatchNorm1d(5 * width), nn.ReLU(),
                                nn.Linear(5 * width, 3 * width), nn.ReLU(), nn.Linear(3 * width, num_classes))

    def forward(self, x):
        return self.fc(self.flatten(x))


NETS = {"vgg_bn": VGGBN, "resnet": ResNetSmall, "inception": InceptionSmall, "mixed": MixedOps, "mlp": MLP}


def randomize_batchnorm(model: nn.Module, generator: torch.Generator, size: int = 32,
                        calibrate: int = 64) -> nn.Module:
    """Random BatchNorm affine parameters, then running statistics measured on ``calibrate``
    random images (so activations stay O(1) through the depth and the logits depend on the
    input, as in a trained net), then jittered so no BN is exactly a standardisation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=generator))
            m.bias.copy_(0.2 * torch.randn(n, generator=generator))
        if calibrate:
            was_training = model.training
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch gives exactly its statistics
            model.train()
            model(torch.randn(calibrate, 3, size, size, generator=generator))
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            model.train(was_training)
        for m in bns:
            n = m.num_features
            m.running_mean.add_(0.1 * torch.randn(n, generator=generator) * m.running_var.sqrt())
            m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=generator))
    return model


def make_net(name: str, seed: int = 0, num_classes: int = 10, width: int = 8, size: int = 32) -> nn.Module:
    """A net from :data:`NETS` with random weights (fixed ``seed``) and random, calibrated BN, in eval mode."""
    torch.manual_seed(seed)
    model = NETS[name](num_classes=num_classes, width=width, size=size)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1), size=size)
    return model.eval()


def export_onnx(model: nn.Module, size: int = 32, path=None, opset: int = 17) -> bytes:
    """Export with the TorchScript exporter (``dynamo=False``), eval mode, dynamic batch.

    Returns the serialized model (and writes it to ``path`` if given)."""
    model = model.eval()
    use_zennit_sum(model, False)
    dummy = torch.zeros(2, 3, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data
