//! Tagger label files (`selected_tags.csv`, `tag_mapping.json`), label post-processing and the
//! per-image tag selection and ordering of sd-scripts (see docs/kohya-compat.md#tagging).

use std::collections::HashSet;
use std::path::Path;

use crate::{Error, Result};

/// Category of a model output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// Content rating (`general`, `sensitive`, ...): the argmax one is used.
    Rating,
    /// General tags.
    General,
    /// Character tags.
    Character,
    /// Copyright / series tags (tag_mapping models).
    Copyright,
    /// Artist tags (tag_mapping models).
    Artist,
    /// Meta tags (tag_mapping models).
    Meta,
    /// Model tags (tag_mapping models).
    Model,
    /// Quality tags (tag_mapping models): the argmax one is used.
    Quality,
}

impl Category {
    fn from_mapping_name(name: &str) -> Option<Self> {
        Some(match name {
            "Rating" => Category::Rating,
            "General" => Category::General,
            "Character" => Category::Character,
            "Copyright" => Category::Copyright,
            "Artist" => Category::Artist,
            "Meta" => Category::Meta,
            "Model" => Category::Model,
            "Quality" => Category::Quality,
            _ => return None,
        })
    }
}

/// How the label file maps to the model outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `selected_tags.csv`: rating rows, then general rows, then character rows; BGR 0..255
    /// NHWC input; the model ends in a sigmoid.
    SmilingWolf,
    /// `tag_mapping.json`: output index = tag id; NCHW input scaled to -1..1; raw logits.
    TagMapping,
}

/// One model output with its (post-processed) label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Index in the model's output vector.
    pub output: usize,
    /// The text written to the tag file.
    pub name: String,
    /// Its category.
    pub category: Category,
}

/// All labels of a tagger model.
#[derive(Debug, Clone)]
pub struct LabelSet {
    /// Which label-file layout they came from.
    pub layout: Layout,
    /// Labels in file order (CSV row order, or ascending tag id).
    pub labels: Vec<Label>,
}

/// Options of the label post-processing (docs/kohya-compat.md#tag-name-post-processing).
#[derive(Debug, Clone, Default)]
pub struct LabelOptions {
    /// `--character_tag_expand`.
    pub character_tag_expand: bool,
    /// `--remove_underscore`.
    pub remove_underscore: bool,
    /// `--tag_replacement` pairs, already unescaped.
    pub replacements: Vec<(String, String)>,
    /// `--caption_separator`.
    pub caption_separator: String,
}

impl LabelSet {
    /// Reads `selected_tags.csv` (SmilingWolf layout).
    pub fn from_csv(path: &Path) -> Result<Self> {
        let text = crate::dataset::read_text(path)?;
        let rows = parse_csv(&text);
        let header = rows
            .first()
            .ok_or_else(|| Error::bad_file(path, "empty CSV"))?;
        if header.len() < 3
            || header[0] != "tag_id"
            || header[1] != "name"
            || header[2] != "category"
        {
            return Err(Error::bad_file(
                path,
                format!(
                    "unexpected CSV header {header:?}: the first columns must be tag_id,name,category"
                ),
            ));
        }
        let by_category = |code: &str| -> Vec<String> {
            rows[1..]
                .iter()
                .filter(|row| row.len() >= 3 && row[2] == code)
                .map(|row| row[1].clone())
                .collect()
        };
        let (ratings, general, characters) = (by_category("9"), by_category("0"), by_category("4"));
        let mut labels = Vec::with_capacity(ratings.len() + general.len() + characters.len());
        let groups = [
            (ratings, Category::Rating),
            (general, Category::General),
            (characters, Category::Character),
        ];
        for (names, category) in groups {
            for name in names {
                labels.push(Label {
                    output: labels.len(),
                    name,
                    category,
                });
            }
        }
        Ok(LabelSet {
            layout: Layout::SmilingWolf,
            labels,
        })
    }

    /// Reads `tag_mapping.json` (`{"<id>": {"tag": ..., "category": ...}}`).
    pub fn from_tag_mapping(path: &Path) -> Result<Self> {
        let text = crate::dataset::read_text(path)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| Error::bad_file(path, "expected a JSON object of tag ids"))?;
        let mut labels = Vec::with_capacity(object.len());
        for (id, entry) in object {
            let output: usize = id
                .parse()
                .map_err(|_| Error::bad_file(path, format!("tag id {id:?} is not a number")))?;
            let name = entry.get("tag").and_then(|t| t.as_str());
            let category = entry.get("category").and_then(|c| c.as_str());
            let (Some(name), Some(category)) = (name, category) else {
                return Err(Error::bad_file(
                    path,
                    format!("entry {id} needs string fields \"tag\" and \"category\""),
                ));
            };
            // Categories sd-scripts does not read are ignored as well.
            if let Some(category) = Category::from_mapping_name(category) {
                labels.push(Label {
                    output,
                    name: name.to_string(),
                    category,
                });
            }
        }
        labels.sort_by_key(|label| label.output);
        Ok(LabelSet {
            layout: Layout::TagMapping,
            labels,
        })
    }

    /// Number of outputs the model must produce at least.
    pub fn required_outputs(&self) -> usize {
        self.labels.iter().map(|l| l.output + 1).max().unwrap_or(0)
    }

    /// Applies character expansion, underscore removal and replacements in the layout's order.
    pub fn post_process(&mut self, options: &LabelOptions) {
        match self.layout {
            Layout::SmilingWolf => {
                self.expand_characters(options);
                self.remove_underscores(options);
                self.replace(options);
            }
            Layout::TagMapping => {
                self.remove_underscores(options);
                self.replace(options);
                self.expand_characters(options);
            }
        }
    }

    fn expand_characters(&mut self, options: &LabelOptions) {
        if !options.character_tag_expand {
            return;
        }
        for label in &mut self.labels {
            if label.category != Category::Character || !label.name.ends_with(')') {
                continue;
            }
            let split = label
                .name
                .rfind('(')
                .expect("a name ending in ')' is checked");
            let head = &label.name[..split];
            let head = head.strip_suffix('_').unwrap_or(head);
            let series = label.name[split + 1..].replace(')', "");
            label.name = format!("{head}{}{series}", options.caption_separator);
        }
    }

    fn remove_underscores(&mut self, options: &LabelOptions) {
        if !options.remove_underscore {
            return;
        }
        for label in &mut self.labels {
            if label.name.chars().count() > 3 {
                label.name = label.name.replace('_', " ");
            }
        }
    }

    /// Legacy (intended) semantics: the first label equal to the source, searched in general,
    /// then character, then rating labels (then the other categories), is renamed.
    fn replace(&mut self, options: &LabelOptions) {
        let search_order = [
            Category::General,
            Category::Character,
            Category::Rating,
            Category::Copyright,
            Category::Artist,
            Category::Meta,
            Category::Model,
            Category::Quality,
        ];
        for (source, target) in &options.replacements {
            let found = search_order.iter().find_map(|category| {
                self.labels
                    .iter()
                    .position(|l| l.category == *category && &l.name == source)
            });
            if let Some(index) = found {
                self.labels[index].name = target.clone();
            }
        }
    }
}

/// Parses `--tag_replacement "src,dst;src2,dst2"` with `\,` and `\;` escapes.
pub fn parse_replacements(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for pair in split_escaped(text, ';') {
        let parts = split_escaped(&pair, ',');
        if parts.len() != 2 {
            return Err(Error::Usage(format!(
                "--tag_replacement must be `source,target` pairs separated by `;` (write a literal \
                 comma or semicolon as \\, or \\;), got {pair:?}"
            )));
        }
        pairs.push((unescape(&parts[0]), unescape(&parts[1])));
    }
    Ok(pairs)
}

/// Splits at `separator` unless it is preceded by a backslash (escapes are kept).
fn split_escaped(text: &str, separator: char) -> Vec<String> {
    let mut pieces = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some(',') | Some(';')) {
            let escaped = chars.next().expect("peeked");
            pieces
                .last_mut()
                .expect("non-empty")
                .extend(['\\', escaped]);
        } else if c == separator {
            pieces.push(String::new());
        } else {
            pieces.last_mut().expect("non-empty").push(c);
        }
    }
    pieces
}

fn unescape(text: &str) -> String {
    text.replace("\\,", ",").replace("\\;", ";")
}

/// Thresholds per category (docs/kohya-compat.md#tag-thresholds); a value above 1 disables the
/// category.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `--general_threshold`.
    pub general: f32,
    /// `--character_threshold`.
    pub character: f32,
    /// `--copyright_threshold`.
    pub copyright: f32,
    /// `--artist_threshold`.
    pub artist: f32,
    /// `--meta_threshold`.
    pub meta: f32,
    /// `--model_threshold`.
    pub model: f32,
}

impl Thresholds {
    fn of(&self, category: Category) -> Option<f32> {
        match category {
            Category::General => Some(self.general),
            Category::Character => Some(self.character),
            Category::Copyright => Some(self.copyright),
            Category::Artist => Some(self.artist),
            Category::Meta => Some(self.meta),
            Category::Model => Some(self.model),
            Category::Rating | Category::Quality => None,
        }
    }

    fn minimum(&self) -> f32 {
        [
            self.general,
            self.character,
            self.copyright,
            self.artist,
            self.meta,
            self.model,
        ]
        .into_iter()
        .fold(f32::INFINITY, f32::min)
    }
}

/// The tags chosen for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected<'a> {
    /// In output order (what is written).
    pub tags: Vec<&'a str>,
    /// In the order sd-scripts counts them for `--frequency_tags` (label order, then rating).
    pub emitted: Vec<&'a str>,
}

/// Where an optional argmax tag (rating, quality) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Not emitted.
    #[default]
    Off,
    /// Inserted first.
    First,
    /// Appended last.
    Last,
}

/// Per-image selection options (docs/kohya-compat.md#tag-selection-and-order).
#[derive(Debug, Clone)]
pub struct Selection {
    /// Category thresholds.
    pub thresholds: Thresholds,
    /// Labels never emitted.
    pub undesired: HashSet<String>,
    /// `--always_first_tags` pieces (not stripped, as sd-scripts).
    pub always_first: Vec<String>,
    /// Rating tag placement.
    pub rating: Placement,
    /// Quality tag placement (tag_mapping models).
    pub quality: Placement,
    /// `--character_tags_first`.
    pub character_tags_first: bool,
}

impl Selection {
    /// Splits `--undesired_tags` / `--always_first_tags` exactly as sd-scripts does.
    pub fn split_lists(
        caption_separator: &str,
        undesired: &str,
        always_first: Option<&str>,
    ) -> (HashSet<String>, Vec<String>) {
        let separator = caption_separator.trim();
        let split = |text: &str| -> Vec<String> {
            if separator.is_empty() {
                vec![text.to_string()]
            } else {
                text.split(separator).map(str::to_string).collect()
            }
        };
        let undesired = split(undesired)
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let always_first = always_first
            .map(|text| {
                split(text)
                    .into_iter()
                    .filter(|t| !t.trim().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        (undesired, always_first)
    }

    /// The tags of one image given its probability vector.
    pub fn select<'a>(&self, labels: &'a LabelSet, probs: &[f32]) -> Selected<'a> {
        let (mut tags, emitted) = match labels.layout {
            Layout::SmilingWolf => self.select_smilingwolf(labels, probs),
            Layout::TagMapping => self.select_tag_mapping(labels, probs),
        };
        for tag in &self.always_first {
            if let Some(position) = tags.iter().position(|t| t == tag) {
                let tag = tags.remove(position);
                tags.insert(0, tag);
            }
        }
        Selected { tags, emitted }
    }

    fn wanted(&self, label: &Label) -> bool {
        !self.undesired.contains(&label.name)
    }

    /// The argmax label of `category` (first on ties), if not undesired.
    fn argmax<'a>(
        &self,
        labels: &'a LabelSet,
        probs: &[f32],
        category: Category,
    ) -> Option<&'a Label> {
        let mut best: Option<(&Label, f32)> = None;
        for label in labels.labels.iter().filter(|l| l.category == category) {
            let p = probs
                .get(label.output)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            if best.is_none_or(|(_, q)| p > q) {
                best = Some((label, p));
            }
        }
        best.map(|(label, _)| label).filter(|l| self.wanted(l))
    }

    fn select_smilingwolf<'a>(
        &self,
        labels: &'a LabelSet,
        probs: &[f32],
    ) -> (Vec<&'a str>, Vec<&'a str>) {
        let mut tags: Vec<&str> = Vec::new();
        let mut emitted: Vec<&str> = Vec::new();
        for label in &labels.labels {
            let Some(threshold) = self.thresholds.of(label.category) else {
                continue;
            };
            let Some(&p) = probs.get(label.output) else {
                continue;
            };
            if p < threshold || !self.wanted(label) {
                continue;
            }
            emitted.push(&label.name);
            if label.category == Category::Character && self.character_tags_first {
                tags.insert(0, &label.name);
            } else {
                tags.push(&label.name);
            }
        }
        let rating = self.argmax(labels, probs, Category::Rating);
        place(&mut tags, &mut emitted, self.rating, rating);
        (tags, emitted)
    }

    fn select_tag_mapping<'a>(
        &self,
        labels: &'a LabelSet,
        probs: &[f32],
    ) -> (Vec<&'a str>, Vec<&'a str>) {
        let minimum = self.thresholds.minimum();
        let mut characters: Vec<(&Label, f32)> = Vec::new();
        let mut others: Vec<(&Label, f32)> = Vec::new();
        for label in &labels.labels {
            let Some(threshold) = self.thresholds.of(label.category) else {
                continue;
            };
            let Some(&p) = probs.get(label.output) else {
                continue;
            };
            if p < minimum || p < threshold || !self.wanted(label) {
                continue;
            }
            if label.category == Category::Character && self.character_tags_first {
                characters.push((label, p));
            } else {
                others.push((label, p));
            }
        }
        let by_probability = |a: &(&Label, f32), b: &(&Label, f32)| b.1.total_cmp(&a.1);
        characters.sort_by(by_probability);
        others.sort_by(by_probability);
        let mut tags: Vec<&str> = characters
            .iter()
            .chain(&others)
            .map(|(l, _)| l.name.as_str())
            .collect();
        let mut emitted = tags.clone();
        // Only candidates (p >= the smallest threshold) can be the argmax tag.
        let candidate = |label: Option<&'a Label>| {
            label.filter(|l| probs.get(l.output).is_some_and(|p| *p >= minimum))
        };
        let quality = candidate(self.argmax(labels, probs, Category::Quality));
        place(&mut tags, &mut emitted, self.quality, quality);
        let rating = candidate(self.argmax(labels, probs, Category::Rating));
        place(&mut tags, &mut emitted, self.rating, rating);
        (tags, emitted)
    }
}

/// Adds an argmax tag at its placement (and to the counted tags) unless placement is off.
fn place<'a>(
    tags: &mut Vec<&'a str>,
    emitted: &mut Vec<&'a str>,
    placement: Placement,
    label: Option<&'a Label>,
) {
    let Some(label) = label else { return };
    match placement {
        Placement::Off => return,
        Placement::First => tags.insert(0, &label.name),
        Placement::Last => tags.push(&label.name),
    }
    emitted.push(&label.name);
}

/// Minimal CSV reader (RFC 4180 quoting, as Python's `csv.reader` with the default dialect).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smilingwolf(names: &[(&str, Category)]) -> LabelSet {
        LabelSet {
            layout: Layout::SmilingWolf,
            labels: names
                .iter()
                .enumerate()
                .map(|(output, (name, category))| Label {
                    output,
                    name: name.to_string(),
                    category: *category,
                })
                .collect(),
        }
    }

    fn options() -> LabelOptions {
        LabelOptions {
            caption_separator: ", ".into(),
            ..LabelOptions::default()
        }
    }

    #[test]
    fn csv_quoting() {
        let rows = parse_csv("a,b,c\n1,\"x, \"\"y\"\"\",0\r\n2,z,4");
        assert_eq!(rows[1], ["1", "x, \"y\"", "0"]);
        assert_eq!(rows[2], ["2", "z", "4"]);
    }

    #[test]
    fn post_processing_order_and_rules() {
        use Category::*;
        let mut set = smilingwolf(&[
            ("general", Rating),
            ("long_hair", General),
            ("^_^", General),
            ("chara_(costume)_(series)", Character),
            ("chara_name_(series)", Character),
        ]);
        let mut opts = options();
        opts.character_tag_expand = true;
        opts.remove_underscore = true;
        opts.replacements = parse_replacements("long hair,very long\\, hair;general,safe").unwrap();
        set.post_process(&opts);
        let names: Vec<_> = set.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "safe",
                "very long, hair",
                "^_^",
                "chara (costume), series",
                "chara name, series"
            ]
        );
        assert!(parse_replacements("a,b,c").is_err());
    }

    #[test]
    fn tag_mapping_expands_after_underscores() {
        let mut set = smilingwolf(&[("chara_name_(series)", Category::Character)]);
        set.layout = Layout::TagMapping;
        let mut opts = options();
        opts.character_tag_expand = true;
        opts.remove_underscore = true;
        set.post_process(&opts);
        assert_eq!(set.labels[0].name, "chara name , series");
    }

    #[test]
    fn selection_ordering_quirks() {
        use Category::*;
        let set = smilingwolf(&[
            ("general", Rating),
            ("sensitive", Rating),
            ("1girl", General),
            ("solo", General),
            ("monochrome", General),
            ("a_chara", Character),
            ("b_chara", Character),
        ]);
        let probs = [0.2, 0.7, 0.9, 0.35, 0.8, 0.5, 0.6];
        let (undesired, always_first) =
            Selection::split_lists(", ", "monochrome, ", Some("solo,1girl, b_chara"));
        assert_eq!(always_first, ["solo", "1girl", " b_chara"]);
        let selection = Selection {
            thresholds: Thresholds {
                general: 0.35,
                character: 0.35,
                copyright: 0.35,
                artist: 0.35,
                meta: 0.35,
                model: 0.35,
            },
            undesired,
            always_first,
            rating: Placement::First,
            quality: Placement::Off,
            character_tags_first: true,
        };
        // Characters inserted first one by one (reverse order), rating first, then the always-
        // first tags moved to the front in list order (the last one ends first); " b_chara"
        // keeps its space and never matches.
        let selected = selection.select(&set, &probs);
        assert_eq!(
            selected.tags,
            ["1girl", "solo", "sensitive", "b_chara", "a_chara"]
        );
        assert_eq!(
            selected.emitted,
            ["1girl", "solo", "a_chara", "b_chara", "sensitive"]
        );
    }
}
