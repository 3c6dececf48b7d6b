"""Checks that several modules run on their inputs, and the hints their errors give: one home each.

- :func:`require_finite` / :func:`all_finite`: a tensor holds no NaN or inf (meta tensors, which
  hold no values, and float8, which ``torch.isfinite`` does not take, are handled here once);
- :func:`stripped_prefix` / :func:`deeper_name`: how a name that is not among a module's (or a
  file's) names relates to them: behind a prefix the other side lacks, or deeper in the module;
- :func:`prefix_matches_nothing`: the message for a prefix that selects nothing, showing what the
  names look like; :func:`prefix_cut_problem`: a prefix that does not end at a name boundary.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["all_finite", "require_finite", "stripped_prefix", "deeper_name", "prefix_matches_nothing",
           "prefix_cut_problem"]


def _bad(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask of non-finite elements, or None where there is nothing to look at (a meta tensor)."""
    if t.device.type == "meta":
        return None
    return ~torch.isfinite(t.float() if t.dtype == torch.float8_e4m3fn else t)


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf (always for a meta tensor, which holds no values)."""
    bad = _bad(t)
    return bad is None or not bool(bad.any())


def require_finite(t: torch.Tensor, what: str, then: str = "") -> None:
    """ValueError ``"<what> holds K NaN/inf value(s), first at index (i, j, ...)<then>"`` unless
    ``t`` is finite everywhere. ``what`` names the tensor (e.g. ``"task vectors of block 'w'"``);
    ``then`` may add what follows from it (``"; training from it cannot ..."``)."""
    bad = _bad(t)
    if bad is not None and bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{what} holds {int(bad.sum())} NaN/inf value(s), first at index {idx}{then}")


def stripped_prefix(name: str, names) -> Optional[str]:
    """The dotted prefix (``"visual."``) that, taken off ``name``, leaves a member of ``names``; the
    shortest such, or None."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in names:
            return ".".join(parts[:i]) + "."
    return None


def deeper_name(name: str, names: Iterable[str], fits=None) -> Optional[str]:
    """The first of ``names`` that holds ``name`` deeper (ends in ``"." + name``) and, when given,
    passes ``fits(other)``; or None. ``other[: -len(name) - 1]`` is then the submodule to use."""
    for other in names:
        if other.endswith("." + name) and (fits is None or fits(other)):
            return other
    return None


def prefix_matches_nothing(arg: str, prefix: str, what: str, names, their: str = "its keys",
                           auto: bool = False) -> str:
    """The message for a prefix that selects nothing: ``"<arg> <prefix> matches <what> (<their> look
    like [first three names])"``, e.g. ``prefix 'visual.' matches no key of x.pt (its keys look like
    [...])``; the caller raises it (a ValueError), with whatever it puts in front. Dotted names
    add the prefixes they do start with (the first three keys of a CLIP state dict are text-tower
    leftovers, which hide its ``visual.`` keys), and an image tower's prefix when there is one
    (``auto``: the argument also takes ``'auto'``)."""
    names = [str(k) for k in names]
    msg = f"{arg} {prefix!r} matches {what} ({their} look like {names[:3]})"
    heads: dict = {}
    for n in names:
        if "." in n:
            head = n.split(".", 1)[0] + "."
            heads[head] = heads.get(head, 0) + 1
    if heads and len(names) > 3:
        top = sorted(heads.items(), key=lambda kv: -kv[1])[:6]
        msg += "; the dotted ones start with " + ", ".join(f"{h!r} ({c})" for h, c in top)
    towers = sorted({n[: n.find("visual.") + 7] for n in names
                     if "visual." in n and (n.find("visual.") == 0 or n[n.find("visual.") - 1] == ".")}, key=len)
    if towers:
        msg += f"; the image tower is under {towers[0]!r}: pass {arg}={towers[0]!r}" + (" or 'auto'" if auto else "")
    return msg


def prefix_cut_problem(arg: str, prefix: str, name: str) -> Optional[str]:
    """Why ``prefix`` (which ``name`` starts with) does not end at a name boundary, or None: a
    prefix that lacks its trailing dot (``'visual'``: names would start with ``'.'``) or stops
    inside a part (``'visu'``: ``'al.conv1.weight'``). Such a cut was accepted and gave task
    vectors that no module has names for."""
    if not prefix or prefix.endswith(".") or not name.startswith(prefix) or len(name) == len(prefix):
        return None
    rest = name[len(prefix):]
    if rest.startswith("."):
        return (f"{arg} {prefix!r} lacks its trailing dot: the names under it would start with a dot "
                f"({rest!r}); pass {arg}={prefix + '.'!r}")
    part = name[: len(prefix) + len(rest.split(".", 1)[0])]
    return (f"{arg} {prefix!r} stops inside a name part ({name!r} would become {rest!r}); a prefix ends with "
            f"a dot, e.g. {arg}={part + '.'!r}")
