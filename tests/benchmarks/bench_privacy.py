"""Benchmark (not a test): what the model owner reads from the wire, per defence, beside task accuracy.

SmolLM2-135M on one client's Rotten Tomatoes partition. Every setting trains the same LoRA the same
steps with the edge's own training loop (:func:`edge.training.recipes.train_loop`, in-process middle),
then measures side by side:

* task accuracy on the paired held-out rows (with the defence on, as at inference);
* the owner's audit (:mod:`cloud.audit`) on the states the trained edge sends for those rows: A0,
  A1 (fitted on the cloud's own speeches corpus through the base blocks with the announced
  defence) and A2 (on the first ``--a2-rows`` rows), scored on the review text only (the
  "Review: ... Sentiment:" template is public);
* the label read from the top-cut gradient of ``--grad-rows`` rows;
* edge training FLOPs.

The undefended run's adapter also gets the membership probe (training rows vs held-out rows,
scored with and without the adapter: what an uploaded offsite adapter gives away).

Results are cached per setting in ``docs/privacy_benchmark.json`` (rerun to resume); the Markdown
table and the PNG plot are rewritten after every setting.

Usage (repo root): ``python tests/benchmarks/bench_privacy.py`` (defaults: 40 steps, 500 eval rows)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))

from prepare_rotten_tomatoes import prepare  # noqa: E402

from cloud.audit.gradients import label_from_gradient  # noqa: E402
from cloud.audit.membership import auc, membership_scores  # noqa: E402
from cloud.audit.suite import AuditSettings, audit, strongest  # noqa: E402
from edge.cli import DLORA_LR  # noqa: E402
from edge.modes.dlora import LocalDloraMiddle, LoraModules, SiteServer  # noqa: E402
from edge.modes.split import LocalMiddle, completion_loss, transmitted  # noqa: E402
from edge.training.recipes import TrainConfig, _train_loop, evaluate, train_loop  # noqa: E402
from emulator.adapters.lora import LoraSettings, add_lora  # noqa: E402
from emulator.adapters.lora_bank import LoraBank  # noqa: E402
from emulator.adapters.remote_sites import plan_remote_sites  # noqa: E402
from emulator.data.datasets import IGNORE, load_eval, load_train  # noqa: E402
from emulator.model.loading import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from emulator.model.segments import split_causal_lm  # noqa: E402
from emulator.offsite.corpus import speech_texts, token_chunks  # noqa: E402
from emulator.privacy.defence import DefenceSettings  # noqa: E402
from protocol.accounting import Traffic  # noqa: E402

MODEL = "smollm2-135m"
JSON, MD, PNG = (REPO / "docs" / f"privacy_benchmark.{ext}" for ext in ("json", "md", "png"))


@dataclass(frozen=True)
class Setting:
    name: str
    edge_layers: int
    noise: float = 0.0
    nopeek: float = 0.0
    mode: str = "split"


SETTINGS = [Setting("split K=2 (undefended)", 2), Setting("split K=2 + noise 0.5", 2, noise=0.5),
            Setting("split K=4", 4),
            Setting("split K=2 + noise 2", 2, noise=2.0), Setting("split K=2 + NoPeek 4", 2, nopeek=4.0),
            Setting("split K=2 + noise 1", 2, noise=1.0),
            Setting("dlora K=2 undefended (defaults)", 2, mode="dlora"),
            Setting("dlora K=2 + noise 1", 2, noise=1.0, mode="dlora"),
            Setting("offsite (default emulator: importance 2-8-2)", 2, mode="offsite")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-rows", type=int, default=500)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--a2-rows", type=int, default=100)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--grad-rows", type=int, default=50)
    p.add_argument("--member-rows", type=int, default=200)
    p.add_argument("--owner-chunks", type=int, default=300, help="64-token chunks of the owner's corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated setting names to run (default: all)")
    p.add_argument("--json", type=Path, default=JSON, help="results file (a second process can run other settings "
                   "into its own file; --merge folds it back)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="fold these results files into --json, "
                   "rewrite the table and plot, and exit")
    return p.parse_args()


def template_span(tok, ids: list[int]) -> tuple[int, int]:
    """Positions of the review text inside ``Review: <text>\\nSentiment:`` (the template is public)."""
    head = len(tok("Review:").input_ids)
    tail = len(tok("\nSentiment:", add_special_tokens=False).input_ids)
    return head, max(head, len(ids) - tail)


@torch.no_grad()
def observed_states(model, prompts: list[list[int]], defence: DefenceSettings, seed: int) -> list[torch.Tensor]:
    """What the trained edge sends for each prompt (its own noise draws, seeded apart from the owner's)."""
    torch.manual_seed(seed)
    return [transmitted(model.bottom(torch.tensor([p])), defence)[0] for p in prompts]


def label_attack(model, base, middle, rows, answers, defence: DefenceSettings, candidates: list[int]) -> float:
    """Share of rows whose label the owner reads from the gradient the edge returns at the top cut."""
    hits = 0
    for prompt, answer in zip(rows, answers):
        ids = torch.tensor([prompt + [answer]])
        labels = torch.tensor([[IGNORE] * len(prompt) + [answer]])
        with torch.no_grad():
            upper = middle(transmitted(model.bottom(ids), defence).to(next(middle.parameters()).dtype)).float()
        upper.requires_grad_(True)
        completion_loss(model, upper, labels).backward()
        assert upper.grad is not None
        guess = label_from_gradient(base.top.features, base.top.lm_head, upper[0].detach(), upper.grad[0],
                                    candidates)
        hits += guess == answer
    return hits / len(rows)


@torch.no_grad()
def completion_losses(model, middle, rows) -> list[float]:
    """Per row (``(ids, labels)``) the completion loss by split inference."""
    out = []
    for ids, labels in rows:
        upper = middle(model.bottom(torch.tensor([ids])).to(next(middle.parameters()).dtype)).float()
        out.append(completion_loss(model, upper, torch.tensor([labels])).item())
    return out


class Bench:
    """Shared state of one invocation: the model, data, owner corpus and the results file."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        model_dir = resolve_model(MODEL)
        self.full = load_causal_lm(model_dir).requires_grad_(False)
        self.tok = load_tokenizer(model_dir)
        data = prepare(work / "data", 1, args.train_rows, args.eval_rows, 0)["clients"][0]
        self.train_path, self.eval_path = work / "data/client0/train.jsonl", work / "data/client0/eval.jsonl"
        self.data_summary = data
        self.train_data = load_train(self.train_path, self.tok, 64)
        self.eval_data = load_eval(self.eval_path, self.tok, 64)
        assert all(len(ex.sequences) == 1 for ex in self.eval_data.examples), "choices must be single tokens"
        self.prompts = [ex.sequences[0] for ex in self.eval_data.examples]
        self.answers = [ex.targets[ex.answer][0][2] for ex in self.eval_data.examples]
        self.candidates = sorted({t[0][2] for ex in self.eval_data.examples for t in ex.targets})
        chunks = token_chunks(speech_texts(), self.tok, 64)
        self.owner_ids = chunks[torch.linspace(0, len(chunks) - 1, args.owner_chunks).long()]
        self.pad_id = self.tok.pad_token_id
        self.results = json.loads(args.json.read_text()) if args.json.is_file() else {}
        (work / "identity").mkdir(exist_ok=True)

    def config(self, setting: Setting) -> TrainConfig:
        """The edge's documented defaults for the setting's mode (dlora: q/v LoRA on every block, lr 1e-3,
        warm-up min(20, steps / 10), as ``edgetune-edge train --mode dlora`` picks them)."""
        dlora = setting.mode == "dlora"
        return TrainConfig(cloud="in-process", identity=self.work / "identity", data=self.train_path,
                           out=self.work / "run", steps=self.args.steps, edge_layers=setting.edge_layers,
                           checkpoint_every=0, threads=self.args.threads, mode=setting.mode,
                           lr=DLORA_LR if dlora else TrainConfig.lr,
                           warmup_steps=min(TrainConfig.warmup_steps, self.args.steps // 10) if dlora
                           else TrainConfig.warmup_steps,
                           lora=LoraSettings(targets=() if dlora else ("all",)),
                           defence=DefenceSettings(setting.noise, setting.nopeek))

    def save(self) -> None:
        self.args.json.write_text(json.dumps(self.results, indent=2) + "\n")
        if self.args.json == JSON:
            write_markdown(self.results)
            write_plot(self.results)


def run_setting(b: Bench, s: Setting) -> dict:
    if s.mode == "offsite":
        return run_offsite(b, s)
    split = split_causal_lm(b.full, s.edge_layers)
    base, middle = split.edge, split.middle.to(torch.bfloat16).requires_grad_(False)
    cfg = b.config(s)
    torch.manual_seed(cfg.seed)
    spec = base.bottom.spec
    model = add_lora(base, cfg.lora, spec)
    t0 = time.perf_counter()
    if s.mode == "dlora":  # the cloud-held blocks' LoRA in the edge's bank, answered in-process
        bank = LoraBank(plan_remote_sites(b.full, split.plan, cfg.lora.resolved_targets(spec)), cfg.lora)
        server = SiteServer(bank)
        link = LocalDloraMiddle(middle, server)
        records, _, _ = _train_loop(model, link, LoraModules(model, spec, server), b.train_data, b.pad_id, cfg)
    else:
        link = LocalMiddle(middle)
        records = train_loop(model, link, b.train_data, b.pad_id, cfg)
    train_s = time.perf_counter() - t0
    torch.manual_seed(7)  # the edge's inference noise draws
    acc = evaluate(model, link, b.eval_data, b.pad_id, 32, Traffic(), "eval", cfg.defence)
    t1 = time.perf_counter()
    observed = observed_states(model, b.prompts, cfg.defence, seed=11)
    spans = [template_span(b.tok, p) for p in b.prompts]
    head = lambda h: base.top.lm_head(base.top.final_norm(h))  # noqa: E731
    attacks = audit(observed, b.prompts, base.bottom, base.bottom.embed_tokens.weight, head, b.owner_ids,
                    cfg.defence, AuditSettings(top_k=b.args.top_k, a2_rows=b.args.a2_rows), spans)
    attack_s = time.perf_counter() - t1
    n = b.args.grad_rows
    label = label_attack(model, base, middle, b.prompts[:n], b.answers[:n], cfg.defence, b.candidates)
    best = strongest(attacks)
    row = {"setting": s.name, "mode": s.mode, "edge_layers": s.edge_layers, "noise": s.noise, "nopeek": s.nopeek,
           "steps": cfg.steps, "lr": cfg.lr, "lora_targets": list(cfg.lora.targets) or ["architecture default"],
           "accuracy": acc, "eval_rows": len(b.prompts),
           "strongest_attack": best.attack, "token_recovery": best.token_recovery, "row_exact": best.row_exact,
           "rouge_l": best.rouge_l, "attack_rows": best.rows, "attacks": [a.as_dict() for a in attacks],
           "label_from_gradient": label, "label_rows": n,
           "edge_train_gflop": sum(r.edge_flops for r in records) / 1e9,  # the whole step: the middle is in-process
           "edge_block_gflop_per_batch": edge_block_gflop(b.full, s.edge_layers),
           "loss_first": records[0].loss, "loss_last": sum(r.loss for r in records[-10:]) / min(10, len(records)),
           "train_s": train_s, "attack_s": attack_s}
    if s.name == SETTINGS[0].name:
        row["membership"] = membership(b, model, base, link.middle)
    return row


def run_offsite(b: Bench, s: Setting) -> dict:
    """Offsite with the default emulator: the adapter trains against the emulator on the edge, and the
    owner gets only the upload. No state crosses the wire, so no inversion attack applies; what the
    upload gives away is measured by the membership probe on the full model (plug-in)."""
    from cloud.store.emulators import EmulatorStore, default_spec, model_fingerprint
    from edge.modes.offsite import trainable

    split = split_causal_lm(b.full, s.edge_layers)
    base, middle = split.edge, split.middle.to(torch.bfloat16).requires_grad_(False)
    spec = default_spec(s.edge_layers, len(split.middle.layers))
    stored = EmulatorStore(b.work / "emulators").build(b.full, MODEL, model_fingerprint(resolve_model(MODEL)), spec,
                                                      b.tok)
    emulator = stored.load(b.full).to(torch.bfloat16).requires_grad_(False)
    cfg = b.config(s)
    model, params = trainable(base, base.bottom.spec, cfg)  # the edge's default --tune (lora-top)
    t0 = time.perf_counter()
    records = train_loop(model, LocalMiddle(emulator), b.train_data, b.pad_id, cfg, params)
    train_s = time.perf_counter() - t0
    plug_in = evaluate(model, LocalMiddle(middle), b.eval_data, b.pad_id, 32, Traffic(), "plug-in")
    return {"setting": s.name, "mode": s.mode, "edge_layers": s.edge_layers, "noise": 0.0, "nopeek": 0.0,
            "steps": cfg.steps, "lr": cfg.lr, "lora_targets": list(cfg.lora.targets), "tune": cfg.tune,
            "emulator": stored.key,
            "emulator_blocks": stored.blocks, "accuracy": plug_in, "eval_rows": len(b.prompts),
            "strongest_attack": "none (no state crosses the wire)", "token_recovery": 0.0, "row_exact": 0.0,
            "rouge_l": 0.0, "attack_rows": 0, "attacks": [], "label_from_gradient": None, "label_rows": 0,
            "edge_train_gflop": sum(r.edge_flops for r in records) / 1e9,
            "edge_block_gflop_per_batch": edge_block_gflop(b.full, s.edge_layers),
            "loss_first": records[0].loss, "loss_last": sum(r.loss for r in records[-10:]) / min(10, len(records)),
            "train_s": train_s, "attack_s": 0.0, "membership": membership(b, model, base, middle)}


def membership(b: Bench, model, base, middle) -> dict:
    """AUC of the owner telling the rows the adapter trained on from unseen rows of the same file."""
    import random

    order = list(range(len(b.train_data.examples)))
    random.Random(0 * 1_000_003 + 0).shuffle(order)  # train_batches' first epoch for seed 0
    seen = order[: b.args.steps * 8]
    unseen = order[b.args.steps * 8:]
    n = min(b.args.member_rows, len(seen), len(unseen))
    rows = lambda idx: [(b.train_data.examples[i].input_ids, b.train_data.examples[i].labels) for i in idx[:n]]  # noqa: E731
    members, others = rows(seen), rows(unseen)
    sm = membership_scores(completion_losses(base, middle, members), completion_losses(model, middle, members))
    so = membership_scores(completion_losses(base, middle, others), completion_losses(model, middle, others))
    return {"auc": auc(sm, so), "rows": n, "members_mean_drop": sum(sm) / n, "others_mean_drop": sum(so) / n}


def zero_shot(b: Bench) -> float:
    split = split_causal_lm(b.full, 2)
    return evaluate(split.edge, LocalMiddle(split.middle.to(torch.bfloat16)), b.eval_data, b.pad_id, 32, Traffic(),
                    "zero-shot")


@torch.no_grad()
def edge_block_gflop(full, edge_layers: int) -> float:
    """Forward GFLOP of the edge's blocks (bottom and top, without the LM head, which training applies
    to the completion positions only) for one 8 x 64 batch, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    split = split_causal_lm(full, edge_layers)
    ids = torch.zeros(8, 64, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        lower = split.edge.bottom(ids)
        split.edge.top.stack(lower)
    return counter.get_total_flops() / 1e9


def write_markdown(results: dict) -> None:
    rows = results.get("settings", {})
    lines = ["# Privacy benchmark", "",
             "Generated by `tests/benchmarks/bench_privacy.py`; see docs/security.md for what it means.", "",
             f"Config: `{json.dumps(results.get('config', {}))}`", "",
             f"Zero-shot accuracy (K=2, no adapter): {results.get('zero_shot', float('nan')):.3f}", "",
             "| setting | accuracy | strongest attack | token recovery | row exact | ROUGE-L | A0 | A1 ridge | A1 MLP "
             "| A2 | label from gradient | edge blocks fwd GFLOP / batch | step GFLOP, edge + in-process middle |",
             "|" + "---|" * 13]
    for r in rows.values():
        by = {a["attack"]: a["token_recovery"] for a in r["attacks"]}
        a0 = max(by.get("A0 LM head", 0), by.get("A0 nearest embedding", 0))
        label = "—" if r["label_from_gradient"] is None else f"{r['label_from_gradient']:.2f}"
        if not r["attacks"]:
            lines.append(f"| {r['setting']} | {r['accuracy']:.3f} | {r['strongest_attack']} | — | — | — | — | — | — "
                         f"| — | {label} | {r.get('edge_block_gflop_per_batch', float('nan')):.1f} "
                         f"| {r['edge_train_gflop'] / r['steps']:.0f} |")
            continue
        lines.append(f"| {r['setting']} | {r['accuracy']:.3f} | {r['strongest_attack']} | {r['token_recovery']:.3f} "
                     f"| {r['row_exact']:.3f} | {r['rouge_l']:.3f} | {a0:.3f} | {by.get('A1 ridge', 0):.3f} "
                     f"| {by.get('A1 MLP', 0):.3f} | {by.get('A2 white-box search', 0):.3f} "
                     f"| {label} | {r.get('edge_block_gflop_per_batch', float('nan')):.1f} "
                     f"| {r['edge_train_gflop'] / r['steps']:.0f} |")
    probes = [r for r in rows.values() if "membership" in r]
    if probes:
        lines += ["", "Membership probe on the uploaded adapter (trained rows vs as many unseen rows of the same file, "
                  "score = the row's loss on the full model without minus with the adapter; 0.5 is chance):", ""]
        for r in probes:
            m = r["membership"]
            lines.append(f"- {r['setting']}: AUC {m['auc']:.3f} ({m['rows']} + {m['rows']} rows; mean loss drop "
                         f"members {m['members_mean_drop']:.3f}, others {m['others_mean_drop']:.3f})")
    lines += ["", "dlora sends the same bottom-cut state as split (the cloud computes every cloud-held site's input "
              "from it, so the first site's input is a known function of that state) plus rank-r LoRA outputs and "
              "site-input gradients: the attacks above run on the cut state, which bounds what the site traffic adds. "
              "Offsite sends no state: its row has no inversion attack, and its accuracy is the plug-in's."]
    MD.write_text("\n".join(lines) + "\n")


def write_plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results.get("settings", {}).values())
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"split": "o", "dlora": "s", "offsite": "^"}
    for r in rows:
        ax.scatter(r["accuracy"], r["token_recovery"], marker=markers.get(r.get("mode", "split"), "o"))
        ax.annotate(r["setting"], (r["accuracy"], r["token_recovery"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axhline(0.10, ls="--", lw=0.8, color="grey")
    if "zero_shot" in results:
        ax.axvline(results["zero_shot"], ls=":", lw=0.8, color="grey")
    ax.set_xlabel("task accuracy (Rotten Tomatoes, held-out rows)")
    ax.set_ylabel("strongest attack: token recovery")
    ax.set_title("SmolLM2-135M: what the owner recovers vs accuracy")
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)
    plt.close(fig)


def merge(target: Path, parts: list[Path]) -> None:
    """Folds other processes' settings (run with the same config) into ``target``, in SETTINGS order."""
    results = json.loads(target.read_text())
    for part in parts:
        other = json.loads(part.read_text())
        if other.get("config") != results.get("config"):
            raise SystemExit(f"{part}: ran with another config than {target}; rerun it with the same flags")
        results["settings"].update(other["settings"])
    full = None
    for row in results["settings"].values():
        if "edge_block_gflop_per_batch" not in row:
            full = full or load_causal_lm(resolve_model(MODEL)).requires_grad_(False)
            row["edge_block_gflop_per_batch"] = edge_block_gflop(full, row["edge_layers"])
    order = [s.name for s in SETTINGS]
    results["settings"] = dict(sorted(results["settings"].items(), key=lambda kv: order.index(kv[0])))
    target.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    write_plot(results)


def main() -> None:
    args = parse_args()
    if args.merge is not None:
        return merge(args.json, args.merge)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args, Path(tmp))
        config = {k: v for k, v in vars(args).items() if k not in ("only", "json", "merge")}
        if b.results.get("config") != config:
            b.results = {"config": config, "settings": {}}
        b.results["data"] = b.data_summary
        if "zero_shot" not in b.results:
            b.results["zero_shot"] = zero_shot(b)
            b.save()
            print(f"zero-shot {b.results['zero_shot']:.3f}", flush=True)
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        for s in SETTINGS:
            if s.name in b.results["settings"] or (only and s.name not in only):
                continue
            t0 = time.perf_counter()
            row = run_setting(b, s)
            b.results["settings"][s.name] = row
            b.save()
            print(f"{s.name}: acc {row['accuracy']:.3f} {row['strongest_attack']} {row['token_recovery']:.3f} "
                  f"label {row['label_from_gradient']} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
