//! Slop detection: explainable, deterministic rules that score a document.
//!
//! Every rule comes from the rules file (`config/slop-rules.toml`) with its
//! weight; a document's score is the sum of the weights of its findings.
//! The work is linear in the content: all phrase rules share one
//! Aho-Corasick automaton (one pass for every phrase of every rule), all
//! marker rules another, and the structural rules (repeated sentences,
//! repeated n-grams, empty sections) are single scans with hashing.
//! Markdown code (fenced blocks and inline spans) is not prose: no rule
//! looks inside it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::{Deserialize, Serialize};

/// Word and sentence hashing: fast, and seeded the same way every run so
/// the same document always gets the same findings.
type FastState = foldhash::fast::FixedState;

fn fast_hasher() -> impl Hasher {
    FastState::with_seed(0x5eed).build_hasher()
}

type FastMap<K, V> = HashMap<K, V, FastState>;

/// The rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    pub rules: Vec<RuleConfig>,
}

/// One rule. Unknown keys are refused by the kind (serde cannot refuse
/// them here because of `flatten`).
#[derive(Debug, Clone, Deserialize)]
pub struct RuleConfig {
    /// Names the rule in findings (`placeholder_text`).
    pub name: String,
    pub weight: f64,
    /// What a finding of this rule says.
    pub message: String,
    /// Upper bound on what this rule adds to a score; unbounded when absent.
    #[serde(default)]
    pub max_score: Option<f64>,
    #[serde(flatten)]
    pub kind: RuleKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleKind {
    /// Whole-word phrases, case-insensitive: stock phrases, disclaimers, lorem ipsum.
    Phrases { phrases: Vec<String> },
    /// Whole-word markers, case-sensitive: TODO, TBD, FIXME.
    Markers { markers: Vec<String> },
    /// A sentence of at least `min_words` words said again.
    RepeatedSentences {
        #[serde(default = "default_min_words")]
        min_words: usize,
    },
    /// A run of `n` words that occurs `min_occurrences` times or more.
    RepeatedNgrams {
        #[serde(default = "default_ngram")]
        n: usize,
        #[serde(default = "default_min_occurrences")]
        min_occurrences: usize,
    },
    /// A Markdown heading with nothing under it.
    EmptySections,
}

fn default_min_words() -> usize {
    5
}
fn default_ngram() -> usize {
    6
}
fn default_min_occurrences() -> usize {
    3
}

/// One explained reason a document scored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub rule: String,
    pub message: String,
    /// Byte offsets into the content: `[start, end)`.
    pub start: usize,
    pub end: usize,
    pub excerpt: String,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub score: f64,
    pub findings: Vec<Finding>,
}

#[derive(Debug, thiserror::Error)]
#[error("rules[{index}]: {message}")]
pub struct RulesError {
    pub index: usize,
    pub message: String,
}

/// The compiled rules, shared by every request.
pub struct SlopRules {
    rules: Vec<RuleConfig>,
    phrases: Option<(AhoCorasick, Vec<usize>)>,
    markers: Option<(AhoCorasick, Vec<usize>)>,
}

impl std::fmt::Debug for SlopRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlopRules")
            .field("rules", &self.rules.len())
            .finish()
    }
}

const EXCERPT_CHARS: usize = 80;

impl SlopRules {
    pub fn compile(file: RulesFile) -> Result<Self, RulesError> {
        let mut phrase_patterns = Vec::new();
        let mut phrase_owner = Vec::new();
        let mut marker_patterns = Vec::new();
        let mut marker_owner = Vec::new();
        for (index, rule) in file.rules.iter().enumerate() {
            let invalid = |message: &str| RulesError {
                index,
                message: format!("{} ({})", message, rule.name),
            };
            if rule.name.trim().is_empty() {
                return Err(invalid("name must not be empty"));
            }
            if !rule.weight.is_finite() || rule.weight < 0.0 {
                return Err(invalid("weight must be a finite number ≥ 0"));
            }
            match &rule.kind {
                RuleKind::Phrases { phrases } => {
                    if phrases.iter().any(|p| p.trim().is_empty()) || phrases.is_empty() {
                        return Err(invalid(
                            "phrases must be a non-empty list of non-empty phrases",
                        ));
                    }
                    for phrase in phrases {
                        phrase_patterns.push(phrase.clone());
                        phrase_owner.push(index);
                    }
                }
                RuleKind::Markers { markers } => {
                    if markers.iter().any(|m| m.trim().is_empty()) || markers.is_empty() {
                        return Err(invalid(
                            "markers must be a non-empty list of non-empty words",
                        ));
                    }
                    for marker in markers {
                        marker_patterns.push(marker.clone());
                        marker_owner.push(index);
                    }
                }
                RuleKind::RepeatedSentences { min_words } if *min_words == 0 => {
                    return Err(invalid("min_words must be at least 1"));
                }
                RuleKind::RepeatedNgrams { n, min_occurrences }
                    if *n == 0 || *min_occurrences < 2 =>
                {
                    return Err(invalid(
                        "n must be at least 1 and min_occurrences at least 2",
                    ));
                }
                _ => {}
            }
        }
        let build = |patterns: Vec<String>, owner: Vec<usize>, insensitive: bool| {
            if patterns.is_empty() {
                return Ok(None);
            }
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(insensitive)
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .map(|automaton| Some((automaton, owner)))
                .map_err(|err| RulesError {
                    index: 0,
                    message: err.to_string(),
                })
        };
        Ok(SlopRules {
            phrases: build(phrase_patterns, phrase_owner, true)?,
            markers: build(marker_patterns, marker_owner, false)?,
            rules: file.rules,
        })
    }

    /// Scores `content`; `markdown` enables code masking and heading rules.
    pub fn score(&self, content: &str, markdown: bool) -> Score {
        let code = if markdown {
            code_ranges(content)
        } else {
            Vec::new()
        };
        let in_code = |at: usize| {
            // `code` is sorted and disjoint.
            let i = code.partition_point(|range| range.end <= at);
            code.get(i).is_some_and(|range| range.start <= at)
        };
        let mut findings = Vec::new();
        for (automaton, owner) in [&self.phrases, &self.markers].into_iter().flatten() {
            for found in automaton.find_iter(content) {
                let (start, end) = (found.start(), found.end());
                if in_code(start) || !whole_word(content, start, end) {
                    continue;
                }
                let rule = &self.rules[owner[found.pattern().as_usize()]];
                findings.push(finding(rule, content, start, end));
            }
        }
        let words = if self.needs_words() {
            words(content, &in_code)
        } else {
            Vec::new()
        };
        for rule in &self.rules {
            match rule.kind {
                RuleKind::RepeatedSentences { min_words } => {
                    repeated_sentences(rule, content, &in_code, min_words, &mut findings)
                }
                RuleKind::RepeatedNgrams { n, min_occurrences } => {
                    repeated_ngrams(rule, content, &words, n, min_occurrences, &mut findings)
                }
                RuleKind::EmptySections if markdown => {
                    empty_sections(rule, content, &in_code, &mut findings)
                }
                _ => {}
            }
        }
        findings.sort_by(|a, b| a.start.cmp(&b.start).then(a.rule.cmp(&b.rule)));

        let mut per_rule: HashMap<&str, f64> = HashMap::new();
        for found in &findings {
            *per_rule.entry(found.rule.as_str()).or_default() += found.weight;
        }
        let score = self
            .rules
            .iter()
            .filter_map(|rule| {
                let sum = per_rule.remove(rule.name.as_str())?;
                Some(rule.max_score.map_or(sum, |cap| sum.min(cap)))
            })
            .sum::<f64>();
        Score { score, findings }
    }

    fn needs_words(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| matches!(rule.kind, RuleKind::RepeatedNgrams { .. }))
    }
}

fn finding(rule: &RuleConfig, content: &str, start: usize, end: usize) -> Finding {
    let text = &content[start..end];
    let excerpt: String = text.chars().take(EXCERPT_CHARS).collect();
    Finding {
        rule: rule.name.clone(),
        message: rule.message.clone(),
        start,
        end,
        excerpt: if excerpt.len() < text.len() {
            format!("{excerpt}…")
        } else {
            excerpt
        },
        weight: rule.weight,
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The match is not part of a longer word.
fn whole_word(content: &str, start: usize, end: usize) -> bool {
    let before = content[..start].chars().next_back();
    let after = content[end..].chars().next();
    !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
}

/// Byte ranges of Markdown code: fenced blocks (``` or ~~~) and inline
/// spans between backticks on one line. Sorted and disjoint.
fn code_ranges(content: &str) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut fence: Option<(usize, &str)> = None;
    let mut offset = 0;
    for line in content.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let line_end = offset + line.len();
        match fence {
            Some((start, marker)) => {
                if trimmed.starts_with(marker) {
                    ranges.push(start..line_end);
                    fence = None;
                }
            }
            None => {
                if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                    fence = Some((offset, &trimmed[..3]));
                } else {
                    let mut open: Option<usize> = None;
                    for (i, byte) in line.bytes().enumerate() {
                        if byte == b'`' {
                            match open.take() {
                                Some(start) => ranges.push(offset + start..offset + i + 1),
                                None => open = Some(i),
                            }
                        }
                    }
                }
            }
        }
        offset = line_end;
    }
    if let Some((start, _)) = fence {
        ranges.push(start..content.len());
    }
    ranges
}

/// Words of prose as byte ranges, with a case-folded hash each.
fn words(content: &str, in_code: &dyn Fn(usize) -> bool) -> Vec<(Range<usize>, u64)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut push = |range: Range<usize>| {
        if in_code(range.start) {
            return;
        }
        let mut hasher = fast_hasher();
        for c in content[range.clone()].chars().flat_map(char::to_lowercase) {
            c.hash(&mut hasher);
        }
        out.push((range, hasher.finish()));
    };
    for (i, c) in content.char_indices() {
        match (is_word_char(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        push(s..content.len());
    }
    out
}

/// Sentences end at `.`, `!`, `?` or a line break; a repeat of an earlier
/// sentence (same words, any case or spacing) is a finding.
fn repeated_sentences(
    rule: &RuleConfig,
    content: &str,
    in_code: &dyn Fn(usize) -> bool,
    min_words: usize,
    findings: &mut Vec<Finding>,
) {
    let mut seen: FastMap<u64, usize> = FastMap::with_hasher(FastState::with_seed(1));
    let mut sentence_start = 0;
    let bytes = content.as_bytes();
    let mut flush = |start: usize, end: usize, findings: &mut Vec<Finding>| {
        let text = &content[start..end];
        let trimmed_start = start + (text.len() - text.trim_start().len());
        let trimmed_end = start + text.trim_end().len();
        if trimmed_start >= trimmed_end || in_code(trimmed_start) {
            return;
        }
        let mut hasher = fast_hasher();
        let mut count = 0;
        for word in content[trimmed_start..trimmed_end]
            .split(|c: char| !is_word_char(c))
            .filter(|w| !w.is_empty())
        {
            for c in word.chars().flat_map(char::to_lowercase) {
                c.hash(&mut hasher);
            }
            ' '.hash(&mut hasher);
            count += 1;
        }
        if count < min_words {
            return;
        }
        if seen.insert(hasher.finish(), trimmed_start).is_some() {
            findings.push(finding(rule, content, trimmed_start, trimmed_end));
        }
    };
    for (i, &byte) in bytes.iter().enumerate() {
        let end_of_sentence = match byte {
            b'\n' => true,
            b'.' | b'!' | b'?' => bytes.get(i + 1).is_none_or(|b| b.is_ascii_whitespace()),
            _ => false,
        };
        if end_of_sentence {
            flush(sentence_start, i + 1, findings);
            sentence_start = i + 1;
        }
    }
    flush(sentence_start, content.len(), findings);
}

/// Runs of `n` words seen `min_occurrences` times; consecutive windows of
/// one repeated passage are merged into one finding.
fn repeated_ngrams(
    rule: &RuleConfig,
    content: &str,
    words: &[(Range<usize>, u64)],
    n: usize,
    min_occurrences: usize,
    findings: &mut Vec<Finding>,
) {
    if words.len() < n {
        return;
    }
    let mut counts: FastMap<u64, usize> = FastMap::with_hasher(FastState::with_seed(2));
    let mut current: Option<Range<usize>> = None;
    for window in words.windows(n) {
        let mut hasher = fast_hasher();
        for (_, hash) in window {
            hash.hash(&mut hasher);
        }
        let count = counts.entry(hasher.finish()).or_default();
        *count += 1;
        if *count < min_occurrences {
            continue;
        }
        let span = window[0].0.start..window[n - 1].0.end;
        match &mut current {
            Some(run) if span.start < run.end => run.end = run.end.max(span.end),
            _ => {
                if let Some(run) = current.replace(span) {
                    findings.push(finding(rule, content, run.start, run.end));
                }
            }
        }
    }
    if let Some(run) = current {
        findings.push(finding(rule, content, run.start, run.end));
    }
}

/// A heading followed by nothing but blank lines before the next heading
/// of the same or a higher level (or the end).
fn empty_sections(
    rule: &RuleConfig,
    content: &str,
    in_code: &dyn Fn(usize) -> bool,
    findings: &mut Vec<Finding>,
) {
    // (level, start, end of the heading line, anything under it yet)
    let mut open: Option<(usize, usize, usize, bool)> = None;
    let mut offset = 0;
    for line in content.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let level = heading_level(line).filter(|_| !in_code(start));
        match level {
            Some(level) => {
                if let Some((open_level, h_start, h_end, filled)) = open.take()
                    && !filled
                    && level <= open_level
                {
                    findings.push(finding(rule, content, h_start, h_end));
                }
                let end = start + line.trim_end().len();
                open = Some((level, start, end, false));
            }
            None => {
                if let Some(section) = open.as_mut()
                    && !line.trim().is_empty()
                {
                    section.3 = true;
                }
            }
        }
    }
    if let Some((_, h_start, h_end, false)) = open {
        findings.push(finding(rule, content, h_start, h_end));
    }
}

fn heading_level(line: &str) -> Option<usize> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let hashes = trimmed.bytes().take_while(|&b| b == b'#').count();
    let rest = &trimmed[hashes..];
    ((1..=6).contains(&hashes) && (rest.starts_with(' ') || rest.trim().is_empty()))
        .then_some(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SlopRules {
        let file: RulesFile =
            toml::from_str(include_str!("../../../config/slop-rules.toml")).expect("rules parse");
        SlopRules::compile(file).expect("rules compile")
    }

    #[test]
    fn finds_placeholders_at_their_offsets() {
        let content = "# Intro\n\nLorem ipsum dolor sit amet, and a TODO here.\n";
        let score = rules().score(content, true);
        let lorem = score
            .findings
            .iter()
            .find(|f| f.rule == "placeholder_text")
            .expect("lorem");
        assert_eq!(
            &content[lorem.start..lorem.end],
            "Lorem ipsum dolor sit amet"
        );
        let todo = score
            .findings
            .iter()
            .find(|f| f.rule == "todo_marker")
            .expect("todo");
        assert_eq!(&content[todo.start..todo.end], "TODO");
        assert!(score.score > 0.0);
    }

    #[test]
    fn code_is_not_prose() {
        let content = "Text.\n\n```\n// TODO lorem ipsum\n```\n\nUse `TODO` literally.\n";
        let score = rules().score(content, true);
        assert!(score.findings.is_empty(), "{:?}", score.findings);
    }

    #[test]
    fn whole_words_only() {
        let score = rules().score("The TODOS are fine and TBDX too.", false);
        assert!(score.findings.is_empty(), "{:?}", score.findings);
    }

    #[test]
    fn repeats_and_empty_sections() {
        let content = "# A\n\n## Empty\n\n## Full\n\nThis exact sentence appears more than once here. \
                       This exact sentence appears more than once here.\n";
        let score = rules().score(content, true);
        let empty: Vec<_> = score
            .findings
            .iter()
            .filter(|f| f.rule == "empty_section")
            .collect();
        assert_eq!(empty.len(), 1, "{:?}", score.findings);
        assert_eq!(&content[empty[0].start..empty[0].end], "## Empty");
        let repeated = score
            .findings
            .iter()
            .find(|f| f.rule == "repeated_sentence")
            .expect("repeat");
        assert!(repeated.start > content.find("here.").expect("first"));
    }

    #[test]
    fn misspelled_rule_keys_are_refused() {
        let file = "[[rules]]\nname='x'\nkind='phrases'\nweight=1.0\nmessage='m'\nphrasez=['a']\n";
        assert!(toml::from_str::<RulesFile>(file).is_err());
    }

    #[test]
    fn clean_prose_scores_zero() {
        let content = "# Release notes\n\nThe conch now resolves conflicts per property. \
                       Editors see the winning value within a second.\n";
        assert_eq!(rules().score(content, true).score, 0.0);
    }
}
