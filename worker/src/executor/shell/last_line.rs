//! The last non-empty line a task wrote to stdout (the `last_stdout_line` output), tracked
//! while the output streams by, in bounded memory: only the line being written and the last
//! complete one are kept, each up to [`MAX_VALUE_BYTES`]. A line longer than that is
//! remembered by its length only, so the output can say why it has no value.

use super::outputs::MAX_VALUE_BYTES;

/// The last non-empty line of a stream, tracked as it is written, in bounded memory: the
/// line being written and the last complete one, each kept up to [`MAX_VALUE_BYTES`].
#[derive(Debug)]
pub(in crate::executor) struct LastLine {
    /// The start of the line being written.
    current: Vec<u8>,
    /// Its full length so far.
    current_len: usize,
    /// Its last byte.
    current_end: Option<u8>,
    /// Whether it is blank so far (whitespace only).
    current_blank: bool,
    /// The last complete non-blank line.
    last: Option<Line>,
}

#[derive(Debug, Clone)]
enum Line {
    Text(Vec<u8>),
    /// Longer than [`MAX_VALUE_BYTES`]: its length.
    TooLong(usize),
}

impl Default for LastLine {
    fn default() -> Self {
        Self {
            current: Vec::new(),
            current_len: 0,
            current_end: None,
            current_blank: true,
            last: None,
        }
    }
}

impl LastLine {
    /// Takes the next piece of the stream.
    pub(in crate::executor) fn push(&mut self, data: &[u8]) {
        for piece in data.split_inclusive(|&b| b == b'\n') {
            match piece.strip_suffix(b"\n") {
                Some(body) => {
                    self.extend(body);
                    self.end_line();
                }
                None => self.extend(piece),
            }
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        let Some(&end) = bytes.last() else {
            return;
        };
        // One byte more than the limit: room for a `\r` that does not count.
        let room = (MAX_VALUE_BYTES + 1).saturating_sub(self.current.len());
        self.current
            .extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.current_len += bytes.len();
        self.current_end = Some(end);
        self.current_blank &= bytes.iter().all(u8::is_ascii_whitespace);
    }

    fn end_line(&mut self) {
        if !self.current_blank {
            let len = self.current_len - usize::from(self.current_end == Some(b'\r'));
            self.last = Some(if len > MAX_VALUE_BYTES {
                Line::TooLong(len)
            } else {
                Line::Text(self.current[..len].to_vec())
            });
        }
        self.current.clear();
        self.current_len = 0;
        self.current_end = None;
        self.current_blank = true;
    }

    /// The last non-empty line (a final line without a line break counts), or why there is
    /// none to give.
    pub(in crate::executor) fn finish(&mut self) -> Result<String, String> {
        if self.current_len > 0 {
            self.end_line();
        }
        match &self.last {
            Some(Line::Text(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            Some(Line::TooLong(len)) => Err(format!(
                "the last non-empty stdout line is {len} bytes, more than the {} KiB limit",
                MAX_VALUE_BYTES / 1024
            )),
            None => Err("the task wrote no non-empty line to stdout".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_skips_blank_lines_and_handles_split_writes() {
        let mut l = LastLine::default();
        l.push(b"first\nsec");
        l.push(b"ond\r\n  \n\n");
        assert_eq!(l.finish().unwrap(), "second");
        let mut l = LastLine::default();
        l.push(b"a\nno newline at the end");
        assert_eq!(l.finish().unwrap(), "no newline at the end");
        let mut l = LastLine::default();
        l.push(b"\n \n");
        assert!(l.finish().is_err());
    }

    #[test]
    fn last_line_memory_is_bounded() {
        let mut l = LastLine::default();
        for _ in 0..100 {
            l.push(&[b'x'; 10_000]);
        }
        assert!(l.current.len() <= MAX_VALUE_BYTES + 1);
        l.push(b"\nshort\n");
        assert_eq!(l.finish().unwrap(), "short");
        let mut l = LastLine::default();
        l.push(&[b'x'; MAX_VALUE_BYTES]);
        l.push(b"\r\n");
        assert_eq!(l.finish().unwrap().len(), MAX_VALUE_BYTES);
        l.push(&[b'y'; MAX_VALUE_BYTES + 1]);
        let err = l.finish().unwrap_err();
        assert!(err.contains("16385 bytes"), "{err}");
    }
}
