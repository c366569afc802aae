"""Print the README's results table from a finished run's metrics.jsonl.

    python bench/results_table.py outputs/default

Reference figures are the notebook recipe measured on the same 2-core machine (the project's
notes): 14.18 dB after epoch 1 and 15.58 dB (MSE 0.0277) after epoch 20; noisy input 9.36 dB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE_PSNR_DB = {1: 14.18, 2: 14.54, 5: 14.94, 10: 15.51, 20: 15.58}


def main() -> None:
    out = Path(sys.argv[1])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    evals = {int(m["epoch"]): m for m in lines if "eval/psnr_db" in m and float(m["epoch"]).is_integer()}
    setup = json.loads((out / "setup.json").read_text())
    print(f"Run: `{out}` ({setup['world_size']} process(es), {setup['device']}, "
          f"mixed precision {setup['mixed_precision']}).\n")
    print("| epoch | test PSNR (dB) | test SSIM | test MSE | noisy input PSNR (dB) | reference recipe PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for epoch in sorted(e for e in evals if e in REFERENCE_PSNR_DB or e == max(evals)):
        m = evals[epoch]
        ref = REFERENCE_PSNR_DB.get(epoch, "")
        print(f"| {epoch} | {m['eval/psnr_db']:.2f} | {m['eval/ssim']:.4f} | {m['eval/mse']:.4f} | "
              f"{m['eval/noisy_psnr_db']:.2f} | {ref} |")


if __name__ == "__main__":
    main()
