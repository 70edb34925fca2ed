"""Training: one loop for every stage (``python -m mmada_jax.train --config=... --workdir=...``).

Modules: ``trainer`` (the loop), ``stages`` (Stage hook interface and registry: pretrain, sft),
``step`` (jitted step with gradient accumulation), ``state`` (TrainState and its shardings),
``optim`` (AdamW + warm-up/cosine), ``checkpointing`` (Orbax manager, init_from), ``metrics``
(MFU, metrics.jsonl, TensorBoard, progress bar), ``distributed`` (multi-host start-up),
``samples`` (periodic samples), ``toy_data`` (a small deterministic data source for tests).
"""
from mmada_jax.train.stages import STAGES, Stage, StepContext, get_stage, register_stage

__all__ = ["STAGES", "Stage", "StepContext", "get_stage", "register_stage"]
