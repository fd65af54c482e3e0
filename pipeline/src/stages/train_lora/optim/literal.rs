//! `--optimizer_args key=value`: each value a Python literal, as sd-scripts reads it with
//! `ast.literal_eval` (`True`, `None`, `0.9`, `1e-3`, `"text"`, `(0.9, 0.99)`, `[1, 2]`, and a
//! bare `0.9,0.99`, which Python reads as a tuple).

use std::fmt;

/// A Python literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float (`1.0`, `1e-3`, `.5`).
    Float(f64),
    /// A quoted string.
    Str(String),
    /// `(a, b)` or `a, b`.
    Tuple(Vec<Literal>),
    /// `[a, b]`.
    List(Vec<Literal>),
}

impl Literal {
    /// Parses one value as `ast.literal_eval` does (the subset above); `Err` says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parser = Parser {
            chars: text.chars().collect(),
            at: 0,
        };
        let value = parser.sequence(None)?;
        parser.skip_space();
        if parser.at < parser.chars.len() {
            return Err(format!(
                "unexpected {:?} at character {}",
                parser.chars[parser.at],
                parser.at + 1
            ));
        }
        Ok(value)
    }

    /// The number, for an int or a float (bools count as 0 and 1, as in Python).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Literal::Int(i) => Some(*i as f64),
            Literal::Float(f) => Some(*f),
            Literal::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    /// The elements of a tuple or a list.
    pub fn as_sequence(&self) -> Option<&[Literal]> {
        match self {
            Literal::Tuple(items) | Literal::List(items) => Some(items),
            _ => None,
        }
    }

    /// Python's truth value.
    pub fn truthy(&self) -> bool {
        match self {
            Literal::None => false,
            Literal::Bool(b) => *b,
            Literal::Int(i) => *i != 0,
            Literal::Float(f) => *f != 0.0,
            Literal::Str(s) => !s.is_empty(),
            Literal::Tuple(items) | Literal::List(items) => !items.is_empty(),
        }
    }
}

/// Python's `str()` of the value (how sd-scripts writes `--optimizer_args` into `ss_optimizer`).
impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl Literal {
    /// `str()` at the top level; inside containers Python uses `repr()` (strings quoted).
    fn write(&self, f: &mut fmt::Formatter<'_>, nested: bool) -> fmt::Result {
        match self {
            Literal::None => f.write_str("None"),
            Literal::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Float(x) => f.write_str(&crate::infra::pyjson::float_repr(*x)),
            Literal::Str(s) if nested => {
                write!(f, "'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
            }
            Literal::Str(s) => f.write_str(s),
            Literal::Tuple(items) | Literal::List(items) => {
                let (open, close) = match self {
                    Literal::List(_) => ("[", "]"),
                    _ => ("(", ")"),
                };
                f.write_str(open)?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    item.write(f, true)?;
                }
                if matches!(self, Literal::Tuple(_)) && items.len() == 1 {
                    f.write_str(",")?;
                }
                f.write_str(close)
            }
        }
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|c| c == ' ' || c == '\t') {
            self.at += 1;
        }
    }

    /// Comma-separated items up to `close` (or the end): one item without a comma is itself,
    /// otherwise a tuple (a list inside `[...]`).
    fn sequence(&mut self, close: Option<char>) -> Result<Literal, String> {
        let mut items = Vec::new();
        let mut trailing_comma = false;
        loop {
            self.skip_space();
            if self.peek() == close {
                break;
            }
            items.push(self.atom()?);
            self.skip_space();
            if self.peek() == Some(',') {
                self.at += 1;
                trailing_comma = true;
            } else {
                trailing_comma = false;
                break;
            }
        }
        self.skip_space();
        if self.peek() != close {
            return Err(match close {
                Some(c) => format!("expected {c:?}"),
                None => format!("unexpected {:?}", self.peek().unwrap_or(' ')),
            });
        }
        if close.is_some() {
            self.at += 1;
        }
        Ok(match (close, items.len(), trailing_comma) {
            (Some(']'), _, _) => Literal::List(items),
            (_, 1, false) => items.pop().expect("one item"),
            (None, 0, _) => return Err("empty value".into()),
            _ => Literal::Tuple(items),
        })
    }

    fn atom(&mut self) -> Result<Literal, String> {
        self.skip_space();
        match self.peek() {
            None => Err("missing value".into()),
            Some('(') => {
                self.at += 1;
                self.sequence(Some(')'))
            }
            Some('[') => {
                self.at += 1;
                self.sequence(Some(']'))
            }
            Some(quote @ ('\'' | '"')) => self.string(quote),
            Some(c) if c.is_ascii_digit() || matches!(c, '.' | '+' | '-') => self.number(),
            Some(c) if c.is_alphabetic() || c == '_' => {
                let start = self.at;
                while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    self.at += 1;
                }
                let word: String = self.chars[start..self.at].iter().collect();
                match word.as_str() {
                    "True" => Ok(Literal::Bool(true)),
                    "False" => Ok(Literal::Bool(false)),
                    "None" => Ok(Literal::None),
                    other => Err(format!(
                        "{other} is not a Python literal (quote text: \"{other}\"; booleans are \
                         True and False)"
                    )),
                }
            }
            Some(c) => Err(format!("unexpected {c:?}")),
        }
    }

    fn string(&mut self, quote: char) -> Result<Literal, String> {
        self.at += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => return Err("unterminated string".into()),
                Some(c) if c == quote => {
                    self.at += 1;
                    return Ok(Literal::Str(text));
                }
                Some('\\') => {
                    self.at += 1;
                    let escaped = self.peek().ok_or("unterminated string")?;
                    text.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                    self.at += 1;
                }
                Some(c) => {
                    text.push(c);
                    self.at += 1;
                }
            }
        }
    }

    fn number(&mut self) -> Result<Literal, String> {
        let mut negative = false;
        while let Some(sign @ ('+' | '-')) = self.peek() {
            negative ^= sign == '-';
            self.at += 1;
            self.skip_space();
        }
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'))
            || (self.at > start
                && matches!(self.peek(), Some('+' | '-'))
                && matches!(self.chars[self.at - 1], 'e' | 'E'))
        {
            self.at += 1;
        }
        let token: String = self.chars[start..self.at]
            .iter()
            .filter(|c| **c != '_')
            .collect();
        let sign = if negative { -1.0 } else { 1.0 };
        let is_float = token.contains(['.', 'e', 'E']);
        if !is_float {
            if let Ok(int) = token.parse::<i64>() {
                return Ok(Literal::Int(if negative { -int } else { int }));
            }
        }
        let valid = token.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && !token.contains(|c: char| c.is_alphabetic() && !matches!(c, 'e' | 'E'));
        match token.parse::<f64>() {
            Ok(value) if valid => Ok(Literal::Float(sign * value)),
            _ => Err(format!("{token} is not a number")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Literal::{self, *};

    #[test]
    fn python_literals_parse_as_ast_literal_eval_reads_them() {
        let cases: Vec<(&str, Literal)> = vec![
            ("True", Bool(true)),
            ("False", Bool(false)),
            ("None", None),
            ("3", Int(3)),
            ("-2", Int(-2)),
            ("1_000", Int(1000)),
            ("0.01", Float(0.01)),
            ("1e-3", Float(1e-3)),
            ("-1E+2", Float(-100.0)),
            (".5", Float(0.5)),
            ("2.", Float(2.0)),
            (" 0.1", Float(0.1)),
            ("'text'", Str("text".into())),
            ("\"a b\"", Str("a b".into())),
            ("(0.9,0.99)", Tuple(vec![Float(0.9), Float(0.99)])),
            ("0.9,0.99", Tuple(vec![Float(0.9), Float(0.99)])),
            ("(0.9, 0.99, )", Tuple(vec![Float(0.9), Float(0.99)])),
            ("(1,)", Tuple(vec![Int(1)])),
            ("(1)", Int(1)),
            ("[1, 2.5]", List(vec![Int(1), Float(2.5)])),
            ("()", Tuple(vec![])),
            (
                "(True, None, 'x')",
                Tuple(vec![Bool(true), None, Str("x".into())]),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Literal::parse(text), Ok(expected), "{text}");
        }
        for bad in ["", "true", "adam", "1.2.3", "(1, 2", "1 2", "0x", "'open"] {
            assert!(Literal::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn values_print_as_python_str_prints_them() {
        let cases = [
            ("(0.9,0.99)", "(0.9, 0.99)"),
            ("True", "True"),
            ("1e-8", "1e-08"),
            ("0.0001", "0.0001"),
            ("2", "2"),
            ("'x'", "x"),
            ("['a', 1]", "['a', 1]"),
            ("(1,)", "(1,)"),
        ];
        for (text, shown) in cases {
            assert_eq!(Literal::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }
}
