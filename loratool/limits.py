"""Resource bounds on everything read from a source: sizes, counts, JSON, regex patterns.

A hostile or broken source should cost at most a clean error, never a hang or an exhausted
machine. Each bound is generous for real adapters (the largest public LoRAs are a few GB with
a few thousand targets) and can be raised by an environment variable, so a user with a truly
huge adapter is one ``export`` away from reading it; the error says which variable.

=============================  ====================  ==========================================
environment variable           default               bounds
=============================  ====================  ==========================================
LORATOOL_MAX_ADAPTER_BYTES     64 GiB                an adapter file or pickle read from any source
LORATOOL_MAX_TARGETS           100 000               target modules in one adapter
LORATOOL_MAX_JSON_BYTES        16 MiB                a JSON document (adapter_config.json, a
                                                     header, metadata, a Hub response), data.pkl
LORATOOL_MAX_JSON_DEPTH        64                    nesting of that JSON
LORATOOL_MAX_PATTERN_CHARS     1 024                 a ``target_modules`` regex (see ``safe_regex``)
=============================  ====================  ==========================================
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator

from .errors import FormatError

_DEFAULTS = {
    "LORATOOL_MAX_ADAPTER_BYTES": 64 << 30,
    "LORATOOL_MAX_TARGETS": 100_000,
    "LORATOOL_MAX_JSON_BYTES": 16 << 20,
    "LORATOOL_MAX_JSON_DEPTH": 64,
    "LORATOOL_MAX_PATTERN_CHARS": 1024,
    "LORATOOL_MAX_PICKLE_RECORDS": 1_000_000,
}


def _get(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return _DEFAULTS[name]
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value <= 0:
        from .errors import UsageError

        raise UsageError(f"{name}={raw!r} is not a positive integer", code="bad-limit")
    return value


def max_adapter_bytes() -> int:
    return _get("LORATOOL_MAX_ADAPTER_BYTES")


def max_targets() -> int:
    return _get("LORATOOL_MAX_TARGETS")


def max_json_bytes() -> int:
    return _get("LORATOOL_MAX_JSON_BYTES")


def max_json_depth() -> int:
    return _get("LORATOOL_MAX_JSON_DEPTH")


def max_pattern_chars() -> int:
    return _get("LORATOOL_MAX_PATTERN_CHARS")


def max_pickle_records() -> int:
    return _get("LORATOOL_MAX_PICKLE_RECORDS")


def _too_big(what: str, got: int, limit: int, var: str, where: str | None) -> FormatError:
    return FormatError(
        f"{what} is {got:,} but the limit is {limit:,}",
        code="too-large",
        where=where,
        hint=f"if the source is trusted, raise the limit: export {var}={max(got, limit * 2)}",
    )


def check_adapter_bytes(got: int, *, what: str, where: str | None = None) -> None:
    """Refuse an adapter (or pickled weights) over ``LORATOOL_MAX_ADAPTER_BYTES``."""
    limit = max_adapter_bytes()
    if got > limit:
        raise _too_big(f"{what} size", got, limit, "LORATOOL_MAX_ADAPTER_BYTES", where)


def check_json_bytes(got: int, *, what: str, where: str | None = None) -> None:
    """Refuse a JSON document (or another small control record) over ``LORATOOL_MAX_JSON_BYTES``."""
    limit = max_json_bytes()
    if got > limit:
        raise _too_big(f"{what} size", got, limit, "LORATOOL_MAX_JSON_BYTES", where)


def check_targets(got: int, *, where: str | None = None) -> None:
    if got > max_targets():
        raise _too_big("the number of targets", got, max_targets(), "LORATOOL_MAX_TARGETS", where)


def json_depth(text: str | bytes) -> int:
    """Maximum nesting of ``[``/``{`` in a JSON text, strings skipped; linear, no recursion."""
    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    depth = deepest = 0
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == '"':
            i += 1
            while i < n and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
        i += 1
    return deepest


def check_json(text: str | bytes, *, what: str, where: str | None = None) -> None:
    """Refuse a JSON text over the size or depth bound before parsing it."""
    check_json_bytes(
        len(text.encode("utf-8")) if isinstance(text, str) else len(text), what=what, where=where
    )
    depth = json_depth(text)
    if depth > max_json_depth():
        raise _too_big(
            f"{what} nesting depth", depth, max_json_depth(), "LORATOOL_MAX_JSON_DEPTH", where
        )


# A regex from an untrusted config may only use a subset with no nested repetition: PEFT matches
# ``target_modules`` with ``re.fullmatch`` against every module name, and a pattern like
# ``(a+)+$`` or ``(a|aa)*$`` takes exponential time on a near-miss, ``a*a*a*a*a*b`` a high
# polynomial. So a repeated group may not contain a repetition or an alternation, a pattern
# has at most MAX_UNBOUNDED ``*``/``+``/``{n,}``, and back-references (which no finite
# automaton has) are refused. ``match_deadline`` is the second line: a time limit on matching.
_QUANT = re.compile(r"[*+?]|\{\d*,?\d*\}")
MAX_UNBOUNDED = 4
REGEX_SECONDS = 2.0


def _skip_class(pattern: str, i: int) -> int:
    """Index just past the character class starting at ``pattern[i] == '['``."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def safe_regex(
    pattern: str, *, what: str = "target_modules", where: str | None = None
) -> re.Pattern[str]:
    """Compile a pattern from a config, or refuse it when it could backtrack catastrophically."""
    if len(pattern) > max_pattern_chars():
        raise _too_big(
            f"the {what} pattern length",
            len(pattern),
            max_pattern_chars(),
            "LORATOOL_MAX_PATTERN_CHARS",
            where,
        )
    if re.search(r"\\[1-9]|\(\?P=", pattern):
        raise _unsafe(pattern, what, "back-references are not supported", where)
    stack: list[list[bool]] = []  # per open group: [contains a repetition, contains "|"]
    unbounded = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _skip_class(pattern, i)
            continue
        if c == "(":
            stack.append([False, False])
        elif c == "|" and stack:
            stack[-1][1] = True
        elif c == ")" and stack:
            inner_rep, inner_alt = stack.pop()
            q = _QUANT.match(pattern, i + 1)
            repeated = q is not None and q.group(0) != "?"
            if repeated and (inner_rep or inner_alt):
                raise _unsafe(
                    pattern, what, "a repeated group contains a repetition or a choice", where
                )
            if stack and (inner_rep or repeated):
                stack[-1][0] = True
        else:
            q = _QUANT.match(pattern, i)
            if q is not None and not (c == "?" and i > 0 and pattern[i - 1] == "("):
                if q.group(0) in ("*", "+") or q.group(0).rstrip("}").endswith(","):
                    unbounded += 1
                if stack and q.group(0) != "?":
                    stack[-1][0] = True
                i += len(q.group(0))
                continue
        i += 1
    if unbounded > MAX_UNBOUNDED:
        raise _unsafe(pattern, what, f"more than {MAX_UNBOUNDED} unbounded repetitions", where)
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise FormatError(
            f"{what} is not a valid regular expression ({e})", code="bad-config", where=where
        ) from None


def _unsafe(pattern: str, what: str, why: str, where: str | None) -> FormatError:
    return FormatError(
        f"{what} pattern {pattern[:80]!r} could take exponential time to match: {why}",
        code="bad-config",  # the config field is what is wrong (as PEFT would hang on it too)
        where=where,
        hint="list the module names instead, or use a pattern without nested repetition",
    )


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def match_deadline(
    seconds: float = REGEX_SECONDS, *, what: str = "target_modules", where: str | None = None
) -> Iterator[None]:
    """Bound the wall time of regex matching inside the block (main thread, POSIX only).

    CPython's ``re`` checks for signals while it backtracks (3.11+), so an interval timer can
    stop a match that ``safe_regex`` let through; elsewhere (a worker thread, Windows, a timer
    already running) the block runs unbounded and ``safe_regex`` alone stands guard.
    """
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def _fire(signum: int, frame: object) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Timeout:
        raise FormatError(
            f"matching the {what} pattern took more than {seconds:g} s",
            code="bad-config",  # the config field is what is wrong (as PEFT would hang on it too)
            where=where,
            hint="list the module names instead, or use a simpler pattern",
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
