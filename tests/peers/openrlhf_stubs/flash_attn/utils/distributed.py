"""Stand-in for flash_attn.utils.distributed (see ../../README.md)."""
from ..bert_padding import _unavailable

all_gather = _unavailable
