"""The README's examples run as written.

Every ```python block runs, in README order, in a fresh temporary folder; the blocks of one
``##`` section share one namespace (a section reads as one session) and nothing else is given
to them, so a name a snippet uses must be defined in its section. The ```bash commands of a
section then run in the same folder (``.venv/bin/qmrkit`` → this interpreter's ``-m qmrkit``),
except those in ``SKIPPED`` (each with its reason).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow  # ≈ 2 min in all on 2 CPU cores (the learn example alone ≈ 25 s)

# command prefix -> why the test does not run it
SKIPPED = {
    "make demo": "minutes; .ci/run runs it in a fresh clone",
    "make test": "the test suite itself",
    "qmrkit serve": "runs until stopped; tests/serve start servers in-process",
    "qmrkit send": "needs a running server; tests/cli/test_send.py streams through a real one",
    "qmrkit mrf": "names a user's scan.h5/b1.nii.gz; make demo and tests/pipelines run qmrkit mrf "
    "on written scans",
    "qmrkit fit molli --send-to": "needs a PACS; tests/io/test_pacs.py sends to a real Orthanc",
    "qmrkit batch study --model molli --scheduler tcp": "needs a running Dask cluster; "
    "tests/dist/test_batch.py runs on a LocalCluster",
    "qmrkit fit mcr-mwi": "needs a surrogate trained for the protocol (≈ 1 min); "
    "tests/cli/test_fit_myelin.py trains one and runs this command on a simulated phantom",
}

# section -> reason, for python blocks known to fail at the time of writing (run, xfail if so)
KNOWN_FAILURES: dict[str, str] = {}

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def parse(text: str) -> list[tuple[str, str, str]]:
    """``(section, language, code)`` for every fenced block, in order (indented fences inside
    list items included, their indentation removed)."""
    blocks, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = _FENCE.match(line)
        if m and m.group(2):
            indent, lang, body = len(m.group(1)), m.group(2), []
            i += 1
            while not _FENCE.match(lines[i]):
                body.append(lines[i][indent:])
                i += 1
            blocks.append((section, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


def commands(code: str) -> list[str]:
    """Shell commands of a bash block: continuations joined, trailing comments dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.split(r"\s#\s", " " + line, maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _skip_reason(cmd: str) -> str | None:
    plain = cmd.replace(".venv/bin/", "")
    return next((why for pre, why in SKIPPED.items() if plain.startswith(pre)), None)


def _sections() -> list:
    by_section: dict[str, list[tuple[str, str]]] = {}
    for section, lang, code in parse(README.read_text()):
        if lang in ("python", "bash"):
            by_section.setdefault(section, []).append((lang, code))
    params = []
    for section, blocks in by_section.items():
        marks = []
        if section in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[section], strict=False))
        params.append(pytest.param(section, blocks, id=section, marks=marks))
    return params


@pytest.mark.parametrize("section, blocks", _sections())
def test_readme_section_runs(section, blocks, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    t0 = time.perf_counter()
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, f"README.md [{section}]", "exec"), namespace)
    ran = []
    for lang, code in blocks:
        if lang != "bash":
            continue
        for cmd in commands(code):
            if _skip_reason(cmd):
                continue
            argv = shlex.split(cmd)
            if argv[0] in (".venv/bin/qmrkit", "qmrkit"):
                argv = [sys.executable, "-m", "qmrkit", *argv[1:]]
            elif argv[0] == ".venv/bin/python":
                argv[0] = sys.executable
            else:
                pytest.fail(f"README [{section}]: no rule to run {cmd!r}; add it to SKIPPED")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr
            ran.append(cmd)
    with capsys.disabled():
        print(f"\nREADME [{section}]: {time.perf_counter() - t0:.1f} s, ran {len(ran)} commands")


def test_parser_finds_every_block():
    """The parser sees every fence of the README (including indented ones in lists)."""
    text = README.read_text()
    blocks = parse(text)
    n_fences = sum(1 for line in text.splitlines() if _FENCE.match(line))
    assert 2 * len(blocks) == n_fences
    assert any(code.startswith("te = [10") for _, _, code in blocks)  # the indented mcmc one
    cmds = commands("a \\\n  b  # note\n# only a comment\nc")
    assert [shlex.split(c) for c in cmds] == [["a", "b"], ["c"]]


def test_every_skipped_command_exists():
    """A skip whose command left the README is stale."""
    cmds = [
        c.replace(".venv/bin/", "")
        for _, lang, code in parse(README.read_text())
        if lang == "bash"
        for c in commands(code)
    ]
    for prefix in SKIPPED:
        assert any(c.startswith(prefix) for c in cmds), prefix
