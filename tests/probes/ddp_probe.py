"""Launched by tests/integration/test_distributed.py under `accelerate launch` with several CPU processes
(or as one plain process, where only the autocast record is read).

Runs the real Trainer and records, per rank, what a test cannot see from outside: when DDP's
all-reduce runs (a counting comm hook), whether gradients and parameters agree across ranks,
and the precision autocast really computes in. Writes probe-rank<R>.json into the output dir.

    python tests/probes/ddp_probe.py train OUT_DIR DATA_ROOT [overrides...]
    python tests/probes/ddp_probe.py eval OUT_DIR DATA_ROOT WEIGHTS [overrides...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

from train import metrics  # noqa: E402
from train.checkpoint import TrainerState  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import load_mnist  # noqa: E402
from train.distributed import build_accelerator  # noqa: E402
from train.loop import Trainer, build_optimizer  # noqa: E402
from train.model import build_model  # noqa: E402
from train.plan import plan_of  # noqa: E402
from train.tracking import NullTracker  # noqa: E402


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    """True if every rank holds exactly this tensor (one process: trivially)."""
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def main() -> None:
    mode, out, data_root = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rest = sys.argv[4:]
    weights = rest.pop(0) if mode == "eval" else None
    cfg = load_config(None, [f"output_dir={out}", f"data.root={data_root}", "logging.wandb_mode=disabled"] + rest)
    accelerator = build_accelerator(cfg.train.mixed_precision)
    train_split, test_split = load_mnist(cfg.data.root, False, accelerator.device, cfg.data.train_samples,
                                         cfg.data.test_samples)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name)
    record: dict = {"rank": accelerator.process_index, "world": accelerator.num_processes}

    if mode == "eval":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
        model = accelerator.prepare(model)
        record["eval"] = metrics.evaluate(accelerator.unwrap_model(model), test_split, accelerator,
                                          cfg.noise.eval_spec(), cfg.noise.eval_seed, cfg.eval.per_device_batch_size)
    else:
        optimizer = build_optimizer(model, cfg.train.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        allreduces = [0]

        def counting_hook(state, bucket):
            allreduces[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        if accelerator.num_processes > 1:  # (one process: no DDP wrapper, nothing to count)
            model.register_comm_hook(dist.group.WORLD, counting_hook)
        dtypes = set()
        accelerator.unwrap_model(model).encoder[0].register_forward_hook(
            lambda mod, args, output: dtypes.add(str(output.dtype)))
        trainer = Trainer(cfg, plan_of(cfg.train, accelerator.num_processes), accelerator, model, optimizer, train_split,
                          test_split, TrainerState(), NullTracker())
        micro, steps = [], []
        real_micro_step, real_optimizer_step = trainer._micro_step, trainer._optimizer_step

        def micro_step(indices, key, m):
            before = allreduces[0]
            loss = real_micro_step(indices, key, m)
            grads = _flat(p.grad for p in model.parameters())
            micro.append({"epoch": trainer.state.epoch, "micro_step": m, "boundary": trainer.schedule.is_boundary(m),
                          "allreduces": allreduces[0] - before, "grads_equal": _same_on_all_ranks(grads)})
            return loss

        def optimizer_step():
            real_optimizer_step()
            steps.append({"params_equal": _same_on_all_ranks(_flat(model.parameters()))})

        trainer._micro_step, trainer._optimizer_step = micro_step, optimizer_step
        trainer.fit()
        record.update(micro=micro, steps=steps, autocast_dtypes=sorted(dtypes),
                      mixed_precision=accelerator.mixed_precision)
    (out / f"probe-rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # The record is written: skip the interpreter's finalization, where gloo's threads, torn
    # down after the process group, abort a run now and then ("terminate called without an
    # active exception", pytorch/pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
