"""training/files.py: resumable, checked downloads (against a real HTTP server on 127.0.0.1) and
`--data` URLs cached once."""
import http.server
import json
import socket
from pathlib import Path

import pytest

from data import load_data
from local_server import local_server
from safetensors_io import hf_gpt2_tensors, safetensors_bytes
from training import files
from training.files import download, fetch_data

SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.",
         "output": "I baked the cake."}


# ---- download: a tiny local HTTP server ----------------------------------------------------------
PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.seen.append(self.headers.get("Range"))
        body = server.files.get(self.path)
        if body is None:
            return self.send_error(404, "Not Found")
        start = 0
        ranged = self.headers.get("Range") and not server.ignore_range
        if ranged:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        sent = body[start:]
        if server.drop_after is not None:  # the connection dies halfway
            sent = sent[:server.drop_after]
            self.close_connection = True
        self.wfile.write(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with local_server(Handler) as srv:
        srv.files, srv.seen, srv.ignore_range, srv.drop_after = {"/f.bin": PAYLOAD}, [], False, None
        yield srv


def fetch(server, tmp_path, **kw):
    return download(server.url + "/f.bin", tmp_path / "f.bin", progress=False, timeout=5, **kw)


def test_full_download_is_checked_and_renamed(server, tmp_path, capsys):
    import hashlib
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    path = download(server.url + "/f.bin", tmp_path / "sub" / "f.bin", expected_size=len(PAYLOAD),
                    sha256=digest, timeout=5)
    assert path.read_bytes() == PAYLOAD and server.seen == [None]
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
    err = capsys.readouterr().err
    assert "f.bin: 0.0/0.0 MB (100%)" in err and err.endswith("MB/s\n")
    fetch(server, tmp_path)
    assert capsys.readouterr() == ("", "")  # progress=False is silent


def test_resume_from_part_with_range(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:3000])
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD
    assert server.seen == ["bytes=3000-"] and not (tmp_path / "f.bin.part").exists()


def test_server_ignoring_range_restarts(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"garbage that is not the start")
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD
    assert server.seen == ["bytes=29-"]


def test_complete_or_oversized_part_restarts_after_416(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD + b"extra")
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD
    assert server.seen == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_dropped_connection_keeps_part_and_next_run_resumes(server, tmp_path):
    server.drop_after = 4000
    with pytest.raises(OSError, match=f"{server.url}/f.bin .*run again to resume") as e:
        fetch(server, tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 4000
    server.drop_after = None
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD and server.seen[-1] == "bytes=4000-"


@pytest.mark.parametrize("check, message", [
    ({"expected_size": 999}, "got 10,240 bytes, expected 999"),
    ({"sha256": "0" * 64}, "sha256 .* is not the expected 0000"),
])
def test_wrong_size_or_hash_leaves_nothing(server, tmp_path, check, message):
    with pytest.raises(ValueError, match=message) as e:
        fetch(server, tmp_path, **check)
    assert server.url in str(e.value) and list(tmp_path.iterdir()) == []


def test_http_404_names_the_url(server, tmp_path):
    with pytest.raises(OSError, match=f"download of {server.url}/missing failed: HTTP 404"):
        download(server.url + "/missing", tmp_path / "x", progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_names_the_url(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/f.bin"
    with pytest.raises(OSError, match=f"download of {url} failed: .*refused"):
        download(url, tmp_path / "f.bin", progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_data_url_downloads_once_into_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    server.files["/set/instruction-data.json"] = json.dumps([ENTRY]).encode()
    url = server.url + "/set/instruction-data.json"
    assert load_data(fetch_data(url)) == [ENTRY] and load_data(fetch_data(url)) == [ENTRY]
    assert server.seen == [None]  # the second call read the cache
    (cached,) = (tmp_path / "cache" / "data").iterdir()
    assert cached.name.endswith("-instruction-data.json") and cached == files.cached_path(url)


def test_a_damaged_cached_copy_is_fetched_again(server, tmp_path):
    server.files["/d.json"] = json.dumps([ENTRY]).encode()
    path = Path(fetch_data(server.url + "/d.json", cache_dir=tmp_path))
    path.write_text("[{")  # damaged since it was downloaded
    assert load_data(fetch_data(server.url + "/d.json", cache_dir=tmp_path)) == [ENTRY]
    assert server.seen == [None, None]


def test_local_data_paths_pass_through_untouched(tmp_path):
    assert fetch_data(str(tmp_path / "d.json")) == str(tmp_path / "d.json")


def test_invalid_data_from_url_is_not_kept(server, tmp_path):
    server.files["/bad.json"] = b"<html>oops</html>"
    with pytest.raises(ValueError, match=f"{server.url}/bad.json: not valid JSON"):
        fetch_data(server.url + "/bad.json", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_url_download_leaves_the_cache_empty(server, tmp_path):
    with pytest.raises(OSError, match=f"download of {server.url}/missing.json failed: HTTP 404"):
        fetch_data(server.url + "/missing.json", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_gpt2_offline_names_both_ways_forward(tmp_path, monkeypatch):
    def refuse(url, dest, **kw):
        raise OSError(f"cannot reach {url}")
    monkeypatch.setattr(files, "download", refuse)
    with pytest.raises(FileNotFoundError, match="--weights PATH.*--model tiny"):
        files.download_gpt2("gpt2-small", cache_dir=tmp_path)


def test_download_gpt2_uses_a_cached_file_without_network(tmp_path, monkeypatch):
    dest = tmp_path / "gpt2" / "model.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(safetensors_bytes(hf_gpt2_tensors(SMALL)))
    monkeypatch.setattr(files, "download", lambda *a, **k: pytest.fail("network used"))
    assert files.download_gpt2("gpt2-small", cache_dir=tmp_path) == dest
