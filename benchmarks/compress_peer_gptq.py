"""GPTQ side by side: curvkit.compress.quantize vs llmcompressor's GPTQModifier (oneshot), run
unmodified from its wheel, on the same small Llama (transformers, built from a config) trained
briefly on the char-LM text. Same settings for both: symmetric int weights per output channel,
3 and 4 bits, damping 1% of mean(diag H), blocks of 128, activation order, the same calibration
sequences, every q/k/v/o/gate/up/down projection quantized (the embedding and head are not).
Reports held-out loss (nats/char), the quantize call's time and the peak memory (CUDA peak
allocated on the GPU; the child process's peak RSS on the CPU), each tool in its own process.

    PYTHONPATH=/tmp/obs-site:$PWD/src:$PWD python benchmarks/compress_peer_gptq.py [--quick] [--device cuda]

The peer's wheels and their dependencies (llmcompressor 0.14.0.1 pins transformers<=5.17 and
compressed-tensors 0.19.0) go into a separate folder on PYTHONPATH, never into the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONTEXT = 64


def build(device: str, quick: bool, steps: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.optim.workloads import _text_tensors

    cfg = LlamaConfig(vocab_size=128, hidden_size=64 if quick else 128, intermediate_size=256 if quick else 512,
                      num_hidden_layers=2 if quick else 4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    train, val = _text_tensors(None)
    cache = Path(os.environ.get("COMPRESS_CACHE", Path(__file__).parent / "results" / ".cache"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"peer-llama-{'quick' if quick else 'full'}-steps{steps}.pt"
    gen = torch.Generator().manual_seed(0)

    def windows(text, n):
        s = torch.randint(0, len(text) - CONTEXT - 1, (n,), generator=gen)
        return text[s[:, None] + torch.arange(CONTEXT + 1)]

    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            w = windows(train, 32)
            loss = F.cross_entropy(model(w[:, :-1]).logits.reshape(-1, 128), w[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), path)
    model.eval().to(device)
    gen.manual_seed(1)
    calib = windows(train, 32 if quick else 128)[:, :-1].to(device)
    held = windows(val, 64 if quick else 512).to(device)
    return model, calib, held


@torch.no_grad()
def heldout_loss(model, held) -> float:
    tot = 0.0
    for c in held.split(64):
        logits = model(c[:, :-1]).logits
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), c[:, 1:].reshape(-1))) * len(c)
    return tot / len(held)


def _char_tokenizer():
    """The byte-level character tokenizer of the char-LM text (oneshot wants a processor object even
    when it is handed token ids; it does not use it then)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0), pad_token=chr(0))


def child(tool: str, bits: int, device: str, quick: bool, steps: int) -> dict:
    model, calib, held = build(device, quick, steps)
    if tool == "dense":
        return {"loss": heldout_loss(model, held)}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()  # llmcompressor: from the saved checkpoint's load to the end of oneshot
    if tool.startswith("curvkit"):
        from curvkit import compress
        from curvkit.compress import UniformQuantizer

        res = compress.quantize(model, None if tool == "curvkit-rtn" else list(calib.split(32)), bits=bits,
                                method="rtn" if tool == "curvkit-rtn" else "gptq", act_order=True, damping=0.01,
                                quantizer=UniformQuantizer(bits, full_range=False) if tool == "curvkit-maxgrid" else None,
                                params=r"layers\.\d+\.(self_attn|mlp)\.", inplace=True)
        model = res.model
    else:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from torch.utils.data import DataLoader

        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        import tempfile

        from transformers import LlamaForCausalLM

        # oneshot reads the model's config back from its path: the ordinary flow, a saved checkpoint
        tmp = tempfile.mkdtemp(prefix="peer-llama-")
        model.save_pretrained(tmp)
        model = LlamaForCausalLM.from_pretrained(tmp).to(device).eval()
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="channel"))
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                              dampening_frac=0.01, actorder="static")
        # a DataLoader of tokenized rows, which oneshot takes as is (datasets 5.2's Dataset.from_dict fails
        # to fingerprint with pyarrow 26 here: PicklingError on MonthDayNano)
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
        oneshot(model=model, dataset=DataLoader(rows, batch_size=1), recipe=recipe, processor=_char_tokenizer(),
                num_calibration_samples=len(rows), max_seq_length=CONTEXT)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"loss": heldout_loss(model, held), "seconds": sec, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the small Llama")
    ap.add_argument("--child", nargs=2, metavar=("TOOL", "BITS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (100 if args.quick else 400)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.device, args.quick, steps)))
        return
    rows = []
    for tool, bits in [("dense", 16)] + [(t, b) for b in (4, 3) for t in ("curvkit-rtn", "curvkit", "curvkit-maxgrid",
                                                              "llmcompressor")]:
        cmd = [sys.executable, __file__, "--child", tool, str(bits), "--device", args.device, "--steps", str(steps)]
        cmd += ["--quick"] if args.quick else []
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            row = {"tool": tool, "bits": bits, "error": (p.stderr or p.stdout).strip().splitlines()[-5:]}
        else:
            row = {"tool": tool, "bits": bits, **json.loads(line[0][7:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| tool | bits | held-out loss | quantize seconds | peak MiB |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tool']} | {r['bits']} | failed: {r['error'][-1]} | | |")
        else:
            print(f"| {r['tool']} | {r['bits']} | {r['loss']:.4f} | {r.get('seconds', 0):.2f} | "
                  f"{r.get('peak_mib') or 0:.0f} |")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results" / "compress-prune")
    out.mkdir(parents=True, exist_ok=True)
    name = "peer-quick.json" if args.quick else "peer.json"
    (out / name).write_text(json.dumps({"device": args.device, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                       indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
