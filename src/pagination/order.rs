//! Parsing of `keyset_page`'s `order_by` items: `column [asc|desc] [nulls first|last]`.
//!
//! Pure Rust, no backend needed. Column names follow SQL: an unquoted name is folded to lower case, a
//! double-quoted one is taken as written (with `""` for a quote). Nothing parsed here ever reaches SQL
//! text as it was typed: the caller matches the name against the relation's columns and quotes the
//! catalog's spelling.

use std::fmt;

/// One sort key, with NULL placement made explicit (PostgreSQL's defaults: NULLS LAST for ASC,
/// NULLS FIRST for DESC), so that two spellings of the same order compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OrderItem {
    pub column: String,
    pub descending: bool,
    pub nulls_first: bool,
}

impl OrderItem {
    pub fn ascending(column: &str) -> Self {
        OrderItem { column: column.to_string(), descending: false, nulls_first: false }
    }

    /// The same key sorted the other way round: walking backwards from a cursor is walking forwards
    /// in this order.
    pub fn reversed(&self) -> Self {
        OrderItem {
            column: self.column.clone(),
            descending: !self.descending,
            nulls_first: !self.nulls_first,
        }
    }

    /// For a column that cannot hold NULL the placement is meaningless; normalising it to the default
    /// lets the generated ORDER BY match a plain btree index.
    pub fn without_null_placement(&self) -> Self {
        OrderItem { column: self.column.clone(), descending: self.descending, nulls_first: self.descending }
    }

    /// `ASC NULLS LAST` and so on, for ORDER BY clauses and messages.
    pub fn direction_sql(&self) -> &'static str {
        match (self.descending, self.nulls_first) {
            (false, false) => "ASC NULLS LAST",
            (false, true) => "ASC NULLS FIRST",
            (true, false) => "DESC NULLS LAST",
            (true, true) => "DESC NULLS FIRST",
        }
    }
}

impl fmt::Display for OrderItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.column, self.direction_sql().to_lowercase())
    }
}

/// Why an `order_by` item was refused; rendered into the 22023 error that names the argument.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OrderError {
    Empty,
    UnterminatedQuote,
    UnexpectedWord { word: String },
    Repeated { column: String },
}

impl fmt::Display for OrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderError::Empty => write!(f, "an item is empty"),
            OrderError::UnterminatedQuote => write!(f, "a quoted column name is not closed"),
            OrderError::UnexpectedWord { word } => {
                write!(f, "\"{word}\" is not asc, desc, nulls first or nulls last")
            }
            OrderError::Repeated { column } => write!(f, "column \"{column}\" appears more than once"),
        }
    }
}

/// Parses every item; a column named twice is an error (the second mention could never matter and
/// most likely is a mistake).
pub(crate) fn parse_order(items: &[&str]) -> Result<Vec<OrderItem>, OrderError> {
    let mut parsed: Vec<OrderItem> = Vec::with_capacity(items.len());
    for item in items {
        let next = parse_item(item)?;
        if parsed.iter().any(|seen| seen.column == next.column) {
            return Err(OrderError::Repeated { column: next.column });
        }
        parsed.push(next);
    }
    Ok(parsed)
}

fn parse_item(item: &str) -> Result<OrderItem, OrderError> {
    let (column, rest) = split_column(item.trim())?;
    let words: Vec<String> = rest.split_whitespace().map(str::to_ascii_lowercase).collect();
    let mut words = words.iter().map(String::as_str).peekable();
    let descending = match words.peek() {
        Some(&"asc") => {
            words.next();
            false
        }
        Some(&"desc") => {
            words.next();
            true
        }
        _ => false,
    };
    let nulls_first = match (words.next(), words.next()) {
        (None, _) => descending,
        (Some("nulls"), Some("first")) => true,
        (Some("nulls"), Some("last")) => false,
        (Some("nulls"), other) => {
            return Err(OrderError::UnexpectedWord { word: format!("nulls {}", other.unwrap_or_default()) });
        }
        (Some(word), _) => return Err(OrderError::UnexpectedWord { word: word.to_string() }),
    };
    if let Some(word) = words.next() {
        return Err(OrderError::UnexpectedWord { word: word.to_string() });
    }
    Ok(OrderItem { column, descending, nulls_first })
}

/// The column name at the start of `item` and what follows it.
fn split_column(item: &str) -> Result<(String, &str), OrderError> {
    if let Some(quoted) = item.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices();
        while let Some((index, c)) = chars.next() {
            if c != '"' {
                name.push(c);
                continue;
            }
            if quoted[index + 1..].starts_with('"') {
                name.push('"');
                chars.next();
                continue;
            }
            if name.is_empty() {
                return Err(OrderError::Empty);
            }
            return Ok((name, &quoted[index + 1..]));
        }
        return Err(OrderError::UnterminatedQuote);
    }
    let end = item.find(char::is_whitespace).unwrap_or(item.len());
    if end == 0 {
        return Err(OrderError::Empty);
    }
    Ok((item[..end].to_ascii_lowercase(), &item[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(column: &str, descending: bool, nulls_first: bool) -> OrderItem {
        OrderItem { column: column.to_string(), descending, nulls_first }
    }

    #[test]
    fn directions_and_null_placement_default_as_in_postgresql() {
        assert_eq!(
            parse_order(&["a", "B asc", "c DESC", "d desc nulls last", "e nulls first"]),
            Ok(vec![
                item("a", false, false),
                item("b", false, false),
                item("c", true, true),
                item("d", true, false),
                item("e", false, true),
            ])
        );
    }

    #[test]
    fn quoted_names_keep_case_spaces_and_quotes() {
        assert_eq!(
            parse_order(&["\"Created At\" desc", "\"a\"\"b\""]),
            Ok(vec![item("Created At", true, true), item("a\"b", false, false)])
        );
    }

    #[test]
    fn anything_but_the_grammar_is_refused() {
        assert_eq!(parse_order(&[""]), Err(OrderError::Empty));
        assert_eq!(parse_order(&["\"\""]), Err(OrderError::Empty));
        assert_eq!(parse_order(&["\"open"]), Err(OrderError::UnterminatedQuote));
        assert_eq!(
            parse_order(&["id; DROP TABLE t"]),
            Err(OrderError::UnexpectedWord { word: "drop".to_string() })
        );
        assert_eq!(
            parse_order(&["id sideways"]),
            Err(OrderError::UnexpectedWord { word: "sideways".to_string() })
        );
        assert_eq!(
            parse_order(&["id asc nulls"]),
            Err(OrderError::UnexpectedWord { word: "nulls ".to_string() })
        );
        assert_eq!(
            parse_order(&["id desc nulls last extra"]),
            Err(OrderError::UnexpectedWord { word: "extra".to_string() })
        );
        assert_eq!(parse_order(&["a", "A desc"]), Err(OrderError::Repeated { column: "a".to_string() }));
    }

    #[test]
    fn reversing_twice_is_the_identity_and_flips_null_placement() {
        let original = item("a", false, false);
        assert_eq!(original.reversed(), item("a", true, true));
        assert_eq!(original.reversed().reversed(), original);
        assert_eq!(item("a", true, false).without_null_placement(), item("a", true, true));
    }
}
