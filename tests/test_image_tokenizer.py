"""MAGVIT-v2 tokenizer: golden fixture, checkpoint round trip, input checks, level attention."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mmada_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader
from mmada_jax.api.image_tokenizer import ImageTokenizer
from mmada_jax.checkpoint import magvit
from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig, lfq
from mmada_jax.image_tokenizer.modules import MagvitModel


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def case(tiny_magvit_dir):
  with np.load(tiny_magvit_dir / "cases.npz") as f:
    return {k[len("magvit/"):]: f[k] for k in f.files if k.startswith("magvit/")}


@pytest.fixture(scope="module")
def tok(tiny_magvit_dir) -> ImageTokenizer:
  return ImageTokenizer.from_pretrained(str(tiny_magvit_dir))


@pytest.fixture(scope="module")
def encoded(tok, case):
  x = nhwc(case["in/images"])
  return {"latent": np.asarray(tok.encode_latent(x)), "codes": np.asarray(tok.encode(x))}


# ---- golden fixture -----------------------------------------------------------------------------

def test_state_dict_layout_matches_fixture(tiny_magvit_dir, tok):
  """Keys and shapes derived from the config (incl. decoder channel order) equal the original's."""
  entries = json.loads((tiny_magvit_dir / "state_dict_keys.json").read_text())
  want = {k: tuple(s) for k, s, _ in entries if k not in magvit.BUFFER_KEYS}
  assert magvit.expected_state_dict_shapes(tok.config) == want
  assert tok.config.class_name == "TinyMAGVITv2" and tok.config.downsample_factor == 8


def test_latent_and_codes(case, encoded):
  ref = nhwc(case["out/latent"])
  np.testing.assert_allclose(encoded["latent"], ref, rtol=1e-4, atol=1e-4)
  print(f"latent max abs err {np.abs(encoded['latent'] - ref).max():.2e}")
  codes = encoded["codes"]
  assert codes.dtype == np.int32 and codes.shape == (2, 16)
  # Bits are exact wherever the reference latent is clearly away from 0 (see fixtures README caution).
  bits = np.asarray(lfq.code_to_bits(jnp.asarray(codes), 13)).reshape(ref.shape) > 0
  safe = np.abs(ref) > 1e-4
  np.testing.assert_array_equal(bits[safe], (ref > 0)[safe])
  np.testing.assert_array_equal(codes, case["out/codes"])
  np.testing.assert_array_equal(codes, case["out/encode_indices"])
  np.testing.assert_array_equal(codes.reshape(2, 1, 4, 4), case["out/indices_map"])


def test_quantizer_outputs(case):
  ref = jnp.asarray(nhwc(case["out/latent"]))
  np.testing.assert_array_equal(np.asarray(lfq.quantize(ref)), nhwc(case["out/z_q"]))
  np.testing.assert_array_equal(np.asarray(lfq.straight_through(ref)), nhwc(case["out/encode_z_q"]))
  codes = jnp.asarray(case["out/codes"])
  np.testing.assert_array_equal(np.asarray(lfq.codes_to_latent(codes, 13, (4, 4))),
                                nhwc(case["out/z_q_from_codes"]))
  np.testing.assert_array_equal(lfq.codebook(13)[np.asarray(codes)].reshape(2, 4, 4, 13),
                                nhwc(case["out/z_q_from_codes"]))


def test_losses(case, encoded):
  for z in (nhwc(case["out/latent"]), encoded["latent"]):
    losses = lfq.lfq_losses(jnp.asarray(z))
    np.testing.assert_allclose(float(losses["quantizer_loss"]), case["out/quantizer_loss"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(losses["entropy_loss"]), case["out/entropy_loss"], rtol=1e-4, atol=1e-4)
  print(f"loss errs {abs(float(losses['quantizer_loss']) - case['out/quantizer_loss']):.1e} "
        f"{abs(float(losses['entropy_loss']) - case['out/entropy_loss']):.1e}")


def test_decode(tok, case):
  for codes_key, out_key in (("out/codes", "out/decoded"), ("in/random_indices", "out/decoded_random")):
    got = np.asarray(tok.decode(case[codes_key]))
    ref = nhwc(case[out_key])
    assert got.dtype == np.float32 and got.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    print(f"{out_key} max abs err {np.abs(got - ref).max():.2e}")


def test_training_forward_and_straight_through(tok, case):
  x = jnp.asarray(nhwc(case["in/images"]))
  out = jax.jit(tok.model.apply)({"params": tok.params}, x)
  np.testing.assert_allclose(float(out["quantizer_loss"]), case["out/quantizer_loss"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(2, -1), case["out/codes"])
  z = jnp.linspace(-2.0, 2.0, 13)
  np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: jnp.sum(lfq.straight_through(v) * 3.0))(z)),
                                np.full(13, 3.0, np.float32))


def test_uint8_input(tok, case):
  u8 = (np.clip(nhwc(case["in/images"]) * 0.5 + 0.5, 0, 1) * 255).round().astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(tok.encode(u8)),
                                np.asarray(tok.encode(u8.astype(np.float32) / 127.5 - 1.0)))


def test_mesh_replicates_and_shards(tiny_magvit_dir, case, encoded):
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  tok_m = ImageTokenizer.from_pretrained(str(tiny_magvit_dir), mesh=mesh)
  codes = tok_m.encode(jnp.asarray(nhwc(case["in/images"])))
  np.testing.assert_array_equal(np.asarray(codes), encoded["codes"])


# ---- checkpoint round trip ----------------------------------------------------------------------

def test_save_load_roundtrip_bit_exact(tok, tiny_magvit_dir, tmp_path):
  tok.save_pretrained(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.safetensors"]
  with SafetensorsReader(str(tiny_magvit_dir)) as a, SafetensorsReader(str(tmp_path)) as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      assert a.dtype(k) == b.dtype(k), k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  again = ImageTokenizer.from_pretrained(str(tmp_path))
  assert again.config == tok.config
  for x, y in zip(jax.tree_util.tree_leaves(tok.params), jax.tree_util.tree_leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dtypes_formats_and_overwrite(tok, tiny_magvit_dir, case, encoded, tmp_path):
  """param_dtype = storage, dtype = compute (Flax); one save format ("hf"); no silent overwrite."""
  assert tok.param_dtype == jnp.float32 and tok.dtype == jnp.float32
  mixed = ImageTokenizer.from_pretrained(str(tiny_magvit_dir), dtype="bfloat16")
  assert mixed.param_dtype == jnp.float32 and mixed.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(mixed.params))
  assert np.asarray(mixed.encode(nhwc(case["in/images"]))).shape == encoded["codes"].shape
  bf = ImageTokenizer.from_pretrained(str(tiny_magvit_dir), param_dtype="bfloat16")
  assert bf.param_dtype == jnp.bfloat16 and bf.dtype == jnp.bfloat16
  tok.save_pretrained(tmp_path / "bf", param_dtype="bfloat16")
  with SafetensorsReader(str(tmp_path / "bf")) as r:
    assert r.dtype("encoder.conv_in.weight") == "BF16" and r.dtype("quantize.power_vals") == "I64"
  assert ImageTokenizer.from_pretrained(tmp_path / "bf").param_dtype == jnp.bfloat16    # as stored
  with pytest.raises(FileExistsError, match="overwrite=True"):
    tok.save_pretrained(tmp_path / "bf")
  tok.save_pretrained(tmp_path / "bf", overwrite=True)
  assert ImageTokenizer.from_pretrained(tmp_path / "bf").param_dtype == jnp.float32
  with pytest.raises(ValueError, match="supported: \\('hf',\\)"):
    tok.save_pretrained(tmp_path / "o", format="orbax")
  with pytest.raises(TypeError, match="unexpected keyword"):
    ImageTokenizer.from_pretrained(str(tiny_magvit_dir), remat=True)
  with pytest.raises(FileNotFoundError, match="image tokenizer directory not found"):
    ImageTokenizer.from_pretrained(tmp_path / "missing")


def test_init_seed_and_deprecated_key():
  cfg = MagvitConfig(encoder=VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
                                         resolution=8, z_channels=4), codebook_dim=4,
                     decoder=VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
                                         resolution=8, z_channels=4))
  a = ImageTokenizer.init(cfg, 3)
  with pytest.warns(DeprecationWarning, match="key= is deprecated"):
    b = ImageTokenizer.init(cfg, key=jax.random.key(3))
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- input and config errors --------------------------------------------------------------------

def test_bad_inputs_raise(tok):
  with pytest.raises(ValueError, match="rank 4"):
    tok.encode(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="channels"):
    tok.encode(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="multiples of 8"):
    tok.encode(np.zeros((1, 30, 30, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    tok.encode(np.zeros((1, 32, 32, 3), np.int32))
  with pytest.raises(ValueError, match=r"\[0, 8192\)"):
    tok.decode(np.full((1, 16), 8192))
  with pytest.raises(ValueError, match=r"\[0, 8192\)"):
    tok.decode(np.full((1, 16), -1))
  with pytest.raises(ValueError, match="not a square"):
    tok.decode(np.zeros((1, 15), np.int32))
  with pytest.raises(ValueError, match="rank 2"):
    tok.decode(np.zeros((16,), np.int32))
  with pytest.raises(ValueError, match="integers"):
    tok.decode(np.zeros((1, 16), np.float32))


def test_config_validation(tiny_magvit_dir):
  base = json.loads((tiny_magvit_dir / "config.json").read_text())

  def with_enc(**kw):
    d = json.loads(json.dumps(base))
    d["encoder_config"].update(kw)
    return d

  for kw, field in ((dict(double_z=True), "double_z"), (dict(z_channels=12), "z_channels"),
                    (dict(ch=48), "multiple of the 32"), (dict(num_res_blocks=[1, 1]), "num_res_blocks"),
                    (dict(foo=1), "encoder_config.foo")):
    with pytest.raises(ValueError, match=field):
      MagvitConfig.from_hf_config(with_enc(**kw))
  with pytest.raises(ValueError, match="'quantizer'"):
    MagvitConfig.from_hf_config({**base, "quantizer": "fsq"})
  assert MagvitConfig.from_hf_config(base).to_hf_config()["encoder_config"] == base["encoder_config"]


def test_default_512_matches_released_layout():
  cfg = MagvitConfig.from_hf_config({"_class_name": "MAGVITv2", "_diffusers_version": "0.27.2"})
  assert cfg == MagvitConfig.default_512()
  shapes = magvit.expected_state_dict_shapes(cfg)
  assert len(shapes) == 380
  n_enc = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("encoder."))
  n_dec = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("decoder."))
  assert round(n_enc / 1e6, 1) == 55.4 and round(n_dec / 1e6, 1) == 39.9
  assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
  assert shapes["encoder.down.3.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
  assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
  assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  assert "decoder.up.0.upsample.conv.weight" not in shapes and "encoder.down.4.downsample.conv.weight" not in shapes
  assert not any(".attn." in k for k in shapes)


def test_checkpoint_errors(tok):
  sd = magvit.state_dict_from_params(tok.config, tok.params)
  bad = dict(sd)
  del bad["decoder.up.1.block.1.conv2.bias"]
  with pytest.raises(CheckpointError, match=r"decoder\.up\.1\.block\.1\.conv2\.bias"):
    magvit.params_from_state_dict(tok.config, bad)
  bad = dict(sd, **{"encoder.conv_out.weight": np.zeros((13, 32, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight.*\(13, 32, 3, 3\)"):
    magvit.params_from_state_dict(tok.config, bad)
  bad = dict(sd, **{"encoder.down.0.attn.0.q.weight": np.zeros((32, 32, 1, 1), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.down\.0\.attn\.0\.q\.weight'"):
    magvit.params_from_state_dict(tok.config, bad)
  bad = dict(sd, **{"quantize.power_vals": np.arange(13)})
  with pytest.raises(CheckpointError, match="power_vals"):
    magvit.params_from_state_dict(tok.config, bad)


# ---- a random model with attention inside the levels, against a numpy NCHW reference -----------

ATTN_CONFIG = MagvitConfig(
    encoder=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=(2, 1, 1), attn_resolutions=(16, 4),
                        resolution=16, z_channels=13),
    decoder=VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=(1, 2, 1), attn_resolutions=(16, 4),
                        resolution=16, z_channels=13),
    codebook_dim=13, class_name="TinyMAGVITv2")


def _np_conv(x, w, b, stride=1, pad=((1, 1), (1, 1))):
  x = np.pad(x, ((0, 0), (0, 0)) + tuple(pad))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bchw,oc->bohw", x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride], w[:, :, i, j])
  return out + b[None, :, None, None]


def _np_reference(sd, cfg: MagvitConfig):
  """The original VQGAN forward in float64 NCHW from torch-layout tensors (independent of Flax)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  conv = lambda x, p, **kw: _np_conv(x, sd[p + ".weight"], sd[p + ".bias"], **kw)
  conv1 = lambda x, p: conv(x, p, pad=((0, 0), (0, 0)))
  swish = lambda x: x / (1 + np.exp(-x))

  def gn(x, p):
    b, c, h, w = x.shape
    g = x.reshape(b, 32, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return g.reshape(b, c, h, w) * sd[p + ".weight"][None, :, None, None] + sd[p + ".bias"][None, :, None, None]

  def res(x, p):
    h = conv(swish(gn(x, p + ".norm1")), p + ".conv1")
    h = conv(swish(gn(h, p + ".norm2")), p + ".conv2")
    return (conv1(x, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x) + h

  def attn(x, p):
    b, c, hh, ww = x.shape
    h = gn(x, p + ".norm")
    q, k, v = (conv1(h, p + n).reshape(b, c, -1) for n in (".q", ".k", ".v"))
    a = np.einsum("bci,bcj->bij", q, k) * c ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return x + conv1(np.einsum("bij,bcj->bci", a, v).reshape(b, c, hh, ww), p + ".proj_out")

  def mid(h, p):
    return res(attn(res(h, p + ".block_1"), p + ".attn_1"), p + ".block_2")

  def encoder(x):
    e, res_ = cfg.encoder, cfg.encoder.resolution
    h = conv(x, "encoder.conv_in")
    for l in range(e.num_levels):
      for i in range(e.num_res_blocks[l]):
        h = res(h, f"encoder.down.{l}.block.{i}")
        if res_ in e.attn_resolutions:
          h = attn(h, f"encoder.down.{l}.attn.{i}")
      if l != e.num_levels - 1:
        h = conv(h, f"encoder.down.{l}.downsample.conv", stride=2, pad=((0, 1), (0, 1)))
        res_ //= 2
    h = conv(swish(gn(mid(h, "encoder.mid"), "encoder.norm_out")), "encoder.conv_out")
    return conv1(h, "encoder.quant_conv")

  def decoder(z):
    d = cfg.decoder
    res_ = d.resolution // 2 ** (d.num_levels - 1)
    h = mid(conv(conv1(z, "decoder.post_quant_conv"), "decoder.conv_in"), "decoder.mid")
    for l in reversed(range(d.num_levels)):
      for i in range(d.num_res_blocks[l]):
        h = res(h, f"decoder.up.{l}.block.{i}")
        if res_ in d.attn_resolutions:
          h = attn(h, f"decoder.up.{l}.attn.{i}")
      if l != 0:
        h = conv(h.repeat(2, axis=2).repeat(2, axis=3), f"decoder.up.{l}.upsample.conv")
        res_ *= 2
    return conv(swish(gn(h, "decoder.norm_out")), "decoder.conv_out")

  return encoder, decoder


@pytest.fixture(scope="module")
def attn_tok() -> ImageTokenizer:
  base = ImageTokenizer.init(ATTN_CONFIG, jax.random.PRNGKey(3))
  rng = np.random.default_rng(4)
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray(x) + (0.1 * rng.standard_normal(x.shape, np.float32)
                                       if path[-1].key in ("scale", "bias") else 0), base.params)
  return ImageTokenizer(ATTN_CONFIG, perturbed)


def test_level_attention_layout(attn_tok):
  shapes = magvit.expected_state_dict_shapes(attn_tok.config)
  enc_attn = sorted({k.split(".attn.")[0] + ".attn." + k.split(".attn.")[1].split(".")[0]
                     for k in shapes if k.startswith("encoder.down") and ".attn." in k})
  dec_attn = sorted({k.split(".attn.")[0] + ".attn." + k.split(".attn.")[1].split(".")[0]
                     for k in shapes if k.startswith("decoder.up") and ".attn." in k})
  assert enc_attn == ["encoder.down.0.attn.0", "encoder.down.0.attn.1", "encoder.down.2.attn.0"]
  assert dec_attn == ["decoder.up.0.attn.0", "decoder.up.2.attn.0"]
  assert shapes["encoder.down.2.attn.0.q.weight"] == (64, 64, 1, 1)


def test_level_attention_numerics_and_roundtrip(attn_tok, tmp_path):
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(5), (2, 16, 16, 3), minval=-1, maxval=1))
  enc_ref, dec_ref = _np_reference(magvit.state_dict_from_params(ATTN_CONFIG, attn_tok.params), ATTN_CONFIG)
  latent = np.asarray(attn_tok.encode_latent(x))
  assert latent.shape == (2, 4, 4, 13)
  np.testing.assert_allclose(latent, nhwc(enc_ref(x.transpose(0, 3, 1, 2))), rtol=1e-4, atol=1e-4)
  codes = np.asarray(attn_tok.encode(x))
  assert codes.shape == (2, 16) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 8192
  images = np.asarray(attn_tok.decode(codes))
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
  z_q = np.asarray(lfq.codes_to_latent(jnp.asarray(codes), 13, (4, 4)))
  np.testing.assert_allclose(images, nhwc(dec_ref(z_q.transpose(0, 3, 1, 2))), rtol=1e-4, atol=1e-4)

  attn_tok.save_pretrained(str(tmp_path))
  again = ImageTokenizer.from_pretrained(str(tmp_path))
  assert again.config == ATTN_CONFIG
  for a, b in zip(jax.tree_util.tree_leaves(attn_tok.params), jax.tree_util.tree_leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(again.encode(x)), codes)


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_training_gradients_finite(attn_tok):
  x = jax.random.uniform(jax.random.PRNGKey(6), (2, 16, 16, 3), minval=-1, maxval=1)

  def loss_fn(params):
    out = MagvitModel(ATTN_CONFIG).apply({"params": params}, x, train=True)
    return jnp.mean((out["reconstruction"] - x) ** 2) + out["quantizer_loss"] + out["entropy_loss"]

  grads = jax.jit(jax.grad(loss_fn))(attn_tok.params)
  flat = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).max()) > 0  # straight-through reaches the encoder
