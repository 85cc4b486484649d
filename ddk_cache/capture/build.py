"""`ddk-cache build`: corpus -> staged tokens -> plan -> teacher targets -> a complete cache.

One worker's run, in order (every step resumable, and safe to run in several workers,
processes or machines at once; any worker can be killed and restarted):

  1. check the inputs (corpus layout, tokenizer, options) and --out: new, resumable (same
     build fingerprint, corpus files unchanged) or refused; cheap errors first;
  2. load the teacher (not for tokens-only caches) and check it against the options;
  3. tokenize this worker's pieces of the corpus and stage them (packing.py), then wait,
     showing progress, until every worker's pieces are staged;
  4. make the plan (which tokens go into which sequence) and the arrays, once;
  5. score this worker's pending shards: the teacher streams, a pool of writer threads
     converts, encodes and writes (store/cache.py's shard objects, then a log record);
  6. whoever sees no shard pending finalizes: the teacher perplexity table from the
     logged sums, state "complete" (also `ddk-cache build --finalize`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import config as cfgmod
from ..config import CommandConfig, option, validate
from ..errors import (
    ConfigError,
    CorpusError,
    StoreError,
    StoreVersionError,
)
from ..runtime import Worker, assign_gpus, resolve_device, resolve_worker
from ..store.cache import (
    STATE_COMPLETE,
    STATE_INITIALIZING,
    CacheWriter,
    Shard,
    describe_pending,
    read_root_meta,
)
from ..store.encodings import Encoding, PackV2, PackV3, PlainV1, TokensOnly
from ..store.meta import CHAT, CacheMeta
from ..store.objects import DiskFull, Objects, is_disk_full, is_url
from ..store.targets import DEFAULT_SAMPLE_POOL, TargetSpec
from ..tokenbytes import lengths_or_none
from .corpus import (
    DomainSource,
    Piece,
    corpus_layout,
    discover_domains,
    plan_pieces,
    unread_files,
)
from .packing import (
    PLAN_KEY,
    Candidates,
    PackingConfig,
    Plan,
    done_pieces,
    make_plan,
    read_index,
    tokenize_piece,
    write_summary,
)
from .scoring import Hook, Scorer
from .teachers import BACKENDS, Teacher, check_options, load_teacher, resolve_backend
from .teachers.base import (
    EngineStats,
    Job,
    model_fingerprint,
    resolve_dtype,
    weight_digests,
)
from .tokenization import (
    document_tokenizer,
    load_tokenizer,
    resolve_row_start,
    tokenizer_info,
)

ENCODINGS = ("pack", "pack-v2", "plain")


@dataclass(frozen=True)
class BuildConfig(CommandConfig):
    """Everything `ddk-cache build` takes. Written into the cache as `build_args`; every field
    not marked fingerprint=False is part of the build fingerprint (a resume must agree)."""

    teacher: str = option("", "Teacher model: a local transformers directory or a hub id (not needed for a tokens-only cache given --tokenizer).")
    data: str = option("", "Corpus directory (one domain per .jsonl/.jsonl.gz/.txt/.parquet file or sub-folder) or a .yaml/.toml spec mapping domain -> globs. JSON Lines may hold chat records ('messages', or 'prompt' + 'response').", fingerprint=False)
    out: str = option("", "Cache path (a .zarr directory) or fsspec URL (s3://bucket/c.zarr). An unfinished cache of the same build is resumed.", fingerprint=False)
    tokenizer: str = option("", "Tokenizer directory or hub id (default: the teacher's). With --top-k 0 it is all the build needs.")
    top_k: int = option(64, "Log-probabilities kept per position (at most, with --min-mass/--min-prob); 0 = a tokens-only cache (no teacher run), for plain language modelling.")
    targets: str = option("topk", "topk: the most probable ids and a tail bucket; sampled: --samples ids drawn from the teacher per position, stored with counts.", choices=("topk", "sampled"))
    min_mass: float | None = option(None, "Adaptive top-k: keep entries until their probability sums to this (0-1], at most --top-k; the top-1 is always kept.")
    min_prob: float | None = option(None, "Adaptive top-k: drop entries with probability below this (the top-1 is always kept).")
    samples: int = option(50, "--targets sampled: draws per position; every unique id is kept.")
    sample_temperature: float = option(1.0, "--targets sampled: draw from softmax(logits / T); T != 1 stores log-probs for importance weights (then consistent, not unbiased).")
    sample_pool: int | None = option(None, "--targets sampled: draw from the top-N log-probs only (default: the whole distribution with --backend hf, the top-256 with vllm, which returns no more; a pool makes the targets biased).")
    encoding: str = option("pack", "pack: pack-v3 (ids exact, every kept probability and the tail within a relative error per entry: every --kd-loss is exact from it); pack-v2: log-probs within --kl-budget of forward KL per position (smaller; distill takes only --kd-loss fkl from it); plain: exact float32 + int32 (plain-v1).", choices=ENCODINGS)
    kl_budget: float = option(1e-4, "pack-v2: the most KL (nats) quantisation may add at any position (a hard bound, checked by the encoder).")
    logprob_step: float = option(2.0**-9, "pack: the step of the stored log-ratios to the top-1; each kept log-probability is within this of the teacher's (within step x r / 4 for entries r nats below the top-1 beyond 4), checked at every position by the encoder.")
    seq_len: int = option(2048, "Tokens per sequence (at most the teacher's context; vLLM needs one more).")
    backend: str = option("auto", "Teacher engine: auto = vllm when installed, else hf (transformers). The engine used is part of the fingerprint.", choices=BACKENDS, fingerprint=False)
    row_start: str = option("auto", "What every row the teacher scores (and the student trains on) begins with: bos = the tokenizer's BOS token, also on rows that start mid-document; none = the stream's tokens as they fall; auto = bos where the tokenizer adds a BOS to a document (Llama 3, Gemma), else none (Qwen, SmolLM2). Pass bos for a teacher trained with a BOS whose tokenizer lost that rule in a conversion.", choices=("auto", "bos", "none"))
    text_field: str = option("text", "JSON/parquet field holding each document's text.")
    chat_template: str = option("", "Chat records: a Jinja chat template (a file, or the template itself) instead of the tokenizer's.")
    val_tokens: int = option(1 << 20, "Validation tokens per domain, in whole sequences (default ~500 sequences of 2,048, DDK's 500 samples per domain), at most --val-max-fraction of what the domain keeps (after --max-tokens-per-domain), at least one sequence.")
    val_max_fraction: float = option(0.1, "The validation split takes at most this share of a domain (at least one sequence).")
    max_tokens_per_domain: int | None = option(None, "Cap each domain at this many tokens (validation included: it takes at most --val-max-fraction of the cap), in shuffled order.")
    seed: int = option(0, "Seed of the document shuffle (and of sampled targets).")
    dtype: str = option("auto", "Teacher dtype; auto = bfloat16 on GPU, float32 on CPU.", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = option("auto", "Torch device for the hf backend (cpu, cuda, cuda:1; auto = this worker's GPU when present).", fingerprint=False)
    batch_size: int = option(8, "Sequences per forward pass (hf backend).", fingerprint=False)
    shard_mb: int = option(128, "Aim for shards (the unit of work, resume and storage) of about this many MB of encoded targets.", fingerprint=False)
    shard_sequences: int = option(0, "Sequences per shard; 0 = from --shard-mb and the encoding's expected size.")
    piece_mb: float = option(64.0, "Tokenization pieces: the corpus is cut into pieces of about this many MB of text, the unit of tokenization work (changes the shuffle order).")
    max_document_chars: int = option(1 << 20, "Longer documents are tokenized (and shuffled) as parts of about this many characters, cut at line breaks.")
    revision: str | None = option(None, "Teacher revision (hub ids only).")
    trust_remote_code: bool = option(False, "Allow the teacher's own Python code to run (off unless you ask).", fingerprint=False)
    clevel: int = option(5, "plain: blosc-zstd level.")
    num_shards: int | None = option(None, "Split the build across this many workers (default: WORLD_SIZE under torchrun, SLURM_NTASKS under srun, else 1).", fingerprint=False)
    shard_index: int | None = option(None, "This worker's index in 0..num-shards-1 (default: RANK / SLURM_PROCID).", fingerprint=False)
    wait_timeout: float = option(7200.0, "Seconds a worker waits for other workers' tokenization without seeing any progress before it gives up (with --engine ray, also how long a restarting scoring actor is waited for before it is dropped).", fingerprint=False)
    writer_threads: int = option(0, "Threads converting, encoding and writing shards beside the teacher; 0 = half the CPU cores (1 to 8).", fingerprint=False)
    tensor_parallel_size: int = option(1, "vLLM: GPUs per engine (worker with local rank r gets GPUs [r*t, (r+1)*t)).")
    gpu_memory_utilization: float | None = option(None, "vLLM: share of GPU memory to use (on the CPU build, of host RAM; default 0.9 on GPU, 0.3 on CPU).", fingerprint=False)
    max_num_batched_tokens: int | None = option(None, "vLLM: tokens per engine step (can change results in the last bits).")
    logprobs_format: str = option("flat", "vLLM: how prompt log-probs come back; flat lists convert far faster (same values).", choices=("flat", "dict"), fingerprint=False)
    engine_args: dict[str, Any] = option({}, "vLLM: any other engine argument, repeatable (e.g. --engine-arg quantization=fp8); part of the fingerprint.", flag="--engine-arg")
    engine: str = option("native", "Who schedules the scoring: native (this process is one worker; see --num-shards) or ray (a Ray cluster's actors score the shards, retried elsewhere when an actor or node is lost; the same cache; needs the ray extra).",
                         choices=("native", "ray"), fingerprint=False)
    ray_address: str = option("", "--engine ray: the cluster to join (host:6379, ray://host:10001); default RAY_ADDRESS, else a local cluster for this build.", fingerprint=False)
    ray_actors: int = option(0, "--engine ray: scoring actors (each loads the teacher once); 0 = one per --tensor-parallel-size GPUs in the cluster, or 1 without GPUs.", fingerprint=False)
    ray_actor_cpus: float = option(1.0, "--engine ray: CPUs each scoring actor reserves.", fingerprint=False)
    ray_tokenize_tasks: int = option(0, "--engine ray: Ray CPU tasks that tokenize the corpus and make the plan while the scoring actors wait (each one native worker's share); 0 = one per CPU of the cluster.", fingerprint=False)
    on_nonfinite: str = option("stop", "Teacher output with NaN or infinity for a sequence (a broken head, bf16 overflow): stop (one line naming the domain, sequence, position and teacher; the cache stays resumable) or skip (the sequence keeps its tokens but gets label-only targets, and is left out of the teacher PPL table; the build and inspect count such sequences).", choices=("stop", "skip"), fingerprint=False)

    def __post_init__(self) -> None:
        validate([
            (self.top_k >= 0, f"--top-k must be >= 1 (or 0 for a tokens-only cache), got {self.top_k}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (self.val_tokens >= 1, f"--val-tokens must be >= 1 (DDK evaluates every domain on it), got {self.val_tokens}"),
            (0 < self.val_max_fraction <= 0.5, f"--val-max-fraction must be in (0, 0.5], got {self.val_max_fraction}"),
            (self.max_tokens_per_domain is None or self.max_tokens_per_domain >= 1, f"--max-tokens-per-domain must be >= 1, got {self.max_tokens_per_domain}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.shard_sequences >= 0, f"--shard-sequences must be >= 0 (0 = automatic), got {self.shard_sequences}"),
            (1 <= self.shard_mb <= 1 << 14, f"--shard-mb must be in 1..16384, got {self.shard_mb}"),
            (1e-4 <= self.piece_mb <= 1 << 14, f"--piece-mb must be in 0.0001..16384, got {self.piece_mb}"),
            (self.max_document_chars >= 1024, f"--max-document-chars must be >= 1024, got {self.max_document_chars}"),
            (1 <= self.clevel <= 9, f"--clevel must be in 1..9, got {self.clevel}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.num_shards is None or self.num_shards >= 1, f"--num-shards must be >= 1, got {self.num_shards}"),
            ((self.num_shards is None) == (self.shard_index is None), "--num-shards and --shard-index go together"),
            (self.num_shards is None or 0 <= (self.shard_index or 0) < self.num_shards, f"--shard-index must be in 0..{(self.num_shards or 1) - 1}, got {self.shard_index}"),
            (self.engine != "ray" or self.num_shards is None, "--engine ray schedules the shards itself: drop --num-shards/--shard-index"),
            (self.ray_actors >= 0 and self.ray_actor_cpus > 0, "--ray-actors must be >= 0 and --ray-actor-cpus > 0"),
            (self.ray_tokenize_tasks >= 0, "--ray-tokenize-tasks must be >= 0"),
            (0 <= self.writer_threads <= 64, f"--writer-threads must be in 0..64 (0 = automatic), got {self.writer_threads}"),
            (self.wait_timeout > 0, f"--wait-timeout must be > 0, got {self.wait_timeout}"),
            (self.tensor_parallel_size >= 1, f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}"),
            (self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1, f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.encoding in ENCODINGS, f"--encoding must be pack or plain, got {self.encoding!r}"),
            (self.sample_pool is None or self.sample_pool >= 2, f"--sample-pool must be >= 2, got {self.sample_pool}"),
            (bool(self.teacher) or (self.top_k == 0 and bool(self.tokenizer)), "--teacher is required (a tokens-only cache, --top-k 0, needs only --tokenizer)"),
        ])
        self.target_spec()  # validates the target options
        # An encoding's own option given to another encoding is refused, not dropped.
        for flag, name, owner in (("--kl-budget", "kl_budget", "pack-v2"), ("--logprob-step", "logprob_step", "pack")):
            default = next(f.default for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) != default and self.encoding != owner and not self.tokens_only:
                raise ConfigError(f"{flag} applies to --encoding {owner} only; this build writes {self.encoding}: drop it")
        try:  # the encoding owns its checks (--kl-budget, what it can store)
            self.storage_encoding().check(self.target_spec())
        except StoreError as e:
            raise ConfigError(str(e)) from None

    @property
    def tokens_only(self) -> bool:
        return self.top_k == 0

    def target_spec(self) -> TargetSpec:
        """What the cache keeps per position (stored in its metadata as `targets`)."""
        if self.tokens_only:
            return TargetSpec(kind="none", k=0, seed=self.seed)
        return TargetSpec(kind=self.targets, k=self.top_k, min_mass=self.min_mass, min_prob=self.min_prob, samples=self.samples,
                          sample_temperature=self.sample_temperature, sample_pool=self.sample_pool, seed=self.seed)

    def storage_encoding(self) -> Encoding:
        """How the cache's targets become bytes (encodings.py)."""
        if self.tokens_only:
            return TokensOnly()
        if self.encoding == "pack":
            return PackV3(step=self.logprob_step)
        return PackV2(kl_budget=self.kl_budget) if self.encoding == "pack-v2" else PlainV1(clevel=self.clevel)

    def teacher_options(self) -> dict[str, Any]:
        """The options the teacher backend is loaded with: the common ones, and each backend's
        own (vLLM's) only where given (not at their defaults), so a backend that does not take
        one refuses it instead of dropping it (teachers.check_options)."""
        from .teachers import COMMON_OPTIONS, VLLM_OPTIONS

        fields = {f.name: f for f in dataclasses.fields(self)}
        own = {}
        for name in VLLM_OPTIONS:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if getattr(self, name) != default:
                own[name] = dict(getattr(self, name)) if name == "engine_args" else getattr(self, name)
        return {**{name: getattr(self, name) for name in COMMON_OPTIONS}, **own}

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class BuildResult:
    """What a build (or one worker of it) did: the final metadata and where the time went."""

    meta: CacheMeta
    worker: tuple[int, int] = (0, 1)
    shards_written: int = 0
    tokens_scored: int = 0
    pieces_tokenized: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # the engine busy
    write_seconds: float = 0.0  # summed over writer threads (convert + encode + write)
    stall_seconds: float = 0.0  # time the scoring loop waited for writers
    engine_idle_share: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    already_complete: bool = False
    pending_elsewhere: int = 0  # shards other workers still have to write
    chat_no_loss: dict[str, int] = field(default_factory=dict)  # per domain: chat samples left out (no loss within seq-len)
    chat_cut: dict[str, int] = field(default_factory=dict)  # per domain: chat samples longer than seq-len (their ends lost)
    unread: list[str] = field(default_factory=list)  # corpus files not read (not a corpus format)
    bytes_written: int = 0  # of the shard objects this worker wrote
    positions_written: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds else 0.0


def auto_writer_threads() -> int:
    """Half the cores, 1 to 8: the rest stay with the teacher (tokenizer, CPU forward passes)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def auto_shard_sequences(config: BuildConfig, spec: TargetSpec, encoding: Encoding) -> int:
    """Sequences per shard so a shard's targets object is about --shard-mb (tokens-only:
    its tokens object); between 1 and 65,536 sequences."""
    P = config.seq_len - 1
    per_sequence = encoding.bytes_per_position(spec) * P + 2.5 * config.seq_len
    return max(1, min(1 << 16, int(config.shard_mb * (1 << 20) // per_sequence)))


def build_fingerprint(config: BuildConfig, corpus: list[dict], teacher_fp: str, tokenizer_fp: str, backend: str) -> str:
    """A hash of everything that determines the cache's content (not batch size, device or workers)."""
    blob = json.dumps({"args": cfgmod.fingerprint_values(config), "corpus": corpus, "teacher": teacher_fp,
                       "tokenizer": tokenizer_fp, "backend": backend}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _existing(out: str, objects: Objects) -> CacheMeta | None:
    """The metadata of the cache at `out`; None if nothing is there. Refuses anything else."""
    if not is_url(out) and os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"--out {out} is a file, not a cache; choose another --out")
    if objects.get("zarr.json") is None:
        if objects.list("") and not set(objects.list("")) <= {k for k in objects.list("_build")}:
            raise StoreError(f"--out {out} holds something that is not a ddk-cache store; choose another --out or remove it")
        return None
    try:
        return read_root_meta(out, objects)
    except StoreVersionError:
        raise  # a cache, but of another version: say that, not "not a cache"
    except StoreError:
        raise StoreError(f"--out {out} holds something that is not a ddk-cache store; choose another --out or remove it") from None


def _mismatch(existing: CacheMeta, config: BuildConfig, fps: dict[str, Any]) -> str:
    """Name what differs between an existing cache and this build."""
    diffs = [d.replace(" before, ", " in the cache, ").replace(" now", " here") for d in cfgmod.changed(existing.build_args, config)]
    if existing.corpus.get("layout") != fps["corpus"]:
        diffs.append("the corpus files differ (names or sizes)")
    if existing.teacher.get("fingerprint") != fps["teacher"]:
        before = existing.teacher.get("weights") or {}
        now = weight_digests(Path(config.teacher)) if before and Path(config.teacher).is_dir() else {}
        changed = sorted(f for f in set(before) | set(now) if before.get(f) != now.get(f))
        what = f": weights changed ({', '.join(changed[:4])})" if changed else ""
        diffs.append(f"the teacher differs (cache: {existing.teacher.get('name_or_path')}{what})")
    if existing.tokenizer.get("fingerprint") != fps["tokenizer"]:
        diffs.append("the tokenizer differs")
    if existing.teacher.get("backend") != fps["backend"]:
        diffs.append(f"backend: {fps['backend']} here, {existing.teacher.get('backend')} in the cache")
    return "; ".join(diffs) or "the build fingerprint differs"


def _check_unchanged(existing: CacheMeta, domains: list[DomainSource]) -> None:
    """A corpus file edited since the build started (size or modification time) is refused:
    its pieces may already be staged from the old bytes."""
    recorded = {(f["domain"], f["path"]): f for f in existing.corpus.get("files", [])}
    for source in domains:
        for stat in source.stats():
            old = recorded.get((source.name, stat["path"]))
            if old is not None and (old["size"], old["mtime_ns"]) != (stat["size"], stat["mtime_ns"]):
                raise StoreError(
                    f"corpus file {stat['path']} (domain {source.name}) changed since this cache's build started "
                    f"(size or modification time); restore it, or build into another --out"
                )


class _TokensOnlyTeacher:
    """Stands in for a teacher in tokens-only builds: every sequence's targets are empty."""

    stats = EngineStats()

    def stream(self, jobs: Any, spec: TargetSpec) -> Iterator[tuple[Job, int, Callable[[], None]]]:
        for job in jobs:
            for row in range(len(job.tokens)):
                yield job, row, (lambda: None)

    def close(self) -> None:
        pass


def build(config: BuildConfig, *, progress: bool = True, hook: Hook | None = None, teacher: Teacher | None = None) -> BuildResult:
    """Build (or resume, or confirm complete) the cache described by `config`, as one worker.

    `hook(event, info)` is called at "piece_tokenized", "tokenized", "store_created",
    "shard_written" and "before_finalize" (in this thread); tests raise from it to
    simulate a crash there.
    `teacher`, if given, is an already loaded teacher of `config.teacher` and
    `config.backend` (left open afterwards), so several builds can share one engine."""
    if config.engine == "ray":
        from .ray_engine import build_on_ray  # ray is an optional extra

        return build_on_ray(config, progress=progress, hook=hook)
    return _guard_disk(config, lambda: _build(config, progress, hook, teacher))


def prepare(config: BuildConfig, *, teacher: Teacher | None = None, progress: bool = False, inputs: _Inputs | None = None,
            store_only: bool = False) -> BuildResult:
    """Stages 1-5 of a build as one worker, without scoring: the store, the tokenized pieces,
    the plan and the arrays (what an engine that schedules the scoring itself, such as
    `--engine ray`, needs first); with `store_only`, stages 1-3 (the store's metadata).
    Resumes like `build`; a complete cache is left as it is. `inputs`: stage 1 already done
    for this config (`_resolve`), not repeated (it hashes every weight file of the teacher)."""
    return _guard_disk(config, lambda: _build(config, progress, None, teacher, prepare_only=True, inputs=inputs,
                                              store_only=store_only))


def _guard_disk(config: BuildConfig, run: Callable[[], BuildResult]) -> BuildResult:
    try:
        return run()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (DiskFull, KeyboardInterrupt, SystemExit)) or not is_disk_full(e):
            raise
        raise DiskFull(f"no space left on the device holding {config.out}; free space (or choose another --out), then run "
                       "the same command again: it resumes") from None


@dataclass
class _Inputs:
    """A build's inputs, resolved and checked once (stage 1)."""

    config: BuildConfig  # with every "auto" choice resolved: the fingerprint names what is used
    worker: Worker
    backend: str
    domains: list[DomainSource]
    tok: Any
    tok_source: str
    spec: TargetSpec
    encoding: Encoding
    fps: dict[str, Any]  # corpus layout, teacher, tokenizer and backend fingerprints
    fingerprint: str


def _build(config: BuildConfig, progress: bool, hook: Hook | None, teacher: Teacher | None, prepare_only: bool = False,
           inputs: _Inputs | None = None, store_only: bool = False) -> BuildResult:
    hook = hook or (lambda event, info: None)
    started = time.perf_counter()
    inputs = inputs or _resolve(config, cheap_checks=teacher is None)
    config, worker = inputs.config, inputs.worker
    objects = Objects.open(config.out)
    existing = _existing(config.out, objects)
    if existing is not None:
        if existing.build_fingerprint != inputs.fingerprint:
            raise StoreError(f"{config.out} was built by another build ({_mismatch(existing, config, inputs.fps)}); use another --out or delete it")
        _check_unchanged(existing, inputs.domains)
        if existing.state == STATE_COMPLETE:
            return BuildResult(meta=existing, worker=tuple(worker), already_complete=True, seconds=time.perf_counter() - started)

    phases: dict[str, float] = {}
    mark = time.perf_counter()
    result = BuildResult(meta=existing, worker=tuple(worker), phase_seconds=phases)  # type: ignore[arg-type]
    result.unread = [str(p) for p in unread_files(inputs.domains)]
    with ExitStack() as stack:
        teacher, vocab = _open_teacher(inputs, teacher, stack, progress)
        phases["load teacher"], mark = time.perf_counter() - mark, time.perf_counter()
        # One process per worker slot: a second identical command refuses instead of racing
        # (local stores; the lock dies with its process, so a crash never leaves it stuck).
        # Taken after the cheap checks, so a refused command leaves no trace in --out.
        stack.enter_context(objects.lock(f"_build/locks/worker-{worker.rank}-of-{worker.world_size}.lock",
                                         f"a build of {config.out} as worker {worker.rank} of {worker.world_size}"))
        created = False
        if existing is None:
            created = _create_store(inputs, teacher, vocab)
        writer = CacheWriter(config.out, objects)
        writer.store_tokenizer(inputs.tok)  # once per cache (a crash before it is mended here on resume)
        if store_only:
            result.meta = writer.meta
            return result
        if writer.meta.state == STATE_INITIALIZING:
            try:
                plan = _stage(inputs, writer, vocab, result, phases, progress, hook)
            except CorpusError:
                # A bad line, or a corpus too small for its split sizes: nothing was scored,
                # and the fix edits a corpus file (which a resume would refuse). A single
                # worker that created this store removes it, so the fixed command starts clean.
                if created and worker.world_size == 1:
                    stack.close()
                    objects.delete("")
                raise
            mark = time.perf_counter()
        else:
            plan = Plan.from_bytes(_need(writer.objects.get(PLAN_KEY), f"{config.out}: the build plan is missing"))
        writer = CacheWriter(config.out, objects)  # re-read: the arrays and domains now exist
        hook("store_created", {"path": config.out})
        if prepare_only:
            result.meta = writer.meta
            result.seconds = time.perf_counter() - started
            return result

        records = writer.records()
        mine = [s for s in assign_shards(writer.shards(), worker.world_size)[worker.rank] if s.key not in records]
        scorer = Scorer(writer, plan, inputs.spec, threads=config.writer_threads or auto_writer_threads(), worker=tuple(worker),
                        on_nonfinite=config.on_nonfinite, progress=progress, hook=hook, byte_lengths=lengths_or_none(inputs.tok))
        stats = scorer.run(mine, teacher)
        for name, value in dataclasses.asdict(stats).items():
            setattr(result, name, value)
        result.teacher_seconds, result.engine_idle_share = teacher.stats.busy, teacher.stats.idle_share
    phases["score + write"], mark = time.perf_counter() - mark, time.perf_counter()
    records = writer.records()
    pending = writer.pending(records)
    result.meta = writer.meta
    result.seconds = time.perf_counter() - started
    if pending:  # other workers are still at it: the last one to finish finalizes
        result.pending_elsewhere = len(pending)
        return result
    hook("before_finalize", {})
    result.meta = writer.finalize(records)
    phases["finalize"] = time.perf_counter() - mark
    result.seconds = time.perf_counter() - started
    return result


def _resolve(config: BuildConfig, cheap_checks: bool) -> _Inputs:
    """Stage 1: the worker, tokenizer, corpus layout and every "auto" choice, resolved once;
    the cheap checks (backend options) before any model or corpus is read."""
    worker = resolve_worker(config.num_shards, config.shard_index)
    # The tokenizer's own threads: the node's cores shared among its workers (set before
    # the tokenizer's thread pool starts, which is at its first batch).
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, worker.local_world_size))))
    backend = "none" if config.tokens_only else resolve_backend(config.backend)
    if not config.tokens_only and cheap_checks:
        check_options(backend, config.teacher_options())
    # Before anything touches CUDA: this worker's GPU set (vLLM's engine uses the first t visible GPUs).
    if backend == "vllm" or (config.device == "auto" and worker.local_world_size > 1):
        assign_gpus(worker, config.tensor_parallel_size if backend == "vllm" else 1)
    domains = discover_domains(config.data)
    tok_source = config.tokenizer or config.teacher
    tok = load_tokenizer(tok_source, revision=config.revision if not config.tokenizer else None, trust_remote_code=config.trust_remote_code)
    encoding = config.storage_encoding()
    dtype = config.dtype if config.tokens_only else resolve_dtype(config.dtype, resolve_device(config.device, worker))
    pool = config.sample_pool or (DEFAULT_SAMPLE_POOL if backend == "vllm" and config.targets == "sampled" else None)
    resolved = replace(config, dtype=dtype, backend=config.backend if config.tokens_only else backend, sample_pool=pool,
                       row_start=resolve_row_start(config.row_start, tok))
    config = replace(resolved, shard_sequences=config.shard_sequences or auto_shard_sequences(resolved, resolved.target_spec(), encoding))
    layout = corpus_layout(domains)
    fps = {
        "corpus": layout,
        "teacher": model_fingerprint(config.teacher, config.revision) if config.teacher else "",
        "tokenizer": tokenizer_info(tok)["fingerprint"],
        "backend": backend,
    }
    return _Inputs(config, worker, backend, domains, tok, tok_source, config.target_spec(), encoding, fps,
                   build_fingerprint(config, layout, fps["teacher"], fps["tokenizer"], backend))


def _open_teacher(inputs: _Inputs, teacher: Teacher | None, stack: ExitStack, progress: bool) -> tuple[Any, int]:
    """Stage 2: the teacher (loaded unless given; closed with `stack` if loaded here) and
    its vocabulary, checked against the tokenizer and the options."""
    config, spec, tok = inputs.config, inputs.spec, inputs.tok
    if config.tokens_only:
        return _TokensOnlyTeacher(), len(tok)
    if teacher is None:
        teacher = load_teacher(inputs.backend, config.teacher, seq_len=config.seq_len, **config.teacher_options(),
                               top_k=max(config.top_k, config.samples if config.targets == "sampled" else 0, config.sample_pool or 0))
        stack.callback(teacher.close)
    vocab = teacher.vocab_size
    if len(tok) > vocab:
        raise ConfigError(f"the tokenizer ({inputs.tok_source}) has {len(tok):,} tokens but the teacher's output has {vocab:,} rows: "
                          "token ids past its rows would crash its forward pass; use the teacher's own tokenizer")
    if vocab > len(tok) and progress and inputs.worker.rank == 0:
        tqdm.write(f"warning: the teacher has {vocab:,} output rows, its tokenizer {len(tok):,} tokens: targets may keep ids past "
                   "the tokenizer (padding rows, usually of tiny probability); a student needs as many output rows")
    if spec.kind == "topk" and config.top_k > vocab:
        raise ConfigError(f"--top-k {config.top_k} is larger than the teacher's vocabulary ({vocab})")
    if config.sample_pool is not None and config.sample_pool > vocab:
        raise ConfigError(f"--sample-pool {config.sample_pool} is larger than the teacher's vocabulary ({vocab})")
    if teacher.max_context is not None and config.seq_len > teacher.max_context:
        raise ConfigError(f"--seq-len {config.seq_len} is longer than the teacher's context ({teacher.max_context} tokens)")
    inputs.encoding.check(spec)
    return teacher, vocab


def _create_store(inputs: _Inputs, teacher: Any, vocab: int) -> bool:
    """Stage 3: the store's metadata (state "initializing"); True if this worker created it."""
    config, domains, tok = inputs.config, inputs.domains, inputs.tok
    files = [{"domain": s.name, **stat} for s in domains for stat in s.stats()]
    unread = [str(p) for p in unread_files(domains)]
    meta = CacheMeta(
        format_version=0, state=STATE_INITIALIZING, encoding=inputs.encoding, targets=inputs.spec, seq_len=config.seq_len,
        shard_sequences=config.shard_sequences, vocab_size=vocab, top_k=inputs.spec.entries,
        teacher=teacher.info() if not config.tokens_only else {"name_or_path": inputs.tok_source, "backend": "none", "fingerprint": ""},
        tokenizer=tokenizer_info(tok), corpus={"path": config.data if is_url(config.data) else os.path.abspath(config.data),
                                               "layout": inputs.fps["corpus"], "files": files,
                                               **({"unread": unread[:100], "unread_count": len(unread)} if unread else {})},
        build_args={k: v for k, v in config.to_dict().items() if k not in ("num_shards", "shard_index")},
        build_fingerprint=inputs.fingerprint, row_start=config.row_start,
    )
    existing, created = CacheWriter.initialize(config.out, meta)
    if existing.build_fingerprint != inputs.fingerprint:  # another build won a race for this --out
        raise StoreError(f"{config.out} was just created by another build ({_mismatch(existing, config, inputs.fps)})")
    return created


def _stage(inputs: _Inputs, writer: CacheWriter, vocab: int, result: BuildResult, phases: dict[str, float], progress: bool,
           hook: Hook) -> Plan:
    """Stages 4-5: tokenize and stage this worker's pieces, wait for every worker's, then
    make the plan (which tokens go into which sequence) and the arrays, once."""
    config, tok = inputs.config, inputs.tok
    packing = PackingConfig(seq_len=config.seq_len, seed=config.seed, text_field=config.text_field, val_tokens=config.val_tokens,
                            val_max_fraction=config.val_max_fraction, max_tokens=config.max_tokens_per_domain,
                            part_chars=config.max_document_chars, vocab_size=vocab,
                            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                            bos_id=tok.bos_token_id if config.row_start == "bos" else None)
    pieces = {s.name: plan_pieces(s, max(1, int(config.piece_mb * (1 << 20)))) for s in inputs.domains}
    mark = time.perf_counter()
    result.pieces_tokenized = _tokenize(writer.objects, inputs.domains, pieces, document_tokenizer(tok, config.chat_template or None, inputs.tok_source),
                                        packing, inputs.worker, progress, config.wait_timeout, hook)
    hook("tokenized", {})
    phases["tokenize"], mark = time.perf_counter() - mark, time.perf_counter()
    plan = _plan(writer.objects, inputs.domains, pieces, packing)
    result.chat_no_loss = {d: p.no_loss for d, p in plan.domains.items() if p.no_loss}
    result.chat_cut = {d: p.cut for d, p in plan.domains.items() if p.cut}
    if writer.meta.state == STATE_INITIALIZING:
        meta = writer.meta
        meta.corpus["sha256"] = plan.corpus_sha256()
        writer.meta = meta
        writer.create_arrays({name: p.info() for name, p in plan.domains.items()})
    phases["plan + create store"] = time.perf_counter() - mark
    return plan


def balance(sizes: list[int], workers: int) -> list[list[int]]:
    """Each worker's items (indices into `sizes`, in index order): largest first, each to the
    worker with the least work so far (ties: the lowest index). Deterministic in the sizes
    and the worker count, so every worker computes the same split; it evens out items of
    unequal size (the last shard of every split is short; pieces of small domains too),
    which taking every N-th item would not."""
    import heapq

    heap = [(0, w) for w in range(workers)]
    out: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, w = heapq.heappop(heap)
        out[w].append(i)
        heapq.heappush(heap, (load + sizes[i], w))
    return [sorted(mine) for mine in out]


def assign_shards(shards: list[Shard], workers: int) -> list[list[Shard]]:
    """Each worker's shards, balanced by sequences (see `balance`)."""
    return [[shards[i] for i in mine] for mine in balance([s.stop - s.start for s in shards], workers)]


def _need(raw: bytes | None, message: str) -> bytes:
    if raw is None:
        raise StoreError(message + "; the cache is damaged: delete it and build again")
    return raw


def _tokenize(objects: Objects, domains: list[DomainSource], pieces: dict[str, list[Piece]], tokenize: Any, cfg: PackingConfig,
              worker: Worker, progress: bool, wait_timeout: float, hook: Hook) -> int:
    """Tokenize and stage this worker's pieces (resuming: pieces already staged are skipped),
    write its summary, then wait until every worker's pieces are staged."""
    everything = [(s, p) for s in domains for p in pieces[s.name]]
    done = done_pieces(objects)
    owner = {}
    for w, items in enumerate(balance([p.nbytes for _, p in everything], worker.world_size)):
        owner.update(dict.fromkeys(items, w))
    mine = [everything[i] for i in range(len(everything)) if owner[i] == worker.rank]
    todo = [(s, p) for s, p in mine if (s.name, p.index) not in done]
    label = "tokenize" if worker.world_size == 1 else f"tokenize (worker {worker.rank}/{worker.world_size})"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=label, unit=" piece", disable=not progress)
    stats: dict[str, dict[int, dict]] = {}
    count = 0
    per_seq = cfg.seq_len
    cands = {s.name: Candidates(limit=-(-cfg.val_tokens // per_seq) * per_seq) for s in domains}
    for source, piece in mine:
        if (source.name, piece.index) in done:
            index = read_index(objects, source.name, piece.index)
        else:
            tokenize_piece(objects, source, piece, tokenize, cfg)
            index = read_index(objects, source.name, piece.index)
            bar.update(1)
            count += 1
            hook("piece_tokenized", {"piece": (source.name, piece.index), "count": count})
        stats.setdefault(source.name, {})[piece.index] = index.stats
        c = cands[source.name]
        if index.stats.get("data") == CHAT and not c.chat:
            c.chat, c.limit = True, -(-cfg.val_tokens // per_seq)
        c.add(piece.index, index)
    bar.close()
    write_summary(objects, tuple(worker), stats, cands)
    _wait_for_pieces(objects, everything, owner, worker, progress, wait_timeout)
    return len(todo)


def _wait_for_pieces(objects: Objects, everything: list[tuple[DomainSource, Piece]], owner: dict[int, int], worker: Worker,
                     progress: bool, timeout: float) -> None:
    """Until every piece is staged; shows which workers are behind. Gives up only after
    `timeout` seconds without any new piece (a worker that died and was not restarted).
    Polls with a growing interval (1 s to 10 s, back to 1 s on progress): on object stores
    a poll is a listing."""
    wanted = {(s.name, p.index): owner[i] for i, (s, p) in enumerate(everything)}
    last, last_change = -1, time.monotonic()
    bar = None
    interval = 1.0
    while True:
        done = done_pieces(objects) & set(wanted)
        if len(done) == len(wanted):
            break
        if len(done) != last:
            last, last_change, interval = len(done), time.monotonic(), 1.0
        if bar is None and progress:
            bar = tqdm(total=len(wanted), desc="waiting for other workers' pieces", unit=" piece")
        behind: dict[int, int] = {}
        for key, w in wanted.items():
            if key not in done:
                behind[w] = behind.get(w, 0) + 1
        if bar is not None:
            bar.n = len(done)
            bar.set_postfix_str(", ".join(f"worker {w}: {n} left" for w, n in sorted(behind.items())[:4]))
            bar.refresh()
        if time.monotonic() - last_change > timeout:
            raise StoreError(
                f"waited {timeout:.0f}s without any new tokenized piece; still missing: "
                + ", ".join(f"worker {w} ({n} pieces)" for w, n in sorted(behind.items()))
                + "; start (or restart) those workers with the same command, or raise --wait-timeout"
            )
        time.sleep(interval)
        interval = min(10.0, interval * 1.5)
    if bar is not None:
        bar.close()


def _plan(objects: Objects, domains: list[DomainSource], pieces: dict[str, list[Piece]], cfg: PackingConfig) -> Plan:
    """The build's plan: made once (by whichever worker gets there first; the content is
    deterministic, so a concurrent second one writes the same bytes)."""
    raw = objects.get(PLAN_KEY)
    if raw is not None:
        return Plan.from_bytes(raw)
    plan = make_plan(objects, domains, pieces, cfg)
    objects.put_if_absent(PLAN_KEY, plan.to_bytes())
    return Plan.from_bytes(objects.get(PLAN_KEY) or plan.to_bytes())


def finalize(out: str) -> CacheMeta:
    """`ddk-cache build --finalize`: mark a cache whose shards are all written complete."""
    writer = CacheWriter(out)
    if writer.meta.state == STATE_COMPLETE:
        return writer.meta
    if writer.meta.state == STATE_INITIALIZING:
        raise StoreError(f"{out} cannot be finalized: its corpus is still being tokenized; run the build workers")
    records = writer.records()
    pending = writer.pending(records)
    if pending:
        raise StoreError(f"{out} cannot be finalized: {describe_pending(pending)}; run the workers that own them again")
    return writer.finalize(records)


__all__ = ["BuildConfig", "BuildResult", "auto_shard_sequences", "build", "finalize", "resolve_worker"]
