"""`ddk-cache init-model`: a small local model and tokenizer, for when no hub is reachable."""

from __future__ import annotations

import itertools

import click

from ddk_cache.capture.corpus import discover_domains, iter_documents
from ddk_cache.models import ModelSpec, make_model_dir


@click.command("init-model")
@click.option("--corpus", required=True, type=click.Path(), help="Corpus (directory or spec) to train the BPE tokenizer on.")
@click.option("--out", required=True, type=click.Path(), help="New directory for the model and tokenizer.")
@click.option("--text-field", default="text", show_default=True, help="JSON field holding each document's text.")
@click.option("--vocab-size", default=4096, show_default=True, help="BPE vocabulary size.")
@click.option("--hidden-size", default=128, show_default=True)
@click.option("--layers", default=2, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--max-position-embeddings", default=2048, show_default=True, help="The model's context length.")
@click.option("--max-docs-per-domain", default=2000, show_default=True, help="Documents per domain used to train the tokenizer.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weight initialisation.")
@click.option("--add-bos", is_flag=True, help="The tokenizer puts a BOS token of its own before every document (as Llama 3's and Gemma's do).")
def init_model(corpus: str, out: str, text_field: str, max_docs_per_domain: int, vocab_size: int, hidden_size: int,
               layers: int, heads: int, max_position_embeddings: int, seed: int, add_bos: bool) -> None:
    """Train a byte-level BPE tokenizer on CORPUS and save a randomly initialised Llama-style
    causal LM with it to OUT (loadable with AutoModelForCausalLM.from_pretrained)."""
    spec = ModelSpec(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
                     max_position_embeddings=max_position_embeddings, seed=seed, add_bos=add_bos)
    domains = discover_domains(corpus)
    texts = itertools.chain.from_iterable(itertools.islice(iter_documents(d, text_field), max_docs_per_domain) for d in domains)
    path = make_model_dir(texts, out, spec)
    click.echo(f"wrote a {layers}-layer, {hidden_size}-wide Llama model and its tokenizer to {path}")
