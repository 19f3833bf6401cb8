//! The pure HTTP/1 request-head scanner: finds where a head ends across reads, checks its byte
//! and field counts against the limits, and refuses heads whose syntax must be judged on the raw
//! bytes because Pingora rewrites them before keygate sees the request (RFC 9112). No I/O and no
//! clock, so it is tested on bytes.
//!
//! One pass over each byte read, with no allocation: a state machine over the request line and
//! field names (short), and a word-at-a-time skip over request targets and field values (the
//! bulk of a head).

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
    /// The head is malformed: it must be refused, and nothing of it forwarded.
    Refused(HeadProblem),
}

/// Why a request head is refused before Pingora parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProblem {
    /// The request line is not `method SP request-target SP HTTP-version` (RFC 9112 §3): a
    /// method that is not a token, a separator other than one space, no version. Pingora would
    /// otherwise percent-escape such a line and forward its own reading of it (§3.2 says not to
    /// autocorrect).
    RequestLine,
    /// The request target holds a control byte (Pingora would percent-escape it and forward it).
    Target,
    /// A CR not followed by LF (RFC 9112 §2.2).
    BareCr,
    /// A field name that is not a token directly followed by a colon (RFC 9112 §5; whitespace
    /// before the colon is refused by §5.1), or a field line without a colon.
    FieldName,
    /// A field line starting with whitespace: obsolete line folding (RFC 9112 §5.2), or
    /// whitespace between the request line and the first field (§2.2).
    ObsFold,
    /// A control byte (other than HTAB) or DEL in a field value (RFC 9110 §5.5).
    FieldValue,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2: a server MUST answer 400).
    MissingHost,
    /// More than one `Host` field line (RFC 9112 §3.2: 400).
    SeveralHosts,
    /// Both `Content-Length` and `Transfer-Encoding`: RFC 9112 §6.1 lets a server refuse it
    /// (and requires closing the connection either way). Pingora 0.9 drops the
    /// `Content-Length` before keygate sees the request, so it is judged on the raw bytes.
    ContentLengthAndTransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 request: faulty framing (RFC 9112 §6.1).
    TransferEncodingInHttp10,
    /// `chunked` named more than once: a sender MUST NOT chunk twice (RFC 9112 §6.1), so the
    /// framing is invalid.
    ChunkedTwice,
    /// `Transfer-Encoding` whose last coding is not `chunked`: the body length cannot be
    /// determined (RFC 9112 §6.3: 400, then close).
    ChunkedNotFinal,
    /// A transfer coding other than `chunked` before it (`gzip, chunked`): keygate does not
    /// implement it (RFC 9112 §6.1: 501).
    UnknownTransferCoding,
}

impl HeadProblem {
    /// The status the client gets.
    pub fn status(self) -> u16 {
        match self {
            HeadProblem::UnknownTransferCoding => 501,
            _ => 400,
        }
    }

    /// The OpenAI-style error `code`.
    pub fn code(self) -> &'static str {
        match self {
            HeadProblem::UnknownTransferCoding => "unsupported_transfer_coding",
            _ => "invalid_request",
        }
    }

    /// What the client is told (never echoes the request).
    pub fn message(self) -> &'static str {
        match self {
            HeadProblem::RequestLine => {
                "The request line is malformed: it must be `METHOD SP target SP HTTP/x.y`, one space apart."
            }
            HeadProblem::Target => {
                "The request target contains a control character; percent-encode it."
            }
            HeadProblem::BareCr => "The request head contains a CR that does not end a line.",
            HeadProblem::FieldName => {
                "A header field name is malformed: it must be a token followed directly by a colon."
            }
            HeadProblem::ObsFold => {
                "A header field line starts with whitespace (obsolete line folding is not accepted)."
            }
            HeadProblem::FieldValue => "A header field value contains a control character.",
            HeadProblem::MissingHost => "The request has no Host header (required in HTTP/1.1).",
            HeadProblem::SeveralHosts => "The request has more than one Host header.",
            HeadProblem::ContentLengthAndTransferEncoding => {
                "The request has both Content-Length and Transfer-Encoding; send only one."
            }
            HeadProblem::TransferEncodingInHttp10 => {
                "Transfer-Encoding is not allowed in HTTP/1.0."
            }
            HeadProblem::ChunkedTwice => "Transfer-Encoding names chunked more than once.",
            HeadProblem::ChunkedNotFinal => "Transfer-Encoding must end with chunked.",
            HeadProblem::UnknownTransferCoding => {
                "Transfer-Encoding names a coding this gateway does not implement; only chunked is supported."
            }
        }
    }

    /// The `reason` label of `keygate_connection_closes_total`.
    pub fn label(self) -> &'static str {
        match self {
            HeadProblem::UnknownTransferCoding => "unsupported_transfer_coding",
            _ => "malformed_header",
        }
    }
}

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const SP: u8 = b' ';
const HTAB: u8 = b'\t';
const DEL: u8 = 0x7f;

/// Which part of the head the next byte belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Part {
    /// The start of a line: none of its bytes seen yet.
    #[default]
    LineStart,
    /// The request method (its first byte seen).
    Method,
    /// The request target; `len` bytes so far.
    Target { len: usize },
    /// `HTTP/x.y`: how many of its bytes so far.
    Version { len: u8 },
    /// A field name; `len` bytes so far.
    Name { len: usize },
    /// A field value (after the colon).
    Value,
}

/// The fields whose values or presence the scanner judges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Field {
    #[default]
    Other,
    Host,
    ContentLength,
    TransferEncoding,
}

/// Room for the longest field name the scanner looks for (`transfer-encoding`).
const NAME_CAP: usize = 17;

/// The field a lowercased name is.
fn field_named(name: &[u8]) -> Field {
    match name {
        b"host" => Field::Host,
        b"content-length" => Field::ContentLength,
        b"transfer-encoding" => Field::TransferEncoding,
        _ => Field::Other,
    }
}

const CHUNKED: &[u8] = b"chunked";

/// The `Transfer-Encoding` list read so far, over all its field lines (they make one list,
/// RFC 9110 §5.3), one byte at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Codings {
    /// A `Transfer-Encoding` field line was seen.
    present: bool,
    /// Elements that were `chunked` (saturating).
    chunked: u8,
    /// The last element so far is `chunked`.
    last_chunked: bool,
    /// An element other than `chunked` was seen.
    other: bool,
    /// Bytes of the current element other than whitespace (saturating).
    elem_len: u8,
    /// The current element is not `chunked` (case-insensitive, whitespace around allowed).
    elem_other: bool,
    /// Whitespace came after some of the current element's bytes.
    elem_gap: bool,
}

impl Codings {
    /// One byte of a `Transfer-Encoding` value (control bytes are refused before).
    fn byte(&mut self, b: u8) {
        match b {
            b',' => self.end_element(),
            SP | HTAB => self.elem_gap |= self.elem_len > 0,
            _ => {
                let expected = CHUNKED.get(usize::from(self.elem_len));
                if self.elem_gap || expected != Some(&b.to_ascii_lowercase()) {
                    self.elem_other = true;
                }
                self.elem_len = self.elem_len.saturating_add(1);
            }
        }
    }

    /// A list element ended (a comma, or the end of the field line).
    fn end_element(&mut self) {
        // Empty elements (`, ,`) do not count (RFC 9110 §5.6.1).
        if self.elem_len > 0 {
            let chunked = !self.elem_other && usize::from(self.elem_len) == CHUNKED.len();
            if chunked {
                self.chunked = self.chunked.saturating_add(1);
            } else {
                self.other = true;
            }
            self.last_chunked = chunked;
        }
        self.elem_len = 0;
        self.elem_other = false;
        self.elem_gap = false;
    }
}

/// The version's bytes: `HTTP/`, a digit, a dot, a digit.
const VERSION_LEN: u8 = 8;

/// Scans an HTTP/1 request head across reads: where it ends, its byte and field counts, and its
/// syntax where Pingora would rewrite a malformed head rather than refuse it.
///
/// A line ends at `\n` (a preceding `\r` is part of the ending), as httparse, Pingora's parser,
/// accepts bare LF too: stopping only at CRLFCRLF would scan into the body of such a request.
/// Empty lines before the request line are skipped, as RFC 9112 §2.2 allows and httparse does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderScan {
    bytes: usize,
    /// Non-empty lines so far: the request line, then one per field.
    lines: usize,
    part: Part,
    /// The last byte was a CR: only LF may follow.
    cr: bool,
    /// The request line's HTTP version, `(major, minor)`.
    version: (u8, u8),
    /// The start of the current field name, lowercased.
    name: [u8; NAME_CAP],
    /// The field whose value is being read.
    field: Field,
    /// `Host` field lines so far.
    hosts: u8,
    /// A `Content-Length` field line was seen.
    content_length: bool,
    /// The `Transfer-Encoding` list.
    codings: Codings,
}

impl HeaderScan {
    /// Header bytes seen so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Feeds the next bytes read; only the newly read bytes are scanned, each once.
    pub fn feed(&mut self, chunk: &[u8], max_bytes: usize, max_headers: usize) -> ScanVerdict {
        let room = max_bytes.saturating_sub(self.bytes);
        let window = &chunk[..chunk.len().min(room)];
        let (scanned, verdict) = self.scan(window, max_headers);
        self.bytes += scanned;
        match verdict {
            Some(v) => v,
            None if chunk.len() > room => ScanVerdict::TooLarge,
            None => ScanVerdict::Partial,
        }
    }

    /// Scans `w` up to a verdict: how many bytes were scanned, and the verdict if one was reached.
    fn scan(&mut self, w: &[u8], max_headers: usize) -> (usize, Option<ScanVerdict>) {
        let mut i = 0;
        while i < w.len() {
            if !self.cr {
                // The bulk of a head: skip runs of bytes that need no look.
                match &mut self.part {
                    Part::Method => i += tchar_run(&w[i..]),
                    Part::Name { len } => {
                        let n = tchar_run(&w[i..]);
                        // Lowercased into `name` as far as it has room (longer names are other
                        // fields anyway).
                        let room = NAME_CAP.saturating_sub(*len).min(n);
                        if let (Some(to), Some(from)) =
                            (self.name.get_mut(*len..*len + room), w.get(i..i + room))
                        {
                            for (t, f) in to.iter_mut().zip(from) {
                                *t = f.to_ascii_lowercase();
                            }
                        }
                        *len += n;
                        i += n;
                    }
                    Part::Target { len } => {
                        let n = plain_run(&w[i..], SP + 1);
                        *len += n;
                        i += n;
                    }
                    // Transfer-Encoding values are read byte by byte.
                    Part::Value if self.field != Field::TransferEncoding => {
                        i += plain_run(&w[i..], SP);
                    }
                    _ => {}
                }
            }
            let Some(&b) = w.get(i) else { break };
            i += 1;
            let step = if b == LF {
                self.cr = false;
                self.end_line(max_headers)
            } else if self.cr {
                Err(ScanVerdict::Refused(HeadProblem::BareCr))
            } else if b == CR && self.may_end_line() {
                if w.get(i) == Some(&LF) {
                    // The usual CRLF, both bytes in this read.
                    i += 1;
                    self.end_line(max_headers)
                } else {
                    // Its LF may come in the next read; anything else makes it a bare CR.
                    self.cr = true;
                    Ok(false)
                }
            } else {
                self.byte(b).map(|()| false)
            };
            match step {
                Ok(false) => {}
                Ok(true) => return (i, Some(ScanVerdict::Complete(i))),
                Err(v) => return (i, Some(v)),
            }
        }
        (i, None)
    }

    /// Whether the line may end here (so a CR here may be the start of its CRLF).
    fn may_end_line(&self) -> bool {
        match self.part {
            Part::LineStart | Part::Value => true,
            Part::Version { len } => len == VERSION_LEN,
            Part::Method | Part::Target { .. } | Part::Name { .. } => false,
        }
    }

    /// A line ended. `Ok(true)`: it was the blank line that ends the head.
    fn end_line(&mut self, max_headers: usize) -> Result<bool, ScanVerdict> {
        match self.part {
            Part::LineStart if self.lines == 0 => return Ok(false), // a leading empty line
            Part::LineStart => {
                return match self.judge() {
                    Some(problem) => Err(ScanVerdict::Refused(problem)),
                    None => Ok(true),
                }
            }
            Part::Method | Part::Target { .. } => {
                return Err(ScanVerdict::Refused(HeadProblem::RequestLine))
            }
            Part::Version { len } if len != VERSION_LEN => {
                return Err(ScanVerdict::Refused(HeadProblem::RequestLine))
            }
            Part::Name { .. } => return Err(ScanVerdict::Refused(HeadProblem::FieldName)),
            Part::Value if self.field == Field::TransferEncoding => self.codings.end_element(),
            Part::Version { .. } | Part::Value => {}
        }
        self.lines += 1;
        if self.lines - 1 > max_headers {
            return Err(ScanVerdict::TooManyHeaders);
        }
        self.part = Part::LineStart;
        Ok(false)
    }

    /// One byte other than LF, and other than a CR that may end the line.
    fn byte(&mut self, b: u8) -> Result<(), ScanVerdict> {
        let refuse = |p| Err(ScanVerdict::Refused(p));
        match &mut self.part {
            Part::LineStart if self.lines == 0 => {
                if !is_tchar(b) {
                    return refuse(HeadProblem::RequestLine);
                }
                self.part = Part::Method;
            }
            Part::LineStart => match b {
                SP | HTAB => return refuse(HeadProblem::ObsFold),
                _ if is_tchar(b) => {
                    self.name[0] = b.to_ascii_lowercase();
                    self.part = Part::Name { len: 1 };
                }
                _ => return refuse(HeadProblem::FieldName),
            },
            Part::Name { len } => match b {
                b':' => {
                    let name = self.name.get(..*len).unwrap_or_default();
                    self.field = field_named(name);
                    match self.field {
                        Field::Host => self.hosts = self.hosts.saturating_add(1),
                        Field::ContentLength => self.content_length = true,
                        Field::TransferEncoding => self.codings.present = true,
                        Field::Other => {}
                    }
                    self.part = Part::Value;
                }
                _ if is_tchar(b) => {
                    if let Some(slot) = self.name.get_mut(*len) {
                        *slot = b.to_ascii_lowercase();
                    }
                    *len += 1;
                }
                _ => return refuse(HeadProblem::FieldName),
            },
            // Past the skip: HTAB, a control byte, DEL; every byte of a Transfer-Encoding.
            Part::Value => {
                if b != HTAB && (b < SP || b == DEL) {
                    return refuse(HeadProblem::FieldValue);
                }
                if self.field == Field::TransferEncoding {
                    self.codings.byte(b);
                }
            }
            Part::Method => match b {
                SP => self.part = Part::Target { len: 0 },
                _ if is_tchar(b) => {}
                _ => return refuse(HeadProblem::RequestLine),
            },
            // Only the bytes the skip stopped at come here: SP, a control byte, DEL.
            Part::Target { len } => match b {
                SP if *len > 0 => self.part = Part::Version { len: 0 },
                // An empty target (two spaces), or a line ending before its version.
                SP | CR => return refuse(HeadProblem::RequestLine),
                _ => return refuse(HeadProblem::Target),
            },
            Part::Version { len } => {
                let ok = match *len {
                    0..=4 => b == b"HTTP/"[usize::from(*len)],
                    5 | 7 => b.is_ascii_digit(),
                    6 => b == b'.',
                    _ => false,
                };
                if !ok {
                    return refuse(HeadProblem::RequestLine);
                }
                match *len {
                    5 => self.version.0 = b - b'0',
                    7 => self.version.1 = b - b'0',
                    _ => {}
                }
                *len += 1;
            }
        }
        Ok(())
    }

    /// What the whole head shows once it is complete.
    fn judge(&self) -> Option<HeadProblem> {
        let te = &self.codings;
        if te.present {
            // Framing first: these are the smuggling vectors.
            if self.content_length {
                return Some(HeadProblem::ContentLengthAndTransferEncoding);
            }
            if self.version < (1, 1) {
                return Some(HeadProblem::TransferEncodingInHttp10);
            }
            if te.chunked > 1 {
                return Some(HeadProblem::ChunkedTwice);
            }
            if !te.last_chunked {
                return Some(HeadProblem::ChunkedNotFinal);
            }
            if te.other {
                return Some(HeadProblem::UnknownTransferCoding);
            }
        }
        if self.hosts > 1 {
            return Some(HeadProblem::SeveralHosts);
        }
        if self.hosts == 0 && self.version >= (1, 1) {
            return Some(HeadProblem::MissingHost);
        }
        None
    }
}

/// The bytes of a token (RFC 9110 §5.6.2): a method or a field name.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < table.len() {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    table
};

/// Whether `b` may be part of a token.
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// How many bytes at the start of `bytes` are token bytes.
fn tchar_run(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|&&b| is_tchar(b)).count()
}

/// How many bytes at the start of `bytes` are `min` or above and not DEL: the run a target
/// (`min` past SP) or a field value (`min` SP) can skip. Eight bytes at a time; `min` ≤ 0x80.
fn plain_run(bytes: &[u8], min: u8) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = ONES * u64::from(min);
    let del = ONES * u64::from(DEL);
    let mut n = 0;
    for word in bytes.chunks_exact(8) {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        let w = u64::from_le_bytes(le);
        let x = w ^ del;
        // Nonzero exactly when some byte is below `min`, or is DEL (a zero byte of `x`).
        if (w.wrapping_sub(below) & !w & HIGHS) | (x.wrapping_sub(ONES) & !x & HIGHS) != 0 {
            break;
        }
        n += 8;
    }
    n + bytes[n..]
        .iter()
        .take_while(|&&b| b >= min && b != DEL)
        .count()
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

    /// The verdict on `head` fed whole, and fed one byte at a time (the verdict of the first
    /// byte that reached one): both must agree.
    fn verdict(head: &[u8]) -> ScanVerdict {
        let whole = HeaderScan::default().feed(head, MAXB, MAXH);
        let mut s = HeaderScan::default();
        let mut bytewise = ScanVerdict::Partial;
        for (i, b) in head.iter().enumerate() {
            bytewise = match s.feed(&[*b], MAXB, MAXH) {
                ScanVerdict::Complete(1) => ScanVerdict::Complete(i + 1),
                ScanVerdict::Partial => continue,
                v => v,
            };
            break;
        }
        assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(head));
        whole
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
        let req = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nbody";
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
            s.feed(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", MAXB, MAXH),
            ScanVerdict::Complete(27)
        );
    }

    #[test]
    fn a_lone_cr_inside_a_line_is_refused_not_taken_as_a_line_end() {
        // RFC 9112 §2.2: a bare CR is invalid; httparse refuses it too, and the guard must
        // never end a line (or the head) where Pingora would not.
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nx: a\r", MAXB, MAXH),
            ScanVerdict::Partial
        );
        assert_eq!(
            s.feed(b"b\r\n\r\n", MAXB, MAXH),
            ScanVerdict::Refused(HeadProblem::BareCr)
        );
    }

    #[test]
    fn header_at_the_byte_cap_passes_and_one_byte_more_is_too_large() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\nx: ";
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

    #[test]
    fn well_formed_request_lines_pass() {
        for line in [
            &b"GET /v1/models HTTP/1.1"[..],
            b"POST /v1/chat/completions?x=%20&y=\"<>{}\" HTTP/1.1",
            b"GET http://127.0.0.1/v1/models HTTP/1.1",
            b"OPTIONS * HTTP/1.1",
            b"GET /caf\xc3\xa9 HTTP/1.1", // obs-text: httparse passes it through unchanged
            b"M-SEARCH /~a!$&'()*+,;=:@ HTTP/1.1",
            // Versions Pingora refuses itself are its business (400); the shape is right.
            b"GET / HTTP/1.2",
            b"GET / HTTP/2.0",
        ] {
            let head = [line, b"\r\nHost: a\r\n\r\n"].concat();
            assert_eq!(
                verdict(&head),
                ScanVerdict::Complete(head.len()),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        use HeadProblem::*;
        let cases: &[(&[u8], HeadProblem)] = &[
            (b"POST  /v1/chat/completions HTTP/1.1", RequestLine),
            (b"GET /v1/mo dels HTTP/1.1", RequestLine),
            (b"GET /v1/models  HTTP/1.1", RequestLine),
            (b"GET /v1/models HTTP/1.1 ", RequestLine),
            (b" GET /v1/models HTTP/1.1", RequestLine),
            (b"GET\t/v1/models\tHTTP/1.1", RequestLine),
            (b"GET /v1/models", RequestLine),
            (b"GET", RequestLine),
            (b"GARBAGE", RequestLine),
            (b"P@ST / HTTP/1.1", RequestLine),
            (b"GET / HTTP/1.10", RequestLine),
            (b"GET / HTTP/1", RequestLine),
            (b"GET / http/1.1", RequestLine),
            (b"GET / HTTP/1.1x", RequestLine),
            (b"GET /v1/mo\x00dels HTTP/1.1", Target),
            (b"GET /v1/mo\x01dels HTTP/1.1", Target),
            (b"GET /v1/mo\x7fdels HTTP/1.1", Target),
            (b"GET /v1/mo\tdels HTTP/1.1", Target),
            (b"GET /v1/mo\rdels HTTP/1.1", RequestLine),
            (b"GET / HTTP/1.1\rx", BareCr),
        ];
        for (line, problem) in cases {
            let head = [line, &b"\r\nHost: a\r\n\r\n"[..]].concat();
            assert_eq!(
                verdict(&head),
                ScanVerdict::Refused(*problem),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_request_line_is_refused_as_soon_as_it_goes_wrong() {
        // Nothing after the bad byte is needed: the rest may never come.
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET /a\x00", MAXB, MAXH),
            ScanVerdict::Refused(HeadProblem::Target)
        );
    }

    #[test]
    fn lines_ended_by_a_bare_cr_are_refused() {
        assert_eq!(
            verdict(b"GET / HTTP/1.1\rHost: a\r\r"),
            ScanVerdict::Refused(HeadProblem::BareCr)
        );
        assert_eq!(
            verdict(b"\rGET / HTTP/1.1\r\n\r\n"),
            ScanVerdict::Refused(HeadProblem::BareCr)
        );
    }

    /// `fields` (each line ending in CRLF) between an HTTP/1.1 request line with `Host` and the
    /// blank line.
    fn with_fields(fields: &[u8]) -> Vec<u8> {
        [&b"GET / HTTP/1.1\r\nHost: a\r\n"[..], fields, b"\r\n"].concat()
    }

    #[test]
    fn well_formed_fields_pass() {
        for fields in [
            &b"X-A:b\r\n"[..],
            b"X-A: \tb c\t \r\n",
            b"X-A:\r\n",
            b"X-A: caf\xc3\xa9\r\n",
            b"X-Stainless-Package-Version: 1.54.3\r\n",
            b"Hostname: a\r\nX-Host: b\r\nHos: c\r\n",
            b"!#$%&'*+-.^_`|~09azAZ: v\r\n",
            b"X-A: b\nX-B: c\n",
        ] {
            let head = with_fields(fields);
            assert_eq!(
                verdict(&head),
                ScanVerdict::Complete(head.len()),
                "{:?}",
                String::from_utf8_lossy(fields)
            );
        }
    }

    #[test]
    fn malformed_fields_are_refused() {
        use HeadProblem::*;
        let cases: &[(&[u8], HeadProblem)] = &[
            (b"X-A : b\r\n", FieldName),
            (b"X A: b\r\n", FieldName),
            (b"X-A b\r\n", FieldName),
            (b"X-A\r\n", FieldName),
            (b": b\r\n", FieldName),
            (b"X(A): b\r\n", FieldName),
            ("X-Ä: b\r\n".as_bytes(), FieldName),
            (b"X-\x00A: b\r\n", FieldName),
            (b"X-\x01A: b\r\n", FieldName),
            (b"X-A: a\r\n b\r\n", ObsFold),
            (b"X-A: a\r\n\tb\r\n", ObsFold),
            (b"X-A: a\r\n Transfer-Encoding: chunked\r\n", ObsFold),
            (b"X-A: a\x00b\r\n", FieldValue),
            (b"X-A: a\x01b\r\n", FieldValue),
            (b"X-A: a\x0bb\r\n", FieldValue),
            (b"X-A: a\x7fb\r\n", FieldValue),
            (b"X-A: a\rb\r\n", BareCr),
        ];
        for (fields, problem) in cases {
            assert_eq!(
                verdict(&with_fields(fields)),
                ScanVerdict::Refused(*problem),
                "{:?}",
                String::from_utf8_lossy(fields)
            );
        }
        // Whitespace between the request line and the first field (RFC 9112 §2.2).
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
            ScanVerdict::Refused(ObsFold)
        );
    }

    #[test]
    fn host_is_required_in_http11_and_allowed_once() {
        use HeadProblem::*;
        let cases: &[(&[u8], Option<HeadProblem>)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", Some(MissingHost)),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Some(MissingHost),
            ),
            (b"GET / HTTP/1.1\r\nHostname: a\r\n\r\n", Some(MissingHost)),
            (b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n", None),
            // RFC 9112 §3.2: a target without an authority is sent with an empty Host.
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\n\r\n", None),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                Some(SeveralHosts),
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nX: b\r\nhost: b\r\n\r\n",
                Some(SeveralHosts),
            ),
        ];
        for (head, problem) in cases {
            let want = problem.map_or(ScanVerdict::Complete(head.len()), ScanVerdict::Refused);
            assert_eq!(verdict(head), want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn transfer_encoding_must_name_chunked_once_and_last() {
        use HeadProblem::*;
        let cases: &[(&[u8], Option<HeadProblem>)] = &[
            (b"Transfer-Encoding: chunked\r\n", None),
            (b"Transfer-Encoding: CHUNKED\r\n", None),
            (b"transfer-encoding:chunked\n", None),
            (b"Transfer-Encoding: \t chunked \t\r\n", None),
            // Empty list elements do not count (RFC 9110 §5.6.1).
            (b"Transfer-Encoding: , chunked,\r\n", None),
            (
                b"Transfer-Encoding: chunked, chunked\r\n",
                Some(ChunkedTwice),
            ),
            (
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                Some(ChunkedTwice),
            ),
            (
                b"Transfer-Encoding: chunked, identity\r\n",
                Some(ChunkedNotFinal),
            ),
            (
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                Some(ChunkedNotFinal),
            ),
            (b"Transfer-Encoding: gzip\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: identity\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: xchunked\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: chunkedx\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: chunk\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: chun ked\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: chunked;x=1\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding: \"chunked\"\r\n", Some(ChunkedNotFinal)),
            (b"Transfer-Encoding:\r\n", Some(ChunkedNotFinal)),
            (
                b"Transfer-Encoding: gzip, chunked\r\n",
                Some(UnknownTransferCoding),
            ),
            (
                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Some(UnknownTransferCoding),
            ),
            (
                b"Transfer-Encoding: identity, chunked\r\n",
                Some(UnknownTransferCoding),
            ),
            (b"Transfer-Encoding: \x0bchunked\r\n", Some(FieldValue)),
            (b"Transfer-Encoding : chunked\r\n", Some(FieldName)),
            // Other fields, whatever they hold.
            (
                b"Transfer-Encodings: gzip\r\nX-Transfer-Encoding: gzip\r\n",
                None,
            ),
        ];
        for (fields, problem) in cases {
            let head = with_fields(fields);
            let want = problem.map_or(ScanVerdict::Complete(head.len()), ScanVerdict::Refused);
            assert_eq!(
                verdict(&head),
                want,
                "{:?}",
                String::from_utf8_lossy(fields)
            );
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        for fields in [
            &b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n"[..],
            b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n",
            b"content-length: 6\r\ntransfer-encoding: gzip, chunked\r\n",
        ] {
            assert_eq!(
                verdict(&with_fields(fields)),
                ScanVerdict::Refused(HeadProblem::ContentLengthAndTransferEncoding),
                "{:?}",
                String::from_utf8_lossy(fields)
            );
        }
        // Content-Length alone is Pingora's to check (duplicates, lists, digits).
        for fields in [
            &b"Content-Length: 6\r\n"[..],
            b"Content-Length: 6\r\nContent-Length: 6\r\n",
        ] {
            let head = with_fields(fields);
            assert_eq!(verdict(&head), ScanVerdict::Complete(head.len()));
        }
    }

    #[test]
    fn transfer_encoding_in_http10_is_refused() {
        assert_eq!(
            verdict(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ScanVerdict::Refused(HeadProblem::TransferEncodingInHttp10)
        );
    }

    #[test]
    fn an_unimplemented_coding_is_501_and_every_other_problem_400() {
        use HeadProblem::*;
        for p in [
            RequestLine,
            Target,
            BareCr,
            FieldName,
            ObsFold,
            FieldValue,
            MissingHost,
            SeveralHosts,
            ContentLengthAndTransferEncoding,
            TransferEncodingInHttp10,
            ChunkedTwice,
            ChunkedNotFinal,
            UnknownTransferCoding,
        ] {
            let unimplemented = p == UnknownTransferCoding;
            assert_eq!(p.status(), if unimplemented { 501 } else { 400 }, "{p:?}");
            assert_eq!(
                (p.code(), p.label()),
                if unimplemented {
                    ("unsupported_transfer_coding", "unsupported_transfer_coding")
                } else {
                    ("invalid_request", "malformed_header")
                },
                "{p:?}"
            );
            assert!(!p.message().is_empty());
        }
    }

    #[test]
    fn a_head_refused_as_a_whole_is_refused_at_its_blank_line() {
        // Judged once complete: the bytes up to the blank line pass, the blank line does not.
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nX: a\r\n", MAXB, MAXH),
            ScanVerdict::Partial
        );
        assert_eq!(
            s.feed(b"\r\n", MAXB, MAXH),
            ScanVerdict::Refused(HeadProblem::MissingHost)
        );
    }

    /// Pieces of heads, valid and not, that the property test strings together.
    const PIECES: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"POST /v1/chat/completions HTTP/1.0\r\n",
        b"GET",
        b" ",
        b"  ",
        b"/v1/x?a=b",
        b"HTTP/1.1",
        b"HTTP/1.2",
        b"\r\n",
        b"\n",
        b"\r",
        b"\t",
        b"Host: a\r\n",
        b"X-A: b\r\n",
        b"X-A",
        b":",
        b": ",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 3\r\n",
        b"chunked, ",
        b"\x00",
        b"\x7f",
        b"\x0b",
        b"\xc3\xa9",
        b"\"<>{}",
        b"body",
    ];

    proptest::proptest! {
        /// Pingora hands a head to httparse once the guard let its last byte through: the guard
        /// must see the end of every head httparse would parse, at the same byte, and never
        /// call complete a head httparse still reads (the rest would pass unjudged). How the
        /// head is split across reads changes nothing.
        #[test]
        fn the_guard_ends_a_head_where_httparse_does(
            picks in proptest::collection::vec(0..PIECES.len(), 0..24),
            lead in proptest::bool::ANY,
            split in 0usize..200,
        ) {
            let mut head: Vec<u8> = if lead { PIECES[0].to_vec() } else { Vec::new() };
            for i in picks {
                head.extend_from_slice(PIECES[i]);
            }
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let theirs = httparse::Request::new(&mut fields).parse(&head);
            let ours = HeaderScan::default().feed(&head, MAXB, MAXH);
            match (theirs, ours) {
                (Ok(httparse::Status::Complete(n)), ScanVerdict::Complete(m)) => {
                    proptest::prop_assert_eq!(n, m)
                }
                (Ok(httparse::Status::Complete(_)), ScanVerdict::Partial) => {
                    proptest::prop_assert!(false, "httparse completes a head the guard has not judged")
                }
                (Ok(httparse::Status::Partial), ScanVerdict::Complete(_)) => {
                    proptest::prop_assert!(false, "the guard passes the rest of an open head")
                }
                _ => {}
            }
            let at = split.min(head.len());
            let mut s = HeaderScan::default();
            let first = s.feed(&head[..at], MAXB, MAXH);
            let both = match first {
                ScanVerdict::Partial => match s.feed(&head[at..], MAXB, MAXH) {
                    ScanVerdict::Complete(n) => ScanVerdict::Complete(at + n),
                    v => v,
                },
                v => v,
            };
            proptest::prop_assert_eq!(both, ours);
        }
    }

    #[test]
    fn plain_run_stops_at_the_first_byte_below_min_or_del() {
        let mut base: Vec<u8> = (0..40u8).map(|i| b'a' + (i % 26)).collect();
        base.extend_from_slice("é€".as_bytes());
        assert_eq!(plain_run(&base, SP), base.len());
        assert_eq!(plain_run(&base, SP + 1), base.len());
        for at in 0..base.len() {
            for (special, min, stops) in [
                (SP, SP + 1, true),
                (SP, SP, false),
                (b'\t', SP, true),
                (0u8, SP, true),
                (CR, SP, true),
                (LF, SP, true),
                (0x1f, SP, true),
                (DEL, SP, true),
                (DEL, SP + 1, true),
                (0x80, SP, false),
                (0xff, SP + 1, false),
                (b'~', SP + 1, false),
            ] {
                let mut bytes = base.clone();
                bytes[at] = special;
                let want = if stops { at } else { bytes.len() };
                assert_eq!(plain_run(&bytes, min), want, "{special:#x} at {at}");
            }
        }
        assert_eq!(plain_run(b"", SP), 0);
    }
}
