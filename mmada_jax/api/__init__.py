"""The user objects: ``MMaDA`` (model + checkpoint + sampling), ``ImageTokenizer`` (MAGVIT-v2 with
its checkpoint) and the ``GenerationConfig`` a checkpoint's samplers read."""
from mmada_jax.api.generation import ImageGeneration, TextGeneration
from mmada_jax.api.generation_config import GenerationConfig
from mmada_jax.api.image_tokenizer import ImageTokenizer
from mmada_jax.api.model import MMaDA

__all__ = ["GenerationConfig", "ImageGeneration", "ImageTokenizer", "MMaDA", "TextGeneration"]
