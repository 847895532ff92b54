"""The OpenAI chat-completions wire format: request validation (pydantic) and response bodies."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag,
                      ValidationError, field_validator)
from pydantic_core import PydanticCustomError

from ..engine.sampler import MAX_TOP_LOGPROBS
from ..generate import GenerationConfig

MAX_LEGACY_LOGPROBS = 5  # /v1/completions' integer logprobs, as OpenAI bounds it
PART_TYPES = ("text", "image_url", "video_url", "video")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(s: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); Python keeps it, then the tokenizer and the
    # UTF-8 encoder fail on it deep inside a request. (A search, not an encode: no copy of a 20 MB text.)
    found = not s.isascii() and _SURROGATE.search(s)
    if found:
        raise PydanticCustomError("unicode", "a lone surrogate ({code}) at character {at} is not valid text",
                                  {"code": f"\\u{ord(found.group()):04x}", "at": found.start()})
    return s


Text = Annotated[str, AfterValidator(_unicode)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we don't use (user, logprobs=false, ...)


class MediaURL(_Model):
    url: Text = Field(min_length=1)


class TextPart(_Model):
    type: Literal["text"]
    text: Text


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Model):
    """A video as vLLM takes it; `max_frames` (an extra) caps the frames sampled."""

    type: Literal["video_url"]
    video_url: MediaURL
    max_frames: StrictInt | None = Field(None, ge=1)

    @property
    def url(self) -> str:
        return self.video_url.url


class VideoPart(_Model):
    """A video as transformers' chat messages write it, its source a URL as video_url's."""

    type: Literal["video"]
    video: Text = Field(min_length=1)
    max_frames: StrictInt | None = Field(None, ge=1)

    @property
    def url(self) -> str:
        return self.video


# Tagged unions, so that an error reports only the branch the input meant: a plain union of
# str and list would answer every bad part with "content.str: Input should be a valid string".
Part = Annotated[TextPart | ImagePart | VideoURLPart | VideoPart, Field(discriminator="type")]
Content = Annotated[Annotated[Text, Tag("str")] | Annotated[list[Part], Tag("parts")],
                    Discriminator(lambda v: "str" if isinstance(v, str) else "parts")]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: Content

    @field_validator("content")
    @classmethod
    def _not_empty(cls, v):
        if not v and isinstance(v, list):
            raise PydanticCustomError("empty", "an empty list of parts: give a string or at least one part")
        return v


class StreamOptions(_Model):
    include_usage: StrictBool = False


def _number(**bounds):
    # strict: "5" and true are not numbers; NaN and inf are refused with their own message
    return Field(None, strict=True, allow_inf_nan=False, **bounds)


class GenerationRequest(_Model):
    """What chat and raw completions share: the answer's limit, sampling, stop strings,
    streaming and a constraint."""

    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = _number(ge=0, le=2)
    top_p: float | None = _number(gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)                 # extras vLLM accepts too
    repetition_penalty: float | None = _number(gt=0)
    ignore_eos: StrictBool = False                              # runs to max_tokens (benchmarks)
    seed: StrictInt | None = Field(None, ge=0)
    stop: list[Text] = Field([], max_length=4)   # a string, a list of them, or null
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1, le=1)   # one choice per request
    # constrained answers (engine/grammar.py checks them): OpenAI's field, and vLLM's extras
    response_format: dict | None = None
    guided_json: dict | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _listed(cls, v):
        return [v] if isinstance(v, str) else [] if v is None else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if not all(v):
            raise PydanticCustomError("empty", "stop strings must not be empty")
        return v

    @property
    def answer_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        return None

    def sampling(self, max_new_tokens: int, constraint=None) -> GenerationConfig:
        """The request's settings; those it leaves out are GenerationConfig's defaults."""
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                 if getattr(self, k) is not None}
        return GenerationConfig(max_new_tokens=max_new_tokens, seed=self.seed, stop=tuple(self.stop),
                                constraint=constraint, logprobs=self.top_logprobs_asked,
                                ignore_eos=self.ignore_eos, **given)

    def constraint_fields(self) -> dict:
        """The constraint asked for, as Pipeline.constraint's arguments by request field."""
        fields = {"response_format": "response_format", "guided_json": "json_schema", "guided_regex": "regex",
                  "guided_choice": "choice"}
        return {name: (arg, getattr(self, name)) for name, arg in fields.items() if getattr(self, name) is not None}


class CompletionRequest(GenerationRequest):
    """/v1/completions: a raw prompt, no chat template."""

    prompt: Text | list[Text]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)  # the legacy API's: top tokens per token
    echo: StrictBool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise PydanticCustomError("echo", "echo is not supported: the answer is returned without the prompt")
        return v

    @field_validator("prompt")
    @classmethod
    def _one(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise PydanticCustomError("one", "give one prompt (a string, or a list of one string)")
            v = v[0]
        if not v:
            raise PydanticCustomError("empty", "the prompt is empty")
        return v

    def texts(self):
        yield self.prompt

    def image_urls(self) -> list[str]:
        return []

    def videos(self) -> list:
        return []

    @property
    def answer_limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for raw completions

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_frames: StrictInt | None = Field(None, ge=1)   # an extra: for the video parts that give none

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("logprobs", "top_logprobs needs logprobs: true")
        return v

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def texts(self):
        """Every text the prompt is made of (for the size bound checked before tokenizing)."""
        for m in self.messages:
            if isinstance(m.content, str):
                yield m.content
            else:
                yield from (p.text for p in m.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        return [p.image_url.url for m in self.messages if isinstance(m.content, list)
                for p in m.content if isinstance(p, ImagePart)]

    def videos(self) -> list[VideoURLPart | VideoPart]:
        return [p for m in self.messages if isinstance(m.content, list)
                for p in m.content if isinstance(p, (VideoURLPart, VideoPart))]


def parse_request(data, kind: type[GenerationRequest] = ChatRequest) -> GenerationRequest:
    """Raises ValueError naming the first problem, e.g. "messages.0.content.1: unknown part type 'audio'"."""
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = list(err["loc"])
        if "content" in loc[:-1]:  # drop the tags of the unions: content's ("str"/"parts") and a part's type
            k = loc.index("content") + 1
            del loc[k]
            if len(loc) > k + 1:
                del loc[k + 1]
        raise ValueError(f"{'.'.join(map(str, loc)) or 'body'}: {_explain(err, loc)}") from None


def _explain(err: dict, loc: list) -> str:
    """Clearer words where pydantic's own are vague."""
    kind, allowed = err["type"], "allowed: " + ", ".join(PART_TYPES)
    if kind == "union_tag_invalid":
        return f"unknown part type {err['ctx']['tag']!r}; {allowed}"
    if kind == "union_tag_not_found":
        return f"a part needs a 'type'; {allowed}"
    if kind in ("model_type", "model_attributes_type"):
        if loc and loc[-1] in ("image_url", "video_url"):
            example = "image/png" if loc[-1] == "image_url" else "video/mp4"
            return f'must be an object: {{"url": "data:{example};base64,..."}}'
        return "must be a JSON object"
    if kind == "list_type" and loc and loc[-1] == "content":
        return f"must be a string or a list of parts ({allowed})"
    if kind == "finite_number":
        return "must be a finite number"
    return err["msg"]


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose keys and values came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_logprobs(entries, decode) -> dict:
    """OpenAI's `logprobs` of a choice from the sampler's TokenLogprob entries; decode(id) is a
    token's text (bytes: its UTF-8, so a token holding part of a character shows U+FFFD)."""
    def one(token: int, logprob: float) -> dict:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]}
                        for e in entries]}


def completion(id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, logprobs: dict | None = None, cached_tokens: int = 0) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": logprobs}],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chunk(id_: str, model: str, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed event: a delta, a finish reason, or (with choices empty) the usage."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def text_logprobs(entries, decode, offset: int) -> dict:
    """The legacy `logprobs` of a raw completion from the sampler's TokenLogprob entries: each
    token's text and log-probability, the most likely tokens by text (the chosen one always
    among them, as OpenAI's) and the character offset where the token's text starts, counted
    from the start of the prompt as OpenAI counts it (`offset`: where the first one starts)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        text = decode(e.token)
        top = {}
        for token, logprob in e.top:  # most likely first: tokens decoding alike keep the likelier
            top.setdefault(decode(token), logprob)
        top.setdefault(text, e.logprob)
        tokens.append(text)
        values.append(e.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def text_completion(id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, cached_tokens: int = 0, logprobs: dict | None = None) -> dict:
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def text_chunk(id_: str, model: str, text: str | None = None, finish_reason: str | None = None,
               usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed event of a raw completion: text, a finish reason, or (choices empty) the usage."""
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason,
                                        "logprobs": logprobs}]
    body = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
