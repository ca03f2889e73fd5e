"""The ingress repeats a model call whose replica was lost, a bounded number of times (no Ray
cluster: a stand-in handle method; tests/test_node_loss.py shows it on a real lost node)."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from facedist.serving.ingress import call_with_replica_retries


class FailingMethod:
    """A handle method whose first `failures` calls fail as a lost replica's do."""

    def __init__(self, failures: int, error: type[Exception]):
        self.failures, self.error, self.calls = failures, error, 0

    def remote(self, *args):
        self.calls += 1

        async def answer():
            if self.calls <= self.failures:
                raise (self.error("replica unreachable", None) if self.error is ActorUnavailableError
                       else self.error())
            return args

        return answer()


def _call(method, *args, retries: int = 3):
    return asyncio.run(call_with_replica_retries(method, args, retries, backoff_s=0.0))


@pytest.mark.parametrize("error,failures", [(ActorUnavailableError, 2), (ActorDiedError, 1)])
def test_a_call_that_reached_a_lost_replica_is_sent_again(error, failures):
    method = FailingMethod(failures=failures, error=error)
    assert _call(method, "row", retries=3) == ("row",)
    assert method.calls == failures + 1


def test_a_call_whose_replica_died_under_it_is_repeated_once_at_most():
    # A request that crashes its replica itself must not take down every replica in turn.
    method = FailingMethod(failures=10, error=ActorDiedError)
    with pytest.raises(ActorDiedError):
        _call(method, "row", retries=3)
    assert method.calls == 2


def test_the_repeats_are_bounded_and_then_the_error_is_raised():
    method = FailingMethod(failures=10, error=ActorUnavailableError)
    with pytest.raises(ActorUnavailableError):
        _call(method, "row", retries=2)
    assert method.calls == 3


def test_negative_repeats_are_refused_by_the_settings():
    from facedist.serving.settings import ServeSettings

    with pytest.raises(ValueError, match="replica_retries"):
        ServeSettings(replica_retries=-1)


def test_no_repeats_when_turned_off():
    method = FailingMethod(failures=1, error=ActorUnavailableError)
    with pytest.raises(ActorUnavailableError):
        _call(method, retries=0)
    assert method.calls == 1


def test_other_errors_are_not_repeated():
    method = FailingMethod(failures=1, error=ValueError)
    with pytest.raises(ValueError):
        _call(method)
    assert method.calls == 1
