"""The Python side of launch/bench_prepare.sh: encode a WikiText file with HF `tokenizers`
(PyPI), the way `algpt2-ddp prepare` does (articles at top-level headings, 8 MB batches
through encode_batch on all cores, <|endoftext|> before each article), and report MB/s and
peak memory as one JSON line."""

import json
import resource
import sys
import time

import numpy as np
from tokenizers import Tokenizer

BATCH_BYTES = 8 << 20


def is_article_heading(line: str) -> bool:
    t = line.rstrip()
    return t.startswith(" = ") and not t.startswith(" = = ") and t.endswith(" =") and len(t) > 4


def articles(path):
    article = []
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            if is_article_heading(line) and "".join(article).strip():
                yield "".join(article)
                article = []
            article.append(line)
    if "".join(article).strip():
        yield "".join(article)


def main():
    tokenizer_path, text_path, out_path = sys.argv[1:4]
    tok = Tokenizer.from_file(tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    started = time.perf_counter()
    n_bytes = n_tokens = 0
    with open(out_path, "wb") as out:
        batch, batch_bytes = [], 0

        def flush():
            nonlocal n_tokens
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids = np.array([eot] + enc.ids, dtype=np.uint16)
                out.write(ids.tobytes())
                n_tokens += len(ids)
            batch.clear()

        for art in articles(text_path):
            n_bytes += len(art.encode("utf-8"))
            batch.append(art)
            batch_bytes += len(art)
            if batch_bytes >= BATCH_BYTES:
                flush()
                batch_bytes = 0
        flush()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bytes": n_bytes, "tokens": n_tokens + 1, "seconds": seconds,
                      "mb_per_s": n_bytes / 1e6 / seconds, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main()
