"""Use adapters at run time: generate, hot-swap on a loaded model, serve many on one base.

The package, one job per module (each imports only modules listed before it):
  * ``adapters`` — open an adapter from a path or ``hf://`` and check it fits a loaded model;
  * ``hotswap`` — ``HotSwap``: several adapters loaded once, the active one (or a weighted mix)
    switched in place, merged (the base restored bit for bit) or unmerged (what ``attach`` does);
  * ``batched`` — ``MultiLora``: per-row adapters in one batch (a gather of stacked factors,
    S-LoRA/Punica style), so mixed traffic does not serialise on swaps;
  * ``generation`` — the decode loop: greedy or sampled, batched, streamed token by token;
  * ``protocol`` — OpenAI request bodies validated into plain data, responses and error bodies;
  * ``engine`` — the bounded queue and the worker that batches requests and owns the model;
  * ``server`` — the HTTP layer (stdlib ``ThreadingHTTPServer``), routes and server-sent events.

Everything here imports torch inside functions or in modules only the commands import, so
``import loratool`` and ``loratool inspect`` stay light.
"""

from __future__ import annotations
