//! Server-Sent Events: one framer that cuts a byte stream into events wherever the chunks were
//! cut, and the reading of an event's `data` lines. The meter and the stripper both use it, so
//! they agree on where every event starts and ends.

use std::borrow::Cow;
use std::ops::Range;

use bytes::BytesMut;

use super::MAX_EVENT_BYTES;

/// Capacity kept in the held buffer after a large event went through it, so that one huge event
/// does not pin a megabyte for the rest of a long stream.
const RETAINED_CAPACITY: usize = 64 * 1024;

/// Receives what [`SseFramer::feed`] finds in a chunk, in stream order. Every byte fed goes to
/// exactly one call, once its event is known to be whole or too large to hold.
///
/// Only an event that is still incomplete when it outgrows the hold limit is cut into parts: a
/// whole or joined event may be larger than the limit (a receiver that must treat large events
/// alike, whatever the chunking, checks their length itself).
pub(super) trait Events {
    /// A whole event lying in the chunk: `chunk[range]`, its blank line included.
    fn whole(&mut self, chunk: &[u8], range: Range<usize>);
    /// A whole event begun in earlier chunks: the held start joined with its end from this chunk.
    /// The receiver may take the buffer (`std::mem::take`) rather than copy it.
    fn joined(&mut self, event: &mut BytesMut);
    /// An event has just outgrown the hold limit: what was held of it (possibly nothing; the
    /// receiver may take the buffer). The rest of it follows through [`Events::part`], then
    /// [`Events::end`].
    fn outgrown(&mut self, held: &mut BytesMut);
    /// More bytes of an event too large to hold: `chunk[range]`.
    fn part(&mut self, chunk: &[u8], range: Range<usize>);
    /// The event too large to hold has ended (its blank line closed the last part).
    fn end(&mut self);
}

/// What the stream left unfinished at its end.
pub(super) enum Leftover {
    /// It ended between events.
    Nothing,
    /// It ended inside an event too large to hold, whose bytes went out as parts without an
    /// [`Events::end`].
    Oversized,
    /// It ended inside an event (no closing blank line): the bytes held of it.
    Held(BytesMut),
}

/// Cuts an SSE byte stream into events, across any chunk boundaries.
///
/// An event ends at a blank line (`\n\n`, `\r\n\r\n` or a mix). The start of an incomplete event
/// is held until its end arrives, but never more than [`MAX_EVENT_BYTES`] of it: a larger event is
/// handed on in parts as it arrives instead.
#[derive(Debug)]
pub(super) struct SseFramer {
    /// The start of the incomplete last event (empty while `passing`).
    held: BytesMut,
    /// Inside an event too large to hold: its bytes are handed on as they come.
    passing: bool,
    /// The last bytes of the event being passed on, to find a blank line cut by a chunk boundary.
    carry: Carry,
    /// The most held between chunks: [`MAX_EVENT_BYTES`], smaller in tests.
    limit: usize,
}

impl Default for SseFramer {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseFramer {
    /// A framer that holds at most `limit` bytes of an incomplete event.
    fn with_limit(limit: usize) -> Self {
        SseFramer {
            held: BytesMut::new(),
            passing: false,
            carry: Carry::default(),
            limit,
        }
    }

    /// Takes the next chunk and hands what it completes to `to`, in order.
    ///
    /// A chunk of whole events, the common case, costs one `memchr` pass and no allocation.
    pub(super) fn feed(&mut self, chunk: &[u8], to: &mut impl Events) {
        if chunk.is_empty() {
            return;
        }
        let mut pos = 0;
        if self.passing {
            let Some(end) = first_boundary(self.carry.as_slice(), chunk) else {
                self.carry = Carry::last_of(self.carry.as_slice(), chunk);
                to.part(chunk, 0..chunk.len());
                return;
            };
            self.passing = false;
            self.carry = Carry::default();
            to.part(chunk, 0..end);
            to.end();
            pos = end;
        } else if !self.held.is_empty() {
            let Some(end) = first_boundary(&self.held, chunk) else {
                self.hold(chunk, 0, to);
                return;
            };
            self.held.extend_from_slice(&chunk[..end]);
            to.joined(&mut self.held);
            self.release();
            pos = end;
        }
        while let Some(len) = first_boundary(&[], &chunk[pos..]) {
            to.whole(chunk, pos..pos + len);
            pos += len;
        }
        if pos < chunk.len() {
            self.hold(chunk, pos, to);
        }
    }

    /// At the end of the stream: what was left unfinished. The framer is then ready for a new
    /// stream.
    pub(super) fn finish(&mut self) -> Leftover {
        let passing = std::mem::take(&mut self.passing);
        self.carry = Carry::default();
        let held = std::mem::take(&mut self.held);
        if passing {
            Leftover::Oversized
        } else if held.is_empty() {
            Leftover::Nothing
        } else {
            Leftover::Held(held)
        }
    }

    /// How many bytes are held between chunks.
    #[cfg(test)]
    pub(super) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Bytes allocated for the held event (its buffer's capacity), for memory-bound checks.
    pub(super) fn buffered_bytes(&self) -> usize {
        self.held.capacity()
    }

    /// Holds `chunk[from..]`, the start of an event; if that makes the event too large to hold,
    /// hands it on instead and passes the rest of the event on as it comes.
    fn hold(&mut self, chunk: &[u8], from: usize, to: &mut impl Events) {
        let rest = &chunk[from..];
        if self.held.len() + rest.len() <= self.limit {
            self.held.extend_from_slice(rest);
            return;
        }
        self.carry = Carry::last_of(&self.held, rest);
        self.passing = true;
        to.outgrown(&mut self.held);
        self.release();
        to.part(chunk, from..chunk.len());
    }

    /// Empties the held buffer once its event went out, keeping a modest allocation for reuse.
    fn release(&mut self) {
        self.held.clear();
        if self.held.capacity() > RETAINED_CAPACITY {
            self.held = BytesMut::new();
        }
    }
}

/// The last (up to two) bytes of an event being passed on: all [`first_boundary`] needs to find a
/// blank line that a chunk boundary cut.
#[derive(Debug, Default, Clone, Copy)]
struct Carry {
    bytes: [u8; 2],
    len: u8,
}

impl Carry {
    /// The last two bytes of `before` followed by `after`.
    fn last_of(before: &[u8], after: &[u8]) -> Carry {
        let mut carry = Carry::default();
        let before = &before[before.len().saturating_sub(2)..];
        let after = &after[after.len().saturating_sub(2)..];
        for &byte in before.iter().chain(after) {
            if carry.len == 2 {
                carry.bytes = [carry.bytes[1], byte];
            } else {
                carry.bytes[usize::from(carry.len)] = byte;
                carry.len += 1;
            }
        }
        carry
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// End (exclusive) of the first blank line in `chunk` that ends an event, given the last bytes
/// already held of that same event (`held`, in which no blank line was found before).
///
/// A blank line is `\n\n` or `\n\r\n` (which covers `\r\n\r\n`); only the end of `held` matters,
/// for a blank line split across chunks. Lone-`\r` line endings are not recognised: no
/// OpenAI-compatible server is known to send them.
fn first_boundary(held: &[u8], chunk: &[u8]) -> Option<usize> {
    match held {
        [.., b'\n'] => match chunk {
            [b'\n', ..] => return Some(1),
            [b'\r', b'\n', ..] => return Some(2),
            _ => {}
        },
        [.., b'\n', b'\r'] if chunk.first() == Some(&b'\n') => return Some(1),
        _ => {}
    }
    memchr::memchr_iter(b'\n', chunk).find_map(|at| match chunk.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if chunk.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

/// The `data:` lines of one event, joined by `\n` as the SSE spec says. Borrowed (no allocation)
/// when there is at most one, which is what OpenAI sends.
pub(super) fn event_data(event: &[u8]) -> Cow<'_, [u8]> {
    let mut first: Option<&[u8]> = None;
    let mut joined: Option<Vec<u8>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = data_field(line) else {
            continue;
        };
        match (&mut joined, first) {
            (Some(buf), _) => {
                buf.push(b'\n');
                buf.extend_from_slice(value);
            }
            (None, None) => first = Some(value),
            (None, Some(earlier)) => {
                let mut buf = Vec::with_capacity(earlier.len() + 1 + value.len());
                buf.extend_from_slice(earlier);
                buf.push(b'\n');
                buf.extend_from_slice(value);
                joined = Some(buf);
            }
        }
    }
    match (joined, first) {
        (Some(buf), _) => Cow::Owned(buf),
        (None, Some(value)) => Cow::Borrowed(value),
        (None, None) => Cow::Borrowed(&[]),
    }
}

/// The value of a `data` field line (one leading space removed), or `None` for other lines.
fn data_field(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::usage::test_fixtures::pieces;
    use proptest::prelude::*;

    /// One event as the framer handed it on.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        /// Whole, in one frame.
        Whole(Vec<u8>),
        /// In parts, too large to hold; `ended` when its `End` came.
        Parts { bytes: Vec<u8>, ended: bool },
        /// Held at the end of the stream.
        Held(Vec<u8>),
    }

    impl Out {
        fn bytes(&self) -> &[u8] {
            match self {
                Out::Whole(bytes) | Out::Parts { bytes, .. } | Out::Held(bytes) => bytes,
            }
        }
    }

    impl Events for Vec<Out> {
        fn whole(&mut self, chunk: &[u8], range: Range<usize>) {
            self.push(Out::Whole(chunk[range].to_vec()));
        }

        fn joined(&mut self, event: &mut BytesMut) {
            self.push(Out::Whole(event.to_vec()));
        }

        fn outgrown(&mut self, held: &mut BytesMut) {
            self.push(Out::Parts {
                bytes: held.to_vec(),
                ended: false,
            });
        }

        fn part(&mut self, chunk: &[u8], range: Range<usize>) {
            match self.last_mut() {
                Some(Out::Parts {
                    bytes,
                    ended: false,
                }) => bytes.extend_from_slice(&chunk[range]),
                other => panic!("part after {other:?}"),
            }
        }

        fn end(&mut self) {
            match self.last_mut() {
                Some(Out::Parts { ended, .. }) => *ended = true,
                other => panic!("end after {other:?}"),
            }
        }
    }

    /// Feeds `chunks` to `framer`, checking after each that at most its limit is held, and
    /// collects the events it hands on.
    fn frame_all<'a>(
        framer: &mut SseFramer,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        for chunk in chunks {
            framer.feed(chunk, &mut out);
            assert!(framer.held_len() <= framer.limit);
        }
        match framer.finish() {
            Leftover::Nothing => {}
            Leftover::Held(held) => out.push(Out::Held(held.to_vec())),
            Leftover::Oversized => match out.last() {
                Some(Out::Parts { ended: false, .. }) => {}
                other => panic!("Oversized leftover after {other:?}"),
            },
        }
        out
    }

    fn whole(events: &[&str]) -> Vec<Out> {
        events
            .iter()
            .map(|e| Out::Whole(e.as_bytes().to_vec()))
            .collect()
    }

    const EVENTS: [&str; 4] = [
        "data: {\"a\":1}\n\n",
        "event: message\nid: 7\ndata: é🌍\n\n",
        ": keep-alive\n\n",
        "data: [DONE]\n\n",
    ];

    #[test]
    fn events_split_at_every_byte_boundary_come_out_whole_and_in_order() {
        let stream = EVENTS.concat();
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let out = frame_all(&mut SseFramer::default(), pieces(bytes, &[cut]));
            assert_eq!(out, whole(&EVENTS), "cut at {cut}");
        }
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                let out = frame_all(&mut SseFramer::default(), pieces(bytes, &[first, second]));
                assert_eq!(out, whole(&EVENTS), "cuts at {first}, {second}");
            }
        }
        let out = frame_all(&mut SseFramer::default(), bytes.chunks(1));
        assert_eq!(out, whole(&EVENTS), "byte by byte");
    }

    #[test]
    fn crlf_lf_and_mixed_blank_lines_end_events_wherever_the_cut() {
        let events = [
            "data: 1\r\n\r\n",
            "data: 2\n\r\n",
            "data: 3\n\n",
            "data: 4\r\n\n",
        ];
        let stream = events.concat();
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let out = frame_all(&mut SseFramer::default(), pieces(bytes, &[cut]));
            assert_eq!(out, whole(&events), "cut at {cut}");
        }
        let out = frame_all(&mut SseFramer::default(), bytes.chunks(1));
        assert_eq!(out, whole(&events), "byte by byte");
        // A lone `\r` does not end a line, so `\r\r` is no blank line.
        let out = frame_all(&mut SseFramer::default(), [&b"data: 5\r\rdata: 6\n\n"[..]]);
        assert_eq!(out, whole(&["data: 5\r\rdata: 6\n\n"]));
    }

    #[test]
    fn runs_of_blank_lines_end_one_event_each() {
        let out = frame_all(&mut SseFramer::default(), [&b"data: 1\n\n\n\n\r\n\r\n"[..]]);
        assert_eq!(out, whole(&["data: 1\n\n", "\n\n", "\r\n\r\n"]));
    }

    #[test]
    fn an_event_larger_than_the_limit_is_handed_on_in_parts_and_the_next_one_whole() {
        let big = format!("data: {}\n\n", "z".repeat(100));
        let stream = big.clone() + "data: next\n\n";
        let bytes = stream.as_bytes();
        for size in [1, 7, 30, 40] {
            let out = frame_all(&mut SseFramer::with_limit(32), bytes.chunks(size));
            let expected = vec![
                Out::Parts {
                    bytes: big.as_bytes().to_vec(),
                    ended: true,
                },
                Out::Whole(b"data: next\n\n".to_vec()),
            ];
            assert_eq!(out, expected, "chunks of {size}");
        }
        // Wherever the big event's blank line is cut, the next event starts right after it.
        for cut in big.len() - 3..=big.len() + 1 {
            let out = frame_all(&mut SseFramer::with_limit(32), pieces(bytes, &[40, cut]));
            assert_eq!(out[0].bytes(), big.as_bytes(), "cut at {cut}");
            assert_eq!(
                out[1],
                Out::Whole(b"data: next\n\n".to_vec()),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_large_event_that_arrives_whole_is_handed_on_whole() {
        let big = format!("data: {}\n\n", "z".repeat(100));
        let out = frame_all(&mut SseFramer::with_limit(32), [big.as_bytes()]);
        assert_eq!(out, whole(&[&big]));
    }

    #[test]
    fn the_default_limit_is_max_event_bytes() {
        let framer = SseFramer::default();
        assert_eq!(framer.limit, MAX_EVENT_BYTES);
        let big = format!("data: {}\n\n", "z".repeat(MAX_EVENT_BYTES + 100_000));
        let stream = big.clone() + "data: next\n\n";
        let out = frame_all(
            &mut SseFramer::default(),
            stream.as_bytes().chunks(64 * 1024),
        );
        assert!(matches!(out[0], Out::Parts { ended: true, .. }));
        assert_eq!(out[0].bytes(), big.as_bytes());
        assert_eq!(out[1], Out::Whole(b"data: next\n\n".to_vec()));
    }

    #[test]
    fn trailing_bytes_without_a_blank_line_are_left_over_at_the_end() {
        let mut framer = SseFramer::default();
        let out = frame_all(&mut framer, [&b"data: 1\n\ndata: 2\n"[..]]);
        assert_eq!(
            out,
            vec![
                Out::Whole(b"data: 1\n\n".to_vec()),
                Out::Held(b"data: 2\n".to_vec())
            ]
        );
        // finish() resets: the framer starts a new stream with nothing held.
        assert!(matches!(framer.finish(), Leftover::Nothing));
        let out = frame_all(&mut framer, [&b"data: 3\n\n"[..]]);
        assert_eq!(out, whole(&["data: 3\n\n"]));
    }

    #[test]
    fn a_stream_cut_inside_an_oversized_event_leaves_it_unended() {
        let mut framer = SseFramer::with_limit(8);
        let out = frame_all(&mut framer, [&b"data: 0123456789"[..], b"abc\n"]);
        assert_eq!(
            out,
            vec![Out::Parts {
                bytes: b"data: 0123456789abc\n".to_vec(),
                ended: false
            }]
        );
        let out = frame_all(&mut framer, [&b"data: 1\n\n"[..]]);
        assert_eq!(out, whole(&["data: 1\n\n"]), "a new stream starts clean");
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut framer = SseFramer::default();
        let out = frame_all(&mut framer, [&b""[..], b"data: 1\n", b"", b"\n", b""]);
        assert_eq!(out, whole(&["data: 1\n\n"]));
    }

    #[test]
    fn data_lines_are_joined_and_other_fields_ignored() {
        assert_eq!(
            &*event_data(b"event: x\r\ndata: a\r\ndata:b\r\ndata\r\nid: 1\r\n\r\n"),
            b"a\nb\n"
        );
        assert!(matches!(
            event_data(b"data: one\n\n"),
            Cow::Borrowed(b"one")
        ));
        assert_eq!(&*event_data(b": comment\n\n"), b"");
        assert_eq!(&*event_data(b"database: x\n\n"), b"");
    }

    /// Strings of SSE-ish bytes, blank lines and near misses included.
    fn sse_text() -> impl Strategy<Value = String> {
        "(data: [a-z]{0,40}|\r|\n|\r\n|:|z{30,60}){0,30}"
    }

    proptest! {
        #[test]
        fn any_stream_any_chunking_loses_no_byte_and_holds_at_most_the_limit(
            text in sse_text(),
            limit in 4usize..48,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let out = frame_all(&mut SseFramer::with_limit(limit), pieces(bytes, &cuts));
            // The same events as when the stream comes in one chunk, each whole or in parts.
            let reference = frame_all(&mut SseFramer::default(), [bytes]);
            prop_assert_eq!(out.len(), reference.len());
            for (got, want) in out.iter().zip(&reference) {
                prop_assert_eq!(got.bytes(), want.bytes());
                match got {
                    Out::Parts { ended, .. } => {
                        prop_assert!(got.bytes().len() > limit);
                        prop_assert_eq!(*ended, matches!(want, Out::Whole(_)));
                    }
                    Out::Whole(_) | Out::Held(_) => prop_assert_eq!(
                        std::mem::discriminant(got),
                        std::mem::discriminant(want)
                    ),
                }
            }
        }
    }
}
