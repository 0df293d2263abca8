"""Count what a compiled (sharded) program moves between devices: every collective kind, per op name.

A check that greps one collective kind proves little (a layout that sends data in every layer can still
have no all-gather): these helpers read every collective of the compiled HLO — all-gather, all-reduce,
reduce-scatter, collective-permute, all-to-all, in their sync and async (-start) forms — with the op name
the jaxpr gave it, so a test can say which kinds may appear inside which layers.
"""
import collections
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_LINE = re.compile(r"= [^=]*?\b(%s)(?:-start)?\(" % "|".join(KINDS))
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_LAYER = re.compile(r"(layers_\d+)/(?:[^/]*/)*?(mixer|mlp|norm|mlp_norm)\b")


def collectives(hlo_text: str):
    """Counter of (kind, where): where is "layers_<i>/<mixer|mlp|...>" for a collective inside a layer,
    else "outside" (embedding, head, loss, optimiser)."""
    out = collections.Counter()
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if not m or line.lstrip().startswith("ROOT %tuple"):
            continue
        op = _OP_NAME.search(line)
        layer = _LAYER.search(op.group(1)) if op else None
        out[(m.group(1), f"{layer.group(1)}/{layer.group(2)}" if layer else "outside")] += 1
    return out


def inside_layers(counts, kinds=KINDS):
    """{(kind, where): n} of the collectives inside layers, of the given kinds."""
    return {key: n for key, n in counts.items() if key[1] != "outside" and key[0] in kinds}
