"""An `openai` SDK client on one keep-alive connection pool, used by the upgrade test.

Usage: sdk_client.py BASE_URL SECONDS — sends chat completions until SECONDS pass, prints how
many succeeded, and exits non-zero on the first failure.
"""
import sys
import time

import openai

base, seconds = sys.argv[1], float(sys.argv[2])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused-by-keygate", timeout=30)
done = 0
end = time.time() + seconds
while time.time() < end:
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content, reply
    done += 1
    time.sleep(0.02)
print(done)
