"""Your own detector: the class count read from the checkpoint, class names, ``only`` and
``package.module:factory`` models, checked on real checkpoints before any Ray starts."""

import hashlib
import json
import sys

import pytest
import torch

from detectflow import classes, models, weightcheck
from detectflow.config import REPO_ROOT, RunConfig, fingerprint, parse_config
from detectflow.errors import ConfigError, WeightsError
from detectflow.preflight import preflight
from detectflow.raycluster import code_runtime_env

SHAPES = "examples.shapes.model:tiny_fasterrcnn"
SHAPES_WEIGHTS = "examples/shapes/shapes_detector.pth"


@pytest.mark.parametrize("model", [
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
    "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
])
def test_class_count_is_read_from_every_familys_head(model):
    for count in (3, 91):
        with models.weights_left_unfilled():
            net = models.build_model(model, num_classes=count)
        assert models.num_classes_in(model, net.state_dict()) == count


@pytest.fixture(scope="module")
def shapes_checkpoint():
    saved = torch.load(SHAPES_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(saved) >= {"model", "categories"}  # references/detection's layout plus names
    return saved


@pytest.fixture(scope="module")
def bare_weights(tmp_path_factory, shapes_checkpoint):
    """What the fine-tuning tutorial saves: ``torch.save(model.state_dict(), path)``."""
    path = tmp_path_factory.mktemp("weights") / "tutorial.pth"
    torch.save(shapes_checkpoint["model"], path)
    return str(path)


def _spec(tmp_path, **params):
    params = {"input_uri": "data/sample_images", "output_uri": str(tmp_path / "out"),
              "model": SHAPES, "weights": SHAPES_WEIGHTS} | params
    return preflight(parse_config(**params))


def test_a_checkpoint_with_its_own_classes_names_them(tmp_path, shapes_checkpoint):
    spec = _spec(tmp_path)
    names = shapes_checkpoint["categories"]
    assert spec.categories == ("__background__", *names)
    assert spec.source == "checkpoint" and spec.num_classes == len(names) + 1
    assert spec.as_dict()["names"] == names and spec.keep == ()


@pytest.mark.parametrize("layout", ["text", "json", "coco"])
def test_class_names_from_a_file_for_a_bare_state_dict(tmp_path, bare_weights,
                                                       shapes_checkpoint, layout):
    names = shapes_checkpoint["categories"]
    path = tmp_path / f"names.{layout}"
    if layout == "text":
        path.write_text("\n".join(names) + "\n")
    elif layout == "json":
        path.write_text(json.dumps(names))
    else:  # COCO annotations: ids from 1, in any order
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)][::-1]
        path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    spec = _spec(tmp_path, weights=bare_weights, classes=str(path))
    assert spec.categories == ("__background__", *names)
    assert spec.source == str(path)
    assert spec.as_dict()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # manifest


def test_without_names_labels_are_numbered(tmp_path, bare_weights, shapes_checkpoint):
    spec = _spec(tmp_path, weights=bare_weights)
    count = len(shapes_checkpoint["categories"])
    assert spec.source == "generated"
    assert spec.categories[1:] == tuple(f"class_{i}" for i in range(1, count + 1))
    assert spec.unnamed_notice() == (f"the weights carry no class names: labels are named "
                                     f"class_1 to class_{count} (give them with --classes)")
    assert _spec(tmp_path).unnamed_notice() is None  # the checkpoint names them


def test_a_count_that_disagrees_fails_naming_both_numbers(tmp_path, bare_weights,
                                                          shapes_checkpoint):
    count = len(shapes_checkpoint["categories"])
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(count + 2)))
    with pytest.raises(ConfigError) as err:
        _spec(tmp_path, weights=bare_weights, classes=str(names))
    message = str(err.value)
    assert f"names {count + 2} classes" in message and f"have {count} (plus" in message
    assert "\n" not in message


def test_coco_ids_with_gaps_keep_their_label_numbers(tmp_path):
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": [{"id": 3, "name": "car"},
                                               {"id": 1, "name": "person"}]}))
    table, _ = classes.read_names(str(path))
    assert table == ["__background__", "person", "N/A", "car"]


@pytest.mark.parametrize("content, reason", [
    ("", "names no class"),
    ("{not json", "not valid JSON"),
    ('{"categories": [{"id": 0, "name": "x"}]}', "ids start at 1"),
    ('{"names": ["a"]}', "expected a JSON list"),
])
def test_bad_names_files_fail_in_one_line(tmp_path, content, reason):
    path = tmp_path / "names.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=reason):
        classes.read_names(str(path))


def test_only_keeps_named_classes_and_refuses_unknown_ones(tmp_path, shapes_checkpoint):
    names = shapes_checkpoint["categories"]
    spec = _spec(tmp_path, only=f" {names[1]} ,{names[0]}")
    assert spec.keep == (1, 2) and spec.as_dict()["only"] == sorted(names[:2])
    with pytest.raises(ConfigError) as err:
        _spec(tmp_path, only="unicorn")
    assert "unknown class 'unicorn'" in str(err.value) and all(n in str(err.value) for n in names)


def test_only_splits_on_commas_so_names_may_hold_spaces():
    cfg = RunConfig(only="traffic light, person,traffic light")
    assert cfg.only == ("traffic light", "person")


def test_classes_and_only_change_the_resume_fingerprint():
    base = RunConfig(run_id="r")
    assert fingerprint(base) != fingerprint(base.model_copy(update={"only": ("person",)}))
    assert fingerprint(base, "w", ("a", "b")) != fingerprint(base, "w", ("a", "c"))


@pytest.mark.parametrize("params, reason", [
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"model": SHAPES, "weights": None}, "give them with --weights"),
    ({"model": "no_such_module.x:build", "weights": SHAPES_WEIGHTS}, "cannot import"),
    ({"model": "examples.shapes.model:nothing", "weights": SHAPES_WEIGHTS},
     "has no callable 'nothing'"),
    ({"min_map": 0.5}, "min_map needs ground_truth"),
    ({"incremental": True, "table": False}, "incremental needs table"),
])
def test_bad_models_and_gates_fail_before_any_work(tmp_path, params, reason):
    with pytest.raises((ConfigError, WeightsError), match=reason) as err:
        _spec(tmp_path, **params)
    assert "\n" not in str(err.value)


def test_a_factory_module_is_found_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mydet.py").write_text(
        "from examples.shapes.model import tiny_fasterrcnn\n"
        "def build(num_classes):\n    return tiny_fasterrcnn(num_classes)\n")
    monkeypatch.chdir(tmp_path)
    # Only the checkout and the installed packages on the path, as for ``detectflow run``.
    monkeypatch.setattr(sys, "path", [str(REPO_ROOT)] + [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "mydet", raising=False)
    net = models.build_model("mydet:build", num_classes=4)
    assert models.num_classes_in("mydet:build", net.state_dict()) == 4
    assert models.factory_folder("mydet:build") == str(tmp_path / "mydet.py")


def test_the_weights_check_reads_the_count_in_its_subprocess(tmp_path, bare_weights,
                                                             shapes_checkpoint):
    weights = models.resolve_weights(SHAPES, bare_weights)
    found = weightcheck.WeightsCheck(SHAPES, weights).wait()
    assert found == {"num_classes": len(shapes_checkpoint["categories"]) + 1,
                     "categories": None}


def test_ground_truth_that_scores_no_class_of_the_run_fails_before_any_work(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [],
                              "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(ConfigError, match=r"none of its categories \(cat\) is a class"):
        _spec(tmp_path, ground_truth=str(gt))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not JSON"):
        _spec(tmp_path, ground_truth=str(tmp_path / "bad.json"))


def test_a_factorys_package_travels_to_a_cluster_with_our_code():
    shipped = code_runtime_env(model=SHAPES)["py_modules"]
    assert shipped[-1] == str(REPO_ROOT / "examples") and len(shipped) == 4
    assert code_runtime_env(model="fasterrcnn_resnet50_fpn")["py_modules"] == shipped[:3]
    assert models.factory_folder("torch.nn:Identity") is None  # installed: every node has it


def test_a_references_detection_checkpoint_of_a_torchvision_model_loads_as_saved(tmp_path):
    """train.py in torchvision's references/detection saves its argparse.Namespace beside the
    weights; a 3-class fine-tune of a torchvision builder is rebuilt with 3 classes and detects."""
    import argparse

    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    state = models.build_model(model, num_classes=3).state_dict()  # as a fine-tune starts
    path = tmp_path / "model_25.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 25}, "epoch": 25,
                "args": argparse.Namespace(model=model, num_classes=3, lr=0.02)}, path)
    spec = _spec(tmp_path, model=model, weights=str(path))
    assert spec.num_classes == 3 and spec.source == "generated"
    loaded = models.load_model(model, spec.weights, num_classes=3, score_threshold=0.0)
    image = pil_to_tensor(Image.open(REPO_ROOT / "data/sample_images/chelsea.jpg").convert("RGB"))
    with torch.no_grad():
        out = loaded([models.input_transform(model)(image)])[0]
    assert out["scores"].numel() > 0 and set(out["labels"].tolist()) <= {1, 2}
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 3


def test_a_factorys_own_head_takes_its_count_from_the_carried_names(tmp_path, monkeypatch):
    """A head whose layout the registry does not know: the checkpoint's categories give the
    count, and without them the check asks for --classes."""
    (tmp_path / "mossd.py").write_text(
        "from torchvision.models.detection import ssdlite320_mobilenet_v3_large\n"
        "def build(num_classes):\n"
        "    return ssdlite320_mobilenet_v3_large(num_classes=num_classes, weights=None,\n"
        "                                         weights_backbone=None)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(REPO_ROOT)] + [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "mossd", raising=False)
    with models.weights_left_unfilled():
        state = models.build_model("mossd:build", num_classes=3).state_dict()
    assert models.num_classes_in("mossd:build", state) is None
    torch.save({"model": state, "categories": ["cup", "plate"]}, tmp_path / "named.pth")
    torch.save(state, tmp_path / "bare.pth")
    found = weightcheck.check("mossd:build", str(tmp_path / "named.pth"), "named.pth")
    assert found == {"num_classes": 3, "categories": ["cup", "plate"]}
    with pytest.raises(WeightsError, match="give the class names with --classes"):
        weightcheck.check("mossd:build", str(tmp_path / "bare.pth"), "bare.pth")
    assert weightcheck.check("mossd:build", str(tmp_path / "bare.pth"), "bare.pth",
                             num_classes=3)["num_classes"] == 3
