"""torchvision classifiers from both PyTorch exporters (the CI subset of ``bench/coverage.py``).

resnet18 (residual Adds; the dynamo export's global average pool is a ReduceMean), mobilenet_v2
(ReLU6 = Clip, depthwise convs, residual Adds, ReduceMean), squeezenet1_1 (Fire Concats, a conv class
map averaged to [N, K]) and efficientnet_b0 (SiLU, squeeze-excitation gates) at 64x64, random
weights, exported with ``dynamo=False`` and with the dynamo default into a temporary folder. Each
must convert with the default composite, its explainer must give ONNX Runtime's outputs of the plain
model and finite relevance, and, where Zennit 0.5.1 applies the same rules (canonizers: exact
BatchNorm merge, ``Sum`` for residual adds, module global pools: ``bench/coverage.py``), the relevance
must equal Zennit's within 1e-4 relative L2 per sample. efficientnet_b0's gates are not something
Zennit explains the same way (it takes the gradient through the product), so there the check is
that every gate product gets ``signal-takes-all`` with the signal on the main path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("zennit")
pytest.importorskip("onnxscript")  # the dynamo exporter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import coverage  # noqa: E402

import lrponnx  # noqa: E402

SIZE = 64
ARCHS = ("resnet18", "mobilenet_v2", "squeezenet1_1", "efficientnet_b0")
EXPORTERS = ("torchscript", "dynamo")
PARITY = {"resnet18", "mobilenet_v2", "squeezenet1_1"}


@pytest.fixture(scope="module", autouse=True)
def _work(tmp_path_factory):
    """Exports go to a temporary folder (not bench/_work's cache); torch on one thread."""
    before_work, before_threads = coverage.WORK, torch.get_num_threads()
    coverage.WORK = tmp_path_factory.mktemp("coverage")
    torch.set_num_threads(1)
    yield
    coverage.WORK = before_work
    torch.set_num_threads(before_threads)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_converts_and_matches(arch, exporter):
    row = coverage.evaluate(arch, exporter, size=SIZE, timing=False, threads=1, parity=arch in PARITY)
    assert row["status"] == "converts", row
    assert row["out_err"] <= 1e-5, row
    assert row["finite"], row
    if arch in PARITY:
        assert row["zennit_out_err"] <= 1e-5, row  # the canonized torch model is the model
        assert isinstance(row["parity"], float) and row["parity"] <= 1e-4, row


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_efficientnet_gates_are_signal_takes_all(exporter):
    path, _ = coverage.export("efficientnet_b0", exporter, SIZE)
    plan = lrponnx.plan(str(path))
    assert not plan.offenders
    products = [u for u in plan.units if u.op_type == "Mul" and len(u.inputs) == 2]
    # 16 SE blocks; SiLU is one op (dynamo) or x * Sigmoid(x) (TorchScript), a gate product too
    assert len([u for u in products if any("Sigmoid" in n for n in u.notes)]) >= 16
    assert all(u.rule.name == "signal-takes-all" for u in products)
    # products inside an SE branch (SiLU written as x * Sigmoid(x)) get no relevance: no decision noted
    for u in [u for u in products if u.notes]:  # the signal is never the gate's own output
        note = " ".join(u.notes)
        signal = note.split("signal ", 2)[2].split(",")[0].strip("'")
        gate = note.split("gate ", 1)[1].split(" ")[0].strip("'")
        assert signal != gate and signal in u.inputs and gate in u.inputs
    ex = lrponnx.convert(str(path))
    rules = json.loads({p.key: p.value for p in ex.metadata_props}["lrponnx.rules"])
    assert "signal-takes-all" in rules.values()
