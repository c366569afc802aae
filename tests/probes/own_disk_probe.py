"""train/main.py with rank 1 on a node of its own: it sees a private, empty tmpfs at PROBE_HIDE
(a folder above output_dir) where the other ranks see the shared folder, as a node whose
output_dir is a path on its own disk. Needs root (unshare -m). Usage: as main.py, with
PROBE_HIDE set (see test_distributed.py)."""

import os
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parents[2] / "train" / "main.py"
argv = [sys.executable, str(MAIN), *sys.argv[1:]]
if os.environ["RANK"] == "1":  # exec: the same process, which the launcher watches, in a mount namespace of its own
    os.execvp("unshare", ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                          os.environ["PROBE_HIDE"], *argv])
os.execv(sys.executable, argv)
