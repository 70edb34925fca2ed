"""Text tokenizers, special-token ids and MMaDA's sequence layouts."""
from mmada_jax.prompting.builders import (
    PromptBatch,
    draw_cond_dropout,
    lm_chat_prompt,
    lm_prompt,
    mmu_gen_prompt,
    mmu_prompt,
    padding_attention_bias,
    r2i_prompt,
    t2i_gen_prompt,
    t2i_prompt,
    t2i_uncond_prompt,
    text_gen_prompt,
    training_attention_bias,
)
from mmada_jax.prompting.special_tokens import (
    IGNORE_ID,
    LLADA_RESERVED_IDS,
    LLADA_TOKENIZER_LEN,
    TOKEN_STRINGS,
    SpecialTokens,
)
from mmada_jax.prompting.text_tokenizer import PretokenizedTokenizer, TextTokenizer, train_tiny_tokenizer
