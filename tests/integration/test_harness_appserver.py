"""The live-server helper: waits for health, reports a dead start, kills the whole process group.

Exercised here on a stand-in server (a few lines of http.server), so the helper is checked apart
from the app; the app's own tests use it on ``marrowscope serve``.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from harness.appserver import AppServerError, free_tcp_port, serve_command, start_server

pytestmark = pytest.mark.integration

# argv: PORT DELAY_S HEALTH_STATUS. Starts a sleeping child (to check that kill() takes the whole
# process group), prints its pid, waits DELAY_S, then answers /api/health with HEALTH_STATUS.
STAND_IN = """
import http.server, subprocess, sys, time
port, delay, status = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(delay)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"}


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _stand_in(tmp_path: Path, delay: float = 0.5, status: int = 200) -> tuple[list[str], int]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    port = free_tcp_port()
    return [sys.executable, str(script), str(port), str(delay), str(status)], port


def _child_pid(log: Path) -> int:
    line = next(x for x in log.read_text().splitlines() if x.startswith("child "))
    return int(line.split()[1])


def test_waits_for_health_then_kill_takes_the_process_group(tmp_path: Path) -> None:
    argv, port = _stand_in(tmp_path, delay=1.0)
    log = tmp_path / "server.log"
    started = time.monotonic()
    server = start_server(argv, port=port, log_path=log, startup_timeout=60)
    try:
        assert time.monotonic() - started >= 1.0  # it waited for the server, not just the process
        assert server.base_url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(server.url("/api/health"), timeout=5) as resp:
            assert resp.status == 200
        child = _child_pid(log)
        assert _alive(child)
    finally:
        status = server.kill()
    assert status == -signal.SIGKILL
    assert not server.running
    assert _gone_within(child, 5), "the server's child process survived kill()"


def test_stop_ends_the_server_with_sigterm(tmp_path: Path) -> None:
    argv, port = _stand_in(tmp_path, delay=0)
    server = start_server(argv, port=port, log_path=tmp_path / "server.log", startup_timeout=60)
    assert server.stop(timeout=10) == -signal.SIGTERM
    assert server.stop() == -signal.SIGTERM  # stopping again is harmless


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no such checkpoint: /nowhere'); sys.exit(3)"]
    with pytest.raises(AppServerError, match="exited with status 3") as err:
        start_server(argv, port=free_tcp_port(), log_path=tmp_path / "s.log", startup_timeout=60)
    assert "no such checkpoint: /nowhere" in str(err.value)


def test_a_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    argv, port = _stand_in(tmp_path, delay=0, status=503)
    log = tmp_path / "server.log"
    with pytest.raises(AppServerError, match=r"did not answer 200 within 2 s \(last status: 503\)"):
        start_server(argv, port=port, log_path=log, startup_timeout=2)
    assert _gone_within(_child_pid(log), 5)


def test_serve_command_follows_the_documented_cli(tmp_path: Path) -> None:
    argv = serve_command(
        tmp_path / "ck", data_dir=tmp_path / "d", port=8123, database_url="postgresql://x/y"
    )
    assert argv[:4] == [sys.executable, "-m", "marrowscope", "serve"]
    options = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert options == {
        "--checkpoint": str(tmp_path / "ck"),
        "--host": "127.0.0.1",
        "--port": "8123",
        "--data-dir": str(tmp_path / "d"),
        "--database-url": "postgresql://x/y",
    }
