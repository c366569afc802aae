"""Everything a run shows or writes for people: console lines, progress bar, the resolved
config and setup, metrics.jsonl, sample PNGs and wandb. Gated here, in one place, on the
global main process: the other ranks get a `NullTracker` with the same methods that does
nothing, and their Python warnings (the same as rank 0's) are not shown. The exceptions:
checkpoints, which every rank writes, and status.json (train/lifecycle.py), where any rank may
record a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from torch import nn

from train import metrics, noise
from train.data import Split
from train.distributed import decided_on_main
from train.errors import UserError, brief
from train.rundir import RunDir, read_own

METRICS_FILE = "metrics.jsonl"
SAMPLES_KEY = "eval/samples"  # the samples image's key; its PNGs go to OUTPUT_DIR/samples/


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a whole record."""
    try:
        record = json.loads(line)
        return int(record["step"]) if isinstance(record, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


class NullTracker:
    """What ranks other than the global main process get: every call is a no-op."""

    lines = 0
    """records in metrics.jsonl (kept by a resume, and logged since)"""

    def info(self, message: str) -> None:
        pass

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def save_image(self, key: str, step: int, render: Callable[[], bytes]) -> None:
        pass

    def progress(self, total: int, initial: int) -> None:
        pass

    def advance(self, n: int = 1, **postfix: Any) -> None:
        pass

    def finish(self) -> None:
        pass

    def check_folder(self) -> None:
        pass


class Tracker(NullTracker):
    """The main process's tracker. `resume` trims metrics.jsonl to what the checkpoint being
    resumed had seen, so a resumed run's metrics have no gaps and no duplicates: (its step,
    the records it counted or -1 for an older checkpoint that did not count them); None, for a
    new run or one started from another run's checkpoint, keeps none of the folder's records."""

    def __init__(self, rundir: RunDir, config: dict[str, Any], setup: dict[str, Any], wandb_mode: str,
                 wandb_project: str, run_id: str, resume: tuple[int, int] | None) -> None:
        self.rundir = rundir  # every write goes through it: the folder must still be this run's
        output_dir = rundir.path
        self.metrics_path = output_dir / METRICS_FILE
        self._bar = None
        self._trim_metrics(resume)
        self._trim_samples(-1 if resume is None else resume[0])
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb  # deferred: slow to import, and only the main process needs it

            if wandb_mode == "online":
                _check_wandb_reachable()
            try:  # mode is passed explicitly and WANDB_SILENT keeps it from ever prompting.
                self._wandb = wandb.init(project=wandb_project, group=config["logging"]["wandb_group"] or None,
                                         dir=str(output_dir), config={**config, "setup": setup}, mode=wandb_mode,
                                         id=run_id,
                                         resume="allow", settings=wandb.Settings(silent=True))
            except Exception as e:  # wandb raises its own types (no login, a refused key, a lost server)
                raise UserError(f"wandb could not start a {wandb_mode} run ({brief(e)}): fix that (wandb login, "
                                f"WANDB_API_KEY), or use logging.wandb_mode=offline and `wandb sync` later") from e
        # config.yaml (the resolved config, reloadable with --config) and the setup in effect.
        rundir.write("config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
        rundir.write("setup.json", (json.dumps(setup, indent=1) + "\n").encode())

    def _trim_metrics(self, resume: tuple[int, int] | None) -> None:
        """Keep the records the checkpoint had seen, atomically. A line that is not a whole
        record (the tail torn by a kill or a full disk) is dropped and reported, never fatal."""
        if not os.path.lexists(self.metrics_path):
            return
        if resume is None:
            self.metrics_path.unlink()
            return
        step, count = resume
        try:
            lines = read_own(self.metrics_path, limit=None).decode(errors="replace").splitlines()
        except OSError as e:  # a link or a FIFO planted in its place: the record is not ours to read
            raise UserError(f"{self.metrics_path} cannot be read as this run's record ({e.strerror}): move it "
                            f"away, then run the same command") from None
        steps = [_step_of(line) for line in lines]
        torn = [line for line, s in zip(lines, steps) if s is None and line.strip()]
        records = [line for line, s in zip(lines, steps) if s is not None]
        # By count: an evaluation logged at the checkpoint's step after it was saved is the
        # resumed run's to log again.
        kept = records[:count] if count >= 0 else [line for line in records if _step_of(line) <= step]
        self.lines = len(kept)
        self.rundir.write(METRICS_FILE, "".join(line + "\n" for line in kept).encode())
        if torn:
            self.info(f"{self.metrics_path}: dropped {len(torn)} damaged line(s) ({sum(map(len, torn))} bytes, "
                      f"written as the run was killed or the disk filled); the rest is kept")

    def _trim_samples(self, step: int) -> None:
        """Delete the sample PNGs of steps after `step`, the checkpoint's (-1: a new run): they show
        a model that this run does not continue, and the steps it trains make their own."""
        folder = self.rundir.path / SAMPLES_KEY.rsplit("/", 1)[-1]
        for path in sorted(folder.glob("step_*.png")) if folder.is_dir() else []:
            if path.stem[5:].isdigit() and int(path.stem[5:]) > step and (path.is_symlink() or path.is_file()):
                path.unlink()  # a folder of that name is left for RunDir.write to refuse, in one line

    def info(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def check_folder(self) -> None:
        """Raise FolderLost if output_dir is no longer this run's (its run.lock deleted or replaced)."""
        self.rundir.check()

    def log(self, metrics: dict[str, Any]) -> None:
        self.rundir.append(METRICS_FILE, json.dumps(metrics))
        self.lines += 1
        values = {k: v for k, v in metrics.items() if k != "step"}
        self._to_wandb(lambda run: run.log(values, step=metrics["step"]))

    def _to_wandb(self, send: Callable[[Any], None]) -> None:
        """`send(run)` to the wandb run, if it is still there. wandb copies metrics.jsonl, so when
        its service dies (accelerate launch ends every process under it on a stop signal,
        wandb's too) the run goes on, and saves, without it."""
        if self._wandb is None:
            return
        try:
            send(self._wandb)
        except Exception as e:  # the service's connection: ConnectionResetError, BrokenPipeError, ...
            import wandb

            self._wandb = None
            with contextlib.suppress(Exception):
                wandb.teardown()  # its exit hook would only fail again, with a traceback
            self.info(f"warning: wandb stopped ({brief(e)}); metrics.jsonl holds every record, and "
                      f"python slurm/wandb_rebuild.py {self.rundir.path} makes a wandb run of it")

    def save_image(self, key: str, step: int, render: Callable[[], bytes]) -> None:
        """OUTPUT_DIR/<key's last part>/step_N.png, the PNG `render()` makes (only here, on the main
        process), and to wandb."""
        path = self.rundir.write(f"{key.rsplit('/', 1)[-1]}/step_{step:08d}.png", render())
        if self._wandb is not None:
            import wandb

            self._to_wandb(lambda run: run.log({key: wandb.Image(str(path))}, step=step))

    def progress(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        # A bar only on a terminal: in batch-job logs it would be thousands of lines.
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._to_wandb(lambda run: run.finish())
        self._wandb = None


WANDB_REACH_S = 10.0  # seconds the wandb server gets to answer before an online run gives up


def _check_wandb_reachable() -> None:
    """Refuse an online run at once when the wandb server does not answer (no network, a
    firewall): wandb.init would wait 90 s and then raise."""
    import os
    import urllib.error
    import urllib.request

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        urllib.request.urlopen(url, timeout=WANDB_REACH_S).close()
    except urllib.error.HTTPError:
        return  # an answer, whatever its status: the server is there
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise UserError(f"logging.wandb_mode=online, but the wandb server {url} did not answer within "
                        f"{WANDB_REACH_S:g} s ({brief(e)}): use logging.wandb_mode=offline (and `wandb sync` later), "
                        f"or check the network") from None


def build_tracker(accelerator: Accelerator, rundir: RunDir, config: dict[str, Any], setup: dict[str, Any],
                  wandb_mode: str, wandb_project: str, run_id: str, resume: tuple[int, int] | None) -> NullTracker:
    """The one place that decides who writes: the global main process, and nobody else. Its
    tracker's start (wandb's, the run's records) can fail there alone, which stops every rank."""
    made: list[Tracker] = []
    decided_on_main(accelerator, lambda: made.append(Tracker(rundir, config, setup, wandb_mode, wandb_project,
                                                             run_id, resume)))
    if not accelerator.is_main_process:
        warnings.simplefilter("ignore")  # every rank runs the same code: rank 0 shows the warnings
        return NullTracker()
    return made[0]


def log_start(tracker: NullTracker, cfg, setup: dict[str, object], n_params: int, notes: list[str]) -> None:
    """The run's settings as they are in effect, first in the log."""
    tracker.info("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()))
    tracker.info(f"model {cfg.model.name}: {n_params:,} parameters; output in {cfg.output_dir}")
    scale = f" (noise.sigma={cfg.noise.sigma:g} on the 0-255 scale)" if cfg.noise.sigma else ""
    tracker.info(f"noise: train {cfg.noise.train_spec().describe()}, test {cfg.noise.eval_spec().describe()}{scale}")
    tc = cfg.train
    tracker.info(f"global batch {setup['global_batch']} images per optimizer step ({setup['per_device_batch']} per "
                 f"process per micro-step), lr {setup['lr']:g} "
                 f"(train.lr_scaling={tc.lr_scaling}, train.lr_schedule={tc.lr_schedule}, {tc.warmup_steps} warm-up "
                 f"steps); perf: " + ", ".join(f"{k}={v}" for k, v in vars(cfg.perf).items()))
    for note in notes:
        tracker.info(note)


# -- the samples PNG -------------------------------------------------------------------
def sample_indices(split: Split, n: int) -> torch.Tensor:
    """A fixed set of test digits to show: the first image of each class, then the next ones."""
    labels = split.labels.cpu()
    firsts = [int((labels == c).nonzero()[0]) for c in range(10) if (labels == c).any()]
    chosen = set(firsts)
    rest = [i for i in range(min(len(labels), n + len(firsts))) if i not in chosen]
    return torch.tensor((firsts + rest)[:n], dtype=torch.int64)


@torch.no_grad()
def samples_png(model: nn.Module, split: Split, indices: torch.Tensor, spec: noise.NoiseSpec, seed: int) -> bytes:
    """A PNG with one column per digit and rows noisy / denoised / clean."""
    clean, noisy = metrics.eval_noisy(split, indices.to(split.images.device), spec, seed)
    out = model(noisy).float()
    return grid_png(torch.cat([noisy, out, clean]), len(indices))


@torch.no_grad()
def picture_samples_png(model: nn.Module, pictures, n: int, spec: noise.NoiseSpec, seed: int,
                        side: int = 128) -> bytes:
    """A PNG with one column per test picture (the first `n`, a centre crop of `side` pixels) and
    rows noisy / denoised / clean, as evaluation denoises them (the whole picture, then cropped)."""
    from train.images import denoise_tiled

    columns = []
    for i in range(min(n, len(pictures))):
        clean = pictures.picture(i)
        noisy = noise.add_noise(clean, torch.tensor([i], device=clean.device), spec, seed, noise.EVAL_EPOCH, wide=True)
        out = denoise_tiled(model, noisy).float()
        h, w = clean.shape[-2:]
        top, left = max((h - side) // 2, 0), max((w - side) // 2, 0)
        crop = [t[..., top:top + side, left:left + side] for t in (noisy, out, clean)]
        columns.append([F.pad(c, (0, side - c.shape[-1], 0, side - c.shape[-2]), value=0.5) for c in crop])
    return grid_png(torch.cat([column[row] for row in range(3) for column in columns]), len(columns))


def grid_png(images: torch.Tensor, per_row: int, pad: int = 2, pad_value: float = 0.5) -> bytes:
    """Images (N, C, H, W) in [0, 1], C 1 or 3, as one PNG, `per_row` to a row, `pad` grey pixels around each."""
    from PIL import Image  # torchvision's dependency; torchvision itself is slow to import

    n, c, h, w = images.shape
    rows = -(-n // per_row)
    grid = torch.full((c, pad + rows * (h + pad), pad + per_row * (w + pad)), pad_value)
    for i, image in enumerate(images.detach().float().cpu()):
        top, left = pad + (i // per_row) * (h + pad), pad + (i % per_row) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()).save(png, format="PNG")
    return png.getvalue()
