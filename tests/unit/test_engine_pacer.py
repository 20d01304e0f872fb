"""The resync pacer backs off while the VM's writes suffer and recovers when they don't."""

from tandem.engine.pacer import FLOOR_US, ResyncPacer

MiB = 1 << 20


def test_idle_vm_gets_the_full_rate():
    p = ResyncPacer(4 * MiB, 100 * MiB, baseline_us=300)
    assert all(p.tick(0, 0) == 100 * MiB for _ in range(10))


def test_slow_foreground_halves_the_rate_down_to_the_floor_then_recovers():
    p = ResyncPacer(4 * MiB, 100 * MiB, baseline_us=1500)      # target 3 ms
    rates = [p.tick(10 * 5000, 10) for _ in range(10)]          # 5 ms average: too slow
    assert rates[:3] == [50 * MiB, 25 * MiB, 12.5 * MiB]
    assert rates[-1] == 4 * MiB                                 # never below resync_rate_min
    rates = [p.tick(10 * 1000, 10) for _ in range(30)]          # 1 ms: fine again
    assert rates == sorted(rates) and rates[-1] == 100 * MiB
    assert p.backoffs == 10


def test_target_has_a_floor_for_very_fast_baselines():
    p = ResyncPacer(4 * MiB, 100 * MiB, baseline_us=50)
    assert p.target_us == FLOOR_US
    assert p.tick(10 * (FLOOR_US - 1), 10) == 100 * MiB
