#!/usr/bin/env python3
#
# Mock model upstream for the token meter test suite and demo.
#
# Speaks just enough of the OpenAI HTTP API (chat completions, legacy
# completions, embeddings, responses) to be metered, plain and streamed,
# with answers that depend only on the request, so a test can assert exact
# token counts.  Request headers named X-Mock-* choose token counts, delays
# and misbehaviour; t/mock/README.md lists them.
#
# Standard library only.  The HTTP side is written on raw asyncio streams
# rather than http.server because the interesting tests need control over
# every write: real gaps between stream events, bodies split one byte at a
# time, connections closed mid-body.

import argparse
import asyncio
import gzip
import hashlib
import json
import re
import signal
import sys
import time
import zlib


DEFAULT_PROMPT_TOKENS = 10
DEFAULT_CACHED_TOKENS = 0
DEFAULT_COMPLETION_TOKENS = 5
DEFAULT_DELAY_MS = 20

# A non-stream answer of a million tokens is already a 7 MB body; anything
# larger is certainly a typo in a test.
MAX_COMPLETION_TOKENS = 1000000

MAX_BODY = 64 * 1024 * 1024
MAX_HEAD = 64 * 1024

# A fixed creation time keeps answers identical from run to run, so tests
# may compare whole bodies.
CREATED = 1735689600

EMBEDDING_SIZE = 8

# One token per piece; an answer of n tokens is the first n pieces, cycled.
PIECES = ("Metered", " tokens", " flow", " from", " the", " mock",
          " upstream", ".")

MODES = frozenset((
    "error500", "error429", "cut", "no-usage", "always-usage", "bytes",
    "crlf", "comments", "multiline", "gzip", "echo", "slow-headers",
))

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
    413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 505: "HTTP Version Not Supported",
}

# X-Mock-Usage is spliced into the answer as it came, even when it is not
# valid JSON: the answer is serialised with this marker in place of the
# usage object, then the marker's JSON form is replaced by the raw text.
USAGE_MARK = "\x00mock usage\x00"
USAGE_MARK_JSON = json.dumps(USAGE_MARK)

HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
DIGITS = re.compile(r"[0-9]{1,40}")


class HttpError(Exception):
    """A request refused with an error answer that no mode reshapes."""

    def __init__(self, status, message, code):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Request:

    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""
        self.path, _, self.query = target.partition("?")

        connection = ",".join(self.values("connection")).lower()
        tokens = {t.strip() for t in connection.split(",")}
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in tokens
        else:
            self.keep_alive = "keep-alive" in tokens

    def values(self, name):
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name):
        found = self.values(name)
        return found[0] if found else None


class Control:
    """What the X-Mock-* headers of one request ask for."""

    def __init__(self, req):
        self.prompt = self.number(req, "X-Mock-Prompt-Tokens",
                                  DEFAULT_PROMPT_TOKENS)
        self.cached = self.number(req, "X-Mock-Cached-Tokens",
                                  DEFAULT_CACHED_TOKENS)
        self.completion = self.number(req, "X-Mock-Completion-Tokens",
                                      DEFAULT_COMPLETION_TOKENS)
        self.delay = self.number(req, "X-Mock-Delay-Ms",
                                 DEFAULT_DELAY_MS) / 1000
        self.usage_raw = req.header("x-mock-usage")

        if self.completion > MAX_COMPLETION_TOKENS:
            raise HttpError(400, "X-Mock-Completion-Tokens: more than %d"
                            % MAX_COMPLETION_TOKENS, "mock_bad_header")

        self.modes = []
        for value in req.values("x-mock-mode"):
            for mode in value.split(","):
                mode = mode.strip().lower()
                if not mode:
                    continue
                if mode not in MODES:
                    raise HttpError(400, "X-Mock-Mode: unknown mode \"%s\""
                                    % mode, "mock_bad_header")
                self.modes.append(mode)

    @staticmethod
    def number(req, name, default):
        value = req.header(name.lower())
        if value is None:
            return default
        value = value.strip()
        if not DIGITS.fullmatch(value):
            raise HttpError(400, "%s: \"%s\" is not a non-negative integer"
                            % (name, value), "mock_bad_header")
        return int(value)

    def has(self, mode):
        return mode in self.modes

    def output(self, body):
        """Number of output tokens and why the answer stopped."""

        limits = []
        for field in ("max_tokens", "max_completion_tokens",
                      "max_output_tokens"):
            value = body.get(field) if isinstance(body, dict) else None
            # bool is an int in Python, but not a limit in JSON
            if (isinstance(value, int) and not isinstance(value, bool)
                    and value >= 0):
                limits.append(value)

        if limits and min(limits) < self.completion:
            return min(limits), "length"

        return self.completion, "stop"

    def usage(self, shape, output):
        if self.usage_raw is not None:
            return USAGE_MARK

        if shape == "embeddings":
            return {"prompt_tokens": self.prompt,
                    "total_tokens": self.prompt}

        if shape == "responses":
            return {
                "input_tokens": self.prompt,
                "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt + output,
            }

        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": output,
            "total_tokens": self.prompt + output,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }

    def dump(self, obj, indent=None):
        if indent is None:
            text = json.dumps(obj, separators=(",", ":"))
        else:
            text = json.dumps(obj, indent=indent)

        if self.usage_raw is not None:
            text = text.replace(USAGE_MARK_JSON, self.usage_raw)

        return text


def encode(text):
    # surrogateescape gives back the exact bytes of an X-Mock-Usage header
    # that was not valid UTF-8
    return text.encode("utf-8", "surrogateescape")


def accepts_gzip(value):
    if value is None:
        return False

    weights = {}
    for item in value.split(","):
        name, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, number = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(number)
                except ValueError:
                    weight = 0.0
        weights[name.strip().lower()] = weight

    # an explicit "gzip;q=0" wins over "*"
    for name in ("gzip", "x-gzip", "*"):
        if name in weights:
            return weights[name] > 0

    return False


def error_object(message, kind, code):
    return {"error": {"message": message, "type": kind, "param": None,
                      "code": code}}


def answer_id(req):
    # the same request always gets the same id, like every other field
    digest = hashlib.sha256(req.path.encode() + b"\0" + req.body)
    return digest.hexdigest()[:24]


def pieces(n):
    return [PIECES[i % len(PIECES)] for i in range(n)]


# Reading requests


async def read_request(reader, writer):
    """Reads one request; None when the client closed between requests."""

    try:
        head = await reader.readuntil(b"\r\n\r\n")

    except asyncio.IncompleteReadError as e:
        if e.partial.strip() == b"":
            return None
        raise HttpError(400, "incomplete request head", "bad_request")

    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large", "bad_request")

    lines = head[:-4].split(b"\r\n")

    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line", "bad_request")

    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "unsupported version \"%s\"" % version,
                        "bad_request")

    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # a name with blanks around it is also how obsolete line folding
        # looks; both are refused, as RFC 9112 asks
        if not colon or not name or name != name.strip():
            raise HttpError(400, "malformed header line", "bad_request")
        headers.append((name.decode("latin-1"),
                        value.strip(b" \t").decode("utf-8",
                                                   "surrogateescape")))

    req = Request(method, target, version, headers)

    chunked = req.header("transfer-encoding")
    length = req.header("content-length")

    if chunked is None and length is None:
        return req

    # curl asks before sending a large body; nginx never does
    expect = req.header("expect")
    if (expect is not None and expect.lower() == "100-continue"
            and version == "HTTP/1.1"):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()

    if chunked is not None:
        if chunked.split(",")[-1].strip().lower() != "chunked":
            raise HttpError(501, "unsupported transfer encoding \"%s\""
                            % chunked, "bad_request")
        req.body = await read_chunked(reader)
        return req

    if not DIGITS.fullmatch(length.strip()):
        raise HttpError(400, "bad content length", "bad_request")

    size = int(length)
    if size > MAX_BODY:
        raise HttpError(413, "request body too large", "bad_request")

    req.body = await reader.readexactly(size)

    return req


async def read_chunked(reader):
    parts = []
    total = 0

    while True:
        line = await reader.readuntil(b"\r\n")
        size = line[:-2].split(b";", 1)[0].strip()
        if not HEX.fullmatch(size):
            raise HttpError(400, "bad chunk size", "bad_request")

        size = int(size, 16)
        if size == 0:
            break

        total += size
        if total > MAX_BODY:
            raise HttpError(413, "request body too large", "bad_request")

        parts.append(await reader.readexactly(size))

        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF", "bad_request")

    # trailer fields are read and ignored
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass

    return b"".join(parts)


# Writing responses


class Reply:
    """Writes one response, applying the modes that shape the bytes."""

    def __init__(self, writer, req):
        self.writer = writer
        self.req = req
        self.keep_alive = req.keep_alive
        self.http11 = req.version == "HTTP/1.1"

        self.bytewise = False
        self.slow = False
        self.cut_body = False
        self.gzip = False
        self.delay = 0

        self.status = None
        self.streamed = False
        self.chunked = False
        self.zip = None
        self.cut = False
        self.spacing = 1
        self.until_pause = 1

    def shape(self, ctl):
        self.bytewise = ctl.has("bytes")
        self.slow = ctl.has("slow-headers")
        self.cut_body = ctl.has("cut")
        self.gzip = (ctl.has("gzip")
                     and accepts_gzip(self.req.header("accept-encoding")))
        self.delay = ctl.delay

    async def write(self, data):
        if not self.bytewise:
            self.writer.write(data)
            await self.writer.drain()
            return

        # TCP_NODELAY is on (asyncio sets it), so each write leaves as a
        # segment of its own.  The pauses keep the proxy from reading many
        # of them at once; their spacing runs from 1 to 11 bytes so that
        # the places where reads end drift across the stream.
        for i in range(len(data)):
            self.writer.write(data[i:i + 1])
            await self.writer.drain()
            self.until_pause -= 1
            if self.until_pause == 0:
                self.spacing = self.spacing % 11 + 1
                self.until_pause = self.spacing
                await asyncio.sleep(0.001)

    async def head(self, status, ctype, length, extra=()):
        if self.slow:
            await asyncio.sleep(self.delay)

        self.status = status

        lines = ["HTTP/1.1 %d %s" % (status, REASONS[status]),
                 "Server: token-meter-mock",
                 "Content-Type: " + ctype]

        if self.gzip:
            lines += ["Content-Encoding: gzip", "Vary: Accept-Encoding"]

        if length is not None:
            lines.append("Content-Length: %d" % length)

        elif self.http11:
            lines.append("Transfer-Encoding: chunked")
            self.chunked = True

        else:
            # an HTTP/1.0 client learns where the stream ends by the close
            self.keep_alive = False

        lines.append("Connection: "
                     + ("keep-alive" if self.keep_alive else "close"))
        lines += extra

        await self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def whole(self, status, body, ctype="application/json", extra=()):
        if self.gzip:
            # mtime=0 keeps the compressed bytes the same on every run
            body = gzip.compress(body, mtime=0)

        await self.head(status, ctype, len(body), extra)

        if self.cut_body:
            await self.write(body[:len(body) // 2])
            await self.abort()
            return

        await self.write(body)

    async def open_stream(self):
        self.streamed = True
        if self.gzip:
            self.zip = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)

        await self.head(200, "text/event-stream", None,
                        ["Cache-Control: no-cache"])

    def frame(self, data):
        if not self.chunked or not data:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def send(self, data):
        if self.zip:
            # a sync flush after every event keeps a gzipped stream live
            data = self.zip.compress(data) + self.zip.flush(zlib.Z_SYNC_FLUSH)

        await self.write(self.frame(data))

    async def close_stream(self):
        tail = self.frame(self.zip.flush()) if self.zip else b""
        if self.chunked:
            tail += b"0\r\n\r\n"
        if tail:
            await self.write(tail)

    async def abort(self):
        # close() sends what is queued and then a FIN, which nginx reports
        # as "upstream prematurely closed connection"
        self.cut = True
        self.keep_alive = False
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def send_error(reply, status, message, kind, code, extra=()):
    body = json.dumps(error_object(message, kind, code), indent=2) + "\n"
    await reply.whole(status, body.encode(), extra=extra)


# Server-sent events


class Step:
    """One event of a stream, and its part in pacing and cutting it."""

    def __init__(self, data, event=None, content=False, tail=False):
        self.data = data
        self.event = event
        self.content = content
        self.tail = tail


def sse(step, ident, ctl):
    eol = "\r\n" if ctl.has("crlf") else "\n"
    comments = ctl.has("comments")
    lines = []

    if comments:
        # a comment block on its own, then one inside the event
        lines += [": keep-alive", ""]
        lines.append("id: %d" % ident)

    event = step.event
    if event is None and comments:
        # "message" is what SSE assumes anyway, so the stream still means
        # the same to a client
        event = "message"
    if event is not None:
        lines.append("event: " + event)

    if comments:
        lines.append(": between fields")

    if isinstance(step.data, str):
        lines.append("data: " + step.data)

    elif ctl.has("multiline"):
        # indent=0 puts a newline between JSON tokens, which is where
        # the payload may be split; half the lines omit the optional space
        # after the colon, which SSE also allows
        for i, part in enumerate(ctl.dump(step.data, indent=0).split("\n")):
            lines.append(("data:" if i % 2 else "data: ") + part)

    else:
        lines.append("data: " + ctl.dump(step.data))

    return encode(eol.join(lines) + eol + eol)


async def play(reply, ctl, steps, output):
    """Sends a stream, pausing before each content event."""

    half = (output + 1) // 2
    sent = 0

    await reply.open_stream()

    for ident, step in enumerate(steps, 1):
        if step.content:
            await asyncio.sleep(ctl.delay)

        # cut after half the content; a stream without content is cut
        # before its first closing event
        if ctl.has("cut") and (step.tail or (step.content and sent == half)):
            await reply.abort()
            return

        await reply.send(sse(step, ident, ctl))

        if step.content:
            sent += 1

    await reply.close_stream()


def stream_usage_wanted(ctl, body):
    if ctl.has("no-usage"):
        return False
    if ctl.has("always-usage"):
        return True
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# Endpoints


def model_of(body):
    model = body.get("model") if isinstance(body, dict) else None
    return model if model is not None else "mock-model"


async def chat_completions(req, reply, ctl, body):
    output, finish = ctl.output(body)
    base = {"id": "chatcmpl-" + answer_id(req),
            "object": "chat.completion",
            "created": CREATED,
            "model": model_of(body)}

    if body.get("stream") is not True:
        answer = dict(base, choices=[{
            "index": 0,
            "message": {"role": "assistant",
                        "content": "".join(pieces(output)),
                        "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }])
        if not ctl.has("no-usage"):
            answer["usage"] = ctl.usage("chat", output)

        await reply.whole(200, encode(ctl.dump(answer, indent=2) + "\n"))
        return

    want_usage = stream_usage_wanted(ctl, body)
    base["object"] = "chat.completion.chunk"

    def chunk(delta, finish_reason=None):
        obj = dict(base, choices=[{"index": 0, "delta": delta,
                                   "logprobs": None,
                                   "finish_reason": finish_reason}])
        if want_usage:
            obj["usage"] = None
        return obj

    steps = [Step(chunk({"role": "assistant", "content": ""}))]
    steps += [Step(chunk({"content": p}), content=True)
              for p in pieces(output)]
    steps.append(Step(chunk({}, finish), tail=True))
    if want_usage:
        steps.append(Step(dict(base, choices=[],
                               usage=ctl.usage("chat", output)), tail=True))
    steps.append(Step("[DONE]", tail=True))

    await play(reply, ctl, steps, output)


async def completions(req, reply, ctl, body):
    output, finish = ctl.output(body)
    base = {"id": "cmpl-" + answer_id(req),
            "object": "text_completion",
            "created": CREATED,
            "model": model_of(body)}

    def choice(text, finish_reason):
        return [{"text": text, "index": 0, "logprobs": None,
                 "finish_reason": finish_reason}]

    if body.get("stream") is not True:
        answer = dict(base, choices=choice("".join(pieces(output)), finish))
        if not ctl.has("no-usage"):
            answer["usage"] = ctl.usage("chat", output)

        await reply.whole(200, encode(ctl.dump(answer, indent=2) + "\n"))
        return

    want_usage = stream_usage_wanted(ctl, body)

    def chunk(text, finish_reason=None):
        obj = dict(base, choices=choice(text, finish_reason))
        if want_usage:
            obj["usage"] = None
        return obj

    steps = [Step(chunk(p), content=True) for p in pieces(output)]
    steps.append(Step(chunk("", finish), tail=True))
    if want_usage:
        steps.append(Step(dict(base, choices=[],
                               usage=ctl.usage("chat", output)), tail=True))
    steps.append(Step("[DONE]", tail=True))

    await play(reply, ctl, steps, output)


def embedding(item):
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round(int.from_bytes(digest[2 * i:2 * i + 2], "big") / 32767.5
                  - 1, 6)
            for i in range(EMBEDDING_SIZE)]


async def embeddings(req, reply, ctl, body):
    inputs = body.get("input")

    # one string, a list of strings, one list of token ids or a list of
    # such lists
    if not isinstance(inputs, list) or (inputs and all(
            isinstance(x, int) for x in inputs)):
        inputs = [inputs]

    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": i,
                  "embedding": embedding(item)}
                 for i, item in enumerate(inputs)],
        "model": model_of(body),
    }
    if not ctl.has("no-usage"):
        answer["usage"] = ctl.usage("embeddings", 0)

    await reply.whole(200, encode(ctl.dump(answer, indent=2) + "\n"))


async def responses(req, reply, ctl, body):
    output, finish = ctl.output(body)
    rid = answer_id(req)
    text = "".join(pieces(output))

    # as the real API does, an answer stopped by max_output_tokens is
    # "incomplete", and its stream ends in response.incomplete
    status = "completed" if finish == "stop" else "incomplete"

    def response(status, content, final):
        obj = {"id": "resp_" + rid,
               "object": "response",
               "created_at": CREATED,
               "status": status,
               "error": None,
               "incomplete_details": None,
               "model": model_of(body),
               "output": content}
        if status == "incomplete":
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        # the real API sends "usage": null until the answer is final
        if not final:
            obj["usage"] = None
        elif not ctl.has("no-usage"):
            obj["usage"] = ctl.usage("responses", output)
        return obj

    part = {"type": "output_text", "text": text, "annotations": []}
    message = {"id": "msg_" + rid, "type": "message", "status": status,
               "role": "assistant", "content": [part]}

    if body.get("stream") is not True:
        answer = response(status, [message], True)
        await reply.whole(200, encode(ctl.dump(answer, indent=2) + "\n"))
        return

    steps = []

    def event(kind, content=False, tail=False, **fields):
        data = {"type": kind, "sequence_number": len(steps)}
        data.update(fields)
        steps.append(Step(data, kind, content, tail))

    where = {"item_id": message["id"], "output_index": 0,
             "content_index": 0}

    event("response.created",
          response=response("in_progress", [], False))
    event("response.in_progress",
          response=response("in_progress", [], False))
    event("response.output_item.added", output_index=0,
          item=dict(message, status="in_progress", content=[]))
    event("response.content_part.added", part=dict(part, text=""), **where)

    for p in pieces(output):
        event("response.output_text.delta", content=True, delta=p, **where)

    event("response.output_text.done", tail=True, text=text, **where)
    event("response.content_part.done", tail=True, part=part, **where)
    event("response.output_item.done", tail=True, output_index=0,
          item=message)
    event("response." + status, tail=True,
          response=response(status, [message], True))

    await play(reply, ctl, steps, output)


async def echo(req, reply, ctl):
    try:
        parsed = json.loads(req.body)
    except ValueError:
        parsed = None

    if req.path == "/v1/responses":
        shape = "responses"
    elif req.path == "/v1/embeddings":
        shape = "embeddings"
    else:
        shape = "chat"

    output, _ = ctl.output(parsed)

    answer = {
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "version": req.version,
        "headers": {},
        "raw_headers": [[n, v] for n, v in req.headers],
        "body": req.body.decode("utf-8", "replace"),
        "json": parsed,
        "model": model_of(parsed),
    }

    # a repeated header is joined the way HTTP allows it to be combined
    for name, value in req.headers:
        name = name.lower()
        if name in answer["headers"]:
            value = answer["headers"][name] + ", " + value
        answer["headers"][name] = value

    if not ctl.has("no-usage"):
        answer["usage"] = ctl.usage(shape, output)

    await reply.whole(200, encode(ctl.dump(answer, indent=2) + "\n"))


ROUTES = {
    "/v1/chat/completions": chat_completions,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
    "/v1/responses": responses,
}


async def handle(req, reply):
    if req.method == "GET" and req.path == "/health":
        await reply.whole(200, b"ok\n", "text/plain")
        return

    try:
        ctl = Control(req)
    except HttpError as e:
        await send_error(reply, e.status, e.message,
                         "invalid_request_error", e.code)
        return

    reply.shape(ctl)

    if ctl.has("error500"):
        await send_error(reply, 500, "mock upstream failed on purpose",
                         "server_error", None)
        return

    if ctl.has("error429"):
        await send_error(reply, 429, "mock upstream rate limit reached",
                         "requests", "rate_limit_exceeded",
                         ["Retry-After: 1"])
        return

    if ctl.has("echo"):
        await echo(req, reply, ctl)
        return

    endpoint = ROUTES.get(req.path) if req.method == "POST" else None
    if endpoint is None:
        await send_error(reply, 404, "no endpoint %s %s"
                         % (req.method, req.path),
                         "invalid_request_error", "not_found")
        return

    try:
        body = json.loads(req.body)
    except ValueError:
        body = None

    if not isinstance(body, dict):
        await send_error(reply, 400, "request body is not a JSON object",
                         "invalid_request_error", "invalid_json")
        return

    await endpoint(req, reply, ctl, body)


# Connections and the server


class Server:

    def __init__(self, verbose):
        self.verbose = verbose
        self.tasks = set()

    def log(self, peer, reply, started, gone=False):
        if not self.verbose:
            return

        req = reply.req
        notes = []
        if reply.streamed:
            notes.append("stream")
        if reply.cut:
            notes.append("cut")
        if gone:
            notes.append("client-gone")
        modes = ",".join(req.values("x-mock-mode")).replace(" ", "")
        if modes:
            notes.append("modes=" + modes)

        line = "mock: %s:%d \"%s %s %s\" %s %.3fs" % (
            peer[0], peer[1], req.method, req.target, req.version,
            reply.status or "-", time.monotonic() - started)

        print(" ".join([line] + notes),
              file=sys.stderr, flush=True)

    async def connection(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        reply = None

        try:
            while True:
                reply = None
                try:
                    req = await read_request(reader, writer)

                except HttpError as e:
                    started = time.monotonic()
                    # the request could not be read, so no keep-alive
                    reply = Reply(writer, Request("-", "-", "HTTP/1.0", []))
                    await send_error(reply, e.status, e.message,
                                     "invalid_request_error", e.code)
                    self.log(peer, reply, started)
                    break

                if req is None:
                    break

                # timed from here, as an idle keep-alive connection may
                # have waited long for this request
                started = time.monotonic()
                reply = Reply(writer, req)
                await handle(req, reply)
                self.log(peer, reply, started)

                if not reply.keep_alive:
                    break

        except (ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            # the client went away, or cut its own request short
            if reply is not None:
                self.log(peer, reply, started, gone=True)

        except asyncio.CancelledError:
            # shutting down.  Ending normally rather than as cancelled
            # spares a traceback from Python 3.11's asyncio, which calls
            # exception() on the finished task.
            pass

        finally:
            writer.close()
            self.tasks.discard(task)


async def serve(args):
    server = Server(args.verbose)

    try:
        listener = await asyncio.start_server(server.connection, args.host,
                                              args.port, limit=MAX_HEAD,
                                              backlog=1024)
    except OSError as e:
        print("%s: error: cannot listen on %s:%d: %s"
              % (sys.argv[0], args.host, args.port, e.strerror),
              file=sys.stderr)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.verbose:
        print("mock: listening on %s:%d" % (args.host, args.port),
              file=sys.stderr, flush=True)

    await stop.wait()

    # streams in flight are dropped: the tests stop the mock only after
    # their last request
    listener.close()
    for task in list(server.tasks):
        task.cancel()
    await asyncio.gather(*server.tasks, return_exceptions=True)
    await listener.wait_closed()

    return 0


def main():
    parser = argparse.ArgumentParser(
        description="Mock OpenAI-compatible upstream for the token meter "
                    "tests (see t/mock/README.md).")
    parser.add_argument("--port", type=int, required=True,
                        help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true",
                        help="log one line per request to stderr")
    args = parser.parse_args()

    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
