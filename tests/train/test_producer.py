"""The asynchronous producer: batches in step order, none started before the trainer finished
step s - K, failures and silence handed to the trainer as errors that say what happened."""

import threading
import time

import pytest

from lorasync.train.producer import Producer, ProducerError


def run(k: int, steps: int = 6, train_seconds: float = 0.0):
    """Drive a producer like the trainer does; return (step, trainer steps done) per start."""
    done = [0]
    starts = []

    def generate_step(step):
        starts.append((step, done[0]))
        return f"batch {step}"

    with Producer(generate_step, 0, steps, k, timeout=5) as producer:
        for step in range(steps):
            batch, _ = producer.get(step)
            assert batch == f"batch {step}"
            time.sleep(train_seconds)
            done[0] += 1
            producer.step_done()
    return starts


@pytest.mark.timing  # "exactly k ahead" holds when generating is instant beside a 10 ms step: run alone
@pytest.mark.parametrize("k", [0, 1, 2])
def test_no_batch_starts_more_than_k_steps_ahead(k):
    starts = run(k, train_seconds=0.01)
    assert [s for s, _ in starts] == list(range(6))
    assert all(step - done <= k for step, done in starts), starts
    # generation is instant here, so the producer runs exactly k ahead once it can
    assert max(step - done for step, done in starts) == k


def test_a_failure_in_the_thread_reaches_the_trainer():
    def generate_step(step):
        if step == 1:
            raise ConnectionError("server http://127.0.0.1:9 went away")
        return step

    with Producer(generate_step, 0, 3, 1, timeout=5) as producer:
        assert producer.get(0)[0] == 0
        with pytest.raises(ProducerError, match="step 2 failed.*went away"):
            producer.get(1)


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_silence_is_an_error_within_the_bound():
    stuck = threading.Event()
    producer = Producer(lambda step: stuck.wait(), 0, 2, 0, timeout=0.3)
    start = time.perf_counter()
    with pytest.raises(ProducerError, match="no batch for step 1 after 0 s"):
        producer.get(0)
    assert time.perf_counter() - start < 2
    stuck.set()
    producer.close(timeout=2)


def test_close_stops_a_producer_waiting_for_the_trainer():
    producer = Producer(lambda step: step, 0, 10, 0, timeout=5)
    assert producer.get(0)[0] == 0  # step 1 waits for step_done, which never comes
    producer.close(timeout=2)
    assert not producer._thread.is_alive()
