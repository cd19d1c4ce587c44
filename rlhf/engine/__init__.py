"""DeepSpeed engines of the trainer: configs and initialisation, the weight EMA.

The hybrid engine (training <-> fast generation switching of the actor) lives in
`rlhf.engine.hybrid`.
"""
from rlhf.engine.deepspeed_init import (
    DistInfo,
    config_dtype,
    init_distributed,
    init_eval_engine,
    init_train_engine,
    lr_factor,
    make_ds_config,
    on_cpu,
    weight_decay_groups,
)
from rlhf.engine.ema import EMA

__all__ = [
    "EMA", "DistInfo", "config_dtype", "init_distributed", "init_eval_engine", "init_train_engine",
    "lr_factor", "make_ds_config", "on_cpu", "weight_decay_groups",
]
