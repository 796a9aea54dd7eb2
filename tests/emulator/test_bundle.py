import torch
from safetensors.torch import load_file

from emulator.bundle import WEIGHTS, bundle_id, load_edge_model, write_bundle
from emulator.models import load_causal_lm
from emulator.segments import extract_middle, plan_for


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
