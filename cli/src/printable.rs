//! Escaping what came from the server before it reaches the terminal: names, labels,
//! messages, errors and table cells may hold control characters (an `ESC ]0;…BEL` that
//! retitles the window, a cursor move that hides a line, a bidi override that reorders
//! text). They are shown escaped (`\u{1b}`), never interpreted. The one exception is a
//! task's log content streamed by `scabbard logs`: the user's own bytes, written as they are.
//!
//! Every line the CLI prints goes through [`say!`]/[`esay!`] (which keep the line breaks
//! of multi-line text) and every table cell through [`printable`] (which escapes them too).

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char, keep_line_breaks: bool) -> bool {
    if keep_line_breaks && (c == '\n' || c == '\t') {
        return false;
    }
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(s: &str, keep_line_breaks: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| unsafe_char(c, keep_line_breaks)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c, keep_line_breaks) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` with every control character escaped, line breaks included: for one-line fields
/// and table cells.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// `s` with every control character but `\n` and `\t` escaped: for whole lines of output.
pub(crate) fn printable_text(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

/// `println!`, with control characters escaped (see the module docs).
macro_rules! say {
    () => {
        println!()
    };
    ($($arg:tt)*) => {
        println!("{}", $crate::printable::printable_text(&format!($($arg)*)))
    };
}

/// `eprintln!`, with control characters escaped (see the module docs).
macro_rules! esay {
    () => {
        eprintln!()
    };
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::printable::printable_text(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sequences_are_shown_not_interpreted() {
        assert_eq!(printable("build-1"), "build-1");
        assert_eq!(printable("\x1b]0;pwned\x07x"), "\\u{1b}]0;pwned\\u{7}x");
        assert_eq!(printable("a\nb\r"), "a\\nb\\r");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(
            printable_text("line 1\n\tline 2\x1b[2J"),
            "line 1\n\tline 2\\u{1b}[2J"
        );
        assert_eq!(printable("é ✓"), "é ✓");
    }
}
