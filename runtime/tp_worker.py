"""The process msrun starts for a tensor-parallel artifact (runtime/tensor_parallel.py), as each worker and as its
scheduler:

    msrun --worker_num=N ... tp_worker.py ARTIFACTS HOST PORT DEVICE DRIVER_PID    (MINDVL_TP_KEY in the environment)

It connects to the driver first, with the standard library alone, so that the driver watches it from its first
second: a process that dies anywhere after that, even while MindSpore is imported or the collectives rendezvous, is
seen at once. Then it becomes a rank (runtime/tp_rank.py), or for msrun's scheduler runs the rendezvous until the
workers are done.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from multiprocessing.connection import Client


def _watch_driver(pid: int) -> None:
    """Exit when the driver is gone: a rank blocked in a collective whose peer died would otherwise never return."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass
        time.sleep(1.0)


def main(argv: list[str]) -> int:
    folder, host, port, device, driver = argv
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("MINDVL_TP_KEY")))
    role = os.environ.get("MS_ROLE", "MS_WORKER")
    conn.send(("started", role, os.getpid()))
    threading.Thread(target=_watch_driver, args=(int(driver),), daemon=True).start()
    from mindvl.runtime.tp_rank import run_rank

    return run_rank(conn, folder, device, scheduler=role == "MS_SCHED")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
