"""benchmarks/attention.py's report (it needs a GPU to time anything): the ratios it prints are computed from
the timings it was given, a failed variant shows its error, and a mismatch against Flex hides the speedups."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import attention  # noqa: E402

META = {"date": "d", "commit": "c", "gpu": "g", "command": "python benchmarks/attention.py", "torch": "t",
        "triton": "tr"}  # fmt: skip


def row(**changes):
    base = {"shape": "wan1.3b-480p", "mask": "local-3D", "density": 0.25, "window": (2, 3, 4), "err_vs_flex": 1e-3,
            "ours_fwd_ms": 2.0, "flex_fwd_ms": 2.6, "ours_fwd_bwd_ms": 10.0, "flex_fwd_bwd_ms": 12.6,
            "ours_fwd_tflops": 500.0, "flex_fwd_tflops": 400.0, "ours_fwd_bwd_tflops": 350.0, "linearity": 1.02,
            "mask_build_ms": 0.004, "mask_build_host_ms": 0.08, "mask_cached_ms": 0.001}  # fmt: skip
    return {**base, **changes}


def cells(text: str, prefix: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_come_from_the_timings():
    text = attention.markdown(META, [], [], [row()])
    c = cells(text, "| wan1.3b-480p | local-3D")
    assert c[5] == "1.30x"  # forward: 2.6 / 2.0
    assert c[10] == "1.26x"  # forward+backward: 12.6 / 10.0
    assert c[11] == "1.25x"  # backward alone: (12.6 - 2.6) / (10.0 - 2.0)
    assert c[12].startswith("4.0 us (0.20%); host 80 us")


def test_mismatch_hides_speedups():
    c = cells(attention.markdown(META, [], [], [row(err_vs_flex=0.5)]), "| wan1.3b-480p | local-3D")
    assert c[5] == c[10] == c[11] == "MISMATCH"


def test_variant_tables_show_times_and_errors():
    labels = [f"{name} d{density}" for name, density in attention.SWEEP_CASES]
    sweep = [{"kernel": "fwd", "tiles": (128, 128, 8, 3), "tma": True,
              "ms": {x: 1.5 + i for i, x in enumerate(labels)}},
             {"kernel": "fwd", "tiles": (64, 64, 4, 3), "tma": False,
              "error": "out of resource"}]  # fmt: skip
    backward = [{"kernel": "dq", "tiles": (128, 64, 8, 2), "ms": {str(d): 7.0 for d in attention.BWD_CASES}}]
    text = attention.markdown(META, sweep, [], [], backward)
    assert cells(text, "| fwd | (128, 128, 8, 3)") == ["fwd", "(128, 128, 8, 3)", "True",
                                                         "1.50", "2.50", "3.50", "4.50"]
    assert cells(text, "| fwd | (64, 64, 4, 3)")[3] == "failed: out of resource"
    assert cells(text, "| dq | (128, 64, 8, 2)")[2:] == ["7.00"] * len(attention.BWD_CASES)


def test_ab_table_shows_ratios_and_round_ranges():
    import ab_forward

    row = {"shape": "wan1.3b-480p", "mask": "local-3D", "density": 0.1, "err_on_vs_off": 0.0, "off_ms": 2.0,
           "on_ms": 1.9, "flex_ms": 2.4, "off_rounds": [2.0, 2.1, 1.9], "on_rounds": [1.9, 1.8, 2.0],
           "flex_rounds": [2.4] * 3}  # fmt: skip
    meta = {**META, "rounds": 3}
    text = ab_forward.markdown("USE_TMA", meta, [row])
    assert cells(text, "| wan1.3b-480p") == ["wan1.3b-480p", "local-3D", "0.100", "2.00 (1.90-2.10)",
                                             "1.90 (1.80-2.00)", "0.950", "2.40 (2.40-2.40)", "1.200x", "1.263x",
                                             "0.0e+00"]  # fmt: skip


def test_quality_settings_keep_the_plain_variant_at_the_same_density():
    """rectified_psa --set: a selection size (rectified.mass) goes to both variants, a correction setting only
    to the method's own."""
    import rectified_psa

    base = (rectified_psa.QualityRun("rectified", {"mass": 0.7}, {"mass": 0.7, "rectify_kept": False}, {}),)
    (run,) = rectified_psa.quality_runs(base, None, ["rectified.mass=0.9", "rectified.spread_shift=true"])
    assert run.config == {"mass": 0.9, "spread_shift": True}
    assert run.plain == {"mass": 0.9, "rectify_kept": False}


def test_rectified_verdict_takes_the_times_at_part_3s_setting():
    import rectified_psa

    def quality(mass):
        return {"rows": [{"method": "rectified", "variant": v, "psnr": p, "clip_psnr": [p, p], "config": {"mass": mass}}
                         for v, p in (("plain", 20.0), ("rectified", 21.0))]}  # fmt: skip

    real = {"rectified_summary": [{"mass": m, "rectified_extra_pct": e} for m, e in ((0.7, 18.0), (0.9, 10.0))],
            "psa_summary": []}
    (line, _) = rectified_psa.verdict({"quality": quality(0.9), "real": real})
    assert "+10.0% (mass 0.9)" in line and line.endswith("| yes |")
    (line, _) = rectified_psa.verdict({"quality": quality(0.7), "real": real})
    assert "+18.0% (mass 0.7)" in line and line.endswith("| **no** |")
    (line, _) = rectified_psa.verdict({"quality": quality(0.9)})  # no times measured: not a full verdict
    assert line.endswith("| PSNR only: yes |")


def test_rectified_psa_measures_each_method_at_its_default_setting():
    """Parts 2-3 and the verdict take the selection size from the methods' configs, and part 1's sweep has it."""
    import rectified_psa

    from vgen.attention import PSAConfig, RectifiedConfig

    mass, budget = RectifiedConfig().mass, PSAConfig().budget
    for sizes in (rectified_psa.gpu_sizes(), rectified_psa.smoke_sizes()):
        assert (sizes.shape_mass, sizes.shape_budget) == (mass, budget)
        assert mass in sizes.masses and budget in sizes.budgets and list(sizes.budgets) == sorted(sizes.budgets)
        runs = {run.method: run for run in sizes.quality}
        if "rectified" in runs:  # (the smoke run's part 3 has psa only)
            assert runs["rectified"].config["mass"] == runs["rectified"].plain["mass"] == mass
        assert runs["psa"].config["budget"] == runs["psa"].plain["budget"] == budget


def test_schedule_model_list_schedules_and_orders_heaviest_first():
    """benchmarks/schedule_model.py: greedy list scheduling onto free SMs, against sums worked by hand, and the
    heaviest-first order within each head."""
    import schedule_model
    import torch

    # 2 SMs, no fixed cost: in order 3 | 1, 1, 1 -> both end at 3; in order 1, 1, 1, 3 -> 1+1 then 1+3: 4
    assert schedule_model.makespan([3, 1, 1, 1], 2, 0.0, 1.0) == 3.0
    assert schedule_model.makespan([1, 1, 1, 3], 2, 0.0, 1.0) == 4.0
    assert schedule_model.makespan([2, 2], 1, 0.5, 1.0) == 5.0  # one SM: (0.5 + 2) x 2
    orders = schedule_model.launch_orders(torch.tensor([[1, 3, 2]]), heads=2)
    assert orders["index order"] == [1, 3, 2, 1, 3, 2]
    assert orders["heaviest first per head"] == [3, 2, 1, 3, 2, 1]
