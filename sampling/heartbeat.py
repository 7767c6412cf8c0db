"""A heartbeat: a daemon thread that calls a touch function every ``interval`` seconds until it is stopped. The run
lock (:mod:`sampling.lock`) refreshes its file's mtime with one, the shard claims (:mod:`sampling.claims`) their
claim files; what to touch, and when to skip a beat, is the touch function's business. An ``OSError`` from it costs
one beat only: a holder whose beats stop for long is taken for dead, which is what a heartbeat is for."""

import threading


class Heartbeat:
    """Calls ``touch()`` every ``interval`` seconds on a daemon thread named ``name``, from now until :meth:`stop`."""

    def __init__(self, touch, interval, name):
        self.touch = touch
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stopped.wait(self.interval):
            try:
                self.touch()
            except OSError:
                pass  # a missed beat; the next one tries again

    def stop(self, timeout=None):
        """End the thread; a touch under way is waited for (at most ``timeout`` seconds, None: as long as it
        takes), so none happens after this returns unless it timed out (the caller may close or remove what it
        touches)."""
        self._stopped.set()
        self._thread.join(timeout)
