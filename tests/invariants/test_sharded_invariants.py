"""Sharded == unsharded on 8 fake CPU devices for every family (dp, fsdp, tensor and, with MoE, expert
parallelism); every collective inside a layer is of a kind expected for its layer kind under that
parallelism (`ALLOWED`/`REQUIRED` in sharded_checks.py: e.g. no collective-permute or all-gather inside
Mamba / attention layers under tensor parallelism), with planted-bug companions: runs sharded_checks.py in a subprocess (the device count must
be set before jax is imported)."""
import os
import subprocess
import sys

import pytest

from tests.invariants.families import SHARDED_FAMILIES as NAMES   # (importing sharded_checks would set 8 devices)

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_checks.py")


PLANTED = {"M[chunked]": "planted fused [x | z] kernel caught OK", "M E[switch]": "planted expert-offset bug caught OK"}


@pytest.mark.parametrize("name", NAMES)
def test_sharded_equals_unsharded_for_every_family(name):
    """One subprocess per family, so the workers share the families out (one process for all was a
    four-minute tail on one worker)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(SCRIPT)))
    out = subprocess.run([sys.executable, SCRIPT, name], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=root)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr[-6000:]
    assert f"{name} OK" in out.stdout, out.stdout
    if name in PLANTED:
        assert PLANTED[name] in out.stdout, out.stdout
