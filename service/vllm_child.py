"""Launcher of the managed vLLM server, run by *vLLM's* interpreter (it imports nothing of hydra-rm).

`python service/vllm_child.py <api_server args>` starts a watchdog thread and then runs
`vllm.entrypoints.openai.api_server` in this same process. The watchdog ends the child's whole
process group (the API server and its engine-core workers) as soon as its parent is gone, so a
hydra-rm killed with SIGKILL (no atexit, no lifespan) never leaves a vLLM server holding the
accelerator. prctl(PR_SET_PDEATHSIG) would not do: it fires when the parent *thread* exits, and
hydra-rm starts the child from its forward thread.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 0.5
GRACE_S = 10.0


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.killpg(0, signal.SIGTERM)  # the server shuts its engine core down on SIGTERM
    time.sleep(GRACE_S)
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    threading.Thread(target=_watch, args=(os.getppid(),), name="hydra-rm-parent-watch", daemon=True).start()
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
