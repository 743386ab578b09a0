"""peft_files and merge: save/load in PEFT's format and merge, against PEFT (from_pretrained, save_pretrained,
merge_and_unload) and against the transformed module itself."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import CONFIG_KWARGS, make_batch, make_model, peft_reference, randomize_lora_B, transform, transformed

from lorafa_fx import AdapterMismatchError, LoraFAConfig, load_adapter, merge, save_adapter
from lorafa_fx.errors import LoraFAError

EXAMPLE_SHAPE = (2, 12)
OTHER_SHAPE = (3, 9)


def _transform(name: str, model=None, **config):
    if model is None:
        model, gm = transformed(name, EXAMPLE_SHAPE, **{"r": 4, "lora_alpha": 8, **config})
    else:
        config = LoraFAConfig(**{"r": 4, "lora_alpha": 8, **CONFIG_KWARGS.get(name, {}), **config})
        gm = transform(model, example_inputs=make_batch(name, *EXAMPLE_SHAPE), config=config)
    randomize_lora_B(gm)
    _perturb_modules_to_save(gm)
    return model, gm


def _perturb_modules_to_save(module, prefix="", seed=3):
    # A trained head differs from the base model's; make the copy visibly different.
    g = torch.Generator().manual_seed(seed)
    cfg = module.lorafa.config if hasattr(module, "lorafa") else None
    for path in (cfg.modules_to_save or ()) if cfg else ():
        with torch.no_grad():
            for p in module.get_submodule(prefix + path).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(module, name, seed=7):
    module.eval()
    with torch.no_grad():
        return module(**make_batch(name, *OTHER_SHAPE, seed=seed)).logits


def _quiet_peft():
    return warnings.catch_warnings(action="ignore")


@pytest.mark.parametrize("name,config", [
    ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}}),
    ("gpt2", {}),
    ("roberta", {"use_rslora": True}),
])
def test_peft_from_pretrained_gives_same_logits(name, config, tmp_path):
    """Reference: peft.PeftModel.from_pretrained(base model, saved dir) — same logits as gm."""
    from peft import PeftModel

    model, gm = _transform(name, **config)
    save_adapter(gm, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == [a.path for a in gm.lorafa.adapters]
    with _quiet_peft():
        ref = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    torch.testing.assert_close(_logits(gm, name), _logits(ref, name), atol=2e-5, rtol=0)


def test_load_adapter_saved_by_peft(tmp_path):
    """Reference: a PEFT model (random A and B, trained head) saved with save_pretrained: after
    load_adapter, gm gives its logits."""
    from peft import LoraConfig, get_peft_model

    model = make_model("roberta")
    with _quiet_peft():
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"],
            rank_pattern={"query": 2}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(tmp_path / "peft")
    _, gm = _transform("roberta", model=model, rank_pattern={"query": 2})
    load_adapter(gm, tmp_path / "peft")
    torch.testing.assert_close(_logits(gm, "roberta"), _logits(ref, "roberta"), atol=2e-5, rtol=0)


def test_save_load_round_trip_keeps_parameters_and_optimizer_references(tmp_path):
    """Reference: the saved gm — a fresh transform (other seed, so other A) loads to its logits,
    in place (the Parameter objects an optimizer holds are the ones updated)."""
    _, gm = _transform("llama")
    save_adapter(gm, tmp_path / "a")
    _, other = _transform("llama", seed=9)
    params = {n: p for n, p in other.named_parameters()}
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(_logits(other, "llama"), _logits(gm, "llama"), atol=0, rtol=0)
    assert all(p is params[n] for n, p in other.named_parameters())
    assert not other.get_parameter(f"{gm.lorafa.adapters[0].path}.lora_A.weight").requires_grad


def test_mismatches_raise_listing_them(tmp_path):
    """Reference: the saved config's targets and r/alpha (PEFT's scaling alpha/r), compared by hand."""
    _, gm = _transform("llama", target_modules=["q_proj", "v_proj"])
    save_adapter(gm, tmp_path / "a")

    _, other = _transform("llama", target_modules=["q_proj", "v_proj", "o_proj"],
                          alpha_pattern={"layers.1.self_attn.v_proj": 16})
    with pytest.raises(AdapterMismatchError) as e:
        load_adapter(other, tmp_path / "a")
    msg = str(e.value)
    assert "adapted here but not in the file (2): model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj" in msg
    assert "model.layers.1.self_attn.v_proj: saved r=4, lora_alpha=8 (scaling 2); here r=4, lora_alpha=16 (scaling 4)" in msg
    assert msg.count("scaling") == 2  # only that module

    _, other_rank = _transform("llama", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    with pytest.raises(AdapterMismatchError) as e:
        load_adapter(other_rank, tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj: saved r=4" in str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight: saved shape (4, 64), here (8, 64)" in str(e.value)
    assert issubclass(AdapterMismatchError, LoraFAError)
    # Nothing was loaded: B is still the module's own.
    b = other_rank.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight")
    assert b.shape == (64, 8)


def _half_write(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 64)
    raise OSError("disk full (simulated)")


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    """Reference: the directory as it was before the failed save (absent, or byte-identical)."""
    import lorafa_fx.peft_files as peft_files

    _, gm = _transform("llama", target_modules=["q_proj"])
    target = tmp_path / "adapter"
    with monkeypatch.context() as m:
        m.setattr(peft_files, "save_file", _half_write)
        with pytest.raises(OSError, match="simulated"):
            save_adapter(gm, target)
    assert os.listdir(tmp_path) == []

    save_adapter(gm, target)
    (target / "tokenizer.json").write_text("{}")  # a file of the user's beside the adapter
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    randomize_lora_B(gm, seed=11)
    with monkeypatch.context() as m:
        m.setattr(peft_files, "save_file", _half_write)
        with pytest.raises(OSError, match="simulated"):
            save_adapter(gm, target)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["adapter"]

    save_adapter(gm, target)  # a successful overwrite keeps the user's file
    assert (target / "tokenizer.json").read_text() == "{}"
    assert (target / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_merge_equals_peft_merge_and_unload(name, tmp_path):
    """Reference: PEFT's merge_and_unload with the same A/B/head — same weights; and gm's logits
    before the merge. The merged model saves, reloads and generates like PEFT's."""
    model, gm = _transform(name)
    before = _logits(gm, name)
    ref = peft_reference(model, gm)
    for path in gm.lorafa.config.modules_to_save or ():
        with torch.no_grad():
            for (_, p), (_, q) in zip(ref.base_model.model.get_submodule(path).modules_to_save["default"].named_parameters(),
                                      gm.get_submodule(path).named_parameters()):
                p.copy_(q)
    with _quiet_peft():
        ref_merged = ref.merge_and_unload()

    merged = merge(gm, model)
    assert merged is model
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    ref_sd = ref_merged.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(merged, name), before, atol=2e-5, rtol=0)
    # gm shares W with the model: its B is zeroed, so it computes the merged model, not W + 2 BA.
    torch.testing.assert_close(_logits(gm, name), before, atol=2e-5, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, name), before, atol=2e-5, rtol=0)
    if name == "gpt2":
        ids = make_batch(name, 1, 5)["input_ids"]
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        merged.eval(), ref_merged.eval()
        assert torch.equal(merged.generate(ids, **kw), ref_merged.generate(ids, **kw))


def test_merge_into_another_model_leaves_gm_alone():
    """Reference: gm's own logits — merging into a separate copy of the base model reproduces them
    and leaves gm's B untouched; a quantised (non-float) weight is refused."""
    model, gm = _transform("llama")
    before = _logits(gm, "llama")
    other = copy.deepcopy(model)
    merge(gm, other)
    torch.testing.assert_close(_logits(other, "llama"), before, atol=2e-5, rtol=0)
    torch.testing.assert_close(_logits(gm, "llama"), before, atol=0, rtol=0)

    int8 = copy.deepcopy(model)
    w = int8.model.layers[0].self_attn.q_proj
    w.weight = torch.nn.Parameter(w.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(LoraFAError, match="model.layers.0.self_attn.q_proj: weight .* torch.int8"):
        merge(gm, int8)


def _tied_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=128, tie_word_embeddings=True))


@pytest.mark.parametrize("name,model_fn,targets,peft_targets", [
    ("qwen2", _tied_qwen2, ["q_proj", "lm_head"], ["q_proj", "lm_head"]),
    # a regex reaches the tied head too (PEFT's ".*" would also match non-linear modules, which it refuses)
    ("gpt2", lambda: make_model("gpt2"), ".*", ["c_attn", "c_proj", "c_fc", "lm_head"]),
])
def test_a_tied_head_warns_like_peft_and_merges_untied(name, model_fn, targets, peft_targets, tmp_path):
    """Reference: PEFT warns for the same config; the trained module's logits, which the merged model
    (and its saved and reloaded copy) must give; the untouched input embedding. Before, merge added
    the head's delta into the shared weight: the embedding changed too (logits off by up to 14.7)."""
    from peft import LoraConfig, get_peft_model

    model = model_fn()
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=peft_targets))
    tied = r"lm_head is adapted but its weight is tied to .*exclude_modules=\['lm_head'\]"
    with pytest.warns(UserWarning, match=tied):
        gm = transform(model, example_inputs=make_batch(name, *EXAMPLE_SHAPE),
                                 config=LoraFAConfig(r=4, lora_alpha=8, target_modules=targets))
    assert "lm_head" in {a.path for a in gm.lorafa.adapters}
    randomize_lora_B(gm)
    embedding_before, trained = embedding.detach().clone(), _logits(gm, name)

    with pytest.warns(UserWarning, match="merge untied lm_head from"):
        merged = merge(gm, model)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, embedding_before)
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(merged, name), trained, atol=2e-5, rtol=0)
    torch.testing.assert_close(_logits(gm, name), trained, atol=2e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, name), trained, atol=2e-5, rtol=0)
