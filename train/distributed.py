"""Building the `Accelerator`: device, process group and mixed precision, checked once.

Three launch mistakes are caught here rather than trained through:
- N processes started on a machine without CUDA, where accelerate (unless told to use the
  CPU) gives each process a world of 1: N copies of the job train alone, silently.
- `accelerate launch --num_processes N` without `--multi_gpu` (or with `--cpu`), which starts
  ONE process: the job would train at 1/N of the asked-for scale, silently.
- `train.mixed_precision` and `accelerate launch --mixed_precision` asking for different
  precisions, or fp16 where there is no CUDA (accelerate would silently run fp32).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, broadcast_object_list, gather_object

from train.config import MIXED_PRECISIONS
from train.errors import UserError
from train.lifecycle import launcher_args
from train.rundir import RunDir, node_name

T = TypeVar("T")


class LaunchError(UserError):
    """The processes were started in a way that cannot train correctly."""


def resolve_mixed_precision(configured: str, launcher: str | None, cuda: bool) -> str:
    """One effective precision from the config and the launcher's flag (env ACCELERATE_MIXED_PRECISION).

    'no' on either side defers to the other (the launcher passes 'no' when its flag is not
    given); two different real precisions are a conflict. fp16 needs CUDA.
    """
    launcher = (launcher or "no").lower()
    if launcher not in MIXED_PRECISIONS:
        raise LaunchError(
            f"accelerate launch --mixed_precision={launcher} is not supported here: use one of {MIXED_PRECISIONS}"
        )
    if configured != "no" and launcher != "no" and configured != launcher:
        raise LaunchError(
            f"train.mixed_precision={configured} conflicts with accelerate launch --mixed_precision={launcher}: "
            f"drop one of them or make them agree"
        )
    effective = configured if configured != "no" else launcher
    if effective == "fp16" and not cuda:
        raise LaunchError("fp16 needs a CUDA GPU and there is none: use train.mixed_precision=bf16 (or no) on the CPU")
    return effective


def check_world_size(launched: int, joined: int) -> None:
    """Refuse a launch whose processes did not all join one group (each would train alone)."""
    if joined != launched:
        raise LaunchError(
            f"{launched} processes were launched but each sees a world of {joined}: they would train "
            f"alone; on CPUs launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {launched} (or torchrun)"
        )


def check_single_process_launch(args: list[str]) -> None:
    """Refuse a lone process whose launcher (`args`) was asked for several: accelerate launch's
    single-process path takes --num_processes and starts one process anyway."""
    if not any(a.endswith("accelerate") or "accelerate.commands" in a for a in args) or "--multi_gpu" in args:
        return
    asked = None
    for i, a in enumerate(args):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(args):
            asked = args[i + 1]
        elif a.startswith(("--num_processes=", "--num-processes=")):
            asked = a.split("=", 1)[1]
    if asked is not None and asked.isdigit() and int(asked) > 1:
        raise LaunchError(
            f"accelerate launch --num_processes {asked} started ONE process: without --multi_gpu it runs a single "
            f"process; add --multi_gpu (on a machine without GPUs: ACCELERATE_USE_CPU=true accelerate launch "
            f"--multi_gpu --num_processes {asked} ...)"
        )


def maybe_join_restart_group(timeout: timedelta, cuda: bool) -> None:
    """Under torchrun's agent (torchrun, accelerate launch), form the process group on the
    agent's store with keys of this restart's own. The agent keeps one store across the
    restarts of --max-restarts, and a restarted group would otherwise read the previous
    attempt's addresses and fail to connect (pytorch/pytorch#167288)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or torch.distributed.is_initialized():
        return
    if cuda:  # as accelerate would, before the group binds a device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", store=torch.distributed.PrefixStore(
        f"attempt_{attempt}", store), rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout)


# NCCL's watchdog, on a failed or timed-out collective: 2 aborts the communicators and raises in
# Python, so each surviving rank records the lost peer (status.json, slurm/denoise.sh's node
# blame). torchrun sets 1 for its workers, which kills the process before Python runs.
NCCL_ERROR_HANDLING = "2"


def build_accelerator(mixed_precision: str, collective_timeout_s: int = 600) -> Accelerator:
    cuda = torch.cuda.is_available()
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ERROR_HANDLING  # read when the NCCL group is made
    effective = resolve_mixed_precision(mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"), cuda)
    maybe_join_restart_group(timedelta(seconds=collective_timeout_s), cuda)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))
    # Autocast's weight-cast cache only lives for one forward here (each weight is used
    # once), and a cache filled during CUDA graph capture would be freed under the graph.
    autocast = AutocastKwargs(cache_enabled=False)
    # Without CUDA, accelerate forms a gloo group only when told to use the CPU.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=effective, kwargs_handlers=[timeout, autocast])
    # torchrun and accelerate launch tell each process the world size they started.
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    if accelerator.num_processes == 1:
        check_single_process_launch(launcher_args(os.getppid()))
    return accelerator


def decided_on_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """What `decide()` returns on the global main process, on every rank; a UserError it raises
    there is raised on every rank (and printed by the main process alone). For what only the main process may do or judge (the folder,
    the checkpoint to resume), which another node may see otherwise."""
    outcome: list = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except UserError as e:
            outcome[1] = e
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if outcome[1] is not None:
        if not accelerator.is_main_process:  # the main process alone prints it
            outcome[1].node_local = False
        raise outcome[1]
    return outcome[0]


def check_shared_folder(accelerator: Accelerator, rundir: RunDir) -> None:
    """Refuse, on every rank, ranks that do not see output_dir as the main process claimed it
    (a path on each node's own disk): every rank writes its part of each checkpoint there, and
    a checkpoint without theirs could never be resumed."""
    if accelerator.num_processes == 1:
        return
    [holder] = broadcast_object_list([rundir.holder])  # what the main process wrote into run.lock
    if holder is None:  # a filesystem without locks: no run.lock was written
        return
    sees = accelerator.is_main_process or rundir.sees(holder)
    blind = [f"rank {r} on {node}" for r, (node, ok) in enumerate(gather_object([(node_name(), sees)])) if not ok]
    if blind:
        raise LaunchError(f"output_dir {rundir.path} is not one folder that every node shares: "
                          f"{', '.join(blind[:3])}{' ...' if len(blind) > 3 else ''} cannot see the run.lock the main "
                          f"process wrote there; put output_dir on a filesystem every node shares (each rank writes "
                          f"its part of every checkpoint there)")


# Settings that may differ between nodes: where each finds its own copy of the data (whose
# bytes must not: their fingerprints are compared).
PER_NODE = ("data.root", "data.train_dir", "data.test_dir")
FINGERPRINTS = ("data.fingerprint", "data.test_fingerprint")


def check_same_settings(accelerator: Accelerator, settings: dict[str, object]) -> None:
    """Refuse, on every rank, ranks that were given different settings (`settings`: flat keys,
    FINGERPRINTS among them): a node launched with other overrides, another version of the
    config file, or another copy of the data. DDP keeps the ranks' weights together only where
    every rank steps alike: with another learning rate, seed or data the job would train on,
    saving rank 0's weights alone, without a word."""
    if accelerator.num_processes == 1:
        return
    mine = {k: v for k, v in settings.items() if k not in PER_NODE}
    every = gather_object([mine])  # one small mapping per rank, on every rank
    keys = sorted(set().union(*every))
    differing = [(k, r) for k in keys for r, theirs in enumerate(every) if theirs.get(k) != every[0].get(k)]
    if differing:
        shown = "; ".join(f"{k}: rank 0 {every[0].get(k)!r}, rank {r} {every[r].get(k)!r}" for k, r in differing[:3])
        fix = "give every node the same copy of the data" if {k for k, _ in differing} <= set(FINGERPRINTS) else \
            "launch every node with the same config file and overrides"
        raise LaunchError(f"the ranks were given different settings ({shown}{' ...' if len(differing) > 3 else ''}): "
                          f"{fix}")


def describe(accelerator: Accelerator) -> dict[str, object]:
    """The distributed settings really in effect, for the log and the output folder."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    return {
        "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "world_size": accelerator.num_processes,
        "backend": backend,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "nccl_async_error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    }
