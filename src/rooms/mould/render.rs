//! Rendering, with no I/O: Jinja (minijinja, sandboxed) over the Markdown
//! source, smartblocks expanded from the template library, then for HTML
//! Markdown → HTML (pulldown-cmark) and sanitizing (ammonia).
//!
//! A smartblock is a line of its own: `/<slug>` or `/<slug> <block id>`
//! (outside code fences). It becomes an include of the library's template
//! `<slug>` with `block` bound to `data.blocks[<block id>]`. The line count
//! is unchanged, so error lines point at the author's source.
//!
//! Limits: source size (checked by the caller), fuel (bounds loops and any
//! other work), recursion depth, output size (the render stops writing as
//! soon as it is exceeded). Data values are HTML-escaped when printed, and
//! the HTML is sanitized whatever the source held.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;

use minijinja::{AutoEscape, Environment, ErrorKind, State, UndefinedBehavior, Value};
use serde::Serialize;

/// What a rendering produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub content: Vec<u8>,
    pub content_type: &'static str,
}

/// Why a document could not be rendered: the author's error, reported in
/// `hydration.failed`, never retried.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RenderError {
    /// `syntax_error`, `undefined_variable`, `unknown_smartblock`,
    /// `fuel_exhausted`, `recursion_limit`, `output_too_large`,
    /// `source_too_large`, `render_timeout`, `render_error`.
    pub kind: &'static str,
    pub message: String,
    /// 1-based line in the source, when the error has one.
    pub line: Option<usize>,
}

impl RenderError {
    pub fn new(kind: &'static str, message: impl Into<String>, line: Option<usize>) -> Self {
        RenderError {
            kind,
            message: message.into(),
            line,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Html,
    Markdown,
}

impl Format {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "html" => Some(Format::Html),
            "markdown" => Some(Format::Markdown),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Html => "html",
            Format::Markdown => "markdown",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Html => "text/html; charset=utf-8",
            Format::Markdown => "text/markdown; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fuel: u64,
    pub recursion: usize,
    pub max_output_bytes: usize,
}

const SOURCE: &str = "source";
const LIBRARY_PREFIX: &str = "smartblocks/";

/// The template environment with the smartblock library compiled in.
pub struct Renderer {
    env: Environment<'static>,
    slugs: Vec<String>,
    limits: Limits,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("slugs", &self.slugs)
            .finish()
    }
}

impl Renderer {
    /// `library` maps a smartblock slug to its template source.
    pub fn new(library: BTreeMap<String, String>, limits: Limits) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_fuel(Some(limits.fuel));
        env.set_recursion_limit(limits.recursion);
        // The author's last newline is part of the document.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .map_err(|err| to_render_error(&err, None))?;
        env.set_syntax(syntax);
        env.add_function("block_data", block_data);
        let slugs = library.keys().cloned().collect();
        for (slug, source) in library {
            let name = format!("{LIBRARY_PREFIX}{slug}");
            // A library file's final newline would add a blank line after
            // every smartblock; the calling line brings its own.
            let source = source.trim_end_matches(['\n', '\r']).to_string();
            env.add_template_owned(name.clone(), source)
                .map_err(|err| to_render_error(&err, None))?;
        }
        Ok(Renderer { env, slugs, limits })
    }

    pub fn slugs(&self) -> &[String] {
        &self.slugs
    }

    /// Renders `source` with `data` (a JSON object) into `format`.
    pub fn render(
        &self,
        source: &str,
        data: &serde_json::Value,
        format: Format,
    ) -> Result<Rendered, RenderError> {
        let expanded = self.expand_smartblocks(source)?;
        let template = self
            .env
            .template_from_named_str(SOURCE, &expanded)
            .map_err(|err| to_render_error(&err, None))?;
        let exceeded = Cell::new(false);
        let mut markdown = Vec::with_capacity(source.len() * 2);
        let writer = Limited {
            out: &mut markdown,
            max: self.limits.max_output_bytes,
            exceeded: &exceeded,
        };
        if let Err(err) =
            template.render_captured_to(Value::from(minijinja::value::Serde(data)), writer)
        {
            return Err(to_render_error(&err, Some(&exceeded)));
        }
        let content = match format {
            Format::Markdown => markdown,
            Format::Html => {
                let text = String::from_utf8_lossy(&markdown);
                let mut html = String::with_capacity(text.len() * 2);
                let options = pulldown_cmark::Options::ENABLE_TABLES
                    | pulldown_cmark::Options::ENABLE_STRIKETHROUGH
                    | pulldown_cmark::Options::ENABLE_TASKLISTS
                    | pulldown_cmark::Options::ENABLE_FOOTNOTES;
                pulldown_cmark::html::push_html(
                    &mut html,
                    pulldown_cmark::Parser::new_ext(&text, options),
                );
                ammonia::clean(&html).into_bytes()
            }
        };
        if content.len() > self.limits.max_output_bytes {
            return Err(RenderError::new(
                "output_too_large",
                format!(
                    "the output is larger than {} bytes",
                    self.limits.max_output_bytes
                ),
                None,
            ));
        }
        Ok(Rendered {
            content,
            content_type: format.content_type(),
        })
    }

    /// Turns smartblock lines into includes, line for line.
    fn expand_smartblocks(&self, source: &str) -> Result<String, RenderError> {
        let mut out = String::with_capacity(source.len() + 64);
        let mut fence: Option<&str> = None;
        for (index, line) in source.split_inclusive('\n').enumerate() {
            let body = line.trim_end_matches(['\n', '\r']);
            let ending = &line[body.len()..];
            let trimmed = body.trim_start();
            if let Some(marker) = fence {
                if trimmed.starts_with(marker) {
                    fence = None;
                }
                out.push_str(line);
                continue;
            }
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                fence = Some(&trimmed[..3]);
                out.push_str(line);
                continue;
            }
            match smartblock_call(body) {
                Some((slug, block_id)) => {
                    if !self.slugs.iter().any(|known| known == slug) {
                        return Err(RenderError::new(
                            "unknown_smartblock",
                            format!(
                                "/{slug} is not in the template library (known: {})",
                                self.slugs.join(", ")
                            ),
                            Some(index + 1),
                        ));
                    }
                    // Block ids are restricted to [A-Za-z0-9_-] by
                    // `smartblock_call`, so they are safe inside the string.
                    out.push_str(&format!(
                        "{{% with block = block_data(\"{block_id}\") %}}{{% include \"{LIBRARY_PREFIX}{slug}\" %}}{{% endwith %}}"
                    ));
                    out.push_str(ending);
                }
                None => out.push_str(line),
            }
        }
        Ok(out)
    }
}

/// `/slug` or `/slug block-id`, alone on its line.
fn smartblock_call(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix('/')?;
    let mut parts = rest.split_whitespace();
    let slug = parts.next()?;
    let block_id = parts.next().unwrap_or("");
    let slug_ok = slug.starts_with(|c: char| c.is_ascii_lowercase())
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let id_ok = block_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (slug_ok && id_ok && parts.next().is_none()).then_some((slug, block_id))
}

/// `block_data(id)`: the data of one block, `data.blocks[id]`, or an empty map.
fn block_data(state: &State, id: String) -> Value {
    state
        .lookup("blocks")
        .and_then(|blocks| blocks.get_attr(&id).ok())
        .filter(|block| !block.is_undefined() && !block.is_none())
        .unwrap_or_else(|| Value::from(minijinja::value::Serde(serde_json::json!({}))))
}

/// Writes until `max` bytes, then refuses (and says so through `exceeded`).
struct Limited<'a> {
    out: &'a mut Vec<u8>,
    max: usize,
    exceeded: &'a Cell<bool>,
}

impl Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            self.exceeded.set(true);
            return Err(std::io::Error::other("output limit reached"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn to_render_error(err: &minijinja::Error, exceeded: Option<&Cell<bool>>) -> RenderError {
    if exceeded.is_some_and(Cell::get) {
        return RenderError::new(
            "output_too_large",
            "the output limit was reached while rendering",
            None,
        );
    }
    let detail = err.detail().unwrap_or_default().to_string();
    let kind = match err.kind() {
        ErrorKind::SyntaxError | ErrorKind::BadEscape | ErrorKind::InvalidDelimiter => {
            "syntax_error"
        }
        ErrorKind::UndefinedError => "undefined_variable",
        ErrorKind::OutOfFuel => "fuel_exhausted",
        ErrorKind::TemplateNotFound => "unknown_smartblock",
        ErrorKind::InvalidOperation if detail.contains("recursion") => "recursion_limit",
        _ => "render_error",
    };
    let name = err.name().unwrap_or(SOURCE);
    let (line, message) = if name == SOURCE {
        (err.line(), err.to_string())
    } else {
        // The error is inside a library template: say which, and where.
        (
            None,
            format!("{err} (in {name}, line {})", err.line().unwrap_or(0)),
        )
    };
    RenderError::new(kind, message, line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn renderer() -> Renderer {
        let mut library = BTreeMap::new();
        library.insert(
            "note".to_string(),
            "> {{ block.text | default(\"empty\") }}".to_string(),
        );
        Renderer::new(
            library,
            Limits {
                fuel: 50_000,
                recursion: 32,
                max_output_bytes: 64 * 1024,
            },
        )
        .expect("library compiles")
    }

    #[test]
    fn placeholders_and_smartblocks() {
        let out = renderer()
            .render(
                "# {{ title }}\n\n/note b1\n",
                &json!({"title": "Fudge", "blocks": {"b1": {"text": "kept"}}}),
                Format::Markdown,
            )
            .expect("renders");
        assert_eq!(
            String::from_utf8(out.content).expect("utf-8"),
            "# Fudge\n\n> kept\n"
        );
    }

    #[test]
    fn errors_carry_kind_and_line() {
        let r = renderer();
        let err = r
            .render("ok\n{{ missing }}\n", &json!({}), Format::Markdown)
            .expect_err("undefined");
        assert_eq!((err.kind, err.line), ("undefined_variable", Some(2)));
        let err = r
            .render("a\nb\n{% if %}\n", &json!({}), Format::Markdown)
            .expect_err("syntax");
        assert_eq!((err.kind, err.line), ("syntax_error", Some(3)));
        let err = r
            .render("a\n/teleport\n", &json!({}), Format::Markdown)
            .expect_err("unknown");
        assert_eq!((err.kind, err.line), ("unknown_smartblock", Some(2)));
        let err = r
            .render(
                "{% for i in range(100000) %}{{ i }}{% endfor %}",
                &json!({}),
                Format::Markdown,
            )
            .expect_err("fuel");
        assert_eq!(err.kind, "fuel_exhausted");
    }

    #[test]
    fn html_is_sanitized() {
        let out = renderer()
            .render(
                "<script>alert(1)</script>\n\n[x](javascript:alert(2)) <img src=x onerror=alert(3)>\n\n{{ evil }}",
                &json!({"evil": "<script>alert(4)</script>"}),
                Format::Html,
            )
            .expect("renders");
        let html = String::from_utf8(out.content).expect("utf-8");
        for bad in ["<script", "javascript:", "onerror"] {
            assert!(!html.contains(bad), "{bad} survived in {html}");
        }
    }

    #[test]
    fn code_fences_keep_slash_lines() {
        let out = renderer()
            .render("```\n/teleport\n```\n", &json!({}), Format::Markdown)
            .expect("renders");
        assert_eq!(out.content, b"```\n/teleport\n```\n");
    }
}
