"""Find a corpus's domains, cut them into pieces, and read their documents.

A corpus is either a directory (one domain per file or per sub-folder; the domain is the
file stem or folder name) or a YAML/TOML spec mapping each domain to a list of globs.
Every error names the file (and line) at fault and says what to do.

Pieces. A domain's files, in order, are cut into pieces of about `piece_bytes` (storage
layout, "Packing"): a large file into byte ranges, small files grouped. A piece is the
unit of tokenization work, so one big file is shared by many workers. The cut never
depends on the number of workers. A byte range [start, end) of a JSON Lines or text
file owns the lines (text: the parts) that *start* inside it. `.jsonl.gz` files cannot
be cut (a gzip stream has no random access) and parquet files are cut by row group.

Long documents. Text is tokenized in parts of at most about `part_chars` characters: a
`.txt` file is cut at the first line break at or after every multiple of `part_chars`
bytes (at the multiple itself, moved forward to a UTF-8 character boundary, if no line
break follows within `part_chars`), and a JSON document's text likewise by characters.
Each part is a document of its own (its own end-of-text token, its own shuffle key), so
no document, file or line, however large, is held whole in memory beyond one JSON line.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import re
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..errors import CorpusError

# Suffixes a domain file may have, longest first so `.jsonl.gz` wins over `.gz`.
DOCUMENT_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".txt", ".parquet")
COMPRESSED = (".jsonl.gz", ".jsonl.zst")  # read as streams: one piece per file
SPEC_SUFFIXES = (".yaml", ".yml", ".toml")
# Domain names become Zarr group names: keep them portable across file systems and object stores.
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


PART_CHARS = 1 << 20  # long documents are tokenized in parts of about this many characters


@dataclass(frozen=True)
class DomainSource:
    """One domain: its name and the files (sorted) that hold its documents."""

    name: str
    files: tuple[Path, ...]
    root: Path | None = None  # file names in shuffle keys and metadata are relative to it
    unread: tuple[Path, ...] = ()  # files in the domain's folder that are not a corpus format (reported, not read)

    def relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root.resolve())) if self.root else path.name
        except ValueError:
            return str(path)

    def stats(self) -> list[dict[str, Any]]:
        """Per file: relative path, size and modification time (what a resume checks)."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append({"path": self.relative(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


@dataclass(frozen=True)
class Document:
    """One document (or part of one): its shuffle key, where it came from, and its content:
    `text`, or for chat data `messages` ([{"role", "content"}, ...])."""

    key: str
    origin: str  # "path:line" or "path@byte" for messages
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    # A sampled response (`ddk-cache generate` output): the drawn token ids of the last
    # (assistant) message and their log-probs under the distribution that drew them.
    sample: tuple[list[int], list[float]] | None = None


@dataclass(frozen=True)
class Piece:
    """One unit of tokenization work: byte ranges of a domain's files (`end` None: to the
    end of the file; parquet ranges are row groups)."""

    domain: str
    index: int
    segments: tuple[tuple[int, int, int | None], ...]  # (file index, start, end)
    nbytes: int = 0  # about how many bytes it reads (for balancing work)


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in DOCUMENT_SUFFIXES if name.endswith(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


RESERVED_NAMES = {"zarr.json", "c"}  # a group named so would collide with the store's own keys


def _check_name(name: str, origin: Path) -> str:
    if not DOMAIN_NAME.match(name):
        raise CorpusError(
            f"{origin}: domain name {name!r} must be 1-100 letters, digits, '_', '.' or '-' "
            "starting with a letter or digit; rename it"
        )
    if name.lower() in RESERVED_NAMES:
        raise CorpusError(f"{origin}: domain name {name!r} is reserved by the cache's layout (Zarr's own keys); rename it")
    return name


def _utf8(text: str, where: Any) -> str:
    """`text`, refused with its place if it holds what UTF-8 cannot encode (a lone surrogate
    such as "\\ud83d", valid in JSON text but not a character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        place = where() if callable(where) else where
        raise CorpusError(f"{place}: the text holds {text[e.start:e.end]!r} at character {e.start}, which is not a character "
                          "(a lone UTF-16 surrogate: a broken emoji escape?); fix or remove it") from None
    return text


def _hidden(path: Path, root: Path) -> bool:
    """A hidden entry at any depth below `root` (.git, .ipynb_checkpoints, .DS_Store...)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_under(folder: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(corpus files, other files) under a domain folder, sorted; hidden entries at every depth are skipped."""
    found = [p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder)]
    return tuple(sorted(p for p in found if _suffix(p))), tuple(sorted(p for p in found if not _suffix(p)))


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
    unread: list[Path] = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        other: tuple[Path, ...] = ()
        if entry.is_dir():
            files, other = _files_under(entry)
            if not files:
                unread.extend(other)
                continue
            name = _check_name(entry.name, entry)
        elif _suffix(entry):
            files = (entry,)
            name = _check_name(_stem(entry), entry)
        else:
            unread.append(entry)
            continue
        if name in domains:
            raise CorpusError(
                f"{path}: domain {name!r} is defined twice ({domains[name].files[0]} and {files[0]}); rename one"
            )
        domains[name] = DomainSource(name, files, path, other)
    if not domains:
        raise CorpusError(
            f"{path} holds no corpus files: expected one domain per {', '.join(DOCUMENT_SUFFIXES)} file "
            "or per sub-folder of such files"
            + (f" (found {len(unread)} other file(s), e.g. {unread[0].name})" if unread else "")
        )
    out = [domains[n] for n in sorted(domains)]
    if unread:  # top-level files that are no domain: reported with the first domain (build prints them)
        out[0] = DomainSource(out[0].name, out[0].files, out[0].root, out[0].unread + tuple(unread))
    return out


def unread_files(domains: list[DomainSource]) -> list[Path]:
    """Files in the corpus folders that are not read (not a corpus format), for the build's report."""
    return sorted({p for d in domains for p in d.unread})


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
    claimed: dict[Path, str] = {}
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
            literal = Path(*[part for part in Path(full).parts[: next((i for i, part in enumerate(Path(full).parts)
                                                                        if any(c in part for c in "*?[")), len(Path(full).parts))]])
            for p in matched:
                if _hidden(p, literal):
                    continue  # hidden entries the glob walked into (.git, .ipynb_checkpoints...) are never read
                if not _suffix(p):
                    raise CorpusError(f"{spec}: {p} (domain {name!r}) is not a {', '.join(DOCUMENT_SUFFIXES)} file")
                owner = claimed.setdefault(p.resolve(), str(name))
                if owner != str(name):
                    raise CorpusError(f"{spec}: {p} is matched by the globs of two domains ({owner!r} and {name!r}); "
                                      "a document can be in one domain only: narrow one glob")
                files.add(p)
            if not files:
                raise CorpusError(f"{spec}: glob {pattern!r} of domain {name!r} matches only hidden files")
        domains.append(DomainSource(str(name), tuple(sorted(files)), spec.parent))
    return domains


def iter_documents(source: DomainSource, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty text documents of a domain, file by file, in file order (no
    splitting of long documents): for training a tokenizer, or a quick look. A chat record
    yields its messages' contents, one per line."""
    for i, path in enumerate(source.files):
        for doc in read_segment(source, i, 0, None, text_field, part_chars=None):
            if doc.text is not None:
                yield doc.text
            elif doc.messages:
                yield "\n".join(m["content"] for m in doc.messages)


def plan_pieces(source: DomainSource, piece_bytes: int) -> list[Piece]:
    """Cut a domain's files into pieces of about `piece_bytes` (see the module docstring)."""
    pieces: list[Piece] = []
    current: list[tuple[int, int, int | None]] = []
    fill = 0

    def emit() -> None:
        nonlocal current, fill
        if current:
            pieces.append(Piece(source.name, len(pieces), tuple(current), fill))
        current, fill = [], 0

    for i, path in enumerate(source.files):
        suffix = _suffix(path)
        if suffix in COMPRESSED:
            emit()
            current, fill = [(i, 0, None)], 4 * path.stat().st_size  # compressed: about 4x the text
            emit()
            continue
        if suffix == ".parquet":
            emit()
            groups = _parquet_row_groups(path)
            for group in range(groups):
                current, fill = [(i, group, group + 1)], 4 * path.stat().st_size // max(1, groups)
                emit()
            continue
        size = path.stat().st_size
        at = 0
        while at < size:
            take = min(size - at, piece_bytes - fill)
            current.append((i, at, at + take if at + take < size else None))
            at += take
            fill += take
            if fill >= piece_bytes:
                emit()
    emit()
    return pieces


def read_piece(source: DomainSource, piece: Piece, text_field: str, part_chars: int | None, digest: Any = None) -> Iterator[Document]:
    """The documents a piece owns, in file order; `digest` (a hashlib object) is fed every byte read."""
    for i, start, end in piece.segments:
        yield from read_segment(source, i, start, end, text_field, part_chars, digest)


def read_segment(source: DomainSource, file_index: int, start: int, end: int | None, text_field: str,
                 part_chars: int | None = PART_CHARS, digest: Any = None) -> Iterator[Document]:
    """Documents owned by bytes [start, end) of one file (see the module docstring)."""
    path = source.files[file_index]
    rel = source.relative(path)
    suffix = _suffix(path)
    if suffix in (".jsonl", *COMPRESSED):
        yield from _read_jsonl(path, rel, start, end, text_field, part_chars, digest)
    elif suffix == ".txt":
        yield from _read_txt(path, rel, start, end, part_chars, digest)
    elif suffix == ".parquet":
        yield from _read_parquet(path, rel, start, end, text_field, part_chars, digest)


def _decode(raw: bytes, path: Path, line: int | str | None) -> str:
    """`raw` as UTF-8; the error names the file and the line (an int) or place (a str)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if isinstance(line, int) else f"{path} ({line})" if line else str(path)
        raise CorpusError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
        ) from None


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (only for error messages)."""
    n = 1
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def split_parts(text: str, part_chars: int | None) -> list[str]:
    """`text` cut at the first line break at or after every multiple of `part_chars`
    characters (at the multiple itself if no line break follows within `part_chars`)."""
    if part_chars is None or len(text) <= part_chars:
        return [text]
    cuts = [0]
    for j in range(1, (len(text) - 1) // part_chars + 1):
        at = j * part_chars
        nl = text.find("\n", at, at + part_chars)
        cut = nl + 1 if nl >= 0 else at
        if cut > cuts[-1] and cut < len(text):
            cuts.append(cut)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _chat_messages(record: dict, where: str) -> list[dict[str, str]] | None:
    """Chat records: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"|"completion"}."""
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise CorpusError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise CorpusError(f"{where}: the conversation has no assistant message, so no token would carry loss; drop it or add one")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    response = record.get("response", record.get("completion"))
    if "prompt" in record and response is not None:
        if not isinstance(record["prompt"], str) or not isinstance(response, str):
            raise CorpusError(f"{where}: 'prompt' and 'response' must be strings")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]
    return None


def _sample(record: dict, messages: list[dict[str, str]], where: Any) -> tuple[list[int], list[float]] | None:
    """A generated record's (response_ids, logprobs) (`ddk-cache generate`), checked; None
    for records without them."""
    ids, logprobs = record.get("response_ids"), record.get("logprobs")
    if ids is None and logprobs is None:
        return None
    ok = (isinstance(ids, list) and isinstance(logprobs, list) and len(ids) == len(logprobs) > 0
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
          and all(isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-3 for v in logprobs))
    if not ok:
        raise CorpusError(f"{where()}: 'response_ids' and 'logprobs' must be lists of one length: token ids (ints >= 0) and their "
                          "finite log-probs (<= 0), as `ddk-cache generate` writes; remove both fields to train on the text alone")
    if messages[-1]["role"] != "assistant":
        raise CorpusError(f"{where()}: 'response_ids' belong to the last message, which must be the assistant's")
    return ids, [float(v) for v in logprobs]


def _record(line: bytes, path: Path, rel: str, offset: int, text_field: str, part_chars: int | None,
            line_no: int | Any) -> Iterator[Document]:
    """The documents of one JSON line at byte `offset` (`line_no`: its number, or a function
    computing it: pieces that start mid-file count lines only to report an error)."""

    def where() -> str:
        return f"{path}:{line_no() if callable(line_no) else line_no}"

    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = _decode(line, path, line_no() if callable(line_no) else line_no)
    if not text:
        return
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where()}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise CorpusError(
            f"{where()}: a JSON {type(record).__name__}, not an object: ddk-cache reads JSON Lines, one object per line "
            '(e.g. {"text": "..."}); convert the file (for a JSON array: one element per line)'
        )
    if text_field in record:
        value = record[text_field]
        if not isinstance(value, str):
            raise CorpusError(f"{where()}: field {text_field!r} is {type(value).__name__}, expected a string")
        if value.strip():
            _utf8(value, where)
            for j, part in enumerate(split_parts(value, part_chars)):
                yield Document(f"{rel}\0{offset}\0{j}", f"{path}@{offset}", text=part)
        return
    messages = _chat_messages(record, where())
    if messages is not None:
        for m in messages:
            _utf8(m["content"], where)
        yield Document(f"{rel}\0{offset}\00", f"{path}@{offset}", messages=messages, sample=_sample(record, messages, where))
        return
    raise CorpusError(
        f"{where()}: no {text_field!r} field (found: {', '.join(map(str, record)) or 'nothing'}); pass --text-field to name "
        "the text field, or give chat records with 'messages' (or 'prompt' and 'response')"
    )


def _read_jsonl(path: Path, rel: str, start: int, end: int | None, text_field: str, part_chars: int | None, digest: Any) -> Iterator[Document]:
    name = path.name.lower()
    try:
        with _open_stream(path, name) as f:
            pos = start
            if start > 0:  # the line that starts before `start` belongs to the previous range
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    pos = start + len(f.readline())
            line_no = None if start > 0 else 0
            while end is None or pos < end:
                line = f.readline()
                if not line:
                    break
                if digest is not None:
                    digest.update(line)
                if line_no is not None:
                    line_no += 1
                lazy = (lambda p=pos: _line_number(path, p)) if line_no is None else line_no
                yield from _record(line, path, rel, pos, text_field, part_chars, lazy)
                pos += len(line)
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: cannot read: {e} (damaged or truncated file?)") from None
    except Exception as e:  # zstandard.ZstdError: a damaged .zst stream
        if type(e).__name__ != "ZstdError":
            raise
        raise CorpusError(f"{path}: cannot read: {e} (damaged or truncated file?)") from None


def _open_stream(path: Path, name: str) -> Any:
    """A binary file object of a .jsonl file's (decompressed) bytes: gzip, zstd, or plain."""
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import io

        import zstandard

        # A buffered reader over zstd's stream: readline() works and memory stays bounded.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb")


def _txt_part_start(f: Any, j: int, part_chars: int, size: int) -> int:
    """Where part j (>= 1) of a text file starts (module docstring)."""
    at = j * part_chars
    f.seek(at)
    block = f.read(part_chars)
    nl = block.find(b"\n")
    if nl >= 0:
        return at + nl + 1
    while at < size and block[:1] and (block[0] & 0xC0) == 0x80:  # not inside a UTF-8 character
        at += 1
        block = block[1:]
    return at


def _read_txt(path: Path, rel: str, start: int, end: int | None, part_chars: int | None, digest: Any) -> Iterator[Document]:
    size = path.stat().st_size
    end = size if end is None else end
    step = part_chars or max(size, 1)
    with open(path, "rb") as f:
        # Part boundaries near [start, end): b_0 = 0, b_j for j >= 1 per the rule.
        first = max(0, start // step - 1)
        bounds = [0 if j == 0 else _txt_part_start(f, j, step, size) for j in range(first, (end - 1) // step + 2) if j * step < size]
        bounds = sorted(set(b for b in bounds if b < size)) + [size]
        for a, b in zip(bounds, bounds[1:]):
            if not start <= a < end:
                continue
            f.seek(a)
            raw = f.read(b - a)
            if digest is not None:
                digest.update(raw)
            text = _decode(raw, path, f"the part at byte {a}")
            if text.strip():
                yield Document(f"{rel}\0{a}\00", f"{path}@{a}", text=text)


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading .parquet needs pyarrow: pip install 'ddk-cache[parquet]'") from None
    return pq.ParquetFile(path)


def _parquet_row_groups(path: Path) -> int:
    return _parquet_file(path).num_row_groups


def _read_parquet(path: Path, rel: str, start: int, end: int | None, text_field: str, part_chars: int | None, digest: Any) -> Iterator[Document]:
    table = _parquet_file(path)
    if text_field not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no {text_field!r} column (found: {', '.join(table.schema_arrow.names)}); pass --text-field")
    groups = range(start, table.num_row_groups if end is None else end)
    for g in groups:
        column = table.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        for row, text in enumerate(column):
            if isinstance(text, str) and text.strip():
                if digest is not None:
                    digest.update(text.encode())
                for j, part in enumerate(split_parts(text, part_chars)):
                    yield Document(f"{rel}\0{g}:{row}\0{j}", f"{path} row group {g} row {row}", text=part)


def corpus_layout(domains: list[DomainSource]) -> list[dict[str, Any]]:
    """What the build fingerprint covers of the corpus: per domain its files' relative paths
    and sizes (cheap to check at every start; the content is hashed once, while tokenized)."""
    return [{"domain": d.name, "files": [{"path": s["path"], "size": s["size"]} for s in d.stats()]} for d in domains]
