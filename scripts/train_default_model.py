#!/usr/bin/env python
"""Train carpool's bundled default model on the Python standard library's source.

The result is a tiny, completely standard Hugging Face ``LlamaForCausalLM``
directory (config.json, model.safetensors in bfloat16, generation_config.json,
tokenizer.json, tokenizer_config.json, README.md) that ships inside the package
at ``src/carpool/data/default_model`` so carpool runs with no download.

Steps:
  1. collect ``*.py`` text from ``sysconfig.get_paths()["stdlib"]`` (test
     directories, site-packages and generated data modules skipped); a
     deterministic ~2% of files (crc32 of the relative path) is held out;
  2. train a byte-level BPE tokenizer with ``tokenizers`` (ByteLevel
     pre-tokenizer and decoder, so decode(encode(x)) == x);
  3. train a small Llama with a plain torch loop (AdamW, warmup + cosine LR
     driven by the wall-clock budget, bf16 autocast on CPU) for ``--minutes``;
  4. evaluate train / held-out loss, save everything, print a greedy sample.

transformers is used here only (a dev dependency); carpool itself loads the
directory with its own loader.

Example:
    python scripts/train_default_model.py --minutes 30 --out src/carpool/data/default_model
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__"}
MAX_FILE_BYTES = 300_000  # skips a few huge generated tables


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- data


def collect_sources(stdlib: Path, heldout_mod: int) -> tuple[list[str], list[str], list[str]]:
    train, held, names = [], [], []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).as_posix()
        parts = rel.split("/")
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_"):
            continue
        try:
            if f.stat().st_size > MAX_FILE_BYTES:
                continue
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n")
        if not text.strip():
            continue
        if zlib.crc32(rel.encode()) % heldout_mod == 0:
            held.append(text)
            names.append(rel)
        else:
            train.append(text)
    return train, held, names


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    # Like Llama tokenizers: encode() prepends <|bos|> (add_special_tokens=True);
    # decode() skips special tokens, so decode(encode(x)) == x.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def encode_docs(tok, texts: list[str]) -> torch.Tensor:
    """Each document becomes <|bos|> text <|eos|>; all are concatenated."""
    eos_id = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # post-processor adds <|bos|>
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model


def build_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        use_cache=True,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    return model


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)
    )


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, max_seqs: int, batch: int) -> float:
    """Mean loss over ``max_seqs`` fixed windows spread evenly over ``data``."""
    model.eval()
    n = min(max_seqs, (len(data) - 1) // seq)
    stride = ((len(data) - 1) // n // seq) * seq  # windows spread evenly over the stream
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = [j * stride for j in range(i, min(n, i + batch))]
        x = torch.stack([data[k : k + seq] for k in idx])
        y = torch.stack([data[k + 1 : k + seq + 1] for k in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, x, y)
        total += loss.item() * len(idx)
        count += len(idx)
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.token_to_id(PAD),
    )
    model.train()
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument(
        "--minutes", type=float, default=30.0, help="wall-clock budget for the training loop"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument(
        "--heldout-mod", type=int, default=50, help="hold out files with crc32(path) %% N == 0"
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50, help="warmup steps")
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--eval-seqs", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--sample-tokens", type=int, default=64)
    ap.add_argument(
        "--init-from", default=None, help="continue training a model directory saved by this script"
    )
    ap.add_argument("--summary", default=None, help="optional path for a JSON summary of the run")
    args = ap.parse_args(argv)

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stdlib = Path(args.stdlib)
    train_texts, held_texts, held_names = collect_sources(stdlib, args.heldout_mod)
    log(
        f"[data] stdlib={stdlib}  train files={len(train_texts)} ({sum(map(len, train_texts)) / 1e6:.2f} MB)  "
        f"held-out files={len(held_texts)} ({sum(map(len, held_texts)) / 1e6:.2f} MB)"
    )

    t0 = time.time()
    if args.init_from:  # continue training a saved model: reuse its tokenizer
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(args.init_from) / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_texts, args.vocab)
    probe = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    assert tok.decode(tok.encode(probe).ids) == probe, "tokenizer round trip failed"
    train_ids = encode_docs(tok, train_texts)
    held_ids = encode_docs(tok, held_texts)
    log(
        f"[tok] vocab={tok.get_vocab_size()}  train tokens={len(train_ids):,}  held-out tokens={len(held_ids):,}  "
        f"({sum(map(len, train_texts)) / len(train_ids):.2f} chars/token, {time.time() - t0:.1f}s)"
    )

    if args.init_from:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        args.hidden, args.layers = model.config.hidden_size, model.config.num_hidden_layers
        args.heads, args.kv_heads = (
            model.config.num_attention_heads,
            model.config.num_key_value_heads,
        )
        args.intermediate, args.max_pos = (
            model.config.intermediate_size,
            model.config.max_position_embeddings,
        )
        log(f"[model] continuing from {args.init_from}")
    else:
        model = build_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(
        f"[model] Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"ffn={args.intermediate} vocab={tok.get_vocab_size()} tied  params={n_params:,} "
        f"(non-embedding {n_params - n_embed:,})"
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    # The cosine schedule is driven by the fraction of the wall-clock budget used,
    # so the run always ends at min LR exactly when the budget runs out.
    budget = args.minutes * 60.0
    gen = torch.Generator().manual_seed(args.seed)
    hi = len(train_ids) - args.seq - 1

    def lr_at(step: int, frac: float) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(max(frac, 0.0), 1.0)
        mn = args.lr * args.min_lr_frac
        return mn + 0.5 * (args.lr - mn) * (1 + math.cos(math.pi * frac))

    model.train()
    step, tokens_seen, ema = 0, 0, None
    t_train = time.time()
    log(
        f"[train] budget {args.minutes:.1f} min, batch {args.batch}x{args.seq} = {args.batch * args.seq} tokens/step"
    )
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        lr = lr_at(step, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, hi, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1 : s + args.seq + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        li = loss.item()
        ema = li if ema is None else 0.95 * ema + 0.05 * li
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            log(
                f"step {step:6d}  loss {li:.4f}  ema {ema:.4f}  lr {lr:.2e}  "
                f"{tokens_seen / el:,.0f} tok/s  {el / 60:5.1f}/{args.minutes:.1f} min  "
                f"epochs {tokens_seen / len(train_ids):.2f}"
            )
    train_secs = time.time() - t_train
    log(
        f"[train] done: {step} steps, {tokens_seen:,} tokens ({tokens_seen / len(train_ids):.2f} epochs) in {train_secs / 60:.1f} min"
    )

    # Final losses, both measured in bf16 autocast on fixed windows.
    # "train" uses windows from the train stream, "held-out" from unseen files.
    train_loss = evaluate(model, train_ids, args.seq, args.eval_seqs, args.batch)
    held_loss = evaluate(model, held_ids, args.seq, args.eval_seqs, args.batch)
    log(
        f"[eval] train loss {train_loss:.4f} (ppl {math.exp(train_loss):.1f})  held-out loss {held_loss:.4f} (ppl {math.exp(held_loss):.1f})"
    )

    # ---- save (bfloat16 weights, standard HF layout)
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        do_sample=False,
        max_new_tokens=64,
    )
    kw = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(out, **kw)
    model.generation_config.save_pretrained(out)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=args.max_pos,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    finalize_hf_files(out)
    verify_hf_load(out, tok)

    samples = {}
    for prompt in ["def fibonacci(n):", "import os\n\n\ndef "]:
        samples[prompt] = greedy(model, tok, prompt, args.sample_tokens)
    total_secs = time.time() - t_start
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    summary = {
        "params": n_params,
        "non_embedding_params": n_params - n_embed,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "train_files": len(train_texts),
        "heldout_files": len(held_texts),
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids),
        "train_minutes": train_secs / 60,
        "total_minutes": total_secs / 60,
        "train_loss": train_loss,
        "heldout_loss": held_loss,
        "samples": samples,
        "args": vars(args),
        "command": " ".join(["python"] + sys.argv),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    write_readme(out, args, summary, held_names)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"[save] {out}  {size / 1e6:.2f} MB  (total wall time {total_secs / 60:.1f} min)")
    for prompt, text in samples.items():
        log(
            f"[sample] greedy, {args.sample_tokens} tokens, prompt {prompt!r}:\n{text}\n" + "-" * 60
        )
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def finalize_hf_files(out: Path) -> None:
    """Make the saved files readable by transformers 4.x and 5.x and simple loaders.

    transformers 5 writes ``rope_parameters`` / ``dtype`` and a ``TokenizersBackend``
    class with ``extra_special_tokens``; add the classic keys next to them.
    """
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("rope_scaling", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tc.pop("extra_special_tokens", None) or [IM_START, IM_END]
    tc["additional_special_tokens"] = list(extra)
    tc["add_bos_token"] = True  # also done by tokenizer.json's post-processor
    tc["add_eos_token"] = False
    # Keep chat_template inline (newer transformers may write chat_template.jinja).
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()


def verify_hf_load(out: Path, tok) -> None:
    """Reload through the Auto classes: the directory must be a standard HF one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out)
    t = AutoTokenizer.from_pretrained(out)
    probe = "def fibonacci(n):\n    return n\n"
    ids = t(probe).input_ids
    assert ids == tok.encode(probe).ids and ids[0] == t.bos_token_id, "tokenizer mismatch"
    assert t.decode(ids, skip_special_tokens=True) == probe
    assert t.eos_token == EOS and t.bos_token == BOS and t.chat_template == CHAT_TEMPLATE
    assert m.dtype == torch.bfloat16 and m.config.eos_token_id == tok.token_to_id(EOS)
    log(f"[verify] AutoModelForCausalLM / AutoTokenizer load {out} OK")


def write_readme(out: Path, args, s: dict, held_names: list[str]) -> None:
    fib = s["samples"]["def fibonacci(n):"]
    text = f"""# carpool default model (`stdlib-llama-{s["params"] / 1e6:.1f}M`)

A tiny Llama-architecture causal LM bundled with carpool so that it runs out of
the box with no download. It was trained for about {s["train_minutes"]:.0f} minutes on two CPU
cores on the Python {s["python"]} standard library's own source code, so it writes
Python-looking text. It is a demo / test model: it does not follow instructions
and its code is rarely correct.

It is a standard Hugging Face directory:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("src/carpool/data/default_model")
model = AutoModelForCausalLM.from_pretrained("src/carpool/data/default_model")
```

## Architecture

| | |
|---|---|
| class | `LlamaForCausalLM` |
| parameters | {s["params"]:,} ({s["non_embedding_params"]:,} non-embedding) |
| hidden size | {args.hidden} |
| layers | {args.layers} |
| attention heads / KV heads | {args.heads} / {args.kv_heads} (GQA, head dim {args.hidden // args.heads}) |
| MLP intermediate size | {args.intermediate} (SwiGLU) |
| vocabulary | {args.vocab} |
| positions | RoPE (theta 10000), max_position_embeddings {args.max_pos} (trained at {args.seq}) |
| embeddings | tied input/output |
| weights | bfloat16, `model.safetensors` |

## Tokenizer

Byte-level BPE (GPT-2 style ByteLevel pre-tokenizer and decoder) trained with the
`tokenizers` library on the training files, vocabulary {args.vocab}. Special tokens:
`<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2), `<|im_start|>` (3), `<|im_end|>` (4).
Encoding with special tokens prepends `<|bos|>`; decoding with
`skip_special_tokens=True` is lossless (`decode(encode(x)) == x`). The chat
template is ChatML-style (`<|im_start|>role\\n...<|im_end|>\\n`), although the
model never saw chat data.

## Data

All `*.py` files of the CPython {s["python"]} standard library
(`sysconfig.get_paths()["stdlib"]`), skipping `test`/`tests`/`idle_test`
directories, `test_*.py`, `site-packages`, `pydoc_data` and files over
{MAX_FILE_BYTES // 1000} kB. Each file is one document `<|bos|> text <|eos|>`.
Files whose `crc32(relative path) % {args.heldout_mod} == 0` are held out
({s["heldout_files"]} files, {s["heldout_tokens"]:,} tokens, e.g. {", ".join("`" + n + "`" for n in held_names[:4])});
the remaining {s["train_files"]} files give {s["train_tokens"]:,} training tokens.

## Training

```
{s["command"]}
```

Plain PyTorch loop: AdamW (betas 0.9/0.95, weight decay {args.wd}), peak LR {args.lr},
{args.warmup} warmup steps then cosine decay to {args.min_lr_frac:g}x driven by the
wall-clock budget, gradient clipping 1.0, bf16 autocast, batch
{args.batch} x {args.seq} tokens of random windows, seed {args.seed},
torch {s["torch"]} on CPU with {args.threads} threads.

- training wall time: {s["train_minutes"]:.1f} min ({s["total_minutes"]:.1f} min end to end)
- steps: {s["steps"]:,}; tokens seen: {s["tokens_seen"]:,} ({s["epochs"]:.2f} epochs)
- final train loss: **{s["train_loss"]:.3f}** (ppl {math.exp(s["train_loss"]):.1f})
- final held-out loss: **{s["heldout_loss"]:.3f}** (ppl {math.exp(s["heldout_loss"]):.1f})

(Losses are mean token cross-entropy over {args.eval_seqs} fixed {args.seq}-token windows.)

## Sample

Greedy, {args.sample_tokens} new tokens, prompt `def fibonacci(n):`:

```python
{fib}
```

## License

Trained on CPython source (PSF License). The weights are distributed with
carpool under its license.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
