//! Include/exclude patterns of `host.directory` and `withDirectory`, in the spirit of
//! `.dockerignore`: paths are relative and `/`-separated, `*` matches within one path
//! segment, `?` one character, `**` any number of segments; a pattern that matches a
//! directory matches everything under it; a leading `!` re-includes; the last matching
//! pattern wins. Character classes (`[a-z]`) are not modelled: `[` is a literal.

use crate::object::Filter;

/// Whether `rel` (a relative `/`-separated path) is matched by `patterns` (last match wins,
/// `!` negates).
fn matched(patterns: &[String], rel: &str) -> bool {
    let mut hit = false;
    for p in patterns {
        let (negate, p) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        if matches_path_or_parent(p, rel) {
            hit = !negate;
        }
    }
    hit
}

/// Whether `pattern` matches `rel` or one of its parent directories.
fn matches_path_or_parent(pattern: &str, rel: &str) -> bool {
    let pat: Vec<&str> = pattern
        .trim_start_matches("./")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if pat.is_empty() {
        return false;
    }
    let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    (1..=segs.len()).any(|n| match_segments(&pat, &segs[..n]))
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => {
                match_segment(p.as_bytes(), s.as_bytes()) && match_segments(rest, srest)
            }
            None => false,
        },
    }
}

fn match_segment(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|skip| match_segment(rest, &s[skip..])),
        Some((b'?', rest)) => !s.is_empty() && match_segment(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && match_segment(rest, &s[1..]),
    }
}

impl Filter {
    /// Whether a file or directory at `rel` is copied.
    pub(crate) fn keeps(&self, rel: &str) -> bool {
        if matched(&self.exclude, rel) {
            return false;
        }
        self.include.is_empty() || matched(&self.include, rel)
    }

    /// Whether a directory at `rel` must be walked (something under it may be kept).
    pub(crate) fn enters(&self, rel: &str) -> bool {
        if matched(&self.exclude, rel) && !self.exclude.iter().any(|p| p.starts_with('!')) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(include: &[&str], exclude: &[&str]) -> Filter {
        Filter {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn segments_and_stars() {
        assert!(match_segment(b"*.log", b"a.log"));
        assert!(!match_segment(b"*.log", b"a.txt"));
        assert!(match_segment(b"a?c", b"abc"));
        assert!(!match_segment(b"a?c", b"ac"));
        assert!(match_segment(b"*", b""));
    }

    #[test]
    fn excludes_cover_what_is_under_a_matched_directory() {
        let filter = f(&[], &["target", "**/*.log", "node_modules/"]);
        assert!(!filter.keeps("target"));
        assert!(!filter.keeps("target/debug/x"));
        assert!(!filter.keeps("a/b/c.log"));
        assert!(!filter.keeps("c.log"));
        assert!(!filter.keeps("node_modules/x/y.js"));
        assert!(filter.keeps("src/main.rs"));
        assert!(filter.keeps("targets"));
        assert!(!filter.enters("target"));
        assert!(filter.enters("src"));
    }

    #[test]
    fn includes_and_negation() {
        let filter = f(&["src", "*.toml"], &[]);
        assert!(filter.keeps("src/a/b.rs"));
        assert!(filter.keeps("Cargo.toml"));
        assert!(!filter.keeps("README.md"));
        assert!(filter.enters("docs"), "includes never prune the walk");

        let filter = f(&[], &["*.md", "!KEEP.md"]);
        assert!(!filter.keeps("README.md"));
        assert!(filter.keeps("KEEP.md"));
        let filter = f(&[], &["docs", "!docs/keep"]);
        assert!(!filter.keeps("docs/x"));
        assert!(filter.keeps("docs/keep/y"));
        assert!(filter.enters("docs"), "a negation may re-include below");
    }
}
