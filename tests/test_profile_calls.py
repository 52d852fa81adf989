"""benchmarks/profile_calls.py runs end to end at tiny shapes on the CPU (GPU time is scarce: a script
that breaks there wastes a session's device minutes)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_calls  # noqa: E402


def test_smoke_report_lists_every_case_with_its_top_operators(tmp_path):
    out = tmp_path / "profile.md"
    profile_calls.main(["--smoke", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    labels = [r["case"] for r in report]
    assert len(labels) == 14 and any(label.startswith("vmoba selection") for label in labels)
    for r in report:
        assert r["ms"] > 0 and r["top"], r["case"]
        shares = [t["share"] for t in r["top"]]
        assert all(0 <= s <= 1 for s in shares) and shares == sorted(shares, reverse=True)
    text = out.read_text()
    assert text.count("#### ") == 14 and "| kernel | calls | ms | share |" in text


def test_set_flag_sets_a_kernel_boolean_and_names_bad_input(monkeypatch):
    import pytest

    import vgen.kernels.selection as selection

    monkeypatch.setattr(selection, "RADIX_COUNT", False)
    profile_calls.set_flag("selection.RADIX_COUNT=1")
    assert selection.RADIX_COUNT is True
    import vgen.kernels.block_sparse as block_sparse

    monkeypatch.setattr(block_sparse, "HEAVY_FIRST", None)  # an auto setting (None) takes 0 and 1 too
    profile_calls.set_flag("block_sparse.HEAVY_FIRST=0")
    assert block_sparse.HEAVY_FIRST is False
    for bad, message in (("selection.RADIX_COUNT=yes", "MODULE.FLAG=0|1"), ("selection.NOPE=1", "no boolean 'NOPE'")):
        with pytest.raises(SystemExit, match=message):
            profile_calls.set_flag(bad)
