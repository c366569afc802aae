"""Run by tests/test_first_block.py: the first block's Triton kernels against its reference form.

Prints one JSON object: for each case, the largest error of the kernels' output and of their
taps gradient, relative to the largest value of the reference form computed in float64.

    TRITON_INTERPRET=1 python tests/probes/first_block_probe.py cpu   # Triton's interpreter
    python tests/probes/first_block_probe.py cuda                     # a GPU
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root

import torch  # noqa: E402

from train import first_block_triton  # noqa: E402
from train.first_block import first_block, first_block_backward  # noqa: E402


def _case(device: str, images: int, x_dtype: torch.dtype, out_dtype: torch.dtype, channels_last: bool,
          ties: bool = False, blocks_per_program: int = first_block_triton.BLOCKS_PER_PROGRAM,
          tf32: bool = False) -> dict[str, float]:
    torch.backends.cudnn.allow_tf32 = tf32  # the kernels' products follow it
    generator = torch.Generator().manual_seed(images)
    x = torch.rand(images, 1, 28, 28, generator=generator, dtype=torch.float64)
    x[:, :, :6] = 0.0  # blank rows, as around a digit: windows of equal values
    x[:, :, -4:] = 1.0  # clipped noise
    x = x.to(x_dtype).double()  # the values the kernel sees
    taps = torch.randn(10, 32, generator=generator, dtype=torch.float64) * 0.5
    if ties:  # every window position the same value: the first one must take the gradient
        taps[:9] = 0.0
        taps[9] = torch.rand(32, generator=generator, dtype=torch.float64)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    reference = first_block(x, taps, torch.float64, channels_last)
    grad = torch.randn(reference.shape, generator=generator, dtype=torch.float64).to(out_dtype).double()
    reference_grad = first_block_backward(grad, x, taps)

    out = torch.empty(reference.shape, device=device, dtype=out_dtype).contiguous(memory_format=layout)
    first_block_triton.forward(x.to(device, x_dtype), taps.float().to(device), out)
    taps_grad = first_block_triton.backward(grad.to(device, out_dtype).contiguous(memory_format=layout),
                                            x.to(device, x_dtype), taps.float().to(device), blocks_per_program)
    return {
        "output": ((out.cpu().double() - reference).abs().max() / reference.abs().max()).item(),
        "taps_grad": ((taps_grad.cpu().double() - reference_grad).abs().max() / reference_grad.abs().max()).item(),
        "output_is_laid_out": out.is_contiguous(memory_format=layout),
    }


def main(device: str) -> None:
    # Images per case: one in the interpreter (numpy: seconds each). Its 196 windows make 7
    # forward programs, the last partly filled, and a backward program whose 16 blocks end in
    # empty ones; one_block_per_program adds up 13 partial sums.
    images = 1 if device == "cpu" else 40
    cases = {
        "fp32_nchw": _case(device, images, torch.float32, torch.float32, False),
        "bf16_nhwc": _case(device, images, torch.float32, torch.bfloat16, True),
        "bf16_input": _case(device, images, torch.bfloat16, torch.bfloat16, True),
        "ties": _case(device, images, torch.float32, torch.float32, False, ties=True),
        "one_block_per_program": _case(device, images, torch.float32, torch.float32, True, blocks_per_program=1),
    }
    if device == "cuda":  # the interpreter computes TF32 products in fp32
        cases["tf32"] = _case(device, images, torch.float32, torch.float32, False, tf32=True)
        cases["large_bf16_tf32"] = _case(device, 3000, torch.float32, torch.bfloat16, True, tf32=True)
    print(json.dumps(cases))


if __name__ == "__main__":
    main(sys.argv[1])
