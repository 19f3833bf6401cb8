"""The `openai` Python SDK against a keygate route that translates for Anthropic upstreams.

Usage: openai_translated.py BASE_URL — a plain answer, a capped one, streams with and without
usage, thinking, an image, tool calls (whole, streamed, and their results sent back), and the refusals of what is not translated, each checked; prints "ok" and exits 0 when all passed.
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused-by-keygate", timeout=30, max_retries=0)

reply = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
    ],
)
assert reply.object == "chat.completion", reply
assert reply.choices[0].message.content, reply
assert reply.choices[0].finish_reason == "stop", reply
assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0, reply
assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

capped = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[{"role": "user", "content": "hi"}],
    max_tokens=3,
    stop=["never"],
)
assert capped.choices[0].finish_reason == "length", capped
assert capped.usage.completion_tokens == 3, capped

chunks = list(
    client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == ["length"], chunks
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]
assert chunks[-1].usage.prompt_tokens > 0, chunks[-1]

plain = list(
    client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True
    )
)
assert all(c.usage is None for c in plain), plain
assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)

thought = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[{"role": "user", "content": "hi"}],
    reasoning_effort="low",
    max_completion_tokens=3,
)
assert thought.choices[0].message.reasoning_content, thought
assert thought.choices[0].message.content, thought
thought_chunks = list(
    client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "hi"}],
        reasoning_effort="high",
        stream=True,
    )
)
reasoning = "".join(
    getattr(c.choices[0].delta, "reasoning_content", None) or ""
    for c in thought_chunks
    if c.choices
)
assert reasoning, thought_chunks

seen = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]}],
)
assert seen.choices[0].message.content, seen

weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
called = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=weather,
    tool_choice="required",
)
assert called.choices[0].finish_reason == "tool_calls", called
call = called.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call

streamed = list(
    client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=weather,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
)
arguments = "".join(
    tc.function.arguments or ""
    for c in streamed
    if c.choices and c.choices[0].delta.tool_calls
    for tc in c.choices[0].delta.tool_calls
)
assert json.loads(arguments) == {"city": "Paris"}, streamed
assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"

# The result goes back as a tool message, and the conversation continues.
answer = client.chat.completions.create(
    model="claude-sonnet-4-5",
    messages=[
        {"role": "user", "content": "Weather in Paris?"},
        called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18°C"},
    ],
    tools=weather,
)
assert answer.choices[0].message.content, answer

for kwargs in ({"n": 2}, {"logprobs": True}, {"response_format": {"type": "json_object"}}):
    try:
        client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], **kwargs
        )
        raise SystemExit(f"{kwargs} must be refused")
    except openai.BadRequestError as e:
        assert "cannot be translated" in e.message, e.message

print("ok")
