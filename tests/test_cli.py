"""The command line as a Unix tool: usage errors name the subcommand, flags have choices and
ranges, inputs are checked before the model loads, stdin and pipes work, and every failure is
one `error:` line with exit status 2."""

from __future__ import annotations

import importlib.metadata
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import meganeura.cli as cli
from meganeura.generate import GenerationConfig
from meganeura.pipeline import Pipeline
from tiny_models import write_tiny_smolvlm_folder

ROOT = Path(__file__).resolve().parents[1]
TEXT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_smolvlm_folder(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a checkpoint is opened."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")
    monkeypatch.setattr("meganeura.weights.load_checkpoint", refuse)


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meganeura.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"meganeura {importlib.metadata.version('meganeura')}\n", "")


def test_stray_arguments_show_the_subcommand_usage(capsys):
    code, _, err = run(capsys, "run", "--bogus", "hi")
    assert code == 2 and err.startswith("usage: meganeura run ")
    assert err.endswith("meganeura run: error: unrecognized arguments: --bogus\n")


@pytest.mark.parametrize("args, message", [
    (["run", "--device", "gpu", "hi"],
     "argument --device: invalid choice: 'gpu' (choose from auto, cpu, cuda, cuda:N)"),
    (["run", "--dtype", "fp8", "hi"], "argument --dtype: invalid choice: 'fp8'"),
    (["serve", "--port", "70000"], "argument --port: expected an integer from 1 to 65535, got '70000'"),
    (["serve", "--max-batch", "0"], "argument --max-batch: expected an integer >= 1, got '0'"),
    (["run", "--temperature", "nan", "hi"], "argument --temperature: expected a finite number, got 'nan'"),
    (["run", "--top-k", "-1", "hi"], "argument --top-k: expected an integer >= 0, got '-1'"),
    (["chat", "--max-frames", "0"], "argument --max-frames: expected an integer >= 1, got '0'"),
])
def test_flag_values_are_checked(capsys, no_loading, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and f"meganeura {args[0]}: error: {message}" in err


def test_devices_accepted():
    parser = cli._parser()
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert parser.parse_args(["run", "--device", device, "hi"]).device == device


def _no_cuda() -> bool:
    torch = pytest.importorskip("torch")
    return not torch.cuda.is_available()


@pytest.mark.parametrize("args, message", [
    (["--top-p", "2"], "error: invalid sampling settings: top_p=2.0 (in (0, 1])"),
    (["--image", "/nonexistent/a.png"], "error: /nonexistent/a.png: image file not found"),
    (["--video", "/nonexistent/a.mp4"], "error: /nonexistent/a.mp4: video file not found"),
    pytest.param(["--device", "cuda"], "error: --device cuda: no CUDA GPU is available "
                                       "(torch.cuda.is_available() is False)",
                 marks=pytest.mark.skipif("not _no_cuda()", reason="a GPU is present")),
])
def test_bad_inputs_fail_before_the_model_loads(capsys, no_loading, args, message):
    code, out, err = run(capsys, "run", *args, "hi")
    assert code == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err


def test_media_on_a_text_only_model_is_refused_before_its_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(Pipeline, "__init__", lambda *a, **k: pytest.fail("the weights were loaded"))
    image = tmp_path / "a.png"
    image.write_bytes(b"not looked at")
    code, _, err = run(capsys, "run", "--model", TEXT_MODEL, "--image", str(image), "hi")
    assert code == 2
    assert err.splitlines()[-1] == f"error: {TEXT_MODEL} reads text only: --image and --video need a SmolVLM model"


def test_help_describes_the_model_option(capsys):
    for command in ("run", "chat", "inspect", "serve"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "local folder, .gguf file, Hub id, or smollm2-135m-instruct" in " ".join(out.split())


def test_sampling_flags_reach_generation_with_the_api_defaults(capsys, monkeypatch, tiny):
    calls = []
    monkeypatch.setattr(cli, "_stream", lambda pipe, messages, settings, verbose: calls.append((messages, settings)))
    base = ["run", "--model", str(tiny), "--device", "cpu"]
    assert run(capsys, *base, "hi")[0] == 0
    defaults = GenerationConfig()
    assert calls[-1][1] == {k: getattr(defaults, k) for k in calls[-1][1]}
    assert set(calls[-1][1]) == {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                                 "stop"}
    assert run(capsys, *base, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty",
               "1.3", "--seed", "3", "--stop", "A", "--stop", "B.", "--system", "Be brief.", "hi")[0] == 0
    messages, settings = calls[-1]
    assert settings == {"max_new_tokens": 256, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
                        "repetition_penalty": 1.3, "seed": 3, "stop": ("A", "B.")}
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert messages[1]["role"] == "user"


def test_seeded_sampling_repeats(capsys, tiny):
    args = ["run", "--model", str(tiny), "--device", "cpu", "--max-new-tokens", "5", "--temperature", "1",
            "--top-k", "50", "--seed", "7", "hi"]
    first, second = run(capsys, *args), run(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]


def test_prompt_from_stdin_with_a_timing_summary_and_no_progress_bar(tiny):
    out = process("run", "--model", str(tiny), "--device", "cpu", "--max-new-tokens", "3", "-v", input="hi\n")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == f"loading {tiny} ..." and len(lines) == 3, out.stderr
    assert lines[1] == "weights: none (auto: the checkpoint's own precision (F32))"  # a float folder stays float
    assert re.fullmatch(r"prompt: \d+ tokens \(\d+ cached\) in [\d.]+ s \([\d.]+ tok/s\); "
                        r"answer: \d+ tokens, decoded in [\d.]+ s \([\d.]+ tok/s\)", lines[2]), lines[2]
    assert "\r" not in out.stderr  # the weights bar is for terminals only


def test_prompt_dash_reads_stdin_and_system_adds_tokens(capsys, monkeypatch, tiny):
    def prompt_tokens(*extra):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
        code, _, err = run(capsys, "run", "--model", str(tiny), "--device", "cpu", "--max-new-tokens", "1", "-v",
                           *extra, "-")
        assert code == 0, err
        return int(re.search(r"prompt: (\d+) tokens", err).group(1))
    assert prompt_tokens("--system", "Answer in French.") > prompt_tokens()
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert run(capsys, "run", "--model", str(tiny), "-")[2] == "error: the prompt read from stdin is empty\n"


def test_a_closed_pipe_ends_the_answer_quietly():
    """`meganeura run ... | head -c 20`: no 'Broken pipe' error, the status a tool killed by SIGPIPE has."""
    command = [sys.executable, "-m", "meganeura.cli", "run", "--model", TEXT_MODEL, "--device", "cpu",
               "--max-new-tokens", "96", "Tell me a long story about a cat."]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(proc.stdout.read(20)) == 20
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141
    assert proc.stderr.read() == f"loading {TEXT_MODEL} ...\n"


def test_chat_drops_a_failed_attachment_keeps_the_history_and_reports_unknown_commands(capsys, monkeypatch,
                                                                                      tiny, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    calls = []

    def recording(pipe, messages, settings, verbose, stream=cli._stream):
        calls.append(messages)
        return stream(pipe, messages, settings, verbose)
    monkeypatch.setattr(cli, "_stream", recording)
    lines = ["first", "/image /nonexistent.png", f"/image {broken}", "second", "/bogus", "/help", "/image", "third",
             "/quit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, _, err = run(capsys, "chat", "--model", str(tiny), "--device", "cpu", "--max-new-tokens", "2")
    assert code == 0, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: /nonexistent.png: image file not found"
    assert errors[1].startswith(f"error: {broken}") and errors[1].endswith(
        "(the attachments were dropped; the conversation so far is kept)")
    assert errors[2:] == ["error: unknown command '/bogus'; /help lists the commands", "error: /image needs a PATH"]
    assert "/video PATH" in err and "/reset" in err  # /help
    texts = [[part.get("type") == "text" and part["text"] for part in m["content"]] for m in calls[-1]]
    assert [m["role"] for m in calls[-1]] == ["user", "assistant", "user"]
    assert texts[0] == ["first"] and texts[2] == ["third"]  # no image rides along any more


def test_quantize_flag_states_the_weights_form(capsys, tiny):
    code, out, err = run(capsys, "run", "--model", str(tiny), "--device", "cpu", "--quantize", "int4",
                         "--max-new-tokens", "2", "-v", "hi")
    assert code == 0, err
    assert "weights: int4 (asked for; the lm_head int8; 14 weights int4, 1 weights int8)" in err.splitlines()
    code, _, err = run(capsys, "run", "--model", str(tiny), "--device", "cpu", "--quantize", "int3", "hi")
    assert code == 2 and "--quantize" in err and "int3" in err
