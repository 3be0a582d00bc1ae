"""Restart time: `bash scripts/serve` started again reaches a ready /readyz.

What a user waits for after stopping the service and starting it again. Each run is the real
`bash scripts/serve` (setup, broker check, then the daemon) on the shipped config.toml, with
state in a temp dir, a free HTTP port and its own MQTT client id; the clock runs from spawning
the script to the first `200` from GET /readyz (store writable, broker connected, API
reachable), polled every 20 ms. The run is stopped with SIGTERM before the next starts.

Measured in the same run:
  install start   the install stamp removed first, so scripts/setup reinstalls: what every
                  start cost before the stamp (the baseline);
  restart         the same script started again, stamp in place (N times, median and worst);
  daemon alone    `.venv/bin/studiohook serve` without the script: the floor.

`--quick` skips the install start (it reinstalls the package into .venv, ~7 s or more).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from _shared import emit_result, print_table

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / ".venv" / ".studiohook-installed"
RESTARTS = 5
READY_TIMEOUT_S = 180.0
POLL_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path) -> Path:
    """The shipped config.toml with its own MQTT client id (others may run one on the broker)."""
    text = (ROOT / "config.toml").read_text()
    text = text.replace('client_id = "studiohook"', f'client_id = "bench-{uuid.uuid4().hex[:8]}"')
    text = text.replace('file = "templates/', f'file = "{ROOT}/templates/')
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _time_to_ready(argv: list[str], tmp: Path, log: Path) -> float:
    port = _free_port()
    env = {
        **os.environ,
        "STUDIOHOOK_LISTEN": f"127.0.0.1:{port}",
        "STUDIOHOOK_STATE_DIR": str(tmp / "state"),
    }
    env.pop("AISTUDIOS_API_KEY", None)
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while not _ready(f"http://127.0.0.1:{port}/readyz"):
                if process.poll() is not None:
                    sys.exit(f"{argv[0]} exited with {process.returncode}; see {log}")
                if time.perf_counter() - started > READY_TIMEOUT_S:
                    sys.exit(f"not ready after {READY_TIMEOUT_S} s; see {log}")
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return elapsed


def main() -> None:
    """`python bench/serve_restart.py [--quick]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="skip the reinstalling start")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-restart-") as name:
        tmp = Path(name)
        config, log = _config(tmp), tmp / "serve.log"
        script = ["bash", "scripts/serve", "--config", str(config)]  # the last --config wins
        figures: dict[str, float] = {}
        # A first start makes sure .venv exists and the broker answers (not measured).
        _time_to_ready(script, tmp, log)
        if not args.quick:
            STAMP.unlink(missing_ok=True)
            figures["install_start_s"] = _time_to_ready(script, tmp, log)
        restarts = [_time_to_ready(script, tmp, log) for _ in range(RESTARTS)]
        daemon = [ROOT / ".venv/bin/studiohook", "serve", "--config", str(config)]
        alone = [_time_to_ready([str(a) for a in daemon], tmp, log) for _ in range(RESTARTS)]
        figures["restart_median_s"] = statistics.median(restarts)
        figures["restart_max_s"] = max(restarts)
        figures["daemon_alone_median_s"] = statistics.median(alone)
        rows = []
        if "install_start_s" in figures:
            install = figures["install_start_s"]
            rows.append(
                ["scripts/serve, reinstalling (every start before the stamp)", install, install]
            )
        rows.append(
            ["scripts/serve, restart", figures["restart_median_s"], figures["restart_max_s"]]
        )
        rows.append(
            ["studiohook serve alone (the floor)", figures["daemon_alone_median_s"], max(alone)]
        )
        print_table(
            f"spawn to a ready /readyz, seconds ({RESTARTS} restarts each)",
            ["start", "median", "worst"],
            rows,
        )
        if "install_start_s" in figures:
            ratio = figures["restart_median_s"] / figures["install_start_s"]
            print(f"restart / reinstalling start: {ratio:.2f}x")
            figures["restart_vs_install_ratio"] = ratio
        emit_result("serve_restart", {k: round(v, 3) for k, v in figures.items()})


if __name__ == "__main__":
    main()
