"""Ahead-of-time compile of the real train step for a TPU topology, from a CPU-only host.

  python -m mmada_jax.aot --config=configs/mmada_8b.py:stage1_3 --topology=v5p-128 [--json] \
      [--config.mesh_shape=fsdp=-1] [--config.model.remat_policy=dots] [--config.optimizer.grad_accum=8] \
      [--config.stage.logits_chunk=256]

Every ``--config.*`` override of the trainer works (the config is the trainer's, locked). The step
is the trainer's own: ``state_shardings`` → ``make_step_fn(stage, tx, schedule, ...)`` →
``jit_step``, with the registered stage built from the config alone (``get_stage(...,
abstract=True)``: no data is read): its loss, its declared batch spec as the step's abstract
batch and its frozen state (UniGRPO's reference params) as a step argument, lowered on abstract
TPU devices (``jax.experimental.topologies``) and compiled by libtpu.
Nothing is allocated; no TPU is needed, only the ``libtpu`` wheel (works under
``JAX_PLATFORMS=cpu``).

Reported (per chip unless said otherwise):

* HBM = arguments + outputs + temporaries − aliased (donated state) bytes of
  ``compiled.memory_analysis()`` (generated code excluded, it is reported separately), against
  the chip's capacity; ``fits`` = HBM ≤ capacity. A step XLA cannot fit fails to compile; the
  "Used X of Y hbm" figures of that error are reported instead (``fits`` false).
* FLOPs per optimizer step: analytical (``6·N_matmul·tokens + 12·n_layers·L²·d·rows``, the
  trainer's MFU convention, remat recompute not counted) and XLA's (all chips, recompute
  included).
* XLA's cost-model step time (``optimal_seconds``) — the cost model's optimistic bound, NOT a
  measurement — and ``estimated_mfu = analytical_flops / (seconds · chips · peak)``.

XLA's ``cost_analysis()`` counts a while-loop body once, and a scanned model has several loops:
the layer scan, the gradient-accumulation scan (A micro-batches) and, on TPU, the "windowed
einsum" loops into which SPMD turns FSDP all-gather/reduce-scatter matmuls (one per sharded
matmul, body = one shard). The real step's counts are therefore far too small. The estimate is
instead built from cost twins: the same step with 1 and 2 unrolled layers, compiled with
windowed einsums off (``xla_jf_spmd_threshold_for_windowed_einsum_mib``) and the fused LM-head
loss's chunk loops (``stage.logits_chunk``) traced unrolled (``model.lm_head.unrolled_chunks``), so
every op is counted, and the optimizer update alone (C_opt):

  total = C_opt + A · [(C_1 − C_opt) + (n_layers − 1) · (C_2 − C_1)]

(C_2 − C_1 is one layer's forward + backward + recompute). Memory always comes from the real
step compiled with the given options. The cost model sums per-op times (compute or HBM traffic,
whichever bounds the op); collectives appear to be costed by their HBM traffic, not by ICI
bandwidth or latency (an all-gather's ``optimal_seconds`` ≈ its bytes accessed / HBM bandwidth),
and nothing is overlapped. It is XLA's model, not a measurement. With libtpu 0.0.42.1 the v5e
and v6e cost models give some ops a time of −1 s (measured), so no time or MFU estimate is
reported there (``cost_model_note``); the roofline of XLA's totals, max(FLOPs/peak,
bytes/HBM bandwidth), is reported for every generation as a lower bound on the step time.

Modules: ``topology`` (TPU generations and slices, abstract devices), ``programs`` (the abstract
step from the stage's batch spec, compiling it and the optimizer), ``estimate`` (the report and
the cost twins), ``report`` (its text form), ``__main__`` (the command line).
"""
from mmada_jax.aot.estimate import COST_TWIN_OPTIONS, analytical_flops, direct_cost, estimate, scaled_cost
from mmada_jax.aot.programs import (COST_KEYS, Compiled, StepProgram, StepShapes, abstract_step, compile_optimizer,
                                    compile_step, grpo_prompt_width, memory_figures, parse_oom, sharding_context)
from mmada_jax.aot.report import format_report
from mmada_jax.aot.topology import GENERATIONS, GIB, Generation, Topology, parse_topology
