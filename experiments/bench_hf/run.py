"""`mamba-jax bench hf`: MambaLM (JAX) vs HF transformers' MambaForCausalLM (torch, CPU) on the same weights.

Measures, for one config and one set of weights (built in transformers, saved with `save_pretrained`,
read with `mamba_jax.interop.load_hf`):

- forward throughput: (batch × seq_len) tokens / median wall time of a full-sequence forward (logits);
- cached greedy decode throughput: new tokens / median wall time of a `generate` call that prefills a
  short prompt and then decodes `--decode-tokens` tokens one at a time with the recurrent cache
  (HF: `generate(do_sample=False)`, ours: `mamba_jax.inference.generate(temperature=0)`).

Compilation (jit) is excluded from the timings and reported separately; every timing is the median of
`--repeats` runs after one warm-up run. It also checks that both sides decode the same greedy tokens.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mamba-jax bench hf", description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="forward batch size")
    p.add_argument("--seq-len", type=int, default=1024, help="forward sequence length")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length before decoding")
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens per decode run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for HF")
    p.add_argument("--scan-impl", default="auto", help="MambaConfig.scan_impl of our model")
    p.add_argument("--host-devices", type=int, default=1,
                   help="also time our forward with the batch sharded over this many XLA host CPU devices "
                        "(XLA runs a while-loop body on one thread, so one device leaves the other core idle "
                        "during the scan); must divide --batch; 1 = off")
    p.add_argument("--breakdown", action="store_true",
                   help="also time our selective scan alone at the forward's shapes (its share of the forward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(list(argv))
    if args.batch % args.host_devices:
        p.error(f"--host-devices ({args.host_devices}) must divide --batch ({args.batch})")
    for name in ("d_model", "n_layer", "d_state", "vocab_size", "batch", "seq_len", "decode_batch", "prompt_len",
                 "decode_tokens", "repeats", "threads", "host_devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    return args


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (seconds) of `repeats` calls of `fn` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hardware() -> Dict[str, object]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cores": usable, "machine": platform.machine()}


def versions() -> Dict[str, str]:
    import flax
    import jax
    import jaxlib
    import torch
    import transformers
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def build_hf(args):
    import torch
    import transformers
    torch.manual_seed(args.seed)
    config = transformers.MambaConfig(vocab_size=args.vocab_size, hidden_size=args.d_model, state_size=args.d_state,
                                      num_hidden_layers=args.n_layer, eos_token_id=None, bos_token_id=None,
                                      pad_token_id=None, use_mambapy=False)
    return transformers.MambaForCausalLM(config).eval()


def bench_hf(hf, fwd_ids: np.ndarray, prompt: np.ndarray, args) -> Dict[str, object]:
    import torch
    fwd = torch.from_numpy(fwd_ids)
    prm = torch.from_numpy(prompt)

    def forward():
        with torch.no_grad():
            return hf(fwd, use_cache=False).logits

    def decode():
        with torch.no_grad():
            return hf.generate(prm, attention_mask=torch.ones_like(prm), do_sample=False,
                               max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens)

    forward()
    t_fwd = median_time(forward, args.repeats)
    tokens = decode()[:, prompt.shape[1]:].numpy()
    t_dec = median_time(decode, args.repeats)
    return {"forward_s": t_fwd, "decode_s": t_dec, "tokens": tokens}


def bench_ours(model, params, fwd_ids: np.ndarray, prompt: np.ndarray, args) -> Dict[str, object]:
    import jax
    import jax.numpy as jnp
    from mamba_jax.inference import generate

    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    fwd = jnp.asarray(fwd_ids, jnp.int32)
    prm = jnp.asarray(prompt, jnp.int32)
    forward = lambda: apply(params, fwd).block_until_ready()
    decode = lambda: generate(model, params, prm, args.decode_tokens, temperature=0.0).block_until_ready()

    t0 = time.perf_counter()
    forward()
    compile_fwd = time.perf_counter() - t0
    t_fwd = median_time(forward, args.repeats)
    t0 = time.perf_counter()
    tokens = np.asarray(decode())
    compile_dec = time.perf_counter() - t0
    t_dec = median_time(decode, args.repeats)
    return {"forward_s": t_fwd, "decode_s": t_dec, "first_forward_s": compile_fwd, "first_decode_s": compile_dec,
            "tokens": tokens}


def bench_ours_sharded(model, params, fwd_ids: np.ndarray, args) -> float:
    """Median forward time with the batch split over `args.host_devices` host CPU devices (data parallel)."""
    import jax
    import jax.numpy as jnp

    from mamba_jax.sharding import make_mesh

    mesh = make_mesh((args.host_devices,), ("data",))
    batch_sharded = jax.NamedSharding(mesh, jax.P("data"))
    replicated = jax.NamedSharding(mesh, jax.P())
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids), out_shardings=batch_sharded)
    fwd = jax.device_put(jnp.asarray(fwd_ids, jnp.int32), batch_sharded)
    params = jax.device_put(params, replicated)
    forward = lambda: apply(params, fwd).block_until_ready()
    forward()
    return median_time(forward, args.repeats)


def bench_scan_alone(model, args) -> float:
    """Median time of one layer's selective scan (the model's impl) at the forward's shapes, random inputs."""
    import jax
    import jax.numpy as jnp
    from mamba_jax.ops import selective_scan

    cfg = model.config
    b, l, d, n = args.batch, args.seq_len, cfg.d_inner, cfg.d_state
    k = jax.random.split(jax.random.PRNGKey(args.seed), 6)
    u, z = jax.random.normal(k[0], (b, l, d)), jax.random.normal(k[1], (b, l, d))
    delta = jax.nn.softplus(jax.random.normal(k[2], (b, l, d)) - 3.0)
    A = -jnp.exp(jax.random.normal(k[3], (d, n)))
    B, C = jax.random.normal(k[4], (b, l, n)), jax.random.normal(k[5], (b, l, n))
    scan = jax.jit(lambda u, delta, B, C, z: selective_scan(u, delta, A, B, C, D=jnp.ones(d), z=z,
                                                            impl=cfg.scan_impl))
    run = lambda: scan(u, delta, B, C, z).block_until_ready()
    run()
    return median_time(run, args.repeats)


def format_table(res: Dict[str, object]) -> str:
    r = res["results"]
    lines = [
        "| measurement | HF transformers (torch) | mamba_jax (JAX) | ours / HF |",
        "|---|---|---|---|",
        f"| forward tok/s (batch {res['config']['batch']} x {res['config']['seq_len']}) | "
        f"{r['hf_forward_tok_s']:.0f} | {r['ours_forward_tok_s']:.0f} | {r['forward_speedup']:.1f}x |",
        f"| greedy decode tok/s (batch {res['config']['decode_batch']}, {res['config']['decode_tokens']} new "
        f"after {res['config']['prompt_len']}) | {r['hf_decode_tok_s']:.0f} | {r['ours_decode_tok_s']:.0f} | "
        f"{r['decode_speedup']:.1f}x |",
    ]
    if "ours_sharded_forward_tok_s" in r:
        lines.insert(3, f"| forward tok/s, ours batch-sharded over {res['config']['host_devices']} host devices | "
                        f"{r['hf_forward_tok_s']:.0f} | {r['ours_sharded_forward_tok_s']:.0f} | "
                        f"{r['sharded_forward_speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args([] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.host_devices > 1:  # read by XLA when the CPU backend starts (the first jax computation)
        flag = f"--xla_force_host_platform_device_count={args.host_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        import jax
        if len(jax.devices()) < args.host_devices:
            print(f"error: --host-devices {args.host_devices} needs XLA_FLAGS={flag} before jax starts; "
                  f"it already started with {len(jax.devices())} device(s)")
            return 2
    try:
        import torch
        import transformers
    except ImportError as err:
        print(f"error: `mamba-jax bench hf` needs torch and transformers (the test extras: "
              f"pip install -e '.[test]'); {err}")
        return 2
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    from mamba_jax.interop import load_hf

    hf = build_hf(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params = load_hf(tmp, scan_impl=args.scan_impl)

    rng = np.random.RandomState(args.seed)
    fwd_ids = rng.randint(0, args.vocab_size, (args.batch, args.seq_len)).astype(np.int64)
    prompt = rng.randint(0, args.vocab_size, (args.decode_batch, args.prompt_len)).astype(np.int64)

    ours = bench_ours(model, params, fwd_ids, prompt, args)
    sharded_s = bench_ours_sharded(model, params, fwd_ids, args) if args.host_devices > 1 else None
    scan_s = bench_scan_alone(model, args) if args.breakdown else None
    theirs = bench_hf(hf, fwd_ids, prompt, args)

    n_fwd = args.batch * args.seq_len
    n_dec = args.decode_batch * args.decode_tokens
    results = {
        "hf_forward_tok_s": n_fwd / theirs["forward_s"],
        "ours_forward_tok_s": n_fwd / ours["forward_s"],
        "hf_decode_tok_s": n_dec / theirs["decode_s"],
        "ours_decode_tok_s": n_dec / ours["decode_s"],
        "hf_forward_s": theirs["forward_s"], "ours_forward_s": ours["forward_s"],
        "hf_decode_s": theirs["decode_s"], "ours_decode_s": ours["decode_s"],
        "ours_first_forward_s_incl_compile": ours["first_forward_s"],
        "ours_first_decode_s_incl_compile": ours["first_decode_s"],
        "greedy_tokens_match": bool(np.array_equal(ours["tokens"], theirs["tokens"])),
    }
    results["forward_speedup"] = results["ours_forward_tok_s"] / results["hf_forward_tok_s"]
    if scan_s is not None:
        results["ours_scan_one_layer_s"] = scan_s
        results["ours_scan_share_of_forward"] = args.n_layer * scan_s / ours["forward_s"]
    if sharded_s is not None:
        results["ours_sharded_forward_s"] = sharded_s
        results["ours_sharded_forward_tok_s"] = n_fwd / sharded_s
        results["sharded_forward_speedup"] = results["ours_sharded_forward_tok_s"] / results["hf_forward_tok_s"]
    results["decode_speedup"] = results["ours_decode_tok_s"] / results["hf_decode_tok_s"]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"resolved_scan_impl": _resolved(model, args)},
        "results": results,
    }
    hw, ver = report["hardware"], report["versions"]
    print(f"date: {report['date']}")
    print(f"hardware: {hw['cpu']}; {hw['cpu_count']} cores ({hw['usable_cores']} usable); torch threads {args.threads}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v))
    print(f"config: d_model {args.d_model}, n_layer {args.n_layer}, d_state {args.d_state}, vocab {args.vocab_size}, "
          f"scan_impl {args.scan_impl} -> {report['config']['resolved_scan_impl']}, median of {args.repeats}")
    print(format_table(report))
    print(f"ours, first call incl. jit compile: forward {results['ours_first_forward_s_incl_compile']:.2f} s, "
          f"decode {results['ours_first_decode_s_incl_compile']:.2f} s")
    print(f"greedy tokens identical: {results['greedy_tokens_match']}")
    if scan_s is not None:
        print(f"ours, selective scan alone: {scan_s * 1e3:.1f} ms per layer; {args.n_layer} layers = "
              f"{100 * results['ours_scan_share_of_forward']:.0f}% of the forward ({ours['forward_s'] * 1e3:.0f} ms)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _resolved(model, args) -> str:
    from mamba_jax.ops import resolve_impl
    return resolve_impl(model.config.scan_impl, args.seq_len)


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
