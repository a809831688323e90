"""A SIGINT/SIGTERM whose KeyboardInterrupt lands in a finalizer (and is dropped there) still stops
the run at the next :func:`awp_jax.interrupts.check` (the CLI's kill-and-resume test is in test_pipeline)."""

import os
import signal

import pytest

from awp_jax import interrupts


class _KillsItselfWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # bytecodes at which the handler runs, inside the finalizer
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_by_a_finalizer_is_raised_again_at_the_next_check():
    before = signal.getsignal(signal.SIGTERM)
    reached = False
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
        with interrupts.handled():
            interrupts.check()  # nothing pending yet
            obj = _KillsItselfWhenCollected()
            del obj  # the handler's KeyboardInterrupt is raised in __del__ and printed as "Exception ignored"
            reached = True  # so the code goes on, as a run would
            interrupts.check()
    assert reached
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    interrupts.check()  # and nothing stays pending after the block


def test_a_signal_outside_a_finalizer_raises_where_it_lands():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.handled():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass
            pytest.fail("the signal did not interrupt the loop")
