//! The GraphQL subset the Dagger SDKs send: one anonymous `query` (or a bare selection set)
//! of fields with literal arguments, aliases and inline fragments (`... on Container`).
//!
//! Literals: strings with JSON-style escapes (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`,
//! `\t`, `\uXXXX` with surrogate pairs), integers, floats, booleans, `null`, enum values
//! (bare words), lists and input objects. Variables, directives, named fragments, block
//! strings and mutations are refused with a message that says so: the fake never guesses.

use std::fmt;

/// A parsed argument value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    /// An enum value such as `ANY`.
    Enum(String),
    List(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// What kind of literal this is, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Null => "null",
            Value::Enum(_) => "an enum value",
            Value::List(_) => "a list",
            Value::Object(_) => "an input object",
        }
    }
}

/// One entry of a selection set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Selection {
    Field(Field),
    /// `... on Type { … }`.
    Fragment {
        on: String,
        selections: Vec<Selection>,
    },
}

/// A field with its arguments and sub-selections.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Field {
    pub(crate) alias: Option<String>,
    pub(crate) name: String,
    pub(crate) args: Vec<(String, Value)>,
    pub(crate) selections: Vec<Selection>,
}

impl Field {
    /// The key of this field in the response.
    pub(crate) fn response_key(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.name)
    }

    /// The argument `name`, if given (and not `null`).
    pub(crate) fn arg(&self, name: &str) -> Option<&Value> {
        self.args
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .filter(|v| **v != Value::Null)
    }
}

/// Why a query cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub(crate) offset: usize,
    pub(crate) message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fake engine: cannot parse the query at byte {}: {}",
            self.offset, self.message
        )
    }
}

/// Parses a whole document into its top-level selections.
pub(crate) fn parse(text: &str) -> Result<Vec<Selection>, ParseError> {
    let mut p = Parser { s: text, pos: 0 };
    p.skip_ignored();
    if p.peek() != Some('{') {
        let word = p.name()?;
        match word.as_str() {
            "query" => {}
            "mutation" | "subscription" => return Err(p.error(format!("{word} is not supported"))),
            "fragment" => return Err(p.error("named fragments are not supported")),
            _ => return Err(p.error(format!("expected `query` or `{{`, found `{word}`"))),
        }
        p.skip_ignored();
        if p.peek().is_some_and(is_name_start) {
            p.name()?;
            p.skip_ignored();
        }
        if p.peek() == Some('(') {
            return Err(p.error("query variables are not supported"));
        }
    }
    let selections = p.selection_set()?;
    p.skip_ignored();
    if p.pos != p.s.len() {
        return Err(p.error("unexpected text after the query"));
    }
    Ok(selections)
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

fn is_name_start(c: char) -> bool {
    c == '_' || c.is_ascii_alphabetic()
}

fn is_name_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            offset: self.pos,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Skips white space, commas and comments (GraphQL's ignored tokens).
    fn skip_ignored(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while let Some(c) = self.bump() {
                    if c == '\n' {
                        break;
                    }
                }
            } else if c.is_whitespace() || c == ',' || c == '\u{feff}' {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn expect(&mut self, want: char) -> Result<(), ParseError> {
        self.skip_ignored();
        match self.peek() {
            Some(c) if c == want => {
                self.bump();
                Ok(())
            }
            Some(c) => Err(self.error(format!("expected `{want}`, found `{c}`"))),
            None => Err(self.error(format!("expected `{want}`, found the end"))),
        }
    }

    fn name(&mut self) -> Result<String, ParseError> {
        self.skip_ignored();
        let start = self.pos;
        match self.peek() {
            Some(c) if is_name_start(c) => {}
            Some(c) => return Err(self.error(format!("expected a name, found `{c}`"))),
            None => return Err(self.error("expected a name, found the end")),
        }
        while self.peek().is_some_and(is_name_char) {
            self.bump();
        }
        Ok(self.s[start..self.pos].to_string())
    }

    fn selection_set(&mut self) -> Result<Vec<Selection>, ParseError> {
        self.expect('{')?;
        let mut out = Vec::new();
        loop {
            self.skip_ignored();
            match self.peek() {
                Some('}') => {
                    self.bump();
                    break;
                }
                None => return Err(self.error("unterminated selection set")),
                _ => out.push(self.selection()?),
            }
        }
        if out.is_empty() {
            return Err(self.error("empty selection set"));
        }
        Ok(out)
    }

    fn selection(&mut self) -> Result<Selection, ParseError> {
        self.skip_ignored();
        if self.s[self.pos..].starts_with("...") {
            self.pos += 3;
            let on = self.name()?;
            if on != "on" {
                return Err(self.error("named fragment spreads are not supported"));
            }
            let on = self.name()?;
            let selections = self.selection_set()?;
            return Ok(Selection::Fragment { on, selections });
        }
        let first = self.name()?;
        self.skip_ignored();
        let (alias, name) = if self.peek() == Some(':') {
            self.bump();
            (Some(first), self.name()?)
        } else {
            (None, first)
        };
        self.skip_ignored();
        let mut args = Vec::new();
        if self.peek() == Some('(') {
            self.bump();
            loop {
                self.skip_ignored();
                if self.peek() == Some(')') {
                    self.bump();
                    break;
                }
                let arg = self.name()?;
                self.expect(':')?;
                let value = self.value()?;
                if args.iter().any(|(k, _)| *k == arg) {
                    return Err(self.error(format!("argument `{arg}` given twice")));
                }
                args.push((arg, value));
            }
        }
        self.skip_ignored();
        if self.peek() == Some('@') {
            return Err(self.error("directives are not supported"));
        }
        let selections = if self.peek() == Some('{') {
            self.selection_set()?
        } else {
            Vec::new()
        };
        Ok(Selection::Field(Field {
            alias,
            name,
            args,
            selections,
        }))
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        self.skip_ignored();
        match self.peek() {
            Some('"') => {
                if self.s[self.pos..].starts_with("\"\"\"") {
                    return Err(self.error("block strings are not supported"));
                }
                self.string().map(Value::Str)
            }
            Some('[') => {
                self.bump();
                let mut items = Vec::new();
                loop {
                    self.skip_ignored();
                    if self.peek() == Some(']') {
                        self.bump();
                        return Ok(Value::List(items));
                    }
                    if self.peek().is_none() {
                        return Err(self.error("unterminated list"));
                    }
                    items.push(self.value()?);
                }
            }
            Some('{') => {
                self.bump();
                let mut fields = Vec::new();
                loop {
                    self.skip_ignored();
                    if self.peek() == Some('}') {
                        self.bump();
                        return Ok(Value::Object(fields));
                    }
                    let key = self.name()?;
                    self.expect(':')?;
                    fields.push((key, self.value()?));
                }
            }
            Some('$') => Err(self.error("query variables are not supported")),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(),
            Some(c) if is_name_start(c) => {
                let word = self.name()?;
                Ok(match word.as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    "null" => Value::Null,
                    _ => Value::Enum(word),
                })
            }
            Some(c) => Err(self.error(format!("expected a value, found `{c}`"))),
            None => Err(self.error("expected a value, found the end")),
        }
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        let mut float = false;
        while let Some(c) = self.peek() {
            match c {
                '0'..='9' | '-' | '+' => {}
                '.' | 'e' | 'E' => float = true,
                _ => break,
            }
            self.bump();
        }
        let text = &self.s[start..self.pos];
        if float {
            text.parse()
                .map(Value::Float)
                .map_err(|_| self.error(format!("bad number `{text}`")))
        } else {
            text.parse()
                .map(Value::Int)
                .map_err(|_| self.error(format!("bad integer `{text}`")))
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.bump(); // the opening quote
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return Err(self.error("unterminated string")),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('/') => out.push('/'),
                    Some('b') => out.push('\u{8}'),
                    Some('f') => out.push('\u{c}'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        let unit = self.hex4()?;
                        let c = if (0xD800..0xDC00).contains(&unit) {
                            if !self.s[self.pos..].starts_with("\\u") {
                                return Err(self.error("lone high surrogate in a string"));
                            }
                            self.pos += 2;
                            let low = self.hex4()?;
                            if !(0xDC00..0xE000).contains(&low) {
                                return Err(self.error("bad surrogate pair in a string"));
                            }
                            char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                        } else {
                            char::from_u32(unit)
                        };
                        out.push(c.ok_or_else(|| self.error("bad \\u escape"))?);
                    }
                    Some(c) => return Err(self.error(format!("unknown escape `\\{c}`"))),
                    None => return Err(self.error("unterminated string")),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let digits = self
            .s
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.error("short \\u escape"))?;
        let unit =
            u32::from_str_radix(digits, 16).map_err(|_| self.error("bad \\u escape digits"))?;
        self.pos += 4;
        Ok(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(text: &str) -> Vec<Field> {
        let mut out = Vec::new();
        let mut sels = parse(text).unwrap();
        loop {
            let Some(first) = sels.into_iter().next() else {
                return out;
            };
            match first {
                Selection::Field(f) => {
                    sels = f.selections.clone();
                    out.push(f);
                }
                Selection::Fragment { selections, .. } => sels = selections,
            }
        }
    }

    #[test]
    fn parses_the_sdk_chain() {
        let q = r#"query{container{from(address:"alpine"){withExec(args:["sh","-c","x"], expect:ANY){sync}}}}"#;
        let fields = chain(q);
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["container", "from", "withExec", "sync"]);
        assert_eq!(fields[1].arg("address"), Some(&Value::Str("alpine".into())));
        assert_eq!(
            fields[2].arg("args"),
            Some(&Value::List(vec![
                Value::Str("sh".into()),
                Value::Str("-c".into()),
                Value::Str("x".into())
            ]))
        );
        assert_eq!(fields[2].arg("expect"), Some(&Value::Enum("ANY".into())));
    }

    #[test]
    fn parses_fragments_aliases_and_literals() {
        let q = r#"query Q { a: node(id: "x") { ... on Container { exitCode } } b(n: -3, f: 1.5, t: true, z: null, o: {k: "v", l: [1, 2]}) }"#;
        let sels = parse(q).unwrap();
        assert_eq!(sels.len(), 2);
        let Selection::Field(a) = &sels[0] else {
            panic!()
        };
        assert_eq!(a.response_key(), "a");
        assert_eq!(a.name, "node");
        assert!(matches!(&a.selections[0], Selection::Fragment { on, .. } if on == "Container"));
        let Selection::Field(b) = &sels[1] else {
            panic!()
        };
        assert_eq!(b.arg("n"), Some(&Value::Int(-3)));
        assert_eq!(b.arg("f"), Some(&Value::Float(1.5)));
        assert_eq!(b.arg("t"), Some(&Value::Bool(true)));
        assert_eq!(b.arg("z"), None, "null reads as absent");
        assert_eq!(
            b.arg("o"),
            Some(&Value::Object(vec![
                ("k".into(), Value::Str("v".into())),
                ("l".into(), Value::List(vec![Value::Int(1), Value::Int(2)]))
            ]))
        );
        assert_eq!(parse("{version}").unwrap().len(), 1);
    }

    #[test]
    fn string_escapes_round_trip_what_the_sdk_writes() {
        let q = r#"{f(s:"a\"b\\c\/d\n\t\u0001\u00e9\ud83d\ude00")}"#;
        let fields = chain(q);
        assert_eq!(
            fields[0].arg("s"),
            Some(&Value::Str("a\"b\\c/d\n\t\u{1}é😀".into()))
        );
        // What serde_json writes for any string is read back unchanged.
        for s in [
            "plain",
            "quote\" back\\slash",
            "ctl\u{7}\u{1f}",
            "uni ü ✓ 🎉",
            "",
        ] {
            let q = format!("{{f(s:{})}}", serde_json::to_string(s).unwrap());
            assert_eq!(chain(&q)[0].arg("s"), Some(&Value::Str(s.into())), "{q}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_model() {
        for (q, want) in [
            ("mutation{a}", "mutation is not supported"),
            ("query($x: String){a(b:$x)}", "variables"),
            ("{a(b:$x)}", "variables"),
            ("{a @skip(if: true)}", "directives"),
            ("{...F}", "named fragment"),
            (r#"{a(b:"""x""")}"#, "block strings"),
            (r#"{a(b:"x)}"#, "unterminated string"),
            ("{a{b}", "unterminated selection set"),
            ("{a} x", "unexpected text"),
            ("{}", "empty selection set"),
            (r#"{a(b:"\q")}"#, "unknown escape"),
            ("{a(b:1,b:2)}", "given twice"),
        ] {
            let err = parse(q).unwrap_err();
            assert!(err.message.contains(want), "{q}: {err}");
        }
    }
}
