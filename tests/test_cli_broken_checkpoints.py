"""`meganeura run` over broken checkpoints: seeded damage to a valid tiny SmolVLM folder (files
deleted or renamed, safetensors truncated or with forged headers, config values of the wrong
type or size, wrong tensor shapes, NaN weights, bad tokenizers, processor configs and chat
templates) and truncated GGUF files. Every failure must be one `error:` line and exit status 2,
within seconds and in bounded memory; a harmless mutation may answer.

Most cases run in-process through `cli.main` (fast); a few run as real processes under an
address-space limit, which also catches what only a fresh interpreter shows."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meganeura.cli import main
from meganeura.weights import resolve_model
from tiny_models import write_tiny_smolvlm_folder

ROOT = Path(__file__).resolve().parents[1]
CASES = 160
SECONDS_PER_CASE = 10  # generous for a loaded 2-core machine; a tiny model answers in well under 1 s
ADDRESS_SPACE = 3 << 30  # a run of the tiny model peaks at ~0.33 GB of RSS; torch maps more than it uses

BAD_VALUES = [0, -1, -3, "64", "abc", None, True, 1.5, 1e9, 10**12, 2**63, math.nan, math.inf, -math.inf, [], {},
              [64], 0.0, -1e-5]
TEMPLATES = [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ 10 ** (10 ** 10) }}",
    "{% include '/etc/passwd' %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ 1 / 0 }}",
    "{{ raise_exception('broken on purpose') }}",
    "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}",
    "{% if %}",
    "{{ messages[5].content }}",
    "",
]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("valid")
    write_tiny_smolvlm_folder(folder)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


# ---- damage ------------------------------------------------------------------------------------

def _json_edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extension, as Python reads it


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _config_value(rng: random.Random, folder: Path) -> str:
    sections = {"text_config": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "intermediate_size", "rms_norm_eps", "rope_theta",
                                "max_position_embeddings", "head_dim", "tie_word_embeddings"],
                "vision_config": ["image_size", "patch_size", "hidden_size", "num_attention_heads",
                                  "num_hidden_layers", "intermediate_size", "layer_norm_eps", "hidden_act"],
                None: ["scale_factor", "image_token_id", "model_type", "text_config", "vision_config"]}
    section = rng.choice(list(sections))
    key, value = rng.choice(sections[section]), rng.choice(BAD_VALUES + [1_000_000, 3, 7])

    def edit(config):
        (config[section] if section else config)[key] = value
        if key == "rope_theta":  # transformers 5 configs keep it inside rope_parameters
            config["text_config"]["rope_parameters"]["rope_theta"] = value
    _json_edit(folder / "config.json", edit)
    return f"config {section or ''}.{key} = {value!r}"


def _safetensors(rng: random.Random, folder: Path) -> str:
    path = folder / "model.safetensors"
    header, data = _header(path)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    kind = rng.randrange(7)
    if kind == 0:
        size = path.stat().st_size
        cut = rng.randrange(size)
        path.write_bytes(path.read_bytes()[:cut])
        return f"safetensors truncated to {cut} of {size} bytes"
    if kind == 1:  # swapped dimensions keep the byte ranges consistent: only the shape is wrong
        header[name]["shape"] = header[name]["shape"][::-1] + ([2] if len(header[name]["shape"]) == 1 else [])
    elif kind == 2:
        header[name]["shape"] = [2**32, 2**32]
    elif kind == 3:
        header[name]["dtype"] = rng.choice(["F8", "Q4", 7, None])
    elif kind == 4:
        begin, end = header[name]["data_offsets"]
        data = data[:begin] + np.full((end - begin) // 4, np.nan, np.float32).tobytes() + data[end:]
    elif kind == 5:
        header[name]["data_offsets"] = rng.choice([[-4, 8], [0, 10**15], "x", [1]])
    else:
        del header[name]
    _write_safetensors(path, header, data)
    return f"safetensors {name}: change {kind}"


def _raw_header(rng: random.Random, folder: Path) -> str:
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    kind = rng.randrange(4)
    if kind == 0:
        raw[:8] = struct.pack("<Q", rng.choice([2**64 - 1, 2**40, len(raw)]))
    elif kind == 1:
        text = b"[" * 100_000 + b"]" * 100_000
        raw = bytearray(struct.pack("<Q", len(text)) + text)
    elif kind == 2:
        for _ in range(rng.randint(1, 20)):
            raw[rng.randrange(8, 2000)] = rng.randrange(256)
    else:
        raw = raw[:rng.randrange(12)]
    path.write_bytes(bytes(raw))
    return f"safetensors header damage {kind}"


def _files(rng: random.Random, folder: Path) -> str:
    victim = rng.choice(sorted(p.name for p in folder.iterdir()))
    if rng.random() < 0.5:
        (folder / victim).unlink()
        return f"deleted {victim}"
    (folder / victim).rename(folder / (victim + ".bak"))
    return f"renamed {victim}"


def _side_files(rng: random.Random, folder: Path) -> str:
    value = rng.choice(BAD_VALUES + [10**9])
    choices = {
        "generation_config.json eos_token_id": lambda: _json_edit(folder / "generation_config.json",
                                                                  lambda d: d.update(eos_token_id=value)),
        "preprocessor_config.json max_image_size": lambda: _json_edit(
            folder / "preprocessor_config.json", lambda d: d.update(max_image_size={"longest_edge": value})),
        "preprocessor_config.json size": lambda: _json_edit(folder / "preprocessor_config.json",
                                                            lambda d: d.update(size=value)),
        "processor_config.json image_seq_len": lambda: _json_edit(folder / "processor_config.json",
                                                                  lambda d: d.update(image_seq_len=value)),
        "config.json as a list": lambda: (folder / "config.json").write_text("[1, 2]"),
        "config.json nested deep": lambda: (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        "config.json not JSON": lambda: (folder / "config.json").write_text("{'model_type': 'smolvlm'"),
        "preprocessor_config.json not an object": lambda: (folder / "preprocessor_config.json").write_text("7"),
    }
    what = rng.choice(sorted(choices))
    choices[what]()
    return f"{what} = {value!r}"


def _tokenizer(rng: random.Random, folder: Path) -> str:
    path = folder / "tokenizer.json"
    kind = rng.randrange(4)
    if kind == 0:
        path.write_bytes(path.read_bytes()[:rng.randrange(1000)])
    elif kind == 1:
        path.write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    elif kind == 2:  # more tokens than the embedding table has rows
        _json_edit(path, lambda d: d["added_tokens"].extend(
            {**d["added_tokens"][-1], "id": 49192 + i, "content": f"<x{i}>"} for i in range(100)))
    else:
        path.write_text("[]")
    return f"tokenizer change {kind}"


def _template(rng: random.Random, folder: Path) -> str:
    template = rng.choice(TEMPLATES)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return f"chat template {template!r}"


def damage(seed: int, valid: Path, root: Path) -> tuple[Path, str]:
    rng = random.Random(seed)
    folder = root / f"case{seed}"
    shutil.copytree(valid, folder)
    make = rng.choices([_config_value, _safetensors, _raw_header, _files, _side_files, _tokenizer, _template],
                       weights=[5, 4, 1, 1, 2, 1, 2])[0]
    return folder, make(rng, folder)


# ---- running -----------------------------------------------------------------------------------

def _check(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{what}:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith(("error: ", "loading "))]
    if code == 2:
        assert len(errors) == 1 and not others, f"{what}: expected one error line, got\n{err}"
    else:
        assert not errors, f"{what}: exit 0 with\n{err}"


def run_in_process(args: list[str]) -> tuple[int, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue(), time.perf_counter() - start


def run_process(args: list[str]) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    return subprocess.run([sys.executable, "-m", "meganeura.cli", *args], cwd=ROOT, preexec_fn=limit,
                          capture_output=True, text=True, timeout=60)


def _args(folder: Path, image: Path | None = None) -> list[str]:
    media = ["--image", str(image)] if image else []
    return ["run", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2", *media, "hi"]


def test_broken_folders_fail_with_one_error_line(valid, image, tmp_path):
    outcomes = {0: 0, 2: 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for seed in range(CASES):
        folder, what = damage(seed, valid, tmp_path)
        code, err, seconds = run_in_process(_args(folder, image if seed % 3 == 0 else None))
        _check(code, err, f"case {seed} ({what})")
        assert seconds < SECONDS_PER_CASE, f"case {seed} ({what}) took {seconds:.1f} s"
        outcomes[code] += 1
        shutil.rmtree(folder)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20  # KiB -> GiB
    assert grown < 1, f"peak memory grew by {grown:.1f} GiB"
    assert outcomes[2] > CASES * 0.7, outcomes  # the damage does break things


def _config(section, **values):
    return lambda folder: _json_edit(folder / "config.json", lambda d: (d[section] if section else d).update(values))


def _side(name, **values):
    return lambda folder: _json_edit(folder / name, lambda d: d.update(values))


def _nan_weights(folder):
    header, data = _header(folder / "model.safetensors")  # every tensor is float32
    _write_safetensors(folder / "model.safetensors", header, np.full(len(data) // 4, np.nan, np.float32).tobytes())


def _nested_header(folder):
    text = b"[" * 100_000 + b"]" * 100_000
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)


NAMED = {  # the breakages of the issue, each with the error it must give
    "num_attention_heads 0": (_config("text_config", num_attention_heads=0),
                              "config.json: text_config.num_attention_heads must be an integer from 1"),
    "hidden_size '64'": (_config("text_config", hidden_size="64"),
                         "text_config.hidden_size must be an integer from 1 to 16777216, got '64'"),
    "hidden_size null": (_config("text_config", hidden_size=None), "text_config.hidden_size is missing (or null)"),
    "rms_norm_eps -1": (_config("text_config", rms_norm_eps=-1),
                        "text_config.rms_norm_eps must be a finite number > 0, got -1"),
    "rope_theta NaN": (_config("text_config", rope_theta=math.nan, rope_parameters={"rope_theta": math.nan}),
                       "text_config.rope_theta must be a finite number > 0, got nan"),
    "scale_factor 0": (_config(None, scale_factor=0), "config.json: scale_factor must be an integer from 1"),
    "patch_size 0": (_config("vision_config", patch_size=0), "vision_config.patch_size must be an integer from 1"),
    "max_image_size 0": (_side("preprocessor_config.json", max_image_size={"longest_edge": 0}),
                         "preprocessor_config.json: size and max_image_size must be positive"),
    "eos_token_id 'abc'": (_side("generation_config.json", eos_token_id="abc"),
                           "eos_token_id (config.json or generation_config.json) must be a token id"),
    "a million layers": (_config("text_config", num_hidden_layers=1_000_000),
                         "config.json says num_hidden_layers 1000000 but the checkpoint has tensors for 2 layers"),
    "all-NaN weights": (_nan_weights, "NaN or infinite values"),
    "header nested 100,000 deep": (_nested_header, "corrupt safetensors file (header JSON nested too deeply)"),
    "template range(10**9)": (lambda folder: (folder / "chat_template.json").write_text(json.dumps(
        {"chat_template": TEMPLATES[0]})), "chat template failed: range(1000000000) exceeds the chat template limits"),
}


@pytest.mark.parametrize("what", NAMED)
def test_named_breakages(valid, tmp_path, what):
    folder = tmp_path / "case"
    shutil.copytree(valid, folder)
    damage_, message = NAMED[what]
    damage_(folder)
    code, err, seconds = run_in_process(_args(folder))
    _check(code, err, what)
    assert code == 2 and message in err, err
    assert seconds < 2


@pytest.mark.parametrize("what", ["a million layers", "all-NaN weights", "num_attention_heads 0",
                                  "header nested 100,000 deep", "template range(10**9)"])
def test_named_breakages_in_a_real_process(valid, tmp_path, what):
    """Under an address-space limit: the million-layer config once climbed to 13.9 GB."""
    folder = tmp_path / "case"
    shutil.copytree(valid, folder)
    damage_, message = NAMED[what]
    damage_(folder)
    start = time.perf_counter()
    out = run_process(_args(folder))
    _check(out.returncode, out.stderr, what)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert time.perf_counter() - start < 30


def test_truncated_gguf(tmp_path):
    source = resolve_model("smollm2-135m-instruct")
    raw = source.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 1, 5000, 20):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(raw[:cut])
        code, err, seconds = run_in_process(_args(path))
        _check(code, err, f"GGUF cut at {cut}")
        assert code == 2 and seconds < SECONDS_PER_CASE
        if cut > 10**6:
            assert f"truncated: expected 96576768 bytes of tensor data, the file has {cut - (len(raw) - 96576768)}" \
                in err, err
        path.unlink()
