"""perf.fuse_first_block: the first conv, its ReLU and its max-pool as one op (train/first_block.py).

On the CPU: the op's reference form against nn's three layers in float64, the op's
registration (torch.library.opcheck: schema, fake tensors for compile, autograd), the swap
into models, the whole job with the setting, and the Triton kernels in Triton's interpreter.
On a GPU (marker `gpu`): the kernels themselves, the fused model, eager and compiled,
against the plain one, and the job under a CUDA graph against the plain job.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_weights, read_metrics, run_main
from train.config import ConfigError, load_config
from train.first_block import FusedFirstBlock, first_block, first_block_backward, fuse_first_block
from train.model import ConvDenoiser, UNet
from train.thin_conv import pad_thin_convs

SMALL = ["--config", "configs/debug.yaml", "train.epochs=1", "logging.wandb_mode=disabled", "logging.every_n_steps=5"]
PROBE = REPO / "tests" / "probes" / "first_block_probe.py"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _digits(n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Random images with blank and saturated rows, where pooling windows hold equal values."""
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[:, :, :6] = 0.0
    x[:, :, -4:] = 1.0
    return x


def _fused_against_plain(device: str, precision: str, channels_last: bool, compiled: bool = False,
                         padded: bool = False):
    """(output, parameter gradients, state-dict names) of the reference model and of its copy
    with the fused first block, after one forward and backward pass on the same batch.
    `padded`: the copy's other thin conv (the last) padded too, as the job does after fusing."""
    torch.manual_seed(0)
    dtype = torch.float64 if device == "cpu" and precision == "no" else torch.float32
    plain = ConvDenoiser().to(device, dtype)
    x = _digits(8, dtype).to(device)
    results = []
    for fuse in (False, True):
        model = copy.deepcopy(plain)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if fuse:
            assert fuse_first_block(model, channels_last) == 1
            if padded:  # the fused block is no plain nn.Conv2d: only the last conv is padded
                assert pad_thin_convs(model, channels_last) == 1
            if compiled:
                model.compile()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = model(x)
        ((y.float() - x.float()) ** 2).mean().backward()
        results.append((y.double(), [p.grad.double() for p in model.parameters()], list(model.state_dict())))
    return results


@pytest.mark.parametrize("padded", [False, True], ids=["last_plain", "last_padded"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_fused_block_computes_what_nns_layers_do(channels_last, padded):
    (y, grads, names), (y_fused, grads_fused, names_fused) = _fused_against_plain("cpu", "no", channels_last,
                                                                                  padded=padded)
    assert names_fused == names  # the same parameters: checkpoints do not change
    assert torch.allclose(y_fused, y, rtol=0, atol=1e-12)
    for g, g_fused in zip(grads, grads_fused, strict=True):
        assert (g_fused - g).abs().max() <= 1e-10 * g.abs().max()


def test_the_first_position_holding_a_windows_maximum_takes_its_gradient():
    """With zero weights every position of a window holds the bias: a four-way tie. nn's pool
    gives the gradient to the first position (row-major), so the weights' gradient is that
    of the top-left patches; any other choice gives other patches, and another gradient."""
    x = _digits(3)
    weight = torch.zeros(32, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.linspace(0.1, 1.0, 32, dtype=torch.float64, requires_grad=True)
    out = F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=1)), 2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad)
    taps = torch.cat([weight.detach().reshape(32, 9).t(), bias.detach()[None]])
    got = first_block_backward(grad, x, taps)
    assert torch.allclose(got[:9].t().reshape(32, 1, 3, 3), weight.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[9], bias.grad, rtol=1e-12, atol=1e-12)
    last_position = F.unfold(x, 3, padding=1).view(3, 9, 14, 2, 14, 2)[:, :, :, 1, :, 1]  # the bottom-right patches
    assert not torch.allclose(torch.einsum("nthw,nchw->tc", last_position, grad), got[:9], atol=1e-3)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_op_is_registered_for_compile_and_autograd(out_dtype):
    """opcheck: the schema, the fake kernel (what torch.compile traces) against the real one,
    and the autograd registration; then gradcheck of the reference form in float64."""
    x = _digits(2, torch.float32)
    taps = torch.randn(10, 32, requires_grad=True)
    torch.library.opcheck(first_block, (x, taps, out_dtype, True))
    grad = torch.randn(2, 32, 14, 14)
    torch.library.opcheck(first_block_backward, (grad, x, taps.detach()))
    x64, taps64 = x[:1, :, :8, :8].double(), torch.randn(10, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: first_block(x64, t, torch.float64, False), (taps64,))


def test_the_op_refuses_what_it_does_not_compute():
    taps = torch.randn(10, 32, requires_grad=True)
    with pytest.raises(ValueError, match="H and W even"):
        first_block(torch.rand(2, 1, 27, 28), taps, torch.float32, False)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with pytest.raises(RuntimeError, match="input's gradient"):
        first_block(x, taps, torch.float32, False).sum().backward()


def test_only_the_reference_models_first_block_is_fused():
    model = ConvDenoiser()
    assert fuse_first_block(model, channels_last=True) == 1
    assert type(model.encoder[0]) is FusedFirstBlock and model.encoder[0].channels_last
    assert [type(m).__name__ for m in model.encoder[1:3]] == ["Identity", "Identity"]
    assert fuse_first_block(model, channels_last=True) == 0  # already fused
    assert fuse_first_block(UNet(8, 2), channels_last=False) == 0  # conv -> ReLU -> conv: nothing to fuse
    no_bias = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    assert fuse_first_block(no_bias, False) == 0 and fuse_first_block(wide, False) == 0  # 24: not a kernel tile


def test_the_job_with_the_fused_block_learns_what_the_plain_job_does(tiny_mnist, tmp_path):
    """Through train/main.py on the CPU (where the op runs as tensor ops): the same weights
    after an epoch to fp32 rounding, and checkpoints the plain model loads."""
    base = SMALL + [f"data.root={tiny_mnist}"]
    said = {}
    for name, extra in (("plain", []), ("fused", ["perf.fuse_first_block=true"])):
        result = run_main(base + extra + [f"output_dir={tmp_path / name}"])
        assert result.returncode == 0, result.stderr[-3000:]
        said[name] = result.stdout + result.stderr
    plain, fused = load_weights(tmp_path / "plain"), load_weights(tmp_path / "fused")
    assert plain.keys() == fused.keys()
    for k in plain:
        assert torch.allclose(fused[k], plain[k], atol=1e-5), (k, (fused[k] - plain[k]).abs().max())
    assert "perf.fuse_first_block on cpu: the first block runs as plain tensor ops" in said["fused"]
    assert "perf.fuse_first_block on" not in said["plain"]
    assert [m["step"] for m in read_metrics(tmp_path / "fused")] == [m["step"] for m in read_metrics(tmp_path / "plain")]


def test_fusing_a_model_without_the_block_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'perf.fuse_first_block' needs model.name=conv_denoiser \(model unet has "
                                          r"no such first block\): set perf.fuse_first_block=false"):
        load_config(None, ["model.name=unet", "perf.fuse_first_block=true"])
    assert load_config(None, ["perf.fuse_first_block=true"]).perf.fuse_first_block


def _probe(device: str, env: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    result = subprocess.run([sys.executable, str(PROBE), device], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_kernels(cases: dict[str, dict[str, float]], bf16_rounding: float) -> None:
    for name, errors in cases.items():
        assert errors["output_is_laid_out"], name
        # fp32 sums of 10 terms against float64; TF32 keeps 10 bits of each input's mantissa;
        # bf16 outputs: one rounding of the fp32 value
        products = 1e-2 if "tf32" in name else 1e-6
        assert errors["output"] <= max(products, bf16_rounding if "bf16" in name else 0.0), (name, errors)
        assert errors["taps_grad"] <= max(products, 1e-5), (name, errors)  # fp32 sums over all windows


def test_the_triton_kernels_compute_what_the_reference_form_does():
    """In Triton's interpreter (numpy on the CPU): indexing, masks, the first-maximum rule, the
    layouts and the partial sums are those the GPU runs. The interpreter truncates fp32 to
    bf16 where a GPU rounds to nearest, so its bf16 outputs may be off by one unit (2**-7)."""
    pytest.importorskip("triton")
    _check_kernels(_probe("cpu", {"TRITON_INTERPRET": "1"}), bf16_rounding=2**-7)


@pytest.mark.parametrize(("precision", "out_type"), [("tf32", "*bf16"), ("ieee", "*fp32")])
def test_the_triton_kernels_compile_for_an_h100_without_spilling(precision, out_type):
    """Compiled here, for sm_90, by the Triton and ptxas the wheel ships: what the
    interpreter does not check (tl.dot's shape rules, lowering), and that the tile sizes
    fit in registers (a spill would send each window's values through memory)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from train import first_block_triton as kernels

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.isfile(ptxas):
        pytest.skip("this Triton ships no ptxas")
    ints = ["windows", "H", "W", "sxn", "sxh", "sxw"] + [f"s{o}{d}" for o in "og" for d in "nchw"]
    for fn, tiles in ((kernels._forward_kernel, {"BLOCK": kernels.FORWARD_BLOCK}),
                      (kernels._backward_kernel, {"BLOCK": kernels.BACKWARD_BLOCK,
                                                  "BLOCKS_PER_PROGRAM": kernels.BLOCKS_PER_PROGRAM})):
        names = fn.arg_names
        signature = {a: out_type if a in ("out_ptr", "grad_ptr") else "*fp32" for a in names if a.endswith("_ptr")}
        signature |= {a: "i32" for a in names if a in ints}
        constexprs = {"C": 32, "PRECISION": precision, **tiles}
        signature |= {a: "constexpr" for a in constexprs}
        compiled = triton.compile(ASTSource(fn=fn, signature={a: signature[a] for a in names}, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        assert ("mma." in ptx) == (precision == "tf32"), fn.__name__  # TF32 on the tensor cores, else CUDA cores
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-", "-o", os.devnull], input=ptx, capture_output=True,
                                text=True)
        assert report.returncode == 0, report.stderr[-2000:]
        assert " 0 bytes spill stores" in report.stdout + report.stderr, (fn.__name__, report.stdout + report.stderr)


# -- on a GPU ------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
def test_the_triton_kernels_compute_what_the_reference_form_does_on_a_gpu():
    _check_kernels(_probe("cuda"), bf16_rounding=2**-8)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "compiled", "padded"), [
    ("no", False, False), ("no", True, False), ("bf16", False, False), ("bf16", True, False),
    ("bf16", True, True),  # the benchmark's best setting with the block fused
], ids=["fp32-eager", "fp32-compiled", "bf16-eager", "bf16-compiled", "bf16-compiled-padded"])
def test_the_fused_model_computes_what_the_plain_one_does_on_a_gpu(precision, compiled, padded):
    """Against cuDNN: both round products to TF32 in fp32 (torch's default for convs), and the
    plain model's first conv to bf16 under autocast."""
    (y, grads, _), (y_fused, grads_fused, _) = _fused_against_plain("cuda", precision, True, compiled, padded)
    tol = 2e-2 if precision == "bf16" else 1e-2
    assert (y_fused - y).abs().max() <= tol
    for g, g_fused in zip(grads, grads_fused, strict=True):
        assert (g_fused - g).abs().max() <= tol * g.abs().max(), (g_fused - g).abs().max()


@gpu
@pytest.mark.gpu
def test_the_fused_block_under_a_cuda_graph_trains_like_the_plain_run(mnist_root, tmp_path):
    """The whole job at batch 20 with each step one captured graph (the kernels and their
    partial sums replayed), against the eager plain job: other kernels, so close, not equal."""
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    "perf.channels_last=false"]
    for name, extra in (("plain", []), ("fused", ["perf.fuse_first_block=true", "perf.cuda_graphs=true"])):
        result = run_main(base + extra + [f"output_dir={tmp_path / name}"])
        assert result.returncode == 0, result.stderr[-3000:]
    plain, fused = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fused")
    assert [m["step"] for m in fused] == [m["step"] for m in plain]
    assert fused[-1]["eval/psnr_db"] == pytest.approx(plain[-1]["eval/psnr_db"], abs=0.1)
    losses = [m["train/loss"] for m in fused if "train/loss" in m]
    assert losses[-1] < 0.8 * losses[0]  # it learned: a graph that replayed no update would not
