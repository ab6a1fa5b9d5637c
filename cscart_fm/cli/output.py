"""What the CLI prints, made safe for a terminal.

Client ids, message bodies, headers and store messages come from outside: a title-setting
sequence or a clear-screen in one of them would act on the operator's terminal. Every line
the CLI prints passes ``echo``: control characters (and bidirectional overrides, which can
make a line read other than it is) are shown as escapes instead of sent.
"""

from __future__ import annotations

import unicodedata

import typer

_KEPT = frozenset("\n\t")


def terminal_text(text: str) -> str:
    out = []
    for char in text:
        if char not in _KEPT and unicodedata.category(char) in ("Cc", "Cf"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def echo(message: object = "", *, err: bool = False) -> None:
    typer.echo(terminal_text(str(message)), err=err)
