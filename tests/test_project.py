"""The README's quick start and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start(tag: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- quick-start:{tag} -->\s*```sh\n(.*?)\n```", text, re.S)
    assert block, f"README has no quick-start:{tag} command"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quick_start("test") in ci.splitlines()


def test_quick_start_has_two_commands_that_install_and_run():
    demo, test = _quick_start("demo"), _quick_start("test")
    assert "pip install" in demo and "repc.demo" in demo
    assert "pip install" in test and "pytest" in test
