"""Stand-in for flash_attn.bert_padding (see ../README.md)."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash-attn is a stand-in here (tests/peers/openrlhf_stubs)")


index_first_axis = pad_input = rearrange = unpad_input = _unavailable
