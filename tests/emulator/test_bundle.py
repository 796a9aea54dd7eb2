import torch
from safetensors.torch import load_file

from emulator.model.bundle import WEIGHTS, bundle_id, load_edge_model, write_bundle
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for


def test_bundle_rebuilds_edge_without_middle(tiny_dirs, tmp_path):
    for family, directory in tiny_dirs.items():
        model = load_causal_lm(directory)
        plan = plan_for(model.config, 2)
        bundle = write_bundle(model, directory, plan, tmp_path / family, "tiny")
        assert bundle.name == bundle_id(bundle)
        again = write_bundle(model, directory, plan, tmp_path / family, "tiny")
        assert again == bundle  # content-addressed and deterministic
        names = load_file(str(bundle / WEIGHTS)).keys()
        middle_blocks = {f"layers.{i}." for i in plan.middle}
        assert not [n for n in names if any(m in n for m in middle_blocks)]
        edge = load_edge_model(bundle)
        middle = extract_middle(model, plan)
        ids = torch.randint(1, 96, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(edge.top(middle(edge.bottom(ids))), model(ids).logits, rtol=0, atol=1e-5)
        assert (bundle / "tokenizer.json").is_file()


def test_tied_head_is_stored_once(tiny_dirs, tmp_path):
    from emulator.model.bundle import read_plan

    model = load_causal_lm(tiny_dirs["llama"])  # tie_word_embeddings=True
    bundle = write_bundle(model, tiny_dirs["llama"], plan_for(model.config, 1), tmp_path, "tiny")
    _, meta = read_plan(bundle)
    assert meta["aliases"]["top.lm_head.weight"] == "bottom.embed_tokens.weight"
    assert "top.lm_head.weight" not in load_file(str(bundle / WEIGHTS))
