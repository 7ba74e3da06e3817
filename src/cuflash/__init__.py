"""cuflash: FlashAttention as raw CUDA kernels compiled at run time by NVRTC through CuPy."""
from .api import flash_attn_backward, flash_attn_func, flash_attn_varlen_backward, flash_attn_varlen_func
from .masks import BlockMask
from ._score_fn import MaskMod, ScoreMod
from .reference import attention_reference
from .varlen import pad_input, unpad_input

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "flash_attn_backward", "flash_attn_varlen_func", "flash_attn_varlen_backward",
           "unpad_input", "pad_input", "BlockMask", "ScoreMod", "MaskMod", "attention_reference", "__version__"]
