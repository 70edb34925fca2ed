"""The MMaDA backbone (LLaDA blocks) and its public wrapper."""
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig

__all__ = ["MMaDAConfig", "transformer"]
