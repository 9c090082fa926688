"""Named text sources and tokenised calibration/test segments per task."""

from mosp_jax.data.corpora import (
    OFFLINE_SOURCES,
    SOURCES,
    Document,
    SourceUnavailableError,
    get_source,
)
from mosp_jax.data.segments import (
    DEFAULT_SEPARATOR,
    Stream,
    calibration_offsets,
    calibration_segments,
    resolve_separator,
    split_documents,
    test_segments,
    tokenize_stream,
)
from mosp_jax.data.task import TaskData, check_task, load_task

__all__ = [
    "DEFAULT_SEPARATOR",
    "OFFLINE_SOURCES",
    "SOURCES",
    "Document",
    "SourceUnavailableError",
    "Stream",
    "TaskData",
    "calibration_offsets",
    "calibration_segments",
    "check_task",
    "get_source",
    "load_task",
    "resolve_separator",
    "split_documents",
    "test_segments",
    "tokenize_stream",
]
