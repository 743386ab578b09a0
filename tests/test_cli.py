"""python -m lorafa_fx plan: plans from a preset or a config.json, without weights."""

from __future__ import annotations

import json

import pytest
from conftest import make_model

from lorafa_fx.__main__ import main


def test_plan_from_a_config_json_prints_json(tmp_path, capsys):
    """Reference: the plan estimate() gives for the same config and shape."""
    import torch

    import lorafa_fx

    make_model("llama").config.save_pretrained(tmp_path)
    assert main(["plan", "--config", str(tmp_path), "--batch", "2", "--seq", "16", "--rank", "4",
                 "--dtype", "fp32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = make_model("llama").config
    expected = lorafa_fx.estimate(cfg, batch_size=2, seq_len=16, dtype=torch.float32,
                                  config=lorafa_fx.LoraFAConfig(r=4, lora_alpha=8))
    assert printed["predicted_peak_bytes"] == expected.predicted_peak_bytes
    assert printed["batch_shape"]["input_ids"] == [2, 16]


def test_plan_with_an_impossible_budget_says_the_minimum(tmp_path, capsys):
    make_model("llama").config.save_pretrained(tmp_path)
    assert main(["plan", "--config", str(tmp_path), "--batch", "2", "--seq", "16", "--budget", "1kB"]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err


def test_unknown_config_lists_the_presets(capsys):
    assert main(["plan", "--config", "llama-9000", "--batch", "1", "--seq", "8"]) == 2
    assert "llama-2-7b" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB" in capsys.readouterr().out
