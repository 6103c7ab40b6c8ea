"""Text a caller chose (model names, versions, request ids), made safe to log or echo.

A caller's string goes into text log lines and into error details. Unescaped, a newline
forges a log line and a terminal escape rewrites what an operator sees; untruncated, a
20 KB model name echoed into a NOT_FOUND trailer overflows the client's metadata limit,
so the client reports a transport error instead of NOT_FOUND.
"""

from __future__ import annotations

# Long enough for any real model name, version or request id.
CLIENT_TEXT_LIMIT = 128
# Error details travel in the grpc-message trailer, percent-encoded: at most 4 UTF-8
# bytes of 3 characters each per character keeps 512 characters under 8 KiB, the
# metadata size gRPC clients accept by default.
DETAILS_LIMIT = 512


def printable(text: str, limit: int = CLIENT_TEXT_LIMIT, *, raw: bool = True) -> str:
    """``text`` cut to about ``limit`` characters, then escaped as :func:`one_line` does.

    For ``raw`` text (as the caller sent it) backslashes are escaped too, so an escaped
    newline cannot be told apart from a caller who typed backslash-n; a message that
    quotes the caller's text through ``repr`` has escaped it already. Escaping only the
    first ``limit`` characters keeps the cost bounded whatever the caller sent.
    """
    head = text[:limit]
    escaped = one_line(head.replace("\\", "\\\\") if raw else head)
    if len(text) > limit:
        escaped += f"...({len(text) - limit} more characters)"
    return escaped


def one_line(text: str) -> str:
    """``text`` with control and line-separator characters as ``\\x..`` escapes."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
