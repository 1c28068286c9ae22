"""``loratool generate``: try a base model with adapters on it, tokens streamed to stdout."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..console import emit_json, info
from ..errors import UsageError

if TYPE_CHECKING:
    from ..serving.base import Base
    from ..serving.generation import Sampling


@click.command("generate")
@click.argument("base", metavar="BASE")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="PATH[:WEIGHT]",
    help="An adapter (any format convert reads, or hf://OWNER/NAME[/FILE]); repeat for a "
    "weighted mix.",
)
@click.option("-p", "--prompt", help="Text to continue (with --chat: the user's message).")
@click.option("--chat", is_flag=True, help="Use the model's chat template; a loop on a terminal.")
@click.option("--system", help="--chat: a system message first.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="0 is greedy.",
)
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0)
@click.option("--seed", type=int, help="Seed of the sampler (with --temperature > 0).")
@click.option("--merged", is_flag=True, help="Merge the adapters into the weights in memory first.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def command(
    base: str,
    adapters: tuple[str, ...],
    prompt: str | None,
    chat: bool,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    merged: bool,
    dtype: str,
    device: str,
    as_json: bool,
) -> None:
    """Generate text from BASE (a model directory or Hub id), with adapters applied.

    Greedy by default. With -p the prompt is continued as plain text; with --chat the model's
    chat template is used, as an interactive loop on a terminal (an empty line ends it) or one
    turn read from stdin otherwise. Tokens go to stdout as they come; messages go to stderr.
    """
    if prompt is None and not chat:
        raise UsageError("give a prompt (-p TEXT) or --chat", code="no-prompt")
    from ..serving.adapters import parse_weighted, resolve
    from ..serving.base import load_base
    from ..serving.generation import Sampling
    from ..serving.hotswap import HotSwap

    started = time.perf_counter()
    specs = [parse_weighted(a) for a in adapters]
    opened = [(path, weight, resolve(path)) for path, weight in specs]  # before the model loads
    b = load_base(base, dtype=dtype, device=device)
    swap = HotSwap(b.model, merged=merged)
    for i, (_, _, adapter) in enumerate(opened):
        swap.load(f"adapter{i}", adapter)
    swap.activate({f"adapter{i}": w for i, (_, w, _) in enumerate(opened)})
    if not as_json:
        how = " (merged)" if merged else " (unmerged)"
        names = ", ".join(f"{p}×{w:g}" for p, w, _ in opened)
        what = f"{names}{how}" if names else "no adapter"
        info(f"{base} with {what}, loaded in {time.perf_counter() - started:.1f} s")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    if not chat:
        assert prompt is not None
        _turn(b, sampling, prompt=prompt, messages=None, as_json=as_json, adapters=specs)
        return
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is not None or as_json or not sys.stdin.isatty():
        text = prompt if prompt is not None else sys.stdin.read().strip()
        if not text:
            raise UsageError("no message on stdin", code="no-prompt", hint="or pass -p TEXT")
        messages.append({"role": "user", "content": text})
        _turn(b, sampling, prompt=None, messages=messages, as_json=as_json, adapters=specs)
        return
    info("chat: type a message, an empty line or Ctrl-D ends")
    while True:
        click.echo("> ", nl=False, err=True)  # people's output: the prompt goes to stderr
        line = sys.stdin.readline()
        text = line.strip()
        if not line:
            click.echo(err=True)  # Ctrl-D
            return
        if not text:
            return
        messages.append({"role": "user", "content": text})
        answer = _turn(b, sampling, prompt=None, messages=messages, as_json=False, adapters=specs)
        messages.append({"role": "assistant", "content": answer})


def _turn(
    b: Base,
    sampling: Sampling,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    as_json: bool,
    adapters: list[tuple[str, float]],
) -> str:
    from ..serving.base import encode_chat, encode_text
    from ..serving.generation import Row, TextStream, eos_ids_of, generate, pad_id_of

    ids = (
        encode_chat(b.tokenizer, messages)
        if messages is not None
        else encode_text(b.tokenizer, prompt or "")
    )
    if len(ids) + sampling.max_new_tokens > b.max_positions:
        raise UsageError(
            f"the prompt has {len(ids)} tokens; with --max-new-tokens {sampling.max_new_tokens} "
            f"that is past the model's {b.max_positions} positions",
            code="prompt-too-long",
            hint="shorten the prompt or lower --max-new-tokens",
        )
    stream = TextStream(b.tokenizer)

    def on_token(_: int, tok: int) -> bool:
        delta = stream.push(tok)
        if delta and not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()
        return True

    eos = eos_ids_of(b.model, b.tokenizer)
    started = time.perf_counter()
    [done] = generate(
        b.model,
        [Row(ids, sampling)],
        eos_ids=eos,
        pad_id=pad_id_of(b.tokenizer, eos),
        on_token=on_token,
    )
    seconds = time.perf_counter() - started
    text: str = b.tokenizer.decode(done.tokens, skip_special_tokens=True)
    if as_json:
        doc: dict[str, Any] = {
            "base": b.name,
            "adapters": [{"path": p, "weight": w} for p, w in adapters],
            "prompt": prompt,
            "messages": messages,
            "text": text,
            "prompt_tokens": len(ids),
            "completion_tokens": len(done.tokens),
            "finish_reason": done.finish_reason,
            "seconds": round(seconds, 3),
        }
        emit_json(doc)
    else:
        sys.stdout.write(text[len(stream.text) :] + "\n")
        sys.stdout.flush()
        rate = len(done.tokens) / seconds if seconds > 0 else 0.0
        info(f"[{len(done.tokens)} tokens, {rate:.1f} tokens/s, {done.finish_reason}]")
    return text
