"""Task logs reach the Prefect API even when the run's own local Ray is shut down right after the
last task: ``ray.shutdown()`` kills the workers before Prefect's 2-second log batches leave."""

from conftest import SMALL_MODEL
from fresh import run_fresh
from prefect.client.orchestration import get_client
from settle import completed_task_runs, flow_run_logs


def test_every_task_runs_logs_reach_the_api_after_the_local_ray_is_gone(
        prefect_api, sample_dir, small_weights, tmp_path):
    # A process of its own: its flow starts a local Ray and stops it at the end, as
    # `detectflow run` or a served deployment without RAY_ADDRESS does.
    out = run_fresh(f"""
        import json
        from flows.detect_objects import detect_objects
        state = detect_objects(input_uri={str(sample_dir)!r}, output_uri={str(tmp_path)!r},
                               model={SMALL_MODEL!r}, weights={str(small_weights)!r},
                               return_state=True)
        print(json.dumps({{"completed": state.is_completed(),
                          "flow_run_id": str(state.state_details.flow_run_id)}}))
        """, timeout=300, PREFECT_API_URL=prefect_api)
    assert out["completed"]
    flow_run_id = out["flow_run_id"]
    with get_client(sync_client=True) as client:
        task_runs = completed_task_runs(client, flow_run_id, 6)
        # Logs are read once: no worker is left to send more.
        logs = flow_run_logs(client, flow_run_id)
    by_task = {run.id: [log.message for log in logs if log.task_run_id == run.id]
               for run in task_runs}
    names = {run.id: run.name.rsplit("-", 1)[0] for run in task_runs}
    assert sorted(names.values()) == sorted(["list_images", "detect", "validate_sample",
                                             "write_parquet", "publish_manifest",
                                             "publish_latest"])
    for run_id, messages in by_task.items():  # each task's last log, as Prefect writes it
        assert any(m.startswith("Finished in state Completed") for m in messages), (
            names[run_id], messages)
    wrote = [m for run_id, ms in by_task.items() if names[run_id] == "write_parquet" for m in ms]
    assert any(m.startswith("wrote 5 rows") for m in wrote), wrote
