"""Logging for a service: native journal entries with structured fields, and no secret in any line.

Under systemd, stderr is already the journal, but as flat text. When
`$JOURNAL_STREAM` names our stderr (the documented signal that it is the
journal), records go instead to journald's native socket, one datagram per
entry, with PRIORITY, the logger, the code location and the structured fields
a record carries (`log.info("...", extra={"model": m, "version": v, "step":
"verify"})` becomes MODEL=, VERSION=, STEP=), so `journalctl -u outpost-agent
MODEL=mlp` works. Anywhere else, the same records are plain lines on stderr.

Every handler installed here redacts first (`Redactor`): bearer tokens,
passwords in URLs (mqtt, postgresql, https), `token=`/`password=`-style pairs,
and every secret value registered with `register_secret` or found in the
environment variables that carry secrets. Redaction runs on the final text,
exception tracebacks included, because a secret usually leaks through an
argument or an exception message, not through the format string.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
HANDLER_NAME = "outpost"
MASK = "***"

#: record attribute (from `extra=`) -> journal field
STRUCTURED_FIELDS: Mapping[str, str] = {
    "model": "MODEL", "version": "VERSION", "step": "STEP", "bundle": "BUNDLE", "device_id": "DEVICE_ID",
    "backend": "BACKEND", "rollout": "ROLLOUT",
}

#: environment variables whose values are secrets wherever else they show up
SECRET_ENV = ("OUTPOST_TOKEN", "OUTPOST_FLEET_TOKEN", "OUTPOST_MQTT_PASSWORD", "OUTPOST_ENROLL_TOKEN", "PGPASSWORD")

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

def _mask_value(m: re.Match[str]) -> str:
    key = m.group(1)
    value = m.group(0)[len(key):]
    quote = value[0] if value[0] in "\"'" else ""
    return f"{key}{quote}{MASK}{quote}"


_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # Authorization: Bearer <token> / Basic <credentials>, in headers, reprs and messages
    # (8+ characters with a digit or punctuation: "wrong bearer token" stays readable)
    (re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}"),
     rf"\1\2{MASK}"),
    # scheme://user:password@host: keep the user, hide the password
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]+@"), rf"\1:{MASK}@"),
    # token=..., password: "...", "api_key": "...", secret=... (query strings, JSON, key=value text)
    (re.compile(r"""(?ix)
        (["']?\b[a-z0-9_-]*(?:token|password|passwd|secret|api[_-]?key|credential)s?["']?\s*[=:]\s*)
        (?:"[^"]*"|'[^']*'|[^\s"'&,;}]+)"""), _mask_value),
)


class Redactor:
    """Replaces secrets in text: known patterns plus registered values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        for s in secrets:
            self.add(s)

    def add(self, secret: str | None) -> None:
        # Very short values would mask ordinary words; secrets this short are not secrets anyway.
        if secret and len(secret) >= 6:
            with self._lock:
                self._secrets = tuple(sorted({*self._secrets, secret}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


#: the process-wide redactor every handler from `configure_logging` uses
REDACTOR = Redactor()


def register_secret(value: str | None) -> None:
    """A value to mask wherever it appears (a credential read from disk, an enrollment token, ...)."""
    REDACTOR.add(value)


class RedactingFilter(logging.Filter):
    """Handler filter: freezes the record's message and traceback text, redacted, before any formatter sees it."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: log what we have rather than nothing
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for attr in STRUCTURED_FIELDS:
            value = getattr(record, attr, None)
            if isinstance(value, str):
                setattr(record, attr, self.redact(value))
        return True


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def _field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:  # the protocol's binary form: name, newline, little-endian length, data
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """journald's native protocol: one datagram per entry; an entry too big for one goes in a sealed memfd."""

    def __init__(self, identifier: str = "outpost", socket_path: str = JOURNAL_SOCKET,
                 level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.identifier = identifier
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.addFilter(RedactingFilter())

    def entry(self, record: logging.LogRecord) -> bytes:
        message = record.getMessage()
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{record.stack_info}"
        fields = [
            _field("MESSAGE", message), _field("PRIORITY", str(_priority(record.levelno))),
            _field("SYSLOG_IDENTIFIER", self.identifier), _field("LOGGER", record.name),
            _field("CODE_FILE", record.pathname), _field("CODE_LINE", str(record.lineno)),
            _field("CODE_FUNC", record.funcName), _field("THREAD_NAME", record.threadName or ""),
        ]
        for attr, key in STRUCTURED_FIELDS.items():
            value = getattr(record, attr, None)
            if value is not None:
                fields.append(_field(key, str(value)))
        return b"".join(fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.entry(record)
            try:
                self._sock.sendto(data, self.socket_path)
            except OSError as e:
                if e.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too big for a datagram
                    raise
                self._send_memfd(data)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("outpost-journal", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 2))
        try:
            os.write(fd, data)
            with contextlib.suppress(OSError, AttributeError):  # journald wants it sealed where possible
                import fcntl
                seals = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL, SHRINK, GROW, WRITE
                fcntl.fcntl(fd, getattr(fcntl, "F_ADD_SEALS", 1033), seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([b""], rights, 0, self.socket_path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        super().close()


class PlainFormatter(logging.Formatter):
    """The stderr format: structured fields appended as `[model=mlp step=verify]`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{attr}={getattr(record, attr)}" for attr in STRUCTURED_FIELDS
                  if getattr(record, attr, None) is not None]
        if not fields:
            return text
        first, nl, rest = text.partition("\n")
        return f"{first} [{' '.join(fields)}]{nl}{rest}"


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when $JOURNAL_STREAM is the device:inode of our stderr (systemd's documented check)."""
    raw = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: int = logging.WARNING, identifier: str = "outpost",
                      environ: Mapping[str, str] | None = None,
                      journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    """Install one redacting handler on the root logger: the native journal if stderr is it, else stderr."""
    env = os.environ if environ is None else environ
    for name in SECRET_ENV:
        register_secret(env.get(name))
    handler: logging.Handler
    if stderr_is_journal(env) and os.path.exists(journal_socket):
        handler = JournalHandler(identifier, journal_socket)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(RedactingFilter())
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:  # configured again (tests, a re-exec): replace, never double
            root.removeHandler(old)
            old.close()
    handler.set_name(HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
