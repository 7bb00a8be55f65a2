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

/// Shortest secret whose encodings are masked too.
pub const ENCODED_MIN: usize = 4;

/// The forms of `v` that [`Secrets::with_encodings`] masks (`v` itself excluded).
fn encodings(v: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut out = Vec::new();
    // The whole encoding, as `base64` prints it (with its last characters and padding).
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(v).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for shift in 0..3usize {
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(v);
            let text = engine.encode(&shifted).into_bytes();
            // Characters made only of the secret's bits.
            let first = (8 * shift).div_ceil(6);
            let end = (8 * (shift + v.len())) / 6;
            if end > first && end - first >= ENCODED_MIN {
                out.push(text[first..end].to_vec());
            }
        }
    }
    let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
    out.push(hex.to_uppercase().into_bytes());
    out.push(hex.into_bytes());
    let mut percent = String::new();
    for &b in v {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            percent.push(char::from(b));
        } else {
            percent.push_str(&format!("%{b:02X}"));
        }
    }
    out.push(percent.into_bytes());
    if let Ok(text) = std::str::from_utf8(v)
        && let Ok(json) = serde_json::to_string(text)
    {
        out.push(json.as_bytes()[1..json.len() - 1].to_vec());
    }
    out.retain(|e| e.as_slice() != v);
    out
}

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

    /// The set of `values` and of the forms they commonly take when a task passes them on,
    /// as GitHub Actions masks them: base64 (standard and URL-safe alphabets, at each of
    /// the three alignments inside a longer encoded text: the characters that depend on the
    /// secret alone), hex (lower and upper case), percent-encoding and a JSON string
    /// escape. Encodings are added for values of at least [`ENCODED_MIN`] bytes (shorter
    /// ones would mask too much by chance).
    pub fn with_encodings<S: AsRef<[u8]>>(values: impl IntoIterator<Item = S>) -> Self {
        let mut all = Vec::new();
        for v in values {
            let v = v.as_ref();
            if v.is_empty() {
                continue;
            }
            all.push(v.to_vec());
            if v.len() >= ENCODED_MIN {
                all.extend(encodings(v));
            }
        }
        Self::new(all)
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
        self.scan_pieces(data, at_end, |piece| match piece {
            Piece::Plain(from, to) => out.extend_from_slice(&data[from..to]),
            Piece::Mask(_) => out.extend_from_slice(MASK),
        })
    }

    /// [`Secrets::scan`], handing out what to copy (plain ranges of `data`) and where a
    /// mask goes, in order.
    fn scan_pieces(&self, data: &[u8], at_end: bool, mut emit: impl FnMut(Piece)) -> usize {
        if self.is_empty() {
            if !data.is_empty() {
                emit(Piece::Plain(0, data.len()));
            }
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
                    if plain < i {
                        emit(Piece::Plain(plain, i));
                    }
                    emit(Piece::Mask(i));
                    i += s.len();
                    plain = i;
                }
                None => i += 1,
            }
        }
        if plain < i {
            emit(Piece::Plain(plain, i));
        }
        i
    }
}

/// What [`Secrets::scan_pieces`] hands out.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Copy `data[from..to]`.
    Plain(usize, usize),
    /// A secret starting at this offset: write [`MASK`].
    Mask(usize),
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

/// Redacts an attempt's output chunks: one redactor for stdout, stderr and the worker's
/// own lines. It first scans them together, in the order they were read, so a secret
/// written half to stdout and half to stderr is masked (its mask goes to the stream where
/// it started); then each stream alone, so a secret split by the other stream's writes
/// (`s3c` on stdout, a line on stderr, `ret` on stdout) is masked as well.
#[derive(Debug)]
pub struct ChunkRedactor {
    /// Nothing to redact: chunks pass through untouched.
    passthrough: bool,
    merged: MergedRedactor,
    streams: [(OutStream, StreamRedactor); 3],
}

impl ChunkRedactor {
    /// A redactor of the output of an attempt with `secrets`.
    pub fn new(secrets: Arc<Secrets>) -> Self {
        let s = |stream| (stream, StreamRedactor::new(secrets.clone()));
        Self {
            passthrough: secrets.is_empty(),
            merged: MergedRedactor {
                secrets: secrets.clone(),
                held: Vec::new(),
            },
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
        let released = self.merged.push(chunk.stream, chunk.data, false);
        self.per_stream(released)
    }

    /// What was held back, at the end of the attempt.
    pub fn finish(&mut self) -> Vec<OutputChunk> {
        let released = self.merged.push(OutStream::System, Vec::new(), true);
        let mut out = self.per_stream(released);
        for (stream, r) in &mut self.streams {
            out.extend(split(*stream, r.finish()));
        }
        out
    }

    fn per_stream(&mut self, released: Vec<(OutStream, Vec<u8>)>) -> Vec<OutputChunk> {
        let mut out = Vec::new();
        for (stream, data) in released {
            let data = self.stream(stream).push(&data);
            out.extend(split(stream, data));
        }
        out
    }
}

/// Redacts the streams of an attempt together, in the order they were read.
#[derive(Debug)]
struct MergedRedactor {
    secrets: Arc<Secrets>,
    /// Bytes held back, in order, with the stream each came from (neighbours differ).
    held: Vec<(OutStream, Vec<u8>)>,
}

impl MergedRedactor {
    /// Adds `data` of `stream` and returns what is decided, in order, by stream.
    fn push(
        &mut self,
        stream: OutStream,
        data: Vec<u8>,
        at_end: bool,
    ) -> Vec<(OutStream, Vec<u8>)> {
        if !data.is_empty() {
            match self.held.last_mut() {
                Some((s, d)) if *s == stream => d.extend_from_slice(&data),
                _ => self.held.push((stream, data)),
            }
        }
        let segments = std::mem::take(&mut self.held);
        let mut buf = Vec::with_capacity(segments.iter().map(|(_, d)| d.len()).sum());
        // (stream, end offset in `buf`) per segment.
        let mut ends = Vec::with_capacity(segments.len());
        for (stream, data) in &segments {
            buf.extend_from_slice(data);
            ends.push((*stream, buf.len()));
        }
        let stream_at = |at: usize| {
            ends.iter()
                .find(|(_, end)| at < *end)
                .map_or(OutStream::System, |(s, _)| *s)
        };
        let mut out: Vec<(OutStream, Vec<u8>)> = Vec::new();
        let mut put = |stream: OutStream, bytes: &[u8]| match out.last_mut() {
            Some((s, d)) if *s == stream => d.extend_from_slice(bytes),
            _ => out.push((stream, bytes.to_vec())),
        };
        let used = self.secrets.scan_pieces(&buf, at_end, |piece| match piece {
            Piece::Plain(mut from, to) => {
                // Split on segment boundaries.
                for (stream, end) in &ends {
                    if from >= to {
                        break;
                    }
                    if from < *end {
                        let upto = to.min(*end);
                        put(*stream, &buf[from..upto]);
                        from = upto;
                    }
                }
            }
            Piece::Mask(at) => put(stream_at(at), MASK),
        });
        // Keep what was not decided, with its streams.
        let mut start = 0;
        for (stream, end) in &ends {
            let from = start.max(used);
            if from < *end {
                self.held.push((*stream, buf[from..*end].to_vec()));
            }
            start = *end;
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

    #[test]
    fn a_secret_split_between_stdout_and_stderr_is_masked() {
        let c = |stream, d: &[u8]| OutputChunk {
            stream,
            data: d.to_vec(),
        };
        let mut r = ChunkRedactor::new(secrets(&["hunter2"]));
        let mut out = r.push(c(OutStream::Stdout, b"pw=hun"));
        out.extend(r.push(c(OutStream::Stderr, b"ter2 x")));
        out.extend(r.finish());
        let all: Vec<u8> = out.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(all, b"pw=*** x");
        // The mask goes where the secret started.
        assert!(
            out.iter()
                .any(|c| c.stream == OutStream::Stdout && c.data.ends_with(MASK))
        );
        // Split within stdout by a stderr write in between: masked too.
        let mut r = ChunkRedactor::new(secrets(&["hunter2"]));
        let mut out = r.push(c(OutStream::Stdout, b"hun"));
        out.extend(r.push(c(OutStream::Stderr, b"warning\n")));
        out.extend(r.push(c(OutStream::Stdout, b"ter2\n")));
        out.extend(r.finish());
        let stdout: Vec<u8> = out
            .iter()
            .filter(|c| c.stream == OutStream::Stdout)
            .flat_map(|c| c.data.clone())
            .collect();
        assert_eq!(stdout, b"***\n");
    }

    #[test]
    fn encodings_of_a_secret_are_masked() {
        use base64::Engine;
        let s = Secrets::with_encodings(["s3cr3t-value"]);
        let b64 = base64::engine::general_purpose::STANDARD.encode("s3cr3t-value");
        assert!(!contains(&s.redact(b64.as_bytes()), b"czNjcjN0LXZhbHVl"));
        // The whole padded form as `base64` prints it.
        let s2 = Secrets::with_encodings(["hunter2-abuse-value"]);
        assert_eq!(s2.redact(b"aHVudGVyMi1hYnVzZS12YWx1ZQ==\n"), b"***\n");
        // Inside a longer encoded text, at every alignment.
        for prefix in ["", "a", "ab", "abc"] {
            let text = format!("{prefix}s3cr3t-value!");
            let enc = base64::engine::general_purpose::STANDARD.encode(&text);
            let out = s.redact(enc.as_bytes());
            assert!(
                contains(&out, MASK),
                "{prefix:?}: {}",
                String::from_utf8_lossy(&out)
            );
            let url = base64::engine::general_purpose::URL_SAFE.encode(&text);
            assert!(contains(&s.redact(url.as_bytes()), MASK));
        }
        assert_eq!(s.redact(b"733363723374"), b"733363723374"); // hex of a prefix only
        assert_eq!(s.redact(b"x 7333637233742d76616c7565 y"), b"x *** y");
        assert_eq!(s.redact(b"s3cr3t%2Dvalue"), b"s3cr3t%2Dvalue"); // '-' is not escaped
        let s = Secrets::with_encodings(["p@ss word\\"]);
        assert_eq!(s.redact(b"u=p%40ss%20word%5C"), b"u=***");
        assert_eq!(s.redact(br#"{"pw":"p@ss word\\"}"#), br#"{"pw":"***"}"#);
        // Short secrets are masked as they are, not their encodings.
        let s = Secrets::with_encodings(["ab"]);
        assert_eq!(s.redact(b"ab 6162 YWI"), b"*** 6162 YWI");
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
