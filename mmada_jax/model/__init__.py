"""The MMaDA backbone (LLaDA blocks); the user object is ``mmada_jax.api.MMaDA``."""
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig

__all__ = ["MMaDAConfig", "transformer"]
