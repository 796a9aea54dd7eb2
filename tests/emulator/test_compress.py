"""Emulator compression: layer-drop indices, pruning and quantization are exact and pure."""

import pytest
import torch

from emulator.model.segments import extract_blocks, plan_for, run_blocks, split_causal_lm
from emulator.offsite.compress import EmulatorError, drop_indices, layer_drop, prune_magnitude, quantize_weights
from tests.tiny_models import tiny_model


def test_drop_indices_match_the_issue_example():
    # SmolLM2 (30 blocks), K=2: middle is blocks 2..27; a 2-8-2 emulator keeps 2,6,9,13,16,20,23,27.
    middle = plan_for(tiny_model("llama", layers=30).config, 2).middle
    assert [middle[p] for p in drop_indices(len(middle), 8)] == [2, 6, 9, 13, 16, 20, 23, 27]


@pytest.mark.parametrize("n, e, expected", [(26, 8, [0, 4, 7, 11, 14, 18, 21, 25]), (10, 2, [0, 9]),
                                            (7, 4, [0, 2, 4, 6]), (6, 3, [0, 2, 5]), (5, 1, [0])])
def test_drop_indices_formula(n, e, expected):
    assert drop_indices(n, e) == expected


@pytest.mark.parametrize("e", [0, 4, 5])
def test_emulator_as_deep_as_the_middle_is_refused(e):
    with pytest.raises(EmulatorError, match="fewer than the 4 middle blocks"):
        drop_indices(4, e)


def test_layer_drop_runs_exactly_the_kept_blocks_and_leaves_the_input_alone():
    model = tiny_model("llama", layers=8)
    middle = split_causal_lm(model, 1).middle  # blocks 1..6
    before = {k: v.clone() for k, v in middle.state_dict().items()}
    emulator = layer_drop(middle, 3)
    assert emulator.indices == [1, 3, 6]  # round(2.5) == 2
    hidden = torch.randn(2, 5, 32)
    reference = extract_blocks(model, [1, 3, 6])
    expected = run_blocks(reference.layers.values(), hidden, reference.spec, reference.rotary)
    torch.testing.assert_close(emulator(hidden), expected)
    assert all(torch.equal(before[k], v) for k, v in middle.state_dict().items())
    emulator.layers["3"].mlp.up_proj.weight.data.zero_()  # a copy, not a view of the middle
    assert middle.layers["3"].mlp.up_proj.weight.abs().sum() > 0


def test_prune_zeroes_the_smallest_fraction_of_each_matrix():
    stack = split_causal_lm(tiny_model("llama"), 2).middle
    pruned = prune_magnitude(stack, 0.5)
    for name, w in pruned.named_parameters():
        original = dict(stack.named_parameters())[name]
        if w.dim() == 2:
            zero = w == 0
            assert zero.float().mean().item() == pytest.approx(0.5, abs=0.01)
            assert original[zero].abs().max() <= original[~zero].abs().min()
            assert torch.equal(w[~zero], original[~zero])
        else:
            assert torch.equal(w, original)  # norms are not pruned
    assert (stack.layers["2"].self_attn.q_proj.weight != 0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_keeps_at_most_2_pow_bits_levels_per_row(bits):
    stack = split_causal_lm(tiny_model("gpt2"), 2).middle
    quantized = quantize_weights(stack, bits)
    originals = dict(stack.named_parameters())
    for name, w in quantized.named_parameters():
        if w.dim() != 2:
            continue
        original = originals[name]
        scale = original.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((w - original).abs() <= scale / 2 + 1e-7).all()
        assert max(len(torch.unique(row)) for row in w) <= 2 ** bits - 1
        assert not torch.equal(w, original)
