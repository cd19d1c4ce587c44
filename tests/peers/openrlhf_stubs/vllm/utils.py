"""Stand-in for vllm.utils (see ../README.md)."""
from . import SamplingParams as _unavailable


def random_uuid():
    _unavailable()
