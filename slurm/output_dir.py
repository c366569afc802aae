"""The output_dir that train/main.py would write to with these arguments (the config file's,
unless an override names another), for slurm/denoise.sh, which keeps the job's records there.
A config mistake is printed in one line, exit status 2, before any job step starts.

    python slurm/output_dir.py [--config FILE] [section.key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: train.*

from train.config import load_config  # noqa: E402
from train.errors import UserError  # noqa: E402
from train.main import parse_args  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        print(load_config(args.config, args.overrides).output_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
