"""Speed settings change how fast, not what: each one against the plain run.

In process: the rewrites against the layers they replace, the settings' rules, the capture's
bookkeeping (warm-up steps that must leave no trace) on the CPU; the job's runs under each
setting are in tests/integration/test_speed_settings.py.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from train import noise
from train.config import ConfigError, load_config
from train.plan import effective_lr
from train.data import EpochOrder, Split
from train.loop import batch_maker, build_optimizer, epoch_batches
from train.model import ConvDenoiser, UNet
from train.speed.cuda_graph import CapturedStep
from train.speed.thin_conv import PaddedConv2d, pad_thin_convs

def test_lr_scaling_rules():
    cfg = load_config(None, ["train.lr=0.001", "train.lr_scaling=sqrt"])
    assert effective_lr(cfg.train, 80) == pytest.approx(0.002)  # sqrt(80 / 20) = 2
    assert effective_lr(cfg.train, 20) == pytest.approx(0.001)
    linear = load_config(None, ["train.lr_scaling=linear", "train.lr_reference_batch=10"])
    assert effective_lr(linear.train, 40) == pytest.approx(0.004)
    assert effective_lr(load_config(None, []).train, 5000) == pytest.approx(0.001)  # none: as given
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config(None, ["train.lr_scaling=cubic"])


def test_noise_key_as_device_tensor_matches_the_int_key():
    idx = torch.arange(50, 70)
    key = noise.stream_key(3, 7)
    as_tensor = noise.keyed_gaussian(idx, (1, 28, 28), torch.tensor(key, dtype=torch.int32))
    assert torch.equal(as_tensor, noise.keyed_gaussian(idx, (1, 28, 28), key))


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


def test_host_memory_is_kept_only_when_asked_and_a_refusal_is_a_note(monkeypatch):
    import train.speed.host_memory as host_memory
    from train.perf import maybe_keep_freed_host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_host_memory", lambda: calls.append(1) or False)
    assert maybe_keep_freed_host_memory(load_config(None, []).perf) == [] and calls == []
    notes = maybe_keep_freed_host_memory(load_config(None, ["perf.reuse_host_memory=true"]).perf)
    assert calls == [1] and len(notes) == 1 and notes[0].startswith("perf.reuse_host_memory had no effect")


def test_fast_cpu_yaml_asks_for_the_two_cpu_rewrites_and_the_default_for_none():
    fast, default = load_config(str(REPO / "configs" / "fast_cpu.yaml"), []).perf, load_config(None, []).perf
    assert fast.cpu_layers and fast.reuse_host_memory
    assert not default.cpu_layers and not default.reuse_host_memory


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


