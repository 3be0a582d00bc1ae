"""The CLI as a user runs it: `python -m service ...` in a child process, to its end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio


def run_studiohook(
    *args: str, cwd: Path, state_dir: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one command to its end; no API key leaks in from the environment running the tests."""
    env = {**os.environ, "STUDIOHOOK_STATE_DIR": str(state_dir)}
    env.pop("AISTUDIOS_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def jobs_cli(config: Path, url: str, *args: str, columns: int = 80) -> tuple[int, str, str]:
    """`studiohook jobs ARGS` against a running service: exit code, stdout, stderr."""
    env = {**os.environ, "COLUMNS": str(columns)}
    command = [sys.executable, "-m", "service", "jobs", *args, "--config", str(config)]
    result = await anyio.run_process([*command, "--url", url], check=False, env=env)
    return result.returncode, result.stdout.decode(), result.stderr.decode()
