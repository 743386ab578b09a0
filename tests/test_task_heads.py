"""Task heads (targets.py, `LoraFAConfig.task_type`): a classifier's or QA model's new head is
trained in full and gets no adapter, as PEFT's task models do; the task is inferred from the
model class when not given; adapter files carry it both ways with PEFT.

References: PEFT 0.21's ``get_peft_model`` with ``LoraConfig(task_type=..., target_modules=
"all-linear")`` on the same model (its LoRA layers and its ``modules_to_save`` parameters), and
PEFT's ``save_pretrained`` / ``PeftModel.from_pretrained`` (logits).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import make_batch, make_task_model, transform, transformed

from lorafa_fx import LoraFAConfig, load_adapter, save_adapter
from lorafa_fx.errors import ConfigError
from lorafa_fx.targets import infer_task_type, resolve_task, select_adapters

SHAPE = (2, 8)
#: The heads a PEFT user lists in modules_to_save for these tasks: PEFT 0.21 adds them itself only after
#: injecting LoRA (peft_model.py, PeftModelForTokenClassification / ...QuestionAnswering), so with
#: "all-linear" it adapts the head and then raises TypeError wrapping it. SEQ_CLS needs nothing.
_PEFT_USER_HEADS = {"TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}

CASES = [
    ("llama", "ForSequenceClassification", "SEQ_CLS"),
    ("llama", "ForCausalLM", "CAUSAL_LM"),
    ("gpt2", "ForTokenClassification", "TOKEN_CLS"),
    ("gpt2", "LMHeadModel", "CAUSAL_LM"),
    ("t5", "ForQuestionAnswering", "QUESTION_ANS"),
    ("t5", "ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("bert", "ForSequenceClassification", "SEQ_CLS"),
    ("bert", "ForTokenClassification", "TOKEN_CLS"),
    ("roberta", "ForSequenceClassification", "SEQ_CLS"),
    ("roberta", "ForQuestionAnswering", "QUESTION_ANS"),
    ("deberta-v2", "ForSequenceClassification", "SEQ_CLS"),
    ("deberta-v2", "ForQuestionAnswering", "QUESTION_ANS"),
]


def _peft(model, task_type, **extra):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(action="ignore"):
        return get_peft_model(copy.deepcopy(model), LoraConfig(
            task_type=task_type, target_modules="all-linear", r=8, lora_alpha=8,
            modules_to_save=_PEFT_USER_HEADS.get(task_type), **extra))


def _peft_sets(ref) -> tuple[set[str], dict[str, torch.Tensor]]:
    """PEFT's adapted module paths and its fully trained parameters (by the model's names)."""
    adapted = {n.removeprefix("base_model.model.").split(".lora_A.")[0] for n, _ in ref.named_parameters()
               if ".lora_A." in n}
    trained = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", ""): p
               for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n}
    return adapted, trained


def _same_adapters(gm, ref) -> None:
    """PEFT's lora_A set to gm's, both lora_B to one random draw; both in eval mode."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            b = gm.get_parameter(f"{a.path}.lora_B.weight")
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            layer.lora_B["default"].weight.copy_(b)
    gm.eval(), ref.eval()


@pytest.mark.parametrize("name, head, task_type", CASES)
def test_adapted_set_and_trained_heads_equal_peft(name, head, task_type):
    """Reference: PEFT with the task type lorafa_fx inferred from the class (the config gives none):
    the same adapted linears, the same parameters trained in full (a copy of the head's own values),
    and, with the same lora_A/lora_B, the same eval logits."""
    model, gm = transformed(name, SHAPE, head=head, r=8, lora_alpha=8)
    assert gm.lorafa.config.task_type == task_type
    ref = _peft(model, task_type)
    adapted, trained = _peft_sets(ref)
    assert {a.path for a in gm.lorafa.adapters} == adapted
    ours = {n: p for n, p in gm.named_parameters() if p.requires_grad and not n.endswith("lora_B.weight")}
    assert set(ours) == set(trained)
    for n, p in ours.items():
        assert torch.equal(p, trained[n]) and p is not model.get_parameter(n), n
    _same_adapters(gm, ref)
    batch = make_batch(name, 3, 9, seed=7, head=head)
    expected = ref(**batch)
    for key, value in gm(**batch).items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[key], atol=2e-5, rtol=0, msg=key)


def test_plan_says_which_task_and_what_trains_in_full():
    """Reference: the model class (BERT for sequence classification) and PEFT's head name."""
    _, gm = transformed("bert", SHAPE, head="ForSequenceClassification")
    text = str(gm.lorafa_plan)
    assert "SEQ_CLS (inferred from BertForSequenceClassification" in text
    assert gm.lorafa_plan.trained_modules == ("classifier",)
    assert "trained in full (modules_to_save)" in text


def test_adapter_files_carry_the_task_both_ways_with_peft(tmp_path):
    """Reference: PEFT. Our file (task_type SEQ_CLS, modules_to_save as PEFT writes them) loads
    with PeftModel.from_pretrained as PEFT's classifier with our logits; PEFT's own SEQ_CLS adapter
    (random B, trained score) loads into a fresh transform with its logits."""
    from peft import PeftModel

    model, gm = transformed("llama", SHAPE, head="ForSequenceClassification")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(gm, tmp_path / "ours")
    gm.eval()
    batch = make_batch("llama", 3, 9, seed=7, head="ForSequenceClassification")
    with warnings.catch_warnings(action="ignore"):
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    config = loaded.peft_config["default"]
    assert type(loaded).__name__ == "PeftModelForSequenceClassification" and config.task_type == "SEQ_CLS"
    torch.testing.assert_close(loaded(**batch).logits, gm(**batch).logits, atol=2e-5, rtol=0)

    ref = _peft(model, "SEQ_CLS")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(tmp_path / "peft")
    _, fresh = transformed("llama", SHAPE, head="ForSequenceClassification")
    load_adapter(fresh, tmp_path / "peft")
    fresh.eval()
    torch.testing.assert_close(fresh(**batch).logits, ref.eval()(**batch).logits, atol=2e-5, rtol=0)


def test_task_type_given_overrides_the_class_and_is_checked():
    """Reference: PEFT's task types and its rules, on BERT for sequence classification (no capture):
    FEATURE_EXTRACTION adapts the classifier like any linear, as PEFT does for a task without
    heads; a peft.TaskType is accepted; an unknown name is a ConfigError naming the choices."""
    from peft import TaskType

    model = make_task_model("bert", "ForSequenceClassification")
    paths = {a.path for a in select_adapters(model, resolve_task(model, LoraFAConfig())[1])}
    assert "classifier" not in paths
    task, config = resolve_task(model, LoraFAConfig(task_type="FEATURE_EXTRACTION"))
    assert task.inferred_from is None and "classifier" in {a.path for a in select_adapters(model, config)}
    assert _peft_sets(_peft(model, None))[0] == {a.path for a in select_adapters(model, config)}
    assert LoraFAConfig(task_type=TaskType.TOKEN_CLS).task_type == "TOKEN_CLS"
    with pytest.raises(ConfigError, match="SEQ_CLS"):
        LoraFAConfig(task_type="CLASSIFY")


@pytest.mark.parametrize("head, task_type", [
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("LMHeadModel", "CAUSAL_LM"), ("Model", "FEATURE_EXTRACTION"),
])
def test_inferred_task_type_is_the_one_peft_users_pick(head, task_type):
    """Reference: PEFT's docs, a task type per transformers auto class (BertFor... classes)."""
    assert infer_task_type(make_task_model("bert", head)) == task_type


def test_classifier_not_named_as_peft_expects_warns():
    """Reference: PEFT, which trains no module in full for T5's ``classification_head`` (it looks for
    ``classifier``/``score``): the same adapted set, and a warning saying how to train it in full."""
    model = make_task_model("t5", "ForSequenceClassification")
    with pytest.warns(UserWarning, match="modules_to_save"):
        _, config = resolve_task(model, LoraFAConfig())
    assert {a.path for a in select_adapters(model, config)} == _peft_sets(_peft(model, "SEQ_CLS"))[0]


@pytest.mark.parametrize("problem_type", [None, "single_label_classification", "multi_label_classification",
                                          "regression"])
def test_deberta_v2_classifier_captures_for_every_problem_type(problem_type):
    """DeBERTa's loss branches on label values when problem_type is None; capture fixes the type
    the labels imply. Reference: PEFT SEQ_CLS on the same model (A frozen, same random B), eval
    mode: the same loss and logits; the model's config is left as it was."""
    model = make_task_model("deberta-v2", "ForSequenceClassification")
    model.config.problem_type = problem_type
    batch = make_batch("deberta-v2", *SHAPE, head="ForSequenceClassification")
    if problem_type == "multi_label_classification":
        batch["labels"] = torch.nn.functional.one_hot(batch["labels"], 3).float()
    elif problem_type == "regression":
        batch["labels"] = batch["labels"].float()[:, None].expand(-1, 3).contiguous()
    gm = transform(model, example_inputs=batch)
    assert model.config.problem_type == problem_type
    ref = _peft(model, "SEQ_CLS")
    _same_adapters(gm, ref)
    out, expected = gm(**batch), ref(**batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=2e-5, rtol=0)
