"""Expert parallelism (experts over the `expert` mesh axis, tokens exchanged with all_to_all in
shard_map) on 8 fake CPU devices equals one device: the MoE layer without and with dropped tokens (same
outputs, metrics, gradients and the same dropped tokens) and dropless (all-gather + reduce-scatter), a MoE-Mamba train step under the fsdp strategy,
left padding kept out of routing (token_mask), and a clear error when the experts do not divide over
the axis; then the same on data=2, expert=2, tensor=2 with the experts' hidden units over `tensor` (each
device holds a (E/2, d, f/2) slice of w_in; a MoE-Mamba tensor train step gathers no expert weight). Runs expert_parallel_checks.py in a
subprocess (the device count must be set before jax is imported)."""
import os
import subprocess
import sys

CHECKS = os.path.join(os.path.dirname(__file__), "expert_parallel_checks.py")


def test_expert_parallel_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, CHECKS], capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(CHECKS))))
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr[-5000:]
    for line in ("MoE layer no drops OK", "MoE layer drops OK", "MoE layer top-2 drops OK", "MoE layer dropless top-2 OK",
                 "MoE layer padding OK", "MoE layer dropless padding OK",
                 "bad expert count OK", "bad expert width OK",
                 "MoE-Mamba train step (fsdp) OK", "MoE-Mamba train step (tensor) OK",
                 "MoE layer tensor biases drops OK", "MoE layer tensor biases dropless OK"):
        assert line in out.stdout, out.stdout
