"""A throwaway PostgreSQL server on a free 127.0.0.1 port for the fleet store tests and benchmarks.

`PostgresServer` runs ``initdb`` and ``postgres`` from PATH or ``/usr/lib/postgresql/<ver>/bin``
(Debian's ``apt-get install postgresql``) in a fresh temp folder, TCP on loopback only (no Unix
socket), trust authentication. PostgreSQL refuses to run as root, so as root the server runs as
``nobody`` (its folder is made in /tmp and handed to that user: pytest's own tmp folder is private
to root). The `postgres_url` fixture gives each test a fresh database on one server per session;
it skips when PostgreSQL is missing or cannot start, unless EDGE_REQUIRE_POSTGRES=1 (CI), which
makes that a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import HOST, free_port

__all__ = ["PostgresServer", "postgres_server", "postgres_url", "require_postgres"]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def require_postgres(problem: str) -> None:
    """Skip with `problem`, or fail when EDGE_REQUIRE_POSTGRES=1."""
    message = f"PostgreSQL unavailable: {problem} (apt-get install postgresql; pip install 'psycopg[binary]')"
    if os.environ.get("EDGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + "; EDGE_REQUIRE_POSTGRES=1 makes this a failure")
    pytest.skip(message)


class PostgresServer:
    """One postgres process in its own temp folder; `stop()` removes the folder."""

    def __init__(self, *, durable: bool = False) -> None:
        self.initdb = _binary("initdb")
        self.postgres = _binary("postgres")
        if self.initdb is None or self.postgres is None:
            raise FileNotFoundError("initdb and postgres are not installed")
        self.durable = durable
        """False (tests): fsync off, so a test run does not wait on the disk."""
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.directory / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.directory, nobody.pw_uid, nobody.pw_gid)
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        """The URL of the default database."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """The URL of database `name` on this server."""
        return f"postgresql://postgres@{HOST}:{self.port}/{name}"

    def _run(self, command: list[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "HOME": str(self.directory), "LC_ALL": "C.UTF-8"}
        return subprocess.run(
            command, capture_output=True, env=env, cwd=self.directory, **self._as, **options
        )

    def start(self, timeout: float = 30.0) -> None:
        """initdb (first time) and start postgres; wait until it accepts connections."""
        if not self.data.exists():
            done = self._run([str(self.initdb), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--no-sync"], timeout=120)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        settings = [
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=50",
        ]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        self.process = subprocess.Popen([str(self.postgres), "-D", str(self.data), "-p", str(self.port),
                                         *settings], stdout=log, stderr=log, env=env, cwd=self.directory,
                                        **self._as)  # fmt: skip
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log()[-2000:]}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections in {timeout} s") from None
                time.sleep(0.1)

    def log(self) -> str:
        """The server's log so far."""
        path = self.directory / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def remove(self) -> None:
        """Stop and delete the folder."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server() -> Iterator[PostgresServer]:
    """One running PostgreSQL for the session (skip, or fail with EDGE_REQUIRE_POSTGRES=1, if none)."""
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError:
        require_postgres("the psycopg driver is not installed")
    try:
        server = PostgresServer()
    except (FileNotFoundError, KeyError) as exc:
        require_postgres(str(exc))
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        server.remove()
        require_postgres(str(exc))
    yield server
    server.remove()


_numbers = itertools.count(1)


@pytest.fixture(name="postgres_url")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database for this test."""
    return postgres_server.create_database(f"fleet_{os.getpid()}_{next(_numbers)}")
