#!/usr/bin/env python3
"""The proxy's own errors as the OpenAI Python SDK sees them: run by scripts/sdk-errors.sh.

    python3 scripts/sdk_errors.py openai|proxy http://127.0.0.1:PORT [environment|file]

The proxy runs with ERROR_FORMAT set to the first argument, AUTH_VALIDATION on, the token
`sdk-client-token` unlimited, and the clients of scripts/sdk-errors.sh (`sdk-once`: one request a
minute; `sdk-picky`: only the model `gpt-allowed`), with STREAM_IDLE_TIMEOUT_SECS=1, in front of
the bundled mock upstream, configured by the environment or by a one-upstream UPSTREAMS_FILE (the
third argument, which only names the run: the checks are the same, since the SDK must see no
difference). One PASS/FAIL line per check; exits 1 on any FAIL.
"""

import sys

import openai

FORMAT, PROXY = sys.argv[1], sys.argv[2]
RUN = f"{FORMAT}, {sys.argv[3]}" if len(sys.argv) > 3 else FORMAT
FAILURES = 0


def check(name, condition, detail):
    global FAILURES
    if condition:
        print(f"PASS  {RUN}: {name}")
    else:
        FAILURES += 1
        print(f"FAIL  {RUN}: {name}: {detail}")


def client(token, base="/v1"):
    # No retries: the SDK would otherwise wait out a 429's Retry-After and ask again.
    return openai.OpenAI(base_url=PROXY + base, api_key=token, max_retries=0)


def chat(sdk, model="gpt-mock"):
    return sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def raised(call, exception):
    try:
        call()
    except exception as error:
        return error
    except openai.OpenAIError as error:
        return error  # the wrong class: the check on its type reports it
    return None


def expect(name, call, exception, status, code, message):
    """`call` raises `exception` with the proxy's status, and, with ERROR_FORMAT=openai, its code
    and message where the SDK shows them; with the default format the SDK finds neither."""
    error = raised(call, exception)
    if error is None:
        check(name, False, "nothing was raised")
        return
    check(f"{name}: {type(error).__name__}", isinstance(error, exception), repr(error))
    check(f"{name}: status_code {status}", getattr(error, "status_code", None) == status,
          getattr(error, "status_code", None))
    if FORMAT == "openai":
        check(f"{name}: e.code == {code!r}", error.code == code, repr(error.code))
        check(f"{name}: e.message shows the proxy's message", message in error.message,
              error.message)
        check(f"{name}: str(e) shows the proxy's message", message in str(error), str(error))
    else:
        # The seed's shape, unchanged: {"error":"<code>","message":...,"time":...}; the SDK keeps
        # the string under "error" as the body and reads no code from it.
        check(f"{name}: e.body is the code string", error.body == code, repr(error.body))
        check(f"{name}: e.code is None", error.code is None, repr(error.code))
        check(f"{name}: str(e) is only the status", str(error) == f"Error code: {status}",
              str(error))
        body = error.response.json()
        check(f"{name}: the body is the default shape",
              sorted(body) == ["error", "message", "time"] and body["error"] == code
              and body["message"] == message, body)


# The answers themselves first: what every error below is the exception to.
sdk = client("sdk-client-token")
try:
    reply = chat(sdk)
    check("a chat is answered", reply.choices[0].message.content == "Hello from the mock upstream.",
          reply)
except openai.OpenAIError as error:
    check("a chat is answered", False, repr(error))
try:
    pieces = list(sdk.chat.completions.create(
        model="gpt-mock", messages=[{"role": "user", "content": "hi"}], stream=True))
    text = "".join(piece.choices[0].delta.content or "" for piece in pieces if piece.choices)
    finish = [piece.choices[0].finish_reason for piece in pieces if piece.choices][-1:]
    check("a stream is read to its end", text.startswith("chunk-0 ") and finish == ["stop"],
          (text, finish))
except openai.OpenAIError as error:
    check("a stream is read to its end", False, repr(error))
try:
    ids = [model.id for model in sdk.models.list()]
    check("the model list is the upstream's",
          sorted(ids) == ["gpt-mock", "gpt-mock-mini", "text-embedding-mock"], ids)
except openai.OpenAIError as error:
    check("the model list is the upstream's", False, repr(error))

expect("bad token", lambda: chat(client("wrong-token")), openai.AuthenticationError, 401,
       "unauthorized", "Invalid or missing authorization token")
expect("a path outside /v1", lambda: client("sdk-client-token", base="").models.list(),
       openai.NotFoundError, 404, "not_found", "No such route")
expect("a model outside the client's list", lambda: chat(client("sdk-picky"), "gpt-other"),
       openai.PermissionDeniedError, 403, "model_not_allowed",
       "This client may not use the requested model")

once = client("sdk-once")
first = raised(lambda: chat(once), openai.OpenAIError)
check("the client's one request of the minute is answered", first is None, repr(first))
expect("over requests_per_minute", lambda: chat(once), openai.RateLimitError, 429,
       "rate_limited", "This client is over its rate limit; retry after the time in Retry-After")


def read_stalled_stream():
    # The mock waits 3 s between events; the proxy gives up after 1 s of silence.
    stream = client("sdk-client-token").chat.completions.create(
        model="gpt-mock", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-mock-interval-ms": "3000"})
    for _ in stream:
        pass


stalled = raised(read_stalled_stream, openai.APIError)
stalled_message = "The upstream stopped sending data; the response is incomplete"
check("a stalled stream raises APIError", isinstance(stalled, openai.APIError), repr(stalled))
if isinstance(stalled, openai.APIError):
    # Both formats put an object under "error" in the event, which the SDK reads.
    check("stalled stream: e.code", stalled.code == "upstream_stream_stalled", repr(stalled.code))
    check("stalled stream: e.message", stalled.message == stalled_message, stalled.message)
    expected_type = "server_error" if FORMAT == "openai" else "proxy_error"
    check(f"stalled stream: e.type {expected_type}", stalled.type == expected_type,
          repr(stalled.type))

sys.exit(1 if FAILURES else 0)
