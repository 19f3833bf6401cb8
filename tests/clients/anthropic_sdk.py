"""The `anthropic` Python SDK against keygate's native Anthropic route.

Usage: anthropic_sdk.py BASE_URL — a plain message, a streamed one, a token count and an error,
each checked; prints "ok" and exits 0 when all passed.
"""
import sys

import anthropic

base = sys.argv[1]
client = anthropic.Anthropic(base_url=base, api_key="unused-by-keygate", timeout=30, max_retries=0)

reply = client.messages.create(
    model="claude-sonnet-4-5",
    max_tokens=64,
    messages=[{"role": "user", "content": "hi"}],
)
assert reply.type == "message", reply
assert reply.content[0].text, reply
assert reply.stop_reason == "end_turn", reply
assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0, reply

with client.messages.stream(
    model="claude-sonnet-4-5",
    max_tokens=5,
    messages=[{"role": "user", "content": "hi"}],
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text and final.content[0].text == text, (text, final)
assert final.stop_reason == "max_tokens", final
assert final.usage.output_tokens == 5, final

count = client.messages.count_tokens(
    model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
)
assert count.input_tokens > 0, count

try:
    client.messages.create(
        model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    raise SystemExit("an unrouted model must fail")
except anthropic.NotFoundError as e:
    assert e.body["type"] == "error", e.body
    assert e.body["error"]["type"] == "not_found_error", e.body

print("ok")
