"""Stand-in for flash-attn (see ../README.md): importable, every function raises."""
