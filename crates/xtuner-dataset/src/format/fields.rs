//! Typed access to a raw record's fields, shared by every format.
//!
//! A format asks for its own field names (`instruction`, `messages`, ...); the column map
//! turns them into the data's column names, and every failed look-up becomes a
//! [`FormatError`] that names both. Also here: Python's `str.strip()`, which several of
//! XTuner's map functions apply and whose idea of whitespace is not quite Rust's.

use serde_json::{Map, Value};

use super::{ColumnMap, DataFormat, FieldPath, FormatError};

/// One record seen through one format and its column map.
pub(super) struct Fields<'a> {
    format: DataFormat,
    record: &'a Map<String, Value>,
    columns: &'a ColumnMap,
}

impl<'a> Fields<'a> {
    /// Fails unless the record is a JSON object.
    pub(super) fn new(
        format: DataFormat,
        record: &'a Value,
        columns: &'a ColumnMap,
    ) -> Result<Self, FormatError> {
        match record {
            Value::Object(record) => Ok(Self {
                format,
                record,
                columns,
            }),
            other => Err(FormatError::NotAnObject {
                found: type_name(other),
            }),
        }
    }

    /// The format being applied.
    pub(super) fn format(&self) -> DataFormat {
        self.format
    }

    /// The data's column for one of the format's fields.
    pub(super) fn column(&self, field: &'static str) -> &'a str {
        self.columns.get(field).map_or(field, String::as_str)
    }

    /// Where a field lives in the data, for error messages.
    pub(super) fn path(&self, field: &'static str) -> FieldPath {
        FieldPath {
            field,
            path: self.column(field).to_string(),
        }
    }

    /// The value of a field; absent and `null` both read as `None`.
    pub(super) fn optional(&self, field: &'static str) -> Option<&'a Value> {
        self.record
            .get(self.column(field))
            .filter(|value| !value.is_null())
    }

    /// The value of a field that must be present (it may be `null`).
    pub(super) fn required(&self, field: &'static str) -> Result<&'a Value, FormatError> {
        self.record
            .get(self.column(field))
            .ok_or_else(|| FormatError::MissingField {
                format: self.format,
                at: self.path(field),
            })
    }

    /// A field that must hold a string.
    pub(super) fn str(&self, field: &'static str) -> Result<&'a str, FormatError> {
        let value = self.required(field)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(self.path(field), "a string", value))
    }

    /// A field that may be absent or `null`, or else must hold a string.
    pub(super) fn optional_str(&self, field: &'static str) -> Result<Option<&'a str>, FormatError> {
        match self.optional(field) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(self.wrong_type(self.path(field), "a string", other)),
        }
    }

    /// A field that must hold an array.
    pub(super) fn array(&self, field: &'static str) -> Result<&'a [Value], FormatError> {
        let value = self.required(field)?;
        value
            .as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| self.wrong_type(self.path(field), "an array", value))
    }

    /// Element `index` of the array in `field`, which must be an object.
    pub(super) fn element(
        &self,
        field: &'static str,
        index: usize,
        value: &'a Value,
    ) -> Result<Element<'a>, FormatError> {
        match value {
            Value::Object(object) => Ok(Element {
                format: self.format,
                field,
                index,
                object,
                column: self.column(field),
            }),
            other => {
                Err(self.wrong_type(self.element_path(field, index, None), "an object", other))
            }
        }
    }

    /// The path `column[index].key` of a nested value.
    pub(super) fn element_path(
        &self,
        field: &'static str,
        index: usize,
        key: Option<&str>,
    ) -> FieldPath {
        element_path(field, self.column(field), index, key)
    }

    /// A wrong-type error for the value at `at`.
    pub(super) fn wrong_type(
        &self,
        at: FieldPath,
        expected: &'static str,
        found: &Value,
    ) -> FormatError {
        FormatError::WrongType {
            format: self.format,
            at,
            expected,
            found: type_name(found),
        }
    }
}

/// One object inside an array field (a message of `messages`, a turn of `conversations`).
pub(super) struct Element<'a> {
    format: DataFormat,
    field: &'static str,
    index: usize,
    object: &'a Map<String, Value>,
    column: &'a str,
}

impl<'a> Element<'a> {
    /// Where key `key` of this element lives, for error messages.
    pub(super) fn path(&self, key: &str) -> FieldPath {
        element_path(self.field, self.column, self.index, Some(key))
    }

    /// A key of this element that must be present (it may be `null`).
    pub(super) fn required(&self, key: &str) -> Result<&'a Value, FormatError> {
        self.object
            .get(key)
            .ok_or_else(|| FormatError::MissingField {
                format: self.format,
                at: self.path(key),
            })
    }

    /// A key of this element that must hold a string.
    pub(super) fn str(&self, key: &str) -> Result<&'a str, FormatError> {
        let value = self.required(key)?;
        value.as_str().ok_or_else(|| FormatError::WrongType {
            format: self.format,
            at: self.path(key),
            expected: "a string",
            found: type_name(value),
        })
    }

    /// A key of this element that may be absent.
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.object.get(key)
    }
}

fn element_path(field: &'static str, column: &str, index: usize, key: Option<&str>) -> FieldPath {
    let path = match key {
        Some(key) => format!("{column}[{index}].{key}"),
        None => format!("{column}[{index}]"),
    };
    FieldPath { field, path }
}

/// How a JSON value's type reads in an error message.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Python's `str.strip()` with no argument.
///
/// Python's `str.isspace` is Rust's `char::is_whitespace` plus the four ASCII
/// information separators U+001C..=U+001F (checked against CPython 3.11 over every code
/// point), so text holding those strips differently unless they are added.
pub(super) fn py_strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_strip_matches_python_whitespace() {
        // (input, what Python's "".strip() returns)
        let cases = [
            ("  a b  ", "a b"),
            ("\t\n\x0b\x0c\ra\r\n", "a"),
            ("\x1c\x1d\x1e\x1fa\x1f", "a"),
            (
                "\u{85}\u{a0}\u{1680}a\u{2000}\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}",
                "a",
            ),
            // Zero-width space and BOM are not whitespace to Python.
            ("\u{200b}a\u{feff}", "\u{200b}a\u{feff}"),
            ("   ", ""),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(py_strip(input), want, "{input:?}");
        }
    }

    #[test]
    fn type_names_read_as_english() {
        let cases = [
            (Value::Null, "null"),
            (Value::Bool(true), "a boolean"),
            (serde_json::json!(1), "a number"),
            (serde_json::json!("x"), "a string"),
            (serde_json::json!([]), "an array"),
            (serde_json::json!({}), "an object"),
        ];
        for (value, want) in cases {
            assert_eq!(type_name(&value), want);
        }
    }
}
