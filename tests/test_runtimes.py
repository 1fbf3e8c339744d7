"""Every zoo explainer in every runtime: Node (onnxruntime-node), headless Chromium with
onnxruntime-web's wasm provider, and WebGPU on Chromium's software (SwiftShader) adapter.

Relevance must equal Python ONNX Runtime's within 1e-5 relative L2 per sample, or within twice
Python ORT's own spread across its optimisation levels (measured here, printed). Each case feeds
a target that is not the argmax for any of its first samples and -1 for the rest (the default).
Skips with the reason when node, tests/js/node_modules or chromium are absent; `.ci/run` installs
them. The harness is tests/js (see its README) driven through tests/js_harness.py.
"""
from __future__ import annotations

import os

import pytest

from conftest import shared_data_path
from js_harness import missing, run
from runtime_cases import CASES, build_case, has_target_runtime, model_path, rel_l2

RUNTIMES = ("node", "wasm", "webgpu")
# GoogLeNet on SwiftShader's WebGPU takes 2.5 to 3.5 minutes a case on a 2-core machine (measured:
# docs/runtimes.md); it runs with LRPONNX_RUNTIMES_FULL=1 (bench/runtimes.py runs it too).
FULL = os.environ.get("LRPONNX_RUNTIMES_FULL") == "1"
SLOW_WEBGPU = {"bvlc-googlenet"}

# WebGPU cases whose graph forms onnxruntime-web's WebGPU provider does not run yet, with the
# provider's error (part B of issue 15 makes them runnable and removes the entries). An error
# other than the one listed fails the test; a listed case that runs is checked like the others.
_INDICES = "The Indices output is not supported yet"  # MaxPool's winner-take-all without --target-runtime webgpu
WEBGPU_PENDING: dict[tuple[str, str], str] = {case: _INDICES for case in CASES}


@pytest.fixture(scope="module")
def case_for(tmp_path_factory):
    """Build each explainer (and its Python reference) once per module."""
    zoo = tmp_path_factory.mktemp("zoo")
    built = {}

    def get(model: str, composite: str, target_runtime: str = "any"):
        key = (model, composite, target_runtime)
        if key not in built:
            src = model_path(model, zoo, shared_data_path)
            built[key] = build_case(model, composite, src, zoo, target_runtime)
        return built[key]

    return get


@pytest.mark.parametrize("model, composite", CASES)
def test_fed_target_changes_the_relevance(model, composite, case_for):
    """The cases can catch an ignored target: in Python the fed (non-argmax) target's relevance
    differs from the argmax's, and the logits say the fed class is not the argmax."""
    case = case_for(model, composite)
    n = len(case.feeds["target"]) // 2
    logits = case.reference[next(iter(case.reference))].reshape(2 * n, -1)
    fed = case.feeds["target"][:n]
    assert (fed != logits[:n].argmax(1)).all() and (case.feeds["target"][n:] == -1).all()
    R = case.reference["relevance"]
    assert rel_l2(R[:n], R[n:]) > 0.05


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("model, composite", CASES)
def test_runtime_matches_python(model, composite, runtime, case_for):
    why = missing(runtime)
    if why:
        pytest.skip(why)
    if runtime == "webgpu" and model in SLOW_WEBGPU and not FULL:
        pytest.skip(f"{model} on the software WebGPU adapter takes minutes a case: LRPONNX_RUNTIMES_FULL=1 runs it")
    target_runtime = "webgpu" if runtime == "webgpu" and has_target_runtime() else "any"
    case = case_for(model, composite, target_runtime)
    res = run(runtime, case.path, case.feeds, timeout=240)
    if res.error:
        pending = WEBGPU_PENDING.get((model, composite)) if runtime == "webgpu" else None
        if pending is not None and pending in res.error:
            pytest.xfail(f"{runtime}: {res.error}")
        pytest.fail(f"{runtime} ({model}, {composite}, forms for {target_runtime}): {res.error}")
    err = rel_l2(res.outputs["relevance"], case.reference["relevance"])
    out = next(iter(case.reference))
    logit_err = rel_l2(res.outputs[out], case.reference[out])
    print(f"\n{runtime:6s} {model:18s} {composite:32s} forms={target_runtime}: relevance rel. L2 {err:.2e} "
          f"(tolerance {case.tolerance:.1e}; Python ORT spread {case.spread:.2e}), output rel. L2 {logit_err:.1e}, "
          f"{res.ms:.0f} ms (first run, batch {len(case.feeds['target'])})")
    assert err <= case.tolerance, (f"{runtime}: relevance differs from Python ORT by {err:.3e} "
                                   f"(tolerance {case.tolerance:.1e}, spread {case.spread:.2e})")
