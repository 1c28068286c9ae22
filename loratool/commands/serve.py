"""``loratool serve``: one base model and many adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import ipaddress

import click

from ..console import info, warn
from ..errors import UsageError


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.argument("base", metavar="BASE")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="An adapter clients ask for as model NAME (a path any format convert reads, or "
    "hf://OWNER/NAME[/FILE]); repeatable.",
)
@click.option(
    "--adapter-dir",
    "adapter_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="A directory POST /v1/load_lora_adapter may load from; repeatable (none: no loading).",
)
@click.option("--allow-hub", is_flag=True, help="Let /v1/load_lora_adapter take hf:// paths.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="LORATOOL_API_KEY",
    help="Require 'Authorization: Bearer KEY' (default: $LORATOOL_API_KEY, else none).",
)
@click.option("--name", help="The model id of the base [BASE as given].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def command(
    base: str,
    adapters: tuple[str, ...],
    adapter_dirs: tuple[str, ...],
    allow_hub: bool,
    host: str,
    port: int,
    api_key: str | None,
    name: str | None,
    max_batch: int,
    max_queue: int,
    max_prompt_tokens: int,
    max_body: int,
    dtype: str,
    device: str,
) -> None:
    """Serve BASE and its adapters: /v1/models, /v1/completions, /v1/chat/completions.

    A request's model is the base's name or an adapter's; requests for different adapters run
    in one batch, each row with its own adapter. Adapters can be added and removed while it runs
    (POST /v1/load_lora_adapter, /v1/unload_lora_adapter with {"lora_name", "lora_path"}),
    from --adapter-dir directories only. Ctrl-C finishes the requests in flight and exits 130.
    """
    from ..serving.adapters import parse_named, resolve
    from ..serving.base import load_base
    from ..serving.batched import MultiLora
    from ..serving.engine import Engine
    from ..serving.server import Limits, Server

    named = [parse_named(a) for a in adapters]
    if len({n for n, _ in named}) != len(named):
        raise UsageError("two adapters have the same name", code="name-taken")
    opened = [(n, resolve(p)) for n, p in named]  # every file checked before the model loads
    b = load_base(base, dtype=dtype, device=device)
    if name:
        b.name = name
    multi = MultiLora(b.model)
    for n, adapter in opened:
        if n == b.name:
            raise UsageError(f"the adapter name '{n}' is the base's", code="name-taken")
        multi.add(n, adapter)
    engine = Engine(
        b,
        multi,
        max_batch=max_batch,
        max_queue=max_queue,
        adapter_dirs=adapter_dirs,
        allow_hub=allow_hub,
    )
    limits = Limits(max_body=max_body, max_prompt_tokens=max_prompt_tokens)
    try:
        httpd = Server((host, port), engine, api_key=api_key, limits=limits)
    except OSError as e:
        raise UsageError(
            f"cannot listen on {host}:{port}: {e.strerror}",
            code="address",
            hint="pick another --port, or stop what uses it",
        ) from None
    if not _loopback(host) and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach it can use it")
    engine.start()
    where = f"http://{host}:{httpd.server_address[1]}/v1"
    info(f"serving {b.name} with {', '.join(multi.names) or 'no adapters'} at {where}")
    info("Ctrl-C finishes the requests in flight and stops")
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        waiting = engine.queue.qsize()
        info(f"draining: {waiting} queued request(s) and the batch in flight")
        engine.close()
        httpd.server_close()  # joins the handlers still answering
        raise  # the CLI reports it and exits 130
