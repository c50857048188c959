"""attnzoo mechanisms against the pip module a user would pick instead (timm, torchvision), same weights.

Every row builds the reference module, copies its weights into the attnzoo mechanism, checks that both give the
same output (float32, eval) and then times, in interleaved repeats at each thread count:
  fwd      eval mode under ``torch.no_grad``
  fwd+bwd  train mode, forward + backward of a fixed random output gradient (input and parameter gradients)
ratio = t(reference) / t(attnzoo) per repeat (above 1: attnzoo is faster); the table gives the median ratio and its
spread (min–max over the repeats). Each side runs in its native layout (timm's NCHW modules get NCHW input).

Whole-model rows run timm ``swin_tiny_patch4_window7_224`` and ``maxvit_tiny_tf_224`` twice: as they are, and with
every attention call replaced by the attnzoo mechanism holding the same weights (``window`` for Swin's
``_attn``, ``multi_axis`` for MaxViT's ``_partition_attn``); ratio = images/s(attnzoo) / images/s(timm).

``--clock cpu`` times process CPU time instead of wall time: on a shared, oversubscribed machine it leaves out the
time spent waiting for a core (at 1 thread the better measure there; at more threads it sums every thread's work,
spin-waits included, so it is not a latency).

``--isolate`` runs every row in a fresh process of this script, so that no row's timing depends on the allocator and
page state left by the rows before it.

The allocator is held steady for both sides (``attnzoo.tools.costs.steady_allocator``; ``--default-allocator``
leaves it alone): with glibc's adaptive default, whether a side pays page faults for fresh allocations depends on the
allocation history of the process, not on the module, and the memory-bound rows (the channel gates, 25 MB
activations) read anywhere from 0.6 to 2.3 in isolated runs of the same code.

Run: ``python benchmarks/vs_timm.py [--quick] [--threads 1 2] [--repeats 5] [--min-run-time 0.5] [--clock wall|cpu]
[--only TEXT] [--models-only] [--isolate] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import attnzoo
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator


@dataclass
class Pair:
    """One comparison: two modules, an input for each, and how to map the reference output to attnzoo's layout."""

    name: str
    shape: str
    reference: nn.Module
    ours: nn.Module
    ref_input: torch.Tensor
    our_input: torch.Tensor
    to_ours: Callable[[torch.Tensor], torch.Tensor] = lambda y: y


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def nhwc(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1)


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (biases and tables included) so the equality check means something."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


class Call(nn.Module):
    """A module wrapping one bound method of another (timm's ``_attn`` paths are methods, not modules)."""

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.method)(x)


# ---------------------------------------------------------------------------------------------- mechanism pairs


def swin_window(batch: int, size: int, shift: int) -> Pair:
    from timm.models.swin_transformer import SwinTransformerBlock

    block = randomize(SwinTransformerBlock(96, (size, size), num_heads=3, window_size=7, shift_size=shift))
    ours = attnzoo.create("window", 96, num_heads=3, window_size=7, shift_size=shift)
    ours.load_state_dict({k: v for k, v in block.attn.state_dict().items() if k in ours.state_dict()})
    x = torch.randn(batch, size, size, 96)
    label = f"window shift {shift} vs timm Swin _attn"
    return Pair(label, f"B{batch} {size}²×96 h3 M7", Call(block, "_attn"), ours, x, x)


def torchvision_window(batch: int, size: int, shift: int) -> Pair:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    ref = randomize(ShiftedWindowAttention(96, [7, 7], [shift, shift], num_heads=3))
    ours = attnzoo.create("window", 96, num_heads=3, window_size=7, shift_size=shift, mask_padding=False)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()})
    x = torch.randn(batch, size, size, 96)
    label = f"window shift {shift} vs torchvision ShiftedWindowAttention"
    return Pair(label, f"B{batch} {size}²×96 h3 M7", ref, ours, x, x)


def maxvit_partition(batch: int, size: int, kind: str) -> Pair:
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    cfg = MaxxVitTransformerCfg(dim_head=32, head_first=False, rel_pos_type="bias_tf", window_size=(7, 7))
    block = randomize(PartitionAttentionCl(64, kind, cfg))
    ours = attnzoo.create("multi_axis", 64, head_dim=32, window_size=7, partition_type=kind)
    attn = block.attn
    ours.load_state_dict(
        {
            "qkv.weight": attn.qkv.weight,
            "qkv.bias": attn.qkv.bias,
            "proj.weight": attn.proj.weight,
            "proj.bias": attn.proj.bias,
            "relative_position_bias_table": attn.rel_pos.relative_position_bias_table,
        }
    )
    x = torch.randn(batch, size, size, 64)
    return Pair(
        f"multi_axis {kind} vs timm MaxViT partition attn",
        f"B{batch} {size}²×64 d32 P7",
        Call(block, "_partition_attn"),
        ours,
        x,
        x,
    )


def efficientvit_cga(batch: int, size: int) -> Pair:
    from timm.models.efficientvit_msra import LocalWindowAttention

    dim, heads, key_dim, window = 128, 4, 16, 7
    ref = LocalWindowAttention(
        dim,
        key_dim,
        heads,
        attn_ratio=dim / (heads * key_dim),
        resolution=size,
        window_resolution=window,
        kernels=[5] * heads,
    )
    randomize(ref)
    ours = attnzoo.create("cascaded_group", dim, num_heads=heads, qk_dim=key_dim, window_size=window,
                          kernel_size=5, mask_padding=False)  # fmt: skip
    state = {
        k.removeprefix("attn.").replace(".conv.", ".c.").replace("proj.1.", "proj."): v
        for k, v in ref.state_dict().items()
    }
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()}, strict=False)
    x = torch.randn(batch, size, size, dim)
    return Pair(
        "cascaded_group vs timm EfficientViT LocalWindowAttention",
        f"B{batch} {size}²×128 h4 kd16 R7",
        ref,
        ours,
        nchw(x),
        x,
        nhwc,
    )


def channel_gate(batch: int, size: int, name: str) -> Pair:
    dim = 256
    if name == "squeeze_excite":
        from timm.layers.squeeze_excite import SEModule

        ref = randomize(SEModule(dim, rd_channels=dim // 16))
        ours = attnzoo.create("squeeze_excite", dim)
        ours.load_state_dict({k: v.flatten(1) if v.dim() == 4 else v for k, v in ref.state_dict().items()})
        label = "squeeze_excite vs timm SEModule"
    else:
        from timm.layers.eca import EcaModule

        ref = randomize(EcaModule(channels=dim))
        ours = attnzoo.create("eca", dim)
        ours.load_state_dict(ref.state_dict())
        label = "eca vs timm EcaModule"
    x = torch.randn(batch, size, size, dim)
    return Pair(label, f"B{batch} {size}²×{dim}", ref, ours, nchw(x), x, nhwc)


def mechanism_pairs(quick: bool) -> list[Pair]:
    b = 2 if quick else 8
    return [
        swin_window(b, 56, 0),
        swin_window(b, 56, 3),
        torchvision_window(b, 56, 3),
        maxvit_partition(b, 56, "block"),
        maxvit_partition(b, 56, "grid"),
        efficientvit_cga(b, 14),
        channel_gate(b, 56, "squeeze_excite"),
        channel_gate(b, 56, "eca"),
    ]


# ---------------------------------------------------------------------------------------------- whole models


def swapped(model: nn.Module) -> nn.Module:
    """A copy of a timm model with every module ``attnzoo.swap`` recognises run by attnzoo, with the same weights
    (Swin-T: its 12 window attentions; MaxViT-T: its 22 block/grid attentions and 11 squeeze-excite gates)."""
    model = copy.deepcopy(model)
    attnzoo.swap(model, strict=True)
    return model


def model_pairs(quick: bool) -> list[Pair]:
    import timm

    b = 1 if quick else 4
    pairs = []
    models = ("swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224")
    for name in models:
        ref = timm.create_model(name, pretrained=False)
        x = torch.randn(b, 3, 224, 224)
        pairs.append(Pair(f"{name} after attnzoo.swap (images/s)", f"B{b} 224²", ref, swapped(ref), x, x))
    return pairs


# ---------------------------------------------------------------------------------------------- timing


def check_equal(pair: Pair) -> float:
    """Largest |difference| between the two outputs (eval, float32); raises when they differ."""
    pair.reference.eval()
    pair.ours.eval()
    with torch.no_grad():
        ref = pair.to_ours(pair.reference(pair.ref_input))
        ours = pair.ours(pair.our_input)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{pair.name}: outputs differ\n{m}")
    return float((ours - ref).abs().max())


def step(module: nn.Module, x: torch.Tensor, train: bool, grad: torch.Tensor | None) -> Callable[[], None]:
    if not train:

        def run():
            with torch.no_grad():
                module(x)

        return run
    leaf = x.detach().requires_grad_()

    def run_train():
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        module(leaf).backward(grad)

    return run_train


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def block_time(fn: Callable[[], None], calls: int) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def compare(pair: Pair, train: bool, threads: int, repeats: int, budget: float) -> dict:
    """Interleaved repeats: each repeat times the reference then attnzoo (order alternating) for ~budget s each."""
    torch.set_num_threads(threads)
    pair.reference.train(train)
    pair.ours.train(train)
    grads = [None, None]
    if train:
        with torch.no_grad():
            y = pair.reference(pair.ref_input)
        grads = [torch.randn_like(y), torch.randn_like(pair.ours(pair.our_input).detach())]
    fns = [step(pair.reference, pair.ref_input, train, grads[0]), step(pair.ours, pair.our_input, train, grads[1])]
    first = [block_time(fn, 1) for fn in fns]  # warm-up, and a size for the blocks
    calls = [max(1, int(budget / max(t, 1e-6))) for t in first]
    times: list[list[float]] = [[], []]
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            times[side].append(block_time(fns[side], calls[side]))
    ratios = [tr / to for tr, to in zip(*times)]
    return {
        "ref_ms": statistics.median(times[0]) * 1e3,
        "ours_ms": statistics.median(times[1]) * 1e3,
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, 3 repeats, short blocks (a few minutes)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="run the rows whose name contains this text")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model rows")
    parser.add_argument("--models-only", action="store_true", help="only the whole-model rows")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per timed block (fwd+bwd: twice)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run every row in a fresh process (no row's timing depends on what ran before it)",
    )
    add_allocator_option(parser)
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # the row an --isolate child runs
    args = parser.parse_args()
    args.allocator = benchmark_allocator(args)
    repeats = args.repeats or (3 if args.quick else 5)
    budget = args.min_run_time or (0.15 if args.quick else 0.5)
    global clock
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    pairs = ([] if args.models_only else mechanism_pairs(args.quick)) + (
        [] if args.no_models else model_pairs(args.quick)
    )
    if args.only:
        pairs = [p for p in pairs if args.only in p.name]
    if args.row is not None:
        pairs = [pairs[args.row]]
    rows = run_isolated(args, len(pairs)) if args.isolate else measure(args, pairs, repeats, budget)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def measure(args: argparse.Namespace, pairs: list, repeats: int, budget: float) -> list[dict]:
    """Time every pair at every thread count in this process, printing each row as it is measured."""
    rows = []
    print(f"torch {torch.__version__}, {repeats} interleaved repeats of ≥{budget} s blocks, {args.clock} clock, "
          f"{args.allocator}; ratio = t(ref)/t(attnzoo); ms per call")  # fmt: skip
    print_header()
    for pair in pairs:
        max_diff = check_equal(pair)
        for threads in args.threads:
            fwd = compare(pair, False, threads, repeats, budget)
            bwd = compare(pair, True, threads, repeats, budget * 2)
            rows.append(
                {
                    "row": pair.name,
                    "shape": pair.shape,
                    "threads": threads,
                    "max_abs_diff": max_diff,
                    "fwd": fwd,
                    "fwd_bwd": bwd,
                }
            )
            print_row(rows[-1])
    return rows


def print_header() -> None:
    print(
        "| row | shape | threads | fwd ratio (min–max) | fwd ms ref / ours | fwd+bwd ratio (min–max) "
        "| fwd+bwd ms ref / ours |"
    )
    print("|---|---|---|---|---|---|---|")


def print_row(row: dict) -> None:
    fwd, bwd = row["fwd"], row["fwd_bwd"]
    spread = {key: f"{r['ratio']:.2f} ({r['min']:.2f}–{r['max']:.2f})" for key, r in (("f", fwd), ("b", bwd))}
    print(
        f"| {row['row']} | {row['shape']} | {row['threads']} | {spread['f']} | {fwd['ref_ms']:.1f} / "
        f"{fwd['ours_ms']:.1f} | {spread['b']} | {bwd['ref_ms']:.1f} / {bwd['ours_ms']:.1f} |",
        flush=True,
    )


def run_isolated(args: argparse.Namespace, count: int) -> list[dict]:
    """--isolate: every row in a child process of this script (same options, --row i), its rows printed here."""
    forwarded = ["--threads", *map(str, args.threads), "--clock", args.clock]
    for flag, value in (("--repeats", args.repeats), ("--min-run-time", args.min_run_time), ("--only", args.only)):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += [flag for flag, on in (("--quick", args.quick), ("--no-models", args.no_models),
                                        ("--models-only", args.models_only),
                                        ("--default-allocator", args.default_allocator)) if on]  # fmt: skip
    rows = []
    print(f"torch {torch.__version__}, each row in its own process, {args.allocator}; ratio = t(ref)/t(attnzoo); "
          "ms per call")  # fmt: skip
    print_header()
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(count):
            out = Path(tmp) / f"row{index}.json"
            child = [sys.executable, __file__, *forwarded, "--row", str(index), "--json", str(out)]
            subprocess.run(child, check=True, stdout=subprocess.DEVNULL)
            for row in json.loads(out.read_text()):
                rows.append(row)
                print_row(row)
    return rows


if __name__ == "__main__":
    main()
