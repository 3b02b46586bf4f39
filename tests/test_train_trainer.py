"""The trainer's small parts on their own: the cross-host `HostReport`, the non-finite streak, the JSONL truncation
shared by metrics.jsonl and the samples log. The whole loop runs in test_train_loop.py and test_train_hardening.py
(the multi-host agreement: test_multihost_two_processes_match_one, 2 processes with jax.distributed)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from glm41v_train.distributed import HostReport
from glm41v_train.metrics import truncate_jsonl
from glm41v_train.trainer import NonfiniteStreak


def test_host_report_round_trips_every_field():
    r = HostReport(preempted=True, exhausted=False, tokens=4096.0, slots=8192.0, flops=2.0**41, read_tokens=123456.0,
                   read_slots=200000.0, samples=77.0)
    vec = r.to_vector()
    assert vec.dtype == np.float32 and vec.shape == (len(dataclasses.fields(HostReport)),)
    assert HostReport.from_vector(vec) == r  # values a float32 holds exactly come back exactly
    big = HostReport.from_vector(dataclasses.replace(r, flops=3.5e12).to_vector()).flops
    assert big != 3.5e12 and abs(big - 3.5e12) / 3.5e12 < 1e-7  # others to float32's 7 digits (docstring)
    # each field has its own slot: changing one field changes exactly one entry
    for i, f in enumerate(dataclasses.fields(HostReport)):
        other = dataclasses.replace(r, **{f.name: (not getattr(r, f.name)) if f.type in (bool, "bool") else 1.0})
        diff = np.flatnonzero(other.to_vector() != vec)
        assert diff.tolist() == [i], f.name


def test_host_report_rejects_a_vector_of_another_width():
    with pytest.raises(ValueError, match=r"shape \(8,\), got \(7,\)"):
        HostReport.from_vector(np.zeros(7, np.float32))


def test_host_reports_combine_flags_with_any_and_sum_counts():
    a = HostReport(tokens=10.0, slots=16.0, flops=1e9, read_tokens=100.0, read_slots=160.0, samples=3.0)
    b = HostReport(preempted=True, tokens=6.0, slots=16.0, flops=2e9, read_tokens=50.0, read_slots=160.0, samples=2.0)
    c = HostReport(exhausted=True)
    got = HostReport.combine([a, b, c])
    assert got == HostReport(preempted=True, exhausted=True, tokens=16.0, slots=32.0, flops=3e9, read_tokens=150.0,
                             read_slots=320.0, samples=5.0)
    assert HostReport.combine([a, a]).preempted is False and HostReport.combine([a, a]).exhausted is False
    # through the vectors, as the all-gather carries them (one row per host)
    rows = np.stack([a.to_vector(), b.to_vector(), c.to_vector()])
    assert HostReport.combine(HostReport.from_vector(v) for v in rows) == got


def test_host_report_agree_on_one_process_is_the_report():
    r = HostReport(exhausted=True, tokens=5.0, samples=2.0)
    assert r.agree() == r


def test_nonfinite_streak_stops_past_the_patience_and_resets_on_a_finite_step():
    s = NonfiniteStreak(patience=1)
    recs = [{"step": i, "loss": v, "grad_norm": 1.0} for i, v in enumerate([1.0, math.nan, 2.0, math.inf, math.nan,
                                                                             math.nan], 1)]
    for rec in recs[:3]:
        s.observe(rec)
    assert s.run == 0 and s.first is None and s.stop is None and recs[1]["update_skipped"] is True
    assert "update_skipped" not in recs[0] and "update_skipped" not in recs[2]
    s.observe(recs[3])
    assert s.run == 1 and s.first == 4 and s.stop is None  # one in a row is within patience 1
    s.observe(recs[4])
    assert s.stop[:2] == (4, 5) and math.isnan(s.stop[2]) and s.stop[3] == 1.0
    s.observe(recs[5])
    assert s.stop[:2] == (4, 5)  # the first step past the patience is kept


def test_truncate_jsonl_keeps_the_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "log dir" / "metrics.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"step": i, "loss": 1.0}) for i in range(1, 6)]
    path.write_text("\n".join(lines[:4]) + "\n[1, 2]\n" + '{"step": 5, "lo')  # a non-object and a line cut by a kill
    truncate_jsonl(str(path), 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    truncate_jsonl(str(tmp_path / "missing.jsonl"), 3)  # no file: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
