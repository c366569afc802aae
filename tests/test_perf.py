"""Speed settings change how fast, not what: each one against the plain run.

The CUDA graph tests need a GPU (marker `gpu`); the bookkeeping around the capture (warm-up
steps that must leave no trace, static inputs) is checked here on the CPU too.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_weights, read_metrics, run_main
from train import noise
from train.config import ConfigError, load_config
from train.data import EpochOrder, Split
from train.loop import batch_maker, build_optimizer, epoch_batches
from train.model import ConvDenoiser, UNet
from train.speed.cuda_graph import CapturedStep
from train.speed.thin_conv import PaddedConv2d, pad_thin_convs

SMALL = ["--config", "configs/debug.yaml", "train.epochs=1", "logging.wandb_mode=disabled", "logging.every_n_steps=5"]


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def test_lr_scaling_rules():
    cfg = load_config(None, ["train.lr=0.001", "train.lr_scaling=sqrt"])
    assert cfg.train.effective_lr(80) == pytest.approx(0.002)  # sqrt(80 / 20) = 2
    assert cfg.train.effective_lr(20) == pytest.approx(0.001)
    linear = load_config(None, ["train.lr_scaling=linear", "train.lr_reference_batch=10"])
    assert linear.train.effective_lr(40) == pytest.approx(0.004)
    assert load_config(None, []).train.effective_lr(5000) == pytest.approx(0.001)  # none: as given
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config(None, ["train.lr_scaling=cubic"])


def test_noise_key_as_device_tensor_matches_the_int_key():
    idx = torch.arange(50, 70)
    key = noise.stream_key(3, 7)
    as_tensor = noise.keyed_gaussian(idx, (1, 28, 28), torch.tensor(key, dtype=torch.int32))
    assert torch.equal(as_tensor, noise.gaussian(idx, (1, 28, 28), 3, 7))


@pytest.mark.parametrize("spec", [noise.NoiseSpec(), noise.NoiseSpec("gaussian", 0.2, 0.8),
                                  noise.NoiseSpec("salt_pepper", 0.1, 0.5)], ids=["fixed", "levels", "salt_pepper"])
def test_an_epochs_batches_made_at_once_equal_the_per_step_ones(spec):
    """Under perf.cuda_graphs the epoch's batches are made in one pass: bit for bit the same
    images and noise as making them step by step (the eager path)."""
    images = torch.randint(0, 256, (3000, 1, 28, 28), dtype=torch.uint8)
    make = batch_maker(Split(images, torch.zeros(3000, dtype=torch.int64)), spec)
    order = EpochOrder(3000, 20, 1, 0, seed=5)
    epoch_indices = order.epoch_indices(2, torch.device("cpu"))
    key = torch.tensor(noise.stream_key(5, 2), dtype=torch.int32)
    clean_all, noisy_all = epoch_batches(make, epoch_indices, key)
    assert clean_all.shape == noisy_all.shape == (order.steps_per_epoch, 20, 1, 28, 28)
    for m in range(order.steps_per_epoch):
        clean, noisy = make(epoch_indices[m], key)
        assert torch.equal(clean_all[m], clean) and torch.equal(noisy_all[m], noisy), m


def _trained(steps: int, captured: bool) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = ConvDenoiser()
    opt = build_optimizer(model, 1e-3)
    images = torch.rand(64, 1, 28, 28)

    def step(clean, noisy):
        loss = F.mse_loss(model(noisy), clean)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    runner = CapturedStep(step, torch.rand(8, 1, 28, 28), model, opt) if captured else None
    for i in range(steps):
        indices = torch.arange(8) + 8 * (i % 8)
        clean = images[indices]
        noisy = noise.add_noise(clean, indices, 0.5, seed=0, epoch=i // 8)
        if runner:
            runner.replay(clean, noisy)
        else:
            step(clean, noisy)
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def test_capture_warmup_leaves_no_trace():
    """The warm-up steps before capture train the model; what they changed is put back, so
    the run equals one without them (on the CPU the replay is eager: same bookkeeping)."""
    for steps in (0, 12):
        plain, plain_opt = _trained(steps, captured=False)
        with_warmup, warm_opt = _trained(steps, captured=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, with_warmup))
        for p, w in zip(plain_opt["state"].values(), warm_opt["state"].values()):
            assert all(torch.equal(p[k], w[k]) for k in p)


def test_cuda_graphs_are_refused_where_they_cannot_run(tiny_mnist, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    out = tmp_path / "run"
    result = run_main(SMALL + [f"data.root={tiny_mnist}", f"output_dir={out}", "perf.cuda_graphs=true"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: perf.cuda_graphs=true needs a CUDA GPU (there is none): set perf.cuda_graphs=false or fix that"]


@pytest.mark.parametrize("device, processes, accumulation, precision, problem", [
    ("cuda", 2, 1, "no", "one process (this launch has 2"),
    ("cuda", 1, 4, "no", "train.gradient_accumulation_steps=1"),
    ("cuda", 1, 1, "fp16", "no fp16"),
])
def test_cuda_graphs_refuse_what_a_capture_cannot_hold(device, processes, accumulation, precision, problem):
    from types import SimpleNamespace

    from train.distributed import LaunchError
    from train.perf import check_perf

    cfg = load_config(None, ["perf.cuda_graphs=true", f"train.gradient_accumulation_steps={accumulation}"])
    scheduled = load_config(None, ["perf.cuda_graphs=true", "train.lr_schedule=cosine"])
    with pytest.raises(LaunchError, match="train.lr_schedule=constant"):  # the graph keeps its learning rate
        check_perf(scheduled.perf, scheduled.train, SimpleNamespace(device=torch.device("cuda"), num_processes=1,
                                                                    mixed_precision="no"))
    launch = SimpleNamespace(device=torch.device(device), num_processes=processes, mixed_precision=precision)
    with pytest.raises(LaunchError, match=re.escape(problem)):
        check_perf(cfg.perf, cfg.train, launch)
    allowed = load_config(None, ["perf.cuda_graphs=true"])  # one GPU, bf16, no accumulation
    check_perf(allowed.perf, allowed.train, SimpleNamespace(device=torch.device("cuda"), num_processes=1,
                                                            mixed_precision="bf16"))


def test_channels_last_and_compile_train_the_same_model(tiny_mnist, tmp_path):
    """Other kernels, same arithmetic: weights agree to rounding after an epoch of steps,
    and the train log carries the memory figures."""
    base = SMALL + [f"data.root={tiny_mnist}", "data.train_samples=96"]
    runs = {"plain": ["perf.channels_last=false", "perf.cpu_layers=false"], "channels_last": [],
            "compiled": ["perf.compile=true"], "padded": ["perf.pad_thin_convs=true"]}
    for name, extra in runs.items():
        _ok(run_main(base + extra + [f"output_dir={tmp_path / name}"], timeout=600))
    ref = load_weights(tmp_path / "plain")
    for name in runs:
        got = load_weights(tmp_path / name)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5), (name, k, (got[k] - ref[k]).abs().max())
    record = next(m for m in read_metrics(tmp_path / "plain") if "train/loss" in m)
    assert 0.05 < record["memory/max_rss_gib"] < 64


def _padded_against_plain(model: torch.nn.Module, device: str, channels_last: bool, precision: str):
    """(output, parameter gradients, state-dict names) after one forward and backward pass of
    `model` and of its copy with padded thin convs, on the same batch."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28, device=device)
    results = []
    for pad in (False, True):
        m = copy.deepcopy(model).to(device)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        if pad:
            assert pad_thin_convs(m, channels_last) == 2  # the first conv and the last
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = m(x)
        ((y.float() - x) ** 2).mean().backward()
        results.append((y.float(), [p.grad for p in m.parameters()], list(m.state_dict())))
    return results


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("make", [ConvDenoiser, lambda: UNet(8, 2)], ids=["conv_denoiser", "unet"])
def test_padded_thin_convs_compute_what_the_plain_ones_do(make, channels_last):
    (y, grads, names), (y_pad, grads_pad, names_pad) = _padded_against_plain(make(), "cpu", channels_last, "no")
    assert names_pad == names  # same parameters: checkpoints do not change
    assert y_pad.shape == y.shape and torch.allclose(y_pad, y, atol=1e-6)
    for g, g_pad in zip(grads, grads_pad, strict=True):
        assert g_pad.shape == g.shape and torch.allclose(g_pad, g, atol=1e-6, rtol=1e-4)


def test_only_thin_plain_convs_are_padded():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 1, groups=4),
                                torch.nn.ConvTranspose2d(4, 1, 2), torch.nn.Conv2d(4, 1, 1))
    assert pad_thin_convs(model, channels_last=False) == 2
    assert [type(m) is PaddedConv2d for m in model] == [True, False, False, False, True]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_apply_perf_applies_each_setting_and_says_which_do_not_apply_here(precision, monkeypatch):
    """The job's one path from `perf.*` to the model: the rewrites asked for, cuDNN's kernel
    choice, and a note for what does not apply."""
    from train.perf import apply_perf

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    model = ConvDenoiser()
    names = list(model.state_dict())
    perf = load_config(None, ["perf.pad_thin_convs=true", "perf.cpu_layers=true"]).perf
    notes = apply_perf(model, perf, "cpu", precision)
    assert type(model.encoder[0]) is PaddedConv2d and type(model.decoder[6]) is PaddedConv2d
    assert model.decoder[6].weight.is_contiguous(memory_format=torch.channels_last)  # perf.channels_last's default
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert list(model.state_dict()) == names  # checkpoints do not change
    cpu_forms = type(model.decoder[2]) is not torch.nn.ConvTranspose2d  # kernel 2, stride 2: a CPU form
    assert cpu_forms == (precision == "no")
    assert any(n.startswith("perf.cpu_layers not applied: mixed precision bf16") for n in notes) == (precision == "bf16")


def test_the_default_run_trains_model_py_as_written_without_the_speed_package(tiny_mnist, tmp_path):
    """No layer swapped and train.speed never imported unless a perf.* setting asks."""
    probe = ("import sys, train.perf as p, train.model as m; real = p.apply_perf; seen = []\n"
             "def spy(model, *a):\n"
             "    notes = real(model, *a); seen.append([type(x) for x in model.modules()]); return notes\n"
             "p.apply_perf = spy\n"
             "from train.main import main; code = main(sys.argv[2:])\n"
             "print('as written', seen == [[type(x) for x in m.ConvDenoiser().modules()]])\n"
             "print('speed', sorted(n for n in sys.modules if n.startswith('train.speed'))); sys.exit(code)")
    base = SMALL + [f"data.root={tiny_mnist}", "train.max_steps=2"]
    result = _ok(run_main(base + [f"output_dir={tmp_path / 'default'}"], launcher=[sys.executable, "-c", probe],
                          env={"CUDA_VISIBLE_DEVICES": ""}))
    assert "as written True" in result.stdout and "speed []" in result.stdout
    result = _ok(run_main(base + [f"output_dir={tmp_path / 'fast'}", "--config", "configs/fast_cpu.yaml"],
                          launcher=[sys.executable, "-c", probe], env={"CUDA_VISIBLE_DEVICES": ""}))
    assert "as written False" in result.stdout
    assert "speed ['train.speed', 'train.speed.cpu_layers', 'train.speed.host_memory']" in result.stdout


def _imports(path) -> set[str]:
    """The train.* modules a file imports, anywhere in it (function-level imports too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("train.")}


def test_the_core_imports_the_speed_package_only_where_a_setting_asks_and_has_no_import_cycle():
    import ast

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "train").rglob("*.py")}
    for name, path in modules.items():
        if name.startswith("train.speed"):
            continue
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        imported = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        assert not any(m.startswith("train.speed") for m in imported), f"{name} imports train.speed unconditionally"
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, path + [name])
            done.add(name)

    for name in graph:
        visit(name, [])


# -- on a GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cuda_graph_run_matches_the_eager_run(mnist_root, tmp_path, precision):
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    f"train.mixed_precision={precision}"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'eager'}"]))
    _ok(run_main(base + [f"output_dir={tmp_path / 'graph'}", "perf.cuda_graphs=true"]))
    eager, graph = load_weights(tmp_path / "eager"), load_weights(tmp_path / "graph")
    for k in eager:  # the same deterministic kernels replayed; only Adam's capturable variant rounds apart
        assert torch.allclose(graph[k], eager[k], atol=1e-5), (k, (graph[k] - eager[k]).abs().max())
    le, lg = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "graph")
    assert [m["step"] for m in le] == [m["step"] for m in lg]
    assert lg[-1]["eval/psnr_db"] == pytest.approx(le[-1]["eval/psnr_db"], abs=0.05)
    assert any("memory/max_allocated_gib" in m for m in lg)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_padded_thin_convs_compute_what_the_plain_ones_do_on_a_gpu(precision):
    """cuDNN's kernels for 1 and for 8 channels sum in other orders: equal to rounding
    (bf16 keeps 8 bits of mantissa: 1e-2 of a gradient's largest entry)."""
    (y, grads, _), (y_pad, grads_pad, _) = _padded_against_plain(ConvDenoiser(), "cuda", True, precision)
    tol = 2e-2 if precision == "bf16" else 1e-3
    assert torch.allclose(y_pad, y, atol=tol)
    for g, g_pad in zip(grads, grads_pad, strict=True):
        assert (g_pad - g).abs().max() <= tol * g.abs().max(), (g_pad - g).abs().max()


@pytest.mark.gpu
def test_the_fastest_gpu_settings_train_like_the_plain_run(mnist_root, tmp_path):
    """A compiled model with padded thin convs, replayed as a CUDA graph (the large-batch
    setting of docs/performance.md) learns what the eager run learns, to bf16's rounding."""
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    "train.mixed_precision=bf16", "train.epochs=5"]
    fast = ["perf.compile=true", "perf.pad_thin_convs=true", "perf.cuda_graphs=true", "perf.cudnn_benchmark=true"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'eager'}"]))
    _ok(run_main(base + fast + [f"output_dir={tmp_path / 'fast'}"], timeout=600))
    le, lf = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "fast")
    assert [m["step"] for m in lf] == [m["step"] for m in le]
    end_eager, end_fast = le[-1], lf[-1]
    # Other kernels round apart over 500 steps; a graph that stopped training would sit dB below.
    assert end_fast["eval/psnr_db"] == pytest.approx(end_eager["eval/psnr_db"], abs=0.75)
    assert end_fast["eval/psnr_db"] > end_fast["eval/noisy_psnr_db"] + 2


@pytest.mark.gpu
def test_cuda_graph_run_resumes_exactly(mnist_root, tmp_path):
    """Stopped after 60 steps and resumed (a new capture from the checkpoint's state), the
    run ends where an uninterrupted graphed run ends."""
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    "perf.cuda_graphs=true", "train.epochs=2", "checkpoint.every_n_steps=60"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'whole'}"]))
    split = tmp_path / "split"
    stopped = run_main(base + [f"output_dir={split}"], env={"DENOISE_FAULT": "after_step:61"})
    assert stopped.returncode != 0
    _ok(run_main(base + [f"output_dir={split}"]))
    whole, resumed = load_weights(tmp_path / "whole"), load_weights(split)
    for k in whole:
        assert torch.allclose(resumed[k], whole[k], atol=1e-6), (k, (resumed[k] - whole[k]).abs().max())


# A fresh process trains a few steps at batch 64 (one thread) and prints the page faults of
# its last ones; argv[1] says whether it first calls keep_freed_host_memory. The least of
# three windows: once in four CI runs a one-off burst (1,568 faults in one window of 10
# steps) pushed a single window over the bound; an unkept process faults in every window.
_FAULTS_PER_STEP = """
import resource, sys
import torch
from train.speed.host_memory import keep_freed_host_memory
from train.model import ConvDenoiser
kept = sys.argv[1] == "keep" and keep_freed_host_memory()
model = ConvDenoiser().to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.rand(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), x).backward()
    optimizer.step()
for _ in range(3):
    step()
windows = []  # faults per step over 3 windows of 10 steps; the quietest one is printed
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(kept, min(windows))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc")
def test_reused_host_memory_takes_the_page_faults_out_of_a_step():
    """Without the setting each step faults its activations' pages in afresh (thousands per
    step at batch 64); with it, the pages of the step before are reused."""
    per_step = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        kept, faults = result.stdout.split()
        assert kept == str(mode == "keep")
        per_step[mode] = float(faults)
    assert per_step["default"] > 1000, per_step  # the problem is there to be solved
    assert per_step["keep"] < 20, per_step


def test_the_job_keeps_freed_host_memory_unless_told_not_to(tiny_mnist, tmp_path):
    """main.py makes the call once per process when perf.reuse_host_memory is on (off by
    default), and says so where the C library cannot take it."""
    # run_main puts main.py's path first, so the job's own arguments start at argv[2].
    patched = ("import sys, train.speed.host_memory as h; calls = []; "
               "h.keep_freed_host_memory = lambda: calls.append(1) or False; "
               "from train.main import main; code = main(sys.argv[2:]); print('calls', len(calls)); sys.exit(code)")
    base = SMALL + [f"data.root={tiny_mnist}", "train.max_steps=2"]
    for setting, calls in ((["perf.reuse_host_memory=true"], 1), ([], 0)):
        result = run_main(base + setting + [f"output_dir={tmp_path / str(calls)}"],
                          launcher=[sys.executable, "-c", patched])
        _ok(result)
        assert f"calls {calls}" in result.stdout
        assert ("perf.reuse_host_memory had no effect" in result.stdout + result.stderr) == bool(calls)
