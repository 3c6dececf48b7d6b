"""``adapter_config.json`` values: types and ranges checked with the key named, and
``rank_pattern`` / ``alpha_pattern`` matched the way PEFT does, without unbounded backtracking.

PEFT's ``get_pattern_key`` takes the first pattern ``p`` (in the config's order) for which
``re.match(rf"(.*\\.)?({p})$", path)`` holds. Here the same relation is decided as: ``path`` equals
``p`` or ends in ``"." + p`` (a literal pattern, the common case: no regex engine at all), else
``re.fullmatch(p, s)`` for each suffix ``s`` of ``path`` that starts at a ``.`` boundary, which is
the same set of matches without the ``(.*\\.)?`` prefix to backtrack over. Patterns are bounded in
length and refused when they nest quantifiers (``(a+)+``, ``(a|aa)*``) or hold more than
:data:`MAX_UNBOUNDED` unbounded repeats: the shapes that make a backtracking engine take
exponential or high-polynomial time. Python's ``re`` has no timeout, so the bound is structural.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

__all__ = ["read_config", "check_values", "pattern_value", "MAX_PATTERN_LEN", "MAX_UNBOUNDED"]

MAX_PATTERN_LEN = 256
MAX_PATH_LEN = 1024
MAX_UNBOUNDED = 3
_LITERAL = re.compile(r"^[\w\-]+(\.[\w\-]+)*$")
_META = set("\\^$.|?*+()[]{}")
# float32's largest finite value: a scaling above it (or an alpha that makes B overflow) is refused
_F32_MAX = 3.4028234663852886e38


def _bool(cfg: Mapping, key: str, where: str) -> bool:
    v = cfg.get(key)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    raise ValueError(f"{where}: key {key!r} must be true or false (a JSON boolean), got {v!r}"
                     + (" (a string: write false without quotes)" if isinstance(v, str) else ""))


def _positive(v, where: str, key: str, integer: bool) -> None:
    kind = "a positive number (an integer)" if integer else "a positive number (finite, at most 3.4e38)"
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
    if ok and integer and not (isinstance(v, int) or float(v).is_integer()):
        ok = False
    if ok and not integer and abs(v) > _F32_MAX:
        ok = False
    if not ok:
        raise ValueError(f"{where}: key {key} must be {kind}, got {v!r}")


def _check_pattern(pat, where: str, key: str) -> None:
    if not isinstance(pat, str) or not pat:
        raise ValueError(f"{where}: {key} pattern {pat!r} must be a non-empty string")
    if len(pat) > MAX_PATTERN_LEN:
        raise ValueError(f"{where}: {key} pattern of {len(pat)} characters is longer than {MAX_PATTERN_LEN}")
    try:
        re.compile(pat)
    except re.error as exc:
        raise ValueError(f"{where}: {key} pattern {pat!r} is not a regular expression: {exc}") from None
    if _LITERAL.match(pat):
        return
    # Structure: a quantified group that itself contains a quantifier or an alternation, and the
    # number of unbounded repeats. Escapes and classes are skipped.
    stack, unbounded, i = [], 0, 0
    while i < len(pat):
        c = pat[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            j = i + 1
            if j < len(pat) and pat[j] == "^":
                j += 1
            if j < len(pat) and pat[j] == "]":
                j += 1
            while j < len(pat) and pat[j] != "]":
                j += 2 if pat[j] == "\\" else 1
            i = j + 1
            if i < len(pat) and pat[i] in "*+{?":
                unbounded += _is_unbounded(pat, i)
            continue
        if c == "(":
            stack.append(False)
        elif c == "|" and stack:
            stack[-1] = True
        elif c == ")":
            inner = stack.pop() if stack else False
            nxt = pat[i + 1] if i + 1 < len(pat) else ""
            if nxt in ("*", "+", "{") and inner:
                raise ValueError(f"{where}: {key} pattern {pat!r} repeats a group that holds a repeat or an "
                                 f"alternation (like (a+)+ or (a|aa)*), which can take exponential time to match; "
                                 f"write it without the nested repeat")
            if nxt in ("*", "+", "{", "?") and stack:
                stack[-1] = True
        elif c in "*+{?":
            if c != "?" or (i > 0 and pat[i - 1] not in "*+}?("):
                if stack:
                    stack[-1] = True
            unbounded += _is_unbounded(pat, i)
        i += 1
    if unbounded > MAX_UNBOUNDED:
        raise ValueError(f"{where}: {key} pattern {pat!r} holds {unbounded} unbounded repeats (* + {{n,}}); at most "
                         f"{MAX_UNBOUNDED} are accepted, so that matching stays fast")


def _is_unbounded(pat: str, i: int) -> int:
    c = pat[i]
    if c in "*+":
        return 1
    if c == "{":
        j = pat.find("}", i)
        return int(j > 0 and pat[i:j + 1].endswith(",}"))
    return 0


def check_values(cfg: Mapping, where: str) -> None:
    """Types and ranges of the values that decide the update: ``r``, ``lora_alpha``, the patterns,
    and the booleans."""
    _positive(cfg.get("r"), where, "'r'", integer=True)
    _positive(cfg.get("lora_alpha"), where, "'lora_alpha'", integer=False)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        _bool(cfg, key, where)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        v = cfg.get(key) or {}
        if not isinstance(v, Mapping):
            raise ValueError(f"{where}: key {key!r} must map module patterns to numbers, got {type(v).__name__}")
        for pat, num in v.items():
            _check_pattern(pat, where, key)
            _positive(num, where, f"{key}[{pat!r}]", integer=integer)


def read_config(config: str) -> dict:
    """``adapter_config.json`` of a LoRA adapter, checked (errors name the file and the key)."""
    try:
        with open(config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config!r} is not readable JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config!r}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{config!r}: key 'peft_type' is {peft_type!r}; only LoRA adapters (peft_type 'LORA') "
                         f"are pure low-rank updates B @ A that can serve as task vectors")
    if _bool(cfg, "use_dora", repr(config)):
        raise ValueError(f"{config!r}: key 'use_dora' is true; DoRA rescales the weight's columns (a "
                         f"magnitude vector), so its update is not B @ A and cannot be read as a LoRA task vector")
    check_values(cfg, repr(config))
    return cfg


def _matches(pat: str, path: str) -> bool:
    if path == pat or path.endswith("." + pat):
        return True
    if not (set(pat) & _META) or len(path) > MAX_PATH_LEN:
        return False
    starts = [0] + [i + 1 for i, ch in enumerate(path) if ch == "."]
    return any(re.fullmatch(pat, path[s:]) is not None for s in starts)


def pattern_value(patterns, module_path: str, default):
    """PEFT's ``get_pattern_key``: the value of the first pattern (in order) matching the end of the
    module path (see the module docstring), else ``default``."""
    for pat, value in (patterns or {}).items():
        if _matches(pat, module_path):
            return value
    return default
