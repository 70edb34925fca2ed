"""UniGRPO (spec §8): advantages, structured response masking, the clipped objective, rewards.

The trainer stage lives in :mod:`mmada_jax.rl.grpo` (imported on demand: it registers the
``grpo`` / ``unigrpo`` stages with the trainer).
"""
from mmada_jax.rl.advantages import group_accuracy, group_advantages, group_keep_mask
from mmada_jax.rl.loss import LossConfig, grpo_objective, response_logprobs, token_logprobs
from mmada_jax.rl.masking import (MaskingConfig, exact_count_mask, mask_ratios, noisy_inputs,
                                  sample_response_masks, split_response, unigrpo_timesteps)
from mmada_jax.rl.rewards import (AnswerCorrectness, ClassifierReward, ClipScoreReward, FormatReward,
                                  FunctionReward, ImageRewardReward, MMUAnswerCorrectness, RewardFn,
                                  RewardInputs, combine_rewards, extract_answer)
