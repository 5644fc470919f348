"""The asynchronous rollout producer: the batches of coming steps are generated while the
trainer trains on the current one (`rollout.mode: async`, docs/async.md).

A thread generates one step's batch at a time, in step order. It starts the batch of step s
only once the trainer has finished step s - K (K = `rollout.max_staleness`), so the batch is
sampled by a policy at most K versions older than the one that trains on it, and at most K
batches wait in memory: nothing is generated only to be thrown away. (Dropping stale samples
instead would bias training toward short prompts, whose groups finish first: tinker-cookbook
#822.) With K = 0 the producer starts each batch right after the previous step's sync: the
synchronous loop, in another thread. The trainer checks every batch's staleness again when
it takes it (`StaleBatch`).

The engine is shared: `generate_step` holds the trainer's engine lock while it generates, and
the trainer holds it while it syncs, so every batch is sampled under one weight version
(vLLM's pause in `wait` mode, on the trainer's side).

Failures travel: an exception in the thread (a server that died, a bad prompt) is raised by
`get` in the trainer, and `get` gives up after `timeout` seconds with an error that says what
it waited for. `close` stops the thread after the batch in progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class StaleBatch(RuntimeError):
    """A batch sampled by a policy older than `rollout.max_staleness` allows."""


class ProducerError(RuntimeError):
    """Generation failed in the producer thread, or did not deliver in time."""


class Producer(Generic[T]):
    """Runs `generate_step(s)` for s in [first, last) in a thread, each once the trainer has
    finished step s - max_staleness (`step_done`), and hands the results over in order (`get`)."""

    def __init__(
        self, generate_step: Callable[[int], T], first: int, last: int, max_staleness: int,
        timeout: float = 900.0,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self._generate_step = generate_step
        self._first, self._last, self._k = first, last, max_staleness
        self.timeout = timeout
        self._done = first  # steps the trainer has finished (synced)
        self._ready: dict[int, T] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lorasync-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in range(self._first, self._last):
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._done >= step - self._k)
                if self._stopped:
                    return
            try:
                item = self._generate_step(step)
            except BaseException as err:  # handed to the trainer by `get`
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[step] = item
                self._cond.notify_all()

    def get(self, step: int) -> tuple[T, float]:
        """The batch of `step` and how long the trainer waited for it (seconds)."""
        start = time.perf_counter()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: step in self._ready or self._error is not None, timeout=self.timeout
            )
            if step in self._ready:
                return self._ready.pop(step), time.perf_counter() - start
            if self._error is not None:
                raise ProducerError(
                    f"generating the batch of step {step + 1} failed: {self._error!r}"
                ) from self._error
            assert not ok
            raise ProducerError(
                f"no batch for step {step + 1} after {self.timeout:.0f} s: the engine did not "
                "answer (a server down or stuck?); the checkpoint of the last finished step is kept"
            )

    def step_done(self) -> None:
        """The trainer finished a step (its sync included): the next batch may start."""
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the batch in progress; wait up to `timeout` seconds for the thread (it is
        a daemon: a generation stuck in a dead server does not keep the process alive)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Producer[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
