"""Masked-diffusion noising, mask schedules and training losses."""
from mmada_jax.diffusion.losses import (
    LossCoefficients,
    answer_loss,
    answer_loss_weights,
    lm_chat_loss,
    lm_loss,
    lm_loss_weights,
    mixed_loss,
    mixed_loss_weights,
    mmu_loss,
    select_positions,
    t2i_loss,
    t2i_loss_weights,
    token_cross_entropy,
    weighted_loss,
)
from mmada_jax.diffusion.masking import (
    TEXT_EPS,
    ImageMasking,
    TextMasking,
    image_mask_count,
    mask_image_tokens,
    mask_text_tokens,
    text_mask_prob,
)
from mmada_jax.diffusion.schedules import (
    cosine_schedule,
    get_schedule,
    linear_schedule,
    pow_schedule,
    sigmoid_schedule,
)
