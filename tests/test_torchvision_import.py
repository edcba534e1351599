"""torchvision imported without TorchDynamo: the model still builds and detects, and TorchDynamo
is still there, real, for whoever asks for it afterwards. Each check runs in a fresh interpreter,
since an import can only be observed once per process."""

from __future__ import annotations

import pytest
import ray
from fresh import run_fresh

from detectflow import workarounds


@ray.remote(num_cpus=1)
class _Probe:
    def run(self, weights: str, image: str) -> dict:
        import sys

        import torch

        from detectflow import imaging
        from detectflow.predictor import Detector

        detector = Detector("fasterrcnn_mobilenet_v3_large_320_fpn", weights, 0.5, "run",
                            device="cpu")
        pixels = torch.from_numpy(imaging.decode(open(image, "rb").read()))
        found = detector.predict([pixels])[0]
        dynamo_loaded = "torch._dynamo" in sys.modules
        roi = sys.modules["torchvision.ops.roi_align"]
        deferred = roi.is_compile_supported("cpu")  # loads the real function on first call
        import torch._dynamo.utils as real_utils

        compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2))
        return {
            "dynamo_loaded": dynamo_loaded, "boxes": len(found["boxes"]),
            "deferred": deferred, "real": real_utils.is_compile_supported("cpu"),
            "real_file": bool(getattr(real_utils, "__file__", None)),
            "dynamo_file": bool(getattr(sys.modules["torch._dynamo"], "__file__", None)),
            "compiled": compiled.tolist(),
        }


def test_an_actor_detects_without_loading_dynamo_which_stays_importable(ray_local, small_weights,
                                                                          sample_dir):
    """Through Ray's setup hook in the actor's runtime env, as the detect stage starts its
    actors: a new worker of its own, whatever the session's Ray already imported elsewhere."""
    image = sorted(sample_dir.glob("*.jpg"))[0]
    env = workarounds.actor_runtime_env()
    probe = _Probe.options(runtime_env=env).remote()
    out = {**ray.get(probe.run.remote(str(small_weights), str(image)), timeout=240), "env": env}
    ray.kill(probe)
    assert list(out["env"]["env_vars"].values()) == [
        "detectflow.workarounds.torchvision_import.preload"]
    assert out["dynamo_loaded"] is False
    assert out["boxes"] > 0  # the bundled photos all hold COCO objects the weights find
    assert out["deferred"] == out["real"]
    assert out["real_file"] and out["dynamo_file"]  # the real modules, not placeholders
    assert out["compiled"] == [3.0, 3.0]


@pytest.mark.parametrize("reach", ["holder.disable", "import torch._dynamo.eval_frame"])
def test_reaching_past_a_placeholder_loads_the_real_module(reach):
    """A name read from it, or a submodule imported under it (the import system then reads the
    package's ``__path__``)."""
    out = run_fresh(f"""
        import json, sys
        import torch
        from detectflow.workarounds.torchvision_import import _Placeholder
        holder = _Placeholder("torch._dynamo", True)
        sys.modules["torch._dynamo"] = holder
        {reach}
        real = sys.modules["torch._dynamo"]
        print(json.dumps({{"replaced": real is not holder,
                          "real": bool(getattr(real, "__file__", None)),
                          "disable": callable(getattr(real, "disable", None))}}))
    """)
    assert out == {"replaced": True, "real": True, "disable": True}


@pytest.mark.parametrize("first", ["import torch._dynamo", "import torchvision"])
def test_an_earlier_plain_import_is_kept(first):
    out = run_fresh(f"""
        import json, sys
        {first}
        before = sys.modules.get("torch._dynamo")
        from detectflow.workarounds.torchvision_import import import_torchvision
        import_torchvision()
        print(json.dumps({{"kept": sys.modules.get("torch._dynamo") is before,
                          "tv": "torchvision" in sys.modules}}))
    """)
    assert out == {"kept": True, "tv": True}


def test_detectflow_run_finds_default_weights_without_loading_dynamo(tmp_path):
    """The CLI resolves default weights through torchvision's registry, imported the fast way;
    here the weights are missing, so the run ends at that check."""
    out = run_fresh(f"""
        import json, sys
        from detectflow import cli
        code = cli.main(["run", "--output", {str(tmp_path / "out")!r}])
        print(json.dumps({{"code": code, "tv": "torchvision.models" in sys.modules,
                          "dynamo": "torch._dynamo" in sys.modules}}))
    """, PREFECT_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"),
        https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    assert out == {"code": 2, "tv": True, "dynamo": False}


def test_the_weights_check_reads_a_factorys_weights_without_loading_dynamo():
    """The check's own process (``python -m detectflow.weightcheck``) builds the model too."""
    out = run_fresh("""
        import io, json, sys
        from contextlib import redirect_stdout
        from detectflow import weightcheck
        printed = io.StringIO()
        with redirect_stdout(printed):
            code = weightcheck.main(["examples.shapes.model:tiny_fasterrcnn",
                                     "examples/shapes/shapes_detector.pth", "local"])
        print(json.dumps({"code": code, "found": json.loads(printed.getvalue()),
                          "dynamo": "torch._dynamo" in sys.modules}))
    """)
    assert out["code"] == 0 and out["found"]["num_classes"] > 1
    assert out["dynamo"] is False
