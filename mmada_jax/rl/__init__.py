"""UniGRPO (spec §8): settings, prompts, rollouts, rewards, advantages, masking, the objective.

Modules: ``config`` (:class:`GRPOConfig`, the ``config.rl`` section; :class:`TaskConfig`, one
task of a unified stage's ``rl.tasks``), ``prompts`` (prompt iterator, sources, the task mixture,
JSONL records), ``rollout`` (sampling the groups), ``answers`` (answer
extraction and matching), ``rewards`` (reward classes and the named-reward registry),
``advantages``, ``masking`` (structured mask ratios, response masking), ``loss`` (per-token
likelihoods, the clipped objective), ``update`` (the π_old / π_ref pass, the trainer's loss),
``stage`` (:class:`GRPOStage`, the stage object the trainer wraps in
``mmada_jax.train.stages.unigrpo``). Nothing here imports the trainer.
"""
from mmada_jax.rl.advantages import group_accuracy, group_advantages, group_keep_mask
from mmada_jax.rl.answers import answers_match, extract_answer, mmu_answer_correct
from mmada_jax.rl.loss import LossConfig, grpo_objective, response_logprobs, token_logprobs
from mmada_jax.rl.masking import (MaskingConfig, exact_count_mask, mask_ratios, noisy_inputs,
                                  sample_response_masks, split_response, unigrpo_timesteps)
from mmada_jax.rl.rewards import (REWARDS, AnswerCorrectness, ClassifierReward, ClipScoreReward,
                                  DeviceImageTextReward, FormatReward, FunctionReward, ImageRewardReward,
                                  MMUAnswerCorrectness, RewardFn, RewardInputs, combine_rewards, register_reward,
                                  resolve_rewards)
