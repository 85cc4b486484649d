"""`ddk-cache build`: corpus -> packed sequences -> teacher top-k -> a complete cache.

Order of work, chosen so bad input fails fast and a crash anywhere can be resumed:
  1. read the corpus layout and the teacher's tokenizer (cheap errors first);
  2. check --out: new, resumable (same build fingerprint), or refused;
  3. load the teacher, check --top-k and --seq-len against it;
  4. worker 0 tokenizes + packs every domain, creates the store and writes the tokens
     (skipped on resume); other workers wait for that;
  5. each worker scores its pending shards (every N-th shard for worker I of N); a
     background thread writes a shard while the next is scored;
  6. whoever sees no shard pending finalizes: teacher perplexity table from the stored
     per-sequence sums, state "complete" (also `ddk-cache build --finalize`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .corpus import corpus_fingerprint, discover_domains, iter_documents
from ..store.encodings import PackEncoding, PlainEncoding
from ..errors import ConfigError, StoreError, StoreVersionError
from .packing import pack_domain
from ..store.cache import STATE_COMPLETE, STATE_INITIALIZING, CacheWriter, Shard, describe_pending, format_bytes, path_is_empty, read_root_meta
from .teachers import BACKENDS, Teacher, load_teacher, resolve_backend
from ..store.targets import DEFAULT_SAMPLE_POOL, TargetSpec, shard_seed
from .teachers.base import model_fingerprint, resolve_device, resolve_dtype
from .tokenization import load_tokenizer, tokenize_documents, tokenizer_info

# Raw bytes of one shard's top-k log-probs the automatic --shard-sequences aims at: big
# enough for good compression and few files, small enough to resume at a fine grain.
AUTO_SHARD_BYTES = 16 << 20


@dataclass(frozen=True)
class BuildConfig:
    """Everything `ddk-cache build` takes. Written into the cache as `build_args`."""

    teacher: str  # model directory or hub id
    data: str  # corpus directory or .yaml/.toml spec
    out: str  # cache path or fsspec URL (s3://bucket/cache.zarr)
    top_k: int = 64  # entries kept per position (at most)
    targets: str = "topk"  # topk (adaptive with min_mass/min_prob) or sampled (targets.py)
    min_mass: float | None = None  # adaptive top-k: keep entries until their mass reaches this
    min_prob: float | None = None  # adaptive top-k: drop entries below this probability
    samples: int = 50  # sampled targets: draws per position
    sample_temperature: float = 1.0  # sampled targets: draw from softmax(logits / this)
    sample_pool: int | None = None  # sampled targets: draw from the top-this only; None = full (hf), 256 (vllm)
    encoding: str = "pack"  # pack (pack-v1: small, log-probs within kl_budget) or plain (plain-v1: exact float32)
    kl_budget: float = 1e-4  # pack-v1: quantisation KL per position, nats
    seq_len: int = 2048  # tokens per packed sequence
    backend: str = "auto"  # teacher engine: vllm if installed, else hf
    text_field: str = "text"  # JSON field holding a document's text
    val_sequences: int = 8  # held-out sequences per domain (DDK evaluates on them)
    max_tokens_per_domain: int | None = None  # cap per domain, after shuffling documents
    seed: int = 0  # document shuffle seed
    dtype: str = "auto"  # teacher dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    device: str = "auto"  # torch device for the hf backend
    batch_size: int = 8  # sequences per forward pass (hf backend)
    shard_sequences: int = 0  # sequences per shard (unit of work and of resume); 0 = automatic
    revision: str | None = None  # teacher revision on a hub
    trust_remote_code: bool = False  # never run model code from the hub unless asked
    clevel: int = 5  # zstd level of the plain-v1 encoding
    num_shards: int | None = None  # workers sharing this build; None = from torchrun/srun or 1
    shard_index: int | None = None  # this worker's index in 0..num_shards-1
    wait_timeout: float = 7200.0  # seconds a worker > 0 waits for worker 0 to create the store
    writer_threads: int = 0  # shards encoded and written at once; 0 = half the CPU cores, 1 to 8
    tensor_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float | None = None  # vLLM; None = 0.9 on GPU, 0.3 on the CPU build
    max_num_batched_tokens: int | None = None  # vLLM
    logprobs_format: str = "flat"  # vLLM prompt-logprob container: flat lists (fast) or dicts
    engine_args: dict[str, Any] = field(default_factory=dict)  # more vLLM engine arguments

    # Fields that change the cache's bytes: a store built with other values is refused.
    CONTENT_FIELDS = ("top_k", "seq_len", "text_field", "val_sequences", "max_tokens_per_domain", "seed", "dtype", "shard_sequences", "clevel",
                      "targets", "min_mass", "min_prob", "samples", "sample_temperature", "sample_pool", "encoding", "kl_budget")

    def __post_init__(self) -> None:
        checks = [
            (self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (self.val_sequences >= 1, f"--val-sequences must be >= 1 (DDK evaluates every domain on it), got {self.val_sequences}"),
            (self.max_tokens_per_domain is None or self.max_tokens_per_domain >= 1, f"--max-tokens-per-domain must be >= 1, got {self.max_tokens_per_domain}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.shard_sequences >= 0, f"--shard-sequences must be >= 0 (0 = automatic), got {self.shard_sequences}"),
            (1 <= self.clevel <= 9, f"--clevel must be in 1..9, got {self.clevel}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.num_shards is None or self.num_shards >= 1, f"--num-shards must be >= 1, got {self.num_shards}"),
            ((self.num_shards is None) == (self.shard_index is None), "--num-shards and --shard-index go together"),
            (self.num_shards is None or 0 <= (self.shard_index or 0) < self.num_shards, f"--shard-index must be in 0..{(self.num_shards or 1) - 1}, got {self.shard_index}"),
            (0 <= self.writer_threads <= 64, f"--writer-threads must be in 0..64 (0 = automatic), got {self.writer_threads}"),
            (self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1, f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.encoding in ("pack", "plain"), f"--encoding must be pack or plain, got {self.encoding!r}"),
            (self.encoding == "pack" or self.targets == "topk", "--targets sampled needs --encoding pack (plain-v1 has no counts)"),
            (self.sample_pool is None or self.sample_pool >= 2, f"--sample-pool must be >= 2, got {self.sample_pool}"),
            (1e-5 <= self.kl_budget <= 1e-2, f"--kl-budget must be in 1e-05..0.01, got {self.kl_budget}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.target_spec()  # validates the target options

    def target_spec(self) -> TargetSpec:
        """What the cache keeps per position (stored in its metadata as `targets`)."""
        return TargetSpec(kind=self.targets, k=self.top_k, min_mass=self.min_mass, min_prob=self.min_prob, samples=self.samples,
                          sample_temperature=self.sample_temperature, sample_pool=self.sample_pool, seed=self.seed)

    def storage_encoding(self) -> PlainEncoding | PackEncoding:
        """How the cache's arrays become bytes (encodings.py)."""
        return PackEncoding(kl_budget=self.kl_budget) if self.encoding == "pack" else PlainEncoding(clevel=self.clevel)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildResult:
    """What a build (or one worker of it) did: the final metadata and where the time went."""

    meta: dict[str, Any]
    worker: tuple[int, int] = (0, 1)
    shards_written: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    write_seconds: float = 0.0  # summed over writer threads (encode + write)
    stall_seconds: float = 0.0  # time the teacher sat idle waiting for a writer
    phase_seconds: dict[str, float] = field(default_factory=dict)  # load, initialize, score, finalize
    already_complete: bool = False
    pending_elsewhere: int = 0  # shards other workers still have to write

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds else 0.0


Hook = Callable[[str, dict[str, Any]], None]


def auto_shard_sequences(seq_len: int, top_k: int) -> int:
    """Sequences per shard so one shard's float32 top-k log-probs are about AUTO_SHARD_BYTES."""
    return max(1, min(1024, AUTO_SHARD_BYTES // ((seq_len - 1) * top_k * 4)))


def expected_size(meta: dict[str, Any], spec: TargetSpec, encoding: str) -> str:
    """A rough size of the finished cache, printed before the teacher starts.

    Per predicted position: plain-v1 stores 8 bytes per entry (int32 + float32, about 0.75x
    after zstd); pack-v1 about 0.85 bytes per top-k entry + 4, or 1.5 per sampled id + 1
    (BENCHMARKS.md, 32k-vocabulary teacher; peakier teachers need less). Plus 8 raw
    bytes per position for the token and the target log-prob."""
    sequences = sum(d[s]["sequences"] for d in meta["domains"].values() for s in ("train", "val"))
    positions = sequences * (meta["seq_len"] - 1)
    entries = spec.entries
    if encoding == "plain":
        per = 0.75 * 8 * entries
    elif spec.kind == "sampled":
        per = 1.5 * min(entries, 0.25 * spec.samples + 1) + 1
    else:
        per = 0.85 * entries + 4
    total = positions * (per + 8)
    return f"expected cache size: about {format_bytes(total)} ({per:.0f} B/position for the targets, {positions:,} positions)"


def auto_writer_threads() -> int:
    """Half the cores, 1 to 8: the rest stay with the teacher (tokenizer, CPU forward passes)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def resolve_worker(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(index, count) of this worker: the flags, else torchrun's RANK/WORLD_SIZE, else srun's, else (0, 1)."""
    if num_shards is not None:
        return int(shard_index or 0), num_shards
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if size in os.environ and rank in os.environ:
            index, count = int(os.environ[rank]), int(os.environ[size])
            if not 0 <= index < count:
                raise ConfigError(f"{rank}={index} is outside 0..{count - 1} ({size}={count})")
            return index, count
    return 0, 1


def build_fingerprint(config: BuildConfig, corpus_fp: str, teacher_fp: str, tokenizer_fp: str, backend: str) -> str:
    """A hash of everything that determines the cache's content (not batch size, device or workers)."""
    content = {f: getattr(config, f) for f in BuildConfig.CONTENT_FIELDS}
    blob = json.dumps({"args": content, "corpus": corpus_fp, "teacher": teacher_fp, "tokenizer": tokenizer_fp, "backend": backend}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _existing(out: str) -> dict[str, Any] | None:
    """The metadata of the cache at `out`; None if nothing is there. Refuses anything else."""
    if path_is_empty(out):
        return None
    if "://" not in out and not os.path.isdir(out):
        raise StoreError(f"--out {out} is a file, not a cache; choose another --out")
    try:
        return read_root_meta(out)
    except StoreVersionError:
        raise  # a cache, but of another version: say that, not "not a cache"
    except StoreError:
        raise StoreError(f"--out {out} holds something that is not a ddk-cache store; choose another --out or remove it") from None


def _mismatch(existing: dict[str, Any], config: BuildConfig, fingerprints: dict[str, str]) -> str:
    """Name what differs between an existing cache and this build."""
    old_args = existing.get("build_args", {})
    diffs = [f"{f}: {getattr(config, f)!r} here, {old_args.get(f)!r} in the cache" for f in BuildConfig.CONTENT_FIELDS if old_args.get(f) != getattr(config, f)]
    if existing.get("corpus", {}).get("fingerprint") != fingerprints["corpus"]:
        diffs.append("the corpus files differ")
    if existing.get("teacher", {}).get("fingerprint") != fingerprints["teacher"]:
        diffs.append(f"the teacher differs (cache: {existing.get('teacher', {}).get('name_or_path')})")
    if existing.get("tokenizer", {}).get("fingerprint") != fingerprints["tokenizer"]:
        diffs.append("the tokenizer differs")
    if existing.get("teacher", {}).get("backend") != fingerprints["backend"]:
        diffs.append(f"backend: {fingerprints['backend']} here, {existing.get('teacher', {}).get('backend')} in the cache")
    return "; ".join(diffs) or "the build fingerprint differs"


def _check_same_build(out: str, existing: dict[str, Any], fingerprint: str, config: BuildConfig, fps: dict[str, str]) -> None:
    if existing.get("build_fingerprint") != fingerprint:
        raise StoreError(f"{out} was built by another build ({_mismatch(existing, config, fps)}); use another --out or delete it")


def _wait_for_store(out: str, worker: tuple[int, int], timeout: float) -> dict[str, Any]:
    """Block until worker 0 has created the store and written the tokens; return its metadata."""
    deadline = time.monotonic() + timeout
    while True:
        meta = None if path_is_empty(out) else _existing(out)
        if meta is not None and meta.get("state") != STATE_INITIALIZING:
            return meta
        if time.monotonic() > deadline:
            raise StoreError(
                f"worker {worker[0]} of {worker[1]} waited {timeout:.0f}s for worker 0 to create {out}; "
                "start worker 0 (--shard-index 0) or raise --wait-timeout"
            )
        time.sleep(1.0)


def build(config: BuildConfig, *, progress: bool = True, hook: Hook | None = None, teacher: Teacher | None = None) -> BuildResult:
    """Build (or resume, or confirm complete) the cache described by `config`, as one worker.

    `hook(event, info)` is called at "store_created", "shard_written" and "before_finalize";
    tests raise from it to simulate a crash at that point. `teacher`, if given, is an
    already loaded teacher of `config.teacher` and `config.backend` (left open afterwards),
    so several builds can share one engine.
    """
    hook = hook or (lambda event, info: None)
    started = time.perf_counter()
    worker = resolve_worker(config.num_shards, config.shard_index)
    domains = discover_domains(config.data)
    tok = load_tokenizer(config.teacher, revision=config.revision, trust_remote_code=config.trust_remote_code)
    backend = resolve_backend(config.backend)
    # Resolve "auto" choices first: the fingerprint must name what was actually used.
    shard_sequences = config.shard_sequences or auto_shard_sequences(config.seq_len, config.top_k)
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    # vLLM returns only top-k log-probs: sampled targets come from a top-256 pool there.
    pool = config.sample_pool or (DEFAULT_SAMPLE_POOL if backend == "vllm" and config.targets == "sampled" else None)
    config = BuildConfig(**{**config.to_dict(), "shard_sequences": shard_sequences, "dtype": dtype, "backend": backend, "sample_pool": pool})
    spec = config.target_spec()
    fps = {
        "corpus": corpus_fingerprint(domains),
        "teacher": model_fingerprint(config.teacher, config.revision),
        "tokenizer": tokenizer_info(tok)["fingerprint"],
        "backend": backend,
    }
    fingerprint = build_fingerprint(config, fps["corpus"], fps["teacher"], fps["tokenizer"], backend)

    existing = _existing(config.out)
    if existing is not None:
        _check_same_build(config.out, existing, fingerprint, config, fps)
        if existing.get("state") == STATE_COMPLETE:
            return BuildResult(meta=existing, worker=worker, already_complete=True, seconds=time.perf_counter() - started)

    phases: dict[str, float] = {}
    mark = time.perf_counter()
    own_teacher = teacher is None
    teacher = teacher or load_teacher(
        backend, config.teacher, top_k=max(config.top_k, pool or 0), seq_len=config.seq_len, dtype=config.dtype, device=config.device,
        batch_size=config.batch_size, revision=config.revision, trust_remote_code=config.trust_remote_code,
        tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens, logprobs_format=config.logprobs_format,
        engine_args=dict(config.engine_args),
    )
    try:
        if config.top_k > teacher.vocab_size:
            raise ConfigError(f"--top-k {config.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size})")
        if pool is not None and pool > teacher.vocab_size:
            raise ConfigError(f"--sample-pool {pool} is larger than the teacher's vocabulary ({teacher.vocab_size})")
        if teacher.max_context is not None and config.seq_len > teacher.max_context:
            raise ConfigError(f"--seq-len {config.seq_len} is longer than the teacher's context ({teacher.max_context} tokens)")

        phases["load teacher"], mark = time.perf_counter() - mark, time.perf_counter()
        needs_init = existing is None or existing.get("state") == STATE_INITIALIZING
        if needs_init and worker[0] == 0:
            _initialize(config, domains, tok, teacher, fps, fingerprint, progress)
        elif needs_init:
            _check_same_build(config.out, _wait_for_store(config.out, worker, config.wait_timeout), fingerprint, config, fps)
        hook("store_created", {"path": config.out})
        phases["tokenize + create store"], mark = time.perf_counter() - mark, time.perf_counter()

        writer = CacheWriter(config.out)
        if progress and worker[0] == 0:
            tqdm.write(expected_size(writer.meta, spec, config.encoding))
        result = BuildResult(meta=writer.meta, worker=worker, phase_seconds=phases)
        mine = {s for i, s in enumerate(writer.shards()) if i % worker[1] == worker[0]}
        threads = config.writer_threads or auto_writer_threads()
        _score(writer, [s for s in writer.pending() if s in mine], teacher, spec, result, progress, hook, threads)
    finally:
        if own_teacher:
            teacher.close()

    phases["score + write"], mark = time.perf_counter() - mark, time.perf_counter()
    pending = writer.pending()
    result.seconds = time.perf_counter() - started
    if pending:  # other workers are still at it: the last one to finish finalizes
        result.pending_elsewhere = len(pending)
        return result
    hook("before_finalize", {})
    result.meta = writer.finalize()
    phases["finalize"] = time.perf_counter() - mark
    result.seconds = time.perf_counter() - started
    return result


def _initialize(config: BuildConfig, domains: list, tok: Any, teacher: Any, fps: dict[str, str], fingerprint: str, progress: bool) -> None:
    """Tokenize and pack every domain, then create the store with its tokens (worker 0 only)."""
    packed = {}
    for source in domains:
        docs = tqdm(iter_documents(source, config.text_field), desc=f"tokenize {source.name}", unit=" docs", disable=not progress, leave=False)
        packed[source.name] = pack_domain(
            source.name, list(tokenize_documents(tok, docs)), seq_len=config.seq_len,
            val_sequences=config.val_sequences, max_tokens=config.max_tokens_per_domain, seed=config.seed,
        )
    meta = {
        "teacher": teacher.info(),
        "tokenizer": tokenizer_info(tok),
        "vocab_size": teacher.vocab_size,
        "seq_len": config.seq_len,
        "domains": {
            name: {
                "train": {"sequences": len(p.train.tokens), "documents": p.train.documents},
                "val": {"sequences": len(p.val.tokens), "documents": p.val.documents},
                "tokens_read": p.tokens_read,
            }
            for name, p in packed.items()
        },
        "corpus": {"path": str(Path(config.data).resolve()), "fingerprint": fps["corpus"], "files": {s.name: [str(f) for f in s.files] for s in domains}},
        "build_args": {k: v for k, v in config.to_dict().items() if k not in ("num_shards", "shard_index")},
        "build_fingerprint": fingerprint,
    }
    splits = {name: {"train": p.train.tokens, "val": p.val.tokens} for name, p in packed.items()}
    CacheWriter.create(config.out, meta, splits, targets=config.target_spec(), shard_sequences=config.shard_sequences, encoding=config.storage_encoding())


def _score(writer: CacheWriter, shards: list[Shard], teacher: Any, spec: TargetSpec, result: BuildResult, progress: bool, hook: Hook, threads: int) -> None:
    """Score `shards`; `threads` background writers encode and write while the next shards are scored."""
    seq_len = writer.meta["seq_len"]
    label = "teacher" if result.worker[1] == 1 else f"teacher (worker {result.worker[0]}/{result.worker[1]})"
    bar = tqdm(total=sum(s.stop - s.start for s in shards) * seq_len, desc=label, unit=" tok", unit_scale=True, disable=not progress)
    in_flight: list[tuple[Future, Shard]] = []

    def timed_write(shard: Shard, scores: Any) -> float:
        t0 = time.perf_counter()
        writer.write_shard(shard, scores.topk_ids, scores.topk_logprobs, scores.target_logprob, scores.counts)
        return time.perf_counter() - t0

    def drain(keep: int) -> None:
        # At most `keep` writes stay queued, bounding memory to a few shards; waiting here is
        # time the teacher is idle, which is what "never stall the engine" is measured by.
        while len(in_flight) > keep:
            future, shard = in_flight.pop(0)
            t0 = time.perf_counter()
            result.write_seconds += future.result()
            result.stall_seconds += time.perf_counter() - t0
            result.shards_written += 1
            hook("shard_written", {"shard": shard, "count": result.shards_written})

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ddk-cache-writer") as pool:
        for shard in shards:
            tokens = writer.read_tokens(shard)
            t0 = time.perf_counter()
            scores = teacher.targets(tokens, spec, shard_seed(spec, shard.domain, shard.split, shard.index))
            result.teacher_seconds += time.perf_counter() - t0
            in_flight.append((pool.submit(timed_write, shard, scores), shard))
            result.tokens_scored += tokens.size
            bar.update(tokens.size)
            drain(keep=threads)
        drain(keep=0)
    bar.close()


def finalize(out: str) -> dict[str, Any]:
    """`ddk-cache build --finalize`: mark a cache whose shards are all written complete."""
    writer = CacheWriter(out)
    if writer.meta.get("state") == STATE_COMPLETE:
        return writer.meta
    pending = writer.pending()
    if pending:
        raise StoreError(f"{out} cannot be finalized: {describe_pending(pending)}; run the workers that own them again")
    return writer.finalize()


__all__ = ["BuildConfig", "BuildResult", "build", "finalize", "auto_shard_sequences", "resolve_worker"]
