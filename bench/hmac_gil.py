"""The webhook signature check beside a busy thread: the project's HMAC against the one-shot.

`hmac.digest` (and hashlib for 2,048 bytes or more) lets the GIL go while it hashes; with the
store's writer thread wanting the GIL, winning it back costs far more than the hash. The
project's `_hmac_sha256` feeds the body in pieces under 2,048 bytes so the hash keeps the GIL.
Both are timed on the signed `examples/shopify-product-create.json` body (3.4 KB), first
alone, then with one thread running Python beside them (what the writer thread does between
its statements), under the writer's GIL switch interval.
"""

from __future__ import annotations

import argparse
import hmac
import sys
import threading
import time
from collections.abc import Callable

from _shared import ROOT, emit_result, print_table, ratio

from service.ingress.signatures import _hmac_sha256
from service.store.writer import WRITER_SWITCH_INTERVAL_S

KEY = b"shopify-webhook-secret"
BODY = (ROOT / "examples" / "shopify-product-create.json").read_bytes()


def one_shot() -> bytes:
    return hmac.digest(KEY, BODY, "sha256")


def in_pieces() -> bytes:
    return _hmac_sha256(KEY, BODY)


def micros_each(check: Callable[[], bytes], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        check()
    return (time.perf_counter() - start) / count * 1e6


def beside_a_busy_thread(check: Callable[[], bytes], count: int) -> float:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        return micros_each(check, count)
    finally:
        stop.set()
        busy.join()


def main() -> None:
    """`python bench/hmac_gil.py [--quick]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer checks per figure")
    count = 200 if parser.parse_args().quick else 2000
    if in_pieces() != one_shot():
        raise SystemExit("the two HMACs differ")
    sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S)
    figures = {
        "alone_pieces_us": micros_each(in_pieces, count),
        "alone_one_shot_us": micros_each(one_shot, count),
        "busy_pieces_us": beside_a_busy_thread(in_pieces, count // 5),
        "busy_one_shot_us": beside_a_busy_thread(one_shot, count // 5),
    }
    print_table(
        f"HMAC-SHA256 of a {len(BODY):,}-byte webhook body, µs per check",
        ["condition", "in pieces (studiohook)", "one-shot (baseline)", "ratio"],
        [
            ("alone", figures["alone_pieces_us"], figures["alone_one_shot_us"],
             ratio(figures["alone_pieces_us"], figures["alone_one_shot_us"])),
            ("beside a busy thread", figures["busy_pieces_us"], figures["busy_one_shot_us"],
             ratio(figures["busy_pieces_us"], figures["busy_one_shot_us"])),
        ],
    )  # fmt: skip
    emit_result("hmac_gil", {k: round(v, 2) for k, v in figures.items()})


if __name__ == "__main__":
    main()
