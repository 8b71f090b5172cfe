"""Adapters to outside libraries; mlx_lm_adapter is the only module that touches mlx-lm internals."""
