"""Benchmark one PuXIM training step three ways, side by side, on the same model and batch.

    python -m tools.bench_train --arch b16 --steps 3 --warmup 1                  # batch 2 (released) and 16
    python -m tools.bench_train --arch b16 --batch_size 2 --steps 3 --warmup 1   # CPU, batch 2 only (quicker)
    python -m tools.bench_train --arch b16 --device cuda --amp bf16 --batch_size 2 8 16 32 64 128   # GPU, MFU
    python -m tools.bench_train --arch b16 --device cuda --amp bf16 --batch_size 32 --compile    # torch.compile

(a) **reference-like** — what the released training code does per step, built from our modules:
    fp32 whatever ``--amp`` says; the sketch and the unused second sketch go through the encoder
    in one ``[2B]`` call and, as there, the backward pass runs through both (the second sketch's
    rows only get zero gradients); positive and negative photos in one ``[2B]`` call; the CLIP
    image tower on the ``[2B]`` photos; the CLIP *text* encoder called once per photo on
    ``["a", class]`` (tokenised each time, no cache: the sampler's text cache is cleared before
    every photo); the interaction decoder called twice, on (sketch, positive) and (sketch,
    negative). Not included: the released code's ``torch.autograd.set_detect_anomaly(True)``,
    which would slow it further, and its batch-axis attention bug (same FLOPs).
(b) **ours, CLIP online** — ``PuXIM.forward`` as ``train.py`` runs it: one sketch pass ``[B]``, one
    photo pass ``[2B]``, CLIP image tower on the photos, text features from the per-class cache;
    under ``--amp``.
(c) **ours, cached masks** — the same, with ``positive_mask``/``negative_mask`` in the batch as a
    ``--vxl_cache`` run gets them: no CLIP at all; under ``--amp``.

With ``--compile``, (b) and (c) run the encoder and the interaction decoder through ``torch.compile``
as ``train.py --compile`` does, while (a) runs an eager copy of the same weights (the released code
has no compilation); the compiler's first calls fall in the warm-up steps.

Several ``--batch_size`` values are measured one after the other, by default 2 (the released recipe,
``train.py``'s ``b16`` default) and 16 (a larger batch: fewer, bigger updates, a schedule that has not
been validated); a configuration that runs out of GPU memory is reported as such and left out of
larger batches, so one call finds the largest batch that fits and its MFU.

Every step is ``engine.train_step``, the step ``train.py`` takes (forward, fp32 losses, the non-finite
check, backward and an Adam step): the configurations differ only in the model and batch they pass it
(and (a) in passing no autocast dtype nor grad scaler), never in a copy of the step. Inputs are
random tensors of the preset's size; without ``--clip_weights`` the CLIP is random too (speed does
not depend on the weights). The three configurations are timed in interleaved rounds (a, b, c, a, b, c, ...) so that load changes
on a shared machine hit them alike. On CUDA the peak memory of each step and the model FLOPs
utilisation (FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode``, CLIP's
forward included where it runs, divided by step time and the GPU's dense bf16 peak) are reported.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Callable, Dict, Optional

import torch

from tools.results_page import add_markdown_flag, write_page
from utils.config import make_config
from utils.presets import ARCHITECTURES, get_architecture

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, from the vendors' data sheets.
GPU_BF16_PEAK_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                        ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))
# First match wins: the longer names come before their prefixes ("L40S" before "L40" before "L4").

CONFIGS = {
    "a": "(a) reference-like: fp32, 2nd sketch, text enc. per photo",
    "b": "(b) ours: CLIP online, cached text",
    "c": "(c) ours: cached VxL masks, no CLIP",
}
# The released recipe's batch (train.py's b16 default) and a larger one, measured side by side by default.
DEFAULT_BATCH_SIZES = (2, 16)
CLASS_NAMES = ["airplane", "alarm clock", "ant", "ape", "apple", "armor", "axe", "banana", "bat", "bear",
               "bee", "beetle", "bell", "bench", "bicycle", "blimp", "bread", "butterfly", "cabin", "camel"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Benchmark PuXIM training steps", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="b16", choices=list(ARCHITECTURES))
    p.add_argument("--batch_size", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                   help="triplets per step; several values are measured in turn (default: the released "
                        "recipe's 2 and a larger 16)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast dtype of (b) and (c); (a) is always fp32, as the released code")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and interaction head of (b) and (c) (as train.py --compile)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend of --compile")
    p.add_argument("--clip_weights", default=None, help="OpenAI-format CLIP file (default: random CLIP weights)")
    p.add_argument("--configs", default="abc", help="which configurations to run, e.g. 'ac'")
    p.add_argument("--flops", default="auto", choices=["auto", "on", "off"],
                   help="count FLOPs of one step per configuration (auto: on CUDA only)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: looked up from the GPU's name)")
    p.add_argument("--seed", type=int, default=0)
    add_markdown_flag(p)
    return p


# ----------------------------------------------------------------------------- set-up
def bench_config(arch: str, clip_weights: Optional[str] = None):
    """The preset's configuration with the paper's losses only (the step the released code takes)."""
    return make_config(arch, clip_weights=clip_weights, vit_weights=None, w_cls=0.0, w_inst=0.0)


def build_bench_model(arch: str, clip_weights: Optional[str] = None):
    """PuXIM of the preset with its VxL sampler; b16 without ``clip_weights`` gets a random CLIP ViT-B/16."""
    from models import build_model

    config = bench_config(arch, clip_weights)
    sampler_cfg = get_architecture(arch).sampler
    if sampler_cfg.random_clip is not None or clip_weights is not None:  # the sampler training builds
        return build_model(config)
    import open_clip

    from models import PuXIM, VxLSampler

    # Random weights in OpenAI's architecture (QuickGELU): the same FLOPs as the real CLIP.
    clip = open_clip.CLIP(**open_clip.get_model_config(sampler_cfg.clip_model)).float().eval()
    sampler = VxLSampler(clip, open_clip.get_tokenizer(sampler_cfg.clip_model), surgery_depth=sampler_cfg.surgery_depth)
    base = build_model(config, with_sampler=False)
    return PuXIM(encoder=base.encoder, interaction=base.interaction, sampler=sampler)


def make_batch(model, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random inputs of the preset's size, distinct class names, and the masks (c) reads from a cache."""
    size = model.sampler.image_size  # the encoder's input size too (PuXIM checks the grids agree)
    g = torch.Generator().manual_seed(seed)

    def images():
        return (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(device)  # [B, 3, S, S]

    names = [CLASS_NAMES[i % len(CLASS_NAMES)] + ("" if i < len(CLASS_NAMES) else f" {i}")
             for i in range(2 * batch_size)]
    batch = dict(sketch=images(), sketch2=images(), positive=images(), negative=images(),
                 positive_class=names[:batch_size], negative_class=names[batch_size:])
    masks = model.sampler(torch.cat([batch["positive"], batch["negative"]]), names)  # [2B, N]
    batch["cached_masks"] = (masks[:batch_size], masks[batch_size:])
    return batch


# ----------------------------------------------------------------------------- the steps
def reference_forward(model, batch: dict) -> Dict[str, torch.Tensor]:
    """(a)'s forward, as the released ``Model.forward`` orders the work (see module doc)."""
    sampler, b = model.sampler, batch["sketch"].shape[0]
    photos = torch.cat([batch["positive"], batch["negative"]])  # [2B, 3, S, S]
    names = list(batch["positive_class"]) + list(batch["negative_class"])
    # CLIP text encoder once per photo on ["a", class], no cache (released code), then the same
    # surgery + mask as ours on the features just computed.
    texts = {}
    for name in names:
        sampler._text_cache.clear()
        sampler.text_features([name])  # tokenises and encodes ["a", prompt(name)]
        texts.update(sampler._text_cache)
    sampler._text_cache.update(texts)
    mask = sampler(photos, names)  # [2B, N]: CLIP image tower on the photos, no gradient

    sketches = model.encoder(torch.cat([batch["sketch"], batch["sketch2"]]), "sketch")  # [2B, 1 + N, D]
    sketch_tokens = sketches[:b]  # the second sketch is never used, but backward runs through its rows
    photo_tokens = model.encoder(photos, "photo")  # [2B, 1 + N, D]
    patch_tokens = photo_tokens[:, 1:]  # [2B, N, D]
    memory = photo_tokens
    if model.mask_memory:
        memory = torch.cat([photo_tokens[:, :1], patch_tokens * mask.unsqueeze(-1)], dim=1)
    logits = torch.cat([model.interaction(sketch_tokens, memory[:b]),  # (s, p)   [B, 2]
                        model.interaction(sketch_tokens, memory[b:])])  # (s, n)  [B, 2]
    return {
        "sketch_emb": sketch_tokens[:, 0], "positive_emb": photo_tokens[:b, 0], "negative_emb": photo_tokens[b:, 0],
        "photo_patch_tokens": patch_tokens, "photo_mask": mask, "match_logits": logits,
        "match_labels": torch.cat([torch.ones(b), torch.zeros(b)]).long().to(logits.device),
    }


class ReferenceLike(torch.nn.Module):
    """(a)'s model: ``model`` called through :func:`reference_forward` instead of ``PuXIM.forward``.

    A wrapper, not a copy: the weights, the sampler and the optimizer's parameters are ``model``'s.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> Dict[str, torch.Tensor]:
        return reference_forward(self.model, batch)


TRAIN_KEYS = ("sketch", "positive", "negative", "positive_class", "negative_class")  # a training batch's inputs


def config_batch(batch: dict, config: str) -> dict:
    """The batch ``config``'s step is given: (a) the whole bench batch (it reads the unused 2nd sketch),
    (b) a training batch as the loader yields it, (c) the same with the masks a ``--vxl_cache`` run reads."""
    if config == "a":
        return {k: v for k, v in batch.items() if k != "cached_masks"}
    inputs = {k: batch[k] for k in TRAIN_KEYS}
    if config == "c":
        inputs["positive_mask"], inputs["negative_mask"] = batch["cached_masks"]
    return inputs


def ours_forward(model, batch: dict, cached: bool) -> Dict[str, torch.Tensor]:
    """(b) and (c): ``PuXIM.forward`` on the training batch, with or without the cached masks."""
    return model(config_batch(batch, "c" if cached else "b"))


def make_step(model, criterion, optimizer, batch, config: str, amp_dtype: Optional[torch.dtype],
              scaler) -> Callable[[], dict]:
    """One full training step of ``config``: ``engine.train_step``, the step ``train.py`` takes (forward
    under autocast, fp32 losses, non-finite check, backward, Adam), on the model and batch of ``config``.

    The three configurations run the same step function and differ only in what they pass it: (a)
    the :class:`ReferenceLike` model, the bench batch with the 2nd sketch, and ``amp_dtype=None``,
    ``scaler=None`` (the released code trains in fp32, whatever ``--amp`` says); (b) the model and
    a training batch; (c) the model and a training batch with cached masks. The batch is already on
    its device: the step's ``move_to`` has nothing to copy.
    """
    from engine import train_step

    device = batch["sketch"].device
    if config == "a":
        model, amp_dtype, scaler = ReferenceLike(model), None, None
    inputs = config_batch(batch, config)

    def step() -> dict:
        return train_step(model, criterion, inputs, optimizer, amp_dtype=amp_dtype, scaler=scaler, device=device)[0]

    return step


# ----------------------------------------------------------------------------- measuring
def gpu_peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def peak_tflops_of(gpu_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU from its name (``None`` when unknown: pass --peak_tflops)."""
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS if key in gpu_name), None)


def count_flops(step: Callable[[], dict], device: torch.device) -> int:
    """FLOPs of one step (matmuls, convolutions, attention; forward and backward).

    Two kernels hide their matmuls from ``FlopCounterMode``: ``nn.MultiheadAttention``'s inference
    fast path (CLIP's frozen blocks take it), switched off while counting, and the CPU's fused
    attention, counted through the plain (math) attention on the CPU. CUDA's fused attention
    kernels are counted as they are.
    """
    from contextlib import ExitStack

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with ExitStack() as stack:
            if device.type == "cpu":
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            counter = stack.enter_context(FlopCounterMode(display=False))
            step()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step_models(model, compile_backend: Optional[str] = None) -> dict:
    """The model each configuration trains: one shared model, or with compilation an eager (a).

    With ``compile_backend``, (b) and (c) get ``model`` compiled in place (``models.compile_model``)
    and (a) an eager deep copy of its trained parts with the same weights; the frozen VxL sampler is
    shared, not copied.
    """
    if compile_backend is None:
        return {c: model for c in "abc"}
    import copy

    from models import compile_model

    eager = copy.deepcopy(model, memo={id(model.sampler): model.sampler})
    compile_model(model, backend=compile_backend)
    return {"a": eager, "b": model, "c": model}


def _free_after_oom(device: torch.device, optimizers) -> None:
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batch_size(models: dict, optimizers: dict, criterion, configs, batch_size: int, args,
                       device: torch.device, amp_dtype, scaler, peak_tflops) -> dict:
    """Time ``configs`` at one batch size: warm-up, then interleaved timed rounds (a, b, c, a, ...).

    A configuration that runs out of memory is recorded in ``out_of_memory`` and dropped from the
    rounds; the others go on.
    """
    try:
        batch = make_batch(models["b"], batch_size, device, seed=args.seed)
    except torch.OutOfMemoryError:
        batch = None
    if batch is None:  # not even the masks of one batch fit
        _free_after_oom(device, optimizers.values())
        return {"batch_size": batch_size, "rows": {}, "out_of_memory": list(configs), "ratios": {},
                "best_step_ratios": {}}
    steps = {c: make_step(models[c], criterion, optimizers[c], batch, c, amp_dtype, scaler) for c in configs}
    times, peaks, out_of_memory = _timed_rounds(steps, configs, args.warmup, args.steps, device, optimizers)

    want_flops = args.flops == "on" or (args.flops == "auto" and device.type == "cuda")
    rows = {}
    for c in configs:
        if c in out_of_memory:
            continue
        step_s = sum(times[c]) / len(times[c])
        row = {"name": CONFIGS[c], "precision": "fp32" if c == "a" or amp_dtype is None else args.amp,
               "compiled": models[c] is not models["a"], "samples_per_s": batch_size / step_s,
               "step_ms": 1000 * step_s, "step_ms_min": 1000 * min(times[c]), "step_ms_max": 1000 * max(times[c]),
               "peak_mem_mib": peaks[c] / 2**20 if device.type == "cuda" else None}
        if want_flops:
            row.update(_flop_fields(models, optimizers, criterion, batch, c, device, amp_dtype, scaler, step_s,
                                    peak_tflops))
        rows[c] = row
    others = [c for c in rows if c != "a" and "a" in rows]
    ratios = {f"{c}/a": rows[c]["samples_per_s"] / rows["a"]["samples_per_s"] for c in others}
    # On a shared machine the fastest step is the least disturbed one: its ratio is printed too.
    best_ratios = {f"{c}/a": rows["a"]["step_ms_min"] / rows[c]["step_ms_min"] for c in others}
    del steps, batch
    return {"batch_size": batch_size, "rows": rows, "out_of_memory": out_of_memory, "ratios": ratios,
            "best_step_ratios": best_ratios}


def _timed_rounds(steps: dict, configs, warmup: int, rounds: int, device: torch.device,
                  optimizers: dict) -> tuple:
    """``(times, peaks, out_of_memory)`` of ``warmup`` untimed then ``rounds`` timed interleaved rounds.

    ``times``: ``config -> [seconds of each timed step]``; ``peaks``: ``config -> peak bytes allocated``
    (0 off CUDA); ``out_of_memory``: the configurations that ran out of memory, in that order, skipped
    from then on.
    """
    out_of_memory = []
    times = {c: [] for c in configs}
    peaks = {c: 0 for c in configs}

    def run(c: str, timed: bool) -> None:
        if c in out_of_memory:
            return
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            steps[c]()
            _sync(device)
            elapsed = time.perf_counter() - start
        except torch.OutOfMemoryError:
            out_of_memory.append(c)
        else:
            if timed:
                times[c].append(elapsed)
            if device.type == "cuda":
                peaks[c] = max(peaks[c], torch.cuda.max_memory_allocated(device))
            return
        _free_after_oom(device, optimizers.values())  # outside the except: its traceback holds tensors

    for _ in range(warmup):
        for c in configs:
            run(c, timed=False)
    for _ in range(rounds):
        for c in configs:
            run(c, timed=True)
    return times, peaks, out_of_memory


def _flop_fields(models: dict, optimizers: dict, criterion, batch, config: str, device: torch.device, amp_dtype,
                 scaler, step_s: float, peak_tflops) -> dict:
    """``gflop_per_step``, ``achieved_tflops`` and ``mfu`` of ``config``'s step (all ``None`` when counting
    runs out of memory; ``mfu`` also without a known peak)."""
    # Counted on the eager model (same mathematics): compiled kernels hide their matmuls. The
    # eager step can need more memory than the compiled one that just fit.
    try:
        flops = count_flops(make_step(models["a"], criterion, optimizers["a"], batch, config, amp_dtype,
                                      scaler), device)
    except torch.OutOfMemoryError:
        flops = None
    if flops is None:
        _free_after_oom(device, optimizers.values())
        return dict(gflop_per_step=None, achieved_tflops=None, mfu=None)
    achieved_tflops = flops / step_s / 1e12
    return {"gflop_per_step": flops / 1e9, "achieved_tflops": achieved_tflops,
            "mfu": achieved_tflops / peak_tflops if peak_tflops else None}


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    configs = [c for c in "abc" if c in args.configs]
    if not configs or set(args.configs) - set("abc"):
        raise SystemExit(f"--configs takes letters among a, b, c (got {args.configs!r})")
    if min(args.batch_size) < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("--batch_size and --steps must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked but CUDA is not available here")
    if device.type == "cpu" and args.amp != "none":
        raise SystemExit("--amp bf16/fp16 needs --device cuda (training on the CPU runs in fp32)")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    from losses import build_criterion

    torch.manual_seed(args.seed)
    model = build_bench_model(args.arch, args.clip_weights).to(device).train()
    models = build_step_models(model, args.compile_backend if args.compile else None)
    models["a"].train()
    criterion = build_criterion(bench_config(args.arch, args.clip_weights)).to(device)
    optimizers = {}  # one Adam per distinct model: (a) has its own when (b) and (c) are compiled
    for c in "abc":
        same = next((optimizers[o] for o in optimizers if models[o] is models[c]), None)
        optimizers[c] = same or torch.optim.Adam(models[c].trainable_parameters(), lr=1e-5, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    peak_tflops = gpu_peak_tflops(device, args.peak_tflops)

    runs, active = [], list(configs)
    for batch_size in sorted(set(args.batch_size)):
        if not active:
            break
        run = measure_batch_size(models, optimizers, criterion, active, batch_size, args, device, amp_dtype,
                                 scaler, peak_tflops)
        active = [c for c in active if c not in run["out_of_memory"]]  # a larger batch will not fit either
        runs.append(run)
    largest = {c: max((r["batch_size"] for r in runs if c in r["rows"]), default=None) for c in configs}
    result = {"arch": args.arch, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "amp": args.amp,
              "compile": args.compile_backend if args.compile else None, "peak_bf16_tflops": peak_tflops,
              "runs": runs, "largest_batch": largest}
    print(format_report(result))
    if args.markdown:
        write_page(args.markdown, f"Training step, arch {args.arch}, on {result['device_name']}",
                   markdown_table(result), program="tools.bench_train", argv=argv,
                   notes=f"{args.steps} timed steps per configuration after {args.warmup} warm-up, interleaved; "
                         f"ratios of the mean step time against (a).")
    return result


def _fmt(row: dict, key: str, spec: str) -> str:
    """A row's value formatted, or "n/a" where it was not measured (FLOPs, memory and MFU on a CPU)."""
    value = row.get(key)
    return format(value, spec) if value is not None else "n/a"


def format_table(result: dict, run: dict) -> str:
    compiled = f", (b) and (c) compiled ({result['compile']})" if result["compile"] else ""
    head = (f"PuXIM training step, arch {result['arch']}, batch {run['batch_size']}, {result['device_name']} "
            f"({result['threads']} threads), {result['steps']} timed steps per config after {result['warmup']} "
            f"warm-up, interleaved{compiled}")
    cols = f"{'configuration':<58} {'prec':>5} {'samples/s':>10} {'step ms':>9} {'min..max ms':>15} {'x (a)':>6} " \
           f"{'peak MiB':>9} " \
           f"{'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6}"
    lines = [head, cols, "-" * len(cols)]
    base = run["rows"].get("a")
    for row in run["rows"].values():
        speedup = row["samples_per_s"] / base["samples_per_s"] if base else None
        spread = f"{row['step_ms_min']:.0f}..{row['step_ms_max']:.0f}"
        lines.append(f"{row['name']:<58} {row['precision']:>5} {row['samples_per_s']:>10.3f} {row['step_ms']:>9.1f} "
                     f"{spread:>15} "
                     f"{format(speedup, '.2f') if speedup else 'n/a':>6} {_fmt(row, 'peak_mem_mib', '.0f'):>9} "
                     f"{_fmt(row, 'gflop_per_step', '.1f'):>11} {_fmt(row, 'achieved_tflops', '.2f'):>8} "
                     f"{_fmt(row, 'mfu', '.1%'):>6}")
    for c in run["out_of_memory"]:
        lines.append(f"{CONFIGS[c]:<58} out of memory at batch {run['batch_size']}")
    if run["ratios"]:
        def join(ratios):
            return ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items())

        lines.append(f"samples/s ratios (mean step): {join(run['ratios'])}; "
                     f"(fastest step): {join(run['best_step_ratios'])}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """Every batch size's configurations as one Markdown table (what ``--markdown`` writes)."""
    lines = ["| batch | configuration | precision | samples/s | step (ms) | min..max (ms) | × (a) | peak (MiB) | "
             "GFLOP/step | TFLOP/s | MFU |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        base = run["rows"].get("a")
        for row in run["rows"].values():
            speedup = f"{row['samples_per_s'] / base['samples_per_s']:.2f}×" if base else "n/a"
            lines.append(f"| {run['batch_size']} | {row['name']} | {row['precision']} | {row['samples_per_s']:.3f} | "
                         f"{row['step_ms']:.1f} | {row['step_ms_min']:.0f}..{row['step_ms_max']:.0f} | {speedup} | "
                         f"{_fmt(row, 'peak_mem_mib', '.0f')} | {_fmt(row, 'gflop_per_step', '.1f')} | "
                         f"{_fmt(row, 'achieved_tflops', '.2f')} | {_fmt(row, 'mfu', '.1%')} |")
        lines += [f"| {run['batch_size']} | {CONFIGS[c]} | out of memory | | | | | | | | |"
                  for c in run["out_of_memory"]]
    return "\n".join(lines)


def format_report(result: dict) -> str:
    tables = [format_table(result, run) for run in result["runs"]]
    if len(result["runs"]) > 1:
        tables.append("largest batch that fit: " + ", ".join(
            f"({c}) {bs if bs is not None else 'none'}" for c, bs in result["largest_batch"].items()))
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
