"""One Prefect task per pipeline stage; thin wrappers around ``detectflow`` functions."""

from detectflow.errors import quiet_user_errors
from tasks.detect import detect
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.list_images import list_images
from tasks.merge_table import merge_table
from tasks.publish_latest import publish_latest
from tasks.publish_manifest import publish_manifest
from tasks.validate_sample import validate_sample
from tasks.write_parquet import write_parquet

quiet_user_errors()  # in every process that runs a task: a user's mistake is one line

__all__ = ["list_images", "detect", "evaluate", "export", "validate_sample", "write_parquet", "publish_manifest",
           "merge_table", "publish_latest"]
