"""Run the real review app (``marrowscope serve``) in a subprocess, for end-to-end tests.

The server is a separate process in its own session (process group), so a test can SIGKILL it in
the middle of its work and start it again on the same data folder, exactly as a crash would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AppServer",
    "AppServerError",
    "free_tcp_port",
    "serve_command",
    "start_app_server",
    "start_server",
]

HEALTH_PATH = "/api/health"


class AppServerError(RuntimeError):
    """The server process did not come up (its log tail is in the message)."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class AppServer:
    """A started server process.

    Attributes:
        process: the ``Popen`` of the server (leader of its own process group).
        host: the address it listens on.
        port: its TCP port.
        log_path: its stdout and stderr (appended to, so restarts keep the history).
        data_dir: the data folder it was given (``None`` for a non-app server).
    """

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    data_dir: Path | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.poll() is None

    def kill(self) -> int:
        """SIGKILL the whole process group at once (a crash: no shutdown handler runs).

        Returns:
            The process's exit status (``-9``).
        """
        self._signal_group(signal.SIGKILL)
        return self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (a clean uvicorn shutdown); SIGKILL if it has not exited after ``timeout`` s.

        Returns:
            The process's exit status.
        """
        if self.running:
            self._signal_group(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the server's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def _get_status(url: str, timeout: float) -> int | None:
    """HTTP status of a GET, or ``None`` when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def start_server(
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    host: str = "127.0.0.1",
    health_path: str = HEALTH_PATH,
    startup_timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    data_dir: Path | None = None,
) -> AppServer:
    """Start ``argv`` and wait until ``GET health_path`` answers 200.

    Args:
        argv: the full command line (it must listen on ``host:port``).
        port: the port it was told to use.
        log_path: file that receives its stdout and stderr (appended).
        host: the address it was told to use.
        health_path: polled every 0.1 s until it answers 200.
        startup_timeout: seconds before giving up (the process is then killed).
        env: extra environment variables on top of this process's.
        cwd: working folder of the server.
        data_dir: recorded on the returned :class:`AppServer`.

    Returns:
        The running server.

    Raises:
        AppServerError: the process exited, or was not healthy within ``startup_timeout``;
            the message holds the end of its log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(  # noqa: S603 (a fixed command line built by the tests)
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # its own process group: kill() takes any children too
        )
    server = AppServer(process, host, port, log_path, data_dir, list(argv))
    health = server.url(health_path)
    deadline = time.monotonic() + startup_timeout
    last_status: int | None = None
    while True:
        if not server.running:
            raise AppServerError(
                f"server exited with status {process.returncode} before {health} answered; "
                f"log {log_path}:\n{server.log_tail()}"
            )
        last_status = _get_status(health, timeout=2.0)
        if last_status == 200:
            return server
        if time.monotonic() > deadline:
            server.kill()
            raise AppServerError(
                f"{health} did not answer 200 within {startup_timeout:.0f} s "
                f"(last status: {last_status}); log {log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def serve_command(
    checkpoint: Path,
    *,
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    database_url: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``marrowscope serve`` command line (run with this interpreter: ``python -m``)."""
    argv = [
        sys.executable,
        "-m",
        "marrowscope",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    if database_url:
        argv += ["--database-url", database_url]
    return argv + list(extra_args)


def start_app_server(
    checkpoint: Path,
    *,
    data_dir: Path,
    log_path: Path | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    database_url: str | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
) -> AppServer:
    """Start ``marrowscope serve`` on a free port and wait for ``/api/health``.

    Args:
        checkpoint: the model bundle folder.
        data_dir: the app's data folder (created by the app; reuse it to restart on the same data).
        log_path: the server's log file; default ``serve-PORT.log`` beside ``data_dir``.
        port: a fixed port (e.g. to restart where a browser points); default a free one.
        host: the listening address (keep it on loopback).
        database_url: ``--database-url`` (default: the app's SQLite file in ``data_dir``).
        extra_args: more ``serve`` options.
        startup_timeout: seconds to wait for health (model loading on 2 busy cores is slow).
        env: extra environment variables for the server.

    Returns:
        The running server; stop it with :meth:`AppServer.stop` or crash it with
        :meth:`AppServer.kill`.
    """
    data_dir = Path(data_dir)
    # A free port can be taken by someone else before the server binds it: then try another.
    attempts = 1 if port else 3
    for attempt in range(attempts):
        this_port = port or free_tcp_port(host)
        this_log = log_path or data_dir.parent / f"serve-{this_port}.log"
        argv = serve_command(
            checkpoint,
            data_dir=data_dir,
            port=this_port,
            host=host,
            database_url=database_url,
            extra_args=extra_args,
        )
        try:
            return start_server(
                argv,
                port=this_port,
                host=host,
                log_path=this_log,
                startup_timeout=startup_timeout,
                env=env,
                data_dir=data_dir,
            )
        except AppServerError as err:
            if attempt + 1 == attempts or "address already in use" not in str(err).lower():
                raise
    raise AssertionError("unreachable")  # pragma: no cover
