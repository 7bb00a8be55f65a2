//! Redaction of a task's secret values (`TaskSpec.secret_env`) from everything its attempt
//! produces: log chunks and the result's message and outputs. Each occurrence of a secret
//! is replaced with [`MASK`] before anything is spooled or sent to the controller.
//!
//! Output arrives in arbitrary pieces, so a secret may be split across two reads. A
//! [`StreamRedactor`] holds back the end of a piece while it could still be the start of a
//! secret (never more than the longest secret minus one byte) and releases it with the next
//! piece or at [`StreamRedactor::finish`]. The result is exactly what [`Secrets::redact`]
//! makes of the whole stream at once: at each position the longest secret starting there
//! is replaced, scanning left to right.

use std::sync::Arc;

use crate::executor::{OutStream, OutputChunk};

/// What a secret is replaced with.
pub const MASK: &[u8] = b"***";

/// The secret values of one attempt (empty values are ignored).
#[derive(Clone)]
pub struct Secrets {
    /// Distinct, non-empty, longest first (so the first match is the longest).
    values: Vec<Vec<u8>>,
    /// Whether some secret starts with this byte.
    first: Box<[bool; 256]>,
    /// Length of the longest secret.
    max_len: usize,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} values)", self.values.len())
    }
}

impl Default for Secrets {
    fn default() -> Self {
        Self::new(std::iter::empty::<&[u8]>())
    }
}

impl Secrets {
    /// The set of `values`, ignoring empty ones.
    pub fn new<S: AsRef<[u8]>>(values: impl IntoIterator<Item = S>) -> Self {
        let mut values: Vec<Vec<u8>> = values
            .into_iter()
            .map(|v| v.as_ref().to_vec())
            .filter(|v| !v.is_empty())
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        let mut first = Box::new([false; 256]);
        for v in &values {
            first[usize::from(v[0])] = true;
        }
        let max_len = values.first().map_or(0, Vec::len);
        Self {
            values,
            first,
            max_len,
        }
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `data` with every secret replaced by [`MASK`].
    pub fn redact(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let used = self.scan(data, true, &mut out);
        debug_assert_eq!(used, data.len());
        out
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn redact_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_string();
        }
        // Secrets are whole UTF-8 strings, so matches fall on character boundaries.
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }

    /// Copies `data` to `out`, redacted, up to the first position from which a secret
    /// might continue past the end of `data` (unless `at_end`); returns how many bytes of
    /// `data` were consumed.
    fn scan(&self, data: &[u8], at_end: bool, out: &mut Vec<u8>) -> usize {
        if self.is_empty() {
            out.extend_from_slice(data);
            return data.len();
        }
        let mut i = 0;
        let mut plain = 0; // start of the bytes not yet copied
        while i < data.len() {
            if !self.first[usize::from(data[i])] {
                i += 1;
                continue;
            }
            let rest = &data[i..];
            if !at_end
                && rest.len() < self.max_len
                && self
                    .values
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                // Could be (the start of) a secret, or of a longer one: decide with more data.
                break;
            }
            match self.values.iter().find(|s| rest.starts_with(s)) {
                Some(s) => {
                    out.extend_from_slice(&data[plain..i]);
                    out.extend_from_slice(MASK);
                    i += s.len();
                    plain = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&data[plain..i]);
        i
    }
}

/// Redacts one stream that arrives in pieces.
#[derive(Debug)]
pub struct StreamRedactor {
    secrets: Arc<Secrets>,
    /// The end of what was pushed that may be the start of a secret.
    held: Vec<u8>,
}

impl StreamRedactor {
    /// A redactor for one stream.
    pub fn new(secrets: Arc<Secrets>) -> Self {
        Self {
            secrets,
            held: Vec::new(),
        }
    }

    /// The redacted output that can be released after `data` (possibly empty).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        if self.held.is_empty() {
            let used = self.secrets.scan(data, false, &mut out);
            self.held.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.held);
            buf.extend_from_slice(data);
            let used = self.secrets.scan(&buf, false, &mut out);
            buf.drain(..used);
            self.held = buf;
        }
        out
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.secrets.redact(&held)
    }

    /// Bytes held back, waiting for more.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// Largest chunk handed on (masks can make a chunk longer than what was read).
const MAX_CHUNK: usize = 64 * 1024;

/// Redacts an attempt's output chunks, one [`StreamRedactor`] per stream.
#[derive(Debug)]
pub struct ChunkRedactor {
    /// Nothing to redact: chunks pass through untouched.
    passthrough: bool,
    streams: [(OutStream, StreamRedactor); 3],
}

impl ChunkRedactor {
    /// A redactor of the output of an attempt with `secrets`.
    pub fn new(secrets: Arc<Secrets>) -> Self {
        let s = |stream| (stream, StreamRedactor::new(secrets.clone()));
        Self {
            passthrough: secrets.is_empty(),
            streams: [
                s(OutStream::Stdout),
                s(OutStream::Stderr),
                s(OutStream::System),
            ],
        }
    }

    fn stream(&mut self, which: OutStream) -> &mut StreamRedactor {
        let i = self
            .streams
            .iter()
            .position(|(s, _)| *s == which)
            .unwrap_or(0);
        &mut self.streams[i].1
    }

    /// What can be released of `chunk` now (no chunk is empty).
    pub fn push(&mut self, chunk: OutputChunk) -> Vec<OutputChunk> {
        if self.passthrough {
            return vec![chunk];
        }
        let data = self.stream(chunk.stream).push(&chunk.data);
        split(chunk.stream, data)
    }

    /// What was held back, at the end of the attempt.
    pub fn finish(&mut self) -> Vec<OutputChunk> {
        let mut out = Vec::new();
        for (stream, r) in &mut self.streams {
            out.extend(split(*stream, r.finish()));
        }
        out
    }
}

fn split(stream: OutStream, data: Vec<u8>) -> Vec<OutputChunk> {
    if data.len() <= MAX_CHUNK {
        if data.is_empty() {
            return Vec::new();
        }
        return vec![OutputChunk { stream, data }];
    }
    data.chunks(MAX_CHUNK)
        .map(|c| OutputChunk {
            stream,
            data: c.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secrets(v: &[&str]) -> Arc<Secrets> {
        Arc::new(Secrets::new(v.iter().copied()))
    }

    fn streamed(s: &Arc<Secrets>, pieces: &[&[u8]]) -> Vec<u8> {
        let mut r = StreamRedactor::new(s.clone());
        let mut out = Vec::new();
        for p in pieces {
            out.extend(r.push(p));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn one_shot_redaction() {
        let s = secrets(&["hunter2", "", "abc"]);
        assert_eq!(s.redact(b"pw=hunter2 x"), b"pw=*** x");
        assert_eq!(s.redact(b"hunter2hunter2"), b"******");
        assert_eq!(s.redact(b"abcabc-ab"), b"******-ab");
        assert_eq!(s.redact(b""), b"");
        assert_eq!(s.redact_str("é hunter2 é"), "é *** é");
        // The longest secret at a position wins.
        let s = secrets(&["ab", "abcd"]);
        assert_eq!(s.redact(b"abcd abc"), b"*** ***c");
        // Empty secrets only: nothing happens.
        assert_eq!(secrets(&[""]).redact(b"abc"), b"abc");
    }

    #[test]
    fn a_secret_split_across_reads_is_redacted() {
        let s = secrets(&["hunter2"]);
        assert_eq!(streamed(&s, &[b"pw=hun", b"ter2\n"]), b"pw=***\n");
        assert_eq!(
            streamed(&s, &[b"h", b"u", b"n", b"t", b"e", b"r", b"2"]),
            b"***"
        );
        // A partial match that turns out not to be a secret is released intact.
        assert_eq!(streamed(&s, &[b"hunt", b"er"]), b"hunter");
        assert_eq!(streamed(&s, &[b"hunt"]), b"hunt");
    }

    #[test]
    fn only_a_possible_secret_start_is_held_back() {
        let s = secrets(&["hunter2"]);
        let mut r = StreamRedactor::new(s);
        assert_eq!(r.push(b"hello world\n"), b"hello world\n");
        assert_eq!(r.held(), 0);
        assert_eq!(r.push(b"x hunt"), b"x ");
        assert_eq!(r.held(), 4);
        assert_eq!(r.push(b"ing"), b"hunting");
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn chunks_keep_their_stream_and_no_empty_chunk_is_made() {
        let mut r = ChunkRedactor::new(secrets(&["s3cret"]));
        let c = |stream, d: &[u8]| OutputChunk {
            stream,
            data: d.to_vec(),
        };
        assert!(r.push(c(OutStream::Stdout, b"s3c")).is_empty());
        assert_eq!(
            r.push(c(OutStream::Stderr, b"err s3cret")),
            vec![c(OutStream::Stderr, b"err ***")]
        );
        assert_eq!(
            r.push(c(OutStream::Stdout, b"ret!")),
            vec![c(OutStream::Stdout, b"***!")]
        );
        assert!(r.push(c(OutStream::System, b"s3cr")).is_empty());
        assert_eq!(r.finish(), vec![c(OutStream::System, b"s3cr")]);
        // A mask longer than its secret never makes a chunk over 64 KiB.
        let mut r = ChunkRedactor::new(secrets(&["a"]));
        let out = r.push(c(OutStream::Stdout, &vec![b'a'; MAX_CHUNK]));
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|c| c.data.len() <= MAX_CHUNK));
        // Without secrets chunks pass as they are.
        let mut r = ChunkRedactor::new(secrets(&[]));
        assert_eq!(
            r.push(c(OutStream::Stdout, b"x")),
            vec![c(OutStream::Stdout, b"x")]
        );
        assert!(r.finish().is_empty());
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Text over a small alphabet (so secrets' pieces recur by chance) with secrets spliced
    /// in at random places, and random cut points.
    fn case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>, Vec<usize>)> {
        let secret =
            proptest::collection::vec(prop_oneof![Just(b'x'), Just(b'y'), Just(b'z')], 1..12);
        (
            proptest::collection::vec(secret, 1..4),
            proptest::collection::vec(
                prop_oneof![Just(b'x'), Just(b'y'), Just(b'z'), Just(b'*'), Just(b'\n')],
                0..200,
            ),
            proptest::collection::vec(
                (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
                0..6,
            ),
            proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        )
            .prop_map(|(secrets, mut text, inserts, cuts)| {
                for (at, which) in inserts {
                    let s = which.get(&secrets).clone();
                    let at = at.index(text.len() + 1);
                    text.splice(at..at, s);
                }
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
                cuts.sort_unstable();
                (secrets, text, cuts)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn streamed_equals_one_shot_and_leaves_no_secret((values, text, cuts) in case()) {
            let s = Arc::new(Secrets::new(&values));
            let whole = s.redact(&text);
            let mut pieces = Vec::new();
            let mut from = 0;
            for c in cuts {
                pieces.push(&text[from..c]);
                from = c;
            }
            pieces.push(&text[from..]);
            let mut r = StreamRedactor::new(s.clone());
            let mut out = Vec::new();
            for p in &pieces {
                out.extend(r.push(p));
                prop_assert!(r.held() < s.max_len);
            }
            out.extend(r.finish());
            prop_assert_eq!(&out, &whole);
            // No secret survives, unless it is made of masks and what follows them.
            for v in &values {
                if !v.contains(&b'*') {
                    prop_assert!(!contains(&out, v), "{:?} in {:?}", v, out);
                }
            }
        }

        #[test]
        fn arbitrary_secrets_and_bytes(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..4),
            text in proptest::collection::vec(any::<u8>(), 0..300),
            step in 1usize..17,
        ) {
            let s = Arc::new(Secrets::new(&values));
            let whole = s.redact(&text);
            let pieces: Vec<&[u8]> = text.chunks(step).collect();
            prop_assert_eq!(streamed(&s, &pieces), whole);
        }
    }
}
