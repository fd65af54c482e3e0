//! Caption and tag cleaning rules of sd-scripts' `clean_captions_and_tags.py`, in order, plus an
//! optional user filter list.

use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use crate::{dataset, Error, Result};

static HAIR_LENGTH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r", (long|short|medium) hair, ").unwrap());
static HAIR_CUT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r", (bob|hime) cut, ").unwrap());
static HAIR_COLOUR: LazyLock<Regex> = LazyLock::new(|| Regex::new(r", ([\w\-]+) hair, ").unwrap());
static GENERIC_WORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r", ([\w\-]+|hair ornament), ").unwrap());

/// Patterns removed when an image shows several people and more than one of them matches.
static REMOVE_IN_MULTI: LazyLock<[Regex; 5]> = LazyLock::new(|| {
    [
        HAIR_LENGTH.clone(),
        HAIR_CUT.clone(),
        Regex::new(r", [\w\-]+ eyes, ").unwrap(),
        Regex::new(r", ([\w\-]+ sleeves|sleeveless), ").unwrap(),
        Regex::new(
            r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|two tails|[\w\-]+ braid|sidelocks), ",
        )
        .unwrap(),
    ]
});

/// Caption substitutions, each applied until the caption stops changing, in this order.
const CAPTION_REPLACEMENTS: [(&str, &str); 27] = [
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
];

/// Cleans a tag string with sd-scripts' rules (underscores, rating removal, multi-person
/// hair/eye/sleeve/hairstyle removal, redundant generic tags). `key` names the entry in warnings.
pub fn clean_tags(key: &str, tags: &str) -> String {
    let tags = tags
        .replace("^_^", "^@@@^")
        .replace('_', " ")
        .replace("^@@@^", "^_^");

    let mut pieces = tags.split(", rating");
    let before_rating = pieces.next().unwrap_or("");
    if pieces.count() > 1 {
        tracing::warn!("{key}: several rating tags in {tags:?}; keeping the text before the first");
    }

    let mut tags = format!(", {}, ", before_rating.replace(", ", ", , "));

    if tags.contains("girls") || tags.contains("boys") {
        for pattern in REMOVE_IN_MULTI.iter() {
            if pattern.find_iter(&tags).nth(1).is_some() {
                tags = pattern.replace_all(&tags, "").into_owned();
            }
        }
        let hair_length = HAIR_LENGTH.find(&tags).map(|m| m.as_str().to_string());
        if hair_length.is_some() {
            tags = HAIR_LENGTH.replace_all(&tags, ", @@@, ").into_owned();
        }
        if HAIR_COLOUR.find_iter(&tags).nth(1).is_some() {
            tags = HAIR_COLOUR.replace_all(&tags, "").into_owned();
        }
        if let Some(original) = hair_length {
            tags = tags.replace(", @@@, ", &original);
        }
    }

    let generic: Vec<String> = GENERIC_WORD
        .captures_iter(&tags)
        .map(|c| c[1].to_string())
        .collect();
    for word in generic {
        if has_qualified_form(&tags, &word) {
            tags = tags.replace(&format!(", {word}, "), "");
        }
    }

    let tags = tags.replacen(", , ", ", ", usize::MAX);
    debug_assert!(tags.starts_with(", ") && tags.ends_with(", "));
    tags.get(2..tags.len().saturating_sub(2))
        .unwrap_or("")
        .to_string()
}

/// True when `tags` contains `, <word> <word> ... <generic>, ` (e.g. `, white shirt, ` for
/// `shirt`): the regex `, ((\w+) )+<generic>, ` evaluated without compiling one regex per word.
fn has_qualified_form(tags: &str, generic: &str) -> bool {
    let needle = format!(" {generic}, ");
    let mut from = 0;
    while let Some(offset) = tags[from..].find(&needle) {
        let space = from + offset;
        let head = &tags[..=space];
        if let Some(comma) = head.rfind(',') {
            let qualifiers = &head[comma + 1..];
            if let Some(words) = qualifiers
                .strip_prefix(' ')
                .and_then(|w| w.strip_suffix(' '))
            {
                if !words.is_empty() && words.split(' ').all(is_word) {
                    return true;
                }
            }
        }
        from = space + 1;
    }
    false
}

/// True for a non-empty run of regex `\w` characters.
fn is_word(text: &str) -> bool {
    static WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\w+$").unwrap());
    WORD.is_match(text)
}

/// Cleans a caption with sd-scripts' substitutions (plain substring replacement, repeated).
pub fn clean_caption(caption: &str) -> String {
    let mut caption = caption.to_string();
    for (from, to) in CAPTION_REPLACEMENTS {
        while caption.contains(from) {
            caption = caption.replace(from, to);
        }
    }
    caption
}

/// One rule of a user filter list.
#[derive(Debug, Clone)]
pub enum FilterRule {
    /// Drop tags equal to this text.
    DropTag(String),
    /// Drop tags the regex matches entirely (`/regex/` lines).
    DropMatching(Regex),
    /// Substitute in captions and tags (`s/regex/replacement/` lines).
    Substitute(Regex, String),
}

/// A user filter list: one rule per line, `#` comments and blank lines ignored.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    rules: Vec<FilterRule>,
}

impl UserFilter {
    /// Reads a filter list. Lines: `plain tag`, `/regex/`, or `s/regex/replacement/`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = dataset::read_text(path)?;
        let mut rules = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let compile = |pattern: &str| {
                Regex::new(pattern).map_err(|e| {
                    Error::bad_file(
                        path,
                        format!("line {}: bad regex {pattern:?}: {e}", number + 1),
                    )
                })
            };
            let rule = if let Some(body) = line.strip_prefix("s/").and_then(|b| b.strip_suffix('/'))
            {
                let (pattern, replacement) = body.split_once('/').ok_or_else(|| {
                    Error::bad_file(
                        path,
                        format!("line {}: expected s/regex/replacement/", number + 1),
                    )
                })?;
                FilterRule::Substitute(compile(pattern)?, replacement.to_string())
            } else if let Some(pattern) = line
                .strip_prefix('/')
                .and_then(|b| b.strip_suffix('/'))
                .filter(|p| !p.is_empty())
            {
                FilterRule::DropMatching(compile(&format!("^(?:{pattern})$"))?)
            } else {
                FilterRule::DropTag(line.to_string())
            };
            rules.push(rule);
        }
        Ok(UserFilter { rules })
    }

    /// Applies the substitutions to a caption.
    pub fn apply_to_caption(&self, caption: &str) -> String {
        let mut caption = caption.to_string();
        for rule in &self.rules {
            if let FilterRule::Substitute(regex, replacement) = rule {
                caption = regex
                    .replace_all(&caption, replacement.as_str())
                    .into_owned();
            }
        }
        caption
    }

    /// Applies every rule to each tag of a `", "`-separated tag string; emptied tags are dropped.
    pub fn apply_to_tags(&self, tags: &str) -> String {
        let kept: Vec<String> = tags
            .split(", ")
            .filter_map(|tag| {
                let mut tag = tag.to_string();
                for rule in &self.rules {
                    match rule {
                        FilterRule::DropTag(text) if tag == *text => return None,
                        FilterRule::DropMatching(regex) if regex.is_match(&tag) => return None,
                        FilterRule::Substitute(regex, replacement) => {
                            tag = regex.replace_all(&tag, replacement.as_str()).into_owned();
                        }
                        _ => {}
                    }
                }
                (!tag.trim().is_empty()).then_some(tag)
            })
            .collect();
        kept.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscores_and_ratings() {
        assert_eq!(
            clean_tags("k", "long_hair, ^_^, smile"),
            "long hair, ^_^, smile"
        );
        assert_eq!(
            clean_tags("k", "1girl, solo, rating:safe, x"),
            "1girl, solo"
        );
        assert_eq!(
            clean_tags("k", "1girl, solo, rating:safe, rating:q"),
            "1girl, solo"
        );
        assert_eq!(clean_tags("k", "1girl, solo"), "1girl, solo");
    }

    #[test]
    fn multi_person_attributes_removed_when_repeated() {
        let out = clean_tags(
            "k",
            "2girls, long hair, blue eyes, red eyes, black hair, blonde hair, smile",
        );
        assert_eq!(out, "2girls, long hair, smile");
        let lengths = clean_tags("k", "2girls, long hair, short hair, smile");
        assert_eq!(lengths, "2girls, smile");
        let single = clean_tags("k", "1girl, long hair, blue eyes, red eyes");
        assert_eq!(single, "1girl, long hair, blue eyes, red eyes");
    }

    #[test]
    fn redundant_generic_tags() {
        assert_eq!(
            clean_tags("k", "white shirt, shirt, smile"),
            "white shirt, smile"
        );
        assert_eq!(clean_tags("k", "t-shirt, shirt"), "t-shirt, shirt");
        assert_eq!(
            clean_tags("k", "pink hair ornament, hair ornament"),
            "pink hair ornament"
        );
    }

    #[test]
    fn captions() {
        assert_eq!(
            clean_caption("a young woman and a lady"),
            "a girl and a girl"
        );
        assert_eq!(clean_caption("womanly personal"), "girlly girlal");
        assert_eq!(clean_caption("an anime anime anime girl"), "an girl");
    }

    #[test]
    fn user_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("filter.txt");
        std::fs::write(
            &path,
            "# comment\nmonochrome\n/.*background/\ns/greyscale/grayscale/\n",
        )
        .unwrap();
        let filter = UserFilter::load(&path).unwrap();
        assert_eq!(
            filter.apply_to_tags("monochrome, white background, greyscale, cat"),
            "grayscale, cat"
        );
        assert_eq!(
            filter.apply_to_caption("a greyscale cat"),
            "a grayscale cat"
        );
    }
}
