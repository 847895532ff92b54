"""Chat-template rendering and SmolVLM image- and video-token expansion.

Rendering mirrors transformers' ``apply_chat_template``: a sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a JSON ``tojson`` filter and the
``raise_exception``/``strftime_now`` helpers that Hub templates call.

Expansion mirrors ``SmolVLMProcessor``: each ``<image>`` placeholder becomes the tile
markers plus ``image_seq_len`` ``<image>`` tokens per tile and for the global view; each
``<video>`` placeholder becomes an intro line (frame count in words, duration), then per
frame its timestamp and the tokens of one unsplit image.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "IMAGE_TOKEN",
    "FAKE_IMAGE_TOKEN",
    "GLOBAL_IMAGE_TOKEN",
    "END_OF_UTTERANCE",
    "normalize_messages",
    "template_content_format",
    "render_chat",
    "image_prompt",
    "expand_image_tokens",
    "VIDEO_TOKEN",
    "VideoSource",
    "number_words",
    "video_prompt",
    "expand_video_tokens",
]

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
VIDEO_TOKEN = "<video>"

ContentFormat = Literal["auto", "parts", "string"]

# Keys under which an image part may carry its source (transformers' order).
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
_VIDEO_SOURCE_KEYS = ("video", "url", "path")


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _url(part: Mapping[str, Any], kind: str, where: str) -> str:
    """The URL of an OpenAI-style `image_url` / `video_url` part ({"url": ...} or a bare string)."""
    info = part.get(kind)
    url = info.get("url") if isinstance(info, Mapping) else info
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: '{kind}' part needs {kind}.url (a string)")
    return url


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    """The source of an image part, or None when the caller passes images separately."""
    if part["type"] == "image_url":
        return _url(part, "image_url", where)
    for key in _IMAGE_SOURCE_KEYS:
        if part.get(key) is not None:
            value = part[key]
            # A bare base64 payload: make it a data URL so load_image can decode it.
            if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
                value = "data:image/unknown;base64," + value
            return value
    return None


@dataclass(frozen=True)
class VideoSource:
    """A video part's source (a path, or a list of frames) and its options: ``max_frames``
    caps the frames sampled, ``fps`` sets the sampling rate (for a list of frames: the rate
    they were taken at). None keeps the checkpoint's settings."""

    source: Any
    max_frames: int | None = None
    fps: float | None = None


def _video_source(part: Mapping[str, Any], where: str) -> VideoSource:
    if part["type"] == "video_url":
        source = _url(part, "video_url", where)
    else:
        source = next((part[k] for k in _VIDEO_SOURCE_KEYS if part.get(k) is not None), None)
    max_frames, fps = part.get("max_frames"), part.get("fps")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"{where}: 'max_frames' must be a positive integer, got {max_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise ValueError(f"{where}: 'fps' must be a positive number, got {fps!r}")
    return VideoSource(source, max_frames, fps)


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], content_format: Literal["parts", "string"] = "parts"
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Validate chat messages and shape them for a template.

    Content may be a string or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image", [image|url|path|base64]: ...}`` or the OpenAI form
    ``{"type": "image_url", "image_url": {"url": ...}}``. Image parts become a bare
    ``{"type": "image"}`` (templates render that as ``<image>``; the pixels stay out of the
    template) and their sources are returned in order, ``None`` for parts without one.

    Video parts, ``{"type": "video", [video|url|path]: ..., "max_frames"?, "fps"?}`` or
    ``{"type": "video_url", "video_url": {"url": ...}}``, become a text part holding the
    ``<video>`` placeholder, and a :class:`VideoSource` joins the sources in prompt order.
    (The published SmolVLM2 template has no video branch, so transformers renders video
    conversations with its own default template; its output is the same as this.)

    ``content_format="parts"`` turns string content into a single text part, for
    templates that iterate over parts (SmolVLM2's published template renders a plain
    string as nothing at all). ``"string"`` does the reverse for text-only templates
    such as SmolLM2's: text parts are joined with newlines; image and video parts are an error.
    Messages are copied; the input is not modified. Other message keys pass through.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if content_format not in ("parts", "string"):
        raise ValueError(f"content_format must be 'parts' or 'string', got {content_format!r}")

    out: list[dict[str, Any]] = []
    sources: list[Any] = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"{where}: 'role' must be a non-empty string, got {message.get('role')!r}")
        if "content" not in message or message["content"] is None:
            raise ValueError(f"{where} ({message['role']}): missing 'content'")
        content = message["content"]

        videos = 0
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            parts = []
            for j, part in enumerate(content):
                part_where = f"{where} part {j}"
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise ValueError(f"{part_where}: expected a dict with a 'type', got {part!r:.80}")
                kind = part["type"]
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ValueError(f"{part_where}: text part needs a string 'text'")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image", "image_url"):
                    sources.append(_image_source(part, part_where))
                    parts.append({"type": "image"})
                elif kind in ("video", "video_url"):
                    sources.append(_video_source(part, part_where))
                    parts.append({"type": "text", "text": VIDEO_TOKEN})
                    videos += 1
                else:
                    raise ValueError(
                        f"{part_where}: unsupported content part type {kind!r} "
                        "(expected text, image, image_url, video or video_url)"
                    )
        else:
            raise ValueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")

        if content_format == "string":
            if videos or any(p["type"] == "image" for p in parts):
                raise ValueError(f"{where}: this template takes plain-string content and cannot place images or videos")
            new_content: Any = "\n".join(p["text"] for p in parts)
        else:
            new_content = parts
        out.append({**message, "content": new_content})
    return out, sources


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used by some Hub templates to
    mark assistant spans); we have no use for the spans, so the body renders as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# A chat template is code that came with the checkpoint. It runs in jinja2's immutable sandbox
# (no private attributes, no mutation of the messages), with no loader (so no {% include %} of
# files) and with bounds, so that a hostile or broken one fails in a moment, not after hours of
# looping or gigabytes of text: range() items per render, the size of values made by * and **,
# and the output.
MAX_TEMPLATE_ITEMS = 100_000
MAX_TEMPLATE_OUTPUT = 1 << 22  # characters: far beyond any context this engine runs


def _too_big(what: str):
    return jinja2.sandbox.SecurityError(f"{what} exceeds the chat template limits")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        ints = isinstance(left, int) and isinstance(right, int)
        if ints and operator == "**" and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise _too_big(f"{left} ** {right}")
        if ints and operator == "*" and left.bit_length() + right.bit_length() > 4096:
            raise _too_big("a product")
        if operator == "*" and not ints:  # repeating a string or list
            times, sequence = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(times, int) and isinstance(sequence, (str, list, tuple)) \
                    and len(sequence) * times > MAX_TEMPLATE_OUTPUT:
                raise _too_big(f"repeating a sequence {times} times")
        return super().call_binop(context, operator, left, right)


def _bounded_range():
    """A range() that counts its items against one render's budget."""
    left = [MAX_TEMPLATE_ITEMS]

    def bounded(*args):
        items = range(*args)
        try:
            left[0] -= len(items)
        except OverflowError:  # more items than an index can hold
            left[0] = -1
        if left[0] < 0:
            raise _too_big(f"range({', '.join(map(str, args))})")
        return items
    return bounded


@functools.lru_cache(maxsize=None)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc


def _mentions_content(node: jinja2.nodes.Node) -> bool:
    # find_all yields descendants only, so look at the node itself too.
    candidates = [node, *node.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr, jinja2.nodes.Name))]
    for sub in candidates:
        if isinstance(sub, jinja2.nodes.Getattr) and sub.attr == "content":
            return True
        if isinstance(sub, jinja2.nodes.Getitem) and isinstance(sub.arg, jinja2.nodes.Const) and sub.arg.value == "content":
            return True
        if isinstance(sub, jinja2.nodes.Name) and sub.name == "content":
            return True
    return False


@functools.lru_cache(maxsize=32)
def template_content_format(template: str) -> Literal["parts", "string"]:
    """Guess whether a template iterates over content parts (``{% for x in
    message['content'] %}``) or only uses content as a string."""
    try:
        ast = _environment().parse(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc
    for loop in ast.find_all(jinja2.nodes.For):
        if _mentions_content(loop.iter):
            return "parts"
    return "string"


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    content_format: ContentFormat = "auto",
    **extra: Any,
) -> str:
    """Render ``messages`` with a Jinja chat template.

    Messages are first passed through :func:`normalize_messages` (use that directly to get
    the image sources in order). ``content_format="auto"`` picks parts or string content
    from the template (see :func:`template_content_format`). ``extra`` becomes template
    variables (e.g. ``bos_token``). Template errors, including ``raise_exception`` calls,
    surface as ``ValueError``.
    """
    fmt = template_content_format(template) if content_format == "auto" else content_format
    shaped, _ = normalize_messages(messages, content_format=fmt)
    compiled = _compile(template)
    pieces, size = [], 0
    try:
        for piece in compiled.generate(messages=shaped, add_generation_prompt=add_generation_prompt,
                                       range=_bounded_range(), **extra):
            size += len(piece)
            if size > MAX_TEMPLATE_OUTPUT:
                raise _too_big(f"an output of over {MAX_TEMPLATE_OUTPUT} characters")
            pieces.append(piece)
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(), the sandbox's limits
        raise ValueError(f"chat template failed: {exc}") from exc
    except Exception as exc:  # a template's bug (1/0, recursion, ...) is the checkpoint's, not ours
        raise ValueError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    return "".join(pieces)


# --------------------------------------------------------------------------------------
# Image tokens
# --------------------------------------------------------------------------------------


def image_prompt(
    rows: int,
    cols: int,
    image_seq_len: int = 64,
    *,
    image_token: str = IMAGE_TOKEN,
    fake_token: str = FAKE_IMAGE_TOKEN,
    global_token: str = GLOBAL_IMAGE_TOKEN,
) -> str:
    """The token string that stands for one image with a ``rows`` x ``cols`` tile grid.

    Each tile is ``<fake><row_R_col_C>`` + ``image_seq_len`` image tokens, each row ends
    with a newline, and the global view follows after a blank line, closed by a final
    ``<fake>``. An unsplit image (0, 0) is just the wrapped global view.
    """
    if rows < 0 or cols < 0 or (rows == 0) != (cols == 0):
        raise ValueError(f"invalid tile grid {rows}x{cols}: both must be positive, or both 0 for an unsplit image")
    tokens = image_token * image_seq_len
    global_view = f"{fake_token}{global_token}{tokens}{fake_token}"
    if rows == 0:
        return global_view
    grid = "".join(
        "".join(f"{fake_token}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return f"{grid}\n{global_view}"


def expand_image_tokens(
    text: str,
    image_grids: Sequence[tuple[int, int]],
    image_seq_len: int = 64,
    *,
    image_token: str = IMAGE_TOKEN,
    fake_token: str = FAKE_IMAGE_TOKEN,
    global_token: str = GLOBAL_IMAGE_TOKEN,
) -> str:
    """Replace the i-th ``<image>`` placeholder in ``text`` with the tokens of image i.

    ``image_grids`` holds each image's (rows, cols) from preprocessing, in prompt order.
    """
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(image_grids):
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {image_token} placeholder(s) but {len(image_grids)} "
            "image(s) were given; they must match one to one"
        )
    out = [pieces[0]]
    for (rows, cols), piece in zip(image_grids, pieces[1:]):
        out.append(
            image_prompt(
                rows, cols, image_seq_len, image_token=image_token, fake_token=fake_token, global_token=global_token
            )
        )
        out.append(piece)
    return "".join(out)


# --------------------------------------------------------------------------------------
# Video tokens
# --------------------------------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    tens, ones = divmod(rest, 10)
    tail = _ONES[rest] if rest < 20 else _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{_ONES[hundreds]} hundred" + (f" and {tail}" if rest else "")


def number_words(n: int) -> str:
    """An English cardinal spelled as the reference's num2words spells it: "sixty-four",
    "one hundred and one", "one thousand, two hundred" (0 <= n < 1,000,000)."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words covers 0..999999, got {n}")
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _below_thousand(rest)
    head = f"{_below_thousand(thousands)} thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else ", ") + _below_thousand(rest)


def video_prompt(
    timestamps: Sequence[float],
    duration: float | None,
    image_seq_len: int = 64,
    *,
    frame_count: int | None = None,
    image_token: str = IMAGE_TOKEN,
    fake_token: str = FAKE_IMAGE_TOKEN,
    global_token: str = GLOBAL_IMAGE_TOKEN,
) -> str:
    """The token string that stands for one video whose frames were taken at ``timestamps``
    (seconds): an intro line with the frame count in words and the duration as H:MM:SS, then
    per frame "\nFrame from MM:SS:" and an unsplit image's tokens, then a blank line.

    ``duration`` None (frames given as a list) takes the last timestamp, as the reference
    does; ``frame_count`` (default: the number of timestamps) is what the intro announces.
    """
    if not timestamps:
        raise ValueError("a video needs at least one frame")
    count = len(timestamps) if frame_count is None else frame_count
    seconds = int(duration) if duration is not None else int(timestamps[-1])
    text = (f"You are provided the following series of {number_words(count)} frames "
            f"from a {timedelta(seconds=seconds)} [H:MM:SS] video.\n")
    frame = image_prompt(0, 0, image_seq_len, image_token=image_token, fake_token=fake_token,
                         global_token=global_token)
    for t in timestamps:
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:{frame}"
    return text + "\n\n"


def expand_video_tokens(
    text: str,
    videos: Sequence[tuple[Sequence[float], float | None]],
    image_seq_len: int = 64,
    **tokens: str,
) -> str:
    """Replace the i-th ``<video>`` placeholder in ``text`` with :func:`video_prompt` of
    video i, given as (timestamps, duration). Run it after :func:`expand_image_tokens`:
    the video text holds ``<image>`` tokens of its own. ``tokens`` are video_prompt's
    token keywords.
    """
    pieces = text.split(VIDEO_TOKEN)
    if len(pieces) - 1 != len(videos):
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {VIDEO_TOKEN} placeholder(s) but {len(videos)} video(s) were "
            "given; they must match one to one"
        )
    # The reference announces the frame count of its padded batch of videos: the longest one's.
    count = max((len(timestamps) for timestamps, _ in videos), default=0)
    out = [pieces[0]]
    for (timestamps, duration), piece in zip(videos, pieces[1:]):
        out.append(video_prompt(timestamps, duration, image_seq_len, frame_count=count, **tokens))
        out.append(piece)
    return "".join(out)
