"""Argument helpers shared by the public sampler functions and the user objects.

* :func:`prng_key`: a sampler's ``seed`` (an int or a jax PRNG key) as a PRNG key;
* :func:`renamed_kwargs`: the deprecated keyword names of one release (``cfg_scale=``,
  ``timesteps=``, ``key=``, ``compute_dtype=`` …) mapped onto their new names, each with a
  ``DeprecationWarning``; an unknown name is a ``TypeError``, as for any Python function.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def prng_key(seed: Any, name: str = "seed") -> jax.Array:
  """``seed`` as a PRNG key: an int gives ``jax.random.key(seed)``; a typed key
  (``jax.random.key``) or a raw ``uint32[2]`` key (``jax.random.PRNGKey``) is used as is."""
  if isinstance(seed, (bool, np.bool_)):
    raise TypeError(f"{name} must be an int or a jax PRNG key, got {seed!r}")
  if isinstance(seed, (int, np.integer)):
    return jax.random.key(int(seed))
  if isinstance(seed, jax.Array):
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.ndim == 0:
      return seed
    if seed.dtype == jnp.uint32 and seed.shape == (2,):
      return seed
    raise TypeError(f"{name} must be an int or a single jax PRNG key, got an array of shape "
                    f"{tuple(seed.shape)} and dtype {seed.dtype}")
  raise TypeError(f"{name} must be an int or a jax PRNG key, got {type(seed).__name__}")


def _is_default(value: Any, default: Any) -> bool:
  if value is default:
    return True
  plain = (int, float, str, bool, type(None))
  return isinstance(value, plain) and isinstance(default, plain) and value == default


def renamed_kwargs(where: str, given: Mapping[str, Any], renames: Mapping[str, str],
                   removed: Mapping[str, str] | None = None,
                   current: Mapping[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
  """Maps deprecated keyword arguments onto their new names.

  Args:
    where: the function's name, for the messages.
    given: the deprecated keywords the caller passed (the function's ``**deprecated``).
    renames: old name -> new name.
    removed: old name -> why it is gone (a ``TypeError`` with that explanation).
    current: new name -> (its value, its default); a new name set away from its default together
      with its old name is a ``TypeError``.

  Returns:
    new name -> value, for every deprecated name given (warned with ``DeprecationWarning``).
  """
  out: dict[str, Any] = {}
  for old, value in given.items():
    if removed and old in removed:
      raise TypeError(f"{where}() no longer accepts {old}=: {removed[old]}")
    if old not in renames:
      raise TypeError(f"{where}() got an unexpected keyword argument {old!r}")
    new = renames[old]
    if current and new in current and not _is_default(*current[new]):
      raise TypeError(f"{where}() got both {new}= and its deprecated alias {old}=; pass only {new}=")
    warnings.warn(f"{where}(): {old}= is deprecated and will be removed in the next release; use {new}=",
                  DeprecationWarning, stacklevel=3)
    out[new] = value
  return out
