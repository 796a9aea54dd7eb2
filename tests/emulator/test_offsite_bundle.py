"""An offsite bundle holds the edge segments and a lossy emulator, never the middle it replaces."""

import pytest
import torch
from safetensors.torch import load_file

from emulator.model.bundle import EMULATOR_WEIGHTS, WEIGHTS, load_edge_model, load_emulator, read_plan, write_bundle
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for, split_causal_lm
from emulator.offsite.compress import layer_drop
from emulator.offsite.corpus import speech_texts, token_chunks
from emulator.offsite.distill import DistillSettings, distill
from tests.tiny_models import tiny_tokenizer


def verbatim_middle_blocks(bundle, model, plan) -> set[int]:
    """Middle blocks any of whose weight matrices appears bit-for-bit among the bundle's tensors."""
    files = [bundle / f for f in (WEIGHTS, EMULATOR_WEIGHTS) if (bundle / f).is_file()]
    stored = [t for f in files for t in load_file(str(f)).values() if t.dim() == 2]
    middle = extract_middle(model, plan)
    found = set()
    for index in plan.middle:
        for weight in (p for p in middle.layers[str(index)].parameters() if p.dim() == 2):
            if any(t.shape == weight.shape and torch.equal(t, weight.to(t.dtype)) for t in stored):
                found.add(index)
    return found


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load_causal_lm(tiny_dirs["llama"])  # 6 blocks; K=1 leaves a middle of 4


def test_layer_drop_bundle_holds_at_most_the_kept_blocks(model, tiny_dirs, tmp_path):
    plan = plan_for(model.config, 1)
    emulator = layer_drop(extract_middle(model, plan), 2)
    bundle = write_bundle(model, tiny_dirs["llama"], plan, tmp_path, "tiny", emulator, {"distilled": False})
    found = verbatim_middle_blocks(bundle, model, plan)
    assert found == {1, 4} and len(found) <= 2
    _, meta = read_plan(bundle)
    assert meta["emulator"] == {"distilled": False, "blocks": [1, 4]}
    restored = load_emulator(bundle)
    hidden = torch.randn(2, 5, 32)
    torch.testing.assert_close(restored(hidden), emulator(hidden))
    edge = load_edge_model(bundle)  # the split loader still reads an offsite bundle
    assert edge.bottom.stack.indices == [0] and edge.top.stack.indices == [5]


def test_distilled_bundle_holds_no_middle_weight_verbatim(model, tiny_dirs, tmp_path):
    plan = plan_for(model.config, 1)
    split = split_causal_lm(model, 1)
    chunks = token_chunks(speech_texts()[:40], tiny_tokenizer(), 16)
    result = distill(split.edge, split.middle, layer_drop(split.middle, 2), chunks,
                     DistillSettings(steps=3, batch_size=2, seq_len=16, warmup_steps=1), progress=False)
    bundle = write_bundle(model, tiny_dirs["llama"], plan, tmp_path, "tiny", result.student, {"distilled": True})
    assert verbatim_middle_blocks(bundle, model, plan) == set()


def test_split_bundle_has_no_emulator(model, tiny_dirs, tmp_path):
    bundle = write_bundle(model, tiny_dirs["llama"], plan_for(model.config, 1), tmp_path, "tiny")
    assert verbatim_middle_blocks(bundle, model, plan_for(model.config, 1)) == set()
    with pytest.raises(ValueError, match="not an offsite bundle"):
        load_emulator(bundle)
