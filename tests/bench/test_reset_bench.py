"""`pykvm bench`'s reset comparison (pykvm.bench.reset): Machine.reset() against a raw-C reset
of the same state and against destroying and re-creating the VM. The figures' shape and sanity
are asserted, never their values (wall-clock times move with the host's load)."""
import pytest

from pykvm import bench

pytestmark = pytest.mark.requires_arch("x86_64")

CONTENDERS = ("machine_reset", "raw_reset", "raw_reset_log_manual", "raw_reset_ring",
              "machine_recreate", "raw_recreate")


@pytest.mark.requires_kvm
def test_reset_figures_exist_and_are_sane(kvm):
    res = bench.reset(kvm, rounds=2, n=200, recreate=5)
    assert res["restored"] is True                  # RAM and registers back after each reset
    for name in CONTENDERS:
        s = res[name]["us"]
        assert s["n"] == (400 if "reset" in name else 10), name
        assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], (name, s)
    for ratio in ("reset_vs_raw", "recreate_vs_reset", "raw_recreate_vs_reset"):
        r = res[ratio]
        assert r["n"] == 2 and 0 < r["min"] <= r["median"] <= r["max"], (ratio, r)
    assert res["pages_per_reset"] == bench.RESET_PAGES
    assert res["ioctls_per_reset"]["machine_reset"] == res["ioctls_per_reset"]["raw_reset"] == 11


@pytest.mark.requires_kvm
def test_reset_guest_dirties_the_pages_it_says(kvm):
    """The reset guest writes RESET_PAGES pages, so every reset copies that many back."""
    with bench._reset_machine(kvm) as m:
        m.checkpoint()
        for _ in range(3):
            bench._run_to_exit(m)
            assert m.reset() >= bench.RESET_PAGES
            assert m.memory.read(bench.RESET_DS * 16, 4096 * bench.RESET_PAGES) == \
                bytes(4096 * bench.RESET_PAGES)
