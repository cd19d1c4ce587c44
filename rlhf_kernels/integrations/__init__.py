"""Drop-in rlhf_kernels for existing trainers: each submodule patches one package in place.

    from rlhf_kernels.integrations import trl
    trl.patch()      # returns the list of what was replaced, "where -> op"
    trl.unpatch()    # the original functions are back

Submodules `trl`, `openrlhf`, `verl`: each has `patch()`, `unpatch()`, `is_patched()` and
`skipped()` (the targets the last patch() left alone, and why: a module that does not import,
or, outside the versions in its `TESTED_VERSIONS`, a signature that changed), and none
imports its package before `patch()` is called. `transformers` works on one model at a
time instead: `apply_rlhf_kernels(model)` / `remove_rlhf_kernels(model)`.
"""
