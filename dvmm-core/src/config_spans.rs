//! Where each field of a configuration text is, so that an error found
//! after parsing (a validation rule, a value of the wrong type) can say the
//! line and column as well as the field.
//!
//! A parser reports a position but not the field, and validation knows the
//! field but not the position; this maps one onto the other through the
//! byte span of every value, keyed by its dotted path (`vcenter.url`).

use std::collections::BTreeMap;

use crate::config::TextLocation;

/// The byte span (`start..=end`, end inclusive so that a parser that stops
/// just after a value still lands in it) of every value, by dotted path.
#[derive(Debug, Default)]
pub(crate) struct FieldSpans {
    spans: Vec<(String, usize, usize)>,
}

impl FieldSpans {
    /// The spans of a JSON text's object members, nested objects included.
    /// Empty when the text is not a JSON object.
    pub(crate) fn of_json(text: &str) -> Self {
        let mut spans = Self::default();
        spans.add_json_object(text, text, "");
        spans
    }

    fn add_json_object(&mut self, whole: &str, object: &str, prefix: &str) {
        let Ok(members) =
            serde_json::from_str::<BTreeMap<String, &serde_json::value::RawValue>>(object)
        else {
            return;
        };
        for (key, value) in members {
            let raw = value.get();
            // The raw value borrows from `whole`, so its address gives its
            // offset in the text.
            let start = (raw.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
            if start > whole.len() {
                continue;
            }
            let path = join(prefix, &key);
            self.spans.push((path.clone(), start, start + raw.len()));
            if raw.starts_with('{') {
                self.add_json_object(whole, raw, &path);
            }
        }
    }

    /// The spans of a TOML text's keys, under `[table]` headers and in
    /// inline tables. The scan is exact for well-formed TOML and a best
    /// effort for the rest. (The `toml` crate gives no spans for the tables
    /// that a dotted header such as `[sizes.M]` creates, hence the scan.)
    #[cfg(feature = "toml")]
    pub(crate) fn of_toml(text: &str) -> Self {
        let mut spans = Self::default();
        let bytes = text.as_bytes();
        let mut table = String::new();
        let mut table_start = None;
        let mut i = 0;
        while i < bytes.len() {
            let line_end = text[i..].find('\n').map_or(text.len(), |n| i + n);
            let trimmed = text[i..line_end].trim_start();
            let at = line_end - text[i..line_end].trim_start().len();
            if trimmed.starts_with('[') {
                if let Some(start) = table_start.take() {
                    spans.add_table(&table, start, at);
                }
                let inner = trimmed.trim_start_matches('[');
                let (keys, _) = toml_key(inner);
                table = keys;
                table_start = Some(at);
                i = line_end + 1;
            } else if trimmed.is_empty() || trimmed.starts_with('#') {
                i = line_end + 1;
            } else {
                i = spans.add_toml_member(text, at, &table);
                // A member ends its line (or a multi-line value's last one).
                i = text[i..].find('\n').map_or(text.len(), |n| i + n + 1);
            }
        }
        if let Some(start) = table_start {
            spans.add_table(&table, start, text.len());
        }
        spans
    }

    /// A `[table]` section, and the tables a dotted header implies.
    #[cfg(feature = "toml")]
    fn add_table(&mut self, table: &str, start: usize, end: usize) {
        let mut path = String::new();
        for key in table.split('.') {
            path = join(&path, key);
            if let Some(span) = self.spans.iter_mut().find(|(p, ..)| *p == path) {
                span.2 = span.2.max(end);
            } else {
                self.spans.push((path.clone(), start, end));
            }
        }
    }

    /// Records `key = value` starting at byte `at` (and an inline table's
    /// members); returns the byte just past the value.
    #[cfg(feature = "toml")]
    fn add_toml_member(&mut self, text: &str, at: usize, table: &str) -> usize {
        let (key, used) = toml_key(&text[at..]);
        let mut i = at + used;
        i += text[i..].len() - text[i..].trim_start_matches([' ', '\t', '=']).len();
        let end = toml_value_end(text, i);
        let path = join(table, &key);
        self.spans.push((path.clone(), i, end));
        if text[i..].starts_with('{') {
            let mut j = i + 1;
            loop {
                j += text[j..].len() - text[j..].trim_start_matches([' ', '\t', ',']).len();
                if j >= end || text[j..].starts_with('}') {
                    break;
                }
                j = self.add_toml_member(text, j, &path);
            }
        }
        end
    }
    /// Where `field`'s value starts.
    pub(crate) fn start_of(&self, field: &str) -> Option<usize> {
        self.spans
            .iter()
            .find(|(path, ..)| path == field)
            .map(|(_, start, _)| *start)
    }

    /// The deepest field whose value holds byte `offset`.
    pub(crate) fn field_at(&self, offset: usize) -> Option<&str> {
        self.spans
            .iter()
            .filter(|(_, start, end)| *start <= offset && offset <= *end)
            .max_by_key(|(path, ..)| path.split('.').count())
            .map(|(path, ..)| path.as_str())
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A dotted key at the start of `text` (bare or quoted parts), as a path,
/// and how many bytes it used (up to `=` or `]`).
#[cfg(feature = "toml")]
fn toml_key(text: &str) -> (String, usize) {
    let mut path = String::new();
    let mut part = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' => {
                for (_, q) in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    part.push(q);
                }
            }
            '.' => path = join(&path, &std::mem::take(&mut part)),
            '=' | ']' => return (join(&path, &part), i),
            c if c.is_whitespace() => {}
            c => part.push(c),
        }
    }
    (join(&path, &part), text.len())
}

/// The byte just past the TOML value starting at `start`: strings, arrays
/// and inline tables may span lines and hold `,` or `}`.
#[cfg(feature = "toml")]
fn toml_value_end(text: &str, start: usize) -> usize {
    let mut depth = 0usize;
    let mut quote: Option<&str> = None;
    let mut i = start;
    while i < text.len() {
        let rest = &text[i..];
        if let Some(q) = quote {
            if rest.starts_with('\\') && q == "\"" {
                i += 2;
                continue;
            }
            if rest.starts_with(q) {
                i += q.len();
                quote = None;
                if depth == 0 {
                    return i;
                }
                continue;
            }
        } else {
            for q in ["\"\"\"", "\'\'\'", "\"", "\'"] {
                if rest.starts_with(q) {
                    quote = Some(q);
                    break;
                }
            }
            if let Some(q) = quote {
                i += q.len();
                continue;
            }
            match rest.as_bytes()[0] {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    if depth <= 1 {
                        return i + 1;
                    }
                    depth -= 1;
                }
                b',' | b'\n' | b'#' if depth == 0 => return i,
                _ => {}
            }
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    text.len()
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
pub(crate) fn location_of(text: &str, offset: usize) -> TextLocation {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    TextLocation {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// The byte offset of a 1-based line and column (in characters).
pub(crate) fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        text.match_indices('\n')
            .nth(line - 2)
            .map_or(text.len(), |(i, _)| i + 1)
    };
    text[line_start..]
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(text.len(), |(i, _)| line_start + i)
}
