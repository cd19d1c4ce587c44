"""Stand-in for vLLM (see ../README.md): the names OpenRLHF imports at module level."""


class SamplingParams:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vLLM is a stand-in here (tests/peers/openrlhf_stubs)")
