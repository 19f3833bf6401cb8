//! The streaming reply: a body that produces one SSE event per frame, pausing between content
//! chunks. Events are made when hyper asks for them, so no task or channel is needed, each event
//! is flushed on its own (hyper flushes whenever the body is pending), and a client that goes
//! away simply drops the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use crate::body::{Break, Broken};
use crate::openai::{self, Completion, Flavor, Usage, UsageField};

/// Everything a stream needs to produce its events.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// Chat or legacy text chunks.
    pub flavor: Flavor,
    /// Completion id shared by all chunks.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Model echoed back.
    pub model: String,
    /// Totals; `completion_tokens` tokens are spread over the chunks.
    pub usage: Usage,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Content chunks (at least 1).
    pub chunks: u32,
    /// Pause before each content chunk but the first.
    pub interval: Duration,
    /// Send `"usage": null` on content chunks and a final usage chunk.
    pub include_usage: bool,
    /// `break_stream`: drop the connection after this many content chunks, never sending the
    /// usage chunk or `[DONE]`.
    pub break_after: Option<u32>,
}

/// The body state: which event is next and the pause timer (reused across chunks).
pub struct SseBody {
    plan: StreamPlan,
    next: u32,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    brk: Break,
    done: bool,
}

impl SseBody {
    /// A stream that has sent nothing yet.
    pub fn new(mut plan: StreamPlan) -> Self {
        plan.chunks = plan.chunks.max(1);
        SseBody {
            plan,
            next: 0,
            sleep: None,
            armed: false,
            brk: Break::default(),
            done: false,
        }
    }

    /// The next event, a pause, a deliberate break, or the end.
    pub fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let plan = &self.plan;
        let event = self.next;
        if let Some(after) = plan.break_after {
            if event >= after.min(plan.chunks) {
                let broken: Broken = std::task::ready!(self.brk.poll(cx));
                self.done = true;
                return Poll::Ready(Some(Err(broken)));
            }
        }
        if event >= 1 && event < plan.chunks && !plan.interval.is_zero() {
            if !self.armed {
                let deadline = Instant::now() + plan.interval;
                match &mut self.sleep {
                    Some(s) => s.as_mut().reset(deadline),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.armed = true;
            }
            if let Some(s) = &mut self.sleep {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            self.armed = false;
        }
        let bytes = self.event_bytes(event);
        self.next += 1;
        match bytes {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => {
                self.done = true;
                Poll::Ready(None)
            }
        }
    }

    /// Event `n`: content chunks, then the usage chunk if asked for, then `[DONE]`.
    fn event_bytes(&self, n: u32) -> Option<Bytes> {
        let plan = &self.plan;
        let completion = Completion {
            id: &plan.id,
            created: plan.created,
            model: &plan.model,
            usage: plan.usage,
            finish_reason: plan.finish_reason,
        };
        let usage_slot = u32::from(plan.include_usage);
        if n < plan.chunks {
            let usage = if plan.include_usage {
                UsageField::Null
            } else {
                UsageField::Absent
            };
            Some(openai::stream_chunk(
                plan.flavor,
                &completion,
                n,
                plan.chunks,
                usage,
            ))
        } else if n < plan.chunks + usage_slot {
            Some(openai::usage_chunk(plan.flavor, &completion))
        } else if n == plan.chunks + usage_slot {
            Some(Bytes::from_static(openai::DONE))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;
    use std::time::Duration;

    use crate::body::MockBody;

    fn plan(
        chunks: u32,
        interval_ms: u64,
        include_usage: bool,
        break_after: Option<u32>,
    ) -> StreamPlan {
        StreamPlan {
            flavor: Flavor::Chat,
            id: "chatcmpl-1".into(),
            created: 1,
            model: "gpt-4o".into(),
            usage: Usage::new(8, 6),
            finish_reason: "stop",
            chunks,
            interval: Duration::from_millis(interval_ms),
            include_usage,
            break_after,
        }
    }

    /// Drains the body, returning the events and whether it ended in a break.
    async fn drain(p: StreamPlan) -> (Vec<String>, bool) {
        let mut body = MockBody::Sse(SseBody::new(p));
        let mut events = Vec::new();
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return (events, false),
                Some(Err(_)) => return (events, true),
                Some(Ok(frame)) => {
                    let data = frame.into_data().expect("data frame");
                    events.push(String::from_utf8(data.to_vec()).expect("utf8"));
                }
            }
        }
    }

    #[tokio::test]
    async fn full_stream_with_usage() {
        let (events, broken) = drain(plan(3, 0, true, None)).await;
        assert!(!broken);
        assert_eq!(events.len(), 5);
        assert!(
            events[0].contains("\"role\":\"assistant\"") && events[0].contains("\"usage\":null")
        );
        assert!(events[2].contains("\"finish_reason\":\"stop\""));
        assert!(
            events[3].contains("\"choices\":[]") && events[3].contains("\"completion_tokens\":6")
        );
        assert_eq!(events[4], "data: [DONE]\n\n");
    }

    #[tokio::test]
    async fn stream_without_usage_has_no_usage_member() {
        let (events, _) = drain(plan(2, 0, false, None)).await;
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| !e.contains("usage")));
    }

    #[tokio::test]
    async fn break_after_chunks_sends_no_done() {
        let (events, broken) = drain(plan(5, 0, true, Some(2))).await;
        assert!(broken);
        assert_eq!(events.len(), 2);
        let (events, broken) = drain(plan(2, 0, true, Some(9))).await;
        assert!(broken);
        assert_eq!(
            events.len(),
            2,
            "all content, then the break instead of usage/[DONE]"
        );
    }

    #[tokio::test]
    async fn pauses_between_chunks_only() {
        let start = Instant::now();
        let (events, _) = drain(plan(3, 100, true, None)).await;
        assert_eq!(events.len(), 5);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(
            took < Duration::from_millis(290),
            "no pause before usage/[DONE]: {took:?}"
        );
    }
}
