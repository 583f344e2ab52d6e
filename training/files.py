"""Files a run fetches: OpenAI's GPT-2 weights and `--data` URLs, downloaded once into a cache.

`download` writes to a `.part` file, resumes it after an interruption (an HTTP Range request),
checks size and hash, and renames only a complete file. `download_gpt2(name)` gives a preset's
`model.safetensors`; `fetch_data(source)` a local path for `--data`.
"""
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from data import parse_entries
from gpt import HF_NAMES, read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAINED = ROOT / "data" / "tiny-pretrained.pt"  # written by data/pretrain_tiny.py


def cache_root() -> Path:
    """Where downloads go: $GPT2_INSTRUCT_CACHE or ~/.cache/gpt2-instruct."""
    return Path(os.environ.get("GPT2_INSTRUCT_CACHE") or Path.home() / ".cache" / "gpt2-instruct")


def gpt2_url(name: str) -> str:
    return f"https://huggingface.co/openai-community/{HF_NAMES[name]}/resolve/main/model.safetensors"


def download_gpt2(name: str, cache_dir=None) -> Path:
    """Local path of a preset's `model.safetensors`, downloaded into the cache if not there yet."""
    if name not in HF_NAMES:
        raise ValueError(f"no pretrained weights for {name!r}; choose one of {', '.join(HF_NAMES)}")
    dest = Path(cache_dir or cache_root()) / HF_NAMES[name] / "model.safetensors"
    if dest.exists():
        try:
            check_safetensors_complete(dest)
            return dest
        except ValueError as e:  # damaged after it was downloaded: never used, fetched again
            print(f"warning: {e}; downloading it again", file=sys.stderr)
            dest.unlink()
    try:
        return download(gpt2_url(name), dest)
    except OSError as e:
        raise FileNotFoundError(
            f"{name} weights not found at {dest} and the download failed ({e}); pass "
            f"--weights PATH to a local model.safetensors, or use --model tiny to train offline") from None


def check_safetensors_complete(path) -> None:
    """ValueError unless the header is sound and its tensors end exactly where the file does."""
    path = Path(path)
    with open(path, "rb") as f:
        start, entries = read_safetensors_header(f, path)
    end = max((e for _, _, _, e in entries.values()), default=0)
    if start + end != path.stat().st_size:
        raise ValueError(f"{path}: tensors end at byte {start + end} of {path.stat().st_size}")


def cached_path(url: str, cache_dir=None) -> Path:
    """A file name per URL: a hash (different URLs never collide) plus the URL's own file name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urlparse(url).path).name) or "data.json"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(cache_dir or cache_root() / "data") / f"{digest}-{name}"


def fetch_data(source: str, require_output: bool = True, cache_dir=None) -> str:
    """`--data`: a local file as it is, or an http(s) URL's copy in the cache, downloaded once.
    A cached copy that is no longer valid is fetched again; a download that is not valid data
    is removed and named in the error."""
    if urlparse(source).scheme not in ("http", "https"):
        return source
    path = cached_path(source, cache_dir)
    fresh = not path.exists()
    while True:
        if fresh:
            download(source, path, progress=False)
        try:
            parse_entries(path.read_bytes(), require_output)
            return str(path)
        except ValueError as e:
            path.unlink(missing_ok=True)  # a bad copy is never used again
            if fresh:
                raise ValueError(f"{source}: {e}") from None
            fresh = True  # damaged since it was downloaded: fetch it once more


def show_progress(name: str, done: int, total: int | None, new: int, start: float,
                  end: str = "") -> None:
    """One progress line on stderr: bytes, percent, speed of this run's `new` bytes."""
    speed = new / 1e6 / max(time.perf_counter() - start, 1e-9)
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total \
        else f"{done / 1e6:.1f} MB"
    print(f"\r{name}: {size}, {speed:.1f} MB/s", end=end, file=sys.stderr, flush=True)


def download(url: str, dest, expected_size: int | None = None, sha256: str | None = None,
             progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest`. Bytes go to `dest.part` first; a .part left by an interrupted run is
    resumed with an HTTP Range request (or restarted if the server ignores it). Only a complete,
    verified file is renamed to `dest`. Errors: OSError (network), ValueError (wrong file)."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = fetch_to_part(url, part, timeout, dest.name if progress else None)
    except urllib.error.HTTPError as e:
        raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise OSError(f"download of {url} failed: {reason} (run again to resume)") from None
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"got {size:,} bytes, expected {expected_size:,}"
    elif sha256:
        with open(part, "rb") as f:
            if (got := hashlib.file_digest(f, "sha256").hexdigest()) != sha256:
                problem = f"sha256 {got} is not the expected {sha256}"
    if problem:
        part.unlink()
        raise ValueError(f"download of {url}: {problem}; the partial file was removed")
    os.replace(part, dest)
    return dest


def fetch_to_part(url: str, part: Path, timeout: float, progress_name: str | None) -> int:
    """Write the rest of `url` onto `part` and return its size; raise OSError if it came short."""
    for _ in range(2):  # a second round only after a stale .part was thrown away
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "gpt2-instruct", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:
                raise
            part.unlink()  # 416: the .part is already as long as the file, or longer
            continue
        with resp:
            if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(
                    f"bytes {have}-"):
                part.unlink()  # not the range we asked for: start over
                continue
            have = have if resp.status == 206 else 0  # 200: the server sent the whole file
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length else None
            first, start, shown = have, time.perf_counter(), 0.0
            with open(part, "ab" if have else "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if progress_name and time.perf_counter() - shown > 0.5:
                        show_progress(progress_name, have, total, have - first, start)
                        shown = time.perf_counter()
                f.flush()
                os.fsync(f.fileno())
            if progress_name:
                show_progress(progress_name, have, total, have - first, start, "\n")
        if total is not None and have < total:
            raise OSError(f"connection dropped at {have:,} of {total:,} bytes")
        return have
    raise OSError("the server keeps answering with the wrong byte range")
