"""`python -m train compare`: markdown, csv and json reports, pictures, errors, and a closed pipe."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from core.run_store import RunStore
from tests import compare_fixtures as cf
from tests.app_fixtures import REPO
from train.cli import main


@pytest.fixture
def runs() -> None:
    cf.all_runs()


def section(text: str, title: str) -> str:
    """The markdown between heading ``title`` and the next heading of the same or a higher level."""
    start = text.index(title)
    level = title.split(" ")[0]
    rest = text[start + len(title):]
    ends = [i for i in (rest.find("\n" + "#" * n + " ") for n in range(1, len(level) + 1)) if i >= 0]
    return rest[:min(ends)] if ends else rest


def test_markdown_report_lists_differences_stages_and_gains_and_losses(runs, capsys):
    assert main(["compare", "scratch", "staged", "--top", "2"]) == 0
    out = capsys.readouterr().out
    config = section(out, "## Configuration differences")
    assert "| `stages.1.dataset` | caltech101 | tinyimagenet |" in config
    assert "| `stages.2` | (none) | finetune (caltech101); all keys in --format json |" in config
    assert "stages.2.lr" not in config  # a stage only one run has is one row, not one per key
    assert "stages.1.batch_size" not in config  # the same in both runs: not listed
    stages = section(out, "## Results per stage")
    assert "| scratch | 1 caltech | caltech101 | 2/2 | 60.0% | 60.0% | 70.0% | 70.0% |" in stages
    assert "| staged | 2 finetune | caltech101 | 1/2 | 72.0% |" in stages
    classes = section(out, "## Per class: staged against scratch")
    assert "5 classes: 3 better, 1 worse, 1 the same; mean change +12.0 pts." in classes
    gains = section(classes, "### Biggest gains")
    assert gains.index("| dog | 10 | 20.0% | 60.0% | +40.0 pts |") < gains.index("| cat |")
    assert "| bee |" not in gains  # --top 2
    assert "| eel | 5 | 60.0% | 30.0% | -30.0 pts |" in section(classes, "### Biggest losses")


def test_a_run_without_shared_classes_is_reported_in_a_sentence(runs, capsys):
    assert main(["compare", "scratch", "staged", "other"]) == 0
    out = capsys.readouterr().out
    assert "## Per class: staged against scratch" in out
    assert "share no class names" in section(out, "## Per class: other against scratch")


def test_json_and_csv_carry_the_same_data(runs, capsys):
    assert main(["compare", "scratch", "staged", "--format", "json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == ["scratch", "staged"]
    differs = {r["key"] for r in data["config"] if r["differs"]}
    assert {"stages.1.dataset", "stages.2.lr"} <= differs and "stages.1.batch_size" not in differs
    classes = data["classes"][0]
    assert (classes["gains"], classes["losses"]) == (["dog", "cat", "bee"], ["eel"])
    assert [s["final_acc"] for s in data["stages"]] == pytest.approx([0.6, 0.6, 0.72])

    assert main(["compare", "scratch", "staged", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    config = [r for r in rows if r["section"] == "config" and r["key"] == "stages.2.lr"]
    assert [(r["run"], r["value"], r["differs"]) for r in config] == [("scratch", "", "True"),
                                                                     ("staged", "0.01", "True")]
    stage = [r for r in rows if r["section"] == "stage"]
    assert [(r["run"], r["stage"], r["best_acc"]) for r in stage][0] == ("scratch", "1", "0.7")
    dog = next(r for r in rows if r["section"] == "class" and r["class"] == "dog")
    assert (dog["run"], dog["against"], dog["stage"], dog["against_stage"], dog["train_count"]) == \
        ("staged", "scratch", "2", "1", "10")
    assert float(dog["delta"]) == pytest.approx(0.4)


def test_a_chosen_stage_and_an_output_file(runs, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["compare", "scratch", "staged", "--stage", "1", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert "share no class names" in out.read_text()  # stage 1: caltech101 against tinyimagenet


def test_unknown_run_and_bad_options_are_one_sentence(runs, capsys):
    assert main(["compare", "scratch", "nope"]) == 2
    assert capsys.readouterr().err.strip() == "error: There is no run named 'nope'."
    assert main(["compare", "scratch"]) == 2
    assert "at least two different runs" in capsys.readouterr().err
    assert main(["compare", "scratch", "staged", "--plot", "x.jpg"]) == 2
    assert "--plot must name a .png, .svg, .pdf or .html file" in capsys.readouterr().err


def test_plot_writes_a_png_and_links_it_from_the_report(runs, tmp_path, capsys):
    png = tmp_path / "scatter.png"
    assert main(["compare", "scratch", "staged", "--plot", str(png)]) == 0
    assert f"![staged against scratch]({png})" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400
    (tmp_path / "reports" / "pictures").mkdir(parents=True)
    report, html = tmp_path / "reports" / "r.md", tmp_path / "reports" / "pictures" / "s.html"
    assert main(["compare", "scratch", "staged", "--plot", str(html), "-o", str(report)]) == 0
    assert "[staged against scratch (interactive)](pictures/s.html)" in report.read_text()  # read from reports/


def test_plot_with_several_runs_writes_one_file_per_comparable_run(runs, tmp_path, capsys):
    base = tmp_path / "scatter.svg"
    assert main(["compare", "scratch", "staged", "other", "--plot", str(base), "--format", "json"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scatter-staged.svg"]  # other shares no class
    assert capsys.readouterr().err == (f"note: {tmp_path / 'scatter-other.svg'} was not written: stage 1 of scratch "
                                       "(caltech101) and stage 1 of other (pq) share no class names (5 and 2 classes), "
                                       "so they cannot be compared class by class.\n")


def test_a_report_that_cannot_be_written_is_refused_before_any_picture(runs, tmp_path, capsys):
    report = tmp_path / "missing" / "report.md"
    assert main(["compare", "scratch", "staged", "--plot", str(tmp_path / "s.html"), "-o", str(report)]) == 2
    assert capsys.readouterr().err == (f"error: Cannot write the report to {report}: the folder {report.parent} "
                                       "does not exist.\n")
    assert list(tmp_path.iterdir()) == []


def test_static_plot_without_matplotlib_says_what_to_do(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if it were not installed
    assert main(["compare", "scratch", "staged", "--plot", str(tmp_path / "a.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert main(["compare", "scratch", "staged", "--plot", str(tmp_path / "a.html")]) == 0
    assert "plotly" in (tmp_path / "a.html").read_text()[:5000].lower()


def test_the_real_command_survives_a_closed_pipe(runs, tmp_path):
    """`python -m train compare ... | head`: the reader has gone; no traceback, the exit status of a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `head` does once it has its lines
    err = tmp_path / "err.txt"
    try:
        with open(err, "wb") as stderr:
            status = subprocess.run([sys.executable, "-m", "train", "compare", "scratch", "staged"], cwd=REPO,
                                    env=os.environ.copy(), stdout=write_end, stderr=stderr, timeout=120).returncode
    finally:
        os.close(write_end)
    assert (status, err.read_text()) == (141, "")  # 128 + SIGPIPE, as a shell reports it


def test_the_real_command_reports_an_unknown_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train", "compare", "ghost", "phantom"], cwd=REPO,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "error: There is no run named 'ghost'.\n")


def test_a_full_disk_is_one_sentence(runs, capsys):
    assert main(["compare", "scratch", "staged", "-o", "/dev/full"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the disk is full (No space left on device); free some space and run it again.\n"


def test_a_terminal_that_is_not_utf8_gets_escaped_names_and_the_report_file_stays_utf8(tmp_path):
    """Under LC_ALL=C (no UTF-8 mode) a class name like café used to crash the command, after emptying -o."""
    store = RunStore()
    classes = ["café", "東京"]
    for name, correct in (("here", [7, 3]), ("there", [4, 9])):
        cf.write_run(store, name, [cf.stage_config("caltech", "caltech101")],
                     [[cf.result_with(classes, correct, [5, 5])]])
    report = tmp_path / "report.md"
    report.write_text("an earlier report")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    for extra in (["-o", str(report)], []):
        done = subprocess.run([sys.executable, "-m", "train", "compare", "here", "there", *extra], cwd=REPO, env=env,
                              capture_output=True, timeout=120)
        assert (done.returncode, done.stderr) == (0, b""), done.stderr.decode("ascii", "replace")
    assert "| café |" in report.read_text(encoding="utf-8") and "| 東京 |" in report.read_text(encoding="utf-8")
    assert b"| caf\\xe9 |" in done.stdout  # what an ASCII terminal can show
