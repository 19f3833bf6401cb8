//! `multipart/form-data` bodies (audio transcriptions, image edits): the value of one form field,
//! read or replaced without parsing the file parts.

use std::ops::Range;

use memchr::memmem;

use super::{splice, BodyError};

/// The boundary of a `multipart/*` content type (`multipart/form-data; boundary=XYZ`, the value quoted
/// or not); `None` for other media types or when the boundary is missing or empty.
pub fn multipart_boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let media_type = params.next()?.trim();
    let is_multipart = media_type
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("multipart/"));
    if !is_multipart {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        // Boundary characters (RFC 2046) exclude `"` and `\`, so quoting never needs unescaping.
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty()).then_some(value)
    })
}

/// Finds the value span of form field `field`, erroring on malformed bodies and duplicate fields.
///
/// Parts are located with `memmem` on the boundary, so the contents of file parts are only passed over
/// by that search, never parsed.
fn find_multipart_field(
    body: &[u8],
    boundary: &str,
    field: &str,
) -> Result<Option<Range<usize>>, BodyError> {
    let boundary = boundary.as_bytes();
    let finder = memmem::Finder::new(boundary);
    // Offset of the `--` of the next delimiter at or after `from`: `--boundary` at the very start of
    // the body, or `\r\n--boundary` anywhere.
    let next_delimiter = |from: usize| -> Option<usize> {
        let mut at = from;
        while let Some(i) = finder.find(&body[at..]) {
            let hit = at + i;
            if hit >= 2 && &body[hit - 2..hit] == b"--" {
                let dashes = hit - 2;
                // The CRLF must lie inside the searched region, so it cannot be the line break that
                // ended the previous delimiter line.
                let at_start = dashes == 0 && from == 0;
                let after_crlf = dashes >= from + 2 && &body[dashes - 2..dashes] == b"\r\n";
                if at_start || after_crlf {
                    return Some(dashes);
                }
            }
            at = hit + 1;
        }
        None
    };
    let mut found = None;
    let mut dashes = next_delimiter(0).ok_or(BodyError::Multipart("boundary not found"))?;
    loop {
        let mut pos = dashes + 2 + boundary.len();
        if body[pos..].starts_with(b"--") {
            return Ok(found);
        }
        // Transport padding may follow a delimiter before its line break.
        while let Some(b' ' | b'\t') = body.get(pos) {
            pos += 1;
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(BodyError::Multipart("malformed boundary line"));
        }
        let part_start = pos + 2;
        let next =
            next_delimiter(part_start).ok_or(BodyError::Multipart("missing closing boundary"))?;
        // The CRLF before `--boundary` belongs to the delimiter, not to the part's content.
        let part = &body[part_start..next - 2];
        let (headers, content_start) = if part.starts_with(b"\r\n") {
            (&part[..0], part_start + 2)
        } else {
            match memmem::find(part, b"\r\n\r\n") {
                Some(i) => (&part[..i], part_start + i + 4),
                None => return Err(BodyError::Multipart("part headers not terminated")),
            }
        };
        if part_is_field(headers, field) {
            if found.is_some() {
                return Err(BodyError::DuplicateKey(if field == "model" {
                    "model"
                } else {
                    "form field"
                }));
            }
            found = Some(content_start..next - 2);
        }
        dashes = next;
    }
}

/// Whether a part's headers say `Content-Disposition: form-data; name="<field>"`.
fn part_is_field(headers: &[u8], field: &str) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            return false;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
            && disposition_names(value, field)
    })
}

/// Whether a `Content-Disposition` value is `form-data` with parameter `name` equal to `field`.
fn disposition_names(value: &[u8], field: &str) -> bool {
    let mut rest = value.trim_ascii_start();
    let kind_end = memchr::memchr(b';', rest).unwrap_or(rest.len());
    if !rest[..kind_end]
        .trim_ascii()
        .eq_ignore_ascii_case(b"form-data")
    {
        return false;
    }
    rest = &rest[kind_end..];
    // Each round: `; name=value` where value is a token or a quoted string (which may hold `;`).
    while let Some(after_semi) = rest.strip_prefix(b";") {
        let param = after_semi.trim_ascii_start();
        let name_end = param
            .iter()
            .position(|&b| b == b'=' || b == b';')
            .unwrap_or(param.len());
        let name = param[..name_end].trim_ascii();
        let mut after = &param[name_end..];
        let mut matched = false;
        if let Some(v) = after.strip_prefix(b"=") {
            let v = v.trim_ascii_start();
            if let Some(quoted) = v.strip_prefix(b"\"") {
                // Walk to the closing quote, honouring backslash escapes, comparing as we go.
                let mut expected = field.as_bytes().iter();
                let mut same = true;
                let mut i = 0;
                let mut closed = false;
                while i < quoted.len() {
                    let mut byte = quoted[i];
                    if byte == b'"' {
                        closed = true;
                        break;
                    }
                    if byte == b'\\' && i + 1 < quoted.len() {
                        i += 1;
                        byte = quoted[i];
                    }
                    same &= expected.next() == Some(&byte);
                    i += 1;
                }
                matched = closed && same && expected.next().is_none();
                after = quoted.get(i + 1..).unwrap_or(&[]);
            } else {
                let end = memchr::memchr(b';', v).unwrap_or(v.len());
                matched = v[..end].trim_ascii() == field.as_bytes();
                after = &v[end..];
            }
        }
        if name.eq_ignore_ascii_case(b"name") {
            return matched;
        }
        // Skip to the next parameter.
        let next = memchr::memchr(b';', after).unwrap_or(after.len());
        rest = &after[next..];
    }
    false
}

/// The value of form field `field` in a `multipart/form-data` body (the `model` of an audio
/// transcription), or `None` when the body has no such field.
///
/// Errors when the content type has no boundary, the body is malformed, the field appears twice, or
/// its value is not UTF-8.
pub fn multipart_field(
    body: &[u8],
    content_type: &str,
    field: &str,
) -> Result<Option<String>, BodyError> {
    let boundary = multipart_boundary(content_type)
        .ok_or(BodyError::Multipart("no boundary in content type"))?;
    let Some(span) = find_multipart_field(body, boundary, field)? else {
        return Ok(None);
    };
    match std::str::from_utf8(&body[span]) {
        Ok(value) => Ok(Some(value.to_owned())),
        Err(_) => Err(BodyError::Multipart("form field value is not UTF-8")),
    }
}

/// A new `multipart/form-data` body with the value of form field `field` replaced by `new_value`, every
/// other byte unchanged.
///
/// `None` when there is nothing safe to rewrite: no such field, a body or content type that
/// [`multipart_field`] would refuse, or a `new_value` holding a line break or starting with
/// `--boundary` (either could end the part early). Callers have normally read the field with
/// [`multipart_field`] first, so the errors are known.
pub fn rewrite_multipart_field(
    body: &[u8],
    content_type: &str,
    field: &str,
    new_value: &str,
) -> Option<Vec<u8>> {
    if new_value.contains(['\r', '\n']) {
        return None;
    }
    let boundary = multipart_boundary(content_type)?;
    // The value follows a line break, so starting with `--boundary` it would be a delimiter.
    if new_value
        .strip_prefix("--")
        .is_some_and(|rest| rest.starts_with(boundary))
    {
        return None;
    }
    let span = find_multipart_field(body, boundary, field).ok()??;
    Some(splice(body, span, new_value.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=----keygateBoundary7MA4YWxk";
    const B: &str = "----keygateBoundary7MA4YWxk";

    /// An upload as an SDK sends it: binary file part first (holding CR, LF, dashes and a fake model
    /// field), then the model field, then another binary part.
    fn upload(model_header: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{B}\r\n").as_bytes());
        body.extend_from_slice(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a;name=model.mp3\"\r\n",
        );
        body.extend_from_slice(b"Content-Type: audio/mpeg\r\n\r\n");
        body.extend_from_slice(&[0xff, 0xfb, 0x90, 0x00, b'\r', b'\n', b'-', b'-', 0x00, 0xfe]);
        body.extend_from_slice(b"\r\n--not-the-boundary\r\n\r\nname=\"model\"\r\n\r\nfake");
        body.extend_from_slice(&(0..=255u8).cycle().take(4096).collect::<Vec<u8>>());
        body.extend_from_slice(format!("\r\n--{B}\r\n").as_bytes());
        body.extend_from_slice(model_header.as_bytes());
        body.extend_from_slice(b"\r\n\r\nwhisper-1");
        body.extend_from_slice(format!("\r\n--{B}\r\n").as_bytes());
        body.extend_from_slice(b"Content-Disposition: form-data; name=\"prompt\"\r\n\r\nhello\r\n");
        body.extend_from_slice(format!("--{B}\r\n").as_bytes());
        body.extend_from_slice(
            b"Content-Disposition: form-data; name=\"extra\"; filename=\"x.bin\"\r\n\r\n",
        );
        body.extend_from_slice(&[0x00, 0x0d, 0x0a, 0x2d, 0x2d, 0x01]);
        body.extend_from_slice(format!("\r\n--{B}--\r\n").as_bytes());
        body
    }

    #[test]
    fn boundary_is_read_quoted_or_not() {
        assert_eq!(multipart_boundary(CT), Some(B));
        assert_eq!(
            multipart_boundary("Multipart/Form-Data; charset=utf-8; BOUNDARY=\"a b=c\""),
            Some("a b=c")
        );
        assert_eq!(
            multipart_boundary("multipart/form-data;boundary=\"xyz\""),
            Some("xyz")
        );
        assert_eq!(multipart_boundary("multipart/form-data"), None);
        assert_eq!(multipart_boundary("multipart/form-data; boundary="), None);
        assert_eq!(multipart_boundary("application/json; boundary=x"), None);
    }

    #[test]
    fn finds_the_model_field_between_binary_parts() {
        let body = upload("Content-Disposition: form-data; name=\"model\"");
        assert_eq!(
            multipart_field(&body, CT, "model").unwrap().as_deref(),
            Some("whisper-1")
        );
        assert_eq!(
            multipart_field(&body, CT, "prompt").unwrap().as_deref(),
            Some("hello")
        );
        assert_eq!(multipart_field(&body, CT, "language").unwrap(), None);
    }

    #[test]
    fn model_field_header_variants_are_recognised() {
        for header in [
            "content-disposition: form-data; name=\"model\"",
            "CONTENT-DISPOSITION:form-data;name=model",
            "Content-Disposition: form-data; name=model ; x=\"y\"",
            "Content-Type: text/plain\r\nContent-Disposition: Form-Data; name=\"mod\\el\"",
        ] {
            let body = upload(header);
            assert_eq!(
                multipart_field(&body, CT, "model").unwrap().as_deref(),
                Some("whisper-1"),
                "{header}"
            );
        }
        for header in [
            "Content-Disposition: form-data; name=\"model2\"",
            "Content-Disposition: attachment; name=\"model\"",
            "Content-Disposition: form-data; filename=\"model\"",
        ] {
            let body = upload(header);
            assert_eq!(
                multipart_field(&body, CT, "model").unwrap(),
                None,
                "{header}"
            );
        }
    }

    #[test]
    fn multipart_rewrite_changes_only_the_field_value() {
        let body = upload("Content-Disposition: form-data; name=\"model\"");
        let out = rewrite_multipart_field(&body, CT, "model", "whisper-large-v3").unwrap();
        let at = memmem::find(&body, b"whisper-1").unwrap();
        assert_eq!(out[..at], body[..at]);
        assert_eq!(out[at + 16..], body[at + 9..]);
        assert_eq!(
            multipart_field(&out, CT, "model").unwrap().as_deref(),
            Some("whisper-large-v3")
        );
        assert_eq!(rewrite_multipart_field(&body, CT, "language", "x"), None);
        assert_eq!(
            rewrite_multipart_field(&body, CT, "model", "a\r\n--x"),
            None
        );
        assert_eq!(
            rewrite_multipart_field(&body, "text/plain", "model", "x"),
            None
        );
    }

    #[test]
    fn multipart_rewrite_refuses_a_value_that_would_read_as_the_next_delimiter() {
        // Found by the multipart fuzz target: after the blank line that ends the part's headers,
        // a value starting with `--boundary` is a delimiter, so the rewritten body lost the field.
        let body = upload("Content-Disposition: form-data; name=\"model\"");
        let delimiter = format!("--{B}");
        assert_eq!(
            rewrite_multipart_field(&body, CT, "model", &delimiter),
            None
        );
        assert_eq!(
            rewrite_multipart_field(&body, CT, "model", &format!("{delimiter}--")),
            None
        );
        let inside = format!("a{delimiter}");
        let out = rewrite_multipart_field(&body, CT, "model", &inside).unwrap();
        assert_eq!(multipart_field(&out, CT, "model").unwrap(), Some(inside));
    }

    #[test]
    fn malformed_multipart_bodies_are_errors() {
        let good = upload("Content-Disposition: form-data; name=\"model\"");
        // Cut before the closing delimiter.
        let cut = &good[..good.len() - 10];
        assert!(multipart_field(cut, CT, "model").is_err());
        assert!(multipart_field(b"no boundary here", CT, "model").is_err());
        assert!(multipart_field(&good, "multipart/form-data", "model").is_err());
        let bad_line = format!("--{B}xx\r\n\r\nv\r\n--{B}--");
        assert!(multipart_field(bad_line.as_bytes(), CT, "model").is_err());
        let no_blank_line =
            format!("--{B}\r\nContent-Disposition: form-data; name=model\r\n--{B}--");
        assert!(multipart_field(no_blank_line.as_bytes(), CT, "model").is_err());
    }

    #[test]
    fn duplicate_model_field_is_refused() {
        let body = format!(
            "--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--{B}--\r\n"
        );
        assert_eq!(
            multipart_field(body.as_bytes(), CT, "model"),
            Err(BodyError::DuplicateKey("model"))
        );
    }

    #[test]
    fn preamble_empty_values_and_padding_are_handled() {
        let body = format!(
            "preamble\r\n--{B}  \r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\r\n--{B}--"
        );
        assert_eq!(
            multipart_field(body.as_bytes(), CT, "model")
                .unwrap()
                .as_deref(),
            Some("")
        );
        let headerless = format!("--{B}\r\n\r\nvalue\r\n--{B}--");
        assert_eq!(
            multipart_field(headerless.as_bytes(), CT, "model").unwrap(),
            None
        );
    }

    #[test]
    fn non_utf8_field_value_is_an_error() {
        let body = format!("--{B}\r\nContent-Disposition: form-data; name=model\r\n\r\n")
            .into_bytes()
            .into_iter()
            .chain([0xff, 0xfe])
            .chain(format!("\r\n--{B}--").into_bytes())
            .collect::<Vec<u8>>();
        assert_eq!(
            multipart_field(&body, CT, "model"),
            Err(BodyError::Multipart("form field value is not UTF-8"))
        );
    }
}
