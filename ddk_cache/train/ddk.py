"""DDK for any training loop: evaluate the student per domain on the cache's validation split,
update the mixing weights (mixing.Mixer: DDK's smooth update, arXiv 2407.16154), and hand
them to the samplers that draw the training data.

    controller = DDKController(cache, samplers=[sampler])
    controller.step(model)            # before training, then every K steps

`model` is any module returning logits for `input_ids` (a Hugging Face causal LM, or your
own module whose forward returns the logits tensor). The teacher's perplexities come from
the cache's table; nothing runs the teacher.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..store.cache import Cache
from .evaluate import evaluate_domains, evaluate_text
from .mixing import Mixer


class DDKController:
    """Holds the domain weights of a run and moves them with DDK (or a fixed rule)."""

    def __init__(self, cache: str | Cache, *, mixing: str = "ddk", alpha: float = 0.5, samplers: Sequence[Any] = (),
                 batch_size: int = 8, device: torch.device | str | None = None, autocast: Callable[[], Any] = nullcontext,
                 student_tokenizer: Any = None) -> None:
        """`student_tokenizer`: a student whose tokenizer is not the cache's; it is evaluated on
        the same text in its own tokens and judged per byte (`per_byte`)."""
        self.cache = cache if isinstance(cache, Cache) else Cache(str(cache))
        self.row_text = None  # the student's tokenizer against the cache's, built once (crosstok.RowText)
        if student_tokenizer is not None:
            from ..capture.tokenization import cache_tokenizer
            from .crosstok import RowText

            self.row_text = RowText(cache_tokenizer(self.cache), student_tokenizer)
        self.mixer = Mixer(mixing, self.cache.domains, [self.cache.num_sequences(d, "train") for d in self.cache.domains], alpha=alpha)
        self.samplers = list(samplers)
        self.batch_size, self.device, self.autocast = batch_size, device, autocast
        self.teacher_ppl = [self.cache.teacher_ppl(d) for d in self.cache.domains] if self.cache.meta.teacher_ppl else None
        if self.mixer.adaptive and self.teacher_ppl is None:
            raise ValueError(f"--mixing {mixing} needs the teacher perplexity table; {self.cache.path} is a tokens-only cache")
        self.history: list[dict[str, Any]] = []
        if self.row_text is not None:
            self.per_byte()

    def per_byte(self) -> None:
        """Judge per UTF-8 byte, not per token (a student of another tokenizer: its perplexity
        per token is not comparable with the teacher's): the teacher's side becomes 2 ** its
        bits per byte, and `update` must be given the student's 2 ** bits per byte."""
        if self.teacher_ppl is None:
            return
        bpb = [self.cache.meta.ppl(d).bits_per_byte for d in self.domains]
        if any(b is None for b in bpb):
            if self.mixer.adaptive:
                raise ValueError(f"DDK across tokenizers compares bits per byte, and {self.cache.path}'s teacher table has none "
                                 "(caches record it since ddk-cache 0.4); rebuild the cache, or use --mixing natural, uniform or static:...")
            return
        self.teacher_ppl = [2.0 ** b for b in bpb]

    @property
    def domains(self) -> list[str]:
        return self.cache.domains

    @property
    def weights(self) -> np.ndarray:
        return self.mixer.weights

    def evaluate(self, model: torch.nn.Module, *, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """The model's perplexity per domain on the validation split (all-reduced over ranks);
        per byte (2 ** bits per byte) for a student of another tokenizer."""
        device = self.device or next(model.parameters()).device
        if self.row_text is not None:
            scores = evaluate_text(model, self.row_text.tok, self.cache, batch_size=self.batch_size, device=device,
                                   autocast=self.autocast, rank=rank, world_size=world_size, row_text=self.row_text)
            return {d: 2.0 ** s["bits_per_byte"] for d, s in scores.items()}
        return evaluate_domains(model, self.cache, batch_size=self.batch_size, device=device, autocast=self.autocast,
                                rank=rank, world_size=world_size)

    def update(self, ppl: dict[str, float]) -> np.ndarray:
        """New weights from the student's per-domain perplexities; the samplers get them
        (only when they changed: a sampler may drop what it read ahead)."""
        before = self.weights.copy()
        weights = self.mixer.update([ppl[d] for d in self.domains], self.teacher_ppl or [1.0] * len(self.domains))
        if not np.array_equal(before, weights):
            for sampler in self.samplers:
                sampler.set_weights(weights)
        self.history.append({"ppl_student": ppl, "weights": dict(zip(self.domains, weights.tolist()))})
        return weights

    def step(self, model: torch.nn.Module, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Evaluate the model, update the weights, give them to the samplers; return them."""
        return self.update(self.evaluate(model, rank=rank, world_size=world_size))

    def state_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixer"])
        for sampler in self.samplers:
            sampler.set_weights(self.mixer.weights)
