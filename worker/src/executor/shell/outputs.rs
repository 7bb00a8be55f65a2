//! Outputs of a shell attempt: the `$SCABBARD_OUTPUT` file the task writes values to, and
//! the outputs its spec declares (`path`, `last_stdout_line`). This module owns their
//! format, their bounds and what becomes of values that break them: nothing is truncated
//! silently — what is dropped is explained in a note for the attempt's system log, and a
//! declared output that cannot be produced is reported as missing (the executor turns a
//! successful attempt with a missing output into a failure).
//!
//! The `$SCABBARD_OUTPUT` format is GitHub Actions' `$GITHUB_OUTPUT`: `key=value` lines
//! (the value runs to the end of the line) and multi-line values written as `key<<DELIM`,
//! the lines of the value, then a line that is exactly `DELIM`. Empty lines are skipped, a
//! `\r` before a line's `\n` is ignored, and a key written twice keeps its last value.
//! Declared outputs that were produced win over keys of the same name in the file. The
//! parser is shared: the dagger executor reads a container's file back through the engine
//! and hands its text to [`parse_output_text`].

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

use scabbard_common::proto::{self, output_spec::Source};

/// Name of the `$SCABBARD_OUTPUT` file in the attempt's working directory.
pub(super) const OUTPUT_FILE: &str = ".scabbard-output";
/// At most this much of the `$SCABBARD_OUTPUT` file is read (a container's too).
pub(in crate::executor) const MAX_FILE_BYTES: usize = 64 * 1024;
/// At most this many distinct keys are taken from the `$SCABBARD_OUTPUT` file.
pub(super) const MAX_KEYS: usize = 256;
/// Largest value of any output, in bytes.
pub(in crate::executor) const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Notes about the `$SCABBARD_OUTPUT` file beyond this many are only counted.
const MAX_NOTES: usize = 16;

/// Whether `name` is a valid output name: letters, digits, `_`, `-` and `.`.
pub(in crate::executor) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Checks the declared outputs before the task runs: valid, distinct names, sources a shell
/// task can produce, and relative paths that stay in the working directory. Returns
/// whether an output needs the last line of stdout, or the user-facing reason the spec is
/// refused.
pub(super) fn check_declared(outputs: &[proto::OutputSpec]) -> Result<bool, String> {
    let mut names = HashSet::new();
    let mut needs_last_line = false;
    for o in outputs {
        let name = &o.name;
        if !valid_name(name.as_bytes()) {
            return Err(format!(
                "invalid output name '{name}': use letters, digits, '_', '-' and '.'"
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("output '{name}' is declared twice"));
        }
        match &o.source {
            Some(Source::Path(path)) => check_path(name, path)?,
            Some(Source::LastStdoutLine(true)) => needs_last_line = true,
            Some(Source::LastStdoutLine(false)) | None => {
                return Err(format!(
                    "output '{name}' has no source: give `path` or `last_stdout_line`"
                ));
            }
            Some(
                source @ (Source::ContainerPath(_) | Source::GitCommit(_) | Source::Published(_)),
            ) => {
                let field = match source {
                    Source::ContainerPath(_) => "container_path",
                    Source::GitCommit(_) => "git_commit",
                    _ => "published",
                };
                return Err(format!(
                    "output '{name}' uses `{field}`, which only container tasks support; \
                     a shell task's outputs come from `path`, `last_stdout_line` or $SCABBARD_OUTPUT"
                ));
            }
        }
    }
    Ok(needs_last_line)
}

/// A `path` source must be relative and must not climb out of the working directory.
fn check_path(name: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("output '{name}' has an empty path"));
    }
    let escapes = Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes {
        return Err(format!(
            "output '{name}': path '{path}' must be relative to the working directory, without '..'"
        ));
    }
    Ok(())
}

/// Everything the outputs of one attempt came to.
#[derive(Debug, Default)]
pub(super) struct Collected {
    /// The values produced.
    pub(super) values: HashMap<String, String>,
    /// Lines for the attempt's system log (what was dropped and why).
    pub(super) notes: Vec<String>,
    /// Declared outputs that could not be produced: "output 'x' was not produced: why".
    pub(super) missing: Vec<String>,
}

/// Reads the `$SCABBARD_OUTPUT` file and the declared outputs of an attempt that ran in
/// `workdir`; `last_line` is the last stdout line if an output asked for it.
pub(super) fn collect(
    declared: &[proto::OutputSpec],
    workdir: &Path,
    last_line: Option<Result<String, String>>,
) -> Collected {
    let mut notes = Notes::default();
    let mut values = read_output_file(&workdir.join(OUTPUT_FILE), &mut notes);
    let mut missing = Vec::new();
    for o in declared {
        let value = match &o.source {
            Some(Source::Path(path)) => read_path(workdir, path),
            Some(Source::LastStdoutLine(true)) => last_line
                .clone()
                .unwrap_or_else(|| Err("stdout was not tracked".into())),
            _ => Err("a shell task cannot produce this output".into()),
        };
        match value {
            Ok(v) => {
                values.insert(o.name.clone(), v);
            }
            Err(why) => missing.push(format!("output '{}' was not produced: {why}", o.name)),
        }
    }
    Collected {
        values,
        notes: notes.into_lines(),
        missing,
    }
}

/// Notes about the `$SCABBARD_OUTPUT` file, at most [`MAX_NOTES`] of them in full.
#[derive(Debug, Default)]
struct Notes {
    lines: Vec<String>,
    more: usize,
}

impl Notes {
    fn push(&mut self, text: String) {
        if self.lines.len() < MAX_NOTES {
            self.lines.push(format!("$SCABBARD_OUTPUT: {text}"));
        } else {
            self.more += 1;
        }
    }

    fn into_lines(mut self) -> Vec<String> {
        if self.more > 0 {
            self.lines.push(format!(
                "$SCABBARD_OUTPUT: {} more problems not shown",
                self.more
            ));
        }
        self.lines
    }
}

/// The whole of a file read with a bound, and its size on disk.
struct Bounded {
    data: Vec<u8>,
    size: u64,
}

/// Reads at most `limit + 1` bytes of `path` (so that "more than `limit`" shows), refusing
/// anything but a regular file — without blocking on a FIFO, and without following a
/// symbolic link unless `follow`.
fn read_bounded(path: &Path, follow: bool, limit: usize) -> io::Result<Bounded> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidInput, "it is a symbolic link")
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    let mut data = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut data)?;
    Ok(Bounded {
        data,
        size: meta.len(),
    })
}

/// The values of the `$SCABBARD_OUTPUT` file at `path`.
fn read_output_file(path: &Path, notes: &mut Notes) -> HashMap<String, String> {
    let Bounded { mut data, size } = match read_bounded(path, false, MAX_FILE_BYTES) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            notes.push("the file was removed by the task: no outputs read from it".into());
            return HashMap::new();
        }
        Err(e) => {
            notes.push(format!(
                "cannot read the file ({e}): no outputs read from it"
            ));
            return HashMap::new();
        }
    };
    if data.len() > MAX_FILE_BYTES {
        // Keep whole lines only: a value cut in the middle would be wrong, not short.
        data.truncate(MAX_FILE_BYTES);
        let kept = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        data.truncate(kept);
        notes.push(format!(
            "the file is {} bytes, more than the {} KiB limit: only its first {kept} bytes \
             (whole lines) were read, the rest was dropped",
            size.max(MAX_FILE_BYTES as u64 + 1),
            MAX_FILE_BYTES / 1024
        ));
    }
    parse(&data, notes)
}

/// The values of `$SCABBARD_OUTPUT` text read by another executor (the dagger executor
/// reads a container's file back through the engine, at most [`MAX_FILE_BYTES`] of it),
/// and the notes for the attempt's system log. Same format and bounds as the shell's.
pub(in crate::executor) fn parse_output_text(
    data: &[u8],
) -> (HashMap<String, String>, Vec<String>) {
    let mut notes = Notes::default();
    let values = parse(data, &mut notes);
    (values, notes.into_lines())
}

/// Parses `$SCABBARD_OUTPUT` lines (see the module docs).
fn parse(data: &[u8], notes: &mut Notes) -> HashMap<String, String> {
    let mut values = HashMap::new();
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .enumerate();
    while let Some((i, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let eq = find(line, b"=");
        let heredoc = find(line, b"<<");
        let (key, value) = match (eq, heredoc) {
            (Some(e), h) if h.is_none_or(|h| e < h) => (&line[..e], line[e + 1..].to_vec()),
            (_, Some(h)) => {
                let (key, delim) = (&line[..h], &line[h + 2..]);
                if delim.is_empty() {
                    notes.push(format!("line {n}: `key<<` without a delimiter: ignored"));
                    continue;
                }
                let mut body: Vec<&[u8]> = Vec::new();
                let mut closed = false;
                for (_, l) in lines.by_ref() {
                    if l == delim {
                        closed = true;
                        break;
                    }
                    body.push(l);
                }
                if !closed {
                    notes.push(format!(
                        "line {n}: no line closes the multi-line value started here \
                         (expected `{}`): dropped",
                        String::from_utf8_lossy(delim)
                    ));
                    break;
                }
                (key, body.join(&b'\n'))
            }
            _ => {
                notes.push(format!(
                    "line {n}: neither `key=value` nor `key<<DELIMITER`: ignored"
                ));
                continue;
            }
        };
        if !valid_name(key) {
            notes.push(format!(
                "line {n}: invalid output name (use letters, digits, '_', '-' and '.'): ignored"
            ));
            continue;
        }
        let key = String::from_utf8_lossy(key).into_owned();
        if value.len() > MAX_VALUE_BYTES {
            values.remove(&key);
            notes.push(format!(
                "output '{key}' (line {n}) is {} bytes, more than the {} KiB limit: dropped",
                value.len(),
                MAX_VALUE_BYTES / 1024
            ));
            continue;
        }
        let Ok(value) = String::from_utf8(value) else {
            values.remove(&key);
            notes.push(format!(
                "output '{key}' (line {n}) is not UTF-8 text: dropped"
            ));
            continue;
        };
        if !values.contains_key(&key) && values.len() >= MAX_KEYS {
            notes.push(format!(
                "output '{key}' (line {n}) is beyond the limit of {MAX_KEYS} outputs: dropped"
            ));
            continue;
        }
        values.insert(key, value);
    }
    values
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of a `path` output: the file's text without its final line break.
fn read_path(workdir: &Path, path: &str) -> Result<String, String> {
    let root = workdir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the working directory: {e}"))?;
    let target = match root.join(path).canonicalize() {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("file '{path}' not found in the working directory"));
        }
        Err(e) => return Err(format!("cannot resolve '{path}': {e}")),
    };
    if !target.starts_with(&root) {
        return Err(format!(
            "'{path}' resolves outside the working directory (through a symbolic link): refused"
        ));
    }
    // Room for a final `\r\n`, which does not count.
    let Bounded { data, size } = read_bounded(&target, true, MAX_VALUE_BYTES + 2)
        .map_err(|e| format!("cannot read '{path}': {e}"))?;
    let too_big = || {
        format!(
            "'{path}' is {size} bytes, more than the {} KiB limit",
            MAX_VALUE_BYTES / 1024
        )
    };
    if data.len() > MAX_VALUE_BYTES + 2 {
        return Err(too_big());
    }
    let mut text = String::from_utf8(data).map_err(|_| format!("'{path}' is not UTF-8 text"))?;
    strip_line_break(&mut text);
    if text.len() > MAX_VALUE_BYTES {
        return Err(too_big());
    }
    Ok(text)
}

/// Removes one final `\n` or `\r\n`.
fn strip_line_break(text: &mut String) {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> (HashMap<String, String>, Vec<String>) {
        let mut notes = Notes::default();
        let values = parse(text.as_bytes(), &mut notes);
        (values, notes.into_lines())
    }

    #[test]
    fn key_value_and_multi_line_values() {
        let (values, notes) = parse_str(
            "a=1\r\n\nb=x=y<<z\nnotes<<EOF\nline one\n\nline=three\nEOF\nempty=\nc<<END\nEND\n",
        );
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(values["a"], "1");
        assert_eq!(values["b"], "x=y<<z");
        assert_eq!(values["notes"], "line one\n\nline=three");
        assert_eq!(values["empty"], "");
        assert_eq!(values["c"], "");
        assert_eq!(values.len(), 5);
    }

    #[test]
    fn bad_lines_are_noted_and_skipped() {
        let (values, notes) = parse_str("ok=1\njunk\nbad key=2\n=3\nlast<<EOF\nnever closed\n");
        assert_eq!(values, HashMap::from([("ok".into(), "1".into())]));
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(notes[0].contains("line 2: neither"));
        assert!(notes[1].contains("line 3: invalid output name"));
        assert!(notes[2].contains("line 4: invalid output name"));
        assert!(notes[3].contains("line 5: no line closes"));
    }

    #[test]
    fn too_many_keys_and_notes_are_bounded() {
        let text: String = (0..300).map(|i| format!("k{i}=v\n")).collect();
        let (values, notes) = parse_str(&text);
        assert_eq!(values.len(), MAX_KEYS);
        // A key already present may still be updated.
        let (values, _) = parse_str(&format!("{text}k0=new\n"));
        assert_eq!(values["k0"], "new");
        assert_eq!(notes.len(), MAX_NOTES + 1);
        assert!(notes[MAX_NOTES].contains("28 more problems"), "{notes:?}");
    }

    #[test]
    fn paths_outside_the_working_directory_are_refused_up_front() {
        let out = |name: &str, source| proto::OutputSpec {
            name: name.into(),
            source: Some(source),
        };
        let path = |p: &str| out("v", Source::Path(p.into()));
        assert_eq!(check_declared(&[path("out/v.txt")]), Ok(false));
        assert_eq!(check_declared(&[path("./v")]), Ok(false));
        for bad in ["/etc/passwd", "../v", "a/../../v", ""] {
            assert!(check_declared(&[path(bad)]).is_err(), "{bad}");
        }
        let last = out("l", Source::LastStdoutLine(true));
        assert_eq!(check_declared(&[path("v"), last.clone()]), Ok(true));
        assert!(check_declared(&[last.clone(), last]).is_err());
        assert!(check_declared(&[out("bad name", Source::LastStdoutLine(true))]).is_err());
        let container = check_declared(&[out("c", Source::ContainerPath("/x".into()))]);
        assert!(container.unwrap_err().contains("only container tasks"));
    }
}
