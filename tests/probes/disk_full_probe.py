"""A run whose disk fills up mid-training (or, with `readonly`, whose checkpoints folder
becomes read-only), then resumed once it is writable again, on a small private tmpfs. Run
under `unshare -m` (root) so the mounts vanish with this process:
    unshare -m python disk_full_probe.py RESULT_DIR ARGS_JSON [full|readonly]
Writes RESULT_DIR/result.json: what the failed run printed and left, what the resumed run did."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from train.checkpoint import verify  # noqa: E402

result_dir, args = Path(sys.argv[1]), json.loads(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "full"
disk = result_dir / "disk"
disk.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
out = disk / "run"
cmd = [sys.executable, str(REPO / "train" / "main.py")] + args + [f"output_dir={out}"]


def finished(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=240)
    status = json.loads((out / "status.json").read_text())
    checkpoints = {p.name: verify(p) for p in sorted((out / "checkpoints").glob("step_*"))}
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "status": status,
            "checkpoints": checkpoints}


proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
while not (out / "checkpoints" / "step_00000050").exists():
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.02)
checkpoints = str(out / "checkpoints")
if mode == "readonly":  # this folder alone: a bind mount of itself, made read-only
    subprocess.run(["mount", "--bind", checkpoints, checkpoints], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", checkpoints], check=True)
else:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:  # the disk is full
        pass
    os.close(fd)
full = finished(proc)
if mode == "readonly":
    subprocess.run(["umount", checkpoints], check=True)
else:
    (disk / "filler").unlink()
resumed = finished(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
from safetensors.torch import load_file  # noqa: E402

weights = {k: v.flatten().tolist() for k, v in load_file(str(out / "model.safetensors")).items()}
(result_dir / "result.json").write_text(json.dumps({"full": full, "resumed": resumed, "weights": weights}))
