"""``crln report``: every figure decodes to an image of the expected size, the HTML embeds all of
them, missing parts become notes, a non-run folder is one CrlnError, and the page loads in Chromium.

Browser check (``test_report_loads_in_headless_chromium``): a copy of ``report.html`` gets a small
script at the top of ``<head>`` that records ``window.onerror`` / resource errors / ``console.error``
and, after ``load``, writes ``<div id="crln-check" data-images=N data-broken=K data-errors=...>``
into the DOM; ``chromium --headless --dump-dom --virtual-time-budget=...`` prints that DOM and the
test parses it. A second run takes a ``--screenshot`` that must decode to the window size. Skipped
with the reason when ``/usr/bin/chromium`` (Debian package ``chromium``) is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from conftest import tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.engine.trainer import train
from crln.errors import CrlnError
from crln.evaluation import evaluate
from crln.report import build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _run(phantom_root: Path, out: Path, **extra: object) -> Path:
    config = load_config("demo", tiny_overrides(phantom_root, out, **{"train.val_every": 3, **extra}))
    return train(config, progress=False).run_dir


@pytest.fixture(scope="module")
def supervised_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _run(phantom_root, tmp_path_factory.mktemp("sup"))
    evaluate(run, limit=2, device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def crln_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _run(phantom_root, tmp_path_factory.mktemp("crln"), **{"method.name": "crln", "method.rectify_start": 2})
    evaluate(run, limit=2, device="cpu", progress=False)
    return run


def _check_figures(result) -> None:
    for name, fig in result.figures.items():
        assert fig.path.is_file(), name
        pixels = mpimg.imread(fig.path)
        assert pixels.shape[:2] == (fig.height, fig.width), (name, pixels.shape, fig)
        assert fig.width >= 300 and fig.height >= 200, (name, fig)
        assert float(np.std(pixels[..., :3])) > 0.01, f"{name} is blank"


def _embedded_only(html: str, n_figures: int) -> None:
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) == n_figures
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    assert not re.search(r'(href|src)="(?!data:)', html)  # no other file or network reference
    assert "<script" not in html


def test_supervised_report_has_every_figure(supervised_run: Path, tmp_path: Path) -> None:
    result = build_report(supervised_run, tmp_path / "rep", progress=False)
    roles = ("worst", "best")  # 2 evaluated cases: worst, median (= worst) and best → 2 distinct
    expected = {"curves", *(f"overlay_{r}" for r in roles), *(f"render_{r}" for r in roles)}
    assert set(result.figures) == expected
    _check_figures(result)
    html = result.html.read_text()
    _embedded_only(html, len(expected))
    assert "Per case, worst first" in html and "bootstrap mean" in html
    assert "rectification" not in html.lower().split("<main>")[1].split("training curves")[0]
    assert result.notes == []


def test_crln_report_has_rectification_figure(crln_run: Path, tmp_path: Path) -> None:
    result = build_report(crln_run, tmp_path / "rep", progress=False)
    assert "rectification" in result.figures
    _check_figures(result)
    _embedded_only(result.html.read_text(), len(result.figures))
    assert "CRLN pseudo-label rectification" in result.html.read_text()


def test_missing_parts_become_notes(supervised_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(supervised_run, run, ignore=shutil.ignore_patterns("*.pt", "eval"))  # model_final.pt too
    result = build_report(run, progress=False)
    assert result.html == run / "report" / "report.html"
    assert set(result.figures) == {"curves"}
    assert any("no evaluation yet" in n for n in result.notes)
    assert any("no checkpoint" in n for n in result.notes)
    _embedded_only(result.html.read_text(), 1)
    (run / "log.jsonl").unlink()
    result = build_report(run, progress=False)
    assert result.figures == {} and any("log.jsonl" in n for n in result.notes)


def test_checkpoint_without_eval_shows_first_case(supervised_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(supervised_run, run, ignore=shutil.ignore_patterns("eval"))
    result = build_report(run, progress=False)
    assert {"overlay_first_test_case", "render_first_test_case"} <= set(result.figures)
    _check_figures(result)


def test_not_a_run_folder_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CrlnError, match="not a run folder"):
        build_report(tmp_path)
    with pytest.raises(CrlnError, match="no such run folder"):
        build_report(tmp_path / "missing")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crln: error:")


def test_cli_report_prints_path(supervised_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(supervised_run), "-o", str(tmp_path / "r"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'r' / 'report.html'}"


_CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__errors.push(e.message || ('resource: ' + (t.src || t.href || '?')).slice(0, 80));
}, true);
(function () { var orig = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var d = document.createElement('div'); d.id = 'crln-check';
  d.setAttribute('data-images', imgs.length); d.setAttribute('data-broken', broken);
  d.setAttribute('data-errors', JSON.stringify(window.__errors)); document.body.appendChild(d);
});
</script>"""


def chromium_args(user_data_dir: Path) -> list[str]:
    return [
        CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={user_data_dir}",
    ]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium (apt-get install chromium)")
def test_report_loads_in_headless_chromium(crln_run: Path, tmp_path: Path) -> None:
    result = build_report(crln_run, tmp_path / "rep", progress=False)
    page = result.html.read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + _CHECK_SCRIPT, 1))
    proc = subprocess.run(
        [*chromium_args(tmp_path / "profile"), "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(
        r'<div id="crln-check" data-images="(\d+)" data-broken="(\d+)" data-errors="([^"]*)"', proc.stdout
    )
    assert match, f"no check result in the DOM (rc={proc.returncode}): {proc.stderr[-2000:]}"
    images, broken, errors = int(match[1]), int(match[2]), match[3].replace("&quot;", '"')
    assert images == len(result.figures) and broken == 0, (images, broken)
    assert errors == "[]", errors
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            *chromium_args(tmp_path / "profile2"),
            "--window-size=1280,1600",
            f"--screenshot={shot}",
            result.html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and float(np.std(pixels[..., :3])) > 0.01


def test_report_of_a_run_still_training_reads_what_crln_evaluate_wrote(supervised_run: Path, tmp_path: Path) -> None:
    # While checkpoint_final.pt is missing, crln evaluate RUN scores checkpoint_latest.pt into eval_test_latest/;
    # the report's "run crln evaluate" advice must lead to a report that shows that evaluation.
    run = tmp_path / "training"
    shutil.copytree(
        supervised_run, run, ignore=shutil.ignore_patterns("checkpoint_final.pt", "checkpoint_best.pt", "eval*")
    )
    assert any("no evaluation yet" in n for n in build_report(run, tmp_path / "before", progress=False).notes)
    evaluate(run, limit=2, device="cpu", progress=False)
    assert (run / "eval_test_latest" / "summary.json").is_file()
    result = build_report(run, tmp_path / "after", progress=False)
    assert result.notes == [] and "Per case, worst first" in result.html.read_text()
    assert "checkpoint checkpoint_latest.pt" in result.html.read_text()


def test_report_of_a_run_keeping_the_largest_component_reads_its_evaluation(phantom_root: Path, tmp_path: Path) -> None:
    run = _run(phantom_root, tmp_path / "runs", **{"eval.largest_component": "true"})
    evaluate(run, limit=2, device="cpu", progress=False)  # writes eval_test_final_lcc/
    result = build_report(run, tmp_path / "rep", progress=False)
    assert result.notes == [] and "largest component True" in result.html.read_text()


def _pixels_near(path: Path, color: str) -> int:
    """How many pixels of the PNG at ``path`` are within a small distance of ``color`` (``#rrggbb``)."""
    rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    pixels = mpimg.imread(path)[..., :3]
    return int((np.abs(pixels - rgb).max(axis=-1) < 0.08).sum())


def test_a_log_of_one_record_draws_its_points(tmp_path: Path) -> None:
    # A run reported early (one log_every so far) has one point per series: a line through it is invisible.
    from crln.report.figures import plot_training_curves

    fig = plot_training_curves([{"step": 10, "loss": 0.5}], tmp_path / "curves.png")
    assert fig is not None and _pixels_near(fig.path, "#1f77b4") > 10  # matplotlib's first colour; no legend


def test_an_evaluation_of_an_earlier_iteration_is_noted(supervised_run: Path, tmp_path: Path) -> None:
    # A run still training: crln evaluate scored checkpoint_latest.pt at some iteration, training went on since.
    run = tmp_path / "copy"
    shutil.copytree(supervised_run, run)
    summary_path = run / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "checkpoint_step": 3}))
    result = build_report(run, tmp_path / "rep", progress=False)
    (note,) = result.notes
    assert note.startswith("the evaluation scored iteration 3, these figures show checkpoint_final.pt at iteration 6")
    assert note.endswith(f"run `crln evaluate {run}` again to score it")


def _shared_copy(run: Path, dest: Path) -> Path:
    """What a colleague is sent to share a run (CHECKPOINTS.txt: "the file to share"): the folder without its
    resumable ``checkpoint_*.pt`` files and without an evaluation, so ``model_final.pt`` is its only network."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint_*", "eval*", "report"))
    return dest


def test_a_run_folder_shared_with_only_model_final_is_evaluated_and_reported(
    supervised_run: Path, tmp_path: Path
) -> None:
    shared = _shared_copy(supervised_run, tmp_path / "shared")
    result = evaluate(shared, limit=2, device="cpu", progress=False)
    assert result["out_dir"] == shared / "eval"  # the folder crln report reads
    assert result["summary"]["checkpoint"] == str(shared / "model_final.pt")
    report = build_report(shared, tmp_path / "rep", progress=False)
    assert report.notes == []
    assert {"overlay_worst", "render_worst"} <= set(report.figures)
    assert "checkpoint model_final.pt" in report.html.read_text()


def test_a_shared_crln_folder_notes_that_the_rectification_figure_needs_a_full_checkpoint(
    crln_run: Path, tmp_path: Path
) -> None:
    shared = _shared_copy(crln_run, tmp_path / "shared")
    evaluate(shared, limit=2, device="cpu", progress=False)
    report = build_report(shared, tmp_path / "rep", progress=False)
    assert "rectification" not in report.figures and "overlay_worst" in report.figures
    (note,) = report.notes
    assert "model_final.pt" in note and "rectification" in note


def test_a_folder_without_any_network_names_every_file_looked_for(supervised_run: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(supervised_run, bare, ignore=shutil.ignore_patterns("*.pt", "eval*"))
    with pytest.raises(CrlnError, match=r"no checkpoint_final\.pt, checkpoint_latest\.pt or model_final\.pt"):
        evaluate(bare, device="cpu", progress=False)


def test_the_evaluation_line_names_the_network_scored(crln_run: Path, tmp_path: Path) -> None:
    # One CRLN checkpoint holds the student and the (rectified) teacher: the line says which one the numbers are of.
    html = build_report(crln_run, tmp_path / "rep", progress=False).html.read_text()
    assert "(iteration 6), network student, patch" in html
    run = tmp_path / "copy"
    shutil.copytree(crln_run, run, ignore=shutil.ignore_patterns("report"))
    summary_path = run / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "network": "teacher_rectified"}))  # crln evaluate --network
    assert "network teacher_rectified, patch" in build_report(run, progress=False).html.read_text()
