"""``carpool chat``: an interactive, streaming, multi-turn chat in the terminal.

Like ``ollama run`` or ``llama-cli -cnv``: each line typed is a user message; the answer streams
as it is generated, and the whole conversation so far (rendered with the model's chat template)
is the next prompt. Lines starting with ``/`` are commands (``/help``). Works on a terminal and
on piped standard input (one message per line), so scripts and tests drive it the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args
from carpool.errors import CarpoolError

if TYPE_CHECKING:
    from carpool.sampling_params import SamplingParams

HELP = """commands:
  /help            this text
  /clear           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt and start over
  /exit, /bye      leave (so does Ctrl-D)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--sampling-seed", type=int, default=None, help="sampling seed")
    p.add_argument(
        "--stats", action="store_true", help="print TTFT and tokens/s after every answer"
    )
    add_engine_arguments(p)


class ChatSession:
    """The conversation and the model: ``answer(text)`` streams one reply to ``out``."""

    def __init__(self, llm, params: SamplingParams, system: str | None, out: TextIO) -> None:
        self.llm, self.params, self.out = llm, params, out
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str) -> tuple[str, dict[str, float]]:
        """Add the user's message, stream the reply, keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.llm.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True
        )
        start = time.perf_counter()
        first = None
        reply, tokens = "", 0
        for output in self.llm.stream(prompt, self.params):
            completion = output.outputs[0]
            if completion.delta_token_ids and first is None:
                first = time.perf_counter()
            tokens += len(completion.delta_token_ids)
            if completion.delta_text:
                self.out.write(completion.delta_text)
                self.out.flush()
            reply = completion.text
            if completion.finish_reason == "error":
                raise CarpoolError(f"generation failed: {completion.error}")
        end = time.perf_counter()
        self.out.write("\n")
        self.messages.append({"role": "assistant", "content": reply})
        ttft = (first or end) - start
        decode = end - (first or end)
        stats = {
            "prompt_tokens": len(prompt),
            "tokens": tokens,
            "ttft_s": ttft,
            "decode_tok_s": (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0,
        }
        return reply, stats


def run(args: argparse.Namespace) -> int:
    from carpool.llm import LLM  # the engine (torch) only when the command runs
    from carpool.sampling_params import SamplingParams

    interactive = sys.stdin.isatty()
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.sampling_seed,
        )
        llm = LLM(**vars(engine_config_from_args(args)))
        if llm.tokenizer.chat_template is None:
            print(
                "error: this model has no chat template; use `carpool generate` for plain "
                "completions",
                file=sys.stderr,
            )
            return 2
    except CarpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = ChatSession(llm, params, args.system, sys.stdout)
    if interactive:
        print("type a message, /help for commands, Ctrl-D to leave", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                print()
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/bye", "/quit"):
                return 0
            if command == "/clear":
                session.clear()
            elif command == "/system":
                session.system = rest or None
                session.clear()
            else:
                print(HELP, file=sys.stderr)
            continue
        try:
            _, stats = session.answer(text)
        except CarpoolError as e:  # a bad message fails this turn only
            session.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        if args.stats:
            print(
                f"[{stats['prompt_tokens']} prompt tokens, {stats['tokens']} tokens, "
                f"TTFT {stats['ttft_s'] * 1000:.0f} ms, {stats['decode_tok_s']:.1f} tok/s]",
                file=sys.stderr,
            )
