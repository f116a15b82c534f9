"""The README's Python blocks, run as written with the installed package (issue 23: the snippet
failed with OrderError). The marks are those of Tests/KVRecallTests/ReadmeTests.swift, which runs
the shell blocks: `<!-- readme-test: skip: REASON -->` on the line before a fence skips it."""
import contextlib
import io
import os
import re

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPOSITORY, "README.md")
MARK = re.compile(r"^<!-- readme-test:\s*(.*?)\s*-->$")


def python_blocks():
    """(fence line, source, skip reason or None) of every ```python block."""
    lines = open(README, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        language, start = lines[i][3:].strip(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if language != "python":
            continue
        mark = MARK.match(lines[start - 1].strip()) if start > 0 else None
        reason = None
        if mark:
            spec = mark.group(1)
            reason = spec[5:].strip() if spec.startswith("skip:") else "needs Gemma 3 270M" if spec == "needs-model" else None
        blocks.append((start + 1, "\n".join(body), reason))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_a_python_block():
    assert any(reason is None for _, _, reason in BLOCKS)


@pytest.mark.parametrize("line,source,reason", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs_as_written(line, source, reason, tmp_path, monkeypatch):
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
