"""The HTML report in a real browser: headless Chromium (Debian's chromium package) opens the
report of a finished sweep from file://, with every host unresolvable, and we check what it shows.

- ``--dump-dom``: the page after load: one table row per trial, every image loaded (the page's
  own script sets ``data-images-loaded`` / ``data-images-broken`` on <html>), no console message;
  the scores with their intervals in the table cells and the sweep's verdict near the top.
- ``--screenshot``: a real, non-blank PNG in which the Pareto front's green line is visible.
- negative controls: an external resource added to the page is blocked by its
  Content-Security-Policy and reported on the console; a missing figure and a script error are
  seen by the checks above.

When Chromium is missing it is installed with apt-get if we are root, else the tests are skipped
with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from budget_lab.report.html import write_html_report
from tests.test_report import PARETO, make_report_data

# Quiet, offline, reproducible: no sandbox (root in a container), no GPU, none of Chromium's
# background requests (updates, sync, accounts), and every host name unresolvable.
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
]
_FRONT_RGB = (0x1A, 0x98, 0x50)  # the Pareto front's green in figures.py


def _install_chromium() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium with apt-get: {done.stderr[-500:]}")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of the Chromium binary (installed with apt-get when missing and we are root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_chromium()
        found = shutil.which("chromium")
    if found is None:
        pytest.skip(
            "headless Chromium not found (no `chromium` on PATH) and not root to install it: "
            "run `apt-get install chromium` to enable the browser test of the HTML report"
        )
    return found


def _run_chromium(chromium: str, page: Path, profile: Path, *args: str) -> tuple[str, list[str]]:
    """Open `page` once; returns (stdout, console messages) ('CONSOLE' lines of the log)."""
    done = subprocess.run(
        [chromium, *_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


class _Dom(HTMLParser):
    """What the checks need from a dumped DOM: <html> attributes, trial rows and their cells'
    text, images, the text of every element with an id (its first tag), the order of ids."""

    def __init__(self, text: str):
        super().__init__()
        self.root: dict[str, str | None] = {}
        self.trial_rows: list[dict[str, str | None]] = []
        self.cells: list[dict[str, str]] = []  # per trial row: {header: cell text}
        self.headers: list[str] = []
        self.images: list[str | None] = []
        self.ids: dict[str, str] = {}  # id -> its text
        self._open: list[tuple[str, str]] = []  # (tag, id) of elements with an id, open
        self._cell: list[str] | None = None
        self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self._open.append((tag, a["id"]))  # type: ignore[arg-type]
            self.ids[a["id"]] = ""  # type: ignore[index]
        if tag == "html":
            self.root = a
        elif tag == "tr" and "trial-row" in (a.get("class") or "").split():
            self.trial_rows.append(a)
            self.cells.append({})
        elif tag == "td" and self.trial_rows and len(self.cells[-1]) < len(self.headers):
            self._cell = []
        elif tag == "th":
            self._in_th = True
            self.headers.append("")
        elif tag == "img":
            self.images.append(a.get("src"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            row = self.cells[-1]
            row[self.headers[len(row)]] = "".join(self._cell).strip()
            self._cell = None
        elif tag == "th":
            self._in_th = False
        elif tag == "tbody" and self.trial_rows:
            self.headers = []  # the trials table is over; ignore the others' cells
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            self.ids[element] += data
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_th:
            self.headers[-1] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of a finished six-trial sweep (4 complete, 1 pruned, 1 fail)."""
    root = tmp_path_factory.mktemp("browser")
    data = make_report_data(root / "workspace")
    return write_html_report(data, root / "report")


def test_report_opens_offline_with_all_trials_and_no_console_errors(chromium, report, tmp_path):
    out, console = _run_chromium(chromium, report, tmp_path / "profile", "--dump-dom")
    dom = _Dom(out)

    assert console == []
    assert len(dom.trial_rows) == 6
    assert [r["data-state"] for r in dom.trial_rows].count("COMPLETE") == 4
    assert {int(r["data-trial"]) for r in dom.trial_rows if "pareto" in r["class"]} == PARETO
    # Six figures and three sample grids, all decoded by the browser.
    assert len(dom.images) == 9 and "spend_by_activity.png" in dom.images
    assert dom.root.get("data-images-loaded") == "9"
    assert dom.root.get("data-images-broken") == "0"

    # Scores with their noise in the table cells; the older trial #0 has an FID only.
    rows = {int(r["data-trial"]): c for r, c in zip(dom.trial_rows, dom.cells, strict=True)}
    assert {n: cells["FID [95% CI]"] for n, cells in rows.items()} == {
        0: "42.10",
        1: "35.4 [34.6, 36.2]",
        2: "38.0 [37.1, 38.9]",
        3: "—",
        4: "—",
        5: "31.2 [30.3, 32.1]",
    }
    assert rows[1]["N"] == "256" and rows[1]["KID ± std"] == "0.0123 ± 0.0021"
    assert rows[1]["alignment [95% CI]"] == "0.612 [0.551, 0.673]" and rows[1]["cost"] == "$5.10"
    # Each trial's estimate before launch beside what it cost, and the error.
    assert (rows[1]["estimate"], rows[1]["error"]) == ("$4.64", "+10%")
    assert (rows[0]["estimate"], rows[0]["error"]) == ("—", "—")  # an older trial: none
    # Where the money went, by phase and activity: the totals row ends with the sweep's total.
    split = dom.ids["cost-split"]
    assert "start-up" in split and "evaluation" in split and "finetune" in split
    assert split.strip().endswith("$25.80")
    # The figure says what its bars are; the verdict is a paragraph above the figures.
    assert "95% interval" in dom.ids["fig-pareto"]
    verdict = dom.ids["verdict"]
    assert verdict.startswith(
        "Verdict. Lowest FID on the front: mask_ratio=0.75, lr=0.0001, preset=small"
    )
    assert "Front (not clearly dominated; $ within 10% count as equal)" in verdict
    ids = list(dom.ids)
    assert ids.index("summary") < ids.index("verdict") < ids.index("fig-pareto")


def test_report_screenshot_shows_the_pareto_plot(chromium, report, tmp_path):
    shot = tmp_path / "report.png"
    _, console = _run_chromium(
        chromium, report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2600"
    )
    assert console == []
    assert shot.stat().st_size > 50_000
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int16)
    assert pixels.shape == (2600, 1280, 3)
    assert pixels.std() > 20  # not a blank page
    # The front's green step line is drawn (the figure loaded and is on screen).
    green = np.abs(pixels - np.array(_FRONT_RGB)).max(axis=-1) < 30
    assert green.sum() > 500


def test_external_resources_are_blocked_and_reported(chromium, report, tmp_path):
    """The page's Content-Security-Policy: an external image or stylesheet added to the page is
    not fetched, and the browser says so on the console (which the tests above check is empty)."""
    edited = tmp_path / "edited"
    shutil.copytree(report.parent, edited)
    page = edited / "index.html"
    cdn = '<link rel="stylesheet" href="https://cdn.example.com/site.css">'
    page.write_text(
        page.read_text()
        .replace("</head>", cdn + "</head>")
        .replace("<main>", '<main><img src="https://cdn.example.com/logo.png">')
    )
    out, console = _run_chromium(chromium, page, tmp_path / "profile", "--dump-dom")
    blocked = [m for m in console if "violates the following Content Security Policy" in m]
    assert len(blocked) == 2, console
    assert _Dom(out).root.get("data-images-broken") == "1"  # the CDN logo; all local ones load


def test_checks_catch_a_missing_figure_and_a_script_error(chromium, report, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(report.parent, broken)
    (broken / "pareto.png").unlink()
    page = broken / "index.html"
    page.write_text(
        page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>")
    )
    out, console = _run_chromium(chromium, page, tmp_path / "profile", "--dump-dom")
    dom = _Dom(out)
    assert dom.root.get("data-images-broken") == "1"
    assert "missing figure: pareto.png" in out
    # an injected script is refused by the page's Content-Security-Policy, and says so
    assert any(re.search(r"Content Security Policy", m) for m in console), console
