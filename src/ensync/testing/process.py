"""An engine serving in its own process, for tests and benchmarks.

`EngineProcess` runs ``ensync serve`` over one data directory on two
fixed loopback ports, so an engine that is killed (SIGKILL) and started
again is found where it was. Each incarnation's output goes to its own log
file (never to a pipe nobody reads, which would stall the engine once
full), and it dies with the process that started it (`dies_with_parent`),
so a test or a benchmark killed hard leaves no engine behind. It also reads
the process's memory, open files and CPU time from /proc (Linux), for the
benchmarks.

For example:

    async with running_engine(data_dir) as engine:
        client = await EnSyncEngine(engine.grpc_url).create_client(app_key)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "EngineProcess",
    "EngineProcessError",
    "ProcessMemory",
    "Transport",
    "cpu_seconds",
    "dies_with_parent",
    "fd_kinds",
    "free_ports",
    "open_fds",
    "process_memory",
    "running_engine",
]

Transport = Literal["grpc", "ws"]

# A log record of `ensync serve`: "<date> <time>,<ms> LEVEL logger: text".
_LOG_RECORD = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")
_ANY_RECORD = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


class EngineProcessError(Exception):
    """The engine process did not start, or did not stop, as asked."""


# Run between this process and the program (``python -I -S -c``, a few ms):
# it asks the kernel for SIGKILL when its parent dies (prctl(2)
# PR_SET_PDEATHSIG, which exec keeps), then becomes the program, same pid.
# A preexec_fn would do that in the child itself, but only after a real
# fork() of this process, and grpc's threads do not survive one: children
# crashed (SIGSEGV) before they ran. Python ignores SIGPIPE and SIGXFSZ; the
# program gets them back as they should be.
_LAUNCHER = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
parent, program = int(sys.argv[1]), sys.argv[2:]
ulong = ctypes.c_ulong
ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, ulong(signal.SIGKILL), ulong(0), ulong(0), ulong(0))
if os.getppid() != parent:  # the parent died before that took effect
    os._exit(1)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    os.execvp(program[0], program)
except OSError as exc:
    sys.stderr.write(f"cannot run {program[0]}: {exc}\\n")
    os._exit(127)
"""


# Sets the open-files limit, then becomes the program (same pid).
_LIMIT_FILES = """
import os, resource, sys
limit, program = int(sys.argv[1]), sys.argv[2:]
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.execvp(program[0], program)
"""


def dies_with_parent(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` so that it dies with this process.

    On Linux the program asks the kernel (``prctl(PR_SET_PDEATHSIG)``) for
    SIGKILL when its parent ends, however it ends: a parent killed with
    SIGKILL (a test that timed out, a ``dev-cluster`` killed hard) takes its
    children along instead of leaving them to run on. Elsewhere ``argv`` is
    returned as it is, and a child outlives a parent that had no chance to
    stop it.

    For example::

        await asyncio.create_subprocess_exec(*dies_with_parent(["nats-server", "-js"]))

    Start it from a thread that lives as long as the child should (the event
    loop's, or the one that waits for it): the kernel watches the thread
    that started the child, not the whole process.

    The child starts with SIGINT at its default, as from a shell: a parent
    run as a background job ignores SIGINT, and its children would inherit
    that and ignore the Ctrl-C a test sends them.
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """Resident memory of a process now and at its peak (VmRSS, VmHWM)."""

    rss_bytes: int
    peak_rss_bytes: int


def process_memory(pid: int) -> ProcessMemory:
    """VmRSS and VmHWM of ``pid`` from /proc (Linux); zeros if it is gone."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ProcessMemory(0, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024  # the kernel writes kB
    return ProcessMemory(values["VmRSS"], values["VmHWM"])


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open (entries of /proc/PID/fd)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_kinds(pid: int) -> dict[str, int]:
    """Open file descriptors of ``pid`` by kind.

    A kind is ``socket``, ``pipe``, ``anon_inode`` or the file's name
    (``ensync.db-wal``).
    """
    kinds: Counter[str] = Counter()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if ":" in target else Path(target).name
        kinds[kind] += 1
    return dict(sorted(kinds.items()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class EngineProcess:
    """``ensync serve`` on fixed loopback ports over one data directory.

    Call `start` for each incarnation, `kill` (SIGKILL) or
    `terminate` (SIGTERM) to end it, and `close` in ``finally``.

    Args:
        data: the data directory (the sqlite store is ``data/ensync.db``).
        logs: where each incarnation's output goes (``<log_name>`` for the
            first, ``<stem>-<n><suffix>`` for later ones).
        serve_args: extra ``ensync serve`` flags, e.g. ``["--ack-deadline-ms", "1000"]``.
        log_name: the first incarnation's log file name.
        start_timeout_s: how long an incarnation may take to listen.
        open_files: the engine's open-files limit, soft and hard (as
            ``ulimit -n`` sets it); ``None``: this process's.
    """

    def __init__(
        self,
        data: Path,
        logs: Path | None = None,
        serve_args: Sequence[str] = (),
        *,
        log_name: str = "engine.log",
        start_timeout_s: float = 120.0,
        open_files: int | None = None,
    ) -> None:
        self.data = data
        self.logs = logs if logs is not None else data
        self.grpc_port, self.http_port = free_ports(2)
        self._serve_args = list(serve_args)
        self._log_name = log_name
        self._start_timeout_s = start_timeout_s
        self._open_files = open_files
        self._process: asyncio.subprocess.Process | None = None
        self.incarnations = 0

    @property
    def grpc_url(self) -> str:
        """``grpc://127.0.0.1:<grpc port>``."""
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<http port>`` (the SDK adds ``/message``)."""
        return f"ws://127.0.0.1:{self.http_port}"

    @property
    def db(self) -> Path:
        """The sqlite file in the data directory."""
        return self.data / "ensync.db"

    @property
    def running(self) -> bool:
        """Whether an incarnation is running now."""
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int:
        """The process id of the current (or last) incarnation.

        Raises:
            EngineProcessError: the engine was never started.
        """
        if self._process is None:
            raise EngineProcessError("the engine was never started")
        return self._process.pid

    def port(self, transport: Transport) -> int:
        """The port that serves ``transport``."""
        return self.grpc_port if transport == "grpc" else self.http_port

    def log_path(self, incarnation: int | None = None) -> Path:
        """The log of an incarnation (the current one by default)."""
        n = self.incarnations if incarnation is None else incarnation
        if n <= 1:
            return self.logs / self._log_name
        name = Path(self._log_name)
        return self.logs / f"{name.stem}-{n}{name.suffix}"

    async def start(self) -> None:
        """Start the next incarnation and wait until both listeners accept.

        Raises:
            EngineProcessError: it exited or did not listen in time.
        """
        if self.running:
            raise EngineProcessError("the engine is already running")
        self.incarnations += 1
        path = self.log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            *("-m", "ensync.cli.main", "serve", "--data", str(self.data)),
            *("--grpc", f"127.0.0.1:{self.grpc_port}"),
            *("--http", f"127.0.0.1:{self.http_port}"),
            *self._serve_args,
        ]
        if self._open_files is not None:
            argv = [sys.executable, "-I", "-S", "-c", _LIMIT_FILES, str(self._open_files), *argv]
        with path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *dies_with_parent(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        for port in (self.grpc_port, self.http_port):
            await self._wait_listening(port, deadline)

    async def _wait_listening(self, port: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running:
                raise EngineProcessError(
                    f"engine incarnation {self.incarnations} exited before listening on "
                    f"{port}:\n{self.log_text()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if loop.time() > deadline:
                    raise EngineProcessError(
                        f"nothing listens on {port} after {self._start_timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def kill(self) -> None:
        """SIGKILL the running incarnation and reap it."""
        process = self._running_process()
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 30)

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the running incarnation; returns its exit code.

        Raises:
            EngineProcessError: it did not stop within ``timeout_s`` (then it is killed).
        """
        process = self._running_process()
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise EngineProcessError(f"the engine ignored SIGTERM for {timeout_s:g} s") from None

    async def close(self) -> None:
        """Kill the engine if it still runs (for ``finally``)."""
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def _running_process(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            raise EngineProcessError("the engine is not running")
        return self._process

    # ------------------------------------------------------------------ readings

    def memory(self) -> ProcessMemory:
        """The engine's resident and peak memory now."""
        return process_memory(self.pid)

    def open_fds(self) -> int:
        """How many file descriptors the engine has open now."""
        return open_fds(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the engine used so far, in seconds."""
        return cpu_seconds(self.pid)

    def log_text(self, incarnation: int | None = None) -> str:
        """The log of an incarnation (the current one by default); empty if there is none."""
        path = self.log_path(incarnation)
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def all_logs(self) -> str:
        """The logs of every incarnation, each under a heading."""
        return "".join(
            f"--- engine incarnation {n} ---\n{self.log_text(n)}"
            for n in range(1, self.incarnations + 1)
        )

    def log_problems(self) -> list[str]:
        """Records the engine logged at WARNING or above, one line each.

        A line is the record's first line and, for one with a traceback, its
        second line (which task or future, in asyncio's records) and its last
        (the exception), so a report names the cause without the log.
        """
        problems: list[str] = []
        record: list[str] | None = None  # the problem being read, line by line

        def finish() -> None:
            if record:
                extra = [record[1]] if len(record) > 1 else []
                extra += [record[-1]] if len(record) > 2 else []
                problems.append(" | ".join([record[0], *(part[:240] for part in extra)]))

        for line in self.log_text().splitlines():
            if _ANY_RECORD.match(line):
                finish()
                record = [line] if _LOG_RECORD.match(line) else None
            elif record is not None and line.strip():
                record.append(line.strip())
        finish()
        return problems

    def log_tail(self, lines: int = 10) -> str:
        """The last ``lines`` lines of the current incarnation's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.asynccontextmanager
async def running_engine(
    data_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 120.0,
    log_name: str = "engine.log",
    log_level: str = "WARNING",
) -> AsyncIterator[EngineProcess]:
    """Serve ``data_dir`` (sqlite) in a child process until the block ends.

    Waits until both listeners accept. The engine logs to ``data_dir/log_name``
    at ``log_level``. On exit it gets SIGTERM (SIGKILL after 30 s).
    """
    engine = EngineProcess(
        data_dir,
        serve_args=["--log-level", log_level, *extra_args],
        log_name=log_name,
        start_timeout_s=start_timeout_s,
    )
    try:
        await engine.start()
        yield engine
    finally:
        if engine.running:
            with contextlib.suppress(EngineProcessError):
                await engine.terminate()
        await engine.close()
