"""Training data: image pre-tokenisation, record sources, a tfds builder and grain pipelines.

Modules: ``config`` (``config.data``), ``tokenize_images`` (CLI), ``records`` (token-shard layout),
``images`` (preprocessing), ``sources``, ``formatting``, ``pipeline``, ``tfds_builder``, ``synthetic``.
"""
from mmada_jax.data.config import default_data_config
from mmada_jax.data.pipeline import FlowInfo, MixedBatchIterator, make_mixed_dataset, make_mixed_iterator

__all__ = ["FlowInfo", "MixedBatchIterator", "default_data_config", "make_mixed_dataset", "make_mixed_iterator"]
