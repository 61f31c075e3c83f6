"""The PyTorch reference of algpt2-ddp: the same ALGPT2 family written independently in
plain PyTorch, the truth the Rust trainer is tested against (like llm.c's train_gpt2.py).

Model: GPT-2 pre-LN blocks; `share_layers` applies one block n_layer times (ALBERT
sharing); `embedding_size` E < n_embd factorizes the token and position tables (V×E, P×E)
with Linear E→H in and Linear H→E out after the final LayerNorm, the LM head tied to the
E-wide token table. Parameter names match the Rust checkpoint keys.
Model config key `embedding_dropout` (factorized models only; otherwise both orders are
dropout on tok+pos): "after_projection" (default, the studies' order: tok+pos, proj_in,
dropout) or "before_projection" (tok+pos, dropout, proj_in).

Commands (each reads files the Rust tests write, compares, prints one JSON line and exits
non-zero on a mismatch):
  parity DIR   config.json, weights.safetensors, batch.safetensors, ours.safetensors:
               logits, loss and every gradient, relative error <= --tol (eval mode, no
               dropout). --precision fp32 (default, tol 1e-5) or bf16: forward and loss
               under torch.autocast("cpu", bfloat16), backward outside it (fp32 weights
               and grads; default tol 5e-2). --dump PATH also writes the reference's own
               outputs to a safetensors file: "logits" (float32), "loss" (float32, 0-dim)
               and "grad.<name>" per parameter; with --dump, ours.safetensors may be absent
               (then nothing is compared and ok is true). JSON: ok, precision, tol, worst,
               worst_err, loss, n_compared (and dump when given).
  adamw DIR    adamw.json, adamw_in.safetensors, adamw_out.safetensors: torch.optim.AdamW
               over the same gradients, max abs error <= --tol (1e-6)
  bench SPEC   train in plain PyTorch on the same token file and shapes as our trainer and
               print one JSON line. Spec (JSON): model, seq_len, micro_batch_size,
               grad_accum_steps, steps, lr, weight_decay, grad_clip, threads, tokens, and
               optionally
                 mode      "fp32_eager" (default), "bf16_autocast" (forward and loss under
                           torch.autocast(device, bfloat16), backward outside),
                           "bf16_compile" (torch.compile(model), then as bf16_autocast),
                           "fp32_compile" (torch.compile(model) in fp32)
                 device    "cpu" (default) or "cuda" (timing between cuda synchronizes)
                 pad_vocab false (default); true rounds vocab_size up to a multiple of 64
                           for the PyTorch model, as nanoGPT does
               Warm-up steps, not timed: 3 (eager) or 5 (compile modes, so compilation is
               left out). Under torchrun (WORLD_SIZE > 1) it is DDP (gloo on cpu, nccl on
               cuda), all-reducing on the last micro-step only. JSON (rank 0): tokens_per_sec,
               step_ms (mean timed step), steps, warmup, loss, mode, device, pad_vocab,
               vocab_size, peak_rss_mb (ru_maxrss of this process), peak_gpu_mb (cuda only,
               torch.cuda.max_memory_allocated), torch, threads, world.
"""

import argparse
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

EMBEDDING_DROPOUT = ("after_projection", "before_projection")
BENCH_MODES = ("fp32_eager", "bf16_autocast", "bf16_compile", "fp32_compile")


class Block(nn.Module):
    def __init__(self, h, n_head, dropout, n_layer):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(h, eps=1e-5)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(h, 3 * h)
        self.attn.c_proj = nn.Linear(h, h)
        self.ln_2 = nn.LayerNorm(h, eps=1e-5)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(h, 4 * h)
        self.mlp.c_proj = nn.Linear(4 * h, h)
        for lin in (self.attn.c_attn, self.mlp.c_fc):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for lin in (self.attn.c_proj, self.mlp.c_proj):
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layer))
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (z.view(b, t, self.n_head, h // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, h)
        x = x + F.dropout(self.attn.c_proj(y), self.dropout, self.training)
        m = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")
        return x + F.dropout(self.mlp.c_proj(m), self.dropout, self.training)


class ALGPT2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        v, p, h = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"]
        e = cfg.get("embedding_size") or h
        self.factorized = e != h
        self.wte = nn.Parameter(torch.randn(v, e) * 0.02)
        self.wpe = nn.Parameter(torch.randn(p, e) * 0.02)
        if self.factorized:
            self.proj_in = nn.Linear(e, h)
            self.proj_out = nn.Linear(h, e)
        stored = 1 if cfg["share_layers"] else cfg["n_layer"]
        self.h = nn.ModuleList(Block(h, cfg["n_head"], cfg["dropout"], cfg["n_layer"]) for _ in range(stored))
        self.ln_f = nn.LayerNorm(h, eps=1e-5)
        self.embedding_dropout = cfg.get("embedding_dropout", "after_projection")
        if self.embedding_dropout not in EMBEDDING_DROPOUT:
            raise SystemExit(f"embedding_dropout must be one of {EMBEDDING_DROPOUT}, not {self.embedding_dropout!r}")

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.wte[idx] + self.wpe[torch.arange(t, device=idx.device)]
        if self.factorized and self.embedding_dropout == "after_projection":
            x = self.proj_in(x)
        x = F.dropout(x, self.cfg["dropout"], self.training)
        if self.factorized and self.embedding_dropout == "before_projection":
            x = self.proj_in(x)
        for layer in range(self.cfg["n_layer"]):
            x = self.h[0 if self.cfg["share_layers"] else layer](x)
        x = self.ln_f(x)
        if self.factorized:
            x = self.proj_out(x)
        logits = x @ self.wte.t()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def rel_err(ours, ref):
    """Normwise relative error: max |ours - ref| / max |ref| (0/0 counts as 0), in float32."""
    ours, ref = ours.float(), ref.float()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def parity(d, tol, precision="fp32", dump=None):
    cfg = json.load(open(f"{d}/config.json"))
    model = ALGPT2(cfg)
    weights = load_file(f"{d}/weights.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not match the reference model: missing {missing}, unexpected {unexpected}")
    model.eval()  # parity is checked without dropout
    batch = load_file(f"{d}/batch.safetensors")
    ours_path = f"{d}/ours.safetensors"
    if not os.path.exists(ours_path) and dump is None:
        raise SystemExit(f"{ours_path} is missing (only --dump may run without it)")
    # bf16: forward and loss under autocast, backward outside it; the weights and their
    # gradients stay float32 (the usual PyTorch mixed precision).
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits, loss = model(batch["idx"], batch["targets"])
    loss.backward()
    if dump is not None:
        out = {"logits": logits.detach().float().contiguous(), "loss": loss.detach().float().contiguous()}
        for name, p in model.named_parameters():
            out[f"grad.{name}"] = p.grad.detach().float().contiguous()
        save_file(out, dump)
    errors = {}
    if os.path.exists(ours_path):
        ours = load_file(ours_path)
        errors = {"logits": rel_err(ours["logits"], logits.detach()), "loss": rel_err(ours["loss"], loss.detach())}
        for name, p in model.named_parameters():
            errors[f"grad.{name}"] = rel_err(ours[f"grad.{name}"], p.grad)
    worst = max(errors, key=errors.get) if errors else None
    ok = worst is None or errors[worst] <= tol
    report = {"ok": ok, "precision": precision, "tol": tol, "worst": worst,
              "worst_err": errors[worst] if errors else None, "loss": loss.item(), "n_compared": len(errors)}
    if dump is not None:
        report["dump"] = dump
    print(json.dumps(report))
    return ok


def adamw(d, tol):
    spec = json.load(open(f"{d}/adamw.json"))
    tensors = load_file(f"{d}/adamw_in.safetensors")
    ours = load_file(f"{d}/adamw_out.safetensors")["values"]
    values = tensors["values"].clone()
    decay_len = spec["decay_len"]
    decayed = nn.Parameter(values[:decay_len].clone())
    plain = nn.Parameter(values[decay_len:].clone())
    opt = torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": spec["weight_decay"]}, {"params": [plain], "weight_decay": 0.0}],
        lr=spec["lrs"][0], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"], foreach=False)
    for step, lr in enumerate(spec["lrs"]):
        grads = tensors[f"grads.{step}"]
        decayed.grad = grads[:decay_len].clone()
        plain.grad = grads[decay_len:].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    ref = torch.cat([decayed.detach(), plain.detach()])
    err = (ours - ref).abs().max().item()
    ok = err <= tol
    print(json.dumps({"ok": ok, "tol": tol, "max_abs_err": err, "steps": len(spec["lrs"])}))
    return ok


def read_tokens(path):
    """A token file written by `algpt2-ddp prepare`: 64-byte header, then u16 or u32 ids."""
    import numpy as np
    with open(path, "rb") as f:
        header = f.read(64)
    assert header[:8] == b"ALGPT2TK", f"{path} is not a token file"
    width = int.from_bytes(header[12:16], "little")
    count = int.from_bytes(header[16:24], "little")
    dtype = np.uint16 if width == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=64, shape=(count,))


def bench(spec_path):
    """Under torchrun (WORLD_SIZE > 1) this is PyTorch DDP: gloo on cpu (the CPU baseline),
    nccl on cuda."""
    import resource
    import time
    import numpy as np
    import torch.distributed as dist
    spec = json.load(open(spec_path))
    mode = spec.get("mode", "fp32_eager")
    if mode not in BENCH_MODES:
        raise SystemExit(f"bench: mode must be one of {BENCH_MODES}, not {mode!r}")
    device_type = spec.get("device", "cpu")
    if device_type not in ("cpu", "cuda"):
        raise SystemExit(f"bench: device must be cpu or cuda, not {device_type!r}")
    bf16 = mode.startswith("bf16")
    compiled = mode.endswith("_compile")
    cuda = device_type == "cuda"
    torch.set_num_threads(spec["threads"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model_cfg = dict(spec["model"])
    if spec.get("pad_vocab", False):
        model_cfg["vocab_size"] = (model_cfg["vocab_size"] + 63) // 64 * 64
    model = ALGPT2(model_cfg).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec["lr"], betas=(0.9, 0.999))
    ddp = torch.compile(model) if compiled else model  # compiled, then wrapped, as nanoGPT does
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, device_ids=[device.index] if cuda else None)
    tokens = read_tokens(spec["tokens"])
    t, b = spec["seq_len"], spec["micro_batch_size"]
    windows = (len(tokens) - 1) // t
    rng = np.random.default_rng(rank)
    # Compile modes compile during the first steps: more warm-up keeps that out of the timing.
    warmup, steps = (5 if compiled else 3), spec["steps"]
    timed_tokens, timed_seconds = 0, 0.0
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for micro in range(spec["grad_accum_steps"]):
            w = rng.integers(0, windows, size=b)
            batch = torch.from_numpy(np.stack([tokens[i * t:i * t + t + 1].astype(np.int64) for i in w]))
            batch = batch.to(device)
            last = micro == spec["grad_accum_steps"] - 1
            # DDP all-reduces on the last micro-step only, as ours does.
            with (ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                    _, loss = ddp(batch[:, :-1], batch[:, 1:])
                (loss / spec["grad_accum_steps"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            timed_seconds += time.perf_counter() - started
            timed_tokens += b * t * spec["grad_accum_steps"] * world
    if rank == 0:
        report = {"tokens_per_sec": timed_tokens / timed_seconds, "step_ms": 1000 * timed_seconds / steps,
                  "steps": steps, "warmup": warmup, "loss": loss.item(), "mode": mode, "device": device_type,
                  "pad_vocab": bool(spec.get("pad_vocab", False)), "vocab_size": model_cfg["vocab_size"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if cuda:
            report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        report.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "world": world})
        print(json.dumps(report), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["parity", "adamw", "bench"])
    ap.add_argument("dir", help="the test directory (parity, adamw) or the bench spec JSON")
    ap.add_argument("--tol", type=float)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="parity: fp32, or bf16 under torch.autocast (default fp32)")
    ap.add_argument("--dump", metavar="PATH", dest="ref_out",
                    help="parity: also write the reference's logits, loss and grad.<name> to this safetensors file")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.command == "parity":
        default_tol = 1e-5 if args.precision == "fp32" else 5e-2
        ok = parity(args.dir, args.tol if args.tol is not None else default_tol, args.precision, args.ref_out)
    elif args.command == "bench":
        ok = bench(args.dir)
    else:
        ok = adamw(args.dir, args.tol if args.tol is not None else 1e-6)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
