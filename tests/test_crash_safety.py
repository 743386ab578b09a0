"""Saves a crash interrupts (atomic_dir.py, peft_files.save_adapter): a process SIGKILLed at any
point of a save leaves a loadable adapter, whole (never half of two saves); the next save or load
of that path removes what the crash left beside it, and a crash between the swap's two renames
loses nothing. A symlinked adapter directory stays a link. Each save is a forked child of this
process, so a kill costs no import or capture."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from conftest import transformed

import lorafa_fx

FORK = multiprocessing.get_context("fork")
KILLS = 25


@pytest.fixture(scope="module")
def gm():
    return transformed("llama", (2, 8), r=4, target_modules=["q_proj", "v_proj", "down_proj"])[1]


def _fill(gm, version: float) -> None:
    """Every lora_B holds `version`: a loaded adapter shows which save it is, and that it is whole."""
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            gm.get_parameter(f"{a.path}.lora_B.weight").fill_(version)


def _loaded_version(gm, path) -> float:
    """Reference: the value `_fill` wrote; one value across every lora_B, or the load mixed two saves."""
    lorafa_fx.load_adapter(gm, path)
    values = {v for a in gm.lorafa.adapters for v in gm.get_parameter(f"{a.path}.lora_B.weight").unique().tolist()}
    assert len(values) == 1, values
    return values.pop()


def _hidden(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def _save_forever(gm, path, first: int) -> None:
    for version in range(first, first + 10**6):
        _fill(gm, version)
        lorafa_fx.save_adapter(gm, path)


def _killed_after(seconds: float, target, *args) -> None:
    child = FORK.Process(target=target, args=args)
    child.start()
    time.sleep(seconds)
    os.kill(child.pid, signal.SIGKILL)
    child.join()  # reaped: a zombie's pid still looks alive


def test_sigkill_at_random_points_of_repeated_saves_leaves_a_whole_adapter_and_no_leftover(gm, tmp_path):
    path = tmp_path / "adapter"
    _fill(gm, 0)
    lorafa_fx.save_adapter(gm, path)
    (path / "tokenizer.json").write_text("{}")  # the user's file beside the adapter, carried by every save
    rng, version, left_by_kills = random.Random(0), 0, []
    for kill in range(1, KILLS + 1):
        first = 1000 * kill
        _killed_after(rng.uniform(0.0, 0.3), _save_forever, gm, path, first)
        left_by_kills.append(len(_hidden(tmp_path)))
        loaded = _loaded_version(gm, path)  # the load also removes the dead child's leftovers
        assert loaded == version or first <= loaded < first + 1000, (kill, loaded)
        assert _hidden(tmp_path) == [] and (path / "tokenizer.json").read_text() == "{}"
        version = -kill
        _fill(gm, version)
        lorafa_fx.save_adapter(gm, path)
        assert _hidden(tmp_path) == [] and _loaded_version(gm, path) == version
    assert sum(left_by_kills) > 0, "no kill landed inside a save: the test did not exercise a crash"


def _die_between_the_two_renames(gm, path) -> None:
    replace = os.replace

    def replace_or_die(src, dst):
        if os.fspath(dst) == os.fspath(path):  # the new directory's rename: the old one is already aside
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    os.replace = replace_or_die  # this forked child's os module only
    _fill(gm, 2)
    lorafa_fx.save_adapter(gm, path)


@pytest.mark.parametrize("then", ["load", "save"])
def test_a_crash_between_the_two_renames_loses_nothing(gm, tmp_path, then):
    """Reference: the adapter saved before (version 1) and the user's file beside it. Before, the
    path was left absent and load_adapter said "holds no adapter" without pointing at the .old copy."""
    path = tmp_path / "adapter"
    _fill(gm, 1)
    lorafa_fx.save_adapter(gm, path)
    (path / "tokenizer.json").write_text("{}")
    child = FORK.Process(target=_die_between_the_two_renames, args=(gm, path))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL and not path.exists()
    assert sorted(name.rsplit(".", 1)[1] for name in _hidden(tmp_path)) == ["old", "tmp"]
    if then == "load":
        assert _loaded_version(gm, path) == 1
    else:
        _fill(gm, 3)
        lorafa_fx.save_adapter(gm, path)
        assert _loaded_version(gm, path) == 3
    assert _hidden(tmp_path) == [] and (path / "tokenizer.json").read_text() == "{}"


def test_a_symlinked_directory_stays_a_link_and_receives_the_adapter(gm, tmp_path):
    """Reference: the version saved, read through the link and from the target. Before, the link was
    replaced by a real directory and the target kept the old adapter."""
    (tmp_path / "disk").mkdir()
    target, link = tmp_path / "disk" / "adapter", tmp_path / "adapter"
    target.mkdir()
    link.symlink_to(target, target_is_directory=True)
    for version in (1, 2):
        _fill(gm, version)
        lorafa_fx.save_adapter(gm, link)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert _loaded_version(gm, target) == _loaded_version(gm, link) == version
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "disk") == []


def test_a_save_under_way_in_a_live_process_is_not_cleaned_up(gm, tmp_path):
    """A leftover's pid tells a crashed save from one another process is making: this process's own
    (a live pid) is kept, a dead one's removed."""
    path = tmp_path / "adapter"
    live = tmp_path / f".adapter.{os.getpid()}.abc.tmp"
    dead = tmp_path / ".adapter.999999999.abc.tmp"  # above Linux's pid_max: never a live process
    live.mkdir(), dead.mkdir()
    lorafa_fx.save_adapter(gm, path)
    assert live.exists() and not dead.exists()
