"""Kernel tests run the real Triton kernel on CPU through the interpreter.

`triton.jit` decides between compiling and interpreting when the kernel is decorated, i.e. when
`kernels.multihead_reward` is first imported, so the switch must be set before anything imports
triton. A root conftest may also set it (with setdefault); this one does not rely on that.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
