"""Typed run configuration: dataclass defaults < YAML file < dotted CLI overrides.

Values are YAML scalars (with YAML 1.2 booleans: only true/false). Every value is checked
once, here, before any work starts: unknown keys (with the nearest valid names), wrong types,
and values outside the bounds each field declares (`option`) or that its section's rules
refuse all raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.errors import UserError

# The models there are: the one list of the choices (train/model.py's MODELS builds each, and a
# test holds the two equal). Here, so that a config is checked without importing torch.
MODEL_NAMES = ("conv_denoiser", "unet")


class ConfigError(UserError):
    """A config file, key or value the user has to fix."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {why}")


def option(default: Any, *, low: float | None = None, high: float | None = None, above: float | None = None,
           choices: tuple | None = None) -> Any:
    """A field's default and the values it allows: at least `low`, at most `high`, more than
    `above`, or one of `choices`. `Section` checks them; docs/configuration.md lists them."""
    bounds = {"low": low, "high": high, "above": above, "choices": choices}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


def allowed(meta: typing.Mapping[str, Any]) -> str:
    """A field's bounds in words, e.g. '>= 1', 'in [0, 255]', 'in (0, 86400]', 'one of: no, bf16, fp16'."""
    if "choices" in meta:
        return "one of: " + ", ".join(map(str, meta["choices"]))
    if "high" in meta:
        return f"in [{meta['low']:g}, {meta['high']:g}]" if "low" in meta else f"in ({meta['above']:g}, {meta['high']:g}]"
    return f">= {meta['low']:g}" if "low" in meta else f"> {meta['above']:g}" if "above" in meta else ""


class Section:
    """A config section. `KEY` is where it sits (e.g. 'train'); building one checks each field
    against its declared bounds first, then the section's own rules (its `check`)."""

    KEY = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta, key = getattr(self, f.name), f.metadata, f"{self.KEY}.{f.name}".lstrip(".")
            if not meta:
                continue
            if "choices" in meta:
                ok = value in meta["choices"]
            else:
                ok = meta.get("low", -math.inf) <= value <= meta.get("high", math.inf) and value > meta.get("above", -math.inf)
            _check(ok, key, f"must be {allowed(meta)}, got {show(value)}")
        self.check()

    def check(self) -> None:
        """Rules between fields, and those a bound cannot say."""


@dataclass
class DataConfig(Section):
    KEY = "data"
    dataset: str = option("mnist", choices=("mnist", "images"))
    """mnist (the digits, from `root`) | images (your own pictures: train_dir, test_dir)"""
    root: str = "data"
    """folder that holds MNIST/raw/ (torchvision's layout); relative paths are from the working dir"""
    download: bool = True
    """download MNIST into `root` when it is missing (needs network; main process first)"""
    train_samples: int = option(0, low=0)
    """use only the first N training images (for quick runs and tests); 0 = all 60,000"""
    test_samples: int = option(0, low=0)
    """evaluate on only the first N test images; 0 = all 10,000 (the reported metrics)"""
    download_timeout_s: float = option(60.0, above=0, high=86400)
    """seconds a download waits for an answer from a mirror before giving up on it (torchvision tries 2)"""
    train_dir: str = ""
    """images: folder of training pictures (PNG, JPEG or TIFF; 8- or 16-bit; searched recursively,
    linked subfolders too)"""
    test_dir: str = ""
    """images: folder of test pictures, each scored whole"""
    channels: int = option(0, choices=(0, 1, 3))
    """images: 1 (gray) or 3 (colour), every picture converted to it; 0 = as the pictures are
    (a folder that mixes gray and colour is refused)"""
    patch_size: int = option(64, low=16)
    """images: side of the square training patches, in pixels (each training picture must be at least this)"""
    patches_per_image: int = option(64, low=1)
    """images: training patches drawn from each picture per epoch (positions and flips hashed
    from seed, epoch and index)"""
    memory_limit_mib: int = option(2048, low=1)
    """images: the most the decoded pictures may take on the training device (uint8 for
    8-bit pictures, float32 for 16-bit); more is refused"""

    def check(self) -> None:
        # A leading ~ is the home folder: the shell leaves it alone in data.root=~/data (not a word of its own).
        self.root, self.train_dir, self.test_dir = map(os.path.expanduser, (self.root, self.train_dir, self.test_dir))
        if self.dataset == "images":
            for key in ("train_dir", "test_dir"):
                _check(getattr(self, key) != "", f"data.{key}", "must name a folder of pictures with data.dataset=images")
            for key in ("train_samples", "test_samples"):  # MNIST's: a folder's pictures are all used
                _check(getattr(self, key) == 0, f"data.{key}", "is for MNIST: with data.dataset=images put the "
                       "pictures you want in the folder")

    def model_settings(self) -> dict[str, Any]:
        """What the data sets in the model: the channels of pictures (MNIST's 1 is the default)."""
        return {"image_channels": self.channels} if self.dataset == "images" and self.channels else {}


NOISE_KINDS = ("gaussian", "salt_pepper")


@dataclass(frozen=True)
class NoiseSpec:
    """How clean digits are corrupted: `kind`, at a level per sample uniform in [low, high]
    (one fixed level when low == high). The level is the Gaussian std in pixel units, or
    the fraction of salt-and-pepper pixels."""

    kind: str = "gaussian"
    low: float = 0.5
    high: float = 0.5

    def describe(self) -> str:
        level = f"{self.low:g}" if self.low == self.high else f"{self.low:g}-{self.high:g} per sample"
        return f"{self.kind} {level}"


@dataclass
class NoiseConfig(Section):
    KEY = "noise"
    kind: str = option("gaussian", choices=NOISE_KINDS)
    """gaussian (clean + factor x N(0, 1), clipped to [0, 1]) | salt_pepper (each pixel, with
    probability factor, set to 0 or 1, half each)"""
    factor: float = option(0.5, low=0)
    """noise level: the Gaussian std in pixel units (pixels are in [0, 1]), or the fraction of
    salt-and-pepper pixels; evaluation always uses it, training too unless a range is set"""
    train_factor_min: float = option(0.0, low=0)
    """low end of the per-sample training level (used when train_factor_max > 0)"""
    train_factor_max: float = option(0.0, low=0)
    """> 0: each training sample gets its own level, uniform in [train_factor_min,
    train_factor_max] (a function of seed, epoch and sample); 0 = train at `factor`"""
    eval_seed: int = 1234
    """seed of the fixed evaluation noise; independent of train.seed so runs compare"""
    sigma: float = option(0.0, low=0, high=255)
    """> 0: Gaussian noise of this std on the 0-255 scale (15, 25, 50), for training and
    evaluation: the same as factor = sigma / 255"""
    train_sigma_max: float = option(0.0, low=0, high=255)
    """> 0: blind training, each sample's std uniform in [train_sigma_min, train_sigma_max] on the
    0-255 scale (evaluation stays at sigma)"""
    train_sigma_min: float = option(0.0, low=0, high=255)
    """low end of the blind training range, 0-255 scale"""

    def check(self) -> None:
        for key in ("sigma", "train_sigma_min", "train_sigma_max"):
            _check(getattr(self, key) == 0 or self.kind == "gaussian", f"noise.{key}",
                   "is a Gaussian std: set noise.kind=gaussian")
        _check(self.train_sigma_max == 0 or self.sigma > 0, "noise.train_sigma_max",
               "needs noise.sigma, the evaluation level on the same scale")
        _check(self.train_sigma_min <= self.train_sigma_max, "noise.train_sigma_min",
               f"must be <= noise.train_sigma_max ({self.train_sigma_max}), got {self.train_sigma_min}")
        if self.sigma > 0:  # one scale from here on: pixels in [0, 1] (a saved config holds both, equal)
            _check(self.factor in (0.5, self.sigma / 255), "noise.factor",
                   f"and noise.sigma both set the level ({self.factor} and {self.sigma}/255): set one of them")
            _check(self.train_sigma_max == 0 or self.train_factor_max in (0.0, self.train_sigma_max / 255),
                   "noise.train_factor_max", "and noise.train_sigma_max both set the range: set one of them")
            self.factor = self.sigma / 255
            if self.train_sigma_max > 0:
                self.train_factor_min, self.train_factor_max = self.train_sigma_min / 255, self.train_sigma_max / 255
        for key in ("factor", "train_factor_min", "train_factor_max"):
            value = getattr(self, key)
            _check(value <= 1 or self.kind != "salt_pepper", f"noise.{key}",
                   f"must be <= 1 for salt_pepper noise (a fraction), got {value}")
        if self.train_factor_max > 0:
            _check(self.train_factor_min <= self.train_factor_max, "noise.train_factor_min",
                   f"must be <= noise.train_factor_max ({self.train_factor_max}), got {self.train_factor_min}")

    def train_spec(self) -> NoiseSpec:
        """The corruption of training samples: `factor`, or the per-sample range."""
        if self.train_factor_max > 0:
            return NoiseSpec(self.kind, self.train_factor_min, self.train_factor_max)
        return self.eval_spec()

    def eval_spec(self) -> NoiseSpec:
        """The corruption of test samples: always the fixed level `factor`."""
        return NoiseSpec(self.kind, self.factor, self.factor)


@dataclass
class UNetConfig(Section):
    KEY = "model.unet"
    channels: int = option(32, low=1)
    """feature maps at 28x28 (unless top_channels is set); each coarser level has twice as many"""
    levels: int = option(3, low=1, high=3)
    """resolutions: 1 (28 only), 2 (28, 14) or 3 (28, 14, 7)"""
    top_channels: int = option(0, low=0)
    """feature maps at 28x28 instead of `channels` (0: `channels`); the costliest level"""


@dataclass
class ModelConfig(Section):
    KEY = "model"
    name: str = option("conv_denoiser", choices=MODEL_NAMES)
    """which model to train: conv_denoiser (the reference, no settings) or unet (model.unet)"""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """settings of the unet model (ignored by the others)"""

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of the chosen model: its own section, if it has one."""
        section = getattr(self, self.name, None)
        return dataclasses.asdict(section) if section is not None else {}

    def default_settings(self) -> dict[str, Any]:
        """The chosen model's settings at their defaults."""
        section = getattr(self, self.name, None)
        return dataclasses.asdict(type(section)()) if section is not None else {}


MIXED_PRECISIONS = ("no", "bf16", "fp16")
# torch.compile modes the job can use; the ones with "cudagraphs" would capture graphs of their
# own, which perf.cuda_graphs does for the whole step instead.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig(Section):
    KEY = "train"
    epochs: int = option(20, low=1)
    """passes over the training set"""
    max_steps: int = option(0, low=0)
    """stop after this many optimizer steps in total; 0 = run all epochs"""
    per_device_batch_size: int = option(20, low=1)
    """images per process per micro-step; global batch = this x processes x accumulation
    (unused when global_batch_size is set)"""
    global_batch_size: int = option(0, low=0)
    """> 0: images per optimizer step on any number of processes (per device: this /
    (processes x accumulation), which must divide), so a checkpoint resumes on another
    world size; 0 = per_device_batch_size x processes x accumulation"""
    gradient_accumulation_steps: int = option(1, low=1)
    """micro-steps per optimizer step"""
    lr: float = option(1e-3, above=0)
    """Adam learning rate at a global batch of lr_reference_batch (see lr_scaling)"""
    lr_scaling: str = option("none", choices=("none", "sqrt", "linear"))
    """none | sqrt | linear: how the learning rate follows the global batch (per optimizer
    step): lr x (global batch / lr_reference_batch), square-rooted for sqrt"""
    lr_reference_batch: int = option(20, low=1)
    """the global batch that train.lr is meant for (the reference recipe's 20)"""
    lr_schedule: str = option("constant", choices=("constant", "cosine"))
    """constant (the reference) | cosine: from the peak lr down to 0 at the last optimizer step"""
    warmup_steps: int = option(0, low=0)
    """optimizer steps of linear warm-up from 0 to the peak lr, before the schedule"""
    seed: int = option(0, low=0)
    """seeds the data order and the training noise; the same on every process"""
    mixed_precision: str = option("no", choices=MIXED_PRECISIONS)
    """no | bf16 | fp16 (fp16 needs CUDA); 'no' defers to accelerate launch --mixed_precision"""
    max_grad_norm: float = option(0.0, low=0)
    """clip the global L2 norm of the gradients to this; 0 disables"""
    collective_timeout_s: int = option(600, low=10, high=10**9)
    """seconds a rank waits for the others in a collective before failing (a dead rank must not hang the job)"""
    exact_reduction: bool = False
    """sum gradients as fixed-point integers (train/exact.py), so the weights are bit-identical on
    any number of processes of one device kind: per_device_batch_size images per forward pass,
    global_batch_size per optimizer step, the micro-steps between from the world size"""

    def check(self) -> None:
        if self.exact_reduction:
            _check(self.global_batch_size > 0, "train.global_batch_size",
                   "must be set (> 0) with train.exact_reduction=true: the images per optimizer step")
            _check(self.global_batch_size % self.per_device_batch_size == 0, "train.global_batch_size",
                   f"({self.global_batch_size}) must be a multiple of train.per_device_batch_size "
                   f"({self.per_device_batch_size}) with train.exact_reduction=true")
            _check(self.gradient_accumulation_steps == 1, "train.gradient_accumulation_steps",
                   "must stay 1 with train.exact_reduction=true: the micro-steps follow from the world size")


@dataclass
class PerfConfig(Section):
    """Speed settings. None changes what is computed beyond floating-point rounding; what each
    is worth on which hardware is in docs/performance.md, not here. The rewrites
    (pad_thin_convs, reuse_host_memory, cpu_layers, cuda_graphs) live in train/speed/ and are
    off by default, so the default run trains train/model.py as written."""

    KEY = "perf"
    channels_last: bool = True
    """keep weights and activations in NHWC, which oneDNN (CPU) and cuDNN's tensor-core
    kernels prefer (faster on the CPUs and GPUs measured, except under cuda_graphs at batch 20)"""
    compile: bool = False
    """torch.compile the model and the training noise (inductor); the first steps pay the
    compile time; slower on the CPUs measured"""
    compile_mode: str = option("default", choices=COMPILE_MODES)
    """with compile: 'default', or 'max-autotune-no-cudagraphs' (times Triton kernels against
    cuDNN's for each convolution and matmul: minutes more of compiling)"""
    cudnn_benchmark: bool = False
    """let cuDNN time its kernels and keep the fastest (GPU). Off, cuDNN uses deterministic
    kernels only, so a GPU run repeats bit for bit and resumes exactly; on, it does not"""
    pad_thin_convs: bool = False
    """compute the convs with one input or output channel (the first and last) as 8-channel
    ones, zero-padded, which cuDNN runs on its NHWC tensor-core kernels (GPU; train/speed/thin_conv.py).
    Slower on the CPUs measured"""
    reuse_host_memory: bool = False
    """keep the host memory each step frees in the process for the next step (glibc's malloc
    thresholds; train/speed/host_memory.py) instead of page-faulting it in again (CPU, batches
    of 64 and more; batch 20 has no faults to remove)"""
    cpu_layers: bool = False
    """on a CPU in fp32 without compile: compute the last conv (32 -> 1) and the kernel-2
    stride-2 transposed convs as matrix products, and max-pool before ReLU
    (train/speed/cpu_layers.py); the same results up to rounding, faster the larger the batch.
    Not applied on a GPU, under bf16 or with compile"""
    cuda_graphs: bool = False
    """replay each optimizer step as one captured CUDA graph (one process on one GPU; no
    fp16, no gradient accumulation): removes the per-kernel launch cost that dominates small batches"""



@dataclass
class EvalConfig(Section):
    KEY = "eval"
    per_device_batch_size: int = option(1000, low=1)
    """test images per process per forward pass (no gradients, so large is fine)"""
    every_n_epochs: int = option(1, low=1)
    """evaluate after every N-th epoch; the end of training is always evaluated"""
    num_sample_images: int = option(10, low=1, high=64)
    """digits shown in each samples PNG (the first test image of each class, then the next ones)"""
    min_output_std: float = option(1e-3, low=0)
    """stop the run as collapsed when the denoised test images vary less than this across
    images (pixel std, averaged over pixels): the model ignores its input; 0 = never"""
    collapse_check_from_step: int = option(500, low=0)
    """apply min_output_std only to evaluations from this optimizer step on: an untrained
    model's output is near-constant too (the reference's std is ~1e-4 at step 2, ~4e-3 at 100)"""



@dataclass
class CheckpointConfig(Section):
    KEY = "checkpoint"
    every_n_steps: int = option(0, low=0)
    """also save every N optimizer steps; 0 = only at the end of each epoch"""
    keep_last: int = option(2, low=1)
    """how many checkpoints to keep (the oldest are deleted)"""
    resume: str = "auto"
    """auto (newest checkpoint in output_dir, if any) | none | a checkpoint folder to start from
    (once output_dir has checkpoints of its own, the newest of those: the same command resumes)"""

    def check(self) -> None:
        _check(self.resume != "", "checkpoint.resume", "must be auto, none or a checkpoint folder")
        self.resume = self.resume if self.resume in ("auto", "none") else os.path.expanduser(self.resume)


@dataclass
class LoggingConfig(Section):
    KEY = "logging"
    wandb_mode: str = option("offline", choices=("online", "offline", "disabled"))
    """online | offline (sync later with `wandb sync`) | disabled; never prompts"""
    wandb_project: str = "mnist-denoise"
    """wandb project name"""
    wandb_group: str = ""
    """wandb group of the run (slurm/sweep.sh sets the sweep's name); empty = none"""
    every_n_steps: int = option(100, low=1)
    """log train/loss and train/images_per_s every N optimizer steps"""


@dataclass
class Config:
    output_dir: str = "outputs/default"
    """where config.yaml, metrics.jsonl, samples, checkpoints and model.safetensors go"""
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def __post_init__(self) -> None:
        _check(self.output_dir != "", "output_dir", "must not be empty")
        self.output_dir = os.path.expanduser(self.output_dir)  # ~ as in DataConfig.check
        _check(self.data.dataset == "mnist" or self.model.name == "unet", "model.name",
               f"must be unet with data.dataset=images (the fully convolutional model), got {show(self.model.name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every setting under its dotted key, e.g. {'train.lr': 0.001, ...}."""
        return _flat(self.to_dict())


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _coerce(value: Any, expected: type, key: str) -> Any:
    """Check one YAML value against a field's type; ints are accepted where floats are."""
    if expected is float and not isinstance(value, bool):
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {show(value)}")
            return number
    # bool is a subclass of int in Python: `epochs: true` must not pass as 1.
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        if expected is int and not -2**63 <= value < 2**63:  # past torch's int64 a seed or a size overflows there
            raise ConfigError(f"config key '{key}' must fit in 64 bits (below 2^63), got {show(value)}")
        return value
    shown = "null" if value is None else f"{show(value)} ({type(value).__name__})"
    raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {shown}")


# Keys that earlier versions wrote into every config.yaml, with the value that means "off": a
# saved config with that value still loads (for denoise, or --config OUTPUT_DIR/config.yaml).
RETIRED = {"perf.fuse_first_block": (False, "was removed (never timed on a GPU, slower on CPUs)"),
           "logging.trackers": ([], "was removed (wandb and metrics.jsonl are the records)")}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if key in RETIRED:
            off, why = RETIRED[key]
            if value == off:
                continue
            raise ConfigError(f"config key '{key}' {why}: delete it from the config (docs/LOG.md)")
        if name not in fields:
            valid = [f"{prefix}{n}" for n in fields]
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else f"valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{key}': {hint}")
        ftype = types[name]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section: give it as a mapping of keys, got {show(value)}")
            kwargs[name] = _build(ftype, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, ftype, key)
    return cls(**kwargs)


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn `mixed_precision: no` into False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


# A config is a few hundred bytes and a few dozen values; these bounds keep a hostile or
# mistaken file (a 50 MB paste, aliases that expand to millions of values) from holding the
# process (and its stop signals) for minutes or printing megabytes in an error.
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_VALUES = 10_000  # scalars, lists and mappings, each alias counted as often as it is used


def _count_values(tree: Any, budget: int) -> int:
    """How many values `tree` has with aliases expanded, stopping once past `budget` (cycles too)."""
    count, stack = 0, [tree]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def read_yaml(path: str | Path, what: str, flag: str = "") -> Any:
    """The YAML document at `path` (a file or a pipe), bounded in size and expansion; every
    problem is one ConfigError that names `what` (e.g. "config file 'x.yaml'") and the `flag`
    that gave the path."""
    path = Path(path)
    if not path.exists() or path.is_dir():  # a pipe is fine: --config <(envsubst < template.yaml)
        raise ConfigError(f"{what} not found: pass an existing file{flag}")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what} cannot be read ({e.strerror}): pass a readable file{flag}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_YAML_BYTES // 1024} KiB, far more than any config: "
                          f"is it the right file?")
    try:
        tree = _yaml(data.decode("utf-8", errors="replace"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply to be a config") from None
    if _count_values(tree, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ConfigError(f"{what} holds more than {MAX_YAML_VALUES:,} values once its aliases are expanded "
                          f"(or an alias that contains itself): write the values out instead")
    return tree


def show(value: Any, limit: int = 60) -> str:
    """`value` as an error message shows it: its repr, cut to `limit` characters."""
    short = reprlib.Repr()  # nested and long values abbreviated with "...", never expanded whole
    short.maxlevel, short.maxstring, short.maxother = 2, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.epochs=3)")
    try:
        value = _yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own (e.g. 'a: b'): keep it as the string it is
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the run's config: dataclass defaults, then the YAML file, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, f"config file '{path}'", " to --config (see configs/)")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    for text in overrides:
        keys, value = _parse_override(text)
        node = values
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return _build(Config, values, "")


def reference() -> str:
    """docs/configuration.md: every key with its default and the docstring it has here
    (`python -m train.config > docs/configuration.md`; a test holds the two equal)."""
    import ast
    import inspect
    import sys

    docs = {}  # (class name, field) -> docstring
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if isinstance(node, ast.ClassDef):
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[node.name, a.target.id] = " ".join(b.value.value.split()).replace("|", "\\|")
    rows = []

    def walk(section: Any, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                meaning = docs[type(section).__name__, f.name]
                rows.append(f"| `{prefix}{f.name}` | `{shown}` | {allowed(f.metadata)} | {meaning} |")

    walk(Config(), "")
    return "\n".join([
        "# Configuration", "",
        "Generated from the docstrings of `train/config.py` by `python -m train.config > docs/configuration.md`",
        "(a test holds this page equal to them).", "",
        "Values come from these defaults (`configs/default.yaml` holds the same), then the `--config` YAML, then",
        "`section.key=value` overrides after the script: YAML scalars, with YAML 1.2 booleans (`true`/`false`",
        "only). `--config` takes a pipe too, e.g. `--config <(envsubst < template.yaml)`. Unknown keys, wrong",
        "types and bad values stop the run before any work, naming the key and the nearest valid ones. A",
        "leading `~` in a path is your home folder (the shell leaves it alone in `output_dir=~/runs/a`).", "",
        "| key | default | allowed | meaning |", "|---|---|---|---|", *rows, ""])


if __name__ == "__main__":
    print(reference(), end="")
