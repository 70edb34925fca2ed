"""Weight-only post-training quantization (int8 / int4, qwix) of the transformer: see :mod:`.ptq`."""
from mmada_jax.quant.ptq import (DEFAULT_TILE, EINSUMS, QTYPES, QArray, QuantSpec, abstract_params, cast_float,
                                 dequantize_params, from_storage, is_quantized, leaf_paths, nbytes, num_params,
                                 param_axes, placer, quantization_of, quantize_and_place, quantize_array,
                                 quantize_params, storage_target, to_storage)
