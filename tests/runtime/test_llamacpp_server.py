"""A gguf artifact served as it is by llama-cpp-python's OpenAI-compatible server.

The server (``python -m llama_cpp.server`` as it is, which never imports edgekd: the installed
llama-cpp-python loads its CPU variant itself; libmtmd's chat handler over the files' own chat
template) runs on 127.0.0.1; one image question must get the answer edgekd's backend gives.
A ``full``-strategy artifact: the server feeds every clip row, which is that model's input.
The server renders the message parts through the template as they are, so the question is
sent as ``"\n" + question`` after the image: the prompt LLaVA models are trained on
(``<image>\n{question}``), which edgekd's backend renders for a question without a placeholder.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

QUESTION = "What shape is in the image?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture
def server(gguf_f32_artifact, tmp_path):
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_f32_artifact / "model.gguf"),
        "--clip_model_path", str(gguf_f32_artifact / "mmproj.gguf"),
        "--chat_format", "mtmd", "--n_ctx", "1024", "--n_threads", "1",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail(
                        "the server did not start: " + (tmp_path / "server.log").read_text()
                    )
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _image(seed: int, h: int, w: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    pixels[h // 4 : h // 2, w // 8 : w // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)  # at the model's input size: no resize on either side


def _ask(server: str, image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "\n" + QUESTION},
    ]
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
    }
    return _post(server + "/v1/chat/completions", body)


def test_served_answers_equal_the_backend(server, gguf_f32_artifact):
    """Two images whose answers differ (seeds picked so), each served as the backend answers."""
    from edgekd.runtime.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32_artifact, n_threads=1)
    h, w = backend.session.image_size
    images = [_image(seed, h, w) for seed in (4, 6)]
    expected = [backend.generate(im, QUESTION, max_new_tokens=8) for im in images]
    backend.close()
    assert expected[0].text != expected[1].text  # the answer depends on the image
    for image, want in zip(images, expected, strict=True):
        reply = _ask(server, image)
        assert reply["usage"]["prompt_tokens"] == want.prompt_tokens
        assert reply["usage"]["completion_tokens"] == len(want.token_ids)
        # the server keeps the first token's leading space, llama.cpp's detokenizer drops it
        assert reply["choices"][0]["message"]["content"].strip() == want.text.strip()
