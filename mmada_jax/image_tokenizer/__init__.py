"""MAGVIT-v2 image tokenizer: VQGAN encoder/decoder with a lookup-free quantizer (13 bits → 8192 codes)."""
from mmada_jax.image_tokenizer.config import MagvitConfig, VQGANConfig
from mmada_jax.image_tokenizer.modules import MagvitModel
from mmada_jax.image_tokenizer.tokenizer import ImageTokenizer

__all__ = ["ImageTokenizer", "MagvitConfig", "MagvitModel", "VQGANConfig"]
