"""A training run killed with SIGKILL at random moments, saving every step, and resumed each time, ends with the
weights of an uninterrupted run; its metrics hold each step once and no temp folder is left.

One driver process imports torch once and forks each training run (a real process, really killed), so ten kills cost
seconds instead of ten interpreter starts. The driver does no torch work before it forks."""

import json
import subprocess
import sys

import pytest
import torch

from synergy.core.checkpoint import load_checkpoint
from synergy.train.datasets.synth import synthesize

KILLS = 10
STEPS = 24

DRIVER = """
import json, os, random, signal, sys, time, traceback
from pathlib import Path

from synergy.train.config import TrainConfig
from synergy.train.loop import train

data, work, kills_wanted, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def start(out, resume):
    pid = os.fork()
    if pid == 0:  # the child trains and never returns into the driver
        code = 1
        try:
            import torch

            torch.set_num_threads(1)  # the same arithmetic in every run, and no OpenMP pool across the fork
            config = TrainConfig(model="tiny", data=str(data / "train.csv"), val_data=None, out=str(out),
                                 batch_size=8, steps=steps, lr=2e-3, warmup_steps=2, workers=0, save_every=1, seed=3)
            train(config, resume=resume, progress=False)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


began = time.perf_counter()
_, status = os.waitpid(start(work / "straight", False), 0)
assert status == 0, f"the uninterrupted run failed: {status}"
duration = time.perf_counter() - began

rng = random.Random(0)
out, kills, mid_save, runs = work / "killed", 0, 0, 0
while True:
    resume = (out / "checkpoint").is_dir() or (out / ".checkpoint.old").is_dir()
    pid = start(out, resume)
    runs += 1
    if kills < kills_wanted:
        # uniform over a tenth of a whole run: the kills land anywhere (start-up, a step, a save, a resume) and ten
        # of them cannot finish the run
        time.sleep(rng.uniform(0, duration / kills_wanted))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        kills += 1
        mid_save += any(p.name.endswith((".tmp", ".old")) for p in out.glob(".checkpoint*"))
        continue
    assert status == 0, f"run {runs} failed: {status}"
    break
print(json.dumps({"kills": kills, "killed_mid_save": mid_save, "runs": runs, "run_seconds": round(duration, 2)}))
"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=1, train_per_class=3, val_per_class=1, heldout_per_class=1, missing_rate=0.2)
    return out


def test_random_sigkills_resume_to_the_uninterrupted_weights(tmp_path, synth):
    (tmp_path / "driver.py").write_text(DRIVER)
    command = [sys.executable, str(tmp_path / "driver.py"), str(synth), str(tmp_path), str(KILLS), str(STEPS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(summary)
    assert summary["kills"] >= KILLS

    straight, _ = load_checkpoint(tmp_path / "straight" / "checkpoint")
    killed, _ = load_checkpoint(tmp_path / "killed" / "checkpoint")
    for (name, x), y in zip(straight.state_dict().items(), killed.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)  # the same arithmetic: bit for bit
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once, none lost
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "checkpoint",
        "metrics.jsonl",
        "train_config.json",
    ]
