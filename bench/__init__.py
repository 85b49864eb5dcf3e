"""kalm_fast's benchmark suites (``python -m bench``) and compile facts (``python -m bench.compile``)."""

import os
import subprocess
from pathlib import Path


def git_sha() -> str:
    """The short sha the results record: KALM_FAST_GIT_SHA when set (the caller gives it where the tree is a copy
    without .git: bench/gpu_session.sh), else this checkout's HEAD, else "unknown"."""
    sha = os.environ.get("KALM_FAST_GIT_SHA", "")
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
