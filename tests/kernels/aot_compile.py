"""Compile the kernel for CUDA targets without a GPU (run in a subprocess, TRITON_INTERPRET unset).

The interpreter checks semantics; this checks that the compiler accepts the kernel for real targets
and that each launch config fits the target's shared memory. Reads a JSON list of jobs on stdin,
writes one JSON result per job on stdout. Exit code 3: this Triton lacks the AOT API used here.
"""

import importlib
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "must compile, not interpret"

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"no AOT compile API: {e}", file=sys.stderr)
    sys.exit(3)

mr = importlib.import_module("kernels.multihead_reward")
kernel = mr._multihead_reward_kernel
NAMES = list(kernel.arg_names)
DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}
# What a launch with contiguous tensors specialises: unit strides become constants, the rest are
# assumed 16-divisible (true for aligned torch allocations).
UNIT_STRIDES = [
    "stride_hh",
    "stride_wh",
    "stride_bk",
    "stride_rk",
    "stride_min",
    "stride_max",
    "stride_mean",
    "stride_std",
]
DIV16 = ["stride_hb", "stride_ht", "stride_wk", "stride_rb", "H"]


def compile_job(job):
    x, w, cfg = job["x"], job["w"], job["cfg"]
    sig = {}
    for n in NAMES:
        if n.endswith("_ptr"):
            sig[n] = "*" + {"hidden_ptr": x, "index_ptr": "i64", "weight_ptr": w, "bias_ptr": w}.get(
                n, "fp32"
            )
        else:
            sig[n] = "fp32" if n == "resid" else "i32"
    consts = {
        "HAS_INDEX": job.get("has_index", True),
        "EVEN_H": job.get("even_h", True),
        "DOT_PRECISION": "tf32" if x in ("bf16", "fp16") and w in ("bf16", "fp16") else "ieee",
        "BLOCK_B": cfg["BLOCK_B"],
        "BLOCK_H": cfg["BLOCK_H"],
        "BLOCK_K": cfg["BLOCK_K"],
        # The novelty loop (u next to the heads) is compiled in only for models with a statistic.
        "HAS_NOVELTY": job.get("novelty", False),
        "HAS_RESID": job.get("resid", False),
        "BLOCK_R": job.get("block_r", 16),
    }
    attrs = {}
    if job.get("specialise", True):
        consts.update({n: 1 for n in UNIT_STRIDES})
        div16 = [n for n in NAMES if n.endswith("_ptr")] + DIV16
        attrs = {(NAMES.index(n),): [["tt.divisibility", 16]] for n in div16}
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=opts)
    ptx = compiled.asm["ptx"]
    return {
        "shared": compiled.metadata.shared,
        "mma": "mma" in ptx,
        "vector_loads": "ld.global.v4" in ptx or "cp.async" in ptx,
    }


def main():
    jobs = json.load(sys.stdin)
    try:
        results = [compile_job(j) for j in jobs]
    except TypeError as e:  # ASTSource/compile signatures differ across Triton releases
        print(f"AOT API mismatch: {e}", file=sys.stderr)
        sys.exit(3)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
