"""Find a corpus's domains and read their documents.

A corpus is either a directory (one domain per file or per sub-folder; the domain is the
file stem or folder name) or a YAML/TOML spec mapping each domain to a list of globs.
Every error names the file (and line) at fault and says what to do.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from ..errors import CorpusError

# Suffixes a domain file may have, longest first so `.jsonl.gz` wins over `.gz`.
DOCUMENT_SUFFIXES = (".jsonl.gz", ".jsonl", ".txt", ".parquet")
SPEC_SUFFIXES = (".yaml", ".yml", ".toml")
# Domain names become Zarr group names: keep them portable across file systems and object stores.
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class DomainSource:
    """One domain: its name and the files (sorted) that hold its documents."""

    name: str
    files: tuple[Path, ...]


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in DOCUMENT_SUFFIXES if name.endswith(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def _check_name(name: str, origin: Path) -> str:
    if not DOMAIN_NAME.match(name):
        raise CorpusError(
            f"{origin}: domain name {name!r} must be 1-100 letters, digits, '_', '.' or '-' "
            "starting with a letter or digit; rename it"
        )
    return name


def _files_under(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p)))


def discover_domains(data: str | Path) -> list[DomainSource]:
    """Resolve a corpus directory or spec file into domains, sorted by name.

    Raises CorpusError for a missing path, a corpus with no readable files, a domain with
    no files, or a domain name that cannot be a Zarr group name.
    """
    path = Path(data)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist; pass a directory or a .yaml/.toml spec to --data")
    if path.is_file():
        if path.suffix.lower() not in SPEC_SUFFIXES:
            raise CorpusError(
                f"{path}: --data takes a corpus directory or a .yaml/.yml/.toml spec, not a {path.suffix or 'plain'} file"
            )
        return _domains_from_spec(path)

    domains: dict[str, DomainSource] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = _files_under(entry)
            if not files:
                continue
            name = _check_name(entry.name, entry)
        elif _suffix(entry):
            files = (entry,)
            name = _check_name(_stem(entry), entry)
        else:
            continue
        if name in domains:
            raise CorpusError(
                f"{path}: domain {name!r} is defined twice ({domains[name].files[0]} and {files[0]}); rename one"
            )
        domains[name] = DomainSource(name, files)
    if not domains:
        raise CorpusError(
            f"{path} holds no corpus files: expected one domain per {', '.join(DOCUMENT_SUFFIXES)} file "
            "or per sub-folder of such files"
        )
    return [domains[n] for n in sorted(domains)]


def _domains_from_spec(spec: Path) -> list[DomainSource]:
    try:
        text = spec.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if spec.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise CorpusError(f"{spec}: cannot read the data spec: {e}") from None
    mapping = raw.get("domains", raw) if isinstance(raw, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise CorpusError(f"{spec}: expected a mapping 'domains: {{name: [glob, ...]}}' with at least one domain")
    domains = []
    for name, globs in sorted(mapping.items()):
        _check_name(str(name), spec)
        globs = [globs] if isinstance(globs, str) else globs
        if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
            raise CorpusError(f"{spec}: domain {name!r} must map to a glob or a list of globs")
        files: set[Path] = set()
        for pattern in globs:
            # Relative globs are relative to the spec file, so a spec travels with its corpus.
            full = pattern if Path(pattern).is_absolute() else str(spec.parent / pattern)
            matched = [Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()]
            if not matched:
                raise CorpusError(f"{spec}: glob {pattern!r} of domain {name!r} matches no file")
            for p in matched:
                if not _suffix(p):
                    raise CorpusError(f"{spec}: {p} (domain {name!r}) is not a {', '.join(DOCUMENT_SUFFIXES)} file")
                files.add(p)
        domains.append(DomainSource(str(name), tuple(sorted(files))))
    return domains


def iter_documents(source: DomainSource, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of a domain, file by file, in file order.

    `.jsonl`/`.jsonl.gz`: one JSON object per line, the text under `text_field`.
    `.txt`: the whole file is one document. `.parquet`: the `text_field` column (needs pyarrow).
    """
    for path in source.files:
        suffix = _suffix(path)
        if suffix in (".jsonl", ".jsonl.gz"):
            yield from _read_jsonl(path, text_field)
        elif suffix == ".txt":
            text = _decode(path.read_bytes(), path, None)
            if text.strip():
                yield text
        elif suffix == ".parquet":
            yield from _read_parquet(path, text_field)


def _decode(raw: bytes, path: Path, line: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise CorpusError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = _decode(raw, path, line_no).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(
                        f"{path}:{line_no}: no {text_field!r} field (found: {keys}); pass --text-field to name the text field"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, expected a string")
                if text.strip():
                    yield text
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: cannot read: {e}") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading .parquet needs pyarrow: pip install 'ddk-cache[parquet]'") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no {text_field!r} column (found: {', '.join(table.schema_arrow.names)}); pass --text-field")
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def corpus_fingerprint(domains: list[DomainSource]) -> str:
    """A content hash of every file of every domain (and which domain it belongs to).

    Used to refuse resuming a build whose corpus changed underneath it.
    """
    h = hashlib.sha256()
    for source in domains:
        h.update(f"domain:{source.name}\n".encode())
        for path in source.files:
            h.update(f"file:{path.name}\n".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
