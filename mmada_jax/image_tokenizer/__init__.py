"""MAGVIT-v2 image tokenizer modules: VQGAN encoder/decoder with a lookup-free quantizer (13 bits →
8192 codes). The user object with its checkpoint is ``mmada_jax.api.ImageTokenizer``."""
from mmada_jax.image_tokenizer.config import MagvitConfig, VQGANConfig
from mmada_jax.image_tokenizer.modules import MagvitModel

__all__ = ["MagvitConfig", "MagvitModel", "VQGANConfig"]
