"""One-line, exit-code-2 errors for bad command lines and recipes."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

# jsonargparse reports a bad nested value as a union failure wrapping the real cause
_UNION_NOISE = (
    r"Does not validate against any of the Union subtypes",
    r"Subtypes: \[[^\]]*\]",
    r"- Expected a <class 'NoneType'>",
    r"Given value type: <class '[^']*'>",
    r"Given value: Namespace\(.*$",
    r"Errors: -",
)


def summarize(message: str) -> tuple[str | None, str]:
    """The dotted key a jsonargparse message is about, and its cause in one line."""
    text = re.sub(r"\s+", " ", message).strip()
    for noise in _UNION_NOISE:
        text = re.sub(noise, " ", text)
    parts = re.findall(r'(?:Parser key|[Kk]ey) "([^"]+)"', text)
    option = re.findall(r"option '([^']+)'", text)
    key: str | None = None
    if parts:
        joiner = ".init_args." if "class_path" in text else "."
        key = joiner.join(dict.fromkeys(parts))
    elif option:
        key = option[0]
    text = re.sub(r'(?:Parser key|[Kk]ey) "[^"]+": ?', "", text)
    text = re.sub(r"Problem with given class_path '[^']+': ?", "", text)
    text = re.sub(r"\s+", " ", text).strip(" -:")
    return key, text


def one_line(message: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(message: str, source: str | None = None, key: str | None = None) -> NoReturn:
    """Print ``relief: error: SOURCE key 'KEY': MESSAGE`` on one line and exit with code 2."""
    where = " ".join(part for part in (source, f"key '{key}'" if key else None) if part)
    prefix = f"relief: error: {where}: " if where else "relief: error: "
    print(prefix + one_line(message), file=sys.stderr)
    raise SystemExit(2)
