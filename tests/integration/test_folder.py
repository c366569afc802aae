"""A run owns its output_dir: it refuses a folder of someone else's files, never writes through
a symbolic link, and stops in one line when the folder or its lock is taken from it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import accelerate_cpu, error_lines, read_metrics, run_main, start_main, wait_for_metrics

LONG = ["--config", "configs/debug.yaml", "data.train_samples=4000", "data.test_samples=100", "train.epochs=3",
        "logging.every_n_steps=10", "logging.wandb_mode=disabled", "checkpoint.every_n_steps=50"]
SHORT = ["--config", "configs/debug.yaml", "data.train_samples=200", "data.test_samples=50", "train.epochs=1",
         "logging.every_n_steps=5", "logging.wandb_mode=disabled"]


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_folder_of_someone_elses_files_is_refused_and_left_as_it_was(synthetic_mnist, tmp_path):
    out = tmp_path / "theirs"
    (out / "samples").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (out / "config.yaml").write_text("my: notes\n")
    (out / "samples" / "step_00000001.png").write_bytes(b"my picture")
    before = _files(out)
    r = run_main(SHORT + [f"data.root={synthetic_mnist}", f"output_dir={out}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    assert f"output_dir {out} already holds files no run wrote (config.yaml, metrics.jsonl, samples)" in line
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "samples"]
    # An empty folder is fine, and so is a finished run's folder with more epochs.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(SHORT + [f"data.root={synthetic_mnist}", f"output_dir={empty}"]).returncode == 0


def test_no_write_goes_through_a_link_planted_in_the_folder(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    args = SHORT + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    assert run_main(args).returncode == 0
    target = tmp_path / "precious"
    target.write_text("do not touch\n")
    for name in ("config.yaml", "setup.json", ".status.json.tmp", "status.json.tmp", ".metrics.jsonl.tmp"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
    mine = tmp_path / "mine"  # where the save of step 20 would write, through a link named as its folder
    (mine / "model.safetensors").parent.mkdir()
    (mine / "model.safetensors").write_text("my model\n")
    (out / "checkpoints" / ".tmp-step_00000020").symlink_to(mine, target_is_directory=True)
    r = run_main(args + ["train.epochs=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert target.read_text() == "do not touch\n" and _files(mine) == {mine / "model.safetensors": b"my model\n"}
    assert not (out / "checkpoints" / "step_00000020").is_symlink()
    assert not (out / "config.yaml").is_symlink() and "train" in (out / "config.yaml").read_text()
    # run.lock as a link: refused in one line before anything is written.
    (out / "run.lock").unlink()
    (out / "run.lock").symlink_to(target)
    r = run_main(args + ["train.epochs=3"])
    assert r.returncode == 2 and "Traceback" not in r.stderr and target.read_text() == "do not touch\n"
    [line] = error_lines(r.stderr)
    assert f"{out / 'run.lock'} is a symbolic link" in line
    (out / "run.lock").unlink()
    # A linked folder, at the start: refused in one line (pruning would delete in its target).
    theirs = tmp_path / "theirs"
    (theirs / "step_00000010").mkdir(parents=True)
    (theirs / "step_00000030.png").write_bytes(b"my picture")
    before = _files(theirs)
    for name in ("checkpoints", "samples"):
        os.replace(out / name, tmp_path / f"moved-{name}")
        (out / name).symlink_to(theirs, target_is_directory=True)
        r = run_main(args + ["train.epochs=3"])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        [line] = error_lines(r.stderr)
        assert f"{out / name} is a symbolic link" in line and _files(theirs) == before
        (out / name).unlink()
        os.replace(tmp_path / f"moved-{name}", out / name)
    assert run_main(args + ["train.epochs=3"]).returncode == 0


def test_a_fifo_a_device_or_a_file_in_place_of_the_runs_own_never_hangs_the_run(synthetic_mnist, tmp_path):
    """Planted where the run reads or writes: a FIFO (reading it would block forever), a link to
    /dev/zero (reading it would never end), a file where a folder goes (a traceback after the
    epoch), a folder where a file goes (a traceback, or status.json never recorded). Each ends in
    one line before any training (a picture's folder, when the picture is written), or is replaced
    as a record of ours."""
    base = tmp_path / "base"
    args = SHORT + [f"data.root={synthetic_mnist}", "train.epochs=2"]
    assert run_main(args + [f"output_dir={base}", "train.epochs=1"]).returncode == 0
    cases = [("status.json", "fifo", None), ("metrics.jsonl", "fifo", "metrics.jsonl cannot be read"),
             ("metrics.jsonl", "zero", "metrics.jsonl cannot be read as this run's record (a symbolic link)"),
             ("run.lock", "fifo", "run.lock is not a plain file"),
             ("checkpoints/step_00000010/manifest.json", "fifo", "no readable manifest.json (not a plain file)"),
             ("samples", "file", "samples is not a folder"), ("checkpoints", "file", "checkpoints is not a folder"),
             *[(name, "folder", f"{name} is a folder, and the run writes its {Path(name).name} there")
               for name in ("status.json", "model.safetensors", "config.yaml", "samples/step_00000020.png")]]
    for i, (name, kind, refusal) in enumerate(cases):
        out = tmp_path / f"run{i}"
        shutil.copytree(base, out, symlinks=True)
        planted = out / name
        shutil.rmtree(planted) if planted.is_dir() else planted.unlink(missing_ok=True)
        if kind == "folder":  # the last is a picture the resumed run writes after its epoch of training
            (planted / "mine").mkdir(parents=True)
        elif kind == "fifo":
            os.mkfifo(planted)
        elif kind == "zero":
            planted.symlink_to("/dev/zero")
        else:
            planted.write_text("my notes\n")
        r = run_main(args + [f"output_dir={out}"], timeout=60)  # without the checks: a hang, or a traceback
        if refusal is None:  # our own record, unreadable: replaced, and the run resumes
            assert r.returncode == 0 and json.loads((out / name).read_text())["outcome"] == "completed", name
            continue
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        [line] = error_lines(r.stderr)
        assert refusal in line, line
        assert kind != "file" or planted.read_text() == "my notes\n"
        assert kind != "folder" or [p.name for p in planted.iterdir()] == ["mine"]
        if name != "checkpoints":  # nothing trained, nothing saved
            assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000010"], name


@pytest.mark.slow
def test_a_folder_taken_from_a_two_rank_run_keeps_the_main_processs_record(synthetic_mnist, tmp_path):
    """The main process alone writes metrics.jsonl: it stops, and records why, before the other
    rank learns that it lost it; that rank's record and line of a lost peer must not replace the
    cause, nor stand beside it."""
    out = tmp_path / "run"
    proc = start_main(LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.global_batch_size=20"],
                      launcher=accelerate_cpu(2))
    wait_for_metrics(out, proc, lines=7)
    os.replace(out / "metrics.jsonl", tmp_path / "moved.jsonl")
    (out / "metrics.jsonl").mkdir()
    _, stderr = proc.communicate(timeout=120)
    refusal = f"{out / 'metrics.jsonl'} is a folder, and the run writes its metrics.jsonl there"
    errors = error_lines(stderr)  # the cause, once: not also the other rank's "lost contact ... run the same command"
    assert proc.returncode != 0 and len(errors) == 1 and refusal in errors[0], stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert (status["outcome"], status["exit_code"]) == ("failed", 2) and refusal in status["message"], status


@pytest.mark.parametrize("what", ["lock deleted", "metrics linked", "metrics a folder", "samples linked",
                                  "samples a file", "checkpoints linked", "checkpoints a file", "weights a folder",
                                  "folder deleted"])
def test_a_folder_taken_from_a_running_run_stops_it_in_one_line(synthetic_mnist, tmp_path, what):
    out = tmp_path / "run"
    args = LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    proc = start_main(args)
    wait_for_metrics(out, proc, lines=7)  # past the first checkpoint (step 50)
    target = tmp_path / "precious"
    target.write_text("do not touch\n")
    if what == "lock deleted":
        (out / "run.lock").unlink()
    elif what == "metrics linked":
        os.replace(out / "metrics.jsonl", tmp_path / "moved.jsonl")
        (out / "metrics.jsonl").symlink_to(target)
    elif what == "metrics a folder":
        os.replace(out / "metrics.jsonl", tmp_path / "moved.jsonl")
        (out / "metrics.jsonl").mkdir()
    elif what == "weights a folder":  # where the run writes model.safetensors as it ends
        (out / "model.safetensors" / "mine").mkdir(parents=True)
    elif what in ("samples a file", "checkpoints a file"):  # samples/: before the first evaluation makes it
        name = what.split()[0]
        if (out / name).exists():
            os.replace(out / name, tmp_path / f"moved-{name}")
        (out / name).write_text("my notes\n")
    elif what == "samples linked":  # before the first evaluation writes samples/
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        (out / "samples").symlink_to(theirs, target_is_directory=True)
    elif what == "checkpoints linked":  # the next save would write there, and prune what it finds there
        (tmp_path / "theirs" / "step_00000001").mkdir(parents=True)
        os.replace(out / "checkpoints", tmp_path / "moved-checkpoints")
        (out / "checkpoints").symlink_to(tmp_path / "theirs", target_is_directory=True)
    else:  # rm -rf as the run sees it: gone at once (a delete file by file races the run's writes)
        os.rename(out, tmp_path / "deleted")
        shutil.rmtree(tmp_path / "deleted", ignore_errors=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    [line] = error_lines(stderr)
    assert target.read_text() == "do not touch\n"
    if what == "metrics a folder":
        assert f"{out / 'metrics.jsonl'} is a folder, and the run writes its metrics.jsonl there" in line, line
        return
    if what == "weights a folder":
        assert f"{out / 'model.safetensors'} is a folder, and the run writes its model.safetensors there" in line
        assert [p.name for p in (out / "model.safetensors").iterdir()] == ["mine"]
        return
    if what.endswith("a file"):
        name = what.split()[0]
        assert f"{out / name} is not a folder, and the run writes its {name} there" in line, line
        assert (out / name).read_text() == "my notes\n"
        return
    if what.endswith("linked"):
        linked = out / {"metrics linked": "metrics.jsonl", "samples linked": "samples"}.get(what, "checkpoints")
        assert f"{linked} is a symbolic link" in line, line
        assert [p.name for p in tmp_path.glob("theirs/*")] == (["step_00000001"] if what == "checkpoints linked" else [])
        return
    assert "was deleted or replaced while this run held it" in line, line
    if what == "folder deleted":  # nothing recreated in its name, no record claiming a cause
        assert not (out / "status.json").exists()
        return
    # The lock deleted: the stopped run wrote nothing more; a new run resumes the folder cleanly.
    logged = read_metrics(out)
    assert json.loads((out / "status.json").read_text())["outcome"] == "running"
    r = run_main(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    steps = [(m["step"], "eval/mse" in m) for m in read_metrics(out)]
    assert len(steps) == len(set(steps)) and read_metrics(out)[:1] == logged[:1]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_file_of_a_run_has_the_permissions_its_umask_gives(synthetic_mnist, tmp_path, umask):
    """The weights too, which safetensors 0.8 writes 0600 whatever the umask: a teammate sharing
    the folder (or a container running as another user) could not read them."""
    out = tmp_path / "run"
    umasked = ["sh", "-c", f'umask {umask:o} && exec "$0" "$@"', sys.executable]  # a new process: its own umask
    r = run_main(SHORT + [f"data.root={synthetic_mnist}", f"output_dir={out}"], launcher=umasked)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoints/step_00000010/model.safetensors" in modes, modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_trained_over(synthetic_mnist, tmp_path):
    """Checkpoints are often deleted to save space once a run is done; its weights, metrics and
    samples are still its outputs, which a new run in the folder would replace."""
    out, other = tmp_path / "run", tmp_path / "other"
    args = SHORT + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    assert run_main(args).returncode == 0
    assert run_main(SHORT + [f"data.root={synthetic_mnist}", f"output_dir={other}"]).returncode == 0
    shutil.rmtree(out / "checkpoints")
    before = {p: b for p, b in _files(out).items() if p.name != "run.lock"}
    for resume in ("auto", "none", str(other / "checkpoints" / "step_00000010")):
        r = run_main(args + ["train.seed=5", f"checkpoint.resume={resume}"])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        [line] = error_lines(r.stderr)
        assert f"output_dir {out} holds a finished run (model.safetensors" in line, line
        assert {p: b for p, b in _files(out).items() if p.name != "run.lock"} == before


def test_two_runs_starting_at_once_in_a_new_folder_the_refused_one_leaves_the_others_lock(tmp_path, monkeypatch):
    """Both see the folder missing and make it; one takes the lock. The other, refused, must not
    undo the folder as if it were its own: deleting run.lock would stop the run that holds it."""
    import subprocess
    import sys

    from train.rundir import OutputDirInUse, RunDir

    path = tmp_path / "new" / "run"
    holder = []
    real_mkdir = Path.mkdir

    def mkdir_while_another_claims(self, *args, **kwargs):  # between this run's look and its mkdir
        monkeypatch.setattr(Path, "mkdir", real_mkdir)
        holder.append(subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from train.rundir import RunDir; RunDir(sys.argv[1]).claim(); "
             "print('held', flush=True); time.sleep(60)", str(path)], cwd=Path(__file__).parents[2],
            stdout=subprocess.PIPE, text=True))
        assert holder[0].stdout.readline() == "held\n"
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_while_another_claims)
    loser = RunDir(path)
    try:
        with pytest.raises(OutputDirInUse):
            loser.claim()
        lock = (path / "run.lock").stat()
        loser.abandon()  # what main.py does for a run refused at start-up
        assert (path / "run.lock").stat().st_ino == lock.st_ino, "the holder's lock file was deleted"
    finally:
        for proc in holder:
            proc.kill()


def test_a_rank_sees_the_main_processes_lock_once_a_lagging_filesystem_shows_it(tmp_path):
    """distributed.check_shared_folder refuses a rank that does not see run.lock as the main
    process wrote it; a network filesystem's cache may show it late, or show the last run's."""
    import threading

    from train.rundir import LOCK_FILE, RunDir

    main = RunDir(tmp_path / "run")
    main.claim()
    other = RunDir(tmp_path / "run")  # another rank: it reads, never locks
    lock = tmp_path / "run" / LOCK_FILE
    written = lock.read_bytes()
    assert written == main.holder and other.sees(main.holder, wait_s=0)
    assert not other.sees(b"another run's holder\n", wait_s=0.5)
    stale = tmp_path / "stale"
    stale.write_bytes(b'{"host": "x", "pid": 1, "started": "the last run"}\n')
    os.replace(stale, lock)  # what a lagging cache shows for a while (then main's own again)
    later = threading.Timer(0.6, lambda: lock.write_bytes(written))
    later.start()
    try:
        assert other.sees(main.holder, wait_s=5)
    finally:
        later.join()


def test_a_filesystem_without_fsync_still_takes_the_lock(tmp_path, monkeypatch):
    import errno

    from train.rundir import RunDir

    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refused)
    rundir = RunDir(tmp_path / "run")
    assert rundir.claim() == [] and rundir.identity is not None and rundir.holder is not None
