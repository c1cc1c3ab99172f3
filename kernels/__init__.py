"""Fused ops behind stable calls. Each op takes `backend="auto" | "triton" | "torch" | "csrc"`."""

from kernels._dispatch import auto_backend
from kernels.attention import attention, unfused_attention
from kernels.group_norm_film_silu import group_norm_film_silu
from kernels.patch_swd import patch_swd
from kernels.ssm_loss import ssm_loss

__all__ = ["attention", "auto_backend", "group_norm_film_silu", "patch_swd", "ssm_loss", "unfused_attention"]
