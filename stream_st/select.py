"""What to load: exact names, glob patterns, regular expressions or a predicate → tensor names.

Pure: works on a list of names, no I/O.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from .errors import TensorNotFoundError

Selector = str | re.Pattern[str] | Callable[[str], bool]
Selection = Selector | Iterable[Selector] | None

_GLOB_CHARS = frozenset("*?[")


def select(names: Sequence[str], wanted: Selection, *, url: str) -> list[str]:
    """The names in ``names`` (kept in their order) that ``wanted`` asks for.

    ``wanted`` is None (everything), or one or several of: an exact name, a glob pattern (``*``, ``?``,
    ``[...]``), a compiled regular expression (matched with ``search``) or a predicate ``name -> bool``.
    A string that is a name of the file selects that name alone, glob characters or not.
    An exact name or a pattern that matches nothing raises :class:`TensorNotFoundError` with the closest
    names; a predicate may match nothing.
    """
    if wanted is None:
        return list(names)
    selectors = [wanted] if isinstance(wanted, (str, re.Pattern)) or callable(wanted) else list(wanted)
    chosen: set[str] = set()
    known = set(names)
    for selector in selectors:
        # A name of the file is taken as it is, even where it holds glob characters ("w[0]").
        if isinstance(selector, str) and (selector in known or not _GLOB_CHARS & set(selector)):
            if selector not in known:
                raise TensorNotFoundError(_not_found(selector, names, url), url=url, tensor=selector)
            chosen.add(selector)
            continue
        matches = {name for name in names if _matches(selector, name)}
        if not matches and not callable(selector):
            label = selector.pattern if isinstance(selector, re.Pattern) else selector
            raise TensorNotFoundError(f"{url}: no tensor matches {label!r}", url=url, tensor=str(label))
        chosen |= matches
    return [name for name in names if name in chosen]


def _matches(selector: Selector, name: str) -> bool:
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, re.Pattern):
        return selector.search(name) is not None
    if callable(selector):
        return bool(selector(name))
    raise TypeError(f"a tensor selector is a name, glob, compiled regex or predicate, not {type(selector).__name__}")


def _not_found(name: str, names: Sequence[str], url: str) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{url}: no tensor named {name!r} (the file has {len(names)} tensors){hint}"
