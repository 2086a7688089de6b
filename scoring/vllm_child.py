"""Launcher of the managed vLLM server, run by *vLLM's* interpreter (it imports nothing of hydra-rm).

`python scoring/vllm_child.py <api_server args>` starts `vllm.entrypoints.openai.api_server` as its
own child and watches two things: the server exiting (the launcher exits with its status) and
hydra-rm going away (the launcher then ends its whole process group: the API server and its
engine-core workers), so a hydra-rm killed with SIGKILL never leaves a vLLM server holding the
accelerator. It is a separate small process on purpose: a watchdog thread inside the API server
never ran while vLLM's main thread held the GIL starting up (seen here: the server outlived its
parent by minutes), and prctl(PR_SET_PDEATHSIG) fires when the parent *thread* exits, while
hydra-rm starts the child from a forward thread that may end before the server should.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5
GRACE_S = 10.0


def main() -> None:
    parent = os.getppid()
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[1:]])
    # hydra-rm stops the server by signalling the whole group: the server gets the SIGTERM too, and
    # this launcher waits for it to finish shutting down instead of dying first.
    signal.signal(signal.SIGTERM, lambda *_: None)
    while True:
        try:
            sys.exit(server.wait(timeout=POLL_S))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # hydra-rm is gone: take the server and its workers down
            os.killpg(0, signal.SIGTERM)
            try:
                server.wait(timeout=GRACE_S)
            finally:
                os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main()
