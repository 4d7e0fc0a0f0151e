"""pykvm.testing.wait_until: the tests' poll-until-true hang guard always ends."""
import pytest

from pykvm.testing import wait_until


# -- pykvm.testing.wait_until: a hang guard that always ends ---------------------------------------
def test_wait_until_returns_once_true_and_raises_after_its_limit():
    calls = []
    wait_until(lambda: calls.append(1) or len(calls) >= 3, "three polls", timeout=5)
    assert len(calls) == 3
    with pytest.raises(AssertionError, match="gave up waiting: never"):
        wait_until(lambda: False, "never", timeout=0.05)


@pytest.mark.parametrize("kw", [{"timeout": float("nan")}, {"timeout": float("inf")},
                                {"timeout": -1}, {"timeout": None}, {"interval": 0},
                                {"interval": float("nan")}, {"interval": -0.1}])
def test_wait_until_refuses_limits_that_would_not_guard(kw):
    with pytest.raises(ValueError):
        wait_until(lambda: False, "x", **kw)
