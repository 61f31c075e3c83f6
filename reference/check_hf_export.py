"""Loads an `algpt2-ddp export-hf` directory with HF transformers, offline, and compares
its logits with ours on the same tokens: exits non-zero when the largest absolute
difference exceeds TOL (1e-4).

    python reference/check_hf_export.py EXPORT_DIR OURS.safetensors [TOL]
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel


def main():
    export_dir, ours_path = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
    model = GPT2LMHeadModel.from_pretrained(export_dir, local_files_only=True, torch_dtype=torch.float32)
    model.eval()
    ours = load_file(ours_path)
    with torch.no_grad():
        logits = model(ours["idx"]).logits
    diff = (logits - ours["logits"]).abs().max().item()
    print(json.dumps({"max_abs_diff": diff, "tol": tol, "ok": diff <= tol}))
    sys.exit(0 if diff <= tol else 1)


if __name__ == "__main__":
    main()
