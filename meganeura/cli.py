"""Command line: `meganeura run | chat | inspect | serve`. Answers go to stdout, diagnostics to stderr."""

from __future__ import annotations

import argparse
import sys

from .pipeline import DEFAULT_MODEL


def _user_message(text: str, images: list[str], videos: tuple[str, ...] | list[str] = (),
                  max_frames: int | None = None) -> dict:
    parts = [{"type": "image", "image": path} for path in images]
    parts += [{"type": "video", "video": path, "max_frames": max_frames} for path in videos]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _settings(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}


def _load(args):
    from .pipeline import load
    print(f"loading {args.model} ...", file=sys.stderr)
    return load(args.model, device=args.device, dtype=args.dtype)


def _stream(pipe, messages, settings) -> str:
    pieces = []
    for piece in pipe.stream(messages, **settings):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def cmd_run(args) -> None:
    pipe = _load(args)
    _stream(pipe, [_user_message(args.prompt, args.image, args.video, args.max_frames)], _settings(args))


def cmd_chat(args) -> None:
    pipe = _load(args)
    print("chat: type a message; /image PATH or /video PATH attaches a file, /reset starts over, /quit leaves.",
          file=sys.stderr)
    history, pending, pending_videos = [], [], []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            history, pending, pending_videos = [], [], []
            continue
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            continue
        if line.startswith("/video "):
            pending_videos.append(line[len("/video "):].strip())
            continue
        message = _user_message(line, pending, pending_videos, args.max_frames)
        try:
            print("assistant> ", end="", flush=True)
            answer = _stream(pipe, history + [message], _settings(args))
        except ValueError as e:  # a bad image or video, an over-long conversation: say so, keep chatting
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        history += [message, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        pending, pending_videos = [], []


def cmd_inspect(args) -> None:
    import numpy as np

    from .graph import Graph
    from .pipeline import model_spec
    from .engine.runner import ModelRunner
    from .session import Session
    from .weights import load_checkpoint
    ckpt = load_checkpoint(args.model)
    spec = model_spec(ckpt.config)
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
    except ImportError as e:
        raise ValueError(f"the server needs FastAPI and uvicorn: pip install 'meganeura[serve]' ({e})") from None
    config = ServerConfig(host=args.host, port=args.port, model_id=args.model, max_batch=args.max_batch,
                          max_context=args.max_context, max_queue=args.max_queue, api_key=args.api_key,
                          allow_remote_media=args.allow_remote_media, media_root=args.media_root,
                          max_body_bytes=args.max_body_mb * 2**20, max_images=args.max_images,
                          max_image_pixels=args.max_image_pixels)
    serve(_load(args), config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meganeura", description="Run SmolVLM2 / SmolLM2 locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="local folder, .gguf file, Hub id, or smollm2-135m-instruct (default: %(default)s)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda")
        p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--max-frames", type=int, default=None,
                       help="sample at most this many frames per video (default: the checkpoint's, 64 for SmolVLM2)")

    run = sub.add_parser("run", help="answer one prompt, streaming")
    common(run)
    run.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    run.add_argument("--video", action="append", default=[], help="a video file (repeatable; needs PyAV)")
    run.add_argument("prompt")
    run.set_defaults(fn=cmd_run)
    chat = sub.add_parser("chat", help="an interactive conversation")
    common(chat)
    chat.set_defaults(fn=cmd_chat)
    inspect = sub.add_parser("inspect", help="config, parameter count, graph and plan summary")
    inspect.add_argument("--model", default=DEFAULT_MODEL)
    inspect.set_defaults(fn=cmd_inspect)
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page at /")
    srv.add_argument("--model", default=DEFAULT_MODEL)
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda")
    srv.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default: %(default)s)")
    srv.add_argument("--max-context", type=int, default=None,
                     help="tokens per request, prompt + answer (default: the model's, capped to a 2 GiB KV cache)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    srv.add_argument("--allow-remote-media", action="store_true", help="let requests fetch http(s) image URLs")
    srv.add_argument("--media-root", default=None, help="let requests read image files inside this folder")
    srv.add_argument("--max-body-mb", type=int, default=32)
    srv.add_argument("--max-images", type=int, default=4, help="images per request")
    srv.add_argument("--max-image-pixels", type=int, default=16_777_216, help="pixels per image")
    srv.set_defaults(fn=cmd_serve)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
