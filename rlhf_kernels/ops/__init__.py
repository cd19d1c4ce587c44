"""Autograd Functions, argument checks and backend dispatch, one module per op."""
from .gae import gae

# op name -> backends it has (the report iterates this)
OPS = {"gae": ("cuda", "triton", "cpu", "torch")}

__all__ = ["gae", "OPS"]
