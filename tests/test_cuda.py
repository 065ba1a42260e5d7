"""CUDA checks: fp32 against the CPU, bf16/fp16 mixed precision, torch.compile, several GPUs.

Skipped where there is no CUDA GPU (CI, a laptop): the CPU suite does not depend on them. On a GPU
machine run ``python -m pytest -q tests/test_cuda.py`` or ``tools/gpu_check.sh`` (these tests, then
the training-step benchmark of the paper's model). Tiny preset, synthetic data, about a minute.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import train_args  # tests/ is on sys.path

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

REPO = Path(__file__).resolve().parent.parent
B = 4


@contextlib.contextmanager
def no_tf32():
    """Plain fp32 on the GPU (cuDNN convolutions use TF32 by default), for comparisons with the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tiny_model_and_batch(device):
    from tools.bench_train import build_bench_model, make_batch

    torch.manual_seed(0)
    model = build_bench_model("tiny").to(device).train()
    batch = make_batch(model, B, torch.device(device), seed=0)
    return model, {k: batch[k] for k in ("sketch", "positive", "negative", "positive_class", "negative_class")}


def step(model, batch, amp_dtype=None):
    """One training step as train.py takes it (``engine.train_step``: forward under autocast, fp32 losses,
    backward, a GradScaler for fp16), with a zero learning rate so the weights stay as they were;
    returns losses, gradients (unscaled) and the mask."""
    from engine import train_step
    from losses import build_criterion

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.0)  # p - 0 * grad: the weights stay
    # fp16 needs its loss scaled, as GradScaler does in training, or small gradients underflow; its
    # step unscales the gradients in place before the (zero) update.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12) if amp_dtype == torch.float16 else None
    losses, out = train_step(model, build_criterion(SimpleNamespace()), batch, optimizer, amp_dtype=amp_dtype,
                             scaler=scaler)
    if scaler is not None:
        assert scaler.get_scale() == 2.0 ** 12, "the scaled gradients overflowed: GradScaler skipped the step"
    grads = torch.cat([p.grad.flatten().float() for p in model.trainable_parameters()])
    return {k: v.item() for k, v in losses.items()}, grads, out["photo_mask"]


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_fp32_on_cuda_matches_the_cpu():
    model, batch = tiny_model_and_batch("cpu")
    cpu_losses, cpu_grads, cpu_mask = step(model, batch)
    with no_tf32():
        gpu_losses, gpu_grads, gpu_mask = step(model.cuda(), to_device(batch, "cuda"))
    for name, value in cpu_losses.items():
        assert gpu_losses[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(gpu_grads.cpu(), cpu_grads, rtol=1e-3, atol=1e-5)
    assert torch.equal(gpu_mask.cpu(), cpu_mask)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_is_close_to_fp32(amp_dtype):
    if amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model, batch = tiny_model_and_batch("cuda")
    batch = to_device(batch, "cuda")
    with no_tf32():
        ref_losses, ref_grads, ref_mask = step(model, batch)
    losses, grads, mask = step(model, batch, amp_dtype)
    for name, value in ref_losses.items():
        assert losses[name] == pytest.approx(value, rel=5e-2, abs=1e-3), name
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    assert cosine > 0.99, cosine
    # The VxL CLIP runs under the same autocast: its keep-masks may differ at the 30% boundary.
    agreement = (mask == ref_mask).float().mean().item()
    print(f"\n{amp_dtype}: loss {losses['loss']:.5f} vs fp32 {ref_losses['loss']:.5f}, grad cosine {cosine:.5f}, "
          f"mask agreement {agreement:.4f}")
    assert agreement > 0.9, agreement


def test_compiled_model_matches_eager_on_cuda():
    import copy

    from models import compile_model

    model, batch = tiny_model_and_batch("cuda")
    batch = to_device(batch, "cuda")
    compiled = compile_model(copy.deepcopy(model), backend="inductor")
    with no_tf32():
        eager_losses, eager_grads, _ = step(model, batch)
        compiled_losses, compiled_grads, _ = step(compiled, batch)
    for name, value in eager_losses.items():
        assert compiled_losses[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- train.py / test.py
def run(cmd, root, out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NVIDIA_TF32_OVERRIDE="0")  # plain fp32 where fp32 is asked
    args = train_args(root, out, "e", "--epoch", "2", "--datasetLen", "32", "--batch_size", "8", "--seed", "5", *extra,
                      num_workers=2, device="cuda")
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "e" / "log.txt").read_text().splitlines()]


def test_fp16_training_with_grad_scaler_and_evaluation_on_both_devices(bench, tmp_path):
    """train.py --amp fp16 (GradScaler) on the GPU; test.py in fp32 on the GPU and on the CPU agree."""
    import numpy as np

    log = run([sys.executable, "train.py"], bench, tmp_path, "--amp", "fp16")
    assert all(np.isfinite(line["train_loss"]) for line in log)
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "e" / "checkpoint.pth")
    adam_steps = int(ckpt["optimizer"]["state"][0]["step"])  # GradScaler skips overflowing steps
    assert ckpt["global_step"] == 8 and 4 <= adam_steps <= 8, adam_steps
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    results = {}
    for device in ("cuda", "cpu"):
        proc = subprocess.run([sys.executable, "test.py", "--exp", "e", "--output_dir", str(tmp_path),
                               "--device", device, "--amp", "none", "--num_workers", "0", "--no_progress",
                               "--save_features", "--out", str(tmp_path / device)],
                              cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[device] = (json.loads((tmp_path / device / "metrics.json").read_text())["metrics"],
                           np.load(tmp_path / device / "features.npz"))
    (gpu_metrics, gpu_feats), (cpu_metrics, cpu_feats) = results["cuda"], results["cpu"]
    for part in ("query", "gallery"):  # the same embeddings (cuDNN's TF32 convolutions aside)
        a, b = gpu_feats[part], cpu_feats[part]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.999, (part, cosine.min())
    for key in ("mAP@all", "P@100"):  # 8 photos: one swapped pair of near-equal scores moves mAP a little
        assert gpu_metrics[key] == pytest.approx(cpu_metrics[key], abs=0.05), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_match_one_gpu(bench, tmp_path):
    """torchrun on 2 GPUs (NCCL, SyncBatchNorm in the tiny stem) = one GPU with the same global batch."""
    fp32 = ("--amp", "none", "--dropout", "0")
    single = run([sys.executable, "train.py"], bench, tmp_path / "one", *fp32)
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"],
              bench, tmp_path / "two", *fp32)
    for a, b in zip(single, ddp):
        for key in ("train_loss", "train_loss_tri", "train_loss_rec", "train_loss_int"):
            assert b[key] == pytest.approx(a[key], abs=1e-3), key
        assert b["test_mAP@all"] == pytest.approx(a["test_mAP@all"], abs=0.05)  # 8 photos: one swap moves it
    # The default multi-GPU path (bf16 autocast, SyncBatchNorm, DDP) runs and learns something finite.
    default = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"],
                  bench, tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(line["train_loss"])) for line in default)


def test_train_py_with_compile_and_bf16_on_cuda(bench, tmp_path):
    """--compile (inductor) through training and the per-epoch evaluation, as a user runs it."""
    log = run([sys.executable, "train.py"], bench, tmp_path, "--compile", "--epoch", "1")
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["train_loss"])) and log[0]["test_mAP@all"] > 0


def test_bench_train_reports_memory_and_mfu_on_cuda():
    from tools import bench_train

    result = bench_train.main(["--arch", "tiny", "--device", "cuda", "--amp", "bf16", "--batch_size", "2", "4",
                               "--steps", "2", "--warmup", "1", "--peak_tflops", "100"])
    for run_ in result["runs"]:
        for row in run_["rows"].values():
            assert row["peak_mem_mib"] > 0 and 0 < row["mfu"] < 1 and row["gflop_per_step"] > 0
