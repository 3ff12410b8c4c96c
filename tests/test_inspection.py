"""``gptq-ascend inspect``: the backend per real layer shape, against the shapes GPTQModel recorded."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from gptq_ascend import ops
from gptq_ascend.inspection import inspect_checkpoint

from .conftest import fixture_info, gptq_fixture_dirs

needs_fixtures = pytest.mark.skipif(not gptq_fixture_dirs(), reason="no GPTQ fixtures under tests/fixtures")


@needs_fixtures
def test_layer_shapes_are_the_checkpoints_own(gptq_fixture):
    # GPTQModel's own record of the modules it quantized (in_features / out_features per module).
    recorded = Counter((m["in_features"], m["out_features"])
                       for m in fixture_info(gptq_fixture)["quantized_modules"].values())
    info = inspect_checkpoint(gptq_fixture)
    reported: Counter[tuple[int, int]] = Counter()
    for sh in info.layer_shapes:
        reported[(sh.in_features, sh.out_features)] += sh.layers
    assert reported == recorded
    assert sum(sh.layers for sh in info.layer_shapes) == info.quantized_layers


@needs_fixtures
def test_each_shape_names_the_backend_this_machine_would_use(gptq_fixture):
    cpu_here = ops.get_backend("cpu").available()[0]  # the C++ extension is built into this checkout
    info = inspect_checkpoint(gptq_fixture)
    for sh in info.layer_shapes:
        assert sh.cpu_backend == ("cpu" if cpu_here else "reference"), sh
        if importlib.util.find_spec("torch_npu") is None:
            assert sh.npu_backend is None
    text = info.text()
    for sh in info.layer_shapes:
        assert f"{sh.in_features:>6} -> {sh.out_features:<6} x{sh.layers:<4} CPU: " in text
    assert info.to_dict()["layer_shapes"][0]["cpu_backend"] == info.layer_shapes[0].cpu_backend
