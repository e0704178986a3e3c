"""Our Flax models: the reward U-Net and its SD 1.5 blocks, the VAE, the CLIP text encoder.

- unet.py: `RewardUNet` (InstructPix2Pix U-Net + reward conditioning, SPEC section 2), its
  config `UNetConfig`, parameter shapes and PyTorch-like random init.
- unet_blocks.py: resnet, samplers, spatial transformer (self-, cross-attention, GEGLU), levels.
- vae.py: `AutoencoderKL` and `VAEConfig`.
- clip.py: `CLIPTextEncoder` and `CLIPTextConfig`.
- layers.py: dense, convolution, GroupNorm, GELU; the compute dtypes by name (`DTYPES`, `parse_dtype`).

Every module takes `dtype` (compute) and `kernels` (an `ops.Kernels`: which kernel family its
attention, convolution and GroupNorm layers run); parameters are float32 with the names of the
diffusers / transformers PyTorch models, so their checkpoints convert by name (weights.py).
"""

from mre_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from mre_jax.models.layers import DTYPES, parse_dtype
from mre_jax.models.unet import (NUM_SCORES, REWARD_HEADS, REWARD_MODULES, SCORE_EMBED_DIM, RewardCrossAttentionLayer,
                                 RewardUNet, UNetConfig, init_unet_params, unet_param_shapes)
from mre_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextEncoder", "DTYPES", "NUM_SCORES", "REWARD_HEADS",
           "REWARD_MODULES", "RewardCrossAttentionLayer", "RewardUNet", "SCORE_EMBED_DIM", "UNetConfig", "VAEConfig",
           "init_unet_params", "parse_dtype", "unet_param_shapes"]
