"""Stand-in for vllm.inputs (see ../README.md)."""
from . import SamplingParams

TokensPrompt = SamplingParams  # constructing it raises
