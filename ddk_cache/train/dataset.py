"""The cache as a PyTorch dataset, for any training stack (Hugging Face Trainer, Accelerate,
Lightning, a loop of your own).

`CacheDataset` is a map-style dataset over one split of a cache: item i is one sequence,

    input_ids       int64 [L]
    labels          int64 [L]      = input_ids, IGNORE_INDEX (-100) where no loss applies
                                     (position 0, and prompt/padding tokens of chat data)
    topk_ids        int64 [L-1, K] teacher target ids (padding: id 0)
    topk_logprobs   float32 [L-1, K] their log-probs (padding: -inf; sampled targets: log
                                     weights summing to 1, no tail); position t predicts
                                     input_ids[t+1], as `labels[t+1]`
    domain          int64          index into `dataset.domains`

    tail_logprob    float32 [L-1]  the teacher's log mass outside the kept ids (pack-v3 caches)

(targets only for caches that have them and `targets=True`). With `student_tokenizer` (a
tokenizer, or its directory, that is not the cache's), items are the same text in that
tokenizer's ids, with the teacher's targets on the positions that have read the same text
(crosstok.CrossTokenizer: topk_ids are student ids, -1 where a teacher token is no single
student token; positions without a partner have none; L varies by row and `collate` pads);
`dataset.crosstok.unmatched` is what the hybrid loss needs (`KDConfig(unmatched=...)`,
`hf.DistillationTrainer` sets it). It does not shard by rank:
give it a `DistributedSampler` (or let Accelerate shard the loader) for data parallelism.
A batch is read and decoded at once (`__getitems__`, which DataLoader uses), and the
dataset reopens the cache in each DataLoader worker process.

`DomainWeightedSampler` draws indices by domain weights (DDK's sampling rule, the one
`ddk-cache distill` uses) and takes new weights at any time (`set_weights`); with
`rank`/`world_size` it draws each step's global batch and yields this rank's share, like
the distill loader. `collate` stacks items into a batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..store.cache import Cache
from .data import IGNORE_INDEX, DomainSampler, SequenceReader, normalise


class CacheDataset(torch.utils.data.Dataset):
    """One split of a cache as a map-style dataset (see the module docstring)."""

    def __init__(self, cache: str | Cache, split: str = "train", *, targets: bool = True, student_tokenizer: Any = None,
                 student_vocab: int | None = None, max_len: int | None = None, cross_tokenizer: str = "hybrid") -> None:
        """`student_tokenizer`: train a student of another tokenizer (see the module docstring);
        `student_vocab`: its output rows (default: the tokenizer's size); `max_len`: cut rows
        longer than this many student tokens (its context); `cross_tokenizer`: hybrid or uld
        (targets on paired positions) or prefix (on every position; README)."""
        self.path = cache.path if isinstance(cache, Cache) else str(cache)
        self._cache = cache if isinstance(cache, Cache) else None
        self.split = split
        c = self.cache
        self.crosstok = None
        if student_tokenizer is not None:
            from ..capture.tokenization import cache_tokenizer, load_tokenizer
            from .crosstok import CrossTokenizer

            tok = load_tokenizer(str(student_tokenizer)) if isinstance(student_tokenizer, (str, bytes)) or hasattr(student_tokenizer, "__fspath__") else student_tokenizer
            self.crosstok = CrossTokenizer(cache_tokenizer(c), tok, student_vocab or len(tok), max_len,
                                           mode="prefix" if cross_tokenizer == "prefix" else "paired")
        self.domains = c.domains
        self.sizes = [c.num_sequences(d, split) for d in self.domains]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.targets = targets and c.has_targets
        self._reader: SequenceReader | None = None

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = Cache(self.path)
        return self._cache

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy: they open the cache themselves (file handles and
        # the reader are per process).
        state = dict(self.__dict__)
        state["_cache"], state["_reader"] = None, None
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(domain index, sequence) of dataset index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return d, int(index - self.offsets[d])

    def index_of(self, domain: int, sequence: int) -> int:
        return int(self.offsets[domain] + sequence)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Items for `indices`, read and decoded as one batch."""
        if self._reader is None:
            self._reader = SequenceReader(self.cache, self.targets, split=self.split, crosstok=self.crosstok)
        arrays = self._reader.read([self.locate(int(i)) for i in indices])
        tokens = arrays["tokens"]
        labels = tokens.clone()
        if arrays["loss_mask"] is not None:
            labels[~arrays["loss_mask"]] = IGNORE_INDEX
        labels[:, 0] = IGNORE_INDEX  # no model predicts the first token
        out = []
        for b in range(len(indices)):
            item = {"input_ids": tokens[b], "labels": labels[b], "domain": torch.tensor(int(arrays["domains"][b]))}
            if self.targets:
                item["topk_ids"] = arrays["topk_ids"][b].long()
                item["topk_logprobs"] = arrays["topk_logprobs"][b]
                if arrays["tail_logprob"] is not None:
                    item["tail_logprob"] = arrays["tail_logprob"][b]
            out.append(item)
        return out


# What each key is padded with when items of different lengths are batched (a student of
# another tokenizer): padding carries no label and no target.
_PAD = {"input_ids": 0, "labels": IGNORE_INDEX, "topk_ids": -1, "topk_logprobs": float("-inf"), "tail_logprob": 0.0}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items of CacheDataset into a batch (every key, every item), padding rows of
    different lengths at the end (labels IGNORE_INDEX, no targets)."""
    out = {}
    for k in items[0]:
        parts = [item[k] for item in items]
        width = max(p.shape[0] for p in parts) if parts[0].dim() else 0
        if parts[0].dim() and any(p.shape[0] != width for p in parts):
            parts = [torch.cat([p, p.new_full((width - p.shape[0], *p.shape[1:]), _PAD[k])]) for p in parts]
        out[k] = torch.stack(parts)
    return out


class DomainWeightedSampler(torch.utils.data.Sampler[int]):
    """Indices of a CacheDataset drawn by domain weights (DDK's sampling rule).

    Each step draws `batch_size * world_size` domains with the weights in force; each domain
    hands out its sequences in a seeded permutation and reshuffles when it runs out. This
    rank yields items [rank * batch_size, (rank + 1) * batch_size) of every step's draw, so
    with a DataLoader of the same `batch_size` its batches are exactly those of `ddk-cache
    distill`'s loader. `set_weights` applies from the next index drawn (a DataLoader with
    workers has already drawn a few batches ahead). `num_samples` bounds the iteration
    (default: unbounded, like pre-training)."""

    def __init__(self, dataset: CacheDataset, weights: Sequence[float] | None = None, *, batch_size: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_samples: int | None = None) -> None:
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.sampler = DomainSampler(dataset.sizes, seed)
        self.weights = normalise(np.full(len(dataset.sizes), 1.0) if weights is None else np.asarray(weights, float))
        self.num_samples = num_samples

    def set_weights(self, weights: Sequence[float]) -> None:
        self.weights = normalise(np.asarray(weights, float))

    def __iter__(self) -> Iterator[int]:
        produced = 0
        while self.num_samples is None or produced < self.num_samples:
            draw = self.sampler.draw(self.weights, self.batch_size * self.world_size)
            for d, s in draw[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]:
                yield self.dataset.index_of(d, s)
                produced += 1
                if self.num_samples is not None and produced >= self.num_samples:
                    return

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an unbounded DomainWeightedSampler has no length; pass num_samples")
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.weights = normalise(np.asarray(state["weights"], float))
