"""Every benchmark's smoke run (``python -m bench <name> --smoke``, in-process): the JSON it writes
carries the run's command, commit, date and machine, and its figures agree with an independent
reference where one is cheap (`lorafa_fx.estimate`, MemTracker's measured peak, PEFT's trainable
count, the loss of an untrained model, git itself). And bench/RESULTS.md is what ``python -m
bench report`` makes of the committed bench/results/."""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import statistics
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import transform

import lorafa_fx
from bench import BENCHES, _report
from bench.__main__ import main
from lorafa_fx import zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _shared_captures():
    """The benches' `lorafa_fx.transform` is the suite's (conftest's `transform`: the same
    pipeline on a capture shared across tests): a bench transforms one model once per method
    and budget, and these smoke runs check what the benches make of the plans, not capture."""
    real, lorafa_fx.transform = lorafa_fx.transform, transform
    yield
    lorafa_fx.transform = real


def smoke(name: str, out: Path, *extra: str) -> dict:
    """Run bench `name` in its smoke mode; its JSON as written, after the checks every bench shares."""
    main([name, "--smoke", "--out", str(out), *extra])
    record = json.loads((out / f"{name}.json").read_text())
    assert record["bench"] == name
    assert record["command"].endswith(" ".join(["python -m bench", name, "--smoke", "--out", str(out), *extra]))
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    head = git.stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    when = datetime.datetime.strptime(record["date_utc"], "%Y-%m-%d %H:%M").replace(tzinfo=datetime.timezone.utc)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=30)
    m = record["machine"]
    assert (m["torch"], m["cores"], m["device"]) == (torch.__version__, os.cpu_count(), "cpu") and m["cpu"]
    assert record["args"]["smoke"] is True and record["wall_s"] > 0
    return record["result"]


def test_listing_names_every_bench(capsys):
    """The listing (the reference: `BENCHES`) has one line per bench."""
    main([])
    listing = capsys.readouterr().out.partition("benches:\n")[2]
    listed = [line.split()[0] for line in listing.splitlines()]
    assert listed == list(BENCHES)


def test_methods(tmp_path):
    """Reference: PEFT LoRA with A frozen trains the same B matrices (same count); MemTracker's
    peak of the same step (a dispatch-mode count) against the CPU allocator's; the planned row
    keeps fewer activations than the unplanned one."""
    result = smoke("methods", tmp_path)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"peft_lora_fa", "lorafa_fx", "lorafa_fx_budget60"}
    assert rows["lorafa_fx"]["trainable"] == rows["peft_lora_fa"]["trainable"]
    for r in rows.values():
        assert r["peak_bytes"] == pytest.approx(r["peak_memtracker_bytes"], rel=0.05)
        assert len(r["times_s"]) == 2 and r["step_ms"] == pytest.approx(1e3 * statistics.median(r["times_s"]))
    assert rows["lorafa_fx_budget60"]["saved_bytes"] < rows["lorafa_fx"]["saved_bytes"]
    assert rows["lorafa_fx_budget60"]["budget_bytes"] >= 0.6 * rows["lorafa_fx"]["peak_bytes"]


def test_cost_model(tmp_path):
    """Reference: `lorafa_fx.estimate` of the same config and shape (its own capture and composed
    simulation); LoRA's peak is LoRA-FA's plus at least AdamW's states of every lora_A (hand-computed)."""
    (row,) = smoke("cost_model", tmp_path)["rows"]
    plan = lorafa_fx.estimate(copy.deepcopy(zoo.make_model("llama", "test").config), batch_size=2, seq_len=16,
                              config=lorafa_fx.LoraFAConfig(r=8, lora_alpha=16), dtype=torch.float32)
    assert row["peak_lora_fa_bytes"] == plan.predicted_peak_bytes
    assert row["activations_lora_fa_bytes"] == plan.saved_activation_bytes
    # lora_A is (r, in) per linear: q, k, v, o, gate, up take hidden 64, down intermediate 112; 2 layers, fp32.
    a_bytes = 2 * (6 * 64 + 112) * 8 * 4
    assert row["peak_lora_bytes"] - row["peak_lora_fa_bytes"] >= 2 * a_bytes  # AdamW's two states of A, at least
    assert row["fp32_logits_bytes"] == 2 * 16 * zoo.VOCAB * 4


@pytest.mark.slow
def test_planner(tmp_path):
    """Reference: the CPU allocator's measured peak of the planned step against the plan's
    prediction (within 5%, as tests/test_estimate_memory.py asserts), and FlopCounterMode's count
    of HF checkpointing's recompute (> 0)."""
    rows = smoke("planner", tmp_path)["rows"]
    plain, hf, ours = rows
    assert plain["recompute_pct"] == 0 and hf["recompute_pct"] > 0
    assert ours["peak_bytes"] == pytest.approx(ours["predicted_peak_bytes"], rel=0.05)
    assert ours["budget_bytes"] >= hf["peak_bytes"] and ours["predicted_peak_bytes"] <= ours["budget_bytes"]


def test_plan_time(tmp_path):
    """Reference: `lorafa_fx.estimate` of the same arguments in this process."""
    (row,) = smoke("plan_time", tmp_path)["plans"]
    plan = lorafa_fx.estimate(copy.deepcopy(zoo.make_model("llama", "test").config), batch_size=2, seq_len=16,
                              config=lorafa_fx.LoraFAConfig(r=8, lora_alpha=16))
    assert row["predicted_peak_bytes"] == plan.predicted_peak_bytes
    assert row["blocks"] == 2
    assert row["decisions"] == dict(Counter(str(d) for d in plan.recompute_by_block.values()))
    assert not set(row["decisions"]) - {"keep"}  # unplanned: no block decides anything else
    assert 0 < row["plan_wall_s_median"] < row["runs"][0]["process_wall_s"]
    assert 100e6 < row["peak_rss_bytes_max"] < 4e9  # a torch process, not this one's figure


def test_optimizer(tmp_path):
    """Reference: a Llama layer has seven linears (q, k, v, o, gate, up, down), each adapted."""
    result = smoke("optimizer", tmp_path)
    assert result["model"]["adapters"] == 7 * result["model"]["layers"] == 14
    for side in ("ours", "peft_bf16", "peft_fp32"):
        assert result["step_ms"][side] == pytest.approx(1e3 * statistics.median(result["raw_s"]["step"][side]))


def test_convergence(tmp_path):
    """Reference: before its first update the model is the untrained base (lora_B is zero):
    both runs of a pair see the same first loss, about log(vocabulary) for near-uniform logits."""
    result = smoke("convergence", tmp_path)
    with_, without = (r["train"] for r in result["runs"])
    assert with_[0] == without[0]
    assert with_[0] == pytest.approx(math.log(zoo.VOCAB), abs=0.1)
    assert result["checkpoints"] == [1, 2, 3, 4, 5, 6] and result["pairs"] == 1


def test_eager_step(tmp_path):
    """Reference: the ratios recomputed from the per-step times the JSON keeps."""
    result = smoke("eager_step", tmp_path)
    for clock in ("wall", "cpu"):
        d = result[clock]
        assert len(d["method_s"]) == len(d["against_s"]) == 2
        assert d["paired_ratio_median"] == pytest.approx(
            statistics.median(o / a for a, o in zip(d["against_s"], d["method_s"])))


def test_gpu_on_cpu(tmp_path):
    """Reference: MemTracker's measured peak of the step against the plan's prediction (within
    5%, as tests/test_estimate_memory.py asserts)."""
    rows = smoke("gpu", tmp_path, "--methods", "lorafa_fx", "peft_lora_fa", "--warmup", "1", "--steps", "1")["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("lorafa_fx", "ok"), ("peft_lora_fa", "ok")]
    assert rows[0]["allocated_over_predicted"] == pytest.approx(1.0, abs=0.05)


def test_results_md_is_generated_from_the_saved_json():
    """Reference: the committed bench/RESULTS.md itself; a bench without saved JSON is "not run"."""
    results = ROOT / "bench" / "results"
    text = _report.render(results)
    assert text == (ROOT / "bench" / "RESULTS.md").read_text()
    for name in BENCHES:
        assert f"## {name}:" in text
        if not (results / f"{name}.json").exists():
            assert f"**Not run.** Run `python -m bench {name} --save`" in text


def test_moe(tmp_path):
    """Reference: `lorafa_fx.estimate` of the tiny Mixtral (LoRA-FA on its experts); the frozen
    experts keep no more than LoRA-FA's, and keeping x (PEFT-style) keeps more."""
    rows = {r["method"]: r for r in smoke("moe", tmp_path)["rows"]}
    plan = lorafa_fx.estimate(copy.deepcopy(zoo.make_model("mixtral").config), batch_size=2, seq_len=16,
                              config=lorafa_fx.LoraFAConfig(r=16, lora_alpha=32), dtype=torch.bfloat16)
    assert rows["lora-fa experts"]["saved_activations"] == plan.saved_activation_bytes
    assert rows["experts frozen"]["saved_activations"] <= rows["lora-fa experts"]["saved_activations"]
    assert rows["peft-style (keeps x)"]["saved_activations"] > rows["lora-fa experts"]["saved_activations"]


def test_floor(tmp_path):
    """Reference: `lorafa_fx.estimate` of the tiny Llama on the H100 profile: the floor is its
    InfeasibleBudgetError's smallest budget, and a budget's row is its plan."""
    (model,) = smoke("floor", tmp_path)["models"].values()
    below, under = model["rows"]
    config, lora = copy.deepcopy(zoo.make_model("llama").config), lorafa_fx.LoraFAConfig(r=64, lora_alpha=128)
    h100 = lorafa_fx.PlanConfig(device="h100")
    with pytest.raises(lorafa_fx.InfeasibleBudgetError) as e:
        lorafa_fx.estimate(config, batch_size=2, seq_len=64, config=lora, budget="1kB", plan=h100)
    assert not below["feasible"] and below["min_budget_bytes"] == e.value.min_budget_bytes
    plan = lorafa_fx.estimate(config, batch_size=2, seq_len=64, config=lora, budget="2MB", plan=h100)
    assert under["feasible"] and under["predicted_peak_bytes"] == plan.predicted_peak_bytes <= 2 * 10**6
    assert under["overhead_pct"] == pytest.approx(plan.overhead_pct)
