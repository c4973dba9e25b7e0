//! Example payloads made from a JSON Schema, for the test that every
//! schema of the catalogue describes payloads the real decoders accept.
//!
//! Covers what the catalogue's schemas use (draft-07, inlined): `type`
//! (one or a list), `enum`, `const`, `properties` with `required`,
//! `items`, `anyOf`/`oneOf`/`allOf`, `minimum`, `format: date-time`. Two
//! examples per schema: only what is required, and every property.

use serde_json::{Map, Value, json};

use crate::cocoa_butter::api::snake_case;

/// Which properties of an object an example fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Required,
    Every,
}

/// An example of `schema`.
pub fn example(schema: &Value, fill: Fill) -> Value {
    let Some(schema) = schema.as_object() else {
        // `true` (anything goes) or `false`: null is as good as any value.
        return Value::Null;
    };
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|v| v.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = schema
            .get(key)
            .and_then(Value::as_array)
            .and_then(|v| v.first())
        {
            return example(first, fill);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        // A list: the first that is not null, so the example says something.
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ if schema.contains_key("properties") => "object",
        _ => return Value::Null,
    };
    match kind {
        "object" => object(schema, fill),
        "array" => match schema.get("items") {
            Some(items) => Value::Array(vec![example(items, fill)]),
            None => json!([]),
        },
        "string" => match schema.get("format").and_then(Value::as_str) {
            Some("date-time") => json!("2026-03-01T10:00:00Z"),
            _ => json!("example"),
        },
        "integer" => json!(
            schema
                .get("minimum")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .max(0)
        ),
        "number" => json!(0.5),
        "boolean" => json!(true),
        _ => Value::Null,
    }
}

fn object(schema: &Map<String, Value>, fill: Fill) -> Value {
    let empty = Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // `allOf` of `anyOf`s of `required` (the snake_case aliases): the
    // first spelling of each.
    for part in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(name) = part
            .get("anyOf")
            .and_then(|any| any.get(0))
            .and_then(|first| first.get("required"))
            .and_then(|names| names.get(0))
            .and_then(Value::as_str)
        {
            required.push(name);
        }
    }
    let mut out = Map::new();
    for (name, property) in properties {
        let wanted = required.contains(&name.as_str()) || fill == Fill::Every;
        // Of two spellings of one field (an alias), only one may be given.
        let alias_of_given = fill == Fill::Every
            && !required.contains(&name.as_str())
            && properties.keys().any(|other| {
                other != name && snake_case(other) == *name && out.contains_key(other)
            });
        if wanted && !alias_of_given {
            out.insert(name.clone(), example(property, fill));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_what_is_required_or_everything() {
        let schema = json!({
            "type": "object",
            "required": ["id", "at"],
            "properties": {
                "id": {"type": "string"},
                "at": {"type": "string", "format": "date-time"},
                "n": {"type": ["integer", "null"], "minimum": 3},
                "kind": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "boolean"}},
            }
        });
        assert_eq!(
            example(&schema, Fill::Required),
            json!({"id": "example", "at": "2026-03-01T10:00:00Z"})
        );
        assert_eq!(
            example(&schema, Fill::Every),
            json!({"id": "example", "at": "2026-03-01T10:00:00Z", "n": 3, "kind": "a", "tags": [true]})
        );
    }
}
