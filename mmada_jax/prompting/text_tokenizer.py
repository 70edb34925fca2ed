"""Text tokenizers: a `tokenizers`-library wrapper, a pass-through stand-in and a tiny trainer.

* :class:`TextTokenizer` wraps ``tokenizers.Tokenizer`` (a Hugging Face ``tokenizer.json``), with
  ``len()`` = vocabulary size including added tokens, exactly as HF ``len(tokenizer)``.
* :class:`PretokenizedTokenizer` (``TextTokenizer.from_ids``) passes pre-tokenised id lists
  through; its ``len()`` defaults to the LLaDA 126349 so image ids are ``code + 126349``.
* :func:`train_tiny_tokenizer` trains a small byte-level BPE holding every MMaDA special token,
  for tests and offline demos (its own small id space; image offset = its ``len()``).

The chat template is LLaDA's (the override in ``generate.py``/``app.py``)::

  BOS + for each turn: <|start_header_id|>{role}<|end_header_id|>\\n{content.strip()}<|eot_id|>
      + (generation prompt) <|start_header_id|>assistant<|end_header_id|>\\n

:meth:`TextTokenizer.save` writes the folder layout that transformers' ``AutoTokenizer`` loads:
``tokenizer.json``, ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the special tokens,
:data:`CHAT_TEMPLATE`) and ``special_tokens_map.json``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Sequence

from mmada_jax.prompting.special_tokens import LLADA_RESERVED_IDS, LLADA_TOKENIZER_LEN, TOKEN_STRINGS

Message = Mapping[str, object]
"""A chat turn: ``{"role": str, "content": str | Sequence[int]}``."""

_SH, _EH, _EOT = TOKEN_STRINGS["start_header"], TOKEN_STRINGS["end_header"], TOKEN_STRINGS["eot_id"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '" + _SH + "' + message['role'] + '" + _EH + "\n' + message['content'] | trim + '" + _EOT + "' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + _SH + "assistant" + _EH + "\n' }}{% endif %}")
"""The LLaDA chat template as a Jinja string (``tokenizer_config.json``'s ``chat_template``): it
renders what :meth:`TextTokenizer.apply_chat_template` builds."""
_SPECIAL_MAP_KEYS = ("bos_token", "eos_token", "pad_token", "mask_token", "additional_special_tokens")


def _token_content(value) -> str | None:
  """A ``tokenizer_config.json`` token entry (str or ``{"content": str}``) -> str."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


class TextTokenizer:
  """A Hugging Face ``tokenizer.json`` tokenizer with the LLaDA chat template.

  Attributes:
    bos_token / eos_token: token strings (``None`` when the tokenizer has none).
    bos_token_id / eos_token_id: their ids.
  """

  def __init__(self, backend, bos_token: str | None = None, eos_token: str | None = None,
               tokenizer_config: Mapping[str, object] | None = None):
    """``backend``: a ``tokenizers.Tokenizer``. ``bos_token``/``eos_token`` default to
    ``<|startoftext|>``/``<|endoftext|>`` when those are in the vocabulary. ``tokenizer_config``:
    the ``tokenizer_config.json`` it was loaded with (its fields are kept by :meth:`save`)."""
    self._backend = backend
    self.tokenizer_config = dict(tokenizer_config or {})
    self.bos_token = bos_token if bos_token is not None else self._default_token("bos")
    self.eos_token = eos_token if eos_token is not None else self._default_token("eos")
    for name in ("bos_token", "eos_token"):
      tok = getattr(self, name)
      if tok is not None and self.token_to_id(tok) is None:
        raise ValueError(f"{name} {tok!r} is not in the tokenizer vocabulary")

  def _default_token(self, name: str) -> str | None:
    text = TOKEN_STRINGS[name]
    return text if self.token_to_id(text) is not None else None

  # construction ---------------------------------------------------------------------------

  @classmethod
  def from_file(cls, path: str | os.PathLike, bos_token: str | None = None,
                eos_token: str | None = None) -> "TextTokenizer":
    """Loads ``tokenizer.json`` (a file, or a directory holding one).

    BOS/EOS strings come from the arguments, else ``tokenizer_config.json`` /
    ``special_tokens_map.json`` beside the file, else the LLaDA names when present.
    Raises FileNotFoundError naming the path when there is no tokenizer file.
    """
    import tokenizers

    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no tokenizer file at {file!r} (expected a Hugging Face tokenizer.json "
                              "or a directory containing one)")
    folder = os.path.dirname(os.path.abspath(file))
    loaded: dict[str, object] = {}
    for cfg_name in ("tokenizer_config.json", "special_tokens_map.json"):
      cfg_path = os.path.join(folder, cfg_name)
      if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
          try:
            cfg = json.load(f)
          except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
          raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
        bos_token = bos_token if bos_token is not None else _token_content(cfg.get("bos_token"))
        eos_token = eos_token if eos_token is not None else _token_content(cfg.get("eos_token"))
        if cfg_name == "tokenizer_config.json":
          loaded = cfg
    return cls(tokenizers.Tokenizer.from_file(file), bos_token=bos_token, eos_token=eos_token,
               tokenizer_config=loaded)

  @staticmethod
  def from_ids(vocab_len: int = LLADA_TOKENIZER_LEN, bos_token_id: int = LLADA_RESERVED_IDS["bos"],
               eos_token_id: int = LLADA_RESERVED_IDS["eos"],
               named_ids: Mapping[str, int] | None = None) -> "PretokenizedTokenizer":
    """A pass-through tokenizer for pre-tokenised ids (the fixtures' stand-in); see
    :class:`PretokenizedTokenizer`."""
    return PretokenizedTokenizer(vocab_len, bos_token_id, eos_token_id, named_ids)

  def hf_tokenizer_config(self) -> dict[str, object]:
    """The ``tokenizer_config.json`` that :meth:`save` writes.

    Ours: ``tokenizer_class`` ``PreTrainedTokenizerFast``; ``bos_token`` / ``eos_token``;
    ``pad_token`` = EOS (MMaDA pads text with EOS); ``mask_token`` ``<|mdm_mask|>`` and
    ``additional_special_tokens`` (the other MMaDA tokens) when in the vocabulary;
    ``chat_template`` :data:`CHAT_TEMPLATE`; ``padding_side`` ``left`` (the original's prompts);
    ``clean_up_tokenization_spaces`` false (decoding keeps the text as encoded); and
    ``added_tokens_decoder`` from ``tokenizer.json``. Fields of the ``tokenizer_config.json`` this
    tokenizer was loaded with win, except BOS / EOS (this tokenizer's), ``added_tokens_decoder``
    (always ``tokenizer.json``'s) and a missing or null ``chat_template``.
    """
    present = {name: text for name, text in TOKEN_STRINGS.items() if self.token_to_id(text) is not None}
    ours: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                               "eos_token": self.eos_token, "pad_token": self.eos_token}
    if "mask" in present:
      ours["mask_token"] = present["mask"]
    named = {self.bos_token, self.eos_token, present.get("mask")}
    ours["additional_special_tokens"] = [t for t in present.values() if t not in named]
    ours.update(chat_template=CHAT_TEMPLATE, padding_side="left", clean_up_tokenization_spaces=False)
    cfg = {**ours, **self.tokenizer_config, "bos_token": self.bos_token, "eos_token": self.eos_token}
    if not cfg.get("chat_template"):
      cfg["chat_template"] = CHAT_TEMPLATE
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(self._backend.get_added_tokens_decoder().items())}
    return cfg

  def save(self, directory: str | os.PathLike) -> str:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` (:meth:`hf_tokenizer_config`) and
    ``special_tokens_map.json``: the folder that transformers' ``AutoTokenizer.from_pretrained``
    and :meth:`from_file` load. Returns the directory."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = self.hf_tokenizer_config()
    self._backend.save(os.path.join(directory, "tokenizer.json"))
    special = {k: cfg[k] for k in _SPECIAL_MAP_KEYS if cfg.get(k) is not None}
    for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", special)):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return directory

  # vocabulary -----------------------------------------------------------------------------

  def __len__(self) -> int:
    """Vocabulary size including added tokens (HF ``len(tokenizer)``): the image-token offset."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """Id of a token string, or None when it is not in the vocabulary."""
    return self._backend.token_to_id(token)

  @property
  def bos_token_id(self) -> int | None:
    return None if self.bos_token is None else self.token_to_id(self.bos_token)

  @property
  def eos_token_id(self) -> int | None:
    return None if self.eos_token is None else self.token_to_id(self.eos_token)

  # encoding -------------------------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> ids. ``add_special_tokens`` applies the tokenizer's post-processor, as HF
    ``tokenizer(text)`` does; the prompt builders prepend BOS themselves when it is missing."""
    return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Several texts -> ragged id lists."""
    return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Ids -> text (keeps special tokens by default, like HF ``decode``)."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # chat template --------------------------------------------------------------------------

  def _content_text(self, content) -> str:
    if isinstance(content, str):
      return content
    raise TypeError(f"message content must be a str for {type(self).__name__}, got {type(content).__name__}")

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                          tokenize: bool = True) -> list[int] | str:
    """Renders LLaDA's chat template.

    Returns the string (``tokenize=False``) or its ids (``tokenize=True``), encoded without the
    post-processor, as HF ``apply_chat_template`` does; header/BOS strings map to their ids.
    Raises ValueError when the tokenizer has no BOS token.
    """
    if self.bos_token is None:
      raise ValueError("the chat template needs a BOS token; this tokenizer has none")
    parts = [self.bos_token]
    for m in messages:
      parts.append(f"{_SH}{m['role']}{_EH}\n{self._content_text(m['content']).strip()}{_EOT}")
    if add_generation_prompt:
      parts.append(f"{_SH}assistant{_EH}\n")
    text = "".join(parts)
    return self.encode(text, add_special_tokens=False) if tokenize else text


class PretokenizedTokenizer(TextTokenizer):
  """Pass-through tokenizer over an id space of size ``vocab_len`` (default LLaDA's 126349).

  ``encode`` accepts a sequence of ints (returned unchanged) or a string of whitespace-separated
  decimal ids and named tokens (``"<|startoftext|> 5 17<|eot_id|>"``); ``decode`` writes that
  string form. Known names: BOS/EOS, the chat header tokens and the mask token at their LLaDA
  ids, plus ``named_ids``. Chat messages take ids (a sequence or such a string) as content.
  """

  def __init__(self, vocab_len: int = LLADA_TOKENIZER_LEN, bos_token_id: int = LLADA_RESERVED_IDS["bos"],
               eos_token_id: int = LLADA_RESERVED_IDS["eos"], named_ids: Mapping[str, int] | None = None):
    names = {TOKEN_STRINGS[k]: LLADA_RESERVED_IDS[k] for k in ("mask", "start_header", "end_header", "eot_id")}
    names.update({TOKEN_STRINGS["bos"]: bos_token_id, TOKEN_STRINGS["eos"]: eos_token_id})
    names.update(named_ids or {})
    self._vocab_len = int(vocab_len)
    self._names = {k: int(v) for k, v in names.items() if 0 <= int(v) < self._vocab_len}
    self._inv = {v: k for k, v in self._names.items()}
    self._split = re.compile("(" + "|".join(re.escape(k) for k in sorted(self._names, key=len, reverse=True)) + ")")
    self.bos_token = self._inv.get(int(bos_token_id))
    self.eos_token = self._inv.get(int(eos_token_id))

  def __len__(self) -> int:
    return self._vocab_len

  def token_to_id(self, token: str) -> int | None:
    return self._names.get(token)

  def save(self, directory):
    raise TypeError("a pass-through tokenizer has no tokenizer.json to save")

  def encode(self, text, add_special_tokens: bool = True) -> list[int]:
    """Ids (sequence of ints) or their string form -> list of ids; adds nothing."""
    if not isinstance(text, str):
      ids = [int(i) for i in text]
    else:
      ids = []
      for chunk in self._split.split(text):
        if chunk in self._names:
          ids.append(self._names[chunk])
          continue
        for piece in chunk.split():
          if not piece.lstrip("-").isdigit():
            raise ValueError(f"pass-through tokenizer cannot encode {piece!r}: give ids or known token names")
          ids.append(int(piece))
    bad = [i for i in ids if not 0 <= i < self._vocab_len]
    if bad:
      raise ValueError(f"ids {bad[:5]} outside the vocabulary [0, {self._vocab_len})")
    return ids

  def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    out = []
    for i in (int(i) for i in ids):
      if i in self._inv:
        if not skip_special_tokens:
          out.append(self._inv[i])
      else:
        out.append(str(i))
    return " ".join(out)

  def _content_text(self, content) -> str:
    return content if isinstance(content, str) else " ".join(str(int(i)) for i in content)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                         special_tokens: Sequence[str] | None = None) -> TextTokenizer:
  """Trains a byte-level BPE tokenizer that holds every MMaDA special token.

  Args:
    texts: training corpus (strings).
    vocab_size: target size including the special tokens and the 256 byte symbols.
    special_tokens: token strings to reserve (ids 0, 1, … in this order); default all of
      ``TOKEN_STRINGS`` (BOS ``<|startoftext|>`` = 0, EOS ``<|endoftext|>`` = 1, …).
  Returns:
    A :class:`TextTokenizer` whose ``decode(encode(s)) == s`` for any string; build its ids with
    ``SpecialTokens.from_tokenizer(tok)``; image ids start at ``len(tok)``.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  specials = list(TOKEN_STRINGS.values()) if special_tokens is None else list(special_tokens)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  bos = TOKEN_STRINGS["bos"] if TOKEN_STRINGS["bos"] in specials else None
  eos = TOKEN_STRINGS["eos"] if TOKEN_STRINGS["eos"] in specials else None
  return TextTokenizer(tok, bos_token=bos, eos_token=eos)
