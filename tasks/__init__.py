"""One Prefect task per pipeline stage; thin wrappers around ``detectflow`` functions."""

from tasks.detect import detect
from tasks.list_images import list_images
from tasks.publish_latest import publish_latest
from tasks.publish_manifest import publish_manifest
from tasks.validate_sample import validate_sample
from tasks.write_parquet import write_parquet

__all__ = ["list_images", "detect", "validate_sample", "write_parquet", "publish_manifest",
           "publish_latest"]
