"""A chat corpus cut from plain text: each document becomes a question/answer sample.

    python examples/chat_corpus.py --source ../shared/corpora/dev --out chat-corpus

For every document of every domain (`<domain>.jsonl` with a `text` field) it writes one
chat record to `OUT/<domain>.jsonl`: the user gives the document's first sentences and asks
for the continuation, the assistant answers with the next ones. Every third record is a
prompt/response pair, every other one a conversation with a system turn, so both record
forms are exercised. Only the assistant's words carry loss in the cache built from it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def to_record(domain: str, text: str, i: int, max_chars: int) -> dict | None:
    sentences = [s for s in SENTENCE.split(text.strip()) if s]
    if len(sentences) < 3:
        return None
    cut = max(1, len(sentences) // 3)
    prompt = " ".join(sentences[:cut])[:max_chars]
    answer = " ".join(sentences[cut: cut * 2 + 1])[:max_chars]
    question = f"Continue this {domain} text:\n{prompt}"
    if i % 3 == 0:
        return {"prompt": question, "response": answer}
    messages = [{"role": "system", "content": "You continue texts faithfully."}] if i % 2 else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True, help="a directory of <domain>.jsonl text files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-chars", type=int, default=600, help="characters per prompt and per answer, at most")
    p.add_argument("--max-records", type=int, default=2000, help="records per domain, at most")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for src in sorted(a.source.glob("*.jsonl")):
        n = 0
        tmp = a.out / (src.name + ".tmp")
        with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
            for i, line in enumerate(f):
                record = to_record(src.stem, json.loads(line)["text"], i, a.max_chars)
                if record is not None:
                    out.write(json.dumps(record) + "\n")
                    n += 1
                if n >= a.max_records:
                    break
        tmp.rename(a.out / src.name)
        print(f"{src.stem}: {n} records -> {a.out / src.name}")


if __name__ == "__main__":
    main()
