//! Statement text for the audit trail with every literal taken out: what a
//! statement did is recorded, never the values it carried. A lexer (not a
//! pattern match) walks the text the way the server's would, so a quote
//! inside a comment, a dollar-quoted body or a quoted identifier cannot
//! make a literal look like code. Anything it cannot finish (text cut at
//! the capture limit, an unterminated string) becomes one placeholder: a
//! literal never leaks because the text was odd.

use sha2::{Digest, Sha256};

/// The SQL dialect whose quoting rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Standard and `E''` strings, dollar quoting, `"identifiers"`,
    /// nested `/* */` comments; placeholders are `$n`.
    Postgres,
    /// `'` and `"` strings with backslash escapes, `` `identifiers` ``,
    /// `#` and `-- ` comments, `/*! */` comments whose content runs (so it
    /// is lexed as SQL); placeholders are `?`.
    Mysql,
}

/// A statement with its literals replaced, and the fingerprint of that
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub text: String,
    /// 16 hex digits of SHA-256 of `text`: the same statement shape gives
    /// the same fingerprint, whatever its values.
    pub fingerprint: String,
}

/// The longest normalised text kept; past it the text is cut (a cut never
/// falls inside a literal: literals are already placeholders).
const MAX_NORMALIZED: usize = 4096;

pub fn normalize(sql: &str, dialect: Dialect) -> Normalized {
    let text = Lexer::new(sql, dialect).run();
    let digest = Sha256::digest(text.as_bytes());
    let fingerprint = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Normalized { text, fingerprint }
}

struct Lexer<'a> {
    dialect: Dialect,
    /// Inside a MySQL `/*! ... */`: its `*/` ends it.
    in_executed_comment: bool,
    src: &'a [u8],
    at: usize,
    out: String,
    /// The next placeholder number: after any `$n` the text already has.
    next: usize,
    /// A space is owed before the next token.
    space: bool,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str, dialect: Dialect) -> Self {
        let src = sql.as_bytes();
        Lexer {
            dialect,
            in_executed_comment: false,
            src,
            at: 0,
            out: String::with_capacity(sql.len().min(MAX_NORMALIZED)),
            next: match dialect {
                Dialect::Postgres => highest_parameter(src) + 1,
                Dialect::Mysql => 1,
            },
            space: false,
        }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.src.get(self.at + ahead).copied()
    }

    fn emit(&mut self, token: &str) {
        if self.space && !self.out.is_empty() {
            self.out.push(' ');
        }
        self.space = false;
        self.out.push_str(token);
    }

    fn placeholder(&mut self) {
        match self.dialect {
            Dialect::Postgres => {
                let n = self.next;
                self.next += 1;
                self.emit(&format!("${n}"));
            }
            Dialect::Mysql => self.emit("?"),
        }
    }

    fn mysql(&self) -> bool {
        self.dialect == Dialect::Mysql
    }

    /// MySQL's `--` starts a comment only when a space or control
    /// character follows it.
    fn line_comment_at(&self) -> bool {
        match (self.peek(0), self.peek(1)) {
            (Some(b'-'), Some(b'-')) => !self.mysql() || self.peek(2).is_none_or(|c| c <= b' '),
            (Some(b'#'), _) => self.mysql(),
            _ => false,
        }
    }

    fn run(mut self) -> String {
        while let Some(c) = self.peek(0) {
            if self.out.len() >= MAX_NORMALIZED {
                break;
            }
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                    self.at += 1;
                    self.space = true;
                }
                b'-' | b'#' if self.line_comment_at() => {
                    while self.peek(0).is_some_and(|c| c != b'\n') {
                        self.at += 1;
                    }
                    self.space = true;
                }
                b'/' if self.peek(1) == Some(b'*')
                    && self.mysql()
                    && self.peek(2) == Some(b'!') =>
                {
                    self.at += 3;
                    while self.peek(0).is_some_and(|d| d.is_ascii_digit()) {
                        self.at += 1;
                    }
                    self.in_executed_comment = true;
                    self.space = true;
                }
                b'*' if self.in_executed_comment && self.peek(1) == Some(b'/') => {
                    self.at += 2;
                    self.in_executed_comment = false;
                    self.space = true;
                }
                b'/' if self.peek(1) == Some(b'*') => {
                    self.block_comment();
                    self.space = true;
                }
                b'\'' | b'"' if self.mysql() => {
                    self.quoted(c, true);
                    self.placeholder();
                }
                b'`' if self.mysql() => {
                    let start = self.at;
                    self.quoted(b'`', false);
                    let ident = String::from_utf8_lossy(&self.src[start..self.at]).into_owned();
                    self.emit(&ident);
                }
                b'\'' => {
                    self.quoted(b'\'', false);
                    self.placeholder();
                }
                b'"' => {
                    let start = self.at;
                    self.quoted(b'"', false);
                    let ident = String::from_utf8_lossy(&self.src[start..self.at]).into_owned();
                    self.emit(&ident);
                }
                b'$' if !self.mysql() && self.peek(1).is_some_and(|d| d.is_ascii_digit()) => {
                    let start = self.at;
                    self.at += 1;
                    while self.peek(0).is_some_and(|d| d.is_ascii_digit()) {
                        self.at += 1;
                    }
                    let param = String::from_utf8_lossy(&self.src[start..self.at]).into_owned();
                    self.emit(&param);
                }
                b'$' if !self.mysql() => match self.dollar_tag() {
                    Some(tag) => {
                        self.at += tag.len();
                        self.dollar_body(&tag);
                        self.placeholder();
                    }
                    None => {
                        self.at += 1;
                        self.emit("$");
                    }
                },
                c if c.is_ascii_digit()
                    || (c == b'.' && self.peek(1).is_some_and(|d| d.is_ascii_digit())) =>
                {
                    self.number();
                    self.placeholder();
                }
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => self.word(),
                _ => {
                    let start = self.at;
                    self.at += utf8_len(c);
                    let op = String::from_utf8_lossy(&self.src[start..self.at.min(self.src.len())])
                        .into_owned();
                    self.emit(&op);
                }
            }
        }
        self.out
    }

    /// Skips a quoted run starting at the opening quote; a doubled quote
    /// is part of it, and with `backslashes` so is a `\`-escaped one.
    fn quoted(&mut self, quote: u8, backslashes: bool) {
        self.at += 1;
        while let Some(c) = self.peek(0) {
            self.at += 1;
            if backslashes && c == b'\\' {
                self.at += 1;
            } else if c == quote {
                if self.peek(0) == Some(quote) {
                    self.at += 1;
                } else {
                    return;
                }
            }
        }
        self.at = self.src.len();
    }

    /// PostgreSQL block comments nest; MySQL's do not.
    fn block_comment(&mut self) {
        let mut depth = 0usize;
        while self.at < self.src.len() {
            if self.peek(0) == Some(b'/')
                && self.peek(1) == Some(b'*')
                && (depth == 0 || !self.mysql())
            {
                depth += 1;
                self.at += 2;
            } else if self.peek(0) == Some(b'*') && self.peek(1) == Some(b'/') {
                depth -= 1;
                self.at += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.at += 1;
            }
        }
    }

    /// `$tag$` (or `$$`) at the cursor: the tag with both dollars.
    fn dollar_tag(&self) -> Option<Vec<u8>> {
        let rest = &self.src[self.at + 1..];
        let end = rest
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))?;
        if rest.get(end) != Some(&b'$') || rest.first().is_some_and(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(self.src[self.at..self.at + end + 2].to_vec())
    }

    fn dollar_body(&mut self, tag: &[u8]) {
        match self.src[self.at..]
            .windows(tag.len())
            .position(|w| w == tag)
        {
            Some(end) => self.at += end + tag.len(),
            None => self.at = self.src.len(),
        }
    }

    fn number(&mut self) {
        if self.peek(0) == Some(b'0')
            && matches!(self.peek(1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B'))
        {
            self.at += 2;
        }
        while let Some(c) = self.peek(0) {
            let exponent_sign =
                matches!(c, b'+' | b'-') && matches!(self.src.get(self.at - 1), Some(b'e' | b'E'));
            if c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || exponent_sign {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn word(&mut self) {
        let start = self.at;
        while let Some(c) = self.peek(0) {
            if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                self.at += 1;
            } else {
                break;
            }
        }
        let word = &self.src[start..self.at];
        // A one-letter prefix glued to a string makes a string: E'..' (with
        // backslash escapes), B'..', X'..', N'..'; U&'..' likewise.
        if self.peek(0) == Some(b'\'') && word.len() == 1 {
            let backslashes = self.mysql() || word.eq_ignore_ascii_case(b"e");
            if matches!(word[0].to_ascii_lowercase(), b'e' | b'b' | b'x' | b'n') {
                self.quoted(b'\'', backslashes);
                self.placeholder();
                return;
            }
        }
        if word.eq_ignore_ascii_case(b"u")
            && self.peek(0) == Some(b'&')
            && self.peek(1) == Some(b'\'')
        {
            self.at += 1;
            self.quoted(b'\'', false);
            self.placeholder();
            return;
        }
        if word.eq_ignore_ascii_case(b"true") || word.eq_ignore_ascii_case(b"false") {
            self.placeholder();
            return;
        }
        let word = String::from_utf8_lossy(word).into_owned();
        self.emit(&word);
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0.. => 4,
        0xe0.. => 3,
        0xc0.. => 2,
        _ => 1,
    }
}

/// The highest `$n` parameter outside quotes and comments is not worth a
/// second lexer: a `$n` inside a literal only makes the placeholders start
/// higher, which is harmless.
fn highest_parameter(src: &[u8]) -> usize {
    let mut highest = 0;
    let mut i = 0;
    while i < src.len() {
        if src[i] == b'$' {
            let digits = src[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if digits > 0 && digits < 6 {
                let n = std::str::from_utf8(&src[i + 1..i + 1 + digits])
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0);
                highest = highest.max(n);
            }
            i += digits.max(1);
        } else {
            i += 1;
        }
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(sql: &str) -> String {
        normalize(sql, Dialect::Postgres).text
    }

    #[test]
    fn every_kind_of_literal_becomes_a_placeholder() {
        assert_eq!(
            text("SELECT * FROM t WHERE a = 'x''y' AND b = 42 AND c = -1.5e-3 AND d = true"),
            "SELECT * FROM t WHERE a = $1 AND b = $2 AND c = -$3 AND d = $4"
        );
        assert_eq!(
            text("SELECT E'it\\'s', $$body ' here$$, $f$x$f$"),
            "SELECT $1, $2, $3"
        );
        assert_eq!(
            text("SELECT B'101', X'ff', N'n', U&'d\\0061t', 0x1F"),
            "SELECT $1, $2, $3, $4, $5"
        );
    }

    #[test]
    fn identifiers_comments_and_parameters_are_not_literals() {
        assert_eq!(
            text("SELECT \"it's\", col1 /* a 'quoted' /* nested */ comment */ FROM t1 -- 'x'\nWHERE id = $1 AND v = 7"),
            "SELECT \"it's\", col1 FROM t1 WHERE id = $1 AND v = $2"
        );
    }

    #[test]
    fn an_unterminated_literal_swallows_the_rest() {
        assert_eq!(text("SELECT 'secret never closed"), "SELECT $1");
        assert_eq!(text("SELECT $q$ secret"), "SELECT $1");
        assert_eq!(text("SELECT E'sec\\'ret"), "SELECT $1");
    }

    fn mysql(sql: &str) -> String {
        normalize(sql, Dialect::Mysql).text
    }

    #[test]
    fn mysql_quoting_comments_and_literals() {
        assert_eq!(
            mysql("SELECT * FROM `t``x` WHERE a = 'it\\'s' AND b = \"d\"\"q\" AND c = 0x1F AND d = b'01' AND e = X'ff' # 'secret'\n AND f = -- 'secret'\n 12 AND g = ? AND h = TRUE"),
            "SELECT * FROM `t``x` WHERE a = ? AND b = ? AND c = ? AND d = ? AND e = ? AND f = ? AND g = ? AND h = ?"
        );
        assert_eq!(
            mysql("SELECT /*!40000 SQL_NO_CACHE 'x' */ 1"),
            "SELECT SQL_NO_CACHE ? ?"
        );
        assert_eq!(mysql("SELECT /* a /* b */ 'c'"), "SELECT ?");
        assert_eq!(mysql("SELECT 1--1"), "SELECT ?--?");
        assert_eq!(mysql("SELECT 'abc\\' secret"), "SELECT ?");
        assert_eq!(mysql("SELECT _utf8mb4'x', N'y'"), "SELECT _utf8mb4?, ?");
    }

    #[test]
    fn same_shape_same_fingerprint() {
        let a = normalize("select  1 +  'a'", Dialect::Postgres);
        let b = normalize("select 2 + 'bb'", Dialect::Postgres);
        let c = normalize("select 2 - 'bb'", Dialect::Postgres);
        assert_eq!(a, b);
        assert_ne!(a.fingerprint, c.fingerprint);
        assert_eq!(a.fingerprint.len(), 16);
    }

    /// Generated statements: literals in every quoting style each dialect
    /// has, carrying a marker no keyword or identifier contains, between
    /// code, comments and quoted identifiers; the normalised text must
    /// never hold a marker.
    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// What a literal carries: `zq` and six more, so a match in the
        /// output can only be a leak. Payload characters include quotes
        /// of the other kinds and comment openers.
        fn marker() -> impl Strategy<Value = String> {
            "zq[a-z0-9]{6}"
        }

        fn payload() -> impl Strategy<Value = (String, String)> {
            (marker(), "[ a-z0-9;,()*/#`'\"-]{0,8}").prop_map(|(m, tail)| (m.clone(), m + &tail))
        }

        /// One literal in `dialect`, written as the server would accept it.
        fn literal(dialect: Dialect) -> impl Strategy<Value = (String, String)> {
            (payload(), 0..9u8, "[0-9]{7,10}").prop_map(move |((marker, p), style, digits)| {
                let quoted = p.replace('\'', "''");
                let escaped = p.replace('\'', "\\'");
                let text = match (dialect, style) {
                    (_, 0) => format!("'{quoted}'"),
                    (_, 1) => format!("'{marker}''{quoted}'"),
                    (_, 2) => return (digits.clone(), digits),
                    (_, 3) => return (digits.clone(), format!("{digits}.5e-3")),
                    (Dialect::Postgres, 4) => format!("E'{escaped}\\\\{escaped}'"),
                    (Dialect::Postgres, 5) => format!("$${p}$$"),
                    (Dialect::Postgres, 6) => format!("$tag${p}$tag$"),
                    (Dialect::Postgres, 7) => format!("U&'{quoted}'"),
                    (Dialect::Postgres, _) => format!("N'{quoted}'"),
                    (Dialect::Mysql, 4) => format!("'{escaped}\\\\{escaped}'"),
                    (Dialect::Mysql, 5) => format!("\"{}\"", p.replace('"', "\"\"")),
                    (Dialect::Mysql, 6) => format!("_utf8mb4'{quoted}'"),
                    (Dialect::Mysql, 7) => format!("N'{escaped}'"),
                    (Dialect::Mysql, _) => format!("/*!40000 '{escaped}' */"),
                };
                (marker, text)
            })
        }

        /// Code around the literals: none of it is a literal, and some of
        /// it holds quote characters that must not open one.
        fn code(dialect: Dialect) -> impl Strategy<Value = String> {
            let comment_line = match dialect {
                Dialect::Postgres => "-- it's\n",
                Dialect::Mysql => "# it's\n",
            };
            let identifier = match dialect {
                Dialect::Postgres => "\"it's\"",
                Dialect::Mysql => "`it's`",
            };
            prop::sample::select(vec![
                "SELECT",
                "FROM",
                "t",
                "WHERE",
                "c",
                "=",
                "AND",
                "IN",
                "(",
                ")",
                ",",
                "+",
                "/* a 'b' */",
                comment_line,
                identifier,
                "$1",
            ])
            .prop_map(str::to_string)
        }

        fn statement(dialect: Dialect) -> impl Strategy<Value = (Vec<String>, String)> {
            let token = prop_oneof![
                code(dialect).prop_map(|c| (None, c)),
                literal(dialect).prop_map(|(m, l)| (Some(m), l)),
            ];
            (prop::collection::vec(
                (token, prop::sample::select(vec![" ", "\n", "\t", "  "])),
                1..24,
            ))
            .prop_map(|tokens| {
                let mut markers = Vec::new();
                let mut sql = String::new();
                for ((marker, text), space) in tokens {
                    markers.extend(marker);
                    sql.push_str(&text);
                    sql.push_str(space);
                }
                (markers, sql)
            })
        }

        fn no_literal_survives(
            dialect: Dialect,
        ) -> impl Fn((Vec<String>, String)) -> Result<(), TestCaseError> {
            move |(markers, sql)| {
                let out = normalize(&sql, dialect).text;
                for marker in &markers {
                    prop_assert!(
                        !out.contains(marker.as_str()),
                        "{marker} in {out:?} from {sql:?}"
                    );
                }
                Ok(())
            }
        }

        proptest! {
            #[test]
            fn no_postgres_literal_reaches_the_text(case in statement(Dialect::Postgres)) {
                no_literal_survives(Dialect::Postgres)(case)?;
            }

            #[test]
            fn no_mysql_literal_reaches_the_text(case in statement(Dialect::Mysql)) {
                no_literal_survives(Dialect::Mysql)(case)?;
            }

            #[test]
            fn any_text_normalises_within_the_limit(sql in any::<String>(), mysql in any::<bool>()) {
                let dialect = if mysql { Dialect::Mysql } else { Dialect::Postgres };
                let out = normalize(&sql, dialect);
                prop_assert!(out.text.len() <= MAX_NORMALIZED + 16, "{}", out.text.len());
            }
        }
    }
}
