"""The one heartbeat (sampling.heartbeat) and its two users: the run lock and the shard claims."""

import os
import threading
import time
import types

from sampling import lock
from sampling.claims import Claims
from sampling.heartbeat import Heartbeat


def wait_until(condition, seconds=5.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def threads_named(name, besides=()):
    """The live threads called ``name`` (other than those in ``besides``: other tests' may still run)."""
    return [t for t in threading.enumerate() if t.name == name and t not in besides]


def test_it_beats_until_stopped_and_never_after():
    beats, others = [], threads_named("test-heartbeat")
    heartbeat = Heartbeat(lambda: beats.append(time.time()), 0.02, "test-heartbeat")
    wait_until(lambda: len(beats) >= 3)
    thread, = threads_named("test-heartbeat", others)
    assert thread.daemon
    heartbeat.stop()
    after = len(beats)
    time.sleep(0.1)
    assert len(beats) == after and not thread.is_alive()


def test_an_os_error_costs_one_beat_only():
    calls = []

    def touch():
        calls.append(1)
        raise OSError("the file system said no")

    heartbeat = Heartbeat(touch, 0.01, "test-heartbeat")
    try:
        wait_until(lambda: len(calls) >= 3)
    finally:
        heartbeat.stop()


def test_stop_waits_for_a_touch_under_way():
    started, finished = threading.Event(), []

    def slow_touch():
        started.set()
        time.sleep(0.2)
        finished.append(1)

    heartbeat = Heartbeat(slow_touch, 0.01, "test-heartbeat")
    assert started.wait(5.0)
    heartbeat.stop()
    assert finished  # what it touches may be closed now


def test_the_run_lock_refreshes_its_file_until_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.02)
    others = threads_named("run-lock-heartbeat")
    held = lock.RunLock(str(tmp_path)).acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / "lock", (old, old))
        wait_until(lambda: lock.lock_age(str(tmp_path)) < 100)
        assert len(threads_named("run-lock-heartbeat", others)) == 1
    finally:
        held.release()
    assert not threads_named("run-lock-heartbeat", others) and lock.lock_age(str(tmp_path)) is None


def test_claims_refresh_the_current_claim_only_while_batches_come(tmp_path):
    out_dir = tmp_path / "run"
    plan = types.SimpleNamespace(
        layout=types.SimpleNamespace(claims_dir=str(out_dir / "shards" / ".claims")),
        settings=types.SimpleNamespace(runtime=types.SimpleNamespace(claim_lease=0.4)))
    others = threads_named("shard-claim-heartbeat")
    claims = Claims(plan, 0)
    try:
        assert claims.try_claim(3) == (True, None)
        old = time.time() - 1000
        os.utime(claims.path(3), (old, old))
        wait_until(lambda: claims.holder(3)[1] < 100)  # refreshed: the claim was just made
        claims.last_progress -= 10  # no batch for longer than the lease: the heartbeat skips the claim
        os.utime(claims.path(3), (old, old))
        time.sleep(0.5)
        assert claims.holder(3)[1] > 100
    finally:
        claims.close()
    assert not threads_named("shard-claim-heartbeat", others)


def test_stop_with_a_timeout_does_not_wait_for_a_hung_touch():
    import threading
    import time

    from sampling.heartbeat import Heartbeat

    release = threading.Event()
    started = threading.Event()

    def hung_touch():  # a utime on a stalled file system
        started.set()
        release.wait(10)

    beat = Heartbeat(hung_touch, 0.01, "test-hung-heartbeat")
    assert started.wait(5)
    t0 = time.monotonic()
    beat.stop(timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert beat._thread.is_alive()  # still in the touch; stop() returned anyway
    release.set()
    beat._thread.join(5)
    assert not beat._thread.is_alive()
