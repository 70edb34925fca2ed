"""mmada_jax.host: when the commands restart with transparent huge pages, and that the restart runs
the same command line."""
import os
import subprocess
import sys

from mmada_jax import host

LINUX = dict(system="Linux", glibc=(2, 36), thp="madvise")


def test_adds_the_tunable_once():
  env = host.huge_pages_reexec_env({"PATH": "/bin"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == host.TUNABLE and env["PATH"] == "/bin"
  assert host.huge_pages_reexec_env(env, **LINUX) is None          # already set: no second restart


def test_keeps_other_tunables():
  env = host.huge_pages_reexec_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host.TUNABLE}"


def test_no_restart_where_it_cannot_apply():
  assert host.huge_pages_reexec_env({}, system="Darwin", glibc=(2, 36), thp="madvise") is None
  assert host.huge_pages_reexec_env({}, system="Linux", glibc=None, thp="madvise") is None      # musl
  assert host.huge_pages_reexec_env({}, system="Linux", glibc=(2, 31), thp="madvise") is None   # no tunable
  assert host.huge_pages_reexec_env({}, system="Linux", glibc=(2, 36), thp="never") is None
  assert host.huge_pages_reexec_env({host.OPT_OUT: "0"}, **LINUX) is None
  assert host.huge_pages_reexec_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None  # the user's choice


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  p = tmp_path / "enabled"
  p.write_text("always [madvise] never\n")
  assert host._thp_mode(str(p)) == "madvise"
  assert host._thp_mode(str(tmp_path / "missing")) == ""


def test_restart_runs_the_same_command(tmp_path):
  """A script that calls reexec_with_huge_pages sees the same arguments after the restart, with the
  tunable set exactly when the detection says so."""
  script = tmp_path / "probe.py"
  script.write_text("import os, sys\nfrom mmada_jax.host import reexec_with_huge_pages\n"
                    "reexec_with_huge_pages()\nprint(sys.argv[1:], os.environ.get('GLIBC_TUNABLES', ''))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
  out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  expected = host.huge_pages_reexec_env(env)
  assert out == f"['a', '--b=1'] {expected['GLIBC_TUNABLES'] if expected else ''}"
