"""Configuration validation, listing order/filters/sharding, atomic storage writes."""

import os
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from detectflow import storage
from detectflow.config import RunConfig, parse_config
from detectflow.errors import ConfigError, InputError
from detectflow.listing import iter_images, read_index, write_listing
from detectflow.pipeline import (
    DECODE_BATCH,
    actor_threads,
    build_dataset,
    object_store_budget,
    plan_resources,
    shard_sizes,
)


def test_defaults_run_the_bundled_images(sample_dir):
    cfg = RunConfig()
    assert cfg.input_uri == str(sample_dir) and cfg.model == "fasterrcnn_resnet50_fpn_v2"
    assert os.path.isabs(cfg.output_uri) and cfg.score_threshold == 0.5


@pytest.mark.parametrize(
    "params, field",
    [({"score_threshold": 1.5}, "score_threshold"), ({"batch_size": 0}, "batch_size"),
     ({"model": "resnet50"}, "model"), ({"run_id": "../escape"}, "run_id"),
     ({"limit": 0}, "limit"), ({"extensions": []}, "extensions")],
)
def test_bad_parameters_fail_with_one_line_naming_the_field(params, field):
    with pytest.raises(ConfigError) as err:
        parse_config(**params)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_run_ids_are_generated_unique_and_safe():
    a, b = RunConfig().with_run_id(), RunConfig().with_run_id()
    assert a.run_id != b.run_id and storage.safe_name(a.run_id) == a.run_id
    assert RunConfig(run_id="fixed").with_run_id().run_id == "fixed"


def test_extensions_are_normalised():
    assert RunConfig(extensions="JPG, .png").extensions == (".jpg", ".png")


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_listing_is_sorted_recursive_filtered(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.jpeg", "notes.txt", ".hidden.jpg", "sub/d.gif"]:
        _touch(tmp_path / name)
    uris = [u for u, *_ in iter_images(str(tmp_path), (".jpg", ".jpeg", ".png"))]
    assert uris == [str(tmp_path / n) for n in ["a.png", "b.JPG", "sub/c.jpeg"]]


def test_local_walk_lists_in_sorted_path_order_and_follows_links_once(tmp_path):
    """One folder at a time, yet exactly the order of the sorted full paths (``a.jpg`` before
    ``a/…`` before ``a0.jpg``); symlinked files and folders are listed, a link loop ends."""
    inp, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    names = ["a.jpg", "a/b.jpg", "a/b/c.jpg", "ab.jpg", "a b.jpg", "a-b/x.jpg", "A.jpg",
             "a0.jpg", "z/y/x/w.jpg", "sub dir/é.jpg"]
    for name in names:
        _touch(inp / name)
    _touch(elsewhere / "o.jpg")
    (inp / "linked").symlink_to(elsewhere)
    (inp / "f.jpg").symlink_to(elsewhere / "o.jpg")
    (inp / "z" / "loop").symlink_to(inp)
    listed = [u for u, *_ in iter_images(str(inp), (".jpg",))]
    expected = sorted([str(inp / n) for n in names] + [str(inp / "f.jpg"),
                                                       str(inp / "linked" / "o.jpg")])
    assert listed == expected
    assert [size for _, size, _ in iter_images(str(inp / "a.jpg"), (".jpg",))] == [1]


def test_a_local_image_is_versioned_by_size_and_mtime_ns(tmp_path):
    """Rewritten with the same size, a file still gets a new version: its mtime moved."""
    _touch(tmp_path / "a.jpg")
    os.utime(tmp_path / "a.jpg", ns=(1, 1_700_000_000_123_456_789))
    (before,) = iter_images(str(tmp_path), (".jpg",))
    assert before.version == "1:1700000000123456789"
    os.utime(tmp_path / "a.jpg", ns=(1, 1_700_000_000_123_456_790))
    (after,) = iter_images(str(tmp_path), (".jpg",))
    assert (after.uri, after.size) == (before.uri, before.size) and after.version != before.version


def test_a_subfolder_that_cannot_be_read_is_skipped_and_said(tmp_path, caplog):
    """A subfolder gone (or unreadable) by the time the walk reaches it is left out with a
    warning, as fsspec's walk left it out; the input folder itself must be readable."""
    for name in ["a/1.jpg", "b/2.jpg", "c/3.jpg"]:
        _touch(tmp_path / name)
    skipped = Counter()
    walk = iter_images(str(tmp_path), (".jpg",), skipped)
    assert next(walk)[0] == str(tmp_path / "a" / "1.jpg")
    shutil.rmtree(tmp_path / "b")  # removed after the walk listed the top folder
    with caplog.at_level("WARNING", logger="detectflow.listing"):
        assert [u for u, *_ in walk] == [str(tmp_path / "c" / "3.jpg")]
    assert f"listing skipped {tmp_path / 'b'}" in caplog.text and skipped == {"unreadable": 1}
    with pytest.raises(InputError, match="cannot list"):
        list(iter_images(str(tmp_path / "missing"), (".jpg",)))


def test_other_fsspec_filesystems_are_listed_with_their_own_find():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ["photos/b.jpg", "photos/a/c.png", "photos/notes.txt", "other/d.jpg"]:
        fs.pipe_file(f"/listing-test/{name}", b"xyz")
    try:
        listed = list(iter_images("memory://listing-test/photos", (".jpg", ".png")))
        assert [(u, size) for u, size, _ in listed] == [
            ("memory:///listing-test/photos/a/c.png", 3), ("memory:///listing-test/photos/b.jpg", 3)]
        # The store's own change marker (here the creation time) versions each image.
        assert all(v.startswith("3:") and len(v) > 2 for *_, v in listed)
    finally:
        fs.rm("/listing-test", recursive=True)


# One tree for every store: (path, what the listing does with it). A folder holding a run
# (manifest or staging folder) or an output's latest.json is never input, below the input.
TREE = {
    "a.jpg": "listed", "sub/b.png": "listed", "sub/notes.txt": "not an image",
    "dataset/manifest.txt": "not an image", "dataset/c.jpg": "listed",
    ".hidden.jpg": "hidden", ".notes": "not an image", ".cache/x.jpg": "hidden",
    ".git/config": "hidden", "sub/.thumbs/y.jpg": "hidden",
    # an output prefix: loose.jpg sorts before latest.json, the run folder before both
    "results/20261127T1200Z-ab/manifest.json": "run", "results/loose.jpg": "run",
    "results/20261127T1200Z-ab/samples/s.png": "run", "results/latest.json": "run",
    # a published run of another output: its a.jpg sorts before manifest.json
    "other/run-2/a.jpg": "run", "other/run-2/detections/part-00000.parquet": "run",
    "other/run-2/manifest.json": "run", "other/run-2/samples/t.png": "run",
    # a run in progress: 0.jpg sorts before _staging/
    "busy/0.jpg": "run", "busy/_staging/listing.json": "run", "busy/samples/u.png": "run",
}
TREE_SKIPPED = {"hidden": 4, "broken_link": 0, "unreadable": 0, "run_output": 3}


def _listed(uris, root):
    return [u[len(root) + 1:] for u, *_ in uris]


def test_one_skip_rule_hidden_broken_links_and_run_folders(tmp_path):
    inp = tmp_path / "in"
    for name in TREE:
        _touch(inp / name)
    (inp / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (inp / "sub" / "gone").symlink_to(tmp_path / "no-folder")
    exts = (".jpg", ".png")
    skipped = Counter()
    assert _listed(iter_images(str(inp), exts, skipped), str(inp)) == sorted(
        n for n, what in TREE.items() if what == "listed")
    assert skipped == Counter({**TREE_SKIPPED, "broken_link": 2})
    # The input itself is never skipped: here an output prefix, and a run folder.
    assert _listed(iter_images(str(inp / "results"), exts), str(inp / "results")) == ["loose.jpg"]
    assert _listed(iter_images(str(inp / "busy"), exts), str(inp / "busy")) == [
        "0.jpg", "samples/u.png"]
    for reused in (False, True):
        counts = write_listing(str(inp), str(tmp_path / "listing"), exts, 100)
        assert counts == {"images": 3, "shards": 1, "reused": reused,
                          "skipped": {**TREE_SKIPPED, "broken_link": 2}}
    with pytest.raises(InputError, match=r"no images .* \(skipped: 1 hidden, 1 broken link\)$"):
        write_listing(str(inp / "sub"), str(tmp_path / "l2"), (".gif",), 10)


def test_other_fsspec_filesystems_follow_the_same_skip_rule():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in TREE:
        fs.pipe_file(f"/skip-test/{name}", b"xyz")
    try:
        skipped = Counter()
        listed = _listed(iter_images("memory://skip-test", (".jpg", ".png"), skipped),
                         "memory:///skip-test")
        assert listed == sorted(n for n, what in TREE.items() if what == "listed")
        assert skipped == Counter(TREE_SKIPPED)
    finally:
        fs.rm("/skip-test", recursive=True)


def test_listing_shards_have_stable_positions_and_honour_limit(tmp_path):
    for i in range(7):
        _touch(tmp_path / "in" / f"{i:02d}.jpg")
    out = tmp_path / "listing"
    counts = write_listing(str(tmp_path / "in"), str(out), (".jpg",), shard_size=3, limit=5)
    assert counts == {"images": 5, "shards": 2, "reused": False,
                      "skipped": {"hidden": 0, "broken_link": 0, "unreadable": 0, "run_output": 0}}
    files = sorted(os.listdir(out))
    assert files == ["shard-00000.parquet", "shard-00001.parquet"]
    rows = pq.read_table(out / files[0]).to_pylist() + pq.read_table(out / files[1]).to_pylist()
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["shard"] for r in rows] == [0, 0, 0, 1, 1]
    assert rows[4]["image_uri"].endswith("04.jpg")


def test_empty_or_missing_input_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images with extensions .jpg under"):
        write_listing(str(tmp_path / "empty"), str(tmp_path / "l"), (".jpg",), 10)
    with pytest.raises(InputError, match="cannot list .*nope: not found"):
        write_listing(str(tmp_path / "nope"), str(tmp_path / "l"), (".jpg",), 10)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    info = storage.atomic_write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello" and os.listdir(target.parent) == ["file.bin"]
    assert info == {"bytes": 5, "sha256": storage.sha256_bytes(b"hello")}
    assert storage.sha256_file(str(target)) == info["sha256"]


def test_safe_name_cannot_escape():
    assert "/" not in storage.safe_name("../../etc/passwd") and storage.safe_name("..") == "file"


def test_shard_sizes():
    assert shard_sizes(7, 3) == {0: 3, 1: 3, 2: 1}
    assert shard_sizes(6, 3) == {0: 3, 1: 3}


def test_resource_plan_uses_gpus_when_present_else_cpu_actors():
    gpu = plan_resources(RunConfig(gpus_per_actor=0.5), {"CPU": 16, "GPU": 2})
    assert (gpu.device, gpu.num_actors, gpu.gpus_per_actor) == ("cuda", 4, 0.5)
    cpu = plan_resources(RunConfig(), {"CPU": 2})
    assert (cpu.device, cpu.num_actors, cpu.gpus_per_actor) == ("cpu", 2, 0.0)
    # one single-threaded actor per core; together they leave decoding its CPU
    assert (cpu.cpus_per_actor, cpu.decode_tasks, actor_threads(cpu)) == (0.5, 1, 1)
    big = plan_resources(RunConfig(), {"CPU": 64})
    assert (big.num_actors, big.cpus_per_actor, actor_threads(big)) == (8, 63 / 8, 8)
    chosen = plan_resources(RunConfig(cpus_per_actor=1), {"CPU": 2})
    assert (chosen.num_actors, chosen.cpus_per_actor, actor_threads(chosen)) == (1, 1.0, 2)
    forced = plan_resources(RunConfig(device="cpu", num_actors=2), {"CPU": 8, "GPU": 1})
    assert (forced.device, forced.num_actors) == ("cpu", 2)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_resources(RunConfig(device="cuda"), {"CPU": 2})
    with pytest.raises(ConfigError, match="exceed"):
        plan_resources(RunConfig(num_actors=4), {"CPU": 2})


def test_an_automatic_pool_has_no_more_actors_than_the_images_fill_blocks():
    one = plan_resources(RunConfig(), {"CPU": 8}, images=1)
    assert (one.num_actors, one.max_actors, one.cpus_per_actor) == (1, 1, 7.0)
    # An actor gets whole decoded blocks (DECODE_BATCH images), however small its batches.
    assert plan_resources(RunConfig(), {"CPU": 8}, images=DECODE_BATCH).num_actors == 1
    assert plan_resources(RunConfig(), {"CPU": 8}, images=2 * DECODE_BATCH + 1).num_actors == 3
    assert plan_resources(RunConfig(batch_size=1), {"CPU": 8}, images=5).num_actors == 1
    assert plan_resources(RunConfig(), {"CPU": 8}, images=1000).num_actors == 8
    # Batches larger than a block: Ray Data bundles blocks up to a batch for one actor.
    big = RunConfig(batch_size=4 * DECODE_BATCH)
    assert plan_resources(big, {"CPU": 8}, images=8 * DECODE_BATCH).num_actors == 2
    gpu = plan_resources(RunConfig(), {"CPU": 16, "GPU": 8}, images=20)  # blocks of 16
    assert (gpu.device, gpu.num_actors, gpu.max_actors) == ("cuda", 2, 2)
    # A pool the user sized is kept.
    assert plan_resources(RunConfig(num_actors=3), {"CPU": 8}, images=1).num_actors == 3
    elastic = plan_resources(RunConfig(max_actors=6), {"CPU": 16, "GPU": 8}, images=1)
    assert (elastic.num_actors, elastic.max_actors) == (1, 6)


def test_ray_data_hands_an_actor_whole_blocks_as_the_automatic_pool_assumes(ray_local):
    """What the cap above relies on: each decoded block (DECODE_BATCH rows) is inferred whole by
    one actor however small the batches, so a pool larger than the blocks has idle actors."""
    import ray.data

    class Pid:  # defined here: Ray's workers can't import a test module
        def __call__(self, batch: dict) -> dict:
            return batch | {"pid": [os.getpid()] * len(batch["id"])}

    ds = ray.data.range(2 * DECODE_BATCH, override_num_blocks=2).map_batches(
        lambda b: b, batch_size=DECODE_BATCH, max_calls=0)
    rows = ds.map_batches(Pid, batch_size=4, compute=ray.data.ActorPoolStrategy(size=2),
                          num_cpus=0.5).take_all()
    by_block = {block: {r["pid"] for r in rows if r["id"] // DECODE_BATCH == block}
                for block in (0, 1)}
    assert [len(pids) for pids in by_block.values()] == [1, 1], by_block


def test_object_store_budget_scales_with_the_pool_and_never_takes_half_the_store():
    mib = 1 << 20
    assert object_store_budget(RunConfig(), 1, 8 << 30) == 256 * mib
    assert object_store_budget(RunConfig(), 8, 64 << 30) == 1024 * mib
    assert object_store_budget(RunConfig(), 8, 1 << 30) == 512 * mib  # half of a small store
    assert object_store_budget(RunConfig(object_store_mib=100), 8, None) == 100 * mib
    assert object_store_budget(RunConfig(object_store_mib=0), 8, 8 << 30) is None


def test_budget_applies_to_the_detect_dataset_only(tmp_path, sample_dir, ray_local):
    import ray.data

    cfg = RunConfig(input_uri=str(sample_dir), output_uri=str(tmp_path), run_id="budget")
    plan = plan_resources(cfg, ray_local.cluster_resources())
    write_listing(cfg.input_uri, str(tmp_path / "listing"), cfg.extensions, cfg.shard_size)
    files = read_index(str(tmp_path / "listing"))["files"]
    ds = build_dataset(cfg, [f["uri"] for f in files], plan)  # lazy: nothing runs
    assert plan.object_store_bytes == 256 << 20
    assert ds.context.execution_options.resource_limits.object_store_memory == 256 << 20
    # the process-wide context (other datasets of this worker) keeps Ray's default
    default = ray.data.DataContext.get_current().execution_options.resource_limits
    assert default.object_store_memory == float("inf")
