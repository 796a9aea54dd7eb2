"""Calibrates LoRA settings for the split placement (LoRA on the first K and last K decoder layers).

Not a pytest test: a CPU benchmark script. It fine-tunes SmolLM2-135M (fp32, 1 thread) on one
client's Rotten Tomatoes train split and scores every config on the SAME eval rows as zero-shot,
so deltas are paired. Results go to ``docs/calibration.json`` and ``docs/calibration.md`` after
every config, so partial results survive an interrupted run.

Usage (from the repo root):
    .venv/bin/python tests/benchmarks/calibrate_split.py --configs k2_all_2e-4 k4_qv_5e-4
    .venv/bin/python tests/benchmarks/calibrate_split.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))

from emulator.model.loading import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402

N_LAYERS = 30
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Config:
    """One LoRA training config for the split placement."""

    name: str
    k: int  # edge depth: LoRA on layers 0..k-1 and 30-k..29 (k=15 -> all layers)
    targets: str  # "qv" or "all"
    r: int
    lr: float
    warmup: float  # fraction of steps with linear warmup
    clip: float  # max grad norm (0 = off)
    steps: int
    seed: int = 0
    sched: str = "const"  # "const" or "linear" (linear decay to 0 after warmup)


def _c(name: str, **kw) -> Config:
    base = dict(k=2, targets="all", r=8, lr=2e-4, warmup=0.1, clip=1.0, steps=200, seed=0)
    base.update(kw)
    return Config(name=name, **base)


CONFIGS: dict[str, Config] = {c.name: c for c in [
    _c("k2_all_2e-4", k=2, targets="all", lr=2e-4, steps=200),
    _c("k4_qv_5e-4", k=4, targets="qv", lr=5e-4, steps=200),
    _c("k3_all_2e-4", k=3, targets="all", lr=2e-4, steps=200),
    _c("k3_all_1e-4", k=3, targets="all", lr=1e-4, steps=200),
    _c("k3_all_3e-4", k=3, targets="all", lr=3e-4, steps=200),
    _c("k2_all_3e-4", k=2, targets="all", lr=3e-4, steps=200),
    _c("k4_all_2e-4", k=4, targets="all", lr=2e-4, steps=200),
    _c("k4_qv_1e-3", k=4, targets="qv", lr=1e-3, steps=200),
    _c("k4_qv_5e-4_r16", k=4, targets="qv", r=16, lr=5e-4, steps=200),
    _c("k2_all_2e-4_r16", k=2, targets="all", r=16, lr=2e-4, steps=200),
    _c("k2_all_2e-4_300", k=2, targets="all", lr=2e-4, steps=300),
    _c("k2_all_2e-4_lin", k=2, targets="all", lr=2e-4, steps=200, sched="linear"),
    _c("k3_all_5e-4", k=3, targets="all", lr=5e-4, steps=200),
    _c("k2_all_5e-4", k=2, targets="all", lr=5e-4, steps=200),
]}


def layers_for(k: int) -> list[int]:
    """Decoder layers that carry LoRA for edge depth ``k``."""
    return sorted(set(range(k)) | set(range(N_LAYERS - k, N_LAYERS)))


def read_jsonl(path: Path) -> list[dict]:
    """Reads a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_train(tok, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """Returns (ids, n_completion) per row; the prompt is truncated from the left."""
    out = []
    for row in rows:
        c = tok(row["completion"], add_special_tokens=False)["input_ids"]
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"][-(max_len - len(c)):]
        out.append((p + c, len(c)))
    return out


def hidden_and_head(model):
    """Returns (decoder stack, lm_head) of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def completion_loss(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over completion tokens only (prompt tokens are masked out).

    Equivalent to labels=-100 on prompt/pad positions, but the LM head is applied only at the
    positions that predict completion tokens (the vocabulary projection dominates otherwise).
    """
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, nc) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for t in range(len(seq) - nc, len(seq)):
            rows.append(i), cols.append(t - 1), targets.append(seq[t])
    decoder, head = hidden_and_head(model)
    h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = head(h[torch.tensor(rows), torch.tensor(cols)])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], max_len: int, batch_size: int = 32) -> list[int]:
    """Per-row correctness (1/0): argmax over choices of summed choice-token log-likelihood."""
    model.eval()
    decoder, head = hidden_and_head(model)
    pad = tok.pad_token_id
    seqs = []  # (row index, choice index, ids, n_choice_tokens)
    for ri, row in enumerate(rows):
        cids = [tok(c, add_special_tokens=False)["input_ids"] for c in row["choices"]]
        single = all(len(c) == 1 for c in cids)
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        p = p[-(max_len - max(len(c) for c in cids)):]
        if single:  # one forward scores all single-token choices from the last prompt position
            seqs.append((ri, [c[0] for c in cids], p, 0))
        else:
            seqs.extend((ri, ci, p + c, len(c)) for ci, c in enumerate(cids))
    scores: dict[int, dict[int, float]] = {i: {} for i in range(len(rows))}
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][2]))  # length-bucketed batches
    for b in range(0, len(order), batch_size):
        chunk = [seqs[j] for j in order[b: b + batch_size]]
        width = max(len(s[2]) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s[2])] = torch.tensor(s[2])
            mask[i, : len(s[2])] = 1
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, (ri, ci, seq, nc) in enumerate(chunk):
            if nc == 0:
                logp = torch.log_softmax(head(h[i, len(seq) - 1]).float(), -1)
                for k, tid in enumerate(ci):
                    scores[ri][k] = logp[tid].item()
            else:
                pos = torch.arange(len(seq) - nc - 1, len(seq) - 1)
                logp = torch.log_softmax(head(h[i, pos]).float(), -1)
                scores[ri][ci] = logp[torch.arange(nc), torch.tensor(seq[-nc:])].sum().item()
    return [int(max(scores[i], key=scores[i].get) == row["answer"]) for i, row in enumerate(rows)]


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test on discordant pairs (McNemar exact)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def train(cfg: Config, model_dir: Path, tok, train_rows: list[dict], max_len: int, batch: int, log) -> tuple:
    """Trains one config; returns (model, s_per_step, loss_log)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=QV if cfg.targets == "qv" else ALL,
                      layers_to_transform=layers_for(cfg.k))
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, int(cfg.warmup * cfg.steps)) if cfg.warmup > 0 else 0

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.sched == "linear":
            return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))
        return 1.0

    data = encode_train(tok, train_rows, max_len)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < batch:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step)
        loss = completion_loss(model, [data[i] for i in idx], tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        opt.step()
        losses.append(round(loss.item(), 4))
        if (step + 1) % 25 == 0:
            log(f"  {cfg.name} step {step + 1}/{cfg.steps} loss(25)={sum(losses[-25:]) / 25:.4f} "
                f"gnorm={gnorm.item():.2f} {(time.perf_counter() - t0) / (step + 1):.2f}s/step")
    return model, (time.perf_counter() - t0) / cfg.steps, losses


def write_reports(res: dict, json_path: Path, md_path: Path) -> None:
    """Writes the JSON results and the Markdown table (conclusions are kept if present)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    zs = res.get("zero_shot", {})
    lines = ["# Split-placement LoRA calibration (SmolLM2-135M, Rotten Tomatoes)", "",
             f"Eval: {res['eval_rows']} rows of `{res['data']}/eval.jsonl` (paired: every config on the same rows); "
             f"zero-shot accuracy **{zs.get('acc', float('nan')):.4f}**. Train: batch {res['batch']}, "
             f"<= {res['max_len']} tokens, AdamW, fp32, 1 CPU thread. Eval pass: {zs.get('eval_s', 0):.0f} s. "
             "p = exact McNemar/sign test on discordant rows (W/L = rows fixed/broken vs zero-shot).", "",
             "| config | K | targets | r | lr | warmup | clip | sched | steps | seed | acc | Δ vs zero-shot | W/L | p "
             "| final loss | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        c = r["config"]
        lines.append(f"| {c['name']} | {c['k']} | {c['targets']} | {c['r']} | {c['lr']:g} | {c['warmup']:g} | "
                     f"{c['clip']:g} | {c['sched']} | {c['steps']} | {c['seed']} | {r['acc']:.4f} | "
                     f"{r['delta']:+.4f} | {r['wins']}/{r['losses']} | {r['p']:.3g} | {r['final_loss']:.3f} | "
                     f"{r['s_per_step']:.2f} |")
    lines += ["", "## Conclusions", "", res.get("conclusions", "_(run in progress)_"), ""]
    md_path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["k2_all_2e-4", "k4_qv_5e-4", "k3_all_2e-4"])
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="override config seeds (repeat each)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/rt/client0"))
    ap.add_argument("--eval-rows", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "calibration.json")
    ap.add_argument("--md", type=Path, default=REPO / "docs" / "calibration.md")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for c in CONFIGS.values():
            print(asdict(c))
        return
    torch.set_num_threads(1)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    if not (args.data / "train.jsonl").is_file():
        from prepare_rotten_tomatoes import prepare
        prepare(args.data.parent, clients=1, train_rows=2000, eval_rows=1000, seed=0)
    model_dir = resolve_model("smollm2-135m")
    tok = load_tokenizer(model_dir)
    train_rows = read_jsonl(args.data / "train.jsonl")
    eval_rows = read_jsonl(args.data / "eval.jsonl")[: args.eval_rows]
    res = {"data": str(args.data), "eval_rows": len(eval_rows), "batch": args.batch, "max_len": args.max_len,
           "runs": []}
    if args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("eval_rows") == len(eval_rows) and old.get("data") == str(args.data):
            res = old
    if "zero_shot" not in res:
        t0 = time.perf_counter()
        base = load_causal_lm(model_dir, dtype=torch.float32)
        correct = evaluate(base, tok, eval_rows, args.max_len)
        res["zero_shot"] = {"acc": sum(correct) / len(correct), "eval_s": time.perf_counter() - t0,
                            "correct": "".join(map(str, correct))}
        del base
        write_reports(res, args.json, args.md)
    zs = [int(ch) for ch in res["zero_shot"]["correct"]]
    log(f"zero-shot acc {res['zero_shot']['acc']:.4f} (eval {res['zero_shot']['eval_s']:.1f}s)")
    for name in args.configs:
        for seed in args.seeds or [CONFIGS[name].seed]:
            cfg = Config(**{**asdict(CONFIGS[name]), "seed": seed})
            log(f"config {asdict(cfg)}")
            model, sps, losses = train(cfg, model_dir, tok, train_rows, args.max_len, args.batch, log)
            t0 = time.perf_counter()
            correct = evaluate(model, tok, eval_rows, args.max_len)
            ev_s = time.perf_counter() - t0
            wins = sum(c and not z for c, z in zip(correct, zs))
            losses_n = sum(z and not c for c, z in zip(correct, zs))
            acc = sum(correct) / len(correct)
            run = {"config": asdict(cfg), "acc": acc, "delta": acc - res["zero_shot"]["acc"], "wins": wins,
                   "losses": losses_n, "p": sign_test_p(wins, losses_n), "s_per_step": sps, "eval_s": ev_s,
                   "final_loss": sum(losses[-25:]) / len(losses[-25:]), "loss_curve": losses[::10],
                   "correct": "".join(map(str, correct))}
            res["runs"] = [r for r in res["runs"] if r["config"] != run["config"]] + [run]
            write_reports(res, args.json, args.md)
            log(f"RESULT {cfg.name} seed {seed}: acc {acc:.4f} delta {run['delta']:+.4f} "
                f"W/L {wins}/{losses_n} p={run['p']:.3g} {sps:.2f}s/step eval {ev_s:.1f}s")
            del model


if __name__ == "__main__":
    main()
