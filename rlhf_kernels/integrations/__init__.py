"""Drop-in rlhf_kernels for existing trainers: each submodule patches one package in place.

    from rlhf_kernels.integrations import trl
    trl.patch()      # returns the list of what was replaced, "where -> op"
    trl.unpatch()    # the original functions are back

Submodules `trl`, `openrlhf`, `verl`: each has `patch()`, `unpatch()` and `is_patched()`, and
none imports its package before `patch()` is called. `transformers` works on one model at a
time instead: `apply_rlhf_kernels(model)` / `remove_rlhf_kernels(model)`.
"""
