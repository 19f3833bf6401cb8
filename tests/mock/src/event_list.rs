//! A streaming body made of ready events (Anthropic's Messages stream): one frame per event,
//! pausing before each content event, optionally breaking the connection part-way.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::time::Sleep;

use crate::body::{Break, Broken};

/// The events still to send, and how.
pub struct EventList {
    events: VecDeque<(Bytes, bool)>,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Events left before the connection breaks (`break_stream`).
    break_in: Option<u32>,
    brk: Break,
}

impl EventList {
    /// `events` as (bytes, paced): a paced event waits `interval` first (content deltas do, the
    /// framing events around them do not). `break_after` paced events, the connection breaks.
    pub fn new(events: Vec<(Bytes, bool)>, interval: Duration, break_after: Option<u32>) -> Self {
        EventList {
            events: events.into(),
            interval,
            sleep: None,
            break_in: break_after,
            brk: Break::default(),
        }
    }

    /// The next event, a pause, a deliberate break, or the end.
    pub fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        let Some((_, paced)) = self.events.front() else {
            return Poll::Ready(None);
        };
        if *paced {
            if self.break_in == Some(0) {
                let broken = std::task::ready!(self.brk.poll(cx));
                self.events.clear();
                return Poll::Ready(Some(Err(broken)));
            }
            if !self.interval.is_zero() {
                let interval = self.interval;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
                std::task::ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            if let Some(n) = self.break_in.as_mut() {
                *n -= 1;
            }
        }
        Poll::Ready(self.events.pop_front().map(|(b, _)| Ok(Frame::data(b))))
    }
}
