"""A real authenticated git HTTP server for tests and benchmarks: `git http-backend` run as CGI behind
a small threaded `http.server` with Basic auth, on a free port of 127.0.0.1.

    with serve_git_http(root, "user", "token") as base_url:
        ...  # f"{base_url}/project.git" is root/project.git (a bare repo)

Every request needs the credentials (401 otherwise), pushes included; the server stops cleanly when
the block ends. `make_bare_repo` prepares a repo that accepts pushes.
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

_CHUNK = 64 * 1024


def make_bare_repo(path: Path) -> Path:
    """An empty bare repo that accepts pushes over HTTP."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "--git-dir", str(path), "config", "http.receivepack", "true"], check=True)
    return path


class _GitHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection and the body ends with the connection, so CGI output can
    # be streamed without knowing its length.
    protocol_version = "HTTP/1.0"
    server: _GitServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read their own output
        pass

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return hmac.compare_digest(user, self.server.username) and hmac.compare_digest(
            password, self.server.password
        )

    def _serve(self) -> None:
        self.server.requests += 1
        if not self._authorized():
            self.server.rejected += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        url = urlsplit(self.path)
        with tempfile.TemporaryFile() as body:
            self._read_body(body)
            self._run_backend(url.path, url.query, body)

    def _run_backend(self, path: str, query: str, body: IO[bytes]) -> None:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(body.seek(0, os.SEEK_END)),
            "REMOTE_USER": self.server.username,
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        body.seek(0)
        with subprocess.Popen(
            ["git", "http-backend"], stdin=body, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        ) as proc:
            assert proc.stdout is not None
            self._relay(proc.stdout)

    def _read_body(self, spool: IO[bytes]) -> None:
        """The request body, de-chunked (git streams big pushes with chunked transfer encoding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                spool.write(self.rfile.read(size))
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    break
                spool.write(data)
                remaining -= len(data)

    def _relay(self, stream: IO[bytes]) -> None:
        """CGI headers (Status: …) become the HTTP status line and headers; the body is streamed."""
        status, headers = 200, []
        while True:
            line = stream.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            else:
                headers.append((name.strip(), value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        while chunk := stream.read(_CHUNK):
            self.wfile.write(chunk)


class _GitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, username: str, password: str) -> None:
        super().__init__(("127.0.0.1", 0), _GitHandler)
        self.root = root
        self.username = username
        self.password = password
        self.requests = 0
        self.rejected = 0


@contextmanager
def serve_git_http(root: Path, username: str, password: str) -> Iterator[str]:
    """Serves every bare repo under `root` at `http://127.0.0.1:<port>/<name>`; yields the base URL."""
    if shutil.which("git") is None:
        raise RuntimeError("git is not installed")
    server = _GitServer(root.resolve(), username, password)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="git-http", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
