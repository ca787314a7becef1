"""ltri: long-context inference with bounded memory: read a book, answer questions about it."""

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SamplingConfig, SpanConfig
from ltri.errors import LtriError
from ltri.model import load_model
from ltri.session import Session, SessionStats

__all__ = [
    "LtriConfig",
    "LtriError",
    "MemoryConfig",
    "RetrievalConfig",
    "SamplingConfig",
    "Session",
    "SessionStats",
    "SpanConfig",
    "load_model",
]
__version__ = "0.1.0"
