//! One pass over a Markdown document: its `#tags` in prose and its links
//! into repositories. pulldown-cmark does the parsing, so code spans, code
//! blocks, headings' `#` markers and URL fragments are never mistaken for
//! tags.

use pulldown_cmark::{Event, LinkType, Options, Parser, Tag, TagEnd};

/// A link into a repository, as written and as understood.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoLink {
    pub link: String,
    pub repo: String,
    pub path: String,
    pub anchor: Option<String>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Extracted {
    /// Tags as written, without `#`, first occurrence first, no repeats.
    pub tags: Vec<String>,
    /// Links, first occurrence first, no repeats.
    pub links: Vec<RepoLink>,
}

/// Extracts tags and repo links from `content`, a document at `repo`/`path`
/// (relative links resolve against it).
pub fn extract(content: &str, repo: &str, path: &str) -> Extracted {
    let mut out = Extracted::default();
    let mut code_depth = 0usize;
    let options =
        Options::ENABLE_WIKILINKS | Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    for event in Parser::new_ext(content, options) {
        match event {
            Event::Start(Tag::CodeBlock(_)) => code_depth += 1,
            Event::End(TagEnd::CodeBlock) => code_depth = code_depth.saturating_sub(1),
            Event::Text(text) if code_depth == 0 => tags_in(&text, &mut out.tags),
            Event::Start(Tag::Link {
                link_type,
                dest_url,
                ..
            }) => {
                if let Some(link) = repo_link(&dest_url, link_type, repo, path)
                    && !out.links.contains(&link)
                {
                    out.links.push(link);
                }
            }
            _ => {}
        }
    }
    out
}

fn is_tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == '-' || c == '_'
}

/// `#tag` where the `#` starts the text or follows whitespace or an opening
/// bracket (so `page#frag` and `&#35;` are not tags), and the tag has a letter.
fn tags_in(text: &str, tags: &mut Vec<String>) {
    let mut previous: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let boundary = previous.is_none_or(|p| p.is_whitespace() || "([{\"'".contains(p));
        if c == '#' && boundary {
            let rest = &text[i + 1..];
            let len: usize = rest
                .chars()
                .take_while(|&ch| is_tag_char(ch))
                .map(char::len_utf8)
                .sum();
            let tag = rest[..len].trim_end_matches(['-', '_']);
            if tag.chars().any(char::is_alphabetic) && !tags.iter().any(|t| t == tag) {
                tags.push(tag.to_string());
            }
            while chars.peek().is_some_and(|&(j, _)| j <= i + len) {
                chars.next();
            }
            previous = rest[..len].chars().last().or(Some('#'));
            continue;
        }
        previous = Some(c);
    }
}

/// Understands `repo://<repo>/<path>#<anchor>`, wikilinks
/// `[[<repo>:<path>#<anchor>]]` and relative links into the same repo.
/// Other links (web, mail) are not the wrapper's business.
fn repo_link(dest: &str, link_type: LinkType, repo: &str, path: &str) -> Option<RepoLink> {
    let (target, anchor) = match dest.split_once('#') {
        Some((target, anchor)) => (target, Some(anchor.to_string()).filter(|a| !a.is_empty())),
        None => (dest, None),
    };
    let link = |repo: &str, path: String| {
        Some(RepoLink {
            link: dest.to_string(),
            repo: repo.to_string(),
            path,
            anchor: anchor.clone(),
        })
    };
    if let Some(rest) = target.strip_prefix("repo://") {
        let (to_repo, to_path) = rest.split_once('/').unwrap_or((rest, ""));
        return link(to_repo, normalize_path(to_path));
    }
    if matches!(link_type, LinkType::WikiLink { .. }) {
        return match target.split_once(':') {
            Some((to_repo, to_path)) => link(to_repo, normalize_path(to_path)),
            // `[[path]]`: a page of the same repo.
            None => link(repo, resolve_relative(path, target)),
        };
    }
    if target.contains("://") || target.starts_with("mailto:") || target.starts_with("//") {
        return None;
    }
    if target.is_empty() {
        // `#anchor`: the document itself.
        return anchor.as_ref().and(link(repo, normalize_path(path)));
    }
    link(repo, resolve_relative(path, target))
}

/// `docs/guide.md` + `../README.md` → `README.md`; a leading `/` is the repo root.
fn resolve_relative(from: &str, target: &str) -> String {
    if let Some(absolute) = target.strip_prefix('/') {
        return normalize_path(absolute);
    }
    let dir = from.rsplit_once('/').map_or("", |(dir, _)| dir);
    normalize_path(&format!("{dir}/{target}"))
}

fn normalize_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// A heading's anchor as GitHub computes it: lower-case, spaces to `-`,
/// punctuation other than `-` and `_` removed. Idempotent on slugs.
pub fn github_slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// A tag's identity: case and separators (`-`, `_`, spaces, dots) do not
/// matter, so `Golden-Ticket`, `golden_ticket` and `goldenticket` are one.
pub fn tag_key(tag: &str) -> String {
    tag.trim_start_matches('#')
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | ' ' | '.'))
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_in_prose_only() {
        let doc = "# Heading\n\nWe love #golden-ticket and #Fudge.\n\n`#not-code` and\n\n```\n#not-block\n```\n\nSee https://x.io/page#frag and &#35;39 and issue #42.\n";
        let found = extract(doc, "hq", "README.md");
        assert_eq!(found.tags, vec!["golden-ticket", "Fudge"]);
    }

    #[test]
    fn links_of_every_form() {
        let doc = "[a](repo://vault/docs/setup.md#install) [[sync:docs/api.md#auth]] [b](../guide.md#top) [c](#local) [d](https://example.com/x#y) [[notes]]";
        let found = extract(doc, "hq", "docs/intro/readme.md");
        let simple: Vec<(String, String, Option<String>)> = found
            .links
            .iter()
            .map(|l| (l.repo.clone(), l.path.clone(), l.anchor.clone()))
            .collect();
        assert_eq!(
            simple,
            vec![
                (
                    "vault".into(),
                    "docs/setup.md".into(),
                    Some("install".into())
                ),
                ("sync".into(), "docs/api.md".into(), Some("auth".into())),
                ("hq".into(), "docs/guide.md".into(), Some("top".into())),
                (
                    "hq".into(),
                    "docs/intro/readme.md".into(),
                    Some("local".into())
                ),
                ("hq".into(), "docs/intro/notes".into(), None),
            ]
        );
    }

    #[test]
    fn keys_and_slugs() {
        assert_eq!(tag_key("#Golden-Ticket"), "goldenticket");
        assert_eq!(tag_key("golden_ticket"), tag_key("goldenticket"));
        assert_eq!(
            github_slug("Getting Started: Install!"),
            "getting-started-install"
        );
        assert_eq!(
            github_slug("getting-started-install"),
            "getting-started-install"
        );
    }
}
