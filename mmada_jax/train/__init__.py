"""Training: one loop for every stage (``python -m mmada_jax.train --config=... --workdir=...``).

Modules: ``trainer`` (``run``: the entry point), ``run_setup`` (validation, mesh, stage,
optimizer, checkpointer, data; restore or init), ``loop`` (the step loop), ``stages`` (the Stage
hook interface, its registry and batch-spec check; ``stages.mixed``: pretrain, sft;
``stages.unigrpo``: the UniGRPO stage), ``step`` (jitted step with gradient accumulation),
``state`` (TrainState and its shardings), ``optim`` (AdamW + warm-up/cosine), ``checkpointing``
(Orbax manager, init_from), ``metrics`` (the step-metrics accumulator, MFU, metrics.jsonl,
TensorBoard, progress bar), ``chips`` (per-chip peak FLOP/s and HBM), ``distributed``
(multi-host start-up), ``samples`` (periodic samples), ``toy_data`` (a small deterministic data
source for tests).
"""
from mmada_jax.train.stages import STAGES, Stage, StepContext, check_batch, get_stage, register_stage

__all__ = ["STAGES", "Stage", "StepContext", "check_batch", "get_stage", "register_stage"]
