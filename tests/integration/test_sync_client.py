"""The blocking client (`ensync.sync`), used from plain threads with no event loop."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from ensync import ConnectionState, EnSyncConnectionError, EnSyncValidationError, Message
from ensync.sync import EnSyncEngine
from tests.support.threaded import ThreadedEngine, engine_in_thread
from tests.support.timing import seconds


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadedEngine]:
    # A long ack deadline: a prompt redelivery is the SDK giving a message back.
    with engine_in_thread(ack_deadline_ms=30_000) as engine:
        yield engine


@pytest.fixture(params=["grpc", "ws"])
def url(request: pytest.FixtureRequest, served: ThreadedEngine) -> str:
    return served.server.grpc_url if request.param == "grpc" else served.server.ws_url


def _acked(served: ThreadedEngine) -> int:
    return served.inspect(lambda: served.server.engine.stats.acked)


def _loop_threads() -> int:
    return sum(thread.name == "ensync-sync-loop" for thread in threading.enumerate())


def test_publish_pull_and_settle_without_an_event_loop(served: ThreadedEngine, url: str) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # a plain thread: nothing async here
    app = served.create_app(f"sync-pull-{url.split(':')[0]}")
    acked_before = _acked(served)
    threads_before = _loop_threads()
    with EnSyncEngine(url) as engine:
        assert _loop_threads() == threads_before + 1
        with engine.create_client(app.app_key, app_secret_key=app.secret_key) as client:
            sub = client.subscribe("jobs", auto_ack=False)
            first = client.publish("jobs", [app.app_id], {"job": 1})
            message = sub.get(timeout=seconds(5))
            assert isinstance(message, Message)
            assert (message.idem, message.payload) == (first, {"job": 1})
            sub.ack(message.idem, message.block)

            results = client.publish_many("jobs", [app.app_id], ({"job": n} for n in (2, 3, 4)))
            assert all(result.ok for result in results)
            batch = sub.fetch(3, timeout=seconds(5))
            assert [m.payload["job"] for m in batch] == [2, 3, 4]
            when = sub.defer(batch[0].idem, 50, "later")
            assert when > 0
            sub.discard(batch[1].idem, "bad")
            sub.ack(batch[2].idem, batch[2].block)
            again = sub.get(timeout=seconds(5))
            assert again.idem == batch[0].idem
            sub.ack(again.idem, again.block)
            assert client.replay(first).payload == {"job": 1}
            with pytest.raises(TimeoutError, match="no message of 'jobs'"):
                sub.get(timeout=0.1)
        assert client.state is ConnectionState.CLOSED
    assert _loop_threads() == threads_before  # its thread ended with it
    assert _acked(served) == acked_before + 3
    with pytest.raises(EnSyncConnectionError, match="closed"):
        engine.create_client(app.app_key)


def test_handlers_run_on_worker_threads_and_settle_from_there(
    served: ThreadedEngine, url: str
) -> None:
    app = served.create_app(f"sync-handlers-{url.split(':')[0]}")
    seen: queue.Queue[tuple[str, int, str]] = queue.Queue()
    with EnSyncEngine(url) as engine:
        client = engine.create_client(app.app_key, app_secret_key=app.secret_key)
        sub = client.subscribe("jobs", auto_ack=False)

        def handle(message: Message) -> None:
            seen.put((message.idem, message.attempt, threading.current_thread().name))
            if message.attempt == 1:
                raise RuntimeError("not yet")  # given back: delivered again
            sub.ack(message.idem, message.block)  # a blocking call, from the worker

        remove = sub.on(handle)
        idem = client.publish("jobs", [app.app_id], {"job": 1})
        first = seen.get(timeout=seconds(10))
        second = seen.get(timeout=seconds(10))
        assert (first[0], first[1]) == (idem, 1)
        assert (second[0], second[1]) == (idem, 2)
        assert first[2].startswith("ensync-handler")
        remove()

        async def not_blocking(message: Message) -> None: ...

        with pytest.raises(EnSyncValidationError, match="pass a plain function"):
            sub.on(not_blocking)
    deadline = time.monotonic() + seconds(5)
    while _acked(served) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _acked(served) >= 1


def test_many_threads_share_one_client(served: ThreadedEngine) -> None:
    app = served.create_app("sync-threads")
    with EnSyncEngine(served.server.grpc_url) as engine:
        client = engine.create_client(app.app_key, app_secret_key=app.secret_key)
        sub = client.subscribe("readings")
        idems: list[str] = []
        lock = threading.Lock()

        def publish(worker: int) -> None:
            for n in range(25):
                idem = client.publish("readings", [app.app_id], {"worker": worker, "n": n})
                with lock:
                    idems.append(idem)

        workers = [threading.Thread(target=publish, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(seconds(30))
        assert len(idems) == 100
        taken: list[Message] = []
        while len(taken) < 100:
            batch = sub.fetch(100 - len(taken), timeout=seconds(10))
            assert batch, "the engine stopped delivering"
            taken.extend(batch)
        assert {m.idem for m in taken} == set(idems)


def test_bad_options_are_refused_before_any_thread_starts() -> None:
    before = _loop_threads()
    with pytest.raises(EnSyncValidationError, match="handler_threads"):
        EnSyncEngine("grpc://127.0.0.1:1", handler_threads=0)
    with pytest.raises(EnSyncValidationError):
        EnSyncEngine("grpc://127.0.0.1:1", call_timeout=-5)
    assert _loop_threads() == before


_LEAVES_WITHOUT_CLOSING = textwrap.dedent(
    """
    import os, sys
    from ensync.sync import EnSyncEngine

    engine = EnSyncEngine(os.environ["URL"])
    client = engine.create_client(os.environ["APP_KEY"], app_secret_key=os.environ["SECRET"])
    sub = client.subscribe("jobs", auto_ack=False)
    client.publish("jobs", [os.environ["APP_ID"]], {"job": "held"})
    held = sub.get(timeout=10)
    print(held.idem, flush=True)
    sys.exit(0)  # no close: the engine is closed at exit
    """
)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
def test_a_process_that_exits_without_closing_exits_cleanly(transport: str) -> None:
    # One client per app: the next one connects only if the process's client
    # said goodbye as it exited (without it, its session would linger until
    # its heartbeats were missed).
    with engine_in_thread(ack_deadline_ms=30_000, max_clients_per_app=1) as served:
        app = served.create_app("leaver")
        url = served.server.grpc_url if transport == "grpc" else served.server.ws_url
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _LEAVES_WITHOUT_CLOSING],
            env={
                **os.environ,
                "URL": url,
                "APP_KEY": app.app_key,
                "SECRET": app.secret_key,
                "APP_ID": app.app_id,
            },
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        for noise in ("Traceback", "never awaited", "destroyed", "Exception ignored"):
            assert noise not in done.stderr
        assert time.monotonic() - started < seconds(30)
        held = done.stdout.strip()
        with EnSyncEngine(url, max_reconnect_attempts=1) as engine:
            client = engine.create_client(app.app_key, app_secret_key=app.secret_key)
            sub = client.subscribe("jobs", auto_ack=False)
            message = sub.get(timeout=seconds(10))  # not after the 30 s ack deadline
            assert message.idem == held
            assert message.attempt == 2


def test_a_blocking_call_on_the_engines_own_loop_is_refused(served: ThreadedEngine) -> None:
    # (As an "error" listener calling client.publish would: it would wait for
    # the loop it is blocking.)
    with EnSyncEngine(served.server.grpc_url) as engine:
        runner = engine._runner
        with pytest.raises(RuntimeError, match="use the asynchronous client"):
            runner.call(lambda: runner.run(asyncio.sleep(0)))
