"""Command line: `meganeura run | chat | inspect | serve | caption`. Answers go to stdout, diagnostics to stderr.

Every failure the user can fix (a bad flag, file, checkpoint or device) is one `error:` line on
stderr and exit status 2; arguments and files are checked before the model loads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

from .engine.grammar import constraint
from .generate import GenerationConfig
from .pipeline import DEFAULT_MODEL, DEVICES, DTYPES, QUANTIZE, compile_options

MODEL_HELP = "local folder, .gguf file, Hub id, or smollm2-135m-instruct (default: %(default)s)"
CHAT_COMMANDS = """commands:
  /image PATH   attach an image to the next message
  /video PATH   attach a video to the next message
  /reset        start a new conversation (the --system message stays)
  /help         this list
  /quit         leave (or end of input)"""


# ---- argument types: a bad value is an argparse error naming the flag ---------------------------

def _device(text: str) -> str:
    if not DEVICES.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from auto, cpu, cuda, cuda:N)")
    return text


def _number(kind, low: float = -math.inf, high: float = math.inf):
    what = "an integer" if kind is int else "a finite number"
    what += f" from {low} to {high}" if high < math.inf else f" >= {low}" if low > -math.inf else ""

    def parse(text: str):
        try:
            value = kind(text)
            fine = (kind is int or math.isfinite(value)) and low <= value <= high
        except ValueError:
            fine = False
        if not fine:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive = _number(int, 1)
_count = _number(int, 0)
_real = _number(float)


# ---- messages and settings ------------------------------------------------------------------------

def _user_message(text: str, images: list[str], videos: tuple[str, ...] | list[str] = (),
                  max_frames: int | None = None) -> dict:
    parts = [{"type": "image", "image": path} for path in images]
    parts += [{"type": "video", "video": path, "max_frames": max_frames} for path in videos]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _system(args) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": args.system}]}] if args.system else []


def _settings(args) -> dict:
    """The generation settings, validated now: a bad value fails before the model loads."""
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
                "stop": tuple(args.stop)}
    GenerationConfig(**settings)
    return settings | _constraint(args)


def _constraint(args) -> dict:
    """--json-schema FILE, --regex or --choice as pipeline settings, checked before the model loads."""
    asked = {}
    if args.json_schema is not None:
        _check_file("JSON schema", args.json_schema)
        try:
            asked["json_schema"] = json.loads(Path(args.json_schema).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{args.json_schema}: not valid JSON ({e})") from None
    if args.regex is not None:
        asked["regex"] = args.regex
    if args.choice:
        asked["choice"] = list(args.choice)
    if len(asked) > 1:
        raise ValueError("give one of --json-schema, --regex and --choice")
    try:
        constraint(**asked)
    except ValueError as e:
        flag = {"json_schema": args.json_schema, "regex": "--regex", "choice": "--choice"}
        raise ValueError(f"{flag[next(iter(asked))]}: {e}") from None
    return asked


def _check_file(kind: str, path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"{path}: {kind} file not found")


def _prompt(args) -> str:
    """The prompt argument, or stdin when it is '-' or left out with input piped in."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and sys.stdin.isatty():
        args.parser.error("the prompt is missing: give it as an argument, or pipe it in ('-' reads stdin)")
    text = sys.stdin.read().strip()
    if not text:
        raise ValueError("the prompt read from stdin is empty")
    return text


# ---- model ----------------------------------------------------------------------------------------

def _load(args, media: bool = False):
    """The pipeline; with `media`, refuses a text-only model before its weights load."""
    from .pipeline import Pipeline, model_spec, settle_dtype
    from .weights import load_checkpoint
    try:
        options = compile_options(args.device, args.dtype, args.quantize)  # a missing GPU fails before any download
    except ValueError as e:  # its messages begin with the setting's name: make that the flag's
        raise ValueError(f"--{e}") from None
    print(f"loading {args.model} ...", file=sys.stderr)
    checkpoint = load_checkpoint(args.model)
    if media and model_spec(checkpoint.config, where=checkpoint.config_name).vlm is None:
        raise ValueError(f"{args.model} reads text only: --image and --video need a SmolVLM model")
    pipe = Pipeline(checkpoint, settle_dtype(options, args.dtype, checkpoint),
                    kv_cache_bytes=args.kv_cache_mb * 2**20 if args.kv_cache_mb else None,
                    prefix_cache=not args.no_prefix_cache)
    if getattr(args, "verbose", False):
        print(f"weights: {pipe.runner.weight_form} ({pipe.runner.weight_form_reason})", file=sys.stderr)
    return pipe


def _stream(pipe, messages, settings, verbose: bool) -> str:
    gen = pipe.stream(messages, **settings)  # returns the GenerationResult, with the timings
    pieces = []
    while True:
        try:
            piece = next(gen)
        except StopIteration as done:
            result = done.value
            break
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    if verbose:
        t = result.timings
        prefill = result.prompt_tokens / t["prefill_s"] if t["prefill_s"] else 0.0
        print(f"prompt: {result.prompt_tokens} tokens ({result.cached_tokens} cached) in {t['prefill_s']:.2f} s "
              f"({prefill:.1f} tok/s); "
              f"answer: {t['new_tokens']} tokens, decoded in {t['decode_s']:.2f} s ({t['tokens_per_s']:.1f} tok/s)",
              file=sys.stderr)
    return "".join(pieces)


# ---- commands -------------------------------------------------------------------------------------

def cmd_run(args) -> None:
    settings = _settings(args)
    prompt = _prompt(args)
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            _check_file(kind, path)
    pipe = _load(args, media=bool(args.image or args.video))
    messages = _system(args) + [_user_message(prompt, args.image, args.video, args.max_frames)]
    _stream(pipe, messages, settings, args.verbose)


def cmd_chat(args) -> None:
    settings = _settings(args)
    pipe = _load(args)
    print("chat: type a message; /help lists the commands.", file=sys.stderr)
    history, attached = _system(args), {"image": [], "video": []}
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        command, _, path = line.partition(" ")
        if not line:
            continue
        if command == "/quit":
            break
        if command == "/help":
            print(CHAT_COMMANDS, file=sys.stderr)
        elif command == "/reset":
            history, attached = _system(args), {"image": [], "video": []}
        elif command in ("/image", "/video"):
            kind, path = command[1:], path.strip()
            try:  # refused now, so that it never rides along with later messages
                if not path:
                    raise ValueError(f"{command} needs a PATH")
                if pipe.spec.vlm is None:
                    raise ValueError("this model reads text only: it cannot take images or videos")
                _check_file(kind, path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            attached[kind].append(path)
        elif line.startswith("/"):
            print(f"error: unknown command {command!r:.40}; /help lists the commands", file=sys.stderr)
        else:
            message = _user_message(line, attached["image"], attached["video"], args.max_frames)
            dropped, attached = any(attached.values()), {"image": [], "video": []}
            try:
                print("assistant> ", end="", flush=True)
                answer = _stream(pipe, history + [message], settings, args.verbose)
            except ValueError as e:  # a bad image or video, an over-long conversation: say so, keep chatting
                note = " (the attachments were dropped; the conversation so far is kept)" if dropped else ""
                print(flush=True)  # ends the "assistant> " line
                print(f"error: {e}{note}", file=sys.stderr)
                continue
            history += [message, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def cmd_inspect(args) -> None:
    import numpy as np

    from .graph import Graph
    from .pipeline import model_spec
    from .engine.runner import ModelRunner
    from .session import Session
    from .weights import load_checkpoint
    ckpt = load_checkpoint(args.model)
    spec = model_spec(ckpt.config, ckpt.tensors, ckpt.config_name)
    print(f"model: {ckpt.source}")
    print(f"text: {spec.text}")
    if spec.vlm:
        print(f"vision: {spec.vlm.vision}, scale_factor {spec.vlm.scale_factor}, "
              f"{spec.vlm.num_vision_tokens} tokens per image")
    runner = ModelRunner(spec)
    params = runner.expected_parameters()
    total = sum(int(np.prod(t.shape)) for t in params.values())
    print(f"parameters: {len(params)} tensors, {total / 1e6:.1f}M values")
    g = Graph()
    g.set_outputs([runner.build_text_graph(g, rows=1, logit_rows=1, image_tokens=0, mode="decode")])
    session = Session(g)
    print("decode step graph:", g)
    print("passes:", session.report)
    print(session.plan.summary())


def cmd_serve(args) -> None:
    try:
        from .server import ServerConfig, serve
        from .server.memory import limit_arenas
    except ImportError as e:
        raise ValueError(f"the server needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from None
    limit_arenas()  # before the model's and the server's threads allocate
    config = ServerConfig(host=args.host, port=args.port, model_id=args.model, max_batch=args.max_batch,
                          max_context=args.max_context, max_queue=args.max_queue, api_key=args.api_key,
                          allow_remote_media=args.allow_remote_media, media_root=args.media_root,
                          max_body_bytes=args.max_body_mb * 2**20, max_images=args.max_images,
                          max_image_pixels=args.max_image_pixels, max_remote_fetches=args.max_remote_fetches,
                          max_videos=args.max_videos, max_video_frames=args.max_video_frames,
                          video_timeout_s=args.video_timeout,
                          allow_private_media_hosts=args.allow_private_media_hosts,
                          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                          keep_alive_s=args.keep_alive, max_connections=args.max_connections)
    serve(_load(args), config)


def cmd_caption(args) -> None:
    import time

    from .jobs import caption
    settings = _settings(args)
    start = time.perf_counter()
    try:
        rows = caption(args.input, args.output, model=args.model, prompt=args.prompt, prompt_column=args.prompt_column,
                       path_column=args.path_column, system=args.system, max_frames=args.max_frames,
                       batch_size=args.batch_size, ray=args.ray, workers=args.workers, device=args.device,
                       dtype=args.dtype, overwrite=args.overwrite,
                       kv_cache_bytes=args.kv_cache_mb * 2**20 if args.kv_cache_mb else None, **settings)
    except KeyboardInterrupt:
        print(f"interrupted: the finished rows are committed in {args.output}.parts; run the same command to go on",
              file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    errors = sum(row["error"] is not None for row in rows)
    print(f"wrote {len(rows)} rows to {args.output} ({errors} with errors) in {seconds:.1f} s", file=sys.stderr)
    if args.verbose:
        tokens = [sum(row[k] or 0 for row in rows) for k in ("prompt_tokens", "completion_tokens")]
        print(f"prompts: {tokens[0]} tokens; answers: {tokens[1]} tokens ({tokens[1] / seconds:.1f} tok/s over the "
              "whole run, resumed rows included)", file=sys.stderr)


# ---- parser ---------------------------------------------------------------------------------------

def _version() -> str:
    try:
        return importlib.metadata.version("meganeura")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meganeura", description="Run SmolVLM2 / SmolLM2 locally.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help: str, device: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn, parser=p)  # main() reports stray arguments with this command's usage
        p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
        if device:
            p.add_argument("--device", type=_device, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                           help="where to run (default: %(default)s: a CUDA GPU when there is one)")
            p.add_argument("--dtype", choices=DTYPES, default="auto",
                           help="weights and activations (default: %(default)s: bfloat16 on a GPU; on a CPU, the "
                                "checkpoint's own bfloat16 where the CPU has bf16 products, else float32)")
            p.add_argument("--quantize", choices=QUANTIZE, default="auto",
                           help="the text weights kept int8, int4, f16 or bf16 on the CPU (default: %(default)s: a "
                                "GGUF's own precision, e.g. Q4_1 runs 4-bit, F16 f16; float32 checkpoints: none)")
            p.add_argument("--kv-cache-mb", type=_positive, default=None, metavar="MB",
                           help="the KV cache's budget (default: a fifth of free GPU memory; on the CPU 2 GiB of "
                                "address space, taken as RAM only by tokens in use)")
            p.add_argument("--no-prefix-cache", action="store_true",
                           help="compute every prompt afresh (default: reuse cached prompt prefixes, earlier turns "
                                "and images included, and cached vision features)")
        return p

    def generation(p: argparse.ArgumentParser) -> None:
        defaults = GenerationConfig()
        p.add_argument("--system", default=None, metavar="TEXT", help="a system message before the conversation")
        p.add_argument("--max-new-tokens", type=_count, default=defaults.max_new_tokens, metavar="N",
                       help="the longest answer, in tokens (default: %(default)s)")
        p.add_argument("--temperature", type=_real, default=defaults.temperature, metavar="T",
                       help="0 = greedy (default)")
        p.add_argument("--top-k", type=_count, default=defaults.top_k, metavar="K", help="0 = off (default)")
        p.add_argument("--top-p", type=_real, default=defaults.top_p, metavar="P", help="(0, 1]; 1 = off (default)")
        p.add_argument("--repetition-penalty", type=_real, default=defaults.repetition_penalty, metavar="R",
                       help="> 0; 1 = off (default)")
        p.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="makes sampling reproducible")
        p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="end the answer before this text (repeatable)")
        p.add_argument("--max-frames", type=_positive, default=None, metavar="N",
                       help="sample at most this many frames per video (default: the checkpoint's, 64 for SmolVLM2)")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="print token counts and speeds (prefill and decode tok/s) to stderr")
        p.add_argument("--json-schema", default=None, metavar="FILE",
                       help="answers are JSON matching the schema in FILE (needs meganeura[structured])")
        p.add_argument("--regex", default=None, metavar="RE", help="answers match this regular expression")
        p.add_argument("--choice", action="append", default=[], metavar="TEXT",
                       help="the answer is one of these strings (repeatable)")

    run = command("run", cmd_run, "answer one prompt, streaming")
    generation(run)
    run.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    run.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video file (repeatable; needs PyAV)")
    run.add_argument("prompt", nargs="?", help="the question; '-' or none (with input piped in) reads stdin")
    generation(command("chat", cmd_chat, "an interactive conversation (/help lists its commands)"))
    command("inspect", cmd_inspect, "config, parameter count, graph and plan summary", device=False)
    srv = command("serve", cmd_serve, "an OpenAI-compatible HTTP server with a chat page at /")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=_number(int, 1, 65535), default=8000)
    srv.add_argument("--max-batch", type=_positive, default=8,
                     help="sequences generated together (default: %(default)s)")
    srv.add_argument("--max-context", type=_positive, default=None,
                     help="tokens per request, prompt + answer (default: the model's, capped to what the KV cache "
                          "holds for one sequence)")
    srv.add_argument("--max-queue", type=_positive, default=64, help="requests waiting for a slot before 429")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /health and /metrics")
    srv.add_argument("--allow-remote-media", action="store_true",
                     help="let requests fetch http(s) image and video URLs")
    srv.add_argument("--media-root", default=None, help="let requests read image and video files inside this folder")
    srv.add_argument("--max-body-mb", type=_positive, default=32)
    srv.add_argument("--max-images", type=_count, default=4, help="images per request")
    srv.add_argument("--max-image-pixels", type=_positive, default=16_777_216, help="pixels per image or video frame")
    srv.add_argument("--max-videos", type=_count, default=2, help="videos per request (default: %(default)s)")
    srv.add_argument("--max-video-frames", type=_positive, default=64,
                     help="frames sampled from one video: the most a request's max_frames may ask "
                          "(default: %(default)s)")
    srv.add_argument("--video-timeout", type=_real, default=60.0, metavar="S",
                     help="seconds to read one video: scan it and decode its sampled frames (default: %(default)s)")
    srv.add_argument("--max-remote-fetches", type=_positive, default=8,
                     help="requests fetching remote images at once; one more gets 429 (default: %(default)s)")
    srv.add_argument("--allow-private-media-hosts", action="store_true",
                     help="let remote image URLs reach loopback, private and link-local addresses")
    srv.add_argument("--header-timeout", type=_real, default=10.0, metavar="S",
                     help="seconds to send a request's headers (default: %(default)s)")
    srv.add_argument("--body-timeout", type=_real, default=60.0, metavar="S",
                     help="seconds to send a request's body (default: %(default)s)")
    srv.add_argument("--keep-alive", type=_real, default=5.0, metavar="S",
                     help="seconds an idle connection stays open (default: %(default)s)")
    srv.add_argument("--max-connections", type=_positive, default=1024,
                     help="open connections; more are closed on arrival (default: %(default)s)")
    cap = command("caption", cmd_caption, "answer a prompt about every image or video in a folder, glob or "
                  "table, resumably (a batch job)")
    generation(cap)
    cap.add_argument("input", help="a folder (images and videos, recursively), a glob, or a .jsonl/.csv/.parquet "
                                   "table with a path column")
    cap.add_argument("--output", required=True, metavar="OUT",
                     help="a .parquet or .jsonl file; rows are committed in OUT.parts as they finish, and the same "
                          "command resumes a job that was killed")
    which = cap.add_mutually_exclusive_group()
    which.add_argument("--prompt", default=None, metavar="TEXT",
                       help="asked about every input (default: \"Describe this image in one sentence.\")")
    which.add_argument("--prompt-column", default=None, metavar="NAME", help="a table column holding each row's prompt")
    cap.add_argument("--path-column", default=None, metavar="NAME",
                     help="the table column of file paths (default: path; an empty cell is a text-only prompt)")
    cap.add_argument("--batch-size", type=_positive, default=16, metavar="N",
                     help="sequences generated together, and rows per committed part (default: %(default)s)")
    cap.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                     help="run on Ray Data: a local Ray, or the cluster at ADDRESS (needs meganeura[ray])")
    cap.add_argument("--workers", type=_positive, default=None, metavar="N",
                     help="with --ray: engine actors (default: one per GPU, else one)")
    cap.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, stray = _parser().parse_known_args(argv)
    if stray:
        args.parser.error(f"unrecognized arguments: {' '.join(stray)}")
    try:
        args.fn(args)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Later writes, and the interpreter's
        # final flush, go to /dev/null instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a tool killed by the signal reports
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
