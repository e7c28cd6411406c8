"""Logs: native journal entries with structured fields over a real datagram socket, plain stderr elsewhere,
and no secret in any line (patterns, registered values, tracebacks, and a real `outpost` process)."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from runtime.journal import (
    REDACTOR,
    JournalHandler,
    PlainFormatter,
    RedactingFilter,
    Redactor,
    configure_logging,
    register_secret,
    stderr_is_journal,
)
from tests.conftest import MakeBundle
from tests.systemd.conftest import ROOT


@pytest.mark.parametrize(("text", "want"), [
    ("Authorization: Bearer q8Zr-Tk_91xYwV", "Authorization: Bearer ***"),
    ("headers={'Authorization': 'Bearer q8Zr-Tk_91xYwV'}", "headers={'Authorization': 'Bearer ***'}"),
    ("broker mqtts://dev1:hunter2!@broker.site:8883", "broker mqtts://dev1:***@broker.site:8883"),
    ("db postgresql+asyncpg://fleet:p%40ss@db:5432/fleet", "db postgresql+asyncpg://fleet:***@db:5432/fleet"),
    ("GET /api/v1/enroll?token=et_5f2a9&x=1", "GET /api/v1/enroll?token=***&x=1"),
    ('{"device_token": "dt_9a8b7c", "id": "dev1"}', '{"device_token": "***", "id": "dev1"}'),
    ("password='two words' then", "password='***' then"),
    ("OUTPOST_MQTT_PASSWORD=zz9 api_key: k-77", "OUTPOST_MQTT_PASSWORD=*** api_key: ***"),
    # what must stay readable
    ("missing or wrong bearer token", "missing or wrong bearer token"),
    ("fleet at http://10.0.0.5:8780/api/v1@x", "fleet at http://10.0.0.5:8780/api/v1@x"),
    ("token_id=tk_17 created", "token_id=tk_17 created"),
    ("serving mlp@1.0.0 on http://127.0.0.1:8000", "serving mlp@1.0.0 on http://127.0.0.1:8000"),
])
def test_redaction_patterns(text: str, want: str) -> None:
    assert Redactor()(text) == want


def test_registered_values_are_masked_anywhere() -> None:
    r = Redactor(["dev-cred-0b1c2d3e", "short"])
    masked = r("loaded dev-cred-0b1c2d3e from disk; retry with dev-cred-0b1c2d3e")
    assert masked == "loaded *** from disk; retry with ***"
    assert r("a short word") == "a short word"  # under 6 characters: never treated as a secret


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, list[str]]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter(Redactor(["cred-77aa88bb99"])))
    handler.setFormatter(PlainFormatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("outpost.test.redact")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield log, lines
    log.removeHandler(handler)


def test_secrets_in_args_extras_and_tracebacks_are_masked(logger: tuple[logging.Logger, list[str]]) -> None:
    log, lines = logger
    log.info("fleet %s answered with %r", "https://dev:cred-77aa88bb99@fleet:8780", {"token": "abc123"},
             extra={"model": "mlp", "version": "2.0.0", "step": "download"})
    try:
        raise ConnectionError("login as dev with cred-77aa88bb99 refused")
    except ConnectionError:
        log.exception("sync failed", extra={"step": "sync"})
    text = "\n".join(lines)
    assert "cred-77aa88bb99" not in text and "abc123" not in text
    assert lines[0] == ("INFO outpost.test.redact: fleet https://dev:***@fleet:8780 answered with {'token': '***'} "
                        "[model=mlp version=2.0.0 step=download]")
    assert lines[1].startswith("ERROR outpost.test.redact: sync failed [step=sync]\nTraceback")
    assert "ConnectionError: login as dev with *** refused" in lines[1]


class JournalSocket:
    """A stand-in journald: a datagram socket that also accepts an entry passed as a memfd."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="jrn-", dir="/tmp")
        self.path = os.path.join(self.dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)

    def entry(self) -> dict[str, str]:
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        if fds:
            with os.fdopen(fds[0], "rb") as f:  # journald maps it; the offset is shared with the sender
                f.seek(0)
                data = f.read()
        return parse_entry(data)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's native format: KEY=value lines, or KEY, newline, 64-bit LE length, value, newline."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal() -> Iterator[JournalSocket]:
    j = JournalSocket()
    yield j
    j.close()


def test_journal_entries_carry_priority_code_and_structured_fields(journal: JournalSocket) -> None:
    handler = JournalHandler("outpost-test", journal.path)
    log = logging.getLogger("outpost.test.journal")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    register_secret("enroll-tok-5e6f7a8b")
    try:
        log.warning("engine build for %s fell back", "mlp", extra={"model": "mlp", "version": "3", "step": "build",
                                                                 "backend": "ort-cpu"})
        first = journal.entry()
        try:
            raise ValueError("enroll-tok-5e6f7a8b was rejected")
        except ValueError:
            log.error("enrollment failed", exc_info=True, extra={"step": "enroll"})
        second = journal.entry()
        log.info("x" * 400_000)  # beyond one datagram: sent as a sealed memfd
        third = journal.entry()
    finally:
        log.removeHandler(handler)
        handler.close()
    assert first["MESSAGE"] == "engine build for mlp fell back"
    assert first["PRIORITY"] == "4" and first["SYSLOG_IDENTIFIER"] == "outpost-test"
    assert first["LOGGER"] == "outpost.test.journal" and first["CODE_FUNC"].startswith("test_journal_entries")
    assert (first["MODEL"], first["VERSION"], first["STEP"], first["BACKEND"]) == ("mlp", "3", "build", "ort-cpu")
    assert second["PRIORITY"] == "3" and second["STEP"] == "enroll"
    assert second["MESSAGE"].startswith("enrollment failed\nTraceback")  # multi-line: the binary field form
    assert "ValueError: *** was rejected" in second["MESSAGE"] and "enroll-tok" not in second["MESSAGE"]
    assert third["MESSAGE"] == "x" * 400_000 and third["PRIORITY"] == "6"


def test_journal_is_used_only_when_journal_stream_names_our_stderr(tmp_path: pathlib.Path,
                                                                   journal: JournalSocket) -> None:
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)
        assert not stderr_is_journal({}, f)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f)
    # A child whose stderr is that file, told so by JOURNAL_STREAM, writes native entries and nothing on stderr.
    code = ("import logging, sys; from runtime.journal import configure_logging; "
            f"h = configure_logging(logging.INFO, journal_socket={journal.path!r}); "
            "logging.getLogger('agent').info('ready', extra={'model': 'mlp'}); print(type(h).__name__)")
    with open(tmp_path / "stderr2", "w") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "OUTPOST_TOKEN": "tok-from-env-123"}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=err, stdout=subprocess.PIPE,
                             text=True, check=True).stdout
    assert out.strip() == "JournalHandler"
    entry = journal.entry()
    assert entry["MESSAGE"] == "ready" and entry["MODEL"] == "mlp" and entry["SYSLOG_IDENTIFIER"] == "outpost"
    assert (tmp_path / "stderr2").read_text() == ""


def test_configure_logging_registers_secrets_from_the_environment() -> None:
    handler = configure_logging(logging.INFO, environ={"OUTPOST_FLEET_TOKEN": "fleet-op-token-42"})
    try:
        assert REDACTOR("used fleet-op-token-42") == "used ***"
        assert isinstance(handler, logging.StreamHandler)
    finally:
        logging.getLogger().removeHandler(handler)


def test_no_secret_in_any_line_of_a_real_outpost_process(make_bundle: MakeBundle, tmp_path: pathlib.Path,
                                                         keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    """`outpost -vv serve` with an API token, MQTT credentials (broker down) and a bad request; then an error
    message that quotes a broker URL. Nothing it prints, at debug level, contains a secret."""
    b = make_bundle("mlp", name="quiet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once closed: MQTT keeps failing to connect
    api_token, mqtt_password = "api-7c1d2e3f4a5b", "mqtt-pw-9e8d7c6b"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OUTPOST_ENGINE_CACHE": str(tmp_path / "engines"),
           "OUTPOST_TOKEN": api_token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "-vv", "serve", str(b), "--trust", str(keypair[1]), "--port", str(port),
         "--mqtt", f"mqtt://edge:{mqtt_password}@127.0.0.1:{dead}", "--device-id", "dev1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import urllib.error
    import urllib.request
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for token in (api_token, "wrong-0123456789"):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/quiet/infer", data=b"{not json",
                                         headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=10)
        time.sleep(1.5)  # a few MQTT reconnect attempts
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "MQTT" in err and "Connection refused" in err  # it did talk about the broker
    assert api_token not in out + err and mqtt_password not in out + err
    bad = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(b), "--mqtt",
                          f"mqtt://edge:{mqtt_password}@127.0.0.1:{dead}/not-allowed"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "mqtt://edge:***@127.0.0.1" in bad.stderr and mqtt_password not in bad.stderr + bad.stdout
