"""Weights resolution and loading: the real torch/torchvision paths, offline."""

import os
import shutil

import pytest
import torch

from detectflow import models, weightcheck
from detectflow.config import REPO_ROOT as ROOT
from detectflow.errors import WeightsError
from detectflow.models import ResolvedWeights, load_model, resolve_weights

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # A closed local port as proxy: the download attempt fails at once, online or not.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    return tmp_path / "torch"


def test_unavailable_pretrained_weights_fail_with_one_actionable_line(empty_torch_home):
    with pytest.raises(WeightsError) as err:
        resolve_weights("fasterrcnn_resnet50_fpn_v2", None)
    message = str(err.value)
    assert "\n" not in message
    assert "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth" in message
    assert "--weights" in message and str(empty_torch_home / "hub" / "checkpoints") in message


def test_pretrained_weights_are_taken_from_the_torch_hub_cache(empty_torch_home, small_weights):
    target = models.hub_checkpoint_path(SMALL)
    target.parent.mkdir(parents=True)
    shutil.copy(small_weights, target)
    resolved = resolve_weights(SMALL, None)
    assert resolved.path == str(target)
    assert resolved.source == "torchvision:FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
    assert resolved.sha256 == models._sha256(str(small_weights))
    assert isinstance(load_model(SMALL, resolved, 0.5), torch.nn.Module)


def test_local_weights_file_is_hashed_and_loads(small_weights):
    resolved = resolve_weights(SMALL, str(small_weights))
    assert resolved.file_name == small_weights.name and len(resolved.sha256) == 64
    net = load_model(SMALL, resolved, 0.5)
    assert not net.training


@pytest.mark.parametrize("model", [SMALL, "fasterrcnn_resnet50_fpn_v2"])
def test_loaded_model_equals_a_randomly_built_one_given_the_same_weights(model, tmp_path):
    """load_model skips torchvision's random fill; every tensor must still come from the file."""
    torch.manual_seed(0)
    saved = models.build_model(model).state_dict()
    path = tmp_path / "w.pth"
    torch.save(saved, path)
    net = load_model(model, resolve_weights(model, str(path)), 0.05)
    probe = torch.nn.init.normal_(torch.zeros(1000))
    assert probe.abs().sum() > 0  # torch's fill functions are its own again
    plain = models.build_model(model)
    plain.load_state_dict(saved)
    ours = dict(net.named_parameters()) | dict(net.named_buffers())
    theirs = dict(plain.named_parameters()) | dict(plain.named_buffers())
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_missing_weights_file_names_model_and_path(tmp_path):
    with pytest.raises(WeightsError, match=f"{SMALL}: file not found: .*nope.pth"):
        resolve_weights(SMALL, str(tmp_path / "nope.pth"))


def test_weights_of_another_model_are_refused(tmp_path):
    other = tmp_path / "ssd.pth"
    torch.save(models.build_model("ssdlite320_mobilenet_v3_large").state_dict(), other)
    with pytest.raises(WeightsError, match="does not match the model") as err:
        load_model(SMALL, resolve_weights(SMALL, str(other)), 0.5)
    assert str(other) in str(err.value) and "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/detectflow-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, evil)
    with pytest.raises(WeightsError, match="need code to load .refused: weights_only=True"):
        load_model(SMALL, ResolvedWeights(str(evil), str(evil), "evil.pth", "0"), 0.5)
    assert not os.path.exists("/tmp/detectflow-pwned")


def test_category_table_is_each_supported_models_own():
    from typing import get_args

    from torchvision.models import get_model_weights

    from detectflow.config import ModelName

    for name in get_args(ModelName):
        assert models.categories(name) == get_model_weights(name).DEFAULT.meta["categories"]


def test_versions_are_read_with_their_build_tag_without_importing():
    import torchvision

    from detectflow.publish import installed_version

    assert installed_version("torch") == torch.__version__
    assert installed_version("torchvision") == torchvision.__version__


def test_the_flow_its_task_workers_and_decode_tasks_never_import_torch(sample_dir):
    """Only the inference actors need torch; the CLI, the flow, the Prefect task workers and the
    decode tasks do their work without it (seconds of CPU and hundreds of MiB per process)."""
    import subprocess
    import sys

    code = ("import sys, pyarrow as pa, detectflow.cli, flows.detect_objects, detectflow.pipeline,"
            " detectflow.preflight, detectflow.publish as p; p.versions(); "
            "from detectflow.predictor import decode_batch; "
            "from detectflow.models import categories; categories('ssd300_vgg16'); "
            f"t = decode_batch(pa.table({{'image_uri': [{str(sample_dir / 'chelsea.jpg')!r}], "
            "'index': [0], 'shard': [0]}), max_side=4000); assert t['error'][0].as_py() is None; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_weights_naming_a_folder_say_it_is_a_folder(tmp_path):
    with pytest.raises(WeightsError, match=f"{SMALL}: {tmp_path} is a folder; give the .pth"):
        resolve_weights(SMALL, str(tmp_path))


def _bad_weights(kind: str, folder, small_weights) -> str:
    path = folder / f"{kind}.pth"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "truncated":
        data = small_weights.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "other-architecture":
        torch.save(models.build_model("ssdlite320_mobilenet_v3_large").state_dict(), path)
    return str(path)


@pytest.mark.parametrize("kind, reason", [
    ("text", "is not a complete file saved by torch.save"),
    ("truncated", "is not a complete file saved by torch.save"),
    ("other-architecture", "does not match the model .* missing keys"),
])
def test_weights_check_refuses_what_cannot_load_into_the_model(kind, reason, tmp_path,
                                                              small_weights):
    path = _bad_weights(kind, tmp_path, small_weights)
    with pytest.raises(WeightsError, match=reason) as err:
        weightcheck.check(SMALL, path, path)
    assert "\n" not in str(err.value) and path in str(err.value)


def test_weights_check_runs_in_a_subprocess_and_passes_good_weights(tmp_path, small_weights):
    good = resolve_weights(SMALL, str(small_weights))
    weightcheck.start(SMALL, good).wait()  # no error
    bad = resolve_weights(SMALL, _bad_weights("truncated", tmp_path, small_weights))
    check = weightcheck.start(SMALL, bad)
    assert weightcheck.start(SMALL, bad) is check  # one check per file in a process
    with pytest.raises(WeightsError, match="is not a complete file saved by torch.save"):
        check.wait()


def test_weights_that_fitted_once_are_not_checked_again(tmp_path, monkeypatch, small_weights):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = resolve_weights(SMALL, str(small_weights))
    first = weightcheck.WeightsCheck(SMALL, good)
    assert first.found is None  # a subprocess checks it
    found = first.wait()
    assert found == {"num_classes": 91, "categories": None}
    stamp = weightcheck.stamp_path(SMALL, good.sha256)
    assert stamp.exists() and good.sha256 in stamp.name
    again = weightcheck.WeightsCheck(SMALL, good)
    assert not hasattr(again, "process")  # remembered, with what it read: no subprocess
    assert again.wait() == found


def test_weights_replaced_under_the_same_s3_uri_are_fetched_again(s3, small_weights, tmp_path,
                                                                  monkeypatch):
    """The local copy of remote weights is per version of the object: a model re-uploaded to
    the same key (a nightly fine-tune) is never read stale from the cache."""
    import s3fs

    from detectflow import storage

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    uri = "s3://detectflow-in/weights/replaced.pth"
    first = small_weights.read_bytes()
    second = first[:-1] + bytes([first[-1] ^ 1])  # the same size, other bytes
    storage.configure(s3)
    try:
        fs.pipe_file(uri, first)
        before = resolve_weights(SMALL, uri)
        assert before.sha256 == models._sha256(str(small_weights))
        fs.pipe_file(uri, second)
        after = resolve_weights(SMALL, uri)
        again = resolve_weights(SMALL, uri)
    finally:
        storage.configure(None)
    assert open(after.path, "rb").read() == second and after.sha256 != before.sha256
    assert again.path == after.path  # cached until the object changes
    assert not os.path.exists(before.path)  # the earlier copy is gone


def test_a_factorys_check_is_remembered_until_its_code_changes(tmp_path, monkeypatch):
    """A nightly run of one's own detector skips the check once it passed; an edit to the
    factory's package (same weights) is checked again."""
    package = tmp_path / "code" / "mydetector"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    source = (ROOT / "examples" / "shapes" / "model.py").read_text()
    (package / "model.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "code"))  # for the check's subprocess
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = "mydetector.model:tiny_fasterrcnn"
    weights = resolve_weights(model, str(ROOT / "examples" / "shapes" / "shapes_detector.pth"))
    first = weightcheck.WeightsCheck(model, weights)
    assert first.found is None and first.wait()["num_classes"] > 1  # checked in a subprocess
    again = weightcheck.WeightsCheck(model, weights)
    assert not hasattr(again, "process") and again.wait() == first.wait()  # remembered
    (package / "model.py").write_text(source + "\n# edited\n")
    edited = weightcheck.WeightsCheck(model, weights)
    assert edited.found is None and hasattr(edited, "process")  # checked again
    assert edited.wait() == first.wait()
