"""Test setup: CPU only, 8 simulated devices, fixtures located beside the repository."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fixtures_root() -> pathlib.Path:
  env = os.environ.get("MMADA_FIXTURES")
  if env:
    return pathlib.Path(env)
  for cand in (REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures"):
    if cand.is_dir():
      return cand
  return REPO.parent / "shared" / "fixtures"


FIXTURES = _fixtures_root()


@pytest.fixture(scope="session")
def fixtures_root() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.skip(f"reference fixtures not found at {FIXTURES} (set MMADA_FIXTURES)")
  return FIXTURES


@pytest.fixture(scope="session")
def tiny_mmada_dir(fixtures_root) -> pathlib.Path:
  return fixtures_root / "public" / "tiny_mmada_a"


@pytest.fixture(scope="session")
def tiny_magvit_dir(fixtures_root) -> pathlib.Path:
  return fixtures_root / "public" / "tiny_magvitv2"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test, excluded by default (run with -m slow)")
