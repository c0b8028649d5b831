"""Data: sources, partitioners, tasks (tokenization, batching, evaluation)."""

from fedzip.data.partition import partition, partition_stats
from fedzip.data.sources import TextData, load_source
from fedzip.data.task import Task

__all__ = ["Task", "TextData", "load_source", "partition", "partition_stats"]
