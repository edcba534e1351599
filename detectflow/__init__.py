"""detectflow: offline object detection over large image collections (Prefect + Ray Data)."""

__version__ = "0.1.0"
