"""Sharded == unsharded on 8 fake CPU devices for every family (dp, fsdp, tensor and, with MoE, expert
parallelism); every collective inside a layer is of a kind expected for its layer kind under that
parallelism (`ALLOWED`/`REQUIRED` in sharded_checks.py: e.g. no collective-permute or all-gather inside
Mamba / attention layers under tensor parallelism), with planted-bug companions: runs sharded_checks.py in a subprocess (the device count must
be set before jax is imported)."""
import os
import subprocess
import sys

from tests.invariants.families import SHARDED_FAMILIES as NAMES   # (importing sharded_checks would set 8 devices)

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_checks.py")


def test_sharded_equals_unsharded_for_every_family():
    root = os.path.dirname(os.path.dirname(os.path.dirname(SCRIPT)))
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=root)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr[-6000:]
    for name in NAMES:
        assert f"{name} OK" in out.stdout, out.stdout
    assert "planted expert-offset bug caught OK" in out.stdout, out.stdout
    assert "planted fused [x | z] kernel caught OK" in out.stdout, out.stdout
