"""Progress off a terminal: plain lines at the logging cadence, never carriage returns in a log file."""

from __future__ import annotations

import io
import subprocess

from conftest import CLI, cli_env, tiny_overrides
from photon_p2p.progress import Progress
from deadlines import within


def test_plain_lines_every_n_units_off_a_terminal(capsys):
    log = io.StringIO()  # not a terminal
    bar = Progress(25, "demo", every=10, file=log)
    for i in range(25):
        bar.set_postfix(loss=f"{i:.1f}")
        bar.update(1)
    bar.write("an eval line")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(",")[0] for line in lines] == ["demo: 10/25 steps (40%)", "demo: 20/25 steps (80%)",
                                                      "demo: 25/25 steps (100%)"]
    assert "loss 9.0" in lines[0] and "loss 24.0" in lines[-1]  # the postfix of the step just logged
    assert capsys.readouterr().out == "an eval line\n"


def test_a_terminal_gets_the_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with Progress(3, "demo", every=10, file=tty) as bar:
        for _ in range(3):
            bar.update()
    assert bar.bar is not None and "\r" in tty.getvalue() and "3/3" in tty.getvalue()


def test_disabled_progress_prints_nothing():
    log = io.StringIO()
    with Progress(5, "demo", every=1, enabled=False, file=log) as bar:
        for _ in range(5):
            bar.update()
    assert log.getvalue() == ""


def test_train_into_a_log_file_has_no_carriage_returns(tmp_path, kjv_data):
    """`photon-peer train` with stderr redirected (a pipe here, a file under systemd or nohup)."""
    sets = []
    for o in tiny_overrides(tmp_path / "run", **{"data.path": str(kjv_data), "train.max_steps": 20,
                                                 "train.log_every": 5, "train.eval_every": 0}):
        sets += ["--set", o]
    log = tmp_path / "train.log"
    with log.open("w") as stderr:
        r = subprocess.run([*CLI, "train", "--config", "tiny", *sets], stdout=subprocess.PIPE, stderr=stderr,
                           text=True, timeout=within(240), env=cli_env())
    assert r.returncode == 0, log.read_text()
    text = log.read_text()
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("tiny: ")]
    assert [line.split(",")[0] for line in progress] == [f"tiny: {s}/20 steps ({s * 5}%)" for s in (5, 10, 15, 20)]
    assert all("loss" in line for line in progress)
