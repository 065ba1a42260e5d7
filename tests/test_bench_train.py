"""tools.bench_train: the three step configurations do what the table says, and the tool reports numbers."""
import pytest
import torch

from losses import build_criterion
from tools import bench_train

B = 2


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = bench_train.build_bench_model("tiny")
    return model, bench_train.make_batch(model, B, torch.device("cpu"))


def _count_calls(model):
    """Record CLIP text/image calls and encoder batch sizes."""
    calls = {"text": 0, "image": 0, "encoder": []}
    clip, sampler = model.sampler.clip, model.sampler
    original_text, original_image = clip.encode_text, sampler.image_tokens
    clip.encode_text = lambda tokens, **kw: (calls.__setitem__("text", calls["text"] + 1),
                                             original_text(tokens, **kw))[1]
    sampler.image_tokens = lambda images: (calls.__setitem__("image", calls["image"] + 1),
                                           original_image(images))[1]
    hook = model.encoder.register_forward_hook(lambda m, a, o: calls["encoder"].append((a[0].shape[0], a[1])))

    def restore():
        del clip.encode_text, sampler.image_tokens
        hook.remove()
    return calls, restore


@pytest.mark.parametrize("config,text_calls,image_calls,encoder_calls", [
    ("a", 2 * B, 1, [(2 * B, "sketch"), (2 * B, "photo")]),  # per-photo text, 2 sketches per sample
    ("b", 0, 1, [(B, "sketch"), (2 * B, "photo")]),  # text features cached after the first step
    ("c", 0, 0, [(B, "sketch"), (2 * B, "photo")]),  # no CLIP at all
])
def test_step_configurations_do_the_documented_work(model_and_batch, config, text_calls, image_calls,
                                                     encoder_calls):
    model, batch = model_and_batch
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-5)
    step = bench_train.make_step(model, build_criterion(bench_train.bench_config("tiny")), optimizer, batch, config,
                                 None, None)
    step()  # warm-up: fills the text cache for (b)
    calls, restore = _count_calls(model)
    try:
        losses = step()
    finally:
        restore()
    assert (calls["text"], calls["image"], calls["encoder"]) == (text_calls, image_calls, encoder_calls)
    assert torch.isfinite(losses["loss"])


def test_reference_forward_computes_the_same_losses(model_and_batch):
    """(a) differs in how it spends work, not in what it computes: same masks, same losses (no dropout)."""
    model, batch = model_and_batch
    model.eval()
    criterion = build_criterion(bench_train.bench_config("tiny"))
    with torch.no_grad():
        ref = bench_train.reference_forward(model, batch)
        ours = bench_train.ours_forward(model, batch, cached=False)
        cached = bench_train.ours_forward(model, batch, cached=True)
    assert torch.equal(ref["photo_mask"], ours["photo_mask"]) and torch.equal(cached["photo_mask"], ours["photo_mask"])
    assert ref["photo_mask"].sum(1).tolist() == [19.0] * (2 * B)
    ref_losses, our_losses = criterion(ref), criterion(ours)
    for name in our_losses:
        torch.testing.assert_close(ref_losses[name], our_losses[name], rtol=1e-5, atol=1e-6)
    model.train()


def test_bench_main_reports_positive_numbers(capsys):
    result = bench_train.main(["--arch", "tiny", "--batch_size", "2", "--steps", "1", "--warmup", "0",
                               "--flops", "on"])
    (run,) = result["runs"]
    assert set(run["rows"]) == {"a", "b", "c"} and set(run["ratios"]) == {"b/a", "c/a"}
    assert run["out_of_memory"] == [] and result["largest_batch"] == {"a": 2, "b": 2, "c": 2}
    for row in run["rows"].values():
        assert row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["gflop_per_step"] > 0
        assert row["peak_mem_mib"] is None and row["mfu"] is None  # CPU: no GPU memory, no peak
        assert row["compiled"] is False
    # FLOPs: (a) does the most work (2nd sketch, text encoder), (c) the least (no CLIP).
    flops = {k: r["gflop_per_step"] for k, r in run["rows"].items()}
    assert flops["a"] > flops["b"] > flops["c"]
    assert run["ratios"]["b/a"] == pytest.approx(run["rows"]["b"]["samples_per_s"]
                                                 / run["rows"]["a"]["samples_per_s"])
    out = capsys.readouterr().out
    assert "(a) reference-like" in out and "samples/s ratios (mean step): b/a = " in out
    assert "largest batch" not in out  # one batch size: no summary line


def test_out_of_memory_drops_a_configuration_from_larger_batches(monkeypatch, capsys):
    """Several batch sizes in one call: (a) 'runs out of memory' from batch 4 on, (b) and (c) go on."""
    real_make_step = bench_train.make_step
    attempts = []

    def make_step(model, criterion, optimizer, batch, config, amp_dtype, scaler):
        step = real_make_step(model, criterion, optimizer, batch, config, amp_dtype, scaler)
        size = batch["sketch"].shape[0]

        def maybe_oom():
            attempts.append((config, size))
            if config == "a" and size >= 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return step()
        return maybe_oom

    monkeypatch.setattr(bench_train, "make_step", make_step)
    result = bench_train.main(["--arch", "tiny", "--batch_size", "4", "2", "8", "--steps", "1", "--warmup", "1"])
    assert [r["batch_size"] for r in result["runs"]] == [2, 4, 8]  # ascending
    assert [sorted(r["rows"]) for r in result["runs"]] == [["a", "b", "c"], ["b", "c"], ["b", "c"]]
    assert [r["out_of_memory"] for r in result["runs"]] == [[], ["a"], []]
    assert ("a", 4) in attempts and ("a", 8) not in attempts  # tried once at 4 (warm-up), never at 8
    assert attempts.count(("a", 4)) == 1
    assert result["runs"][1]["ratios"] == {}  # no (a) to compare with
    assert result["largest_batch"] == {"a": 2, "b": 8, "c": 8}
    out = capsys.readouterr().out
    assert "out of memory at batch 4" in out and "largest batch that fit: (a) 2, (b) 8, (c) 8" in out


def test_compile_leaves_the_reference_configuration_eager(model_and_batch):
    import copy

    model = copy.deepcopy(model_and_batch[0])
    models = bench_train.build_step_models(model, "eager")
    assert models["b"] is model and models["c"] is model and models["a"] is not model
    assert model.encoder._compiled_call_impl is not None and model.interaction._compiled_call_impl is not None
    assert models["a"].encoder._compiled_call_impl is None and models["a"].interaction._compiled_call_impl is None
    assert models["a"].sampler is model.sampler  # the frozen CLIP is shared, not copied
    eager, compiled = models["a"].state_dict(), model.state_dict()
    assert eager.keys() == compiled.keys() and all(torch.equal(eager[k], compiled[k]) for k in eager)
    assert not any(p.data_ptr() == q.data_ptr() for p, q in zip(models["a"].trainable_parameters(),
                                                                  model.trainable_parameters()))


def test_default_batch_sizes_are_the_released_one_and_a_larger_one():
    assert bench_train.get_args_parser().parse_args([]).batch_size == [2, 16]
    result = bench_train.main(["--arch", "tiny", "--steps", "1", "--warmup", "0", "--configs", "c"])
    assert [r["batch_size"] for r in result["runs"]] == [2, 16]
    assert all(r["rows"]["c"]["samples_per_s"] > 0 for r in result["runs"])


def test_bench_main_with_compile():
    result = bench_train.main(["--arch", "tiny", "--batch_size", "2", "--steps", "1", "--warmup", "1",
                               "--configs", "ab", "--compile", "--compile_backend", "eager", "--flops", "on"])
    rows = result["runs"][0]["rows"]
    assert (rows["a"]["compiled"], rows["b"]["compiled"]) == (False, True) and result["compile"] == "eager"
    assert rows["a"]["gflop_per_step"] > rows["b"]["gflop_per_step"] > 0


def test_flop_count_includes_attention():
    """CLIP's MHA fast path and CPU fused attention must not hide FLOPs: check one block by hand."""
    layer = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval().requires_grad_(False)
    x = torch.rand(3, 10, 32)
    flops = bench_train.count_flops(lambda: layer(x, x, x, need_weights=False), torch.device("cpu"))
    # qkv + out projections: 2 * 4 * 32^2 per token; scores and weighted sum: 2 * 2 * 10 * 32 per token.
    assert flops == 3 * 10 * (2 * 4 * 32 * 32 + 2 * 2 * 10 * 32)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_gpu_check_script_logs_each_part_and_returns_the_first_failure(tmp_path):
    """tools/gpu_check.sh (run on GPU machines): its parts run, log to OUT_DIR, and a failure is the exit status."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.sh"

    def run(python, parts):
        env = dict(os.environ, PYTHON=python, PARTS=parts)
        return subprocess.run(["bash", str(script), str(tmp_path / parts.replace(" ", "_"))], env=env,
                              capture_output=True, text=True, timeout=120)

    if torch.cuda.is_available():  # on a GPU machine the CUDA tests would really run, inside this test
        pytest.skip("run tools/gpu_check.sh itself on a GPU machine")
    # One real run (the CUDA tests run once, in one pytest process): the environment part fails without a GPU ...
    no_gpu = run(sys.executable, "environment test_cuda")
    assert no_gpu.returncode == 1 and "no CUDA GPU visible" in no_gpu.stdout
    assert "| torch " in (tmp_path / "environment_test_cuda" / "environment.txt").read_text()
    assert "8 skipped" in (tmp_path / "environment_test_cuda" / "test_cuda.txt").read_text()  # no GPU here
    assert "=== test_cuda: exit 0" in no_gpu.stdout  # ... the next part still runs, the first failure is the status
    assert "bench_bf16" not in no_gpu.stdout and "bench_compile" not in no_gpu.stdout  # only the parts asked for
    # The exit status and the parts run, with a stand-in Python that passes (true) or fails (false) at once.
    ok = run("true", "test_cuda")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "=== test_cuda: exit 0" in ok.stdout and "=== environment" not in ok.stdout  # only the parts asked for
    failed = run("false", "environment")
    assert failed.returncode == 1 and "=== environment: exit 1" in failed.stdout


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA L40", 181.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla V100-SXM2-32GB", None)])
def test_gpu_peak_lookup_prefers_the_longest_name(name, peak):
    assert bench_train.peak_tflops_of(name) == peak
