//! Config errors that tell the operator exactly where to look.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file: which file, which line, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{line}: {}: {}",
                self.file.display(),
                self.key,
                self.message
            ),
            None => write!(f, "{}: {}: {}", self.file.display(), self.key, self.message),
        }
    }
}

/// Every problem found in one load; `check` prints them all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors against one source text, turning byte spans into lines.
pub struct ErrorSink<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> ErrorSink<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        ErrorSink {
            file,
            text,
            errors: Vec::new(),
        }
    }

    pub fn at(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let error = self.error_at(span, key, message);
        self.errors.push(error);
    }

    /// An error located like `at`, kept out of this sink's list.
    pub fn error_at(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error found in another file (a policy file).
    pub fn push(&mut self, error: ConfigError) {
        self.errors.push(error);
    }

    pub fn without_line(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: None,
            key: key.into(),
            message: message.into(),
        });
    }

    /// A TOML syntax or schema error, located by its span; the key is
    /// recovered from the surrounding text because the parser reports only
    /// a message and a span.
    fn toml_error(&mut self, err: &toml::de::Error) {
        let message = without_offending_value(err.message().trim());
        match err.span() {
            Some(span) => {
                let key = key_at(self.text, span.clone());
                self.at(span, key, message);
            }
            None => self.without_line("(file)", message),
        }
    }

    /// Reports `first`, a schema error (a wrong type, an unknown key) in
    /// `text`, and every further one: serde stops at the first, so each is
    /// taken out of the text (its line blanked, offsets kept) and the text
    /// parsed again as `T`. Stops at a syntax error, at a missing field
    /// (which a blanked line may have caused), or after `MAX_REPORTED`.
    pub fn schema_errors<T: serde::de::DeserializeOwned>(&mut self, first: &toml::de::Error) {
        const MAX_REPORTED: usize = 50;
        self.toml_error(first);
        if self.text.parse::<toml::Table>().is_err() {
            return;
        }
        let mut text = self.text.to_string();
        let mut error = first.clone();
        for _ in 1..MAX_REPORTED {
            let Some(span) = error.span() else { return };
            blank_entry(&mut text, span.start);
            if text.parse::<toml::Table>().is_err() {
                return;
            }
            match toml::from_str::<T>(&text) {
                Ok(_) => return,
                Err(next) if next.message().starts_with("missing field") => return,
                Err(next) => {
                    self.toml_error(&next);
                    error = next;
                }
            }
        }
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.into_errors())
        }
    }

    pub fn into_errors(self) -> ConfigErrors {
        ConfigErrors(self.errors)
    }
}

/// serde quotes the value it rejects ("invalid type: integer `98765432`,
/// expected a string"). In a credential that value may be the secret itself
/// (an unquoted numeric key), and these messages reach stderr and, on
/// reload, the audit trail; only the value's kind is kept.
fn without_offending_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        // The expected part comes from the schema, never from the value, so
        // the last ", expected " is the true boundary.
        let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        else {
            continue;
        };
        let kind = found.split(['`', '"']).next().unwrap_or_default().trim();
        return format!("{prefix}{kind}, expected {expected}");
    }
    message.to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key a span belongs to: the enclosing `[table]` header plus the
/// key on the span's line (or the spanned text itself when it is a key).
/// Blanks the line at `at` with spaces; a table header is blanked with
/// every line up to the next header, so its keys do not fall into the
/// table before it.
fn blank_entry(text: &mut String, at: usize) {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let mut end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    if text[start..end].trim_start().starts_with('[') {
        while end < text.len() {
            let next_start = end + 1;
            let next_end = text[next_start..]
                .find('\n')
                .map_or(text.len(), |i| next_start + i);
            if text[next_start..next_end].trim_start().starts_with('[') {
                break;
            }
            end = next_end;
        }
    }
    // Byte for byte, so every later span still points where it did.
    let blanked: String = text[start..end]
        .chars()
        .flat_map(|c| {
            let width = if c == '\n' { 0 } else { c.len_utf8() };
            std::iter::repeat_n(' ', width).chain((c == '\n').then_some('\n'))
        })
        .collect();
    text.replace_range(start..end, &blanked);
}

fn key_at(text: &str, span: Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[line_start..line_end];

    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());

    let header_line = line.trim_start().starts_with('[');
    let local = if header_line {
        None
    } else {
        let in_line = start - line_start;
        match line.find('=') {
            Some(eq) if eq < in_line => Some(line[..eq].trim().to_string()),
            // The span starts at a key: take the whole key, which the span
            // may cover only in part.
            _ => Some(
                line[in_line..]
                    .split(['=', ' ', '\t'])
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string(),
            )
            .filter(|s| !s.is_empty()),
        }
    };
    let table = if header_line {
        Some(
            line.trim()
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        )
    } else {
        table
    };
    match (table, local) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (Some(t), None) => t,
        (None, Some(k)) => k,
        (None, None) => "(file)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_of_a_value_is_table_plus_key() {
        let text = "[proxy]\nthreads = \"two\"\n";
        let at = text.find("\"two\"").unwrap();
        assert_eq!(key_at(text, at..at + 5), "proxy.threads");
        assert_eq!(line_of(text, at), 2);
    }

    #[test]
    fn key_of_an_unknown_key_is_the_key_itself() {
        let text = "[datasources.a]\nurl = \"http://x\"\nlisten = 3\n";
        let at = text.find("listen").unwrap();
        assert_eq!(key_at(text, at..at + 6), "datasources.a.listen");
        assert_eq!(
            key_at(text, at..at + 1),
            "datasources.a.listen",
            "a span covering part of the key"
        );
    }

    #[test]
    fn a_rejected_value_is_named_by_its_kind_only() {
        for (message, kept) in [
            (
                "invalid type: integer `98765432`, expected a string",
                "invalid type: integer, expected a string",
            ),
            (
                "invalid type: floating point `1.5`, expected a string",
                "invalid type: floating point, expected a string",
            ),
            (
                "invalid value: string \"s3cret, expected x\", expected a port",
                "invalid value: string, expected a port",
            ),
            ("unknown field `extra`", "unknown field `extra`"),
        ] {
            assert_eq!(without_offending_value(message), kept);
        }
    }

    #[test]
    fn an_unquoted_numeric_secret_is_not_repeated_in_the_error() {
        let text = "[datasources.pay]\nurl = \"https://example.com\"\n\
                    credential = { kind = \"bearer\", token = 98765432 }\n";
        let errors = crate::config::parse(std::path::Path::new("s.toml"), text)
            .err()
            .expect("a number is not a sealed value")
            .to_string();
        assert!(errors.contains("s.toml:3"), "{errors}");
        assert!(errors.contains("invalid type: integer"), "{errors}");
        assert!(!errors.contains("98765432"), "{errors}");
    }
}
