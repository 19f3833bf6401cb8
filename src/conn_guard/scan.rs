//! The pure HTTP/1 request-header scanner: finds where a header ends across reads and checks
//! its byte and field counts against the limits. No I/O and no clock, so it is tested on bytes.

/// What [`HeaderScan::feed`] concluded after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanVerdict {
    /// The header is not complete yet.
    Partial,
    /// The header ended; this many bytes of the chunk belong to it (the rest is body).
    Complete(usize),
    /// The header grew past `max_header_bytes`.
    TooLarge,
    /// The header has more than `max_headers` fields.
    TooManyHeaders,
}

/// Finds the end of an HTTP/1 request header across reads and counts its bytes and fields.
///
/// A line ends at `\n` (a preceding `\r` is part of the ending), as httparse, Pingora's parser,
/// accepts bare LF too: stopping only at CRLFCRLF would scan into the body of such a request.
/// Empty lines before the request line are skipped, as RFC 9112 §2.2 allows and httparse does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderScan {
    bytes: usize,
    /// Non-empty lines so far: the request line, then one per field.
    lines: usize,
    /// Bytes of the current line before its `\n`.
    line_len: usize,
    /// Whether the current line's last byte so far is `\r`.
    last_cr: bool,
}

impl HeaderScan {
    /// Header bytes seen so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Feeds the next bytes read; only the newly read bytes are scanned (one memchr per line).
    pub fn feed(&mut self, chunk: &[u8], max_bytes: usize, max_headers: usize) -> ScanVerdict {
        let mut pos = 0;
        while let Some(i) = memchr::memchr(b'\n', &chunk[pos..]) {
            let nl = pos + i;
            let len = self.line_len + i;
            let last_cr = if i > 0 {
                chunk[nl - 1] == b'\r'
            } else {
                self.last_cr
            };
            self.bytes += i + 1;
            if self.bytes > max_bytes {
                return ScanVerdict::TooLarge;
            }
            self.line_len = 0;
            self.last_cr = false;
            pos = nl + 1;
            if len == 0 || (len == 1 && last_cr) {
                if self.lines > 0 {
                    return ScanVerdict::Complete(pos);
                }
                continue;
            }
            self.lines += 1;
            if self.lines - 1 > max_headers {
                return ScanVerdict::TooManyHeaders;
            }
        }
        let rest = &chunk[pos..];
        if let Some(&last) = rest.last() {
            self.bytes += rest.len();
            self.line_len += rest.len();
            self.last_cr = last == b'\r';
        }
        if self.bytes > max_bytes {
            return ScanVerdict::TooLarge;
        }
        ScanVerdict::Partial
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
// Its helpers are shared with the stream's tests.
pub(in crate::conn_guard) mod tests {
    use super::*;

    pub(in crate::conn_guard) const MAXB: usize = 32 * 1024;
    pub(in crate::conn_guard) const MAXH: usize = 100;

    pub(in crate::conn_guard) fn request_with_fields(n: usize) -> Vec<u8> {
        let mut r = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n".to_vec();
        for i in 1..n {
            r.extend_from_slice(format!("x-f{i}: v\r\n").as_bytes());
        }
        r.extend_from_slice(b"\r\n");
        r
    }

    #[test]
    fn header_end_is_found_across_reads() {
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nHost: a\r", MAXB, MAXH),
            ScanVerdict::Partial
        );
        assert_eq!(s.feed(b"\n\r", MAXB, MAXH), ScanVerdict::Partial);
        assert_eq!(s.feed(b"\nbody", MAXB, MAXH), ScanVerdict::Complete(1));
        assert_eq!(s.bytes(), 27);
    }

    #[test]
    fn body_bytes_after_the_header_are_not_counted() {
        let mut s = HeaderScan::default();
        let req = b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody";
        assert_eq!(
            s.feed(req, MAXB, MAXH),
            ScanVerdict::Complete(req.len() - 4)
        );
        assert_eq!(s.bytes(), req.len() - 4);
    }

    #[test]
    fn bare_lf_header_end_is_found() {
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\nHost: a\n\nrest", MAXB, MAXH),
            ScanVerdict::Complete(24)
        );
    }

    #[test]
    fn leading_blank_lines_are_skipped_not_taken_as_the_end() {
        let mut s = HeaderScan::default();
        assert_eq!(s.feed(b"\r\n\r\n", MAXB, MAXH), ScanVerdict::Partial);
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\n\r\n", MAXB, MAXH),
            ScanVerdict::Complete(18)
        );
    }

    #[test]
    fn a_lone_cr_inside_a_line_does_not_end_the_header() {
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nx: a\rb\r\n", MAXB, MAXH),
            ScanVerdict::Partial
        );
        assert_eq!(s.feed(b"\r\n", MAXB, MAXH), ScanVerdict::Complete(2));
    }

    #[test]
    fn header_at_the_byte_cap_passes_and_one_byte_more_is_too_large() {
        let head = b"GET / HTTP/1.1\r\nx: ";
        let cap = 100;
        let pad = cap - head.len() - 4; // "\r\n\r\n"
        let mut exact = head.to_vec();
        exact.extend(std::iter::repeat_n(b'a', pad));
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            HeaderScan::default().feed(&exact, cap, MAXH),
            ScanVerdict::Complete(cap)
        );
        let mut over = head.to_vec();
        over.extend(std::iter::repeat_n(b'a', pad + 1));
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            HeaderScan::default().feed(&over, cap, MAXH),
            ScanVerdict::TooLarge
        );
    }

    #[test]
    fn a_header_without_line_ends_is_too_large_once_past_the_cap() {
        let mut s = HeaderScan::default();
        assert_eq!(s.feed(&[b'a'; 60], 100, MAXH), ScanVerdict::Partial);
        assert_eq!(s.feed(&[b'a'; 60], 100, MAXH), ScanVerdict::TooLarge);
    }

    #[test]
    fn header_field_cap_allows_exactly_max_headers() {
        let ok = request_with_fields(MAXH);
        assert_eq!(
            HeaderScan::default().feed(&ok, MAXB, MAXH),
            ScanVerdict::Complete(ok.len())
        );
        let over = request_with_fields(MAXH + 1);
        assert_eq!(
            HeaderScan::default().feed(&over, MAXB, MAXH),
            ScanVerdict::TooManyHeaders
        );
    }
}
