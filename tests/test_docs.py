"""Every ```python block in README.md and docs/*.md runs, as its own script.

A block runs in a fresh interpreter, in an empty directory, with an environment
that looks like production to the example but points botocore at an in-process
moto server: ``AWS_ENDPOINT_URL``, fake credentials, ``AWS_DEFAULT_REGION``
us-east-1, and shared config files of our own. Before each block the server is
reset and a symmetric key with the alias ``alias/my-app`` is created, which is
the convention the docs state: examples assume a key with that alias.

A block whose info string is ``python no-run`` is collected but skipped; keep
those rare (a fragment that cannot run alone). Other languages (bash, hcl,
json, text) are never run.

The page-level checks below also keep relative links between the pages honest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ALIAS = "alias/my-app"
EXAMPLE_PROFILE = "my-app-prod"
REGION = "us-east-1"
TIMEOUT = 60.0

# Signs, in an example's stderr, of a resource or task it forgot to close or await.
LEAK_MARKERS = (
    "ResourceWarning",
    "Unclosed",
    "Task was destroyed",
    "Task exception was never retrieved",
    "never awaited",
    "Exception ignored",
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

# Slow: every example runs in a fresh interpreter.
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    line: int
    info: str
    code: str

    @property
    def language(self) -> str:
        words = self.info.split()
        return words[0].lower() if words else ""

    @property
    def runs(self) -> bool:
        return "no-run" not in self.info.split()[1:]


def pages() -> list[Path]:
    found = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    return [readme, *found] if readme.is_file() else found


def fenced_blocks(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown page, with their info strings."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    index = 0
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        yield Block(page, index, i + 1, info, "\n".join(body) + "\n")
        index += 1
        i = j + 1


def python_blocks() -> list[Block]:
    return [
        block
        for path in pages()
        for block in fenced_blocks(path)
        if block.language in {"python", "py"}
    ]


def _params() -> list[object]:
    params: list[object] = []
    for block in python_blocks():
        marks = [] if block.runs else [pytest.mark.skip(reason="marked `python no-run`")]
        params.append(pytest.param(block, id=f"{block.page}:{block.line}", marks=marks))
    return params


# -- a KMS for the examples ------------------------------------------------------


@pytest.fixture
def example_env(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment an example runs in: the moto server (reset by ``moto_endpoint``,
    from conftest) with a fresh key behind ``alias/my-app``."""
    for name in list(os.environ):
        # A developer's own settings must not reach the examples (their database!).
        if name.startswith(("AWS_", "ENCX_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    aws_dir = tmp_path / "aws"
    aws_dir.mkdir()
    (aws_dir / "config").write_text(
        f"[default]\nregion = {REGION}\n\n[profile {EXAMPLE_PROFILE}]\nregion = {REGION}\n"
    )
    (aws_dir / "credentials").write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n\n"
        f"[{EXAMPLE_PROFILE}]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")

    # botocore's client methods are generated at runtime: type it as Any.
    client: Any = botocore.session.get_session().create_client(
        "kms",
        region_name=REGION,
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        key = client.create_key(Description="docs examples")
        client.create_alias(AliasName=EXAMPLE_ALIAS, TargetKeyId=key["KeyMetadata"]["KeyId"])
    finally:
        client.close()
    return dict(os.environ)


# -- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize("block", _params())
def test_example_runs(block: Block, example_env: dict[str, str], tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    script = workdir / "example.py"
    script.write_text(block.code, encoding="utf-8")
    result = subprocess.run(  # noqa: S603 (our own interpreter, our own file)
        [sys.executable, "-W", "always::ResourceWarning", str(script)],
        cwd=workdir,
        env=example_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    where = f"{block.page}, block at line {block.line}"
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"{where} exited with {result.returncode}\n{output}"
    leaks = [marker for marker in LEAK_MARKERS if marker in result.stderr]
    assert not leaks, f"{where} left something open or unawaited: {leaks}\n{output}"


def test_pages_have_runnable_examples() -> None:
    blocks = python_blocks()
    assert blocks, "no ```python blocks found in README.md or docs/"
    skipped = [b for b in blocks if not b.runs]
    assert len(skipped) * 4 <= len(blocks), "too many `python no-run` blocks"


def test_fences_are_closed() -> None:
    for path in pages():
        opened = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if _FENCE.match(line):
                opened += 1
        assert opened % 2 == 0, f"{path.name} has an unclosed code fence"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _prose(path: Path) -> str:
    """The page without its code blocks."""
    kept: list[str] = []
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            kept.append(line)
    return "\n".join(kept)


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    for match in _LINK.finditer(_prose(path)):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: broken link to {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name}: no heading for #{anchor} in {target}"
