"""LoRA sets as PEFT adapters: decisions -> adapters, and mixed batches routed per row."""
from functools import partial

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cl_core.grouping import Decision, InstructionGrouper  # noqa: E402
from cl_core.lora_sets import LoRASets, adapter_name  # noqa: E402
from tests import helpers  # noqa: E402

# a vocabulary of 100 (the token ids below), 2 heads, no pad token, in train mode (the
# mode tests check that routing restores it)
tiny_llama = partial(helpers.tiny_llama, train=True, vocab_size=100, num_attention_heads=2,
                     max_position_embeddings=2048, pad_token_id=None)
# no task type: LoRASets puts its adapters on the bare causal LM
lora_config = partial(helpers.lora_config, task_type=None)


@pytest.fixture(scope="module")
def three_sets():
    torch.manual_seed(1)
    sets = LoRASets(tiny_llama(), lora_config())
    assert sets.prepare_task(Decision(0, False)) == ("group_0", False)
    assert sets.prepare_task(Decision(1, False)) == ("group_1", False)
    assert sets.prepare_task(Decision(2, False)) == ("group_2", False)
    return sets


def test_adapter_names_are_not_one_letter():
    assert adapter_name(0) == "group_0"
    with pytest.raises(ValueError):
        adapter_name(-1)


def test_new_group_adds_fresh_adapter_reuse_activates_existing():
    sets = LoRASets(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert sets.groups == [] and sets.trainable_parameters() == []
    name, dema = sets.prepare_task(Decision(0, False))
    assert (name, dema) == ("group_0", False) and isinstance(sets.model, peft.PeftModel)
    assert sets.active_group == 0
    trainable = sets.trainable_parameters()
    assert trainable and all(".group_0." in n for n, _ in trainable)
    # train group 0 a little: its weights must survive the switch and come back on reuse
    with torch.no_grad():
        for _, p in trainable:
            p.add_(0.5)
    kept = {n: p.detach().clone() for n, p in trainable}
    name, dema = sets.prepare_task(Decision(1, False))
    assert (name, dema) == ("group_1", False) and sets.groups == [0, 1]
    new = sets.trainable_parameters()
    assert all(".group_1." in n for n, _ in new)
    # fresh LoRA: B starts at zero (PEFT default init), A random
    assert all(torch.count_nonzero(p) == 0 for n, p in new if "lora_B" in n)
    name, dema = sets.prepare_task(Decision(0, True))
    assert (name, dema) == ("group_0", True) and sets.active_group == 0
    again = dict(sets.trainable_parameters())
    assert set(again) == set(kept) and all(torch.equal(again[n], kept[n]) for n in kept)


def test_decision_mismatches_raise():
    sets = LoRASets(tiny_llama(), lora_config())
    with pytest.raises(ValueError, match="reuses group 0, but the model has no adapter 'group_0'"):
        sets.prepare_task(Decision(0, True))
    sets.prepare_task(Decision(0, False))
    with pytest.raises(ValueError, match="already exists"):
        sets.prepare_task(Decision(0, False))
    with pytest.raises(ValueError, match="lora_config"):
        LoRASets(tiny_llama(), None)


def test_mixed_batch_equals_per_adapter_outputs_exactly(three_sets):
    sets = three_sets
    sets.model.train()
    torch.manual_seed(5)
    ids = torch.randint(0, 100, (6, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    groups = [2, 0, 1, None, 0, 2]
    mixed = sets.forward_routed(ids, groups, attention_mask=mask).logits
    assert sets.model.training  # mode restored
    sets.model.eval()
    with torch.no_grad():
        for g in (0, 1, 2):
            sets.model.set_adapter(adapter_name(g))
            full = sets.model(input_ids=ids, attention_mask=mask).logits
            for i, gi in enumerate(groups):
                if gi == g:
                    assert torch.equal(mixed[i], full[i]), (i, g)
        with sets.model.disable_adapter():
            base = sets.model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(mixed[3], base[3])
        # and the adapters do differ, so the routing is visible
        sets.model.set_adapter("group_0")
        other = sets.model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(mixed[0], other[0])
        # a row alone gives the same numbers up to kernel rounding
        sets.model.set_adapter("group_1")
        alone = sets.model(input_ids=ids[2:3], attention_mask=mask[2:3]).logits
        assert torch.allclose(mixed[2], alone[0], atol=1e-5)


def test_routed_generate_follows_each_rows_adapter(three_sets):
    sets = three_sets
    torch.manual_seed(6)
    ids = torch.randint(1, 100, (4, 5))
    groups = [1, 2, 1, 0]
    out = sets.generate_routed(ids, groups, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 9)
    sets.model.eval()
    for g in set(groups):
        sets.model.set_adapter(adapter_name(g))
        ref = sets.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for i, gi in enumerate(groups):
            if gi == g:
                assert torch.equal(out[i], ref[i])


def test_routing_from_grouper_end_to_end(three_sets):
    g = InstructionGrouper(threshold=0.9)
    for t in (["Answer with the option letter."], ["Answer using a single word."], ["Provide the bounding box"]):
        g.assign(t)
    routes = g.route(["Provide the bounding box", "Answer using a single word.", "Answer with the option letter."])
    assert routes == [2, 1, 0]
    ids = torch.randint(0, 100, (3, 4))
    logits = three_sets.forward_routed(ids, routes).logits
    assert logits.shape == (3, 4, 100)
    # group ids may come as tensors / numpy arrays; -1 means the base model
    assert torch.equal(three_sets.forward_routed(ids, torch.tensor(routes)).logits, logits)
    import numpy as np

    mixed = three_sets.forward_routed(ids, np.array([2, -1, 0])).logits
    assert torch.equal(mixed[0], logits[0]) and torch.equal(mixed[2], logits[2])
    assert torch.equal(mixed[1], three_sets.forward_routed(ids, [None, None, None]).logits[1])


def test_bad_groups_in_a_batch(three_sets):
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="2 rows"):
        three_sets.forward_routed(ids, [0])
    with pytest.raises(ValueError, match=r"groups\[1\]=7: no adapter"):
        three_sets.forward_routed(ids, [0, 7])


def test_save_and_load_all_sets(three_sets, tmp_path):
    three_sets.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["group_0", "group_1", "group_2"]
    loaded = LoRASets.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.groups == [0, 1, 2]
    ids = torch.randint(0, 100, (3, 6))
    a = three_sets.forward_routed(ids, [0, 1, 2]).logits
    b = loaded.forward_routed(ids, [0, 1, 2]).logits
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        LoRASets.from_pretrained(tiny_llama(), tmp_path / "nope")
