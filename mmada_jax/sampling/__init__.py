"""Samplers: semi-AR text/MMU block diffusion, MaskGIT T2I, cached and threshold parallel decoding."""
from mmada_jax.sampling.cache import CachedTextSample, generate_text_cached
from mmada_jax.sampling.t2i import T2ISample, generate_image_tokens
from mmada_jax.sampling.text import TextSample, generate_text

__all__ = ["CachedTextSample", "T2ISample", "TextSample", "generate_image_tokens", "generate_text",
           "generate_text_cached"]
